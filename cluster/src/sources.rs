//! Source repositories in a cluster: their branches' one truth, and who builds.
//!
//! 1. `sources/<service>` holds a [`SourceRecord`]: each branch's and tag's commit (a tag's
//!    object, for an annotated one) and the node that took the push of it. A service added
//!    on a node is recorded with no ref, so that every node makes its source repository.
//! 2. A push moves a ref by compare-and-swap ([`Cluster::move_ref`]): from the commit
//!    the pushing node has (what `git push` saw as the ref's old value) to the pushed
//!    one. A ref etcd has no record of takes any old value. Another node that moved the
//!    ref first wins, and this push is refused with [`RefCasError::Conflict`], as git
//!    refuses a push that is not a fast-forward.
//! 3. A deletion (`git push --delete`) is a move to zeros: the ref leaves `refs` and is
//!    noted in `deleted` (the newest [`MAX_DELETED`]), so that the other nodes delete it
//!    too rather than take it for one they have not recorded yet. A ref pushed again
//!    leaves `deleted`.
//! 4. The other nodes fetch a ref from the node the record names, and delete the refs
//!    `deleted` names (the daemon's part).
//! 5. `builds/<service>` is the service's build lock ([`Cluster::lock_builds`]): one node at
//!    a time writes a service's deployment branch. It is held under a lease of its own, kept
//!    alive while the [`BuildLock`] lives: a builder that dies loses it within the TTL, and
//!    another node may build. A builder whose node stalled longer than the TTL (SIGSTOP, a
//!    VM paused) lost it too, and another node may have built meanwhile: right before it
//!    writes a deployment, a builder checks that the lock is still its own
//!    ([`Cluster::check_build_lock`]: renewed for a whole TTL from then, and the key still
//!    under its lease) and writes nothing otherwise. What remains: a stall longer than the
//!    TTL between that check and the branch's move (a few milliseconds of git ref update).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::coord::{create_or_get, records_with_revision, renew_once, timed};
use crate::mirror::Map;
use crate::{Cluster, OP_TIMEOUT};

/// The branches and tags of a service's source repository as etcd holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// By ref name (`refs/heads/main`, `refs/tags/v1`).
    #[serde(default)]
    pub refs: BTreeMap<String, RefRecord>,
    /// Refs deleted by a push, oldest first, at most [`MAX_DELETED`] (rule 3): each with
    /// the commit it was at and the node that took the deletion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<(String, RefRecord)>,
    /// The name the service had before a rename (see [`Cluster::retire`](crate::Cluster::retire)): a node that still
    /// has it renames it rather than make this one anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renamed_from: Option<String>,
    /// The rename or delete of an earlier service of this name that this one replaced
    /// (added again, or renamed to it): a node that was away for both and still has the
    /// earlier one (its [`RetiredRecord::head`]) applies that first, so that nothing of it
    /// comes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<RetiredRecord>,
}

/// A service deleted or renamed in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredRecord {
    /// The new name of a renamed service; `None`: deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renamed_to: Option<String>,
    /// A delete that kept the deployments (archived on every node).
    #[serde(default)]
    pub keep: bool,
    /// The node that took the operation.
    pub node: String,
    /// When (Unix milliseconds).
    pub at_ms: u64,
    /// The service's newest deployment then, as announced: a node that still has it has
    /// the service from before (see [`SourceRecord::replaces`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

impl RetiredRecord {
    pub(crate) fn what(&self) -> String {
        match &self.renamed_to {
            Some(to) => format!("renamed to `{to}` by node {}", self.node),
            None => format!("deleted by node {}", self.node),
        }
    }
}

/// The most deletions a [`SourceRecord`] remembers; a node that was away for more
/// deletions of one service than this keeps the older deleted refs.
pub const MAX_DELETED: usize = 256;

/// One branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    /// Its commit (hex).
    pub commit: String,
    /// The node that took the push: where to fetch it from.
    pub node: String,
}

/// Why a branch did not move.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefCasError {
    /// Another node moved the branch first.
    #[error(
        "{refname} of `{service}` moved meanwhile: it is at {} (pushed to node {node}), not {} as this node had it; fetch first, then push again",
        short(commit),
        short(expected)
    )]
    Conflict {
        /// The service.
        service: String,
        /// The branch.
        refname: String,
        /// What the pusher's node had.
        expected: String,
        /// Where it is.
        commit: String,
        /// Who moved it.
        node: String,
    },
    /// The service was renamed or deleted in the cluster (see [`Cluster::retire`](crate::Cluster::retire)).
    #[error("{reason}: the push was not taken")]
    Retired {
        /// The service.
        service: String,
        /// What became of it.
        reason: String,
    },
    /// etcd did not answer.
    #[error(
        "Cannot move {refname} of `{service}`: etcd did not answer ({reason}); pushes are refused while the cluster's etcd is unreachable"
    )]
    Unavailable {
        /// The service.
        service: String,
        /// The branch.
        refname: String,
        /// What went wrong.
        reason: String,
    },
}

