//! The build queue: one owner task that decides what builds when.
//!
//! 1. A push (hook call) asks for builds of its new commits `(service, ref, commits)`, oldest
//!    first, the tip last; the start-up scan asks for a branch head. Only the tip of the
//!    newest push of a branch may move live: a newer push of the branch takes that from
//!    the builds still queued. A queued build of the branch whose commit is not in the new
//!    tip's history (the branch was rewritten) is superseded by the new tip's build (its
//!    followers are told which build replaced it); one in that history stays queued, so a
//!    superseded tip never leaves a hole in the middle of the branch's history. An
//!    intermediate commit already queued or running for the service is not queued twice.
//!    The queue holds at most `max_queued` builds; a push that does not fit queues its
//!    newest commits in the room left (saying how many it left out) and is refused with a
//!    clear error when there is none.
//! 2. A queued build starts when its service has no running build and fewer than
//!    `max_parallel` builds run in all. Builds of one service run one at a time, in push
//!    order; different services build in parallel.
//! 3. Every state change is written to `<data>/builder/state.json` (write, then rename), so
//!    a daemon start finds queued builds, re-queues builds that were running when the daemon
//!    stopped (recording the old one as interrupted), and builds branch heads that were pushed
//!    while it was not running. A daemon killed after a build's deployment commit was written
//!    but before the queue saved that it finished leaves that build `running`: its re-run
//!    (`rerun_of`) adopts the deployment instead of writing a second one (see the runner).
//! 4. Shutdown stops running builds (their process groups are killed; each is recorded in
//!    the deployment repository as interrupted, with its log so far) and keeps the queue.
//! 5. A build that failed because its deployment did not fit on the disk keeps how much
//!    space it needs (`retry_when_free_bytes`). While any such build waits, the queue checks
//!    the free space of the deployment repository's file system every `space_check` (the
//!    first time right at start) and queues each one again (`requeued_as`, `rerun_of`) once
//!    its space is free, unless its branch was pushed again meanwhile (the newer push is the
//!    one that matters then; the wait ends). After [`MAX_SPACE_RETRIES`] such retries in a row
//!    that failed the same way, the build is not retried by itself any more.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::closed::Closed;
use crate::log::Tracker;
use crate::runner::{self, Job, RunContext};
use crate::state::{BuildState, MAX_SPACE_RETRIES, Outcome, Phase};

mod lifecycle;

pub(crate) use lifecycle::Refusal;

/// How many finished build records are kept (older ones are dropped from the state file;
/// their deployment commits stay in the store).
const MAX_FINISHED_RECORDS: usize = 1000;

/// How long shutdown waits for running builds to record themselves as interrupted.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// What is known about one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BuildRecord {
    /// The build's number, unique per data directory.
    pub id: u64,
    /// The service.
    pub service: String,
    /// The pushed ref, e.g. `refs/heads/main`.
    pub source_ref: String,
    /// The pushed commit (40 hex).
    pub source_commit: String,
    /// `Some(false)` when the push asked not to deploy (`-o revboot.deploy=false`).
    pub deploy_option: Option<bool>,
    /// Whether the build is the tip of the newest push of its branch: only a tip moves live.
    #[serde(default = "yes")]
    pub tip: bool,
    /// Where the build stands.
    pub state: BuildState,
    /// When it was queued (unix ms).
    pub queued_at_ms: u64,
    /// When it started (unix ms).
    pub started_at_ms: Option<u64>,
    /// When it ended (unix ms).
    pub finished_at_ms: Option<u64>,
    /// How long the build command itself ran, in seconds.
    pub command_secs: Option<f64>,
    /// The deployment commit recording it (succeeded, failed or interrupted).
    pub revision: Option<String>,
    /// Whether the live pointer was moved to it.
    pub made_live: bool,
    /// The build that superseded this one.
    pub superseded_by: Option<u64>,
    /// The build that re-ran this one (interrupted, or failed for lack of disk space).
    pub requeued_as: Option<u64>,
    /// The interrupted build, or the one that failed for lack of disk space, that this one
    /// runs again.
    #[serde(default)]
    pub rerun_of: Option<u64>,
    /// Set on a build whose deployment did not fit on the disk, while it waits to run again:
    /// the bytes that must be free on the deployment repository's file system first.
    #[serde(default)]
    pub retry_when_free_bytes: Option<u64>,
    /// A one-line summary of the result.
    pub message: Option<String>,
}

