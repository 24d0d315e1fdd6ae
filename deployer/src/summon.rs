//! The contract between the deployer and the parts that front it.
//!
//! The DNS front end and the handshake proxy never see tenders, processes or git: they see
//! [`Instances`]. A DNS query resolves a name and summons; the proxy looks an instance up by
//! the destination address of a connection, waits on its state and reports activity.
//!
//! 1. `resolve(service, label)` — cheap (an in-memory index), errors are answers
//!    (unknown → NXDOMAIN, ambiguous → refusal).
//! 2. `summon(service, revision, client)` — returns at once with the instance's service
//!    address and a watch of its state; concurrent summons of one instance boot it once.
//!    A revision kept warm with replicas (`[run] min_instances` above 1) answers with the
//!    serving replica with the fewest open connections (all share one address); a summon
//!    boots replica 0 only.
//! 3. `by_address(ip)` — what the proxy calls on accept; among replicas, as `summon` picks.
//! 4. `activity(key, …)` — queries and connections keep an instance from being reaped.
//! 5. `generation()` — changes whenever a resolve result may have changed, so callers may
//!    cache answers until it moves; an answer naming an instance is valid while that
//!    instance's state is not final (its address is the instance's for its whole life).
//!
//! A summon that starts a boot wakes another thread, and on a busy machine the woken thread
//! may take the summoning thread's CPU before it has sent its answer. A caller that answers
//! someone opens a [`LaunchScope`] first: boots started inside it are launched when the
//! scope is dropped, after the answer has left.

use std::cell::RefCell;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use revboot_store::Revision;
use revboot_store::manifest::Reach;
use tokio::sync::watch;

use crate::addresses::{ClientNet, Family, ServiceAddresses};

/// What identifies an instance: a revision of a service, optionally for one client, and
/// which of the revision's replicas it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceKey {
    /// The service name.
    pub service: String,
    /// The deployment commit.
    pub revision: Revision,
    /// For per-client services, the only client this instance serves: the network its
    /// address belongs to (see [`crate::ClientPrefixes`]).
    pub client: Option<ClientNet>,
    /// Which replica of the revision: 0 for every instance a summon boots; a warm service
    /// with `[run] min_instances = N` keeps replicas 0 to N-1 of its live revision booted,
    /// all on one service address (the deployer's `warm` module).
    pub replica: u16,
}

impl InstanceKey {
    /// The key of replica 0 of `service`'s `revision` (for `client`): what a summon boots.
    pub fn first(service: &str, revision: Revision, client: Option<ClientNet>) -> InstanceKey {
        InstanceKey {
            service: service.to_owned(),
            revision,
            client,
            replica: 0,
        }
    }

    /// The key of replica `replica` of the same revision (and client).
    pub fn with_replica(&self, replica: u16) -> InstanceKey {
        InstanceKey {
            replica,
            ..self.clone()
        }
    }
}

/// `hello@0123456789ab`, `hello@0123456789ab #2` for a replica other than the first,
/// `… for 192.0.2.0/24` for a client's.
impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.service, self.revision.short(12))?;
        if self.replica > 0 {
            write!(f, " #{}", self.replica)?;
        }
        if let Some(client) = self.client {
            write!(f, " for {client}")?;
        }
        Ok(())
    }
}

/// The life of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InstanceState {
    /// Known, not running.
    Cold,
    /// Started; not ready yet.
    Booting,
    /// Serving.
    Ready,
    /// Serving, with no connections or queries lately.
    Idle,
    /// Stopped on purpose (reaped, stopped by an operator, daemon shutdown).
    Stopped,
    /// Exited or failed to become ready; `reason` says why.
    Crashed {
        /// Human-readable cause, e.g. "exited with status 101" or "not ready after 5s".
        reason: String,
    },
}

impl InstanceState {
    /// True when connections can be spliced to the backend.
    pub fn is_serving(&self) -> bool {
        matches!(self, InstanceState::Ready | InstanceState::Idle)
    }

    /// True when the instance will never serve again (a new summon starts a new one).
    pub fn is_final(&self) -> bool {
        matches!(self, InstanceState::Stopped | InstanceState::Crashed { .. })
    }
}

