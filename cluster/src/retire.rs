//! Renaming and deleting a service in a cluster: etcd first, then every node.
//!
//! 1. `retired/<service>` is a [`RetiredRecord`]: the service was deleted (its deployments
//!    kept or not) or renamed to another name, by which node and when. A node writes it by
//!    compare-and-swap ([`Cluster::retire`]), in one transaction with the service's other
//!    records: `sources/`, `live/` and `heads/` are removed (a delete) or moved to the new
//!    name (a rename), and its placement claims (`claims/<service>/…`) are removed. The
//!    transaction holds only if none of them moved since they were read, no build of the
//!    service holds its build lock, and (a rename) the new name has no source record or
//!    live pointer: two operations at once on two nodes, one wins and the other is refused
//!    ([`RetireError::Conflict`]) with its reason, nothing changed.
//! 2. Every write of a service's records elsewhere (a push's ref move, a live move, an
//!    announced deployment, a service recorded by replication) holds only while the
//!    service has no `retired/` record, so no node brings back a retired service, whatever
//!    it has not applied yet.
//! 3. Each node applies the records on its replication rounds (the daemon's part): a
//!    service it still has is deleted or renamed here as on a single host, and so is one of
//!    a node that was down, on its first round after it starts.
//! 4. `service add` of a retired name clears its record ([`Cluster::revive`]), and so does a
//!    rename to it: the service is a new one, and its source record names the operation it
//!    replaces ([`SourceRecord::replaces`], with the deployment that was the service's
//!    newest then, [`RetiredRecord::head`]). A node that was away for both and still has
//!    that deployment applies the operation first, and never announces the earlier
//!    service's deployments as the new one's.
//! 5. At most [`MAX_RETIRED`] records are kept: the oldest goes when one more is written (a
//!    node down for longer than that many operations keeps the services it missed).

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Cluster;
use crate::coord::{HeadRecord, records, timed, unix_ms};
use crate::mirror::Map;
use crate::sources::{RefRecord, RetiredRecord, SourceRecord};

/// The most `retired/` records etcd keeps (rule 5).
pub const MAX_RETIRED: usize = 1024;

/// How many times [`Cluster::retire`] reads again when a record of the service moved
/// between its read and its write (a push, a live move).
const ATTEMPTS: usize = 8;

/// Why a rename or delete was refused by the cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetireError {
    /// Another node's operation, a build, or a name taken stands in the way.
    #[error("{0}; nothing changed")]
    Conflict(String),
    /// etcd did not answer.
    #[error(
        "Cannot rename or delete `{service}`: etcd did not answer ({reason}); renames and deletes are refused while the cluster's etcd is unreachable"
    )]
    Unavailable {
        /// The service.
        service: String,
        /// What went wrong.
        reason: String,
    },
}

/// A key's value and modification revision, as one read saw it.
type Read = Option<(Vec<u8>, i64)>;

impl Cluster {
    /// The `retired/` records, by service.
    pub fn retired(&self) -> Vec<(String, RetiredRecord)> {
        records(&self.inner().retired)
    }

    /// The record of `service`, if it is retired.
    pub fn retired_record(&self, service: &str) -> Option<RetiredRecord> {
        self.retired()
            .into_iter()
            .find_map(|(name, record)| (name == service).then_some(record))
    }

    /// A watch that changes whenever a `retired/` record does.
    pub fn retired_changed(&self) -> watch::Receiver<Map> {
        self.inner().retired.clone()
    }

    /// The compare that holds while `service` is not retired (rule 2).
    pub(crate) fn not_retired(&self, service: &str) -> Compare {
        let key = format!("{}retired/{service}", self.inner().prefix);
        Compare::version(key, CompareOp::Equal, 0)
    }

    /// Why a write of `service`'s records failed its compare, when it is retired now.
    pub(crate) async fn retired_now(&self, service: &str) -> Option<String> {
        let key = format!("{}retired/{service}", self.inner().prefix);
        let mut client = self.inner().client.clone();
        let got = timed(client.get(key, None)).await.ok()?;
        let record: RetiredRecord = serde_json::from_slice(got.kvs().first()?.value()).ok()?;
        Some(match &record.renamed_to {
            Some(to) => format!(
                "Service `{service}` is now `{to}` (renamed by node {})",
                record.node
            ),
            None => format!("Service `{service}` was deleted (by node {})", record.node),
        })
    }

