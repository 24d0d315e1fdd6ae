//! The deployer: the table of instances and the task that tends each one.
//!
//! One instance's task, from summon to record:
//!
//! 1. `summon` (synchronous): under the table lock, find a live instance of the key or check
//!    back-off and caps, take an address, let the tender claim the backend socket, insert
//!    the entry in state `booting`, spawn the instance task. Returns at once.
//! 2. The task materialises the image (cached per revision), boots it through the tender,
//!    records it durably, then waits for the readiness probe; all within the boot timeout.
//! 3. Ready: every tick it compares the last activity (summons, DNS queries, connections)
//!    with the idle timeout: quiet for half of it → `idle`, for all of it with no open
//!    connection → graceful stop (decided under the table lock, so that a summon either
//!    comes first and keeps it or comes after and boots anew). Commands (`stop`, `kill`,
//!    shutdown) and the exit of the instance end the loop.
//! 4. Finishing: from the moment a stop is ordered or decided the key is free for a new
//!    summon (a summon never answers with an instance about to end, whose address would
//!    then refuse the client); the state becomes final (stopped or crashed); crashes update the back-off. Then the address returns to the pool, the
//!    durable record and the scratch directory go, and the runtime record (outcome, boot
//!    time, lifetime, console tail) is written to the store's log ref. The outcome of a
//!    stop the deployer asked for is its reason (`stopped: idle for 60s`), however the
//!    instance then ended; `crashed: …` is for instances that ended on their own.
//!
//! Here: the [`Deployer`], its public face and its start-up; the `table` module holds the
//! table with its caps and back-off (step 1, 4), `revisions` the revision cache and its
//! warm-up, `life` an instance's task (steps 2 to 4), `retire` the end of a service's
//! instances when it is renamed or deleted.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use revboot_sandbox::uids::UidPool;

use crate::errors::error_chain;
use revboot_store::{Revision, Store};
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tracing::{info, warn};

use crate::addresses::ServiceAddresses;
use crate::config::DeployerConfig;
use crate::console::Console;
use crate::pool::AddressPools;
use crate::refusals::RefusalLog;
use crate::state::{self, State};
use crate::steer::Steering;
use crate::summon::{
    Activity, InstanceKey, InstanceState, Instances, ResolveError, Resolved, SummonError, Summoned,
};

use crate::tender::{MakeTender, TenderHost, Tenders};
use crate::vars::Vars;

mod check;
mod follow;
mod handover;
mod life;
mod retire;
mod revisions;
mod table;
mod warm;

pub use check::{CheckFailed, CheckPassed};
pub use handover::{HandedInstance, Handover};

pub use follow::{ConsoleFollower, FollowEvent, FollowFilter};

use life::{clean_orphans, set_if};
use revisions::RevisionInfo;
use table::{Command, Entry, StopReason, Table};

pub use retire::Retirement;

/// The instance tables are sized for `max_instances` up front, up to this many (some
/// 100 bytes an entry, untouched until used).
const PRESIZE_LIMIT: usize = 16_384;
/// Runtime records written to the store at once.
const LOG_WRITERS: usize = 4;
/// How long a killed instance may take to report its exit.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Why the deployer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NewError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A state directory could not be created.
    #[error("Cannot create {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state database could not be opened.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// A tender could not be set up.
    #[error(transparent)]
    Tender(#[from] crate::tender::TenderSetupError),
    /// A pool is not usable or could not be made local.
    #[error(transparent)]
    Pools(#[from] crate::local_routes::LocalError),
    /// The configuration variables could not be opened.
    #[error(transparent)]
    Vars(#[from] crate::vars::VarsError),
}

/// Why an operator command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No such instance runs.
    #[error("No running instance {0}")]
    NotRunning(String),
}

/// One instance, as [`Deployer::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Short unique id (cgroup and scratch name).
    pub id: String,
    /// Which instance.
    pub key: InstanceKey,
    /// Its service addresses.
    pub addresses: ServiceAddresses,
    /// Where it accepts connections, once known (for a VM whose forward's port qemu picks:
    /// once it runs).
    pub backend: Option<SocketAddr>,
    /// Its state.
    pub state: InstanceState,
    /// Time since the summon that started it.
    pub uptime: Duration,
    /// Open client connections (as reported).
    pub connections: u64,
    /// The host pid of its top process, once it runs.
    pub pid: Option<u32>,
    /// Connections the kernel handed straight to it so far, while its connections are
    /// steered ([`crate::steer`]); `None` when they are not.
    pub steered: Option<u64>,
}

