//! The revboot builder: from `git push` to a deployment commit.
//!
//! It owns one bare source repository per service (`<data>/src/<service>.git`), serves them
//! over git smart HTTP ([`Builder::router`]), queues a build for every pushed branch, runs the
//! service's recipe (`revboot.toml`) in a fresh checkout with a time limit, and records every
//! build — succeeded, failed or interrupted — as a commit in the deployment repository
//! ([`revboot_store::Store`]), moving the service's live pointer on success. The pusher
//! watches it happen in `git push`'s output. It also serves the deployment repository as a
//! git remote (`/git/-/deploy.git`: clone, fetch, and a CI's pushes of prebuilt deployments,
//! checked before git takes them; see the `deploy` module) and builds a source commit on
//! demand ([`Builder::build_on_demand`]).
//!
//! # The push protocol
//!
//! 1. `git push https://user:TOKEN@host/git/<service>.git main`: the router asks for basic
//!    auth (`401` + `WWW-Authenticate`), checks the token, creates the source repository on
//!    the first push, and runs `git http-backend`, streaming the pack in and the answer out.
//!    A local-path remote (`git push /data/src/<service>.git`) skips this step.
//! 2. `git receive-pack` stores the objects, then hands the branch and tag updates to the
//!    repository's `proc-receive` hook (other refs it stores itself); what the hook prints
//!    git relays to the pusher as `remote:` lines.
//! 3. The hook posts the updates (and push options) with curl to
//!    `POST /git/-/hook/<service>` with the daemon's hook token, and prints the answer as
//!    it streams. If the daemon is not running it says so and moves the branch: the push is
//!    stored and the daemon builds its head on its next start (it compares branch heads
//!    with what it queued and built). On a node of a cluster it refuses the push instead
//!    (`revboot on this node is not running: the push was not taken`): only etcd may move
//!    a branch there. A tag is not built; once its commit has a deployment that succeeded,
//!    it names it (`<tag>.<service>.<zone>`, see the `tags` module).
//! 4. The builder queues one build per new commit of each updated branch, oldest first, the
//!    tip last — at most [`BuilderConfig::max_commits_per_push`], the newest; older commits
//!    that have a deployment of the service already are not built again — and streams
//!    `build #N started`, the tip's timestamped log, and each result back on that
//!    connection. A newer push of a branch keeps the builds of its history that still wait
//!    and supersedes those it rewrote.
//! 5. Each build is recorded as a deployment commit (image, manifest, `build.log`, source
//!    link). On success, the answer names the deployment and its DNS name
//!    `<deployment prefix>.<service>.<zone>`, and live moves to it if it is the tip of the
//!    newest push of the deploy branch (the source repository's `HEAD`, `main`),
//!    `run.deploy` is not false and the push did not say `-o revboot.deploy=false`. On
//!    failure live is untouched. A recipe with `[deploy] check` or `[run] min_instances`
//!    goes through the [`gate`] first ([`BuilderConfig::gate`], the daemon's): the new
//!    revision is booted and checked, and a failed check leaves live where it was and
//!    fails the push as a failed build does (step 6), with the reason.
//! 6. The hook then moves each branch whose tip built and refuses the others with the
//!    failure (`! [remote rejected] main -> main (failed: …)`, `git push` exits non-zero):
//!    a branch whose tip failed to build stays where it was in the source repository, while
//!    the failed build stays in the deployment history. A build that failed for lack of
//!    disk space (it runs again by itself) keeps the push. With `-o revboot.wait=false` the
//!    branches move as soon as the builds are queued, and the push does not wait for them.