fn yes() -> bool {
    true
}

/// Why a build could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The queue holds its maximum number of builds.
    #[error("The build queue is full ({limit} builds waiting)")]
    Full {
        /// The configured limit.
        limit: usize,
    },
    /// The builder is shutting down.
    #[error("The builder is shutting down")]
    ShuttingDown,
    /// The service is being renamed or deleted.
    #[error("Service `{service}` is being renamed or deleted; push again once that is done")]
    Closed {
        /// The service.
        service: String,
    },
}

/// A queued build, as handed to whoever asked for it.
#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    pub(crate) tracker: Arc<Tracker>,
    /// Builds ahead of this one in the queue (any service).
    pub(crate) ahead: usize,
}

/// A build request: the new commits of one push of a branch.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) service: String,
    pub(crate) refname: String,
    /// Oldest first; the last one is the tip.
    pub(crate) commits: Vec<String>,
    pub(crate) deploy_option: Option<bool>,
    /// Whether the last commit may move live (a re-run keeps what its build had).
    pub(crate) tip: bool,
    /// Queued commits of the branch that are not in the tip's history: they are superseded.
    pub(crate) outdated: Vec<String>,
    /// The build this request runs again.
    pub(crate) rerun_of: Option<u64>,
}

impl Request {
    /// A request for one commit, the tip of its branch.
    pub(crate) fn one(service: &str, refname: &str, commit: &str) -> Request {
        Request {
            service: service.to_owned(),
            refname: refname.to_owned(),
            commits: vec![commit.to_owned()],
            deploy_option: None,
            tip: true,
            outdated: Vec::new(),
            rerun_of: None,
        }
    }
}

/// What a request queued.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    /// One ticket per queued commit, oldest first; the tip's is last.
    pub(crate) tickets: Vec<Ticket>,
    /// Commits left out, the oldest, for want of room in the queue.
    pub(crate) left_out: usize,
    /// Intermediate commits not queued because they are queued or running already.
    pub(crate) already: usize,
}

enum Command {
    Enqueue {
        request: Request,
        reply: oneshot::Sender<Result<Queued, EnqueueError>>,
    },
    QueuedCommits {
        service: String,
        refname: String,
        reply: oneshot::Sender<Vec<String>>,
    },
    Finished {
        id: u64,
        outcome: Outcome,
    },
    Records {
        service: Option<String>,
        reply: oneshot::Sender<Vec<BuildRecord>>,
    },
    Tracker {
        id: u64,
        reply: oneshot::Sender<Option<Arc<Tracker>>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    Lifecycle(lifecycle::Change),
}

/// The persisted part of the queue.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    next_id: u64,
    /// `"<service> <ref>"` → the last commit queued for it.
    heads: BTreeMap<String, String>,
    records: Vec<BuildRecord>,
}

/// The handle through which everything talks to the queue's owner task.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    tx: mpsc::Sender<Command>,
}

/// Limits of the queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_parallel: usize,
    pub(crate) max_queued: usize,
    pub(crate) log_limit: usize,
    /// How often free space is checked while a build waits for it.
    pub(crate) space_check: Duration,
}

/// Why the queue could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueStateError {
    /// The state file could not be read.
    #[error("Cannot read the build queue state {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid.
    #[error("The build queue state {path} is damaged")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn head_key(service: &str, refname: &str) -> String {
    format!("{service} {refname}")
}