/// The word the CLI, the API and the dashboard show: `cold`, `booting`, `ready`, `idle`,
/// `stopped`, or `crashed: <reason>`.
impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstanceState::Cold => f.write_str("cold"),
            InstanceState::Booting => f.write_str("booting"),
            InstanceState::Ready => f.write_str("ready"),
            InstanceState::Idle => f.write_str("idle"),
            InstanceState::Stopped => f.write_str("stopped"),
            InstanceState::Crashed { reason } => write!(f, "crashed: {reason}"),
        }
    }
}

/// A name resolved to a bootable revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The service.
    pub service: String,
    /// The deployment commit the label names.
    pub revision: Revision,
    /// One instance per client address.
    pub per_client: bool,
    /// The port clients connect to.
    pub port: u16,
    /// How clients reach it: its own address, the front door, or both.
    pub reach: Reach,
    /// Where TLS through the front door ends.
    pub tls: revboot_store::manifest::Tls,
}

/// A summoned instance: where to reach it, and its state as it changes.
#[derive(Debug, Clone)]
pub struct Summoned {
    /// Which instance.
    pub key: InstanceKey,
    /// The service addresses clients are given, one per family (DNS answers them; the
    /// proxy listens on each).
    pub addresses: ServiceAddresses,
    /// The port clients connect to on each of `addresses`.
    pub port: u16,
    /// Where the instance itself accepts connections (the proxy connects here): known once
    /// the instance is ready at the latest.
    pub backend: Backend,
    /// How long a connection may wait for the instance to become ready.
    pub boot_timeout: Duration,
    /// How clients reach it (the proxy listens on its service addresses only when they are
    /// one of the ways, or when the daemon has no front door).
    pub reach: Reach,
    /// The instance's state.
    pub state: watch::Receiver<InstanceState>,
}

/// Where an instance accepts connections ([`Summoned::backend`]), shared by every copy of
/// its [`Summoned`]: known from the summon on for most instances; for a VM whose port
/// forward's port qemu picks as it binds it, once the tender learnt it after the start.
/// Either way it is known before the instance is ready, so before any connection is
/// relayed or steered to it; it never changes once known.
#[derive(Debug, Clone, Default)]
pub struct Backend(std::sync::Arc<std::sync::OnceLock<SocketAddr>>);

impl Backend {
    /// A backend known now.
    pub fn known(address: SocketAddr) -> Backend {
        Backend(std::sync::Arc::new(std::sync::OnceLock::from(address)))
    }

    /// A backend learnt later ([`Backend::learn`]).
    pub fn later() -> Backend {
        Backend::default()
    }

    /// The address, once known.
    pub fn get(&self) -> Option<SocketAddr> {
        self.0.get().copied()
    }

    /// Records the address, seen by every copy from now on; an address known already
    /// stays (false then, unless it is the same).
    pub fn learn(&self, address: SocketAddr) -> bool {
        *self.0.get_or_init(|| address) == address
    }
}

/// Why a name does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// No such service.
    #[error("No service named `{0}`")]
    UnknownService(String),
    /// The service has no revision by that label (or no live revision, for no label).
    #[error("Service `{service}` has no revision `{label}`")]
    UnknownLabel {
        /// The service.
        service: String,
        /// The label asked for (`live` for none).
        label: String,
    },
    /// The label matches more than one revision.
    #[error("Label `{label}` of `{service}` is ambiguous: {}", candidates.join(", "))]
    Ambiguous {
        /// The service.
        service: String,
        /// The label asked for.
        label: String,
        /// Short ids of the matching revisions.
        candidates: Vec<String>,
    },
    /// The revision exists but cannot be booted (a failed build has no image).
    #[error("Revision {revision} of `{service}` has no image: its build failed")]
    NotBootable {
        /// The service.
        service: String,
        /// The revision.
        revision: String,
    },
    /// The store could not be read.
    #[error("Deployment repository unreadable: {0}")]
    Store(String),
    /// The label names a source commit that has no deployment yet: it is being built (or
    /// cannot be now, and the reason says when to ask again).
    #[error("{0}")]
    Building(String),
}

