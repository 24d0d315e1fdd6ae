//! Durable state: the running instances, in redb, so that a restarted daemon can remove what
//! an earlier one left running.
//!
//! 1. An instance is recorded once it runs (pid, its start time, cgroups, address, revision,
//!    start time) and deleted once it ended and was cleaned up.
//! 2. Writes go through one writer thread that commits whatever is queued in one
//!    transaction, so a boot storm costs a few commits, not one per instance; the boot path
//!    never waits for the disk.
//! 3. At start-up, every record left is an orphan of a daemon that died: its process is
//!    killed (if the pid still belongs to it), its cgroups and scratch directory removed,
//!    and the record deleted — the deployer does not re-adopt (the console pipe and exit
//!    status cannot be recovered); instances boot again on demand.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::tender::Footprint;

const INSTANCES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("instances");
/// Queued writes before senders wait.
const QUEUE: usize = 4096;
/// Most writes committed in one transaction.
const BATCH: usize = 1024;
/// How long a locked database is asked again before the start fails ([`open`]).
const LOCKED_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// One running instance, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance id (cgroup and scratch name).
    pub id: String,
    /// Service.
    pub service: String,
    /// Deployment commit, hex.
    pub revision: String,
    /// Client of a per-client instance.
    pub client: Option<IpAddr>,
    /// Which replica of its revision (0 in records of programs older than replicas).
    #[serde(default, skip_serializing_if = "is_first")]
    pub replica: u16,
    /// Service address.
    pub address: IpAddr,
    /// Start, unix ms.
    pub started_at_ms: u64,
    /// Scratch directory.
    pub scratch: PathBuf,
    /// Process and cgroups.
    pub footprint: Footprint,
}

fn is_first(replica: &u16) -> bool {
    *replica == 0
}

/// Why the state database failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Opening or creating the database.
    #[error("Cannot open the state database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// Reading or writing it.
    #[error("State database: {0}")]
    Db(String),
}

fn db_error(error: impl std::fmt::Display) -> StateError {
    StateError::Db(error.to_string())
}

enum Op {
    Put(InstanceRecord),
    Delete(String),
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Put(record) => write!(f, "Put({})", record.id),
            Op::Delete(id) => write!(f, "Delete({id})"),
            Op::Flush(_) => write!(f, "Flush"),
        }
    }
}

/// The writer's handle.
#[derive(Debug, Clone)]
pub struct State {
    ops: mpsc::Sender<Op>,
}

/// An opened database whose writer has not started yet.
#[derive(Debug)]
pub struct Opened {
    db: Database,
    /// Records an earlier daemon left: its instances, which may still run.
    pub left: Vec<InstanceRecord>,
}

/// Opens (or creates) the database and reads the records an earlier daemon left.
///
/// redb holds an exclusive lock on the file while it is open. After an upgrade in place
/// (an exec) the lock may outlive the old program for a moment: a child it forked just
/// before holds the descriptor until that child's own exec closes it. So a database found
/// locked is asked again for up to 5 s (`LOCKED_FOR`) before the start fails.
pub fn open(path: &Path) -> Result<Opened, StateError> {
    let start = std::time::Instant::now();
    let db = loop {
        match Database::create(path) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < LOCKED_FOR => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(StateError::Open {
                    path: path.to_owned(),
                    source: Box::new(source),
                });
            }
        }
    };
    let write = db.begin_write().map_err(db_error)?;
    write.open_table(INSTANCES).map_err(db_error)?;
    write.commit().map_err(db_error)?;
    let mut left = Vec::new();
    {
        let read = db.begin_read().map_err(db_error)?;
        let table = read.open_table(INSTANCES).map_err(db_error)?;
        for entry in table.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            match serde_json::from_slice::<InstanceRecord>(value.value()) {
                Ok(record) => left.push(record),
                Err(error) => warn!(id = key.value(), %error, "unreadable instance record"),
            }
        }
    }
    Ok(Opened { db, left })
}