//! # A full disk
//!
//! A deployment that does not fit on the disk leaves nothing in the deployment repository
//! (the store writes a deployment's objects apart and links them in only as its branch
//! moves), and the build fails with `no space left on device while writing the deployment`.
//! It is recorded as a failed build (its log, no image) if that still fits, otherwise only in
//! the builder's build records ([`Builder::build_records`]); the push output says which. It
//! then builds again by itself once the deployment repository's file system has about three
//! times its images free, checked every [`BuilderConfig::space_check_secs`] (30 s by
//! default), at most three times in a row; a newer push of the branch ends the wait. To
//! build the same commit by hand, push a new commit (`git commit --allow-empty`).
//!
//! # Renaming and deleting a service
//!
//! [`Builder::close`] closes services to pushes and builds (refused while a build of one
//! waits or runs); while the returned guard lives, [`Builder::rename_source`] and
//! [`Builder::delete_source`] move, archive or remove the source repository, its build
//! cache and the queue's state of it. The root crate orders these steps with the store's
//! and the deployer's (see the `lifecycle` module).
//!
//! # Limits
//!
//! Pushed code runs sandboxed: a build sees only the system's directories, the toolchain
//! (read-only), its checkout and its service's cache, as an unprivileged uid with no
//! capability, no network unless its recipe asks, and limits on time, memory, pids and disk
//! (the `sandbox` module). Needs root to set that up. A recipe's program must be found in
//! those directories. The queue, the log size, the hook body and the number of refs per
//! push are bounded.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use revboot_builder::{Builder, BuilderConfig};
//!
//! let store = revboot_store::Store::init("/var/lib/revboot/deploy.git")?;
//! let mut config = BuilderConfig::new(
//!     "/var/lib/revboot",
//!     store,
//!     "revboot.test",
//!     "http://127.0.0.1:7070",
//! );
//! config.push_tokens = vec!["s3cret".into()];
//! let builder = Builder::start(config).await?;
//! builder.add_service("hello").await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! axum::serve(listener, builder.router()).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod auth;
mod closed;
mod config;
pub mod coordinate;
mod deploy;
pub mod gate;
mod git;
mod http;
mod lifecycle;
mod log;
mod metrics;
pub mod name;
mod push;
mod queue;
mod renamed;
mod repos;
mod runner;
mod sandbox;
mod shared;
mod state;
mod tags;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use revboot_store::{Revision, Store};

use crate::shared::Shared;

pub use config::BuilderConfig;
pub use git::GitError;
pub use lifecycle::{ClosedServices, LifecycleError};
pub use log::{DEFAULT_LOG_LIMIT, LogFollow, LogStep};
pub use metrics::BuildMetrics;
pub use name::{MAX_SERVICE_NAME, ServiceNameError, validate_service_name};
pub use queue::{BuildRecord, EnqueueError, QueueStateError};
pub use repos::AddServiceError;
pub use sandbox::SandboxConfig;
pub use state::BuildState;

/// The most `git http-backend` processes (concurrent clones and pushes) at once; more
/// requests get `503`.
pub const MAX_GIT_PROCESSES: usize = 32;

/// Why the builder could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A configuration value is out of range.
    #[error("Invalid builder configuration: `{key}` {message}")]
    Config {
        /// The field.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A directory or file of the data directory could not be made or read.
    #[error("Cannot prepare {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another builder uses the data directory.
    #[error("Another builder is running on {path}")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The queue state could not be loaded.
    #[error(transparent)]
    Queue(#[from] QueueStateError),
}

/// Why a build log could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildLogError {
    /// The store has no such build of the service, or could not read it.
    #[error("Cannot read the build log of {revision} of `{service}`")]
    Read {
        /// The service asked for.
        service: String,
        /// The revision asked for.
        revision: Revision,
        /// Why.
        #[source]
        source: revboot_store::ReadError,
    },
}

/// A service's source repository.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceInfo {
    /// The service name.
    pub name: String,
    /// The bare source repository, usable as a local-path remote.
    pub source_repo: PathBuf,
    /// Whether this call created it.
    pub created: bool,
}

/// The running builder. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Builder {
    inner: Arc<Shared>,
}