/// How many times a branch move reads again when another branch of the service moved
/// between its read and its write.
const MOVE_ATTEMPTS: usize = 8;
/// How often a node waiting for a service's build lock asks again.
const LOCK_POLL: Duration = Duration::from_millis(300);

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

fn is_zero(hex: &str) -> bool {
    hex.bytes().all(|b| b == b'0')
}

impl Cluster {
    /// The source records, by service, with etcd's revision of each one's last change.
    pub fn sources(&self) -> Vec<(String, SourceRecord, i64)> {
        records_with_revision(&self.inner().sources)
    }

    /// A watch that changes whenever a source record does.
    pub fn sources_changed(&self) -> watch::Receiver<Map> {
        self.inner().sources.clone()
    }

    /// Records `service` (with no branch) unless it is recorded already (rule 1).
    pub async fn add_source(&self, service: &str) -> Result<(), String> {
        let key = format!("{}sources/{service}", self.inner().prefix);
        let value = serde_json::to_vec(&SourceRecord::default()).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([
                Compare::version(key.as_str(), CompareOp::Equal, 0),
                self.not_retired(service),
            ])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let mut client = self.inner().client.clone();
        timed(client.txn(txn)).await.map(|_| ())
    }

    /// Moves `refname` of `service` from `old` to `new` (40 hex each; zeros: absent), by
    /// compare-and-swap (rule 2). Moving to where it is already succeeds.
    pub async fn move_ref(
        &self,
        service: &str,
        refname: &str,
        old: &str,
        new: &str,
    ) -> Result<(), RefCasError> {
        let key = format!("{}sources/{service}", self.inner().prefix);
        let unavailable = |reason: String| RefCasError::Unavailable {
            service: service.to_owned(),
            refname: refname.to_owned(),
            reason,
        };
        let mut client = self.inner().client.clone();
        for _ in 0..MOVE_ATTEMPTS {
            let got = timed(client.get(key.as_str(), None))
                .await
                .map_err(unavailable)?;
            let (mut record, compare) = match got.kvs().first() {
                Some(kv) => (
                    serde_json::from_slice::<SourceRecord>(kv.value()).unwrap_or_default(),
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    SourceRecord::default(),
                    Compare::version(key.as_str(), CompareOp::Equal, 0),
                ),
            };
            match record.refs.get(refname) {
                Some(now) if now.commit == new => return Ok(()),
                None if is_zero(new) => return Ok(()),
                Some(now) if now.commit != old => {
                    warn!(
                        service,
                        refname,
                        at = now.commit,
                        by = now.node,
                        "a push lost a race for a branch"
                    );
                    return Err(RefCasError::Conflict {
                        service: service.to_owned(),
                        refname: refname.to_owned(),
                        expected: old.to_owned(),
                        commit: now.commit.clone(),
                        node: now.node.clone(),
                    });
                }
                _ => {}
            }
            record.deleted.retain(|(name, _)| name != refname);
            if is_zero(new) {
                if let Some(gone) = record.refs.remove(refname) {
                    record.deleted.push((
                        refname.to_owned(),
                        RefRecord {
                            commit: gone.commit,
                            node: self.me().id.clone(),
                        },
                    ));
                    let over = record.deleted.len().saturating_sub(MAX_DELETED);
                    record.deleted.drain(..over);
                }
            } else {
                record.refs.insert(
                    refname.to_owned(),
                    RefRecord {
                        commit: new.to_owned(),
                        node: self.me().id.clone(),
                    },
                );
            }
            let value = serde_json::to_vec(&record).map_err(|e| unavailable(e.to_string()))?;
            let txn = Txn::new()
                .when([compare, self.not_retired(service)])
                .and_then([TxnOp::put(key.as_str(), value, None)]);
            let done = timed(client.txn(txn)).await.map_err(unavailable)?;
            if !done.succeeded()
                && let Some(reason) = self.retired_now(service).await
            {
                return Err(RefCasError::Retired {
                    service: service.to_owned(),
                    reason,
                });
            }
            if done.succeeded() {
                info!(service, refname, new, "branch moved in the cluster");
                return Ok(());
            }
            debug!(
                service,
                refname, "the source record changed meanwhile: reading again"
            );
        }
        Err(unavailable(format!(
            "the record changed {MOVE_ATTEMPTS} times while moving it"
        )))
    }

