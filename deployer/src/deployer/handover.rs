//! An upgrade in place: running instances go to the next daemon, untouched.
//!
//! The old daemon, [`Deployer::hand_over`]:
//!
//! 1. refuses new summons and asks every instance's task to hand its instance over;
//! 2. a started instance (serving, or booting with its process running) whose tender can
//!    hand it over (the process and qemu tenders) stops being watched: its console pipe's
//!    descriptor, its console tail, its durable record and what its tender needs besides
//!    (a VM's QMP socket, a restored VM's own scratch directory and uid, an instance's
//!    upstream grants with their connections, the daemon end of its hand-off socket) go
//!    into a [`HandedInstance`]. Its kernel
//!    route stays until the exec ends the program. One still starting (no process yet: a
//!    VM being restored, an image being unpacked) reads the request once its boot
//!    returns and is handed over then, booting: the old daemon waits for it, within the
//!    hand-over's limit;
//! 3. one that cannot (its tender cannot, or its grants did not stop in time) is stopped
//!    as at a shutdown (`stopped: daemon upgraded; it could not be handed over`), its
//!    record written; the qemu tender's waiting qemu processes are killed;
//! 4. the spare cgroups go and the durable state is flushed; the pools' `local` routes stay
//!    (the next daemon takes them over, as it does a killed one's). The daemon then executes its
//!    new binary, keeping the descriptors ([`revboot_sandbox::parent::exec`]): the instances
//!    are still children of its main thread.
//!
//! The next daemon, [`Deployer::with_handover`]:
//!
//! 5. leaves the handed instances out of its start-up clean-up (their processes, cgroups,
//!    scratch directories and durable records stay) and takes each back — its uid, its
//!    address, its console, its hand-off socket, the state `ready`, or `booting` with its readiness probe run
//!    again within what is left of its boot timeout — through its tender
//!    ([`Tender::adopt`]). Its task goes on from there: steering (at once for a booting
//!    instance whose socket holds handshakes, as from a spawn; else once ready), idle
//!    reaping, stops, its record at the end.
//! 6. One whose revision or descriptor cannot be read, or that its tender cannot take
//!    back, is killed and cleaned up, and boots again on demand.
//!
//! [`Tender::adopt`]: crate::tender::Tender::adopt

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use revboot_store::Revision;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::life::{End, become_ready, finish, serve};
use super::table::{COMMANDS, Command, Entry};
use super::{Deployer, error_chain, unix_ms};
use crate::addresses::{ClientNet, ServiceAddresses};
use crate::state::InstanceRecord;
use crate::summon::{InstanceKey, InstanceState};
use crate::tender::{Adopted, Handed};

/// The answer to [`Command::HandOver`].
pub(super) type Reply = oneshot::Sender<Option<(HandedInstance, Vec<OwnedFd>)>>;

/// One running instance, as the old daemon hands it to the next (module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedInstance {
    /// Its durable record: id, key, address, process, cgroups, scratch directory.
    pub record: InstanceRecord,
    /// Its service addresses (one per family served).
    pub addresses: Vec<IpAddr>,
    /// The prefix length of its client's network (a per-client instance).
    pub client_len: Option<u8>,
    /// The port clients connect to.
    pub port: u16,
    /// Where it accepts connections; port 0 while it was not known yet (a VM handed over
    /// before qemu said which port its forward bound: the next daemon learns it again).
    pub backend: SocketAddr,
    /// The host uid it runs as.
    pub uid: u32,
    /// The descriptor number of its console pipe, kept across the exec.
    pub console: i32,
    /// Its console's kept tail, hex.
    pub console_tail: String,
    /// Its boot, from summon to ready; `None` while it was still booting (its probe not
    /// passed yet).
    pub boot_ms: Option<u64>,
    /// What its tender handed over of its own (`Handed::tender`).
    #[serde(default)]
    pub tender: serde_json::Value,
    /// Directories of its tender's own that the start-up clean-up leaves.
    #[serde(default)]
    pub keep: Vec<std::path::PathBuf>,
    /// The descriptor number of the daemon's end of its hand-off socket (`[run] handoff`),
    /// kept across the exec; `None` without one (or from a program older than this field).
    #[serde(default)]
    pub handoff: Option<i32>,
}

