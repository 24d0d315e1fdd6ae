//! Placement claims: the node that runs an instance says so in etcd, so that the instance
//! stays where it runs while membership changes.
//!
//! 1. A claim is `claims/<key>` (the instance's placement key) naming a node
//!    ([`ClaimRecord`]), written under that node's membership lease: when the node's lease
//!    ends (it died, or was cut off longer than the TTL), its claims go with it.
//! 2. A node claims an instance it owns once it runs it ([`Cluster::claim`]): created only
//!    when absent, so two nodes never both hold one; a claim already held by another node is
//!    left alone and reported.
//! 3. Every node answers from the claim when there is one and its node is live, else from
//!    the rendezvous hash ([`Cluster::owner`]). A node joining or leaving moves no instance
//!    that runs under a claim on a live node.
//! 4. A node releases a claim when it no longer runs the instance ([`Cluster::release`]),
//!    so that the next summon is placed by the hash again.
//!
//! Claims are read from a watch-fed mirror, like every other prefix: etcd stays off the
//! query path.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::{Cluster, OP_TIMEOUT};

/// A claim as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    /// The node that runs the instance.
    pub node: String,
}

/// What [`Cluster::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claimed {
    /// This node holds the claim (written now, or already).
    Mine,
    /// Another node holds it.
    Theirs(String),
}

async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

impl Cluster {
    fn claim_key(&self, key: &str) -> String {
        format!("{}claims/{key}", self.inner.prefix)
    }

    fn my_claim(&self) -> Vec<u8> {
        let record = ClaimRecord {
            node: self.inner.me.id.clone(),
        };
        serde_json::to_vec(&record).expect("a claim serializes")
    }

    /// The node named by the claim on `key`, as last seen (rule 3).
    pub fn claim_of(&self, key: &str) -> Option<String> {
        let claims = self.inner.claims.borrow();
        let (value, _) = claims.get(key)?;
        serde_json::from_slice::<ClaimRecord>(value)
            .ok()
            .map(|record| record.node)
    }

    /// The keys this node's claims name, as last seen.
    pub fn my_claims(&self) -> Vec<String> {
        let mine = self.my_claim();
        let claims = self.inner.claims.borrow();
        claims
            .iter()
            .filter(|(_, (value, _))| *value == mine)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Claims `key` for this node under its current lease (rule 2). A claim of this node
    /// under an older lease (a restart within the TTL) is moved to the current one.
    pub async fn claim(&self, key: &str) -> Result<Claimed, String> {
        let lease = self.lease();
        let etcd_key = self.claim_key(key);
        let mine = self.my_claim();
        let mut client = self.inner.client.clone();
        let txn = Txn::new()
            .when([Compare::version(etcd_key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                etcd_key.as_str(),
                mine.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(etcd_key.as_str(), None)]);
        let done = timed(client.txn(txn)).await?;
        if done.succeeded() {
            debug!(key, "claimed an instance");
            return Ok(Claimed::Mine);
        }
        let held = done
            .op_responses()
            .into_iter()
            .find_map(|response| match response {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.lease(), kv.mod_revision())),
                _ => None,
            });
        let Some((value, held_lease, revision)) = held else {
            // Deleted between the compare and the get: claimed again on the next round.
            return Err("the claim changed meanwhile".to_owned());
        };
        if value != mine {
            let node = serde_json::from_slice::<ClaimRecord>(&value)
                .map_or_else(|_| "an unknown node".to_owned(), |record| record.node);
            return Ok(Claimed::Theirs(node));
        }
        if held_lease != lease {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    etcd_key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(
                    etcd_key.as_str(),
                    mine,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            timed(client.txn(txn)).await?;
        }
        Ok(Claimed::Mine)
    }

    /// Releases this node's claim on `key`, if it still holds it (rule 4).
    pub async fn release(&self, key: &str) -> Result<(), String> {
        let etcd_key = self.claim_key(key);
        let mut client = self.inner.client.clone();
        let txn = Txn::new()
            .when([Compare::value(
                etcd_key.as_str(),
                CompareOp::Equal,
                self.my_claim(),
            )])
            .and_then([TxnOp::delete(etcd_key.as_str(), None)]);
        timed(client.txn(txn)).await?;
        debug!(key, "released a claim");
        Ok(())
    }
}