impl Builder {
    /// Prepares the data directory, rewrites the hooks of existing source repositories,
    /// loads the queue (re-queuing builds a daemon stop interrupted, and queuing branch heads
    /// pushed while it was not running) and starts building. Needs a Tokio runtime.
    pub async fn start(mut config: BuilderConfig) -> Result<Builder, StartError> {
        let invalid = |key: &'static str, message: &str| StartError::Config {
            key,
            message: message.to_owned(),
        };
        if config.zone.trim_matches('.').is_empty() {
            return Err(invalid("zone", "must not be empty"));
        }
        config.zone = config.zone.trim_matches('.').to_ascii_lowercase();
        if !config.base_url.starts_with("http://") && !config.base_url.starts_with("https://") {
            return Err(invalid("base_url", "must start with http:// or https://"));
        }
        if config.base_url.contains(['\'', '\n', ' ']) {
            return Err(invalid("base_url", "must not contain quotes or spaces"));
        }
        if config.max_queued == 0 || config.max_queued > 10_000 {
            return Err(invalid("max_queued", "must be between 1 and 10000"));
        }
        if config.max_parallel > 256 {
            return Err(invalid("max_parallel", "must be at most 256"));
        }
        if let Err((key, message)) = config.sandbox.validate() {
            return Err(StartError::Config {
                key: match key {
                    "uid" => "sandbox.uid",
                    "memory_mib" => "sandbox.memory_mib",
                    "pids" => "sandbox.pids",
                    "scratch_mib" => "sandbox.scratch_mib",
                    "disk_mib" => "sandbox.disk_mib",
                    _ => "sandbox.readonly_paths",
                },
                message,
            });
        }
        if config.max_parallel == 0 {
            config.max_parallel = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
        }
        if config.max_commits_per_push == 0 {
            return Err(invalid("max_commits_per_push", "must be at least 1"));
        }
        // A push never asks for more builds than the queue holds.
        config.max_commits_per_push = config.max_commits_per_push.min(config.max_queued);
        if config.push_wait_secs == 0 || config.push_wait_secs > 24 * 3600 {
            return Err(invalid("push_wait_secs", "must be between 1 and 86400"));
        }
        if config.log_limit < 4096 {
            return Err(invalid("log_limit", "must be at least 4096"));
        }
        if config.space_check_secs == 0 || config.space_check_secs > 3600 {
            return Err(invalid("space_check_secs", "must be between 1 and 3600"));
        }
        if config
            .push_tokens
            .iter()
            .chain(&config.deploy_tokens)
            .any(|t| t.is_empty())
        {
            return Err(invalid("push_tokens", "must not contain an empty token"));
        }
        if config.push_tokens.is_empty() {
            tracing::warn!("no push tokens configured: pushes over HTTP are refused");
        }
        let data = config.data_dir.clone();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StartError::Io { path, source }
        };
        let state_dir = data.join("builder");
        let builds_root = data.join("builds");
        let cache_root = data.join("cache");
        let src = data.join("src");
        for dir in [&state_dir, &builds_root, &cache_root, &src] {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        // Checkouts left by a daemon that did not stop cleanly.
        for entry in std::fs::read_dir(&builds_root).map_err(io(&builds_root))? {
            let path = entry.map_err(io(&builds_root))?.path();
            if let Err(error) = std::fs::remove_dir_all(&path) {
                tracing::warn!(%error, path = %path.display(), "cannot remove an old checkout");
            }
        }
        let lock_path = state_dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // A builder that just stopped in this process may still hold the lock for a moment:
        // a child another thread is starting shares the lock's open file until it execs
        // (the descriptor is close-on-exec). So a held lock is asked for again, briefly.
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StartError::Locked { path: lock_path });
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(StartError::Io {
                        path: lock_path,
                        source,
                    });
                }
            }
        }
        let hook_token = hook_token(&state_dir.join("hook-token"))?;
        let repos = repos::SourceRepos::new(
            src.clone(),
            repos::HookTarget {
                base_url: config.base_url.clone(),
                token: hook_token.clone(),
                // The hook waits a little longer than the daemon follows the build, so the
                // daemon's own "stopped following" line reaches the pusher.
                max_time_secs: config.push_wait_secs + 30,
                socket: config.hook_socket.clone(),
                cluster: config.coordinator.is_some(),
            },
        );
        deploy::prepare(
            &config.store,
            &repos::HookTarget {
                base_url: config.base_url.clone(),
                token: hook_token.clone(),
                max_time_secs: 300,
                socket: config.hook_socket.clone(),
                // The deployment repository's hooks refuse a push they cannot check anyway.
                cluster: false,
            },
        )
        .await
        .map_err(io(config.store.path()))?;
        let mut heads = Vec::new();
        for service in repos.list().map_err(io(&src))? {
            repos
                .refresh_hook(&service)
                .await
                .map_err(io(&repos.path(&service)))?;
            match repos.branch_heads(&service).await {
                Ok(branches) => {
                    // A head with a deployment of its own is built (a push whose tip failed
                    // leaves its branch where it was, at a head built before).
                    let built = built_heads(&config.store, &service);
                    heads.extend(
                        branches
                            .into_iter()
                            .filter(|b| !built.contains(&(b.refname.clone(), b.commit.clone())))
                            .map(|b| (service.clone(), b.refname, b.commit)),
                    )
                }
                // One damaged repository must not keep the others from building.
                Err(error) => tracing::error!(
                    %error,
                    service,
                    "cannot read the branches of a source repository; its missed pushes are not queued"
                ),
            }
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let path_env = std::env::var_os("PATH")
            .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".cargo")))
            .filter(|p| p.is_dir());
        let rustup_home = std::env::var_os("RUSTUP_HOME")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".rustup")))
            .filter(|p| p.is_dir());
        let toolchain = cargo_home.iter().chain(&rustup_home).cloned().collect();
        let mountpoint =
            std::path::absolute(config.data_dir.join("build-root")).map_err(|source| {
                StartError::Io {
                    path: config.data_dir.join("build-root"),
                    source,
                }
            })?;
        let sandbox = sandbox::Sandbox::start(
            &config.name,
            config.sandbox.clone(),
            mountpoint.clone(),
            toolchain,
            path_env,
        )
        .map_err(|source| StartError::Io {
            path: mountpoint,
            source,
        })?;
        let ctx = Arc::new(runner::RunContext {
            repos: repos.clone(),
            store: config.store.clone(),
            cache_root,
            builds_root,
            zone: config.zone.clone(),
            cargo_home,
            rustup_home,
            sandbox,
            limits: config.sandbox.clone(),
            space_check: Duration::from_secs(config.space_check_secs),
            gate: config.gate.clone(),
            coordinator: config.coordinator.clone(),
        });
        let closed = closed::Closed::default();
        let renamed_path = state_dir.join(RENAMED_FILE);
        let renamed = renamed::Renamed::load(&renamed_path).map_err(|source| StartError::Io {
            path: renamed_path,
            source,
        })?;
        let queue = queue::Queue::start(
            state_dir.join("state.json"),
            ctx,
            queue::Limits {
                max_parallel: config.max_parallel,
                max_queued: config.max_queued,
                log_limit: config.log_limit,
                space_check: Duration::from_secs(config.space_check_secs),
            },
            heads,
            closed.clone(),
        )?;
        tracing::info!(
            data = %data.display(),
            max_parallel = config.max_parallel,
            "builder started"
        );
        Ok(Builder {
            inner: Arc::new(Shared {
                config,
                repos,
                queue,
                hook_token,
                git_processes: Arc::new(tokio::sync::Semaphore::new(MAX_GIT_PROCESSES)),
                lock: std::sync::Mutex::new(Some(lock)),
                closed,
                renamed,
            }),
        })
    }

    /// The smart HTTP and hook routes, with full paths under `/git/` (merge it into the
    /// daemon's router): `/git/<service>.git/…`, the deployment repository
    /// `/git/-/deploy.git/…`, and the hooks' `/git/-/hook/<service>` and
    /// `/git/-/deploy-hook/<phase>`.
    pub fn router(&self) -> axum::Router {
        http::router(Arc::clone(&self.inner))
    }

    /// Creates the source repository of a service (if it does not exist yet).
    /// A name a service had before a rename takes pushes again from then on.
    pub async fn add_service(&self, name: &str) -> Result<ServiceInfo, AddServiceError> {
        validate_service_name(name)?;
        self.inner
            .renamed
            .forget_old_name(name)
            .map_err(|source| AddServiceError::Io {
                path: self
                    .inner
                    .config
                    .data_dir
                    .join("builder")
                    .join(RENAMED_FILE),
                source,
            })?;
        let (source_repo, created) = self.inner.repos.create(name).await?;
        Ok(ServiceInfo {
            name: name.to_owned(),
            source_repo,
            created,
        })
    }

    /// Makes a deployment tag for each tag of `service`'s source repository whose commit
    /// has a successful deployment (see the `tags` module): `<tag>.<service>.<zone>`
    /// names it. The hook does this after each push; a node of a cluster calls it when its
    /// source tags or deployments changed.
    pub async fn name_tagged_deployments(&self, service: &str) {
        if validate_service_name(service).is_ok() {
            tags::name_deployments(&self.inner.repos, &self.inner.config.store, service, &[]).await;
        }
    }

    /// The services with a source repository, sorted.
    pub fn services(&self) -> std::io::Result<Vec<String>> {
        self.inner.repos.list()
    }

    /// The bare source repository of a service (it may not exist).
    pub fn source_repo(&self, service: &str) -> Result<PathBuf, ServiceNameError> {
        validate_service_name(service)?;
        Ok(self.inner.repos.path(service))
    }

    /// Build records (queued, running and the last finished ones), newest first; all
    /// services when `service` is `None`.
    pub async fn build_records(&self, service: Option<&str>) -> Vec<BuildRecord> {
        self.inner.queue.records(service).await
    }

    /// The `build.log` of a recorded build (succeeded, failed or interrupted) of `service`.
    pub fn build_log(&self, service: &str, revision: &Revision) -> Result<Vec<u8>, BuildLogError> {
        let store = &self.inner.config.store;
        let read = |source| BuildLogError::Read {
            service: service.to_owned(),
            revision: *revision,
            source,
        };
        // `deployment` refuses a revision that is not a build of this service.
        store.deployment(service, revision).map_err(read)?;
        store.build_log(revision).map_err(read)
    }

    /// The log so far of a queued or running build (`None` once it has finished: read
    /// the recorded one with [`Builder::build_log`]).
    pub async fn running_log(&self, id: u64) -> Option<Vec<u8>> {
        let tracker = self.inner.queue.tracker(id).await?;
        Some(tracker.log_from(0))
    }

    /// Follows the log of a queued or running build as it is written ([`LogFollow`]);
    /// `None` once it has finished (its log is then in the store: [`Builder::build_log`]).
    pub async fn follow_log(&self, id: u64) -> Option<LogFollow> {
        let tracker = self.inner.queue.tracker(id).await?;
        Some(LogFollow::new(tracker))
    }

    /// Stops building: running builds are killed and recorded as interrupted (they run
    /// again on the next start), queued builds are kept for the next start, and the data
    /// directory is unlocked. The builder takes no new builds afterwards.
    pub async fn shutdown(&self) {
        self.inner.queue.shutdown().await;
        // The queue state is saved: another builder may take the data directory now.
        drop(
            self.inner
                .lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take(),
        );
        tracing::info!("builder stopped");
    }
}