/// The deployer. Create it with [`Deployer::new`]; it implements [`Instances`].
#[derive(Debug)]
pub struct Deployer {
    me: Weak<Deployer>,
    config: DeployerConfig,
    store: Store,
    runtime: tokio::runtime::Handle,
    /// The backends, as the deployer was given them.
    tenders: Tenders,
    table: Mutex<Table>,
    revisions: Mutex<HashMap<Revision, Arc<RevisionInfo>>>,
    /// The store generation the revision cache was last warmed for.
    warmed: AtomicU64,
    warming: AtomicBool,
    state: State,
    epoch: Instant,
    id_prefix: String,
    next_id: AtomicU64,
    image_dir: PathBuf,
    scratch_dir: PathBuf,
    /// The uids instances run as, one each ([`BootSpec::uid`]).
    uids: UidPool,
    log_writers: Semaphore,
    tasks: AtomicUsize,
    tasks_done: Notify,
    metrics: crate::metrics::Metrics,
    /// The sk_lookup program, when it could be loaded ([`crate::steer`]).
    steering: Option<Arc<Steering>>,
    /// Lasting refusals, logged once per service per window.
    refusals: RefusalLog,
    /// The `local` routes this deployer added for its pools, removed at shutdown.
    routes: Mutex<crate::local_routes::LocalRoutes>,
    /// The services' configuration variables and secrets ([`crate::vars`]).
    vars: Arc<Vars>,
    /// Wakes the keeper of warm services (the `warm` module).
    warm_wake: Arc<Notify>,
    /// Moves whenever an instance's console comes to exist ([`Deployer::follow`]).
    consoles: watch::Sender<u64>,
    /// Where the next spread over replicas starts among equals ([`Deployer::spread`]).
    turn: AtomicUsize,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Deployer {
    /// Starts a deployer: cleans up what an earlier daemon with the same state directory
    /// left running, then waits for summons.
    pub fn new(
        config: DeployerConfig,
        store: Store,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Deployer>, NewError> {
        Deployer::with_tenders(config, store, runtime, vec![crate::tender::process::make()])
    }

    /// Starts a deployer with the tenders `makers` make (the process tender's
    /// [`crate::tender::process::make`], qemu's [`crate::tender::qemu::make`], …): cleans
    /// up what an earlier daemon with the same state directory left running, through every
    /// tender, then waits for summons.
    pub fn with_tenders(
        config: DeployerConfig,
        store: Store,
        runtime: tokio::runtime::Handle,
        makers: Vec<MakeTender>,
    ) -> Result<Arc<Deployer>, NewError> {
        Deployer::with_handover(config, store, runtime, makers, Vec::new())
    }

    /// Starts a deployer as [`Deployer::with_tenders`] does, taking back the instances the
    /// previous daemon handed over in an upgrade in place ([`Deployer::hand_over`] there;
    /// the `handover` module): they are left out of the clean-up and tended from here on.
    pub fn with_handover(
        config: DeployerConfig,
        store: Store,
        runtime: tokio::runtime::Handle,
        makers: Vec<MakeTender>,
        handed: Vec<HandedInstance>,
    ) -> Result<Arc<Deployer>, NewError> {
        config.validate()?;
        crate::local_routes::check_host_addresses(&config.pools)?;
        let image_dir = config.state_dir.join("images");
        let scratch_dir = config.state_dir.join("scratch");
        for path in [&config.state_dir, &image_dir, &scratch_dir] {
            std::fs::create_dir_all(path).map_err(|source| NewError::Dir {
                path: path.clone(),
                source,
            })?;
        }
        let opened = state::open(&config.state_dir.join("state.redb"))?;
        let vars = Arc::new(Vars::open(&config.state_dir.join("vars"))?);
        let uids = UidPool::new(config.sandbox.uids);
        let host = TenderHost {
            name: config.name.clone(),
            root: config.state_dir.join("root"),
            sandbox: config.sandbox.clone(),
            runtime: runtime.clone(),
            uids: uids.clone(),
            scratch: scratch_dir.clone(),
        };
        let mut tenders = Tenders::new();
        for make in makers {
            tenders.register(make(&host)?);
        }
        let pools: Vec<String> = config.pools.iter().map(ToString::to_string).collect();
        info!(
            name = config.name,
            pools = pools.join(" "),
            "deployer starting"
        );
        let kept: Vec<state::InstanceRecord> = handed.iter().map(|h| h.record.clone()).collect();
        let keep_dirs: Vec<PathBuf> = handed.iter().flat_map(|h| h.keep.clone()).collect();
        clean_orphans(&opened.left, &kept, &keep_dirs, &tenders, &scratch_dir);
        let state = opened.start()?;
        // Last, once nothing else can fail: a route added is removed only at shutdown.
        let (routes, _) = crate::local_routes::make_local(&config.pools)?;
        let pool = AddressPools::new(&config.pools);
        let steering = open_steering(&config);
        let presized = config.max_instances.min(PRESIZE_LIMIT);
        let deployer = Arc::new_cyclic(|me| Deployer {
            me: me.clone(),
            store,
            runtime,
            tenders,
            // Sized for the instance cap up front: a map that grows does so on a summon's
            // path (a DNS answer's), under the table lock.
            table: Mutex::new(Table {
                by_key: HashMap::with_capacity(presized),
                by_address: HashMap::with_capacity(presized),
                replicas: HashMap::new(),
                per_service: HashMap::new(),
                clients: HashMap::new(),
                live: 0,
                pool,
                failures: HashMap::new(),
                shutting_down: false,
                retiring: HashSet::new(),
            }),
            revisions: Mutex::new(HashMap::new()),
            warmed: AtomicU64::new(u64::MAX),
            warming: AtomicBool::new(false),
            state,
            epoch: Instant::now(),
            id_prefix: format!("{:x}", unix_ms() % 0xff_ffff_ffff),
            next_id: AtomicU64::new(0),
            image_dir,
            scratch_dir,
            uids,
            log_writers: Semaphore::new(LOG_WRITERS),
            tasks: AtomicUsize::new(0),
            tasks_done: Notify::new(),
            metrics: crate::metrics::Metrics::default(),
            steering,
            refusals: RefusalLog::default(),
            routes: Mutex::new(routes),
            vars,
            warm_wake: Arc::new(Notify::new()),
            consoles: watch::Sender::new(0),
            turn: AtomicUsize::new(0),
            config,
        });
        deployer.adopt_all(handed);
        deployer.warm_soon();
        Ok(deployer)
    }

    /// Counters of boots, readiness and ends (for `/metrics`).
    pub fn metrics(&self) -> crate::metrics::MetricsSnapshot {
        let mut snapshot = self.metrics.snapshot();
        for entry in self.entries() {
            if let Some(steered) = entry.steered_connections() {
                snapshot.steered_connections += steered;
                snapshot.steered_instances += 1;
            }
        }
        snapshot
    }

    /// True if the sk_lookup program is loaded: ready instances get their connections
    /// from the kernel directly.
    pub fn steers(&self) -> bool {
        self.steering.is_some()
    }

    /// The client that a source address belongs to (`[instances] client_prefixes`): the key
    /// of its per-client instances.
    pub fn client_of(&self, source: IpAddr) -> crate::ClientNet {
        self.config.client_prefixes.client_of(source)
    }

    /// The configuration in use.
    pub fn config(&self) -> &DeployerConfig {
        &self.config
    }

    /// The services' configuration variables: a change applies to instances booted after
    /// it ([`Deployer::restart`] replaces the running ones).
    pub fn vars(&self) -> &Arc<Vars> {
        &self.vars
    }

    /// Stops every instance of `service` (they boot again, with the configuration of now,
    /// on the next query or connection; a warm service's at once); how many.
    pub fn restart(&self, service: &str) -> usize {
        let entries: Vec<Arc<Entry>> = {
            let table = self.table.lock().expect("table lock is never poisoned");
            table
                .by_key
                .values()
                .filter(|entry| entry.key.service == service)
                .cloned()
                .collect()
        };
        for entry in &entries {
            entry.order(Command::Stop(StopReason::Restart));
        }
        entries.len()
    }

    /// Every instance that has not finished yet.
    pub fn list(&self) -> Vec<InstanceInfo> {
        let mut list: Vec<InstanceInfo> = self
            .entries()
            .iter()
            .map(|entry| InstanceInfo {
                id: entry.id.clone(),
                key: entry.key.clone(),
                addresses: entry.addresses,
                backend: entry.backend.get(),
                state: entry.state.borrow().clone(),
                uptime: entry.started.elapsed(),
                connections: entry.open.load(Ordering::Relaxed).max(0) as u64,
                pid: entry.pid.get().copied(),
                steered: entry.steered_connections(),
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Every entry, taken out of the table: reading an entry's steered count is a syscall,
    /// which should not hold the lock summons take.
    fn entries(&self) -> Vec<Arc<Entry>> {
        let table = self.table.lock().expect("table lock is never poisoned");
        table.entries().cloned().collect()
    }

    /// The kept console output of a running instance.
    pub fn console(&self, key: &InstanceKey) -> Option<Vec<u8>> {
        self.entry(key)?.console.get().map(Console::tail)
    }

    /// Live console output of a running instance.
    pub fn console_stream(&self, key: &InstanceKey) -> Option<broadcast::Receiver<Arc<[u8]>>> {
        self.entry(key)?.console.get().map(Console::subscribe)
    }

    /// Stops an instance gracefully (kill after the grace); the watch shows when it is done.
    pub fn stop(&self, key: &InstanceKey) -> Result<watch::Receiver<InstanceState>, ControlError> {
        self.command(key, Command::Stop(StopReason::Operator))
    }

    /// Kills an instance.
    pub fn kill(&self, key: &InstanceKey) -> Result<watch::Receiver<InstanceState>, ControlError> {
        self.command(key, Command::Kill)
    }

    fn command(
        &self,
        key: &InstanceKey,
        command: Command,
    ) -> Result<watch::Receiver<InstanceState>, ControlError> {
        let entry = self
            .entry(key)
            .ok_or_else(|| ControlError::NotRunning(key.to_string()))?;
        entry.order(command);
        Ok(entry.state.subscribe())
    }

    fn entry(&self, key: &InstanceKey) -> Option<Arc<Entry>> {
        let table = self.table.lock().expect("table lock is never poisoned");
        table.by_key.get(key).cloned()
    }

    /// Stops every instance, writes their records back and waits (bounded) until done.
    /// Summons fail with [`SummonError::ShuttingDown`] from now on.
    pub async fn shutdown(&self) {
        let entries: Vec<Arc<Entry>> = {
            let mut table = self.table.lock().expect("table lock is never poisoned");
            table.shutting_down = true;
            table.entries().cloned().collect()
        };
        info!(instances = entries.len(), "deployer shutting down");
        for entry in &entries {
            let _ = entry.commands.try_send(Command::Stop(StopReason::Shutdown));
        }
        let limit = self.config.stop_grace() + KILL_WAIT + Duration::from_secs(30);
        self.wind_down(tokio::time::Instant::now() + limit, "shutdown")
            .await;
        // Not at a hand-over: the next program takes the routes over with the instances.
        self.routes
            .lock()
            .expect("routes lock is never poisoned")
            .remove();
    }

    /// Waits until every instance's task has ended (at most until `deadline`), then shuts
    /// the tenders down and flushes the durable state: the end of a shutdown or hand-over.
    async fn wind_down(&self, deadline: tokio::time::Instant, what: &'static str) {
        let all_done = async {
            loop {
                let notified = self.tasks_done.notified();
                if self.tasks.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
        };
        if tokio::time::timeout_at(deadline, all_done).await.is_err() {
            warn!(
                left = self.tasks.load(Ordering::Acquire),
                what, "instances still finishing"
            );
        }
        for tender in self.tenders.all() {
            tender.shutdown();
        }
        self.state.flush().await;
    }

    fn ms_since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Instances for Deployer {
    fn resolve(&self, service: &str, label: Option<&str>) -> Result<Resolved, ResolveError> {
        use revboot_store::ResolveError as E;
        let revision = self
            .store
            .resolve(service, label)
            .map_err(|error| match error {
                E::InvalidService(_) | E::UnknownService(_) => {
                    ResolveError::UnknownService(service.to_owned())
                }
                E::InvalidLabel { label, .. } | E::UnknownLabel { label, .. } => {
                    ResolveError::UnknownLabel {
                        service: service.to_owned(),
                        label,
                    }
                }
                E::NoLive { .. } => ResolveError::UnknownLabel {
                    service: service.to_owned(),
                    label: "live".to_owned(),
                },
                E::Ambiguous {
                    label, candidates, ..
                } => ResolveError::Ambiguous {
                    service: service.to_owned(),
                    label,
                    candidates,
                },
                other => ResolveError::Store(format!("{other}: {}", error_chain(&other))),
            })?;
        let info = self.revision_info(service, &revision)?;
        if !info.bootable {
            return Err(ResolveError::NotBootable {
                service: service.to_owned(),
                revision: revision.short(12),
            });
        }
        Ok(Resolved {
            service: service.to_owned(),
            revision,
            per_client: info.manifest.run.per_client,
            port: info.manifest.run.port,
            reach: info.manifest.run.reach,
            tls: info.manifest.run.tls,
        })
    }

    fn summon(
        &self,
        service: &str,
        revision: &Revision,
        client: Option<IpAddr>,
    ) -> Result<Summoned, SummonError> {
        let info = self.revision_info(service, revision)?;
        let client = if info.manifest.run.per_client {
            let source = client.ok_or_else(|| SummonError::ClientRequired {
                service: service.to_owned(),
            })?;
            Some(self.config.client_prefixes.client_of(source))
        } else {
            None
        };
        let key = InstanceKey::first(service, *revision, client);
        let replicas = self.replicas(&info.manifest.run);
        if replicas > 1 {
            // Any replica that runs serves: the keeper boots the missing ones.
            let table = self.table.lock().expect("table lock is never poisoned");
            // An index past the last one: no replica is left out of the look.
            if let Some(holder) = table
                .replica_addresses(&key.with_replica(replicas), replicas)
                .and_then(|addresses| table.by_address.get(&addresses.primary()))
            {
                let chosen = self.spread(&table, holder);
                chosen
                    .last_activity
                    .store(self.ms_since_epoch(), Ordering::Relaxed);
                return Ok(Self::summoned(chosen));
            }
        }
        self.start(key, info)
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        let table = self.table.lock().expect("table lock is never poisoned");
        table
            .by_address
            .get(&address.to_canonical())
            .map(|holder| Self::summoned(self.spread(&table, holder)))
    }

    fn handoff(&self, key: &InstanceKey) -> Option<crate::Handoff> {
        self.entry(key).and_then(|entry| entry.handoff.clone())
    }

    fn activity(&self, key: &InstanceKey, activity: Activity) {
        let Some(entry) = self.entry(key) else { return };
        entry
            .last_activity
            .store(self.ms_since_epoch(), Ordering::Relaxed);
        match activity {
            Activity::ConnectionOpened => {
                entry.open.fetch_add(1, Ordering::Relaxed);
            }
            Activity::ConnectionClosed => {
                let _ = entry
                    .open
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                        Some((open - 1).max(0))
                    });
            }
            Activity::Query => {}
        }
        entry
            .state
            .send_if_modified(|state| set_if(state, InstanceState::Idle, InstanceState::Ready));
    }

    /// The store's: instances come and go without moving it (an answer naming an instance
    /// is checked against that instance's state instead), so boots do not empty the DNS
    /// answer cache.
    fn generation(&self) -> u64 {
        self.store.generation()
    }
}

fn open_steering(config: &DeployerConfig) -> Option<Arc<Steering>> {
    // Instances on the service port itself have nothing in front of them to go past.
    if !config.steer || config.backend_port == crate::config::BackendPort::Same {
        return None;
    }
    match Steering::open(config.max_instances) {
        Ok(steering) => {
            info!("warm connections go straight to instances (sk_lookup steering)");
            Some(steering)
        }
        Err(error) => {
            warn!(%error, "cannot load the sk_lookup steering program: warm connections are relayed by the proxy");
            None
        }
    }
}
