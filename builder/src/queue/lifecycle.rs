//! What the queue does when a service is renamed or deleted (see [`crate::lifecycle`]).
//!
//! 1. Closing a service is refused while a build of it waits or runs (the caller is told
//!    which); otherwise the service is closed in the same step, so no push can queue a
//!    build of it after the check. A closed service queues nothing
//!    ([`EnqueueError::Closed`](super::EnqueueError::Closed)).
//! 2. A rename carries the queue's state over to the new name: the branch heads it last
//!    queued and the build records (so a build waiting for disk space retries under the
//!    new name).
//! 3. A delete forgets them: a service created later under the same name starts afresh.

use tokio::sync::oneshot;

use super::{Command, Owner, Queue};

/// Why services could not be closed.
pub(crate) enum Refusal {
    /// These builds of them wait or run.
    Busy(Vec<u64>),
    /// This one is closed already (another rename or delete is under way).
    Closed(String),
}

/// A change of the queue's state for a service's rename or delete.
pub(crate) enum Change {
    Close {
        services: Vec<String>,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    Rename {
        from: String,
        to: String,
        reply: oneshot::Sender<()>,
    },
    Forget {
        service: String,
        reply: oneshot::Sender<()>,
    },
}

impl Queue {
    /// Closes `services` unless one is closed already or a build of one waits or runs.
    /// `None`: the queue has stopped.
    pub(crate) async fn close(&self, services: Vec<String>) -> Option<Result<(), Refusal>> {
        let (reply, answer) = oneshot::channel();
        let change = Change::Close { services, reply };
        self.tx.send(Command::Lifecycle(change)).await.ok()?;
        answer.await.ok()
    }

    /// Carries the state of `from` over to `to`.
    pub(crate) async fn rename(&self, from: &str, to: &str) {
        let (reply, answer) = oneshot::channel();
        let change = Change::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
            reply,
        };
        if self.tx.send(Command::Lifecycle(change)).await.is_ok() {
            let _ = answer.await;
        }
    }

    /// Forgets the state of `service`.
    pub(crate) async fn forget(&self, service: &str) {
        let (reply, answer) = oneshot::channel();
        let change = Change::Forget {
            service: service.to_owned(),
            reply,
        };
        if self.tx.send(Command::Lifecycle(change)).await.is_ok() {
            let _ = answer.await;
        }
    }
}

impl Owner {
    pub(super) fn lifecycle(&mut self, change: Change) {
        match change {
            Change::Close { services, reply } => {
                if let Some(closed) = services.iter().find(|s| self.closed.contains(s)) {
                    let _ = reply.send(Err(Refusal::Closed(closed.clone())));
                    return;
                }
                let busy: Vec<u64> = self
                    .queued
                    .iter()
                    .chain(self.running.values().map(|r| &r.id))
                    .filter_map(|id| self.state.records.iter().find(|r| r.id == *id))
                    .filter(|r| services.contains(&r.service))
                    .map(|r| r.id)
                    .collect();
                if busy.is_empty() {
                    for service in &services {
                        self.closed.insert(service);
                    }
                    let _ = reply.send(Ok(()));
                } else {
                    let _ = reply.send(Err(Refusal::Busy(busy)));
                }
            }
            Change::Rename { from, to, reply } => {
                let prefix = super::head_key(&from, "");
                let heads = std::mem::take(&mut self.state.heads);
                self.state.heads = heads
                    .into_iter()
                    .map(|(key, commit)| match key.strip_prefix(&prefix) {
                        Some(refname) => (super::head_key(&to, refname), commit),
                        None => (key, commit),
                    })
                    .collect();
                for record in &mut self.state.records {
                    if record.service == from {
                        record.service.clone_from(&to);
                    }
                }
                self.persist();
                let _ = reply.send(());
            }
            Change::Forget { service, reply } => {
                let prefix = super::head_key(&service, "");
                self.state.heads.retain(|key, _| !key.starts_with(&prefix));
                self.state.records.retain(|r| r.service != service);
                self.persist();
                let _ = reply.send(());
            }
        }
    }
}