    /// Deletes `service` (`renamed_to`: `None`, its deployments kept or not) or renames it,
    /// in etcd (rule 1).
    pub async fn retire(
        &self,
        service: &str,
        renamed_to: Option<&str>,
        keep: bool,
    ) -> Result<(), RetireError> {
        let prefix = self.inner().prefix.clone();
        let key = |kind: &str, name: &str| format!("{prefix}{kind}/{name}");
        let unavailable = |reason: String| RetireError::Unavailable {
            service: service.to_owned(),
            reason,
        };
        let mut client = self.inner().client.clone();
        let mut record = RetiredRecord {
            renamed_to: renamed_to.map(str::to_owned),
            keep,
            node: self.me().id.clone(),
            at_ms: unix_ms(),
            head: None,
        };
        for _ in 0..ATTEMPTS {
            let read = |k: String| {
                let mut client = client.clone();
                async move {
                    let got = timed(client.get(k, None)).await?;
                    Ok::<Read, String>(
                        got.kvs()
                            .first()
                            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                    )
                }
            };
            if let Some((value, _)) = read(key("retired", service)).await.map_err(unavailable)? {
                let before: Option<RetiredRecord> = serde_json::from_slice(&value).ok();
                return Err(RetireError::Conflict(format!(
                    "`{service}` was {} meanwhile",
                    before.map_or("retired".to_owned(), |r| r.what())
                )));
            }
            if let Some((value, _)) = read(key("builds", service)).await.map_err(unavailable)? {
                let holder: Option<RefRecord> = serde_json::from_slice(&value).ok();
                return Err(RetireError::Conflict(format!(
                    "A build of `{service}` runs on node {}: wait for it",
                    holder.map_or_else(|| "?".to_owned(), |h| h.node)
                )));
            }
            let mut compares = vec![
                self.not_retired(service),
                Compare::version(key("builds", service), CompareOp::Equal, 0),
            ];
            let mut ops = Vec::new();
            // A name deleted before, renamed to, is free again: its record goes (rule 4),
            // and the new name's source record says what it replaces.
            let replaced = match renamed_to {
                Some(to) => read(key("retired", to)).await.map_err(unavailable)?,
                None => None,
            };
            for kind in ["sources", "live", "heads"] {
                let got = read(key(kind, service)).await.map_err(unavailable)?;
                if kind == "heads" {
                    record.head = (got.as_ref())
                        .and_then(|(value, _)| serde_json::from_slice::<HeadRecord>(value).ok())
                        .map(|head| head.commit);
                }
                compares.push(match &got {
                    Some((_, revision)) => {
                        Compare::mod_revision(key(kind, service), CompareOp::Equal, *revision)
                    }
                    None => Compare::version(key(kind, service), CompareOp::Equal, 0),
                });
                ops.push(TxnOp::delete(key(kind, service), None));
                if let (Some(to), Some((mut value, _))) = (renamed_to, got) {
                    if kind == "sources" {
                        let mut moved: SourceRecord =
                            serde_json::from_slice(&value).unwrap_or_default();
                        moved.renamed_from = Some(service.to_owned());
                        moved.replaces = (replaced.as_ref())
                            .and_then(|(value, _)| serde_json::from_slice(value).ok());
                        value =
                            serde_json::to_vec(&moved).map_err(|e| unavailable(e.to_string()))?;
                    }
                    ops.push(TxnOp::put(key(kind, to), value, None));
                }
            }
            ops.push(TxnOp::delete(
                key("claims", &format!("{service}/")),
                Some(DeleteOptions::new().with_prefix()),
            ));
            if let Some(to) = renamed_to {
                for kind in ["sources", "live"] {
                    if read(key(kind, to)).await.map_err(unavailable)?.is_some() {
                        return Err(RetireError::Conflict(format!(
                            "Service `{to}` exists already in the cluster"
                        )));
                    }
                    compares.push(Compare::version(key(kind, to), CompareOp::Equal, 0));
                }
                compares.push(match &replaced {
                    Some((_, revision)) => {
                        Compare::mod_revision(key("retired", to), CompareOp::Equal, *revision)
                    }
                    None => Compare::version(key("retired", to), CompareOp::Equal, 0),
                });
                ops.push(TxnOp::delete(key("retired", to), None));
                ops.push(TxnOp::delete(
                    key("claims", &format!("{to}/")),
                    Some(DeleteOptions::new().with_prefix()),
                ));
            }
            let value = serde_json::to_vec(&record).map_err(|e| unavailable(e.to_string()))?;
            ops.push(TxnOp::put(key("retired", service), value, None));
            let txn = Txn::new().when(compares).and_then(ops);
            let done = timed(client.txn(txn)).await.map_err(unavailable)?;
            if done.succeeded() {
                info!(
                    service,
                    to = renamed_to,
                    keep,
                    "service retired in the cluster"
                );
                self.forget_oldest_retired().await;
                return Ok(());
            }
        }
        warn!(service, "a rename or delete kept losing races");
        Err(RetireError::Conflict(format!(
            "The records of `{service}` changed {ATTEMPTS} times while it was being renamed or deleted"
        )))
    }

    /// Rule 5: the oldest records beyond [`MAX_RETIRED`] go.
    async fn forget_oldest_retired(&self) {
        let mut all = self.retired();
        if all.len() < MAX_RETIRED {
            return;
        }
        all.sort_by_key(|(_, record)| record.at_ms);
        let over = all.len() + 1 - MAX_RETIRED;
        let mut client = self.inner().client.clone();
        for (service, _) in all.into_iter().take(over) {
            let key = format!("{}retired/{service}", self.inner().prefix);
            if let Err(error) = timed(client.delete(key, None)).await {
                warn!(error, service, "cannot forget an old rename or delete");
            }
        }
    }

    /// A service added under a retired name is a new one (rule 4): its record goes, and the
    /// service is recorded with no ref, as replacing it ([`SourceRecord::replaces`]).
    /// `Ok(false)`: the cluster has a service of that name already.
    pub async fn revive(&self, service: &str) -> Result<bool, String> {
        let retired = format!("{}retired/{service}", self.inner().prefix);
        let sources = format!("{}sources/{service}", self.inner().prefix);
        let mut client = self.inner().client.clone();
        let got = timed(client.get(retired.as_str(), None)).await?;
        let (replaces, compare) = match got.kvs().first() {
            Some(kv) => (
                serde_json::from_slice(kv.value()).ok(),
                Compare::mod_revision(retired.as_str(), CompareOp::Equal, kv.mod_revision()),
            ),
            None => (
                None,
                Compare::version(retired.as_str(), CompareOp::Equal, 0),
            ),
        };
        let record = SourceRecord {
            replaces,
            ..SourceRecord::default()
        };
        let value = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        let txn = Txn::new()
            .when([
                Compare::version(sources.as_str(), CompareOp::Equal, 0),
                compare,
            ])
            .and_then([
                TxnOp::delete(retired.as_str(), None),
                TxnOp::put(sources.as_str(), value, None),
            ]);
        timed(client.txn(txn)).await.map(|done| done.succeeded())
    }
}
