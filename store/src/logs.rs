//! Runtime logs: what instances did, on `refs/revboot/logs/<service>`.
//!
//! 1. One commit per instance record; parent = the previous record of the service.
//! 2. The tree holds `record.toml` (revision, client, start, boot and life times, outcome)
//!    and `console.log` (the console output as given).
//! 3. The message is `<outcome> (<revision short>)` and a `Revision: <hex>` trailer, so
//!    `git log refs/revboot/logs/<service>` reads as a run history.
//! 4. The objects go through a quarantine, as a deployment's do; the ref moves by
//!    compare-and-swap under the service's writer lock; the deployment branch is never
//!    touched.

use std::net::IpAddr;

use gix::objs::tree::{Entry, EntryKind};
use serde::{Deserialize, Serialize};

use crate::types::RuntimeRecord;
use crate::{ReadError, Revision, Store, WriteError};

/// The largest console log accepted per record.
pub const MAX_CONSOLE_BYTES: usize = 16 << 20;
/// The most records [`Store::runtime_logs`] returns.
pub const MAX_RUNTIME_LOGS: usize = 10_000;

const RECORD: &str = "record.toml";
const CONSOLE: &str = "console.log";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client: Option<IpAddr>,
    started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_ms: Option<u64>,
    lifetime_ms: u64,
    outcome: String,
}

/// The log ref of a service.
pub fn log_ref(service: &str) -> String {
    format!("refs/revboot/logs/{service}")
}

impl Store {
    /// Appends one instance record to `refs/revboot/logs/<service>`.
    pub fn append_runtime_log(
        &self,
        service: &str,
        record: &RuntimeRecord,
    ) -> Result<(), WriteError> {
        crate::protocol::check_label(service).map_err(|reason| WriteError::InvalidName {
            what: "service",
            name: service.to_owned(),
            reason,
        })?;
        if record.outcome.is_empty() || record.outcome.contains('\n') || record.outcome.len() > 500
        {
            return Err(WriteError::InvalidDeployment(
                "runtime outcome must be one line of 1 to 500 bytes".into(),
            ));
        }
        if record.console.len() > MAX_CONSOLE_BYTES {
            return Err(WriteError::InvalidDeployment(format!(
                "console log exceeds {MAX_CONSOLE_BYTES} bytes"
            )));
        }
        let file = RecordFile {
            revision: record.revision.to_hex(),
            client: record.client,
            started_at_ms: record.started_at_ms,
            boot_ms: record.boot_ms,
            lifetime_ms: record.lifetime_ms,
            outcome: record.outcome.clone(),
        };
        let text = toml::to_string(&file).expect("a record has only TOML-safe fields");
        let repo = self.repo();
        let mut quarantine = crate::quarantine::Quarantine::create(self.path())?;
        let record_blob = quarantine.write_blob(text.as_bytes(), "write record")?;
        let console_blob = quarantine.write_blob(&record.console, "write console log")?;
        let mut entries = vec![
            Entry {
                mode: EntryKind::Blob.into(),
                filename: CONSOLE.into(),
                oid: console_blob,
            },
            Entry {
                mode: EntryKind::Blob.into(),
                filename: RECORD.into(),
                oid: record_blob,
            },
        ];
        entries.sort();
        let tree = quarantine.write(&gix::objs::Tree { entries }, "write tree")?;
        let message = format!(
            "{} ({})\n\nRevision: {}\n",
            record.outcome,
            record.revision.short(12),
            record.revision
        );
        let reference = log_ref(service);
        let _lock = crate::lock::ServiceLock::acquire(self.path(), service)?;
        self.publish(
            &repo,
            service,
            &mut quarantine,
            &reference,
            &message_line(record),
            |quarantine, parent| {
                let commit = crate::store::commit(tree, parent, &message);
                quarantine.write(&commit, "write commit")
            },
        )?;
        tracing::debug!(service, revision = %record.revision, outcome = record.outcome, "appended runtime log");
        Ok(())
    }

    /// The instance records of `service`, newest first (at most [`MAX_RUNTIME_LOGS`]).
    pub fn runtime_logs(&self, service: &str) -> Result<Vec<RuntimeRecord>, ReadError> {
        self.runtime_logs_of(service, None, MAX_RUNTIME_LOGS)
    }

