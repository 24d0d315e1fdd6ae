//! The table of instances: keys, addresses, caps and back-off.
//!
//! 1. A summon takes the table lock once: it finds a live instance of the key, or checks
//!    the back-off of a crashing key and the caps (global, per service, per client), leases
//!    a uid, takes an address, lets the tender claim the backend socket, and inserts the
//!    entry in state `booting`; then it spawns the instance's task (the `life` module).
//! 2. A full per-client service gives a new client the slot of the client instance quiet
//!    longest with no connection open.
//! 3. The end of an instance makes its state final, frees the key, updates the back-off of
//!    a crash, and gives the address back.
//! 4. Replicas (`[run] min_instances` above 1; the `warm` module boots them): a replica
//!    booted while another replica of its revision runs takes no address of its own but
//!    shares that one's (its backend socket is on the same address, another port). The
//!    entry that took the address holds it in `by_address`, the others are listed in
//!    `replicas` under it; when the holder ends, the address passes to one of them, and it
//!    goes back to the pool only with the last. Connections to the address are spread over
//!    the serving replicas ([`Deployer::spread`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use revboot_store::manifest::{Manifest, Reach};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::addresses::{Family, ServiceAddresses};
use crate::console::Console;
use crate::pool::AddressPools;
use crate::refusals;
use crate::state::InstanceRecord;
use crate::steer::Steered;
use crate::summon::{InstanceKey, InstanceState, SummonError, Summoned};
use crate::tender::{BootSpec, Footprint, Prepared};

use super::life::{connected_directly, tend};
use super::revisions::RevisionInfo;
use super::{Deployer, error_chain};

/// Crash histories kept.
pub(super) const FAILURE_CACHE: usize = 4096;
/// Commands queued per instance.
pub(super) const COMMANDS: usize = 4;
/// Tries to find a bindable address when another program holds one of the pool's.
pub(super) const BIND_TRIES: usize = 16;
/// When a per-client service's slots are full, the quietest client instances asked (one
/// `sock_diag` each) whether a connection to them is open, at most.
pub(super) const RECLAIM_CHECKS: usize = 8;

#[derive(Debug)]
pub(super) enum Command {
    Stop(StopReason),
    Kill,
    /// Hand the instance to the next daemon (an upgrade in place, the `handover` module):
    /// what it needs, or `None` when the instance was stopped instead.
    HandOver(super::handover::Reply),
}

/// Why the deployer stopped an instance. Its record says this, whatever signal ended it: an
/// image that is pid 1 of its namespace ignores SIGTERM without a handler and ends by the
/// SIGKILL after the grace, which is still the stop that was asked for, not a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
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
    /// Its service is being renamed or deleted.
    Retired,
    /// The deployer went away (its command queue closed).
    DeployerGone,
    /// Replaced after a change of the service's configuration (`revboot config --restart`).
    Restart,
    /// It failed the health check of a promotion.
    CheckFailed,
    /// The daemon was upgraded in place, and this instance could not be handed over.
    Upgrade,
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
            StopReason::Retired => f.write_str("service renamed or deleted"),
            StopReason::DeployerGone => f.write_str("deployer gone"),
            StopReason::Restart => f.write_str("restarted for a configuration change"),
            StopReason::CheckFailed => f.write_str("failed its health check"),
            StopReason::Upgrade => f.write_str("daemon upgraded; it could not be handed over"),
        }
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) key: InstanceKey,
    pub(super) addresses: ServiceAddresses,
    pub(super) port: u16,
    /// Where it accepts connections: known once it is ready at the latest.
    pub(super) backend: crate::Backend,
    /// The host uid it runs as.
    pub(super) uid: u32,
    pub(super) boot_timeout: Duration,
    pub(super) reach: Reach,
    pub(super) state: watch::Sender<InstanceState>,
    pub(super) started: Instant,
    pub(super) open: AtomicI64,
    /// Milliseconds since the deployer's epoch.
    pub(super) last_activity: AtomicU64,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) console: OnceLock<Console>,
    pub(super) pid: OnceLock<u32>,
    pub(super) counted: AtomicBool,
    /// Its client slot went to a new client: it no longer counts against the per-client cap
    /// and no longer answers for its key, and it is being stopped.
    pub(super) reclaimed: AtomicBool,
    /// A stop or kill was ordered (or its life task decided one): a summon of its key boots
    /// a new instance rather than answer with one about to end.
    pub(super) stopping: AtomicBool,
    /// The kernel hand-off while the instance is ready; only its life task sets and clears it.
    pub(super) steered: Mutex<Option<Steered>>,
    /// The daemon's end of its hand-off socket (`[run] handoff`, process tender).
    pub(super) handoff: Option<crate::Handoff>,
    /// Kept booted whatever the traffic until then (ms since the deployer's epoch;
    /// `u64::MAX`: while its revision is a warm service's live one; see the `warm` module).
    pub(super) warm_until: AtomicU64,
    /// True once its task has ended, runtime record written ([`Deployer::retire`] waits
    /// for it).
    pub(super) ended: watch::Sender<bool>,
}