    /// Takes the build lock of `service` (rule 4), waiting at most `patience` while another
    /// node holds it.
    pub async fn lock_builds(
        &self,
        service: &str,
        patience: Duration,
    ) -> Result<BuildLock, String> {
        let inner = self.inner();
        let key = format!("{}builds/{service}", inner.prefix);
        let mut client = inner.client.clone();
        let ttl_s = i64::try_from(inner.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = timed(client.lease_grant(ttl_s, None)).await?.id();
        let (release, released) = oneshot::channel::<()>();
        // From here on the lease is revoked whatever happens: kept alive until released.
        tokio::spawn(hold(client.clone(), lease, inner.ttl, released));
        let value = serde_json::to_vec(&RefRecord {
            commit: String::new(),
            node: self.me().id.clone(),
        })
        .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + patience;
        let mut holder = String::new();
        loop {
            let done = timed(client.txn(create_or_get(&key, value.clone(), lease))).await?;
            if done.succeeded() {
                debug!(service, "took the build lock");
                return Ok(BuildLock {
                    _release: release,
                    waited: !holder.is_empty(),
                    service: service.to_owned(),
                    key,
                    lease,
                });
            }
            if let Some(node) = done.op_responses().into_iter().find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<RefRecord>(kv.value()).ok()),
                _ => None,
            }) {
                holder = node.node;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {holder} has been building `{service}` for longer than {patience:?}"
                ));
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }
}

/// A service's build lock, held while it lives (its lease is revoked on drop).
#[derive(Debug)]
pub struct BuildLock {
    _release: oneshot::Sender<()>,
    waited: bool,
    service: String,
    /// `builds/<service>` with the prefix.
    key: String,
    lease: i64,
}

impl Cluster {
    /// Whether `lock` is still this node's (rule 5), right before a deployment is written:
    /// its lease renewed now (so it holds for a whole TTL from here, unless the node stalls
    /// that long again) and the lock's key still under it. An error says why not: the lease
    /// expired (the node stalled longer than the TTL) and who holds the lock now, or etcd did
    /// not answer; either way the deployment must not be written.
    pub async fn check_build_lock(&self, lock: &BuildLock) -> Result<(), String> {
        let service = &lock.service;
        let inner = self.inner();
        let lost = |holder: Option<String>| {
            let holder = holder.map_or_else(
                || "nobody holds it now".to_owned(),
                |node| format!("node {node} holds it now"),
            );
            warn!(service, holder, "lost the build lock");
            format!(
                "this node lost the cluster's build lock of `{service}` (its lease of {}s expired while the node stalled; {holder})",
                inner.ttl.as_secs()
            )
        };
        let renewed = renew_once(&inner.client, lock.lease).await;
        let mut client = inner.client.clone();
        let txn = Txn::new()
            .when([Compare::lease(
                lock.key.as_str(),
                CompareOp::Equal,
                lock.lease,
            )])
            .or_else([TxnOp::get(lock.key.as_str(), None)]);
        let done = timed(client.txn(txn)).await.map_err(|error| {
            format!("cannot ask etcd for the build lock of `{service}`: {error}")
        })?;
        if done.succeeded() {
            return renewed
                .map(drop)
                .map_err(|error| format!("cannot renew the build lock of `{service}`: {error}"));
        }
        let holder = done.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<RefRecord>(kv.value()).ok())
                .map(|record| record.node),
            _ => None,
        });
        Err(lost(holder))
    }
}

impl BuildLock {
    /// Whether another node held the lock when it was asked for (it may have written
    /// deployments this node has not fetched yet).
    pub fn waited(&self) -> bool {
        self.waited
    }
}

/// Keeps `lease` alive until `released` fires or its sender is dropped, then revokes it.
async fn hold(
    client: etcd_client::Client,
    lease: i64,
    ttl: Duration,
    mut released: oneshot::Receiver<()>,
) {
    let mut renewing = client.clone();
    let renew = async {
        let Ok(Ok((mut keeper, mut responses))) =
            tokio::time::timeout(OP_TIMEOUT, renewing.lease_keep_alive(lease)).await
        else {
            warn!(lease, "cannot keep a build lock alive");
            return std::future::pending::<()>().await;
        };
        loop {
            tokio::time::sleep(ttl / 3).await;
            let round = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            if !matches!(
                tokio::time::timeout(OP_TIMEOUT, round).await,
                Ok(Ok(Some(_)))
            ) {
                warn!(lease, "a build lock's renewal failed");
            }
        }
    };
    tokio::select! {
        _ = &mut released => {}
        () = renew => {}
    }
    let mut client = client;
    let _ = tokio::time::timeout(OP_TIMEOUT, client.lease_revoke(lease)).await;
}