    /// The newest `limit` instance records of `service` (at most [`MAX_RUNTIME_LOGS`]),
    /// only those of `revision` if given, newest first. Of the records passed over, only
    /// `record.toml` is read, never the console.
    pub fn runtime_logs_of(
        &self,
        service: &str,
        revision: Option<Revision>,
        limit: usize,
    ) -> Result<Vec<RuntimeRecord>, ReadError> {
        crate::protocol::check_label(service)
            .map_err(|_| ReadError::InvalidService(service.to_owned()))?;
        let repo = self.repo();
        let git = |action| move |source| ReadError::Git { action, source };
        let Some(reference) = repo
            .try_find_reference(log_ref(service).as_str())
            .map_err(git("read log ref"))?
        else {
            return Ok(Vec::new());
        };
        let Some(tip) = reference.target().try_id().map(ToOwned::to_owned) else {
            return Ok(Vec::new());
        };
        let limit = limit.min(MAX_RUNTIME_LOGS);
        let mut records = Vec::new();
        let mut next = Some(tip);
        let mut walked = 0;
        while let Some(id) = next {
            if records.len() >= limit || walked >= MAX_RUNTIME_LOGS {
                break;
            }
            walked += 1;
            let commit = Revision::new(id);
            let meta = crate::index::read_meta(&repo, id)?;
            next = meta.parent;
            let record = crate::read::read_tree_file(&repo, commit, meta.tree, RECORD)?
                .ok_or_else(|| ReadError::Malformed {
                    revision: commit,
                    reason: "runtime log without record.toml".into(),
                })?;
            let malformed = |reason: String| ReadError::Malformed {
                revision: commit,
                reason,
            };
            let text = String::from_utf8(record)
                .map_err(|_| malformed("record.toml is not UTF-8".into()))?;
            let file: RecordFile =
                toml::from_str(&text).map_err(|e| malformed(e.message().to_owned()))?;
            let of: Revision = file
                .revision
                .parse()
                .map_err(|e: crate::ParseRevisionError| malformed(e.to_string()))?;
            if revision.is_some_and(|wanted| wanted != of) {
                continue;
            }
            let console =
                crate::read::read_tree_file(&repo, commit, meta.tree, CONSOLE)?.unwrap_or_default();
            records.push(RuntimeRecord {
                revision: of,
                client: file.client,
                started_at_ms: file.started_at_ms,
                boot_ms: file.boot_ms,
                lifetime_ms: file.lifetime_ms,
                outcome: file.outcome,
                console,
            });
        }
        Ok(records)
    }
}

fn message_line(record: &RuntimeRecord) -> String {
    format!(
        "revboot: instance of {} {}",
        record.revision.short(12),
        record.outcome
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BuildStatus, ImageInput, NewDeployment};

    #[test]
    fn records_round_trip_and_leave_the_branch_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::init(dir.path().join("d.git")).expect("init");
        let revision = store
            .write_deployment(NewDeployment {
                service: "hello",
                status: BuildStatus::Succeeded,
                manifest: None,
                images: vec![ImageInput {
                    name: "hello".into(),
                    reader: Box::new(&b"elf"[..]),
                }],
                build_log: b"",
                source_commit: &"ab".repeat(20),
                source_repo: "hello",
                source_ref: None,
                subject: "x",
            })
            .expect("write");
        let record = |n: u64| RuntimeRecord {
            revision,
            client: if n == 0 {
                None
            } else {
                Some("127.0.0.9".parse().expect("ip"))
            },
            started_at_ms: 1_000 + n,
            boot_ms: Some(n),
            lifetime_ms: 60_000,
            outcome: format!("stopped: idle {n}"),
            console: format!("console {n}\n").into_bytes(),
        };
        store
            .append_runtime_log("hello", &record(0))
            .expect("append");
        store
            .append_runtime_log("hello", &record(1))
            .expect("append");
        assert_eq!(
            store.runtime_logs("hello").expect("read"),
            vec![record(1), record(0)]
        );
        assert_eq!(store.history("hello").expect("history").len(), 1);
        assert_eq!(
            store.history("hello").expect("history")[0].revision,
            revision
        );
        assert!(store.runtime_logs("other").expect("read").is_empty());
        assert_eq!(
            store
                .runtime_logs_of("hello", Some(revision), 1)
                .expect("read"),
            vec![record(1)]
        );
        let elsewhere = Revision::new(gix::ObjectId::empty_tree(gix::hash::Kind::Sha1));
        assert!(
            store
                .runtime_logs_of("hello", Some(elsewhere), 10)
                .expect("read")
                .is_empty()
        );
        let bad = RuntimeRecord {
            outcome: "two\nlines".into(),
            ..record(2)
        };
        assert!(store.append_runtime_log("hello", &bad).is_err());
        assert_eq!(store.runtime_logs("hello").expect("read").len(), 2);
    }
}