impl Entry {
    /// Orders a stop or kill: from now on a summon of its key boots a new instance. A full
    /// queue already holds a stop or kill.
    pub(super) fn order(&self, command: Command) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.commands.try_send(command);
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Failure {
    pub(super) crashes: u32,
    pub(super) until: Option<Instant>,
    pub(super) at: Instant,
}

#[derive(Debug)]
pub(super) struct Table {
    pub(super) by_key: HashMap<InstanceKey, Arc<Entry>>,
    pub(super) by_address: HashMap<IpAddr, Arc<Entry>>,
    /// The replicas sharing an address another entry holds, by its primary address (rule 4).
    pub(super) replicas: HashMap<IpAddr, Vec<Arc<Entry>>>,
    pub(super) per_service: HashMap<String, usize>,
    pub(super) clients: HashMap<String, usize>,
    pub(super) live: usize,
    pub(super) pool: AddressPools,
    pub(super) failures: HashMap<InstanceKey, Failure>,
    pub(super) shutting_down: bool,
    /// Services being renamed or deleted: no summon boots them ([`Deployer::retire`]).
    pub(super) retiring: HashSet<String>,
}

impl Table {
    /// Every entry once (an entry is in `by_address` under each of its addresses, or in
    /// `replicas` once).
    pub(super) fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.by_address
            .iter()
            .filter(|(address, entry)| entry.addresses.primary() == **address)
            .map(|(_, entry)| entry)
            .chain(self.replicas.values().flatten())
    }

    /// The addresses a replica of `key` that is not final runs on, to share (rule 4); at
    /// most `replicas` replicas are looked at.
    pub(super) fn replica_addresses(
        &self,
        key: &InstanceKey,
        replicas: u16,
    ) -> Option<ServiceAddresses> {
        (0..replicas)
            .filter(|replica| *replica != key.replica)
            .filter_map(|replica| self.by_key.get(&key.with_replica(replica)))
            .find(|entry| !entry.state.borrow().is_final())
            .map(|entry| entry.addresses)
    }
}

impl Entry {
    pub(super) fn steered(&self) -> std::sync::MutexGuard<'_, Option<Steered>> {
        self.steered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections steered so far (a syscall), while steered.
    pub(super) fn steered_connections(&self) -> Option<u64> {
        self.steered().as_ref().map(Steered::connections)
    }

    /// Its durable record, as the state keeps it while it runs.
    pub(super) fn record(
        &self,
        started_at_ms: u64,
        scratch: std::path::PathBuf,
        footprint: Footprint,
    ) -> InstanceRecord {
        InstanceRecord {
            id: self.id.clone(),
            service: self.key.service.clone(),
            revision: self.key.revision.to_hex(),
            client: self.key.client.map(|client| client.network()),
            replica: self.key.replica,
            address: self.addresses.primary(),
            started_at_ms,
            scratch,
            footprint,
        }
    }

    /// True while idle reaping passes it by (the `warm` module).
    pub(super) fn is_warm(&self, now_ms: u64) -> bool {
        now_ms < self.warm_until.load(Ordering::Relaxed)
    }

    pub(super) fn is_steered(&self) -> bool {
        self.steered().is_some()
    }

    /// Ends the kernel hand-off (the instance stops serving); its count goes to the metrics.
    pub(super) fn unsteer(&self, metrics: &crate::metrics::Metrics) {
        let steered = self.steered().take();
        if let Some(steered) = steered {
            metrics.unsteered(steered.connections());
        }
    }
}

impl Deployer {
    pub(super) fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub(super) fn summoned(entry: &Entry) -> Summoned {
        Summoned {
            key: entry.key.clone(),
            addresses: entry.addresses,
            port: entry.port,
            backend: entry.backend.clone(),
            boot_timeout: entry.boot_timeout,
            reach: entry.reach,
            state: entry.state.subscribe(),
        }
    }

    pub(super) fn idle_timeout(&self, manifest: &Manifest) -> Duration {
        match self.config.idle_timeout_override_ms {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_secs(manifest.run.idle_timeout_secs),
        }
    }

