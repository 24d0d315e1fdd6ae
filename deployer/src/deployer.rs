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
//!    connection → graceful stop. Commands (`stop`, `kill`, shutdown) and the exit of the
//!    instance end the loop.
//! 4. Finishing: the state becomes final (stopped or crashed) and the key is free for a
//!    new summon; crashes update the back-off. Then the address returns to the pool, the
//!    durable record and the scratch directory go, and the runtime record (outcome, boot
//!    time, lifetime, console tail) is written to the store's log ref. The outcome of a
//!    stop the deployer asked for is its reason (`stopped: idle for 60s`), however the
//!    instance then ended; `crashed: …` is for instances that ended on their own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use revboot_sandbox::uids::UidPool;
use revboot_store::manifest::Manifest;
use revboot_store::{Revision, RuntimeRecord, Store};
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::DeployerConfig;
use crate::console::Console;
use crate::pool::AddressPool;
use crate::refusals::{self, RefusalLog};
use crate::state::{self, InstanceRecord, State};
use crate::steer::{Steered, Steering};
use crate::summon::{
    Activity, InstanceKey, InstanceState, Instances, ResolveError, Resolved, SummonError, Summoned,
};
use crate::tender::process::{ProcessTender, ProcessTenderError, pid_start_time};
use crate::tender::{
    BootSpec, ExitReport, ExitStatus, NotReady, Prepared, Running, Tender, Tenders,
};

/// Revisions whose manifests are cached.
const REVISION_CACHE: usize = 8192;
/// The background warm-up reads at most this many newest bootable deployments per service
/// (a `git bisect` over deployments boots old ones by name; a revision outside the cache
/// costs its DNS answer a manifest read from git, some 300 µs),
const WARM_PER_SERVICE: usize = 2048;
/// and stops when the revision cache holds this many.
const WARM_LIMIT: usize = REVISION_CACHE * 3 / 4;
/// The instance tables are sized for `max_instances` up front, up to this many (some
/// 100 bytes an entry, untouched until used).
const PRESIZE_LIMIT: usize = 16_384;
/// Crash histories kept.
const FAILURE_CACHE: usize = 4096;
/// Runtime records written to the store at once.
const LOG_WRITERS: usize = 4;
/// Commands queued per instance.
const COMMANDS: usize = 4;
/// How long a killed instance may take to report its exit.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Tries to find a bindable address when another program holds one of the pool's.
const BIND_TRIES: usize = 16;
/// When a per-client service's slots are full, the quietest client instances asked (one
/// `sock_diag` each) whether a connection to them is open, at most.
const RECLAIM_CHECKS: usize = 8;

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
    /// The process tender could not be set up.
    #[error(transparent)]
    Tender(#[from] ProcessTenderError),
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
    /// Its service address.
    pub address: IpAddr,
    /// Where it accepts connections.
    pub backend: SocketAddr,
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

#[derive(Debug)]
enum Command {
    Stop(StopReason),
    Kill,
}

/// Why the deployer stopped an instance. Its record says this, whatever signal ended it: an
/// image that is pid 1 of its namespace ignores SIGTERM without a handler and ends by the
/// SIGKILL after the grace, which is still the stop that was asked for, not a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Quiet for the whole idle timeout.
    Idle(Duration),
    /// An operator's stop.
    Operator,
    /// An operator's kill.
    OperatorKill,
    /// Its client slot went to a new client of its per-client service.
    Reclaimed,
    /// The daemon is shutting down.
    Shutdown,
    /// The deployer went away (its command queue closed).
    DeployerGone,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Idle(after) if after.subsec_millis() == 0 => {
                write!(f, "idle for {}s", after.as_secs())
            }
            StopReason::Idle(after) => write!(f, "idle for {} ms", after.as_millis()),
            StopReason::Operator => f.write_str("by operator"),
            StopReason::OperatorKill => f.write_str("killed by operator"),
            StopReason::Reclaimed => f.write_str("client slot reclaimed for a new client"),
            StopReason::Shutdown => f.write_str("daemon shutdown"),
            StopReason::DeployerGone => f.write_str("deployer gone"),
        }
    }
}

#[derive(Debug)]
struct Entry {
    id: String,
    key: InstanceKey,
    address: IpAddr,
    port: u16,
    backend: SocketAddr,
    boot_timeout: Duration,
    state: watch::Sender<InstanceState>,
    started: Instant,
    open: AtomicI64,
    /// Milliseconds since the deployer's epoch.
    last_activity: AtomicU64,
    commands: mpsc::Sender<Command>,
    console: OnceLock<Console>,
    pid: OnceLock<u32>,
    counted: AtomicBool,
    /// Its client slot went to a new client: it no longer counts against the per-client cap
    /// and no longer answers for its key, and it is being stopped.
    reclaimed: AtomicBool,
    /// The kernel hand-off while the instance is ready; only its life task sets and clears it.
    steered: Mutex<Option<Steered>>,
}