impl Opened {
    /// Deletes every record left (after the caller cleaned them up) and starts the writer.
    pub fn start(self) -> Result<State, StateError> {
        let write = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = write.open_table(INSTANCES).map_err(db_error)?;
            for record in &self.left {
                table.remove(record.id.as_str()).map_err(db_error)?;
            }
        }
        write.commit().map_err(db_error)?;
        let (ops, queue) = mpsc::channel(QUEUE);
        let db = self.db;
        std::thread::Builder::new()
            .name("revboot-state".into())
            .spawn(move || writer(db, queue))
            .map_err(db_error)?;
        Ok(State { ops })
    }
}

fn writer(db: Database, mut queue: mpsc::Receiver<Op>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let commit = || -> Result<(), StateError> {
            let write = db.begin_write().map_err(db_error)?;
            {
                let mut table = write.open_table(INSTANCES).map_err(db_error)?;
                for op in &batch {
                    match op {
                        Op::Put(record) => {
                            let value = serde_json::to_vec(record).map_err(db_error)?;
                            table
                                .insert(record.id.as_str(), value.as_slice())
                                .map_err(db_error)?;
                        }
                        Op::Delete(id) => {
                            table.remove(id.as_str()).map_err(db_error)?;
                        }
                        Op::Flush(_) => {}
                    }
                }
            }
            write.commit().map_err(db_error)
        };
        if let Err(error) = commit() {
            warn!(%error, ops = batch.len(), "state database write failed");
        }
        for op in batch {
            if let Op::Flush(done) = op {
                let _ = done.send(());
            }
        }
    }
}

impl State {
    /// Records a running instance.
    pub async fn put(&self, record: InstanceRecord) {
        let _ = self.ops.send(Op::Put(record)).await;
    }

    /// Forgets an instance.
    pub async fn delete(&self, id: String) {
        let _ = self.ops.send(Op::Delete(id)).await;
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.ops.send(Op::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            service: "hello".into(),
            revision: "0".repeat(40),
            client: None,
            replica: 0,
            address: "127.77.0.1".parse().expect("ip"),
            started_at_ms: 1,
            scratch: "/tmp/x".into(),
            footprint: Footprint {
                pid: Some(42),
                pid_start: Some(7),
                cgroups: vec![],
            },
        }
    }

    /// A database another holder still has locked opens once it lets go (the lock a
    /// forked child keeps for a moment after an upgrade's exec); one that stays locked
    /// fails after the bound, with the file named.
    #[test]
    fn a_locked_database_is_asked_again_until_it_is_free_and_not_forever() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let holder = Database::create(&path).expect("first holder");
        let (tx, rx) = std::sync::mpsc::channel();
        let opening = {
            let path = path.clone();
            std::thread::spawn(move || {
                tx.send(()).expect("send");
                open(&path).map(|opened| opened.left.len())
            })
        };
        rx.recv().expect("the opener runs");
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(holder);
        assert_eq!(opening.join().expect("opener").expect("opened"), 0);

        let held = Database::create(&path).expect("held");
        let error = open(&path).expect_err("locked all along");
        assert!(error.to_string().contains("state.redb"), "{error}");
        drop(held);
    }

    #[tokio::test]
    async fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        {
            let opened = open(&path).expect("open");
            assert!(opened.left.is_empty());
            let state = opened.start().expect("start");
            state.put(record("a")).await;
            state.put(record("b")).await;
            state.delete("a".into()).await;
            state.flush().await;
        }
        // The writer thread holds the database until it notices its queue closed.
        let mut reopened = None;
        for _ in 0..500 {
            if let Ok(opened) = open(&path) {
                reopened = Some(opened);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let reopened = reopened.expect("reopens within 5 s");
        assert_eq!(reopened.left, vec![record("b")]);
        let state = reopened.start().expect("start");
        state.flush().await;
    }
}