/// Why a summon was refused. Every variant is an answer to pass on, not a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SummonError {
    /// The global cap on running instances is reached.
    #[error("Instance limit reached ({limit} running)")]
    GlobalCap {
        /// The cap.
        limit: usize,
    },
    /// The per-service cap is reached.
    #[error("Instance limit for `{service}` reached ({limit} running)")]
    ServiceCap {
        /// The service.
        service: String,
        /// The cap.
        limit: usize,
    },
    /// The per-client cap of a per-client service is reached.
    #[error("Per-client instance limit for `{service}` reached ({limit} clients)")]
    ClientCap {
        /// The service.
        service: String,
        /// The cap.
        limit: usize,
    },
    /// A warm service asks for more replicas than the instance caps hold.
    #[error(
        "`{service}` asks for {replicas} replicas ([run] min_instances), and at most {limit} instances of a service may run ([instances] max_per_service, max_total)"
    )]
    Replicas {
        /// The service.
        service: String,
        /// The replicas asked for.
        replicas: u16,
        /// The lower of the caps.
        limit: usize,
    },
    /// A promotion of a warm service whose replicas would not fit beside the instances of
    /// the service already running (the live revision's replicas serve until live moves).
    #[error(
        "`{service}` keeps {replicas} replicas warm ([run] min_instances) and {running} of its instances already run (the live revision's serve until live moves): promoting needs {needed} at once, and at most {limit} may run ([instances] {cap})"
    )]
    PromotionRoom {
        /// The service.
        service: String,
        /// The replicas asked for.
        replicas: u16,
        /// Instances running that the promotion does not replace before live moves: of the
        /// service for `max_per_service`, of any service for `max_total`.
        running: usize,
        /// `running` + `replicas`.
        needed: usize,
        /// The cap.
        limit: usize,
        /// The cap's key: `max_per_service` or `max_total`.
        cap: &'static str,
    },
    /// A per-client service was summoned without a client address.
    #[error("`{service}` gives each client its own instance: a client address is needed")]
    ClientRequired {
        /// The service.
        service: String,
    },
    /// The revision is crash-looping and is backing off.
    #[error("{key} is failing; next boot allowed in {retry_in:?}")]
    Backoff {
        /// The instance.
        key: String,
        /// Time until the next boot is allowed.
        retry_in: Duration,
    },
    /// The address pool is exhausted.
    #[error("No free service address left in the pool")]
    PoolExhausted,
    /// The service asks for an address family the deployer has no pool of.
    #[error("`{service}` is served on {family}, and no {family} pool is configured")]
    NoPool {
        /// The service.
        service: String,
        /// The family.
        family: Family,
    },
    /// The name did not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Booting could not even start (image missing, tender unavailable…).
    #[error("Cannot start {key}: {reason}")]
    Start {
        /// The instance.
        key: String,
        /// Why.
        reason: String,
    },
    /// The deployer is shutting down.
    #[error("The deployer is shutting down")]
    ShuttingDown,
    /// The service is being renamed or deleted.
    #[error("`{service}` is being renamed or deleted")]
    Retiring {
        /// The service.
        service: String,
    },
}

impl SummonError {
    /// True for a refusal that lasts until instances end or time passes: a cap, the
    /// address pool, a crash loop's back-off. Every query meets it meanwhile, so the
    /// deployer logs these itself, one line per service per 10 s with the count of those
    /// left out; a caller (DNS, the proxy) need not log each.
    pub fn is_lasting(&self) -> bool {
        matches!(
            self,
            SummonError::GlobalCap { .. }
                | SummonError::ServiceCap { .. }
                | SummonError::ClientCap { .. }
                | SummonError::PoolExhausted
                | SummonError::NoPool { .. }
                | SummonError::Backoff { .. }
        )
    }
}

/// Activity that keeps an instance alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// A DNS query was answered with this instance.
    Query,
    /// A client connection was opened to the instance.
    ConnectionOpened,
    /// A client connection to the instance was closed.
    ConnectionClosed,
}

/// What the DNS front end and the proxy need from the deployer.
pub trait Instances: Send + Sync + 'static {
    /// Resolves a DNS label (`None`: the live revision) of a service.
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError>;

    /// Summons the instance of `revision` (for `client`, on per-client services); returns at
    /// once, booting in the background when it is not running.
    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError>;

    /// The instance that owns a service address, if any.
    fn by_address(&self, address: IpAddr) -> Option<Summoned>;

    /// The daemon's end of the hand-off socket of the instance `key` names, when its
    /// manifest asks for connections to be handed to it and its tender gave it one
    /// ([`crate::handoff`]). None by default.
    fn handoff(&self, key: &InstanceKey) -> Option<crate::Handoff> {
        let _ = key;
        None
    }

    /// Reports activity for an instance.
    fn activity(&self, key: &InstanceKey, activity: Activity);

    /// A counter that changes whenever a resolve result may have changed; answers cached
    /// under one value are valid until it moves, and an answer naming an instance also only
    /// while [`Summoned::state`] is not final.
    fn generation(&self) -> u64;
}