impl Builder {
    /// Queues a build of `commit` (40 hex, a commit of the service's source repository) that
    /// no push asked for: a build on demand, of no branch, that never moves live. Returns
    /// the build's number and a receiver that sees whether it succeeded once it has ended.
    pub async fn build_on_demand(
        &self,
        service: &str,
        commit: &str,
    ) -> Result<(u64, tokio::sync::oneshot::Receiver<bool>), EnqueueError> {
        let request = queue::Request {
            tip: false,
            ..queue::Request::one(service, "", commit)
        };
        let queued = self.inner.queue.enqueue(request).await?;
        let ticket = queued
            .tickets
            .last()
            .cloned()
            .ok_or(EnqueueError::ShuttingDown)?;
        let (done, ended) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut progress = ticket.tracker.subscribe();
            let succeeded = loop {
                match &progress.borrow_and_update().phase {
                    state::Phase::Done(outcome) => {
                        break outcome.state == BuildState::Succeeded;
                    }
                    state::Phase::Superseded { .. } => break false,
                    state::Phase::Queued | state::Phase::Running => {}
                }
                if progress.changed().await.is_err() {
                    break false;
                }
            };
            let _ = done.send(succeeded);
        });
        Ok((queued.tickets[queued.tickets.len() - 1].tracker.id, ended))
    }
}