impl Queue {
    /// Loads the state, re-queues interrupted builds, queues `missed` branch heads that
    /// differ from the last queued commit, and starts the owner task.
    pub(crate) fn start(
        state_path: PathBuf,
        ctx: Arc<RunContext>,
        limits: Limits,
        branch_heads: Vec<(String, String, String)>,
        closed: Closed,
    ) -> Result<Queue, QueueStateError> {
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| QueueStateError::Parse {
                    path: state_path.clone(),
                    source,
                })?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => {
                return Err(QueueStateError::Read {
                    path: state_path,
                    source,
                });
            }
        };
        let (tx, rx) = mpsc::channel(256);
        let mut owner = Owner {
            ctx,
            limits,
            state_path,
            state,
            queued: VecDeque::new(),
            running: HashMap::new(),
            trackers: HashMap::new(),
            tx: tx.clone(),
            shutdown: None,
            closed,
        };
        owner.recover(branch_heads);
        tokio::spawn(owner.run(rx));
        Ok(Queue { tx })
    }

    pub(crate) async fn enqueue(&self, request: Request) -> Result<Queued, EnqueueError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Enqueue { request, reply })
            .await
            .map_err(|_| EnqueueError::ShuttingDown)?;
        answer.await.map_err(|_| EnqueueError::ShuttingDown)?
    }

    /// The commits of the builds of a branch that wait in the queue.
    pub(crate) async fn queued_commits(&self, service: &str, refname: &str) -> Vec<String> {
        let (reply, answer) = oneshot::channel();
        let command = Command::QueuedCommits {
            service: service.to_owned(),
            refname: refname.to_owned(),
            reply,
        };
        if self.tx.send(command).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Build records, newest first.
    pub(crate) async fn records(&self, service: Option<&str>) -> Vec<BuildRecord> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Records {
            service: service.map(str::to_owned),
            reply,
        };
        if self.tx.send(command).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// The tracker of a queued or running build.
    pub(crate) async fn tracker(&self, id: u64) -> Option<Arc<Tracker>> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Tracker { id, reply }).await.ok()?;
        answer.await.ok().flatten()
    }

    pub(crate) async fn shutdown(&self) {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = tokio::time::timeout(SHUTDOWN_WAIT + Duration::from_secs(5), answer).await;
        }
    }
}

struct RunningBuild {
    id: u64,
    stop: watch::Sender<bool>,
}

struct Owner {
    ctx: Arc<RunContext>,
    limits: Limits,
    state_path: PathBuf,
    state: State,
    queued: VecDeque<u64>,
    /// Service → its running build.
    running: HashMap<String, RunningBuild>,
    /// Trackers of queued and running builds.
    trackers: HashMap<u64, Arc<Tracker>>,
    tx: mpsc::Sender<Command>,
    shutdown: Option<(oneshot::Sender<()>, tokio::time::Instant)>,
    /// Services being renamed or deleted: nothing of them is queued.
    closed: Closed,
}

impl Owner {
    fn record_mut(&mut self, id: u64) -> Option<&mut BuildRecord> {
        self.state.records.iter_mut().find(|r| r.id == id)
    }

    fn recover(&mut self, branch_heads: Vec<(String, String, String)>) {
        let mut requeue = Vec::new();
        for record in &mut self.state.records {
            match record.state {
                BuildState::Queued => {
                    self.queued.push_back(record.id);
                }
                BuildState::Running => {
                    record.state = BuildState::Interrupted;
                    record.finished_at_ms = Some(now_ms());
                    record.message = Some("interrupted: the daemon stopped".into());
                    requeue.push(record.id);
                }
                BuildState::Interrupted if record.requeued_as.is_none() => {
                    requeue.push(record.id);
                }
                _ => {}
            }
        }
        for id in self.queued.clone() {
            self.trackers.insert(
                id,
                Arc::new(Tracker::new(id, self.limits.log_limit, Phase::Queued)),
            );
        }
        for old in requeue {
            self.rerun(old, "interrupted by a daemon stop");
        }
        for (service, refname, commit) in branch_heads {
            if self.state.heads.get(&head_key(&service, &refname)) == Some(&commit) {
                continue;
            }
            match self.enqueue(Request::one(&service, &refname, &commit)) {
                Ok(queued) => tracing::info!(
                    service,
                    refname,
                    commit,
                    id = ?queued.tickets.last().map(|t| t.tracker.id),
                    "queued a push that arrived while the daemon was not running"
                ),
                Err(error) => tracing::error!(%error, service, refname, "cannot queue missed push"),
            }
        }
        self.persist();
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.fill();
        let mut space_check = tokio::time::Instant::now();
        loop {
            let command = match &self.shutdown {
                Some((_, deadline)) => match tokio::time::timeout_at(*deadline, rx.recv()).await {
                    Ok(command) => command,
                    Err(_) => {
                        tracing::warn!(running = self.running.len(), "builds did not stop in time");
                        break;
                    }
                },
                None => tokio::select! {
                    command = rx.recv() => command,
                    () = tokio::time::sleep_until(space_check), if self.waiting_for_space() => {
                        space_check = tokio::time::Instant::now() + self.limits.space_check;
                        self.retry_where_space().await;
                        continue;
                    }
                },
            };
            let Some(command) = command else { break };
            match command {
                Command::Enqueue { request, reply } => {
                    let result = self.enqueue(request);
                    self.persist();
                    self.fill();
                    let _ = reply.send(result);
                }
                Command::Finished { id, outcome } => {
                    self.finished(id, outcome);
                    self.persist();
                    self.fill();
                }
                Command::Records { service, reply } => {
                    let mut records: Vec<BuildRecord> = self
                        .state
                        .records
                        .iter()
                        .filter(|r| service.as_deref().is_none_or(|s| r.service == s))
                        .cloned()
                        .collect();
                    records.reverse();
                    let _ = reply.send(records);
                }
                Command::QueuedCommits {
                    service,
                    refname,
                    reply,
                } => {
                    let commits = self
                        .queued
                        .iter()
                        .filter_map(|id| self.state.records.iter().find(|r| r.id == *id))
                        .filter(|r| r.service == service && r.source_ref == refname)
                        .map(|r| r.source_commit.clone())
                        .collect();
                    let _ = reply.send(commits);
                }
                Command::Tracker { id, reply } => {
                    let _ = reply.send(self.trackers.get(&id).cloned());
                }
                Command::Lifecycle(change) => self.lifecycle(change),
                Command::Shutdown { reply } => {
                    for running in self.running.values() {
                        let _ = running.stop.send(true);
                    }
                    self.shutdown = Some((reply, tokio::time::Instant::now() + SHUTDOWN_WAIT));
                }
            }
            if self.shutdown.is_some() && self.running.is_empty() {
                break;
            }
        }
        self.persist();
        if let Some((reply, _)) = self.shutdown.take() {
            let _ = reply.send(());
        }
    }