/// A boot launch held back by a [`LaunchScope`].
pub(crate) type Launch = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Launches held back on this thread; `None` outside any scope.
    static HELD: RefCell<Option<Vec<Launch>>> = const { RefCell::new(None) };
}

/// Holds back the boots that summons start on this thread until dropped, so that the caller
/// can send its answer before any boot work is woken (see the module docs). Scopes do not
/// nest: an inner scope launches nothing and the outer one launches everything. Dropping
/// the scope (also by unwinding) launches every held boot, so no instance is left without its
/// task; a scope moved to another thread still launches what it holds.
#[derive(Default)]
#[must_use = "boots launch when the scope is dropped"]
pub struct LaunchScope {
    /// True for the scope that opened the thread's list.
    outer: bool,
    /// The launches taken from the thread when the scope was closed early (see `close`).
    taken: Vec<Launch>,
}

impl LaunchScope {
    /// Opens a scope on this thread.
    pub fn open() -> LaunchScope {
        let outer = HELD.with(|held| {
            let mut held = held.borrow_mut();
            if held.is_some() {
                false
            } else {
                *held = Some(Vec::new());
                true
            }
        });
        LaunchScope {
            outer,
            taken: Vec::new(),
        }
    }

    /// Stops holding back launches on this thread, keeping those held so far in the scope:
    /// call it before an `.await` that may move the task to another thread.
    pub fn close(mut self) -> LaunchScope {
        if self.outer {
            self.outer = false;
            self.taken = HELD
                .with(|held| held.borrow_mut().take())
                .unwrap_or_default();
        }
        self
    }
}

impl fmt::Debug for LaunchScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchScope")
            .field("outer", &self.outer)
            .field("taken", &self.taken.len())
            .finish()
    }
}

impl Drop for LaunchScope {
    fn drop(&mut self) {
        let mut launches = std::mem::take(&mut self.taken);
        if self.outer {
            launches.extend(
                HELD.with(|held| held.borrow_mut().take())
                    .unwrap_or_default(),
            );
        }
        for launch in launches {
            launch();
        }
    }
}

/// Runs `launch` now, or holds it back if a [`LaunchScope`] is open on this thread. For work
/// a summon starts that wakes other threads (the deployer's instance task, the proxy's
/// accept loop).
pub fn launch(launch: impl FnOnce() + Send + 'static) {
    let launch: Launch = Box::new(launch);
    let launch = HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(held) => {
            held.push(launch);
            None
        }
        None => Some(launch),
    });
    if let Some(launch) = launch {
        launch();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting(count: &Arc<AtomicUsize>) -> impl FnOnce() + Send + 'static {
        let count = Arc::clone(count);
        move || {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn launches_run_at_once_outside_a_scope() {
        let count = Arc::new(AtomicUsize::new(0));
        launch(counting(&count));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_scope_holds_launches_until_it_drops_and_inner_scopes_defer_to_it() {
        let count = Arc::new(AtomicUsize::new(0));
        let scope = LaunchScope::open();
        launch(counting(&count));
        let inner = LaunchScope::open();
        launch(counting(&count));
        drop(inner);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        drop(scope);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        launch(counting(&count));
        assert_eq!(
            count.load(Ordering::SeqCst),
            3,
            "the thread holds nothing back after"
        );
    }

    #[test]
    fn a_closed_scope_keeps_what_it_held_and_holds_nothing_more() {
        let count = Arc::new(AtomicUsize::new(0));
        let scope = LaunchScope::open();
        launch(counting(&count));
        let scope = scope.close();
        launch(counting(&count));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        std::thread::spawn(move || drop(scope))
            .join()
            .expect("joins");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn unwinding_out_of_a_scope_still_launches() {
        let count = Arc::new(AtomicUsize::new(0));
        let inner = Arc::clone(&count);
        let result = std::panic::catch_unwind(move || {
            let _scope = LaunchScope::open();
            launch(counting(&inner));
            panic!("a bug while answering");
        });
        assert!(result.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