#[derive(Debug, Clone, Copy)]
struct Failure {
    crashes: u32,
    until: Option<Instant>,
    at: Instant,
}

#[derive(Debug)]
struct Table {
    by_key: HashMap<InstanceKey, Arc<Entry>>,
    by_address: HashMap<IpAddr, Arc<Entry>>,
    per_service: HashMap<String, usize>,
    clients: HashMap<String, usize>,
    live: usize,
    pool: AddressPool,
    failures: HashMap<InstanceKey, Failure>,
    shutting_down: bool,
}

#[derive(Debug)]
struct RevisionInfo {
    manifest: Manifest,
    bootable: bool,
    image: OnceLock<PathBuf>,
}

/// The deployer. Create it with [`Deployer::new`]; it implements [`Instances`].
#[derive(Debug)]
pub struct Deployer {
    me: Weak<Deployer>,
    config: DeployerConfig,
    store: Store,
    runtime: tokio::runtime::Handle,
    tenders: RwLock<Tenders>,
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
        config.validate()?;
        let image_dir = config.state_dir.join("images");
        let scratch_dir = config.state_dir.join("scratch");
        for path in [&config.state_dir, &image_dir, &scratch_dir] {
            std::fs::create_dir_all(path).map_err(|source| NewError::Dir {
                path: path.clone(),
                source,
            })?;
        }
        let opened = state::open(&config.state_dir.join("state.redb"))?;
        let process = ProcessTender::new(
            &config.name,
            config.sandbox.clone(),
            &config.state_dir.join("root"),
            runtime.clone(),
        )?;
        info!(cgroups = process.cgroup_layout(), name = config.name, pool = %config.pool, "deployer starting");
        clean_orphans(&opened.left, &process, &scratch_dir);
        let state = opened.start()?;
        let mut tenders = Tenders::new();
        tenders.register(Arc::new(process));
        let pool = AddressPool::new(config.pool);
        let steering = open_steering(&config);
        let presized = config.max_instances.min(PRESIZE_LIMIT);
        let deployer = Arc::new_cyclic(|me| Deployer {
            me: me.clone(),
            store,
            runtime,
            tenders: RwLock::new(tenders),
            // Sized for the instance cap up front: a map that grows does so on a summon's
            // path (a DNS answer's), under the table lock.
            table: Mutex::new(Table {
                by_key: HashMap::with_capacity(presized),
                by_address: HashMap::with_capacity(presized),
                per_service: HashMap::new(),
                clients: HashMap::new(),
                live: 0,
                pool,
                failures: HashMap::new(),
                shutting_down: false,
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
            uids: UidPool::new(config.sandbox.uids),
            log_writers: Semaphore::new(LOG_WRITERS),
            tasks: AtomicUsize::new(0),
            tasks_done: Notify::new(),
            metrics: crate::metrics::Metrics::default(),
            steering,
            refusals: RefusalLog::default(),
            config,
        });
        deployer.warm_soon();
        Ok(deployer)
    }

    /// What a tender for this deployer needs of the host: names, the sandbox root's mount
    /// point, the sandbox settings.
    pub fn tender_host(&self) -> crate::tender::TenderHost {
        crate::tender::TenderHost {
            name: self.config.name.clone(),
            root: self.config.state_dir.join("root"),
            sandbox: self.config.sandbox.clone(),
        }
    }

    /// Adds (or replaces) a tender, e.g. the qemu backend.
    pub fn register_tender(&self, tender: Arc<dyn Tender>) {
        self.tenders
            .write()
            .expect("tender registry lock is never poisoned")
            .register(tender);
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

    /// The configuration in use.
    pub fn config(&self) -> &DeployerConfig {
        &self.config
    }

    /// Every instance that has not finished yet.
    pub fn list(&self) -> Vec<InstanceInfo> {
        let mut list: Vec<InstanceInfo> = self
            .entries()
            .iter()
            .map(|entry| InstanceInfo {
                id: entry.id.clone(),
                key: entry.key.clone(),
                address: entry.address,
                backend: entry.backend,
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
        table.by_address.values().cloned().collect()
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
        // A full queue already holds a stop or kill; the instance is on its way out.
        let _ = entry.commands.try_send(command);
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
            table.by_address.values().cloned().collect()
        };
        info!(instances = entries.len(), "deployer shutting down");
        for entry in &entries {
            let _ = entry.commands.try_send(Command::Stop(StopReason::Shutdown));
        }
        let limit = self.config.stop_grace() + KILL_WAIT + Duration::from_secs(30);
        let all_done = async {
            loop {
                let notified = self.tasks_done.notified();
                if self.tasks.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(limit, all_done).await.is_err() {
            warn!(
                left = self.tasks.load(Ordering::Acquire),
                "shutdown: instances still finishing"
            );
        }
        let tenders: Vec<Arc<dyn Tender>> = self
            .tenders
            .read()
            .expect("tender registry lock is never poisoned")
            .all()
            .cloned()
            .collect();
        for tender in tenders {
            tender.shutdown();
        }
        self.state.flush().await;
    }

    fn ms_since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn revision_info(
        &self,
        service: &str,
        revision: &Revision,
    ) -> Result<Arc<RevisionInfo>, ResolveError> {
        if let Some(info) = self
            .revisions
            .lock()
            .expect("revision cache lock is never poisoned")
            .get(revision)
        {
            return Ok(Arc::clone(info));
        }
        // A miss: the repository may have changed since the last warm-up.
        self.warm_soon();
        self.read_revision_info(service, revision)
    }

    /// Reads a revision's manifest from the store into the revision cache.
    fn read_revision_info(
        &self,
        service: &str,
        revision: &Revision,
    ) -> Result<Arc<RevisionInfo>, ResolveError> {
        let deployment = self
            .store
            .deployment(service, revision)
            .map_err(|error| read_error(service, revision, &error))?;
        self.metrics.manifest_read();
        let manifest = self
            .store
            .manifest(revision)
            .map_err(|error| read_error(service, revision, &error))?;
        let (Some(manifest), Some(_)) = (manifest, deployment.image.as_ref()) else {
            return Err(ResolveError::NotBootable {
                service: service.to_owned(),
                revision: revision.short(12),
            });
        };
        let info = Arc::new(RevisionInfo {
            manifest,
            bootable: true,
            image: OnceLock::new(),
        });
        let mut cache = self
            .revisions
            .lock()
            .expect("revision cache lock is never poisoned");
        if cache.len() >= REVISION_CACHE {
            cache.clear();
        }
        cache.insert(*revision, Arc::clone(&info));
        Ok(info)
    }

    /// Reads the manifests of the newest deployments of every service into the revision
    /// cache, on a blocking thread, once per store generation (asked at start-up and on a
    /// cache miss, so a cached resolve costs no extra index check): the first query for a
    /// revision then costs no git read on the path of its DNS answer. At most one warm-up
    /// runs at a time, and it stops short of filling the cache.
    fn warm_soon(&self) {
        let generation = self.store.generation();
        if self.warmed.load(Ordering::Acquire) == generation
            || self.warming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            self.warming.store(false, Ordering::Release);
            return;
        };
        self.runtime.spawn_blocking(move || {
            me.warm();
            me.warmed.store(generation, Ordering::Release);
            me.warming.store(false, Ordering::Release);
        });
    }

    fn warm(&self) {
        let Ok(services) = self.store.services() else {
            return;
        };
        for service in services {
            if self
                .table
                .lock()
                .expect("table lock is never poisoned")
                .shutting_down
            {
                return;
            }
            let Ok(history) = self.store.history(&service) else {
                continue;
            };
            let bootable = history.iter().filter(|d| d.image.is_some());
            for deployment in bootable.take(WARM_PER_SERVICE) {
                let (full, known) = {
                    let cache = self
                        .revisions
                        .lock()
                        .expect("revision cache lock is never poisoned");
                    (
                        cache.len() >= WARM_LIMIT,
                        cache.contains_key(&deployment.revision),
                    )
                };
                if full {
                    return;
                }
                if !known {
                    // Errors are the query's to report, when one comes.
                    let _ = self.read_revision_info(&service, &deployment.revision);
                }
            }
        }
    }

    fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn summoned(entry: &Entry) -> Summoned {
        Summoned {
            key: entry.key.clone(),
            address: entry.address,
            port: entry.port,
            backend: entry.backend,
            boot_timeout: entry.boot_timeout,
            state: entry.state.subscribe(),
        }
    }

    fn idle_timeout(&self, manifest: &Manifest) -> Duration {
        match self.config.idle_timeout_override_ms {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_secs(manifest.run.idle_timeout_secs),
        }
    }

    /// Summons `key`: when a per-client service's client slots are full, once more after
    /// one is reclaimed ([`Deployer::reclaim_client_slot`]). Refusals that last are logged
    /// here, once per service per [`refusals::WINDOW`].
    fn start(&self, key: InstanceKey, info: Arc<RevisionInfo>) -> Result<Summoned, SummonError> {
        let result = match self.try_start(&key, &info) {
            Err(SummonError::ClientCap { .. }) if self.reclaim_client_slot(&key.service) => {
                self.try_start(&key, &info)
            }
            other => other,
        };
        if let Err(error) = &result
            && error.is_lasting()
            && let Some(suppressed) = self.refusals.note(&key.service, Instant::now())
        {
            warn!(
                service = key.service,
                %error,
                suppressed,
                "summon refused (one such line per service per {:?}; `suppressed` counts the refusals left out since the last)",
                refusals::WINDOW
            );
        }
        result
    }

    fn try_start(
        &self,
        key: &InstanceKey,
        info: &Arc<RevisionInfo>,
    ) -> Result<Summoned, SummonError> {
        let me = self.me.upgrade().ok_or(SummonError::ShuttingDown)?;
        let run = &info.manifest.run;
        let tender = self
            .tenders
            .read()
            .expect("tender registry lock is never poisoned")
            .get(run.tender)
            .cloned()
            .ok_or_else(|| SummonError::Start {
                key: key.to_string(),
                reason: format!("no `{:?}` tender is available", run.tender),
            })?;
        let mut table = self.table.lock().expect("table lock is never poisoned");
        if table.shutting_down {
            return Err(SummonError::ShuttingDown);
        }
        if let Some(entry) = table.by_key.get(key)
            && !entry.state.borrow().is_final()
        {
            entry
                .last_activity
                .store(self.ms_since_epoch(), Ordering::Relaxed);
            return Ok(Self::summoned(entry));
        }
        let now = Instant::now();
        if let Some(until) = table.failures.get(key).and_then(|f| f.until)
            && until > now
        {
            return Err(SummonError::Backoff {
                key: key.to_string(),
                retry_in: until - now,
            });
        }
        if table.live >= self.config.max_instances {
            return Err(SummonError::GlobalCap {
                limit: self.config.max_instances,
            });
        }
        if table.per_service.get(&key.service).copied().unwrap_or(0) >= self.config.max_per_service
        {
            return Err(SummonError::ServiceCap {
                service: key.service.clone(),
                limit: self.config.max_per_service,
            });
        }
        if key.client.is_some()
            && table.clients.get(&key.service).copied().unwrap_or(0)
                >= self.config.max_clients_per_service
        {
            return Err(SummonError::ClientCap {
                service: key.service.clone(),
                limit: self.config.max_clients_per_service,
            });
        }
        let Some(uid) = self.uids.lease() else {
            return Err(SummonError::Start {
                key: key.to_string(),
                reason: "every uid of [sandbox] uids is in use".into(),
            });
        };
        let id = self.next_id();
        let scratch = self.scratch_dir.join(&id);
        let mut busy = Vec::new();
        let mut prepared: Option<(IpAddr, Box<dyn Prepared>)> = None;
        let mut failure = None;
        for _ in 0..BIND_TRIES {
            let Some(address) = table.pool.take() else {
                break;
            };
            let spec = BootSpec {
                id: id.clone(),
                service: key.service.clone(),
                revision: key.revision,
                run: run.clone(),
                address,
                client: key.client,
                backend_port: self.config.backend_port,
                scratch: scratch.clone(),
                console_bytes: self.config.console_bytes,
                uid: uid.uid(),
            };
            match tender.prepare(spec) {
                Ok(ready) => {
                    prepared = Some((address, ready));
                    break;
                }
                Err(crate::tender::BootError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    debug!(%address, "pool address in use elsewhere, trying the next");
                    busy.push(address);
                }
                Err(error) => {
                    table.pool.give(address);
                    failure = Some(error);
                    break;
                }
            }
        }
        for address in busy {
            table.pool.give(address);
        }
        if let Some(error) = failure {
            return Err(SummonError::Start {
                key: key.to_string(),
                reason: format!("{error}: {}", error_chain(&error)),
            });
        }
        let Some((address, prepared)) = prepared else {
            return Err(SummonError::PoolExhausted);
        };
        let (commands, command_rx) = mpsc::channel(COMMANDS);
        let entry = Arc::new(Entry {
            id,
            key: key.clone(),
            address,
            port: run.port,
            backend: prepared.backend(),
            boot_timeout: Duration::from_millis(run.boot_timeout_ms),
            state: watch::channel(InstanceState::Booting).0,
            started: now,
            open: AtomicI64::new(0),
            last_activity: AtomicU64::new(self.ms_since_epoch()),
            steered: Mutex::new(None),
            commands,
            console: OnceLock::new(),
            pid: OnceLock::new(),
            counted: AtomicBool::new(true),
            reclaimed: AtomicBool::new(false),
        });
        table.by_key.insert(key.clone(), Arc::clone(&entry));
        table.by_address.insert(address, Arc::clone(&entry));
        table.live += 1;
        *table.per_service.entry(key.service.clone()).or_default() += 1;
        if key.client.is_some() {
            *table.clients.entry(key.service.clone()).or_default() += 1;
        }
        drop(table);
        self.metrics.booted();
        let summoned = Self::summoned(&entry);
        self.tasks.fetch_add(1, Ordering::AcqRel);
        debug!(instance = %key, id = entry.id, %address, backend = %entry.backend, "summoned");
        let runtime = self.runtime.clone();
        let info = Arc::clone(info);
        crate::summon::launch(move || {
            runtime.spawn(async move {
                tend(&me, &entry, prepared, &info, command_rx, scratch).await;
                // The instance has ended, every process of it with it: its uid is free.
                drop(uid);
                if me.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
                    me.tasks_done.notify_waiters();
                }
            });
        });
        Ok(summoned)
    }

    /// Makes the state final, frees the key, updates the back-off. Runs once.
    fn finish_state(&self, entry: &Entry, state: InstanceState, served: Option<Duration>) {
        let mut table = self.table.lock().expect("table lock is never poisoned");
        if entry.counted.swap(false, Ordering::AcqRel) {
            table.live -= 1;
            if let Some(count) = table.per_service.get_mut(&entry.key.service) {
                *count -= 1;
                if *count == 0 {
                    table.per_service.remove(&entry.key.service);
                }
            }
            if entry.key.client.is_some()
                && !entry.reclaimed.load(Ordering::Acquire)
                && let Some(count) = table.clients.get_mut(&entry.key.service)
            {
                *count -= 1;
                if *count == 0 {
                    table.clients.remove(&entry.key.service);
                }
            }
        }
        if table
            .by_key
            .get(&entry.key)
            .is_some_and(|e| e.id == entry.id)
        {
            table.by_key.remove(&entry.key);
        }
        let stable = Duration::from_millis(self.config.backoff.stable_after_ms);
        let now = Instant::now();
        if matches!(state, InstanceState::Crashed { .. }) {
            let quick = served.is_none_or(|served| served < stable);
            let previous = table.failures.get(&entry.key).map_or(0, |f| f.crashes);
            let crashes = if quick { previous + 1 } else { 1 };
            let until = self.config.backoff.delay(crashes).map(|delay| now + delay);
            if table.failures.len() >= FAILURE_CACHE {
                let oldest = table
                    .failures
                    .iter()
                    .min_by_key(|(_, f)| f.at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    table.failures.remove(&oldest);
                }
            }
            table.failures.insert(
                entry.key.clone(),
                Failure {
                    crashes,
                    until,
                    at: now,
                },
            );
            if let Some(until) = until {
                warn!(instance = %entry.key, crashes, retry_in = ?(until - now), "crash loop: backing off");
            }
        } else if served.is_some_and(|served| served >= stable) {
            table.failures.remove(&entry.key);
        }
        entry.state.send_replace(state);
        drop(table);
    }

    /// Frees a client slot of `service` for a new client: of its client instances that
    /// serve with no connection open, the one quiet longest is detached from its key (its
    /// client's next summon boots a new one) and stopped. A booting instance (its client is
    /// about to connect) or one with a connection open (counted by the proxy, or seen on its
    /// own socket by the kernel) keeps its slot. The stopping instance still counts against
    /// the service and global caps until it has ended. False if none qualifies.
    ///
    /// The table is scanned under its lock (this runs only while the slots are full); the
    /// kernel is asked about open connections outside it, for the quietest few candidates.
    fn reclaim_client_slot(&self, service: &str) -> bool {
        let mut candidates: Vec<(u64, Arc<Entry>)> = {
            let table = self.table.lock().expect("table lock is never poisoned");
            table
                .by_key
                .values()
                .filter(|entry| {
                    entry.key.client.is_some()
                        && entry.key.service == service
                        && entry.open.load(Ordering::Relaxed) <= 0
                        && entry.state.borrow().is_serving()
                })
                .map(|entry| {
                    (
                        entry.last_activity.load(Ordering::Relaxed),
                        Arc::clone(entry),
                    )
                })
                .collect()
        };
        candidates.sort_unstable_by_key(|(last_activity, _)| *last_activity);
        for (last_activity, entry) in candidates.into_iter().take(RECLAIM_CHECKS) {
            if connected_directly(&entry) {
                continue;
            }
            let mut table = self.table.lock().expect("table lock is never poisoned");
            // Still the quiet instance it was a moment ago, still holding its slot?
            let unchanged = table
                .by_key
                .get(&entry.key)
                .is_some_and(|e| e.id == entry.id)
                && entry.open.load(Ordering::Relaxed) <= 0
                && entry.last_activity.load(Ordering::Relaxed) == last_activity
                && entry.state.borrow().is_serving();
            if !unchanged {
                continue;
            }
            table.by_key.remove(&entry.key);
            entry.reclaimed.store(true, Ordering::Release);
            if let Some(count) = table.clients.get_mut(service) {
                *count -= 1;
                if *count == 0 {
                    table.clients.remove(service);
                }
            }
            drop(table);
            let quiet = self.ms_since_epoch().saturating_sub(last_activity);
            info!(instance = %entry.key, quiet_ms = quiet, "client slot reclaimed for a new client: stopping");
            // A full queue already holds a stop or kill.
            let _ = entry
                .commands
                .try_send(Command::Stop(StopReason::Reclaimed));
            return true;
        }
        false
    }

    fn release_address(&self, entry: &Entry) {
        let mut table = self.table.lock().expect("table lock is never poisoned");
        if table
            .by_address
            .get(&entry.address)
            .is_some_and(|e| e.id == entry.id)
        {
            table.by_address.remove(&entry.address);
            table.pool.give(entry.address);
        }
        drop(table);
    }

    async fn image_path(
        &self,
        info: &RevisionInfo,
        revision: &Revision,
    ) -> Result<PathBuf, String> {
        if let Some(path) = info.image.get() {
            return Ok(path.clone());
        }
        let store = self.store.clone();
        let revision = *revision;
        let dir = self.image_dir.clone();
        let tender = info.manifest.run.tender;
        let name = info.manifest.boot_image().to_owned();
        let path = tokio::task::spawn_blocking(move || {
            let path = store.materialize_image(&revision, &dir).map_err(|error| {
                format!(
                    "cannot materialise the image: {error}: {}",
                    error_chain(&error)
                )
            })?;
            // Deployments made before the build checked this, or pushed from elsewhere:
            // an image its tender cannot run is said so, not booted into a refusal.
            revboot_store::image::check_path(&name, tender, &path)
                .map_err(|error| error.to_string())?;
            Ok::<_, String>(path)
        })
        .await
        .map_err(|error| format!("image materialisation panicked: {error}"))??;
        let _ = info.image.set(path.clone());
        Ok(path)
    }

    async fn write_record(&self, record: RuntimeRecord, service: String) {
        let Ok(_permit) = self.log_writers.acquire().await else {
            return;
        };
        let store = self.store.clone();
        let result =
            tokio::task::spawn_blocking(move || store.append_runtime_log(&service, &record)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "cannot write the runtime record"),
            Err(error) => warn!(%error, "runtime record writer panicked"),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    if parts.is_empty() {
        "no further detail".to_owned()
    } else {
        parts.join(": ")
    }
}

fn read_error(
    service: &str,
    revision: &Revision,
    error: &revboot_store::ReadError,
) -> ResolveError {
    use revboot_store::ReadError as E;
    match error {
        E::UnknownService(_) | E::InvalidService(_) => {
            ResolveError::UnknownService(service.to_owned())
        }
        E::UnknownRevision(_) | E::NotADeployment { .. } => ResolveError::UnknownLabel {
            service: service.to_owned(),
            label: revision.short(12),
        },
        E::NoImage { .. } => ResolveError::NotBootable {
            service: service.to_owned(),
            revision: revision.short(12),
        },
        other => ResolveError::Store(format!("{other}: {}", error_chain(other))),
    }
}

/// Kills recorded processes that are still the recorded ones, then sweeps cgroups and
/// scratch directories.
fn clean_orphans(left: &[InstanceRecord], process: &ProcessTender, scratch_dir: &std::path::Path) {
    for record in left {
        let footprint = &record.footprint;
        if let (Some(pid), Some(start)) = (footprint.pid, footprint.pid_start)
            && pid_start_time(pid) == Some(start)
        {
            warn!(
                id = record.id,
                pid,
                service = record.service,
                "killing an orphaned instance"
            );
            // SAFETY: kill has no memory-safety preconditions; the start time matched.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            for _ in 0..400 {
                if pid_start_time(pid) != Some(start) || is_zombie(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for dir in &footprint.cgroups {
            if let Err(error) = revboot_sandbox::cgroup::remove_group(dir) {
                warn!(cgroup = %dir.display(), %error, "cannot remove an orphaned cgroup");
            }
        }
    }
    process.sweep_orphans();
    if let Ok(entries) = std::fs::read_dir(scratch_dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rfind(')')
                .map(|i| stat[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

enum End {
    Stopped(StopReason),
    Crashed(String),
}

/// The life of one instance, from boot to record.
async fn tend(
    deployer: &Arc<Deployer>,
    entry: &Arc<Entry>,
    prepared: Box<dyn Prepared>,
    info: &RevisionInfo,
    mut commands: mpsc::Receiver<Command>,
    scratch: PathBuf,
) {
    let run = &info.manifest.run;
    let started_at_ms = unix_ms();
    let deadline = tokio::time::Instant::from_std(entry.started + entry.boot_timeout);
    let boot_ms = entry.boot_timeout.as_millis() as u64;
    let mut ready_after = None;
    let mut running: Option<Box<dyn Running>> = None;

    let end = 'life: {
        let image = match deployer.image_path(info, &entry.key.revision).await {
            Ok(image) => image,
            Err(reason) => break 'life End::Crashed(reason),
        };
        let booted = match tokio::time::timeout_at(deadline, prepared.boot(image)).await {
            Ok(Ok(booted)) => booted,
            Ok(Err(error)) => {
                break 'life End::Crashed(format!(
                    "cannot start: {error}: {}",
                    error_chain(&error)
                ));
            }
            Err(_) => {
                break 'life End::Crashed(format!("not ready after {boot_ms} ms (still starting)"));
            }
        };
        let _ = entry.console.set(booted.console().clone());
        let footprint = booted.footprint();
        if let Some(pid) = footprint.pid {
            let _ = entry.pid.set(pid);
        }
        deployer
            .state
            .put(InstanceRecord {
                id: entry.id.clone(),
                service: entry.key.service.clone(),
                revision: entry.key.revision.to_hex(),
                client: entry.key.client,
                address: entry.address,
                started_at_ms,
                scratch: scratch.clone(),
                footprint,
            })
            .await;
        let running: &dyn Running = &**running.insert(booted);
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ready = tokio::select! {
            ready = running.ready(&run.ready, remaining) => Ok(ready),
            command = commands.recv() => Err(command),
        };
        let ready = match ready {
            Ok(ready) => ready,
            Err(command) => break 'life stop(deployer, entry, running, command).await,
        };
        if let Err(error) = ready {
            running.kill();
            // An instance that ended by itself says how.
            let reason = match (error, wait_exit(running, KILL_WAIT).await) {
                (error @ NotReady::Exited, Some(exit)) => format!("{error}: {exit}"),
                // The probe had what was left after the start; the limit is the whole.
                (NotReady::Timeout { probe, .. }, _) => {
                    NotReady::Timeout { ms: boot_ms, probe }.to_string()
                }
                (error, _) => error.to_string(),
            };
            break 'life End::Crashed(reason);
        }
        let now = Instant::now();
        ready_after = Some(now);
        deployer.metrics.became_ready(now - entry.started);
        entry.state.send_replace(InstanceState::Ready);
        debug!(instance = %entry.key, boot = ?(now - entry.started), "ready");
        deployer.steer(entry, running);
        serve(
            deployer,
            entry,
            running,
            &mut commands,
            deployer.idle_timeout(&info.manifest),
        )
        .await
    };

    // Finishing.
    entry.unsteer(&deployer.metrics);
    deployer
        .metrics
        .ended(matches!(end, End::Crashed(_)), ready_after.is_some());
    let served = ready_after.map(|at| at.elapsed());
    let exit = match &running {
        Some(running) => wait_exit(running.as_ref(), KILL_WAIT).await,
        None => None,
    };
    let state = match &end {
        End::Stopped(_) => InstanceState::Stopped,
        End::Crashed(reason) => InstanceState::Crashed {
            reason: reason.clone(),
        },
    };
    let outcome = match &end {
        End::Stopped(why) => format!("stopped: {why}"),
        End::Crashed(reason) => format!("crashed: {reason}"),
    };
    match &end {
        End::Crashed(reason) => {
            warn!(instance = %entry.key, id = entry.id, reason, "instance crashed")
        }
        End::Stopped(why) => {
            info!(instance = %entry.key, id = entry.id, %why, "instance stopped")
        }
    }
    deployer.finish_state(entry, state, served);
    if let Some(running) = &running
        && exit.is_none()
    {
        warn!(instance = %entry.key, footprint = ?running.footprint(), "instance did not report its exit");
    }
    let console = running
        .as_ref()
        .map(|r| r.console().tail())
        .unwrap_or_default();
    drop(running);
    deployer.release_address(entry);
    if exit.is_some() {
        deployer.state.delete(entry.id.clone()).await;
    }
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    let record = RuntimeRecord {
        revision: entry.key.revision,
        client: entry.key.client,
        started_at_ms,
        boot_ms: ready_after.map(|at| (at - entry.started).as_millis() as u64),
        lifetime_ms: entry.started.elapsed().as_millis() as u64,
        outcome,
        console,
    };
    deployer
        .write_record(record, entry.key.service.clone())
        .await;
}

/// Ready until an exit, a command or the idle timeout.
async fn serve(
    deployer: &Deployer,
    entry: &Entry,
    running: &dyn Running,
    commands: &mut mpsc::Receiver<Command>,
    idle_timeout: Duration,
) -> End {
    let mut exit = running.exit();
    let half = idle_timeout / 2;
    let mut steered_seen = 0;
    loop {
        // Connections the kernel handed over since the last look are activity.
        if let Some(steered) = entry.steered_connections()
            && steered != steered_seen
        {
            steered_seen = steered;
            entry
                .last_activity
                .store(deployer.ms_since_epoch(), Ordering::Relaxed);
        }
        let quiet = Duration::from_millis(
            deployer
                .ms_since_epoch()
                .saturating_sub(entry.last_activity.load(Ordering::Relaxed)),
        );
        let open = entry.open.load(Ordering::Relaxed) > 0;
        let next = if open {
            entry
                .state
                .send_if_modified(|state| set_if(state, InstanceState::Idle, InstanceState::Ready));
            idle_timeout
        } else if quiet >= idle_timeout && connected_directly(entry) {
            // Clients reach this instance's own socket, unseen: an open connection is
            // activity all the same.
            entry
                .last_activity
                .store(deployer.ms_since_epoch(), Ordering::Relaxed);
            entry
                .state
                .send_if_modified(|state| set_if(state, InstanceState::Idle, InstanceState::Ready));
            half
        } else if quiet >= idle_timeout {
            info!(instance = %entry.key, ?quiet, "idle: stopping");
            let why = StopReason::Idle(idle_timeout);
            return stop(deployer, entry, running, Some(Command::Stop(why))).await;
        } else if quiet >= half {
            entry
                .state
                .send_if_modified(|state| set_if(state, InstanceState::Ready, InstanceState::Idle));
            idle_timeout - quiet
        } else {
            half - quiet
        };
        let command = tokio::select! {
            report = exit.wait_for(Option::is_some) => {
                let report = report.ok().and_then(|report| *report).unwrap_or(ExitReport {
                    status: ExitStatus::Unknown,
                    oom_killed: false,
                });
                return End::Crashed(report.to_string());
            }
            command = commands.recv() => command,
            () = tokio::time::sleep(next.max(Duration::from_millis(5))) => continue,
        };
        return stop(deployer, entry, running, command).await;
    }
}

/// True if clients reach `entry`'s own socket (no proxy in front, or the kernel steers them
/// past it; the proxy reports its own connections) and a connection to it is open. When the
/// kernel cannot say, false: idleness is then judged by queries alone, as it is said once.
fn connected_directly(entry: &Entry) -> bool {
    let front = SocketAddr::new(entry.address, entry.port);
    if entry.backend != front && !entry.is_steered() {
        return false;
    }
    match crate::conntrack::open_connections(front) {
        Ok(open) => open > 0,
        Err(error) => {
            static WARN: std::sync::Once = std::sync::Once::new();
            WARN.call_once(|| {
                warn!(%error, "cannot count open connections (sock_diag): instances without a proxy in front are reaped by queries alone")
            });
            false
        }
    }
}

fn set_if(state: &mut InstanceState, from: InstanceState, to: InstanceState) -> bool {
    if *state == from {
        *state = to;
        true
    } else {
        false
    }
}

/// Carries out a stop or kill; a closed command queue (deployer gone) is a kill. New
/// connections stop going straight to the instance first. An instance that had already
/// ended by itself crashed, whatever command came at the same moment.
async fn stop(
    deployer: &Deployer,
    entry: &Entry,
    running: &dyn Running,
    command: Option<Command>,
) -> End {
    entry.unsteer(&deployer.metrics);
    let ended = *running.exit().borrow();
    if let Some(report) = ended {
        return End::Crashed(report.to_string());
    }
    match command {
        Some(Command::Stop(why)) => {
            running.stop();
            if wait_exit(running, deployer.config.stop_grace())
                .await
                .is_none()
            {
                debug!(instance = %entry.key, %why, "grace over: killing");
                running.kill();
            }
            End::Stopped(why)
        }
        Some(Command::Kill) => {
            running.kill();
            End::Stopped(StopReason::OperatorKill)
        }
        None => {
            running.kill();
            End::Stopped(StopReason::DeployerGone)
        }
    }
}

async fn wait_exit(running: &dyn Running, limit: Duration) -> Option<ExitReport> {
    let mut exit = running.exit();
    match tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await {
        Ok(Ok(report)) => *report,
        _ => None,
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
            Some(client.ok_or_else(|| SummonError::ClientRequired {
                service: service.to_owned(),
            })?)
        } else {
            None
        };
        let key = InstanceKey {
            service: service.to_owned(),
            revision: *revision,
            client,
        };
        self.start(key, info)
    }

    fn by_address(&self, address: IpAddr) -> Option<Summoned> {
        let table = self.table.lock().expect("table lock is never poisoned");
        table
            .by_address
            .get(&address)
            .map(|entry| Self::summoned(entry))
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

impl Entry {
    fn steered(&self) -> std::sync::MutexGuard<'_, Option<Steered>> {
        self.steered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections steered so far (a syscall), while steered.
    fn steered_connections(&self) -> Option<u64> {
        self.steered().as_ref().map(Steered::connections)
    }

    fn is_steered(&self) -> bool {
        self.steered().is_some()
    }

    /// Ends the kernel hand-off (the instance stops serving); its count goes to the metrics.
    fn unsteer(&self, metrics: &crate::metrics::Metrics) {
        let steered = self.steered().take();
        if let Some(steered) = steered {
            metrics.unsteered(steered.connections());
        }
    }
}

impl Deployer {
    /// Starts the kernel hand-off of `entry`'s warm connections, where it can.
    fn steer(&self, entry: &Entry, running: &dyn Running) {
        let Some(steering) = &self.steering else {
            return;
        };
        let IpAddr::V4(ip) = entry.address else {
            return;
        };
        let front = SocketAddrV4::new(ip, entry.port);
        if SocketAddr::V4(front) == entry.backend {
            return;
        }
        let client = match entry.key.client.map(|client| client.to_canonical()) {
            None => None,
            Some(IpAddr::V4(client)) => Some(client),
            // An IPv6 client cannot be told apart by the program: keep it behind the proxy.
            Some(IpAddr::V6(_)) => return,
        };
        let socket = match running.listener() {
            Ok(socket) => socket,
            Err(error) => {
                debug!(instance = %entry.key, %error, "no socket to steer to: relayed by the proxy");
                return;
            }
        };
        // The map holds the socket; our descriptor closes here, so the route ends by itself
        // when the instance's socket closes.
        match steering.steer(front, client, socket.as_fd()) {
            Ok(steered) => {
                debug!(instance = %entry.key, %front, "steered");
                *entry.steered() = Some(steered);
            }
            Err(error) => {
                warn!(instance = %entry.key, %error, "cannot steer: relayed by the proxy")
            }
        }
    }
}