/// The `(ref, source commit)` of every deployment of `service`.
fn built_heads(store: &Store, service: &str) -> std::collections::HashSet<(String, String)> {
    store
        .history(service)
        .map(|history| {
            history
                .into_iter()
                .filter_map(|d| Some((d.source_ref?, d.source_commit)))
                .collect()
        })
        .unwrap_or_default()
}

/// Creates the source repository of a service without a running builder (for a CLI that
/// runs while the daemon is stopped). The hook gets the hook token of `data_dir` (made if
/// absent) and `base_url`; a starting daemon rewrites it with its own settings.
pub async fn create_source_repo(
    data_dir: &Path,
    base_url: &str,
    name: &str,
) -> Result<ServiceInfo, AddServiceError> {
    let state_dir = data_dir.join("builder");
    let io = |source| AddServiceError::Io {
        path: state_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&state_dir).map_err(io)?;
    validate_service_name(name)?;
    renamed::Renamed::load(&state_dir.join(RENAMED_FILE))
        .and_then(|renamed| renamed.forget_old_name(name))
        .map_err(|source| AddServiceError::Io {
            path: state_dir.join(RENAMED_FILE),
            source,
        })?;
    let token = hook_token(&state_dir.join("hook-token")).map_err(|error| match error {
        StartError::Io { path, source } => AddServiceError::Io { path, source },
        other => AddServiceError::Io {
            path: state_dir.clone(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    let repos = repos::SourceRepos::new(
        data_dir.join("src"),
        repos::HookTarget {
            base_url: base_url.to_owned(),
            token,
            max_time_secs: BuilderConfig::DEFAULT_PUSH_WAIT_SECS + 30,
            socket: None,
            // Rewritten by the daemon when it starts, in a cluster or not.
            cluster: false,
        },
    );
    let (source_repo, created) = repos.create(name).await?;
    Ok(ServiceInfo {
        name: name.to_owned(),
        source_repo,
        created,
    })
}

/// How long a starting builder waits for its data directory's lock before it says another
/// builder holds it.
const LOCK_PATIENCE: Duration = Duration::from_secs(1);

/// The old names of renamed services, in `<data>/builder/` (see `renamed`).
const RENAMED_FILE: &str = "renamed.json";

/// Reads the per-daemon hook token, creating it on first start.
fn hook_token(path: &Path) -> Result<String, StartError> {
    let io = |source| StartError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(token) if token.trim().len() >= 32 => return Ok(token.trim().to_owned()),
        Ok(_) => tracing::warn!(path = %path.display(), "hook token too short; making a new one"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(error)),
    }
    let token = revboot_sandbox::secret::random_hex(24).map_err(io)?;
    revboot_sandbox::secret::write_private(path, &token).map_err(io)?;
    Ok(token)
}