/// What [`Deployer::hand_over`] gives the daemon to pass on: the instances and the
/// descriptors to keep open across the exec.
#[derive(Debug, Default)]
pub struct Handover {
    /// The instances handed over.
    pub instances: Vec<HandedInstance>,
    /// Their console pipes, the daemon ends of their hand-off sockets, and what their
    /// tenders keep besides (upstream grants' sockets).
    pub fds: Vec<OwnedFd>,
}

/// An instance's task hands it over (rule 2).
pub(super) fn handed(
    entry: &Entry,
    record: InstanceRecord,
    boot_ms: Option<u64>,
    handed: Handed,
    reply: Reply,
) {
    let mut fds = handed.fds;
    // Without a second descriptor of it, the next daemon relays its connections instead.
    let handoff = entry
        .handoff
        .as_ref()
        .and_then(|handoff| match handoff.try_clone_fd() {
            Ok(fd) => Some(fd),
            Err(error) => {
                warn!(id = entry.id, %error, "cannot keep its hand-off socket for the next daemon");
                None
            }
        });
    let instance = HandedInstance {
        record,
        addresses: entry.addresses.iter().collect(),
        client_len: entry.key.client.map(|client| client.len()),
        port: entry.port,
        backend: entry
            .backend
            .get()
            .unwrap_or_else(|| SocketAddr::new(entry.addresses.primary(), 0)),
        uid: entry.uid,
        console: handed.console.as_raw_fd(),
        console_tail: hex::encode(&handed.tail),
        boot_ms,
        tender: handed.tender,
        keep: handed.keep,
        handoff: handoff.as_ref().map(AsRawFd::as_raw_fd),
    };
    fds.push(handed.console);
    fds.extend(handoff);
    let _ = reply.send(Some((instance, fds)));
}

