//! Builds on demand: a name for a source commit that has no deployment yet builds it.
//!
//! [`OnDemand`] wraps the instances DNS and the API see (the proxy over the deployer).
//!
//! 1. A label that resolves goes on as it is. One that names nothing, and is 7 to 40 hex
//!    digits, may be a source commit never built (a push's older commits beyond
//!    `max_commits_per_push`, a bisection of the source history, or any commit of it).
//! 2. Look-ups are rate-limited ([`LOOKUPS_PER_SECOND`], burst [`LOOKUP_BURST`], for all
//!    clients together): past it the answer is "ask again shortly", not a look-up.
//! 3. The prefix is looked up in the service's source repository, in process
//!    ([`revboot_store::find_commit`]): no commit there (a made-up prefix, or an ambiguous
//!    one) is the unknown label it was — NXDOMAIN — and no build.
//! 4. A commit already being built on demand answers "being built". Otherwise a build is
//!    queued, if fewer than [`MAX_PENDING`] builds on demand wait or run and the build rate
//!    ([`BUILDS_PER_SECOND`], burst [`BUILD_BURST`]) allows; it never moves live. The answer
//!    is [`ResolveError::Building`]: DNS answers SERVFAIL with "Not Ready" and the reason,
//!    uncached; the API answers `building` and the CLI asks again.
//! 5. Once the build is recorded the label resolves (rule 1) to its deployment — or, if it
//!    failed, to a revision that cannot boot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use revboot_builder::Builder;
use revboot_deployer::{
    Activity, InstanceKey, Instances, ResolveError, Resolved, SummonError, Summoned,
};
use revboot_store::Revision;

/// Source look-ups per second, for all clients together.
pub const LOOKUPS_PER_SECOND: f64 = 50.0;
/// Look-ups at once beyond the rate.
pub const LOOKUP_BURST: f64 = 100.0;
/// Builds on demand queued per second, for all clients together.
pub const BUILDS_PER_SECOND: f64 = 1.0;
/// Builds on demand queued at once beyond the rate.
pub const BUILD_BURST: f64 = 8.0;
/// Builds on demand waiting or running at most.
pub const MAX_PENDING: usize = 8;

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct State {
    lookups: Bucket,
    builds: Bucket,
    /// `(service, commit)` → its build's number, while it waits or runs.
    pending: HashMap<(String, String), u64>,
}

/// The instances of the daemon, with builds on demand (module docs).
pub struct OnDemand {
    inner: Arc<dyn Instances>,
    builder: Builder,
    handle: tokio::runtime::Handle,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand").finish_non_exhaustive()
    }
}

impl OnDemand {
    /// Wraps `inner`; builds go to `builder` on `handle`.
    pub fn new(
        inner: Arc<dyn Instances>,
        builder: Builder,
        handle: tokio::runtime::Handle,
    ) -> OnDemand {
        OnDemand {
            inner,
            builder,
            handle,
            state: Arc::new(Mutex::new(State {
                lookups: Bucket::new(LOOKUPS_PER_SECOND, LOOKUP_BURST),
                builds: Bucket::new(BUILDS_PER_SECOND, BUILD_BURST),
                pending: HashMap::new(),
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rules 2–4 for `label` of `service`, which resolved to nothing.
    fn build(&self, service: &str, label: &str, unknown: ResolveError) -> ResolveError {
        let hex = (7..=40).contains(&label.len()) && label.bytes().all(|b| b.is_ascii_hexdigit());
        let source: PathBuf = match self.builder.source_repo(service) {
            Ok(path) if hex && path.join("HEAD").is_file() => path,
            _ => return unknown,
        };
        if !self.state().lookups.take() {
            return ResolveError::Building(format!(
                "too many look-ups of unbuilt commits of `{service}` at once; ask again shortly"
            ));
        }
        let commit = match revboot_store::find_commit(&source, label) {
            Ok(Some(commit)) => commit,
            Ok(None) => return unknown,
            Err(error) => {
                tracing::warn!(%error, service, "cannot look a source commit up");
                return unknown;
            }
        };
        let short = &commit[..12];
        let key = (service.to_owned(), commit.clone());
        {
            let mut state = self.state();
            if let Some(id) = state.pending.get(&key) {
                return ResolveError::Building(format!(
                    "source commit {short} of `{service}` is being built (build #{id}); ask again once it is"
                ));
            }
            if state.pending.len() >= MAX_PENDING || !state.builds.take() {
                return ResolveError::Building(format!(
                    "source commit {short} of `{service}` has no deployment, and enough builds on demand wait already; ask again shortly"
                ));
            }
            state.pending.insert(key.clone(), 0);
        }
        let builder = self.builder.clone();
        let state = self.state.clone();
        let (service_name, full) = key.clone();
        let queued = self
            .handle
            .block_on_or_spawn(async move { builder.build_on_demand(&service_name, &full).await });
        match queued {
            Ok((id, ended)) => {
                if let Some(entry) = self.state().pending.get_mut(&key) {
                    *entry = id;
                }
                tracing::info!(service, commit, id, "queued a build on demand");
                let key = key.clone();
                self.handle.spawn(async move {
                    let _ = ended.await;
                    state
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .pending
                        .remove(&key);
                });
                ResolveError::Building(format!(
                    "source commit {short} of `{service}` had no deployment: it is being built (build #{id}); ask again once it is"
                ))
            }
            Err(error) => {
                self.state().pending.remove(&key);
                ResolveError::Building(format!(
                    "source commit {short} of `{service}` has no deployment and cannot be built now ({error}); ask again shortly"
                ))
            }
        }
    }
}

/// Runs a future to its end from synchronous code, inside or outside the runtime.
trait BlockOn {
    fn block_on_or_spawn<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static;
}

impl BlockOn for tokio::runtime::Handle {
    fn block_on_or_spawn<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        // On a runtime thread (DNS over TCP), block_on would panic: hand the future to the
        // runtime and wait on a plain channel (queueing answers in milliseconds).
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = tx.send(future.await);
        });
        tokio::task::block_in_place(|| rx.recv()).expect("the queueing task sends its answer")
    }
}

impl Instances for OnDemand {
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError> {
        match (self.inner.resolve(service, label), label) {
            (Err(unknown @ ResolveError::UnknownLabel { .. }), Some(label)) => {
                Err(self.build(service, label, unknown))
            }
            (result, _) => result,
        }
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        self.inner.summon(service, revision, client)
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        self.inner.by_address(address)
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        self.inner.activity(key, activity);
    }

    fn generation(&self) -> u64 {
        self.inner.generation()
    }
}