    fn enqueue(&mut self, request: Request) -> Result<Queued, EnqueueError> {
        if self.shutdown.is_some() {
            return Err(EnqueueError::ShuttingDown);
        }
        if self.closed.contains(&request.service) {
            return Err(EnqueueError::Closed {
                service: request.service,
            });
        }
        let Some((tip, before)) = request.commits.split_last() else {
            return Ok(Queued {
                tickets: Vec::new(),
                left_out: 0,
                already: 0,
            });
        };
        let same_branch =
            |r: &BuildRecord| r.service == request.service && r.source_ref == request.refname;
        // Rule 1: what waits of this branch is superseded, or stays and is no tip any more.
        let mut outdated = Vec::new();
        for id in &self.queued {
            let Some(record) = self.state.records.iter().find(|r| r.id == *id) else {
                continue;
            };
            if same_branch(record) && request.outdated.contains(&record.source_commit) {
                outdated.push(*id);
            }
        }
        let busy = |commit: &str| {
            self.queued
                .iter()
                .chain(self.running.values().map(|r| &r.id))
                .filter_map(|id| self.state.records.iter().find(|r| r.id == *id))
                .any(|r| r.service == request.service && r.source_commit == commit)
        };
        let mut wanted: Vec<&String> = before.iter().filter(|c| !busy(c)).collect();
        let already = before.len() - wanted.len();
        wanted.push(tip);
        let room = (self.limits.max_queued + outdated.len()).saturating_sub(self.queued.len());
        if room == 0 {
            return Err(EnqueueError::Full {
                limit: self.limits.max_queued,
            });
        }
        let left_out = wanted.len().saturating_sub(room);
        let wanted = wanted.split_off(left_out);
        let first_id = self.state.next_id.max(1);
        let tip_id = first_id + wanted.len() as u64 - 1;
        self.state.next_id = tip_id + 1;
        for old in outdated {
            self.queued.retain(|id| *id != old);
            if let Some(record) = self.record_mut(old) {
                record.state = BuildState::Superseded;
                record.superseded_by = Some(tip_id);
                record.finished_at_ms = Some(now_ms());
                record.message = Some(format!("superseded by build #{tip_id}"));
            }
            if let Some(tracker) = self.trackers.remove(&old) {
                tracker.set_phase(Phase::Superseded {
                    by: tip_id,
                    commit: tip.clone(),
                });
            }
            tracing::info!(
                old,
                new = tip_id,
                service = request.service,
                "superseded a queued build"
            );
        }
        if request.tip {
            for id in self.queued.clone() {
                if let Some(record) = self.record_mut(id)
                    && record.service == request.service
                    && record.source_ref == request.refname
                {
                    record.tip = false;
                }
            }
        }
        if request.tip {
            self.state
                .heads
                .insert(head_key(&request.service, &request.refname), tip.clone());
        }
        let mut tickets = Vec::with_capacity(wanted.len());
        for (id, commit) in (first_id..).zip(wanted) {
            self.state.records.push(BuildRecord {
                id,
                service: request.service.clone(),
                source_ref: request.refname.clone(),
                source_commit: commit.clone(),
                deploy_option: request.deploy_option,
                tip: request.tip && id == tip_id,
                state: BuildState::Queued,
                queued_at_ms: now_ms(),
                started_at_ms: None,
                finished_at_ms: None,
                command_secs: None,
                revision: None,
                made_live: false,
                superseded_by: None,
                requeued_as: None,
                rerun_of: request.rerun_of,
                retry_when_free_bytes: None,
                message: None,
            });
            let tracker = Arc::new(Tracker::new(id, self.limits.log_limit, Phase::Queued));
            self.trackers.insert(id, tracker.clone());
            let ahead = self.queued.len() + self.running.len();
            self.queued.push_back(id);
            tickets.push(Ticket { tracker, ahead });
        }
        self.trim();
        Ok(Queued {
            tickets,
            left_out,
            already,
        })
    }