    /// Summons `key`: when a per-client service's client slots are full, once more after
    /// one is reclaimed ([`Deployer::reclaim_client_slot`]). Refusals that last are logged
    /// here, once per service per [`refusals::WINDOW`].
    pub(super) fn start(
        &self,
        key: InstanceKey,
        info: Arc<RevisionInfo>,
    ) -> Result<Summoned, SummonError> {
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

    pub(super) fn try_start(
        &self,
        key: &InstanceKey,
        info: &Arc<RevisionInfo>,
    ) -> Result<Summoned, SummonError> {
        let me = self.me.upgrade().ok_or(SummonError::ShuttingDown)?;
        let run = &info.manifest.run;
        let tender = self
            .tenders
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
        if table.retiring.contains(&key.service) {
            return Err(SummonError::Retiring {
                service: key.service.clone(),
            });
        }
        if let Some(entry) = table.by_key.get(key)
            && !entry.state.borrow().is_final()
            && !entry.stopping.load(Ordering::Acquire)
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
        let spec = BootSpec {
            id: id.clone(),
            service: key.service.clone(),
            revision: key.revision,
            run: run.clone(),
            // Set by `prepare` below.
            addresses: ServiceAddresses::one(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            client: key.client,
            backend_port: self.config.backend_port,
            scratch: scratch.clone(),
            console_bytes: self.config.console_bytes,
            uid: uid.uid(),
            vars: self.vars.get(&key.service),
        };
        let shared = table.replica_addresses(key, self.replicas(run));
        let (addresses, prepared) = match shared {
            Some(addresses) => {
                let spec = BootSpec { addresses, ..spec };
                let prepared = tender.prepare(spec).map_err(|error| SummonError::Start {
                    key: key.to_string(),
                    reason: format!("{error}: {}", error_chain(&error)),
                })?;
                (addresses, prepared)
            }
            None => self.prepare(&mut table, &*tender, spec, key)?,
        };
        let (commands, command_rx) = mpsc::channel(COMMANDS);
        let entry = Arc::new(Entry {
            id,
            key: key.clone(),
            addresses,
            port: run.port,
            backend: prepared
                .backend()
                .map_or_else(crate::Backend::later, crate::Backend::known),
            uid: uid.uid(),
            boot_timeout: Duration::from_millis(run.boot_timeout_ms),
            reach: run.reach,
            state: watch::channel(InstanceState::Booting).0,
            started: now,
            open: AtomicI64::new(0),
            last_activity: AtomicU64::new(self.ms_since_epoch()),
            steered: Mutex::new(None),
            handoff: prepared.handoff(),
            warm_until: AtomicU64::new(0),
            commands,
            console: OnceLock::new(),
            pid: OnceLock::new(),
            counted: AtomicBool::new(true),
            reclaimed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            ended: watch::channel(false).0,
        });
        table.by_key.insert(key.clone(), Arc::clone(&entry));
        if shared.is_some() {
            table
                .replicas
                .entry(addresses.primary())
                .or_default()
                .push(Arc::clone(&entry));
        } else {
            for address in addresses.iter() {
                table.by_address.insert(address, Arc::clone(&entry));
            }
        }
        table.live += 1;
        *table.per_service.entry(key.service.clone()).or_default() += 1;
        if key.client.is_some() {
            *table.clients.entry(key.service.clone()).or_default() += 1;
        }
        drop(table);
        self.metrics.booted();
        let summoned = Self::summoned(&entry);
        self.tasks.fetch_add(1, Ordering::AcqRel);
        debug!(instance = %key, id = entry.id, %addresses, backend = ?entry.backend.get(), "summoned");
        let runtime = self.runtime.clone();
        let info = Arc::clone(info);
        crate::summon::launch(move || {
            runtime.spawn(async move {
                tend(&me, &entry, prepared, &info, command_rx, scratch).await;
                // The instance has ended, every process of it with it: its uid is free.
                drop(uid);
                entry.ended.send_replace(true);
                if me.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
                    me.tasks_done.notify_waiters();
                }
            });
        });
        Ok(summoned)
    }

    /// Makes the state final, frees the key, updates the back-off. Runs once.
    pub(super) fn finish_state(
        &self,
        entry: &Entry,
        state: InstanceState,
        served: Option<Duration>,
    ) {
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
    pub(super) fn reclaim_client_slot(&self, service: &str) -> bool {
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
            // A per-client instance has its address to itself.
            if connected_directly(&entry, false) {
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
            entry.order(Command::Stop(StopReason::Reclaimed));
            return true;
        }
        false
    }

    /// Whether `entry` is still quiet for `idle_timeout`, looked at under the table lock
    /// that summons take (they note their activity under it); if so it is marked stopping
    /// there, so a summon either came first and keeps it or comes after and boots anew,
    /// never answering with an instance about to end.
    pub(super) fn still_quiet(&self, entry: &Entry, idle_timeout: Duration) -> bool {
        let _table = self.table.lock().expect("table lock is never poisoned");
        let quiet = self
            .ms_since_epoch()
            .saturating_sub(entry.last_activity.load(Ordering::Relaxed));
        let still = u128::from(quiet) >= idle_timeout.as_millis();
        if still {
            entry.stopping.store(true, Ordering::Release);
        }
        still
    }

    /// Gives `entry`'s addresses back to the pool, or to a replica still on them (rule 4).
    pub(super) fn release_address(&self, entry: &Entry) {
        let mut table = self.table.lock().expect("table lock is never poisoned");
        let primary = entry.addresses.primary();
        let holder = table
            .by_address
            .get(&primary)
            .is_some_and(|e| e.id == entry.id);
        if let Some(sharing) = table.replicas.get_mut(&primary) {
            let next = if holder {
                Some(sharing.remove(0))
            } else {
                sharing.retain(|e| e.id != entry.id);
                None
            };
            if sharing.is_empty() {
                table.replicas.remove(&primary);
            }
            if let Some(next) = next {
                for address in entry.addresses.iter() {
                    table.by_address.insert(address, Arc::clone(&next));
                }
            }
            return;
        }
        for address in entry.addresses.iter() {
            if table
                .by_address
                .get(&address)
                .is_some_and(|e| e.id == entry.id)
            {
                table.by_address.remove(&address);
                table.pool.give(address);
            }
        }
        drop(table);
    }

    /// Takes a service address of each family the service is served on and lets the tender
    /// claim the backend socket on the primary one; an address another program holds is
    /// skipped (up to [`BIND_TRIES`] of them). Every address goes back on failure.
    fn prepare(
        &self,
        table: &mut Table,
        tender: &dyn crate::tender::Tender,
        mut spec: BootSpec,
        key: &InstanceKey,
    ) -> Result<(ServiceAddresses, Box<dyn Prepared>), SummonError> {
        let no_pool = |family| SummonError::NoPool {
            service: key.service.clone(),
            family,
        };
        let served = tender.families();
        let asked: Vec<Family> = if spec.run.families.is_empty() {
            let families: Vec<Family> = table
                .pool
                .families()
                .iter()
                .copied()
                .filter(|family| served.contains(family))
                .collect();
            if families.is_empty() {
                return Err(no_pool(served[0]));
            }
            families
        } else {
            let asked: Vec<Family> = spec.run.families.iter().map(|f| Family::from(*f)).collect();
            if let Some(family) = asked.iter().find(|family| !served.contains(family)) {
                return Err(SummonError::Start {
                    key: key.to_string(),
                    reason: format!("the {:?} tender cannot serve on {family}", spec.run.tender),
                });
            }
            asked
        };
        // The backend socket is bound on the IPv6 address when there is one.
        let (primary, secondary) = match asked.as_slice() {
            [one] => (*one, None),
            _ => (Family::Ipv6, Some(Family::Ipv4)),
        };
        if let Some(family) = asked.iter().find(|f| !table.pool.families().contains(f)) {
            return Err(no_pool(*family));
        }
        let other = match secondary {
            Some(family) => Some(table.pool.take(family).ok_or(SummonError::PoolExhausted)?),
            None => None,
        };
        let mut busy = Vec::new();
        let mut outcome = Err(SummonError::PoolExhausted);
        for _ in 0..BIND_TRIES {
            let Some(address) = table.pool.take(primary) else {
                break;
            };
            let addresses = match other {
                Some(other) => ServiceAddresses::one(other).with(address),
                None => ServiceAddresses::one(address),
            };
            spec.addresses = addresses;
            match tender.prepare(spec.clone()) {
                Ok(prepared) => {
                    outcome = Ok((addresses, prepared));
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
                    outcome = Err(SummonError::Start {
                        key: key.to_string(),
                        reason: format!("{error}: {}", error_chain(&error)),
                    });
                    break;
                }
            }
        }
        for address in busy {
            table.pool.give(address);
        }
        if outcome.is_err()
            && let Some(other) = other
        {
            table.pool.give(other);
        }
        outcome
    }
}