impl Deployer {
    /// Hands every instance that can be over, stops the others (rules 1 to 4), within
    /// `limit`. Summons fail with [`crate::SummonError::ShuttingDown`] from now on.
    pub async fn hand_over(&self, limit: Duration) -> Handover {
        let entries: Vec<Arc<Entry>> = {
            let mut table = self.table.lock().expect("table lock is never poisoned");
            table.shutting_down = true;
            table.entries().cloned().collect()
        };
        let mut asked = Vec::new();
        for entry in &entries {
            let (reply, answer) = oneshot::channel();
            // A full queue already holds a stop or kill: that instance is on its way out.
            if entry.commands.try_send(Command::HandOver(reply)).is_ok() {
                asked.push(answer);
            }
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut handover = Handover::default();
        for answer in asked {
            if let Ok(Ok(Some((instance, fds)))) = tokio::time::timeout_at(deadline, answer).await {
                handover.instances.push(instance);
                handover.fds.extend(fds);
            }
        }
        // Those stopped instead finish, their records written, before the exec.
        self.wind_down(deadline, "hand-over").await;
        info!(
            handed = handover.instances.len(),
            asked = entries.len(),
            "instances handed over"
        );
        handover
    }

    /// Takes back the instances the previous daemon handed over (rules 5 and 6); how many.
    pub(super) fn adopt_all(self: &Arc<Self>, handed: Vec<HandedInstance>) -> usize {
        let mut adopted = 0;
        for instance in handed {
            match self.adopt(&instance) {
                Ok(()) => adopted += 1,
                Err(why) => {
                    warn!(
                        id = instance.record.id,
                        why, "cannot take back a handed-over instance: killing it"
                    );
                    self.discard(&instance);
                }
            }
        }
        if adopted > 0 {
            info!(adopted, "took back the instances of the previous daemon");
        }
        adopted
    }

    fn adopt(self: &Arc<Self>, instance: &HandedInstance) -> Result<(), String> {
        let record = &instance.record;
        let console = revboot_sandbox::parent::take_fd(instance.console)
            .map_err(|error| format!("its console pipe: {error}"))?;
        // Taken at once, so that it is closed if the instance cannot be taken back.
        let handoff = instance.handoff.and_then(|fd| {
            match revboot_sandbox::parent::take_fd(fd) {
                Ok(fd) => Some(crate::Handoff::from_fd(fd)),
                Err(error) => {
                    warn!(id = record.id, %error, "its hand-off socket is lost: its connections are relayed");
                    None
                }
            }
        });
        let revision: Revision = record
            .revision
            .parse()
            .map_err(|_| format!("bad revision `{}`", record.revision))?;
        let info = self
            .revision_info(&record.service, &revision)
            .map_err(|error| error.to_string())?;
        let run = &info.manifest.run;
        let tender = self
            .tenders
            .get(run.tender)
            .cloned()
            .ok_or_else(|| format!("no `{:?}` tender", run.tender))?;
        let uid = self
            .uids
            .lease_exact(instance.uid)
            .ok_or_else(|| format!("uid {} is not free", instance.uid))?;
        let running = tender
            .adopt(Adopted {
                backend: instance.backend,
                footprint: record.footprint.clone(),
                console,
                tail: hex::decode(&instance.console_tail).unwrap_or_default(),
                console_bytes: self.config.console_bytes,
                tender: instance.tender.clone(),
            })
            .map_err(|error| format!("{error}: {}", error_chain(&error)))?;
        let key = InstanceKey {
            service: record.service.clone(),
            revision,
            client: record
                .client
                .map(|network| ClientNet::new(network, instance.client_len.unwrap_or(128))),
            replica: record.replica,
        };
        let addresses = instance
            .addresses
            .iter()
            .fold(ServiceAddresses::one(record.address), |all, a| all.with(*a));
        let booting = instance.boot_ms.is_none();
        let now = Instant::now();
        let age = Duration::from_millis(unix_ms().saturating_sub(record.started_at_ms));
        let started = now.checked_sub(age).unwrap_or(now);
        let (commands, mut command_rx) = mpsc::channel(COMMANDS);
        let entry = Arc::new(Entry {
            id: record.id.clone(),
            key: key.clone(),
            addresses,
            port: instance.port,
            backend: match instance.backend.port() {
                0 => crate::Backend::later(),
                _ => crate::Backend::known(instance.backend),
            },
            uid: instance.uid,
            boot_timeout: Duration::from_millis(run.boot_timeout_ms),
            reach: run.reach,
            state: watch::channel(if booting {
                InstanceState::Booting
            } else {
                InstanceState::Ready
            })
            .0,
            started,
            open: AtomicI64::new(0),
            last_activity: AtomicU64::new(self.ms_since_epoch()),
            commands,
            console: OnceLock::from(running.console().clone()),
            pid: record.footprint.pid.map(OnceLock::from).unwrap_or_default(),
            counted: AtomicBool::new(true),
            reclaimed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            steered: Mutex::new(None),
            handoff,
            warm_until: AtomicU64::new(0),
            ended: watch::channel(false).0,
        });
        {
            let mut table = self.table.lock().expect("table lock is never poisoned");
            // A replica on the address of another replica of its revision adopted before it
            // shares it, as when it was booted (the `table` module's rule 4).
            let shared = table
                .by_address
                .get(&addresses.primary())
                .is_some_and(|holder| {
                    holder.addresses == addresses
                        && holder.key.with_replica(key.replica) == key
                        && holder.key.replica != key.replica
                });
            let taken = table.by_key.contains_key(&key)
                || (!shared && addresses.iter().any(|a| table.by_address.contains_key(&a)));
            if taken {
                return Err(format!("{key} or {addresses} is taken"));
            }
            if shared {
                table
                    .replicas
                    .entry(addresses.primary())
                    .or_default()
                    .push(Arc::clone(&entry));
                table.by_key.insert(key.clone(), Arc::clone(&entry));
                table.live += 1;
                *table.per_service.entry(key.service.clone()).or_default() += 1;
            }
            let mut claimed = Vec::new();
            for address in addresses.iter().filter(|_| !shared) {
                if !table.pool.claim(address) {
                    for address in claimed {
                        table.pool.give(address);
                    }
                    return Err(format!("{address} is not a free address of the pools"));
                }
                claimed.push(address);
            }
            if !shared {
                table.by_key.insert(key.clone(), Arc::clone(&entry));
                for address in addresses.iter() {
                    table.by_address.insert(address, Arc::clone(&entry));
                }
                table.live += 1;
                *table.per_service.entry(key.service.clone()).or_default() += 1;
                if key.client.is_some() {
                    *table.clients.entry(key.service.clone()).or_default() += 1;
                }
            }
        }
        self.tasks.fetch_add(1, Ordering::AcqRel);
        let me = Arc::clone(self);
        let ready_after = instance
            .boot_ms
            .and_then(|ms| started.checked_add(Duration::from_millis(ms)));
        let (started_at_ms, scratch) = (record.started_at_ms, record.scratch.clone());
        self.runtime.spawn(async move {
            let mut ready_after = ready_after;
            let end: End = 'life: {
                if booting {
                    if running.holds_handshakes() {
                        // As from its spawn (the `life` module): its socket holds what
                        // arrives while it boots, so connections go there from now on, not
                        // through the proxy's relay until it is ready.
                        me.steer(&entry, running.as_ref());
                    }
                    // Its probe goes on here, within what is left of its boot timeout.
                    let deadline =
                        tokio::time::Instant::from_std(entry.started + entry.boot_timeout);
                    let probe = &info.manifest.run.ready;
                    let ready = become_ready(
                        &me,
                        &entry,
                        running.as_ref(),
                        probe,
                        &mut command_rx,
                        deadline,
                    );
                    match ready.await {
                        Ok(at) => ready_after = Some(at),
                        Err(end) => break 'life end,
                    }
                } else {
                    me.steer(&entry, running.as_ref());
                }
                let idle = me.idle_timeout(&info.manifest);
                serve(&me, &entry, running.as_ref(), &mut command_rx, idle).await
            };
            finish(
                &me,
                &entry,
                end,
                Some(running),
                ready_after,
                started_at_ms,
                scratch,
            )
            .await;
            drop(uid);
            entry.ended.send_replace(true);
            if me.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
                me.tasks_done.notify_waiters();
            }
        });
        Ok(())
    }

    /// Kills an instance that could not be taken back and removes what it holds (rule 6).
    fn discard(&self, instance: &HandedInstance) {
        let record = &instance.record;
        if let Some(pid) = record.footprint.pid
            && crate::tender::process::pid_start_time(pid) == record.footprint.pid_start
        {
            revboot_sandbox::spawn::kill(pid, libc::SIGKILL);
            // It is this process's child: reap it, so that it leaves no zombie.
            if let Ok(pidfd) = revboot_sandbox::spawn::pidfd_open(pid) {
                self.runtime.spawn_blocking(move || {
                    let _ = revboot_sandbox::spawn::reap_blocking(pidfd.as_raw_fd());
                });
            }
        }
        for dir in &record.footprint.cgroups {
            if let Err(error) = revboot_sandbox::cgroup::remove_group(dir) {
                warn!(cgroup = %dir.display(), %error, "cannot remove a cgroup");
            }
        }
        let _ = std::fs::remove_dir_all(&record.scratch);
        for dir in &instance.keep {
            let _ = std::fs::remove_dir_all(dir);
        }
        let state = self.state.clone();
        let id = record.id.clone();
        self.runtime.spawn(async move { state.delete(id).await });
    }
}