    fn fill(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        let mut index = 0;
        while self.running.len() < self.limits.max_parallel && index < self.queued.len() {
            let id = self.queued[index];
            let Some(record) = self.state.records.iter().find(|r| r.id == id) else {
                self.queued.remove(index);
                continue;
            };
            if self.running.contains_key(&record.service) {
                index += 1;
                continue;
            }
            self.queued.remove(index);
            self.start(id);
        }
    }

    fn start(&mut self, id: u64) {
        let Some(tracker) = self.trackers.get(&id).cloned() else {
            return;
        };
        // A re-run may adopt what the build it re-runs wrote from the moment that one started.
        let adopt_since_ms = self
            .state
            .records
            .iter()
            .find(|r| r.id == id)
            .and_then(|r| r.rerun_of)
            .and_then(|old| self.state.records.iter().find(|r| r.id == old))
            .and_then(|old| old.started_at_ms);
        let retry_when_full = self.space_retries(id) < MAX_SPACE_RETRIES;
        let Some(record) = self.record_mut(id) else {
            return;
        };
        record.state = BuildState::Running;
        record.started_at_ms = Some(now_ms());
        let job = Job {
            id,
            service: record.service.clone(),
            refname: record.source_ref.clone(),
            commit: record.source_commit.clone(),
            deploy_option: record.deploy_option,
            tip: record.tip,
            adopt_since_ms,
            retry_when_full,
            lock: None,
        };
        let service = job.service.clone();
        tracker.set_phase(Phase::Running);
        let (stop, stopped) = watch::channel(false);
        self.running
            .insert(service.clone(), RunningBuild { id, stop });
        self.persist();
        tracing::info!(id, service, commit = job.commit, "build started");
        let ctx = self.ctx.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let task = tokio::spawn(runner::run(ctx, job, tracker.clone(), stopped));
            let outcome = match task.await {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::error!(%error, id, "build task failed");
                    Outcome::internal(format!("the build task failed: {error}"))
                }
            };
            let _ = tx.send(Command::Finished { id, outcome }).await;
        });
    }

    fn finished(&mut self, id: u64, outcome: Outcome) {
        let Some(record) = self.record_mut(id) else {
            return;
        };
        record.state = outcome.state;
        record.finished_at_ms = Some(now_ms());
        record.command_secs = outcome.command_secs;
        record.revision = outcome.revision.map(|r| r.to_hex());
        record.made_live = outcome.made_live;
        record.retry_when_free_bytes = outcome.retry_when_free_bytes;
        record.message = Some(outcome.summary.clone());
        let service = record.service.clone();
        tracing::info!(id, service, state = ?outcome.state, summary = outcome.summary, "build finished");
        if self.running.get(&service).is_some_and(|r| r.id == id) {
            self.running.remove(&service);
        }
        if let Some(tracker) = self.trackers.remove(&id) {
            tracker.set_phase(Phase::Done(Arc::new(outcome)));
        }
        self.trim();
    }

    /// How many builds before `id`, in a row, failed for lack of disk space and were run again
    /// by it (only such failed builds are re-queued).
    fn space_retries(&self, id: u64) -> usize {
        let record = |id: u64| self.state.records.iter().find(|r| r.id == id);
        let mut count = 0;
        let mut current = record(id).and_then(|r| r.rerun_of);
        while let Some(old) = current.and_then(record) {
            if old.state != BuildState::Failed || count >= MAX_SPACE_RETRIES {
                break;
            }
            count += 1;
            current = old.rerun_of;
        }
        count
    }

    /// Queues `old` (`why` it runs again) as a new build that re-runs it; true if queued.
    fn rerun(&mut self, old: u64, why: &str) -> bool {
        let Some(record) = self.state.records.iter().find(|r| r.id == old).cloned() else {
            return false;
        };
        let request = Request {
            deploy_option: record.deploy_option,
            tip: record.tip,
            rerun_of: Some(old),
            ..Request::one(&record.service, &record.source_ref, &record.source_commit)
        };
        match self.enqueue(request) {
            Ok(Queued { tickets, .. }) if !tickets.is_empty() => {
                let new = tickets[tickets.len() - 1].tracker.id;
                tracing::info!(old, new, why, "re-queued a build");
                if let Some(record) = self.record_mut(old) {
                    record.requeued_as = Some(new);
                }
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::error!(%error, old, why, "cannot re-queue a build");
                false
            }
        }
    }

    /// Whether a build waits for disk space to run again.
    fn waiting_for_space(&self) -> bool {
        self.state
            .records
            .iter()
            .any(|r| r.retry_when_free_bytes.is_some())
    }

    /// Queues again the builds that failed for lack of disk space and now fit (rule 5).
    async fn retry_where_space(&mut self) {
        let path = self.ctx.store.path().to_owned();
        let free = tokio::task::spawn_blocking(move || crate::sandbox::free_bytes(&path)).await;
        let free = match free {
            Ok(Ok(free)) => free,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the free space of the deployment repository");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "the free space check failed");
                return;
            }
        };
        let waiting: Vec<(u64, u64)> = self
            .state
            .records
            .iter()
            .filter_map(|r| r.retry_when_free_bytes.map(|needed| (r.id, needed)))
            .collect();
        let mut changed = false;
        for (old, needed) in waiting {
            let Some(record) = self.state.records.iter().find(|r| r.id == old).cloned() else {
                continue;
            };
            let key = head_key(&record.service, &record.source_ref);
            if self.state.heads.get(&key) != Some(&record.source_commit) {
                tracing::info!(
                    old,
                    service = record.service,
                    "not retried: its branch was pushed again"
                );
                if let Some(record) = self.record_mut(old) {
                    record.retry_when_free_bytes = None;
                }
                changed = true;
                continue;
            }
            if free < needed {
                continue;
            }
            tracing::info!(
                old,
                free,
                needed,
                "space is free for a build that lacked it"
            );
            if self.rerun(old, "failed for lack of disk space") {
                if let Some(record) = self.record_mut(old) {
                    record.retry_when_free_bytes = None;
                }
                changed = true;
            }
        }
        if changed {
            self.persist();
            self.fill();
        }
    }

    /// Drops the oldest finished records beyond the limit.
    fn trim(&mut self) {
        let finished = self
            .state
            .records
            .iter()
            .filter(|r| r.state.is_finished())
            .count();
        let mut excess = finished.saturating_sub(MAX_FINISHED_RECORDS);
        self.state.records.retain(|r| {
            if excess > 0 && r.state.is_finished() {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }

    fn persist(&self) {
        let write = || -> std::io::Result<()> {
            let bytes = serde_json::to_vec_pretty(&self.state)?;
            let staging = self.state_path.with_extension("json.new");
            std::fs::write(&staging, bytes)?;
            std::fs::rename(&staging, &self.state_path)
        };
        if let Err(error) = write() {
            tracing::error!(%error, path = %self.state_path.display(), "cannot save build queue state");
        }
    }
}
