//! An instance's life, from boot to record: the task that tends it.
//!
//! 1. Boot: the image (from the revision cache), the tender's boot, the durable record,
//!    the readiness probe; all within the boot timeout.
//! 2. Serve: every tick, compare the last activity with the idle timeout; handle `stop`,
//!    `kill` and the instance's own exit; hand warm connections to the instance's socket in
//!    the kernel where it can (`steer`), from the boot on when its socket holds handshakes
//!    (`Running::holds_handshakes`, the process tender), else from ready on.
//! 3. Stop: a graceful stop, then a kill after the grace.
//! 4. Record: the state becomes final, the address, the durable record and the scratch
//!    directory go, and the runtime record is written to the store.
//!
//! At start-up, what an earlier daemon left running is killed (`clean_orphans`).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use revboot_store::RuntimeRecord;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::state::InstanceRecord;
use crate::summon::InstanceState;
use crate::tender::process::pid_start_time;
use crate::tender::{ExitReport, ExitStatus, NotReady, Prepared, Running, Tenders};

use super::revisions::RevisionInfo;
use super::table::{Command, Entry, StopReason};
use super::{Deployer, KILL_WAIT, error_chain, unix_ms};

pub(super) enum End {
    Stopped(StopReason),
    Crashed(String),
    /// Handed to the next daemon (the `handover` module): nothing of it is undone here.
    HandedOver(crate::tender::Handed, super::handover::Reply),
}

/// The life of one instance, from boot to record.
pub(super) async fn tend(
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
        deployer.consoles.send_modify(|n| *n += 1);
        let footprint = booted.footprint();
        if let Some(pid) = footprint.pid {
            let _ = entry.pid.set(pid);
        }
        deployer
            .state
            .put(entry.record(started_at_ms, scratch.clone(), footprint))
            .await;
        let running: &dyn Running = &**running.insert(booted);
        learn_backend(entry, running);
        if running.holds_handshakes() {
            // Its socket holds what arrives until it accepts: connections made during the
            // boot wait there, not in the proxy's relay.
            deployer.steer(entry, running);
        }
        match become_ready(
            deployer,
            entry,
            running,
            &run.ready,
            &mut commands,
            deadline,
        )
        .await
        {
            Ok(at) => ready_after = Some(at),
            Err(end) => break 'life end,
        }
        serve(
            deployer,
            entry,
            running,
            &mut commands,
            deployer.idle_timeout(&info.manifest),
        )
        .await
    };

    finish(
        deployer,
        entry,
        end,
        running,
        ready_after,
        started_at_ms,
        scratch,
    )
    .await;
}

/// The end of an instance's life (rule 4 of the module doc): state, address, durable
/// record, scratch directory, runtime record; or, for one handed to the next daemon (the
/// `handover` module), its record for the hand-over and nothing undone.
pub(super) async fn finish(
    deployer: &Arc<Deployer>,
    entry: &Arc<Entry>,
    end: End,
    running: Option<Box<dyn Running>>,
    ready_after: Option<Instant>,
    started_at_ms: u64,
    scratch: PathBuf,
) {
    let end = match end {
        End::HandedOver(handed, reply) => {
            let footprint = running.as_ref().map(|r| r.footprint()).unwrap_or_default();
            let record = entry.record(started_at_ms, scratch, footprint);
            let boot_ms = ready_after.map(|at| (at - entry.started).as_millis() as u64);
            super::handover::handed(entry, record, boot_ms, handed, reply);
            return;
        }
        end => end,
    };
    entry.unsteer(&deployer.metrics);
    deployer
        .metrics
        .ended(matches!(end, End::Crashed(_)), ready_after.is_some());
    let served = ready_after.map(|at| at.elapsed());
    let exit = match &running {
        Some(running) => wait_exit(running.as_ref(), KILL_WAIT).await,
        None => None,
    };
    let (state, outcome) = match &end {
        End::Crashed(reason) => {
            warn!(instance = %entry.key, id = entry.id, reason, "instance crashed");
            (
                InstanceState::Crashed {
                    reason: reason.clone(),
                },
                format!("crashed: {reason}"),
            )
        }
        End::Stopped(why) => {
            info!(instance = %entry.key, id = entry.id, %why, "instance stopped");
            (InstanceState::Stopped, format!("stopped: {why}"))
        }
        // Handed over above.
        End::HandedOver(..) => (InstanceState::Stopped, "stopped: handed over".to_owned()),
    };
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
        client: entry.key.client.map(|client| client.network()),
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

/// Waits until `running` is ready by `probe`, at most until `deadline`: then it is
/// `Ready` (its idle time counting from now) and warm connections go straight to it; the
/// instant it became ready. Or how its life ends: a command came first, or the probe failed
/// (the instance is killed).
pub(super) async fn become_ready(
    deployer: &Deployer,
    entry: &Entry,
    running: &dyn Running,
    probe: &revboot_store::manifest::Ready,
    commands: &mut mpsc::Receiver<Command>,
    deadline: tokio::time::Instant,
) -> Result<Instant, End> {
    let boot_ms = entry.boot_timeout.as_millis() as u64;
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let ready = tokio::select! {
        ready = running.ready(probe, remaining) => Ok(ready),
        command = commands.recv() => Err(command),
    };
    let ready = match ready {
        Ok(ready) => ready,
        Err(command) => return Err(ended_by(deployer, entry, running, command).await),
    };
    // Where it accepts connections is known once it is ready (a VM's forward whose port
    // qemu picked: learnt once it ran), before anything is relayed or steered to it.
    let ready = ready.and_then(|()| {
        learn_backend(entry, running);
        entry.backend.get().map(drop).ok_or(NotReady::NoBackend)
    });
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
        return Err(End::Crashed(reason));
    }
    let now = Instant::now();
    deployer.metrics.became_ready(now - entry.started);
    // Its idle time counts from now: a boot longer than the idle timeout (a VM under
    // TCG on a busy host) must not stop it before the client that summoned it connects.
    entry
        .last_activity
        .store(deployer.ms_since_epoch(), Ordering::Relaxed);
    entry.state.send_replace(InstanceState::Ready);
    debug!(instance = %entry.key, boot = ?(now - entry.started), "ready");
    if !entry.is_steered() {
        deployer.steer(entry, running);
    }
    Ok(now)
}

/// Records where `running` accepts connections, once its tender knows.
fn learn_backend(entry: &Entry, running: &dyn Running) {
    if let Some(backend) = running.backend()
        && !entry.backend.learn(backend)
    {
        warn!(instance = %entry.key, %backend, known = ?entry.backend.get(), "the tender moved the backend: the first address stays");
    }
}

/// The end that `command` makes: handed to the next daemon if it asks for that and the
/// tender can (the `handover` module), else stopped or killed.
async fn ended_by(
    deployer: &Deployer,
    entry: &Entry,
    running: &dyn Running,
    command: Option<Command>,
) -> End {
    if let Some(Command::HandOver(reply)) = command {
        return match running.hand_over().await {
            Some(handed) => End::HandedOver(handed, reply),
            None => {
                let _ = reply.send(None);
                let why = StopReason::Upgrade;
                stop(deployer, entry, running, Some(Command::Stop(why))).await
            }
        };
    }
    stop(deployer, entry, running, command).await
}

/// Ready until an exit, a command or the idle timeout.
pub(super) async fn serve(
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
        } else if quiet >= idle_timeout && connected_directly(entry, deployer.shares_address(entry))
        {
            // Clients reach this instance's own socket, unseen: an open connection is
            // activity all the same.
            entry
                .last_activity
                .store(deployer.ms_since_epoch(), Ordering::Relaxed);
            entry
                .state
                .send_if_modified(|state| set_if(state, InstanceState::Idle, InstanceState::Ready));
            half
        } else if quiet >= idle_timeout && entry.is_warm(deployer.ms_since_epoch()) {
            // A warm service's live instance stays booted (the `warm` module): idle, kept.
            entry
                .state
                .send_if_modified(|state| set_if(state, InstanceState::Ready, InstanceState::Idle));
            half
        } else if quiet >= idle_timeout && deployer.still_quiet(entry, idle_timeout) {
            info!(instance = %entry.key, ?quiet, "idle: stopping");
            let why = StopReason::Idle(idle_timeout);
            return stop(deployer, entry, running, Some(Command::Stop(why))).await;
        } else if quiet >= half {
            entry
                .state
                .send_if_modified(|state| set_if(state, InstanceState::Ready, InstanceState::Idle));
            // Past the timeout too when a summon came as it was about to stop.
            idle_timeout.saturating_sub(quiet)
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
        return ended_by(deployer, entry, running, command).await;
    }
}

/// True if clients reach `entry`'s own socket (no proxy in front, or the kernel steers them
/// past it; the proxy reports its own connections) and a connection to it is open. A
/// replica that `shares` its address counts only the connections its processes hold (and
/// those not accepted yet by any). When the kernel cannot say, false: idleness is then
/// judged by queries alone, as it is said once.
pub(super) fn connected_directly(entry: &Entry, shares: bool) -> bool {
    let direct = entry
        .addresses
        .with_port(entry.port)
        .any(|front| entry.backend.get() == Some(front));
    if !direct && !entry.is_steered() {
        return false;
    }
    let held = entry
        .pid
        .get()
        .filter(|_| shares)
        .map(|pid| crate::conntrack::held_sockets(*pid));
    let open = entry
        .addresses
        .with_port(entry.port)
        .try_fold(0, |open, front| {
            crate::conntrack::open_connections(front, held.as_ref()).map(|more| open + more)
        });
    match open {
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

pub(super) fn set_if(state: &mut InstanceState, from: InstanceState, to: InstanceState) -> bool {
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
pub(super) async fn stop(
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
    // Not started yet: not handed over (the `handover` module), stopped as at a shutdown.
    let command = match command {
        Some(Command::HandOver(reply)) => {
            let _ = reply.send(None);
            Some(Command::Stop(StopReason::Upgrade))
        }
        other => other,
    };
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
        Some(Command::HandOver(_)) | None => {
            running.kill();
            End::Stopped(StopReason::DeployerGone)
        }
    }
}

pub(super) async fn wait_exit(running: &dyn Running, limit: Duration) -> Option<ExitReport> {
    let mut exit = running.exit();
    match tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await {
        Ok(Ok(report)) => *report,
        _ => None,
    }
}

impl Deployer {
    pub(super) async fn write_record(&self, record: RuntimeRecord, service: String) {
        let Ok(_permit) = self.log_writers.acquire().await else {
            return;
        };
        let mut record = record;
        // A secret the instance printed stays out of the repository (crate::vars, rule 4).
        record.console = self.vars.get(&service).redact(&record.console);
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

impl Deployer {
    /// Starts the kernel hand-off of `entry`'s warm connections, where it can.
    pub(super) fn steer(&self, entry: &Entry, running: &dyn Running) {
        let Some(steering) = &self.steering else {
            return;
        };
        if !entry.reach.own_address() {
            // Reached through the proxy's front door (`reach = "front"`): its own address is
            // not one clients use. Without a front door the proxy relays it there instead.
            debug!(instance = %entry.key, "front door service: not steered");
            return;
        }
        let mut fronts: Vec<SocketAddr> = entry.addresses.with_port(entry.port).collect();
        let Some(backend) = entry.backend.get() else {
            return;
        };
        if fronts.contains(&backend) {
            return;
        }
        let client = entry.key.client;
        let socket = match running.listener() {
            Ok(socket) => socket,
            Err(error) => {
                debug!(instance = %entry.key, %error, "no socket to steer to: relayed by the proxy");
                return;
            }
        };
        // The kernel hands IPv6 connections to IPv6 sockets only: those to an instance
        // whose socket is IPv4 (a VM's port forward) stay with the proxy, which relays them.
        let local = socket2::SockRef::from(&socket).local_addr();
        if local.is_ok_and(|local| local.is_ipv4()) {
            fronts.retain(SocketAddr::is_ipv4);
            if fronts.is_empty() {
                debug!(instance = %entry.key, "IPv6 only to an IPv4 socket: relayed by the proxy");
                return;
            }
        }
        // The map holds the socket; our descriptor closes here, so the route ends by itself
        // when the instance's socket closes.
        // Replicas share their address: each is a slot of its routes, by its index.
        let slot = usize::from(entry.key.replica);
        match steering.steer(&fronts, client, slot, socket.as_fd()) {
            Ok(steered) => {
                debug!(instance = %entry.key, addresses = %entry.addresses, port = entry.port, "steered");
                *entry.steered() = Some(steered);
            }
            Err(error) => {
                warn!(instance = %entry.key, %error, "cannot steer: relayed by the proxy")
            }
        }
    }
}

/// Kills recorded processes that are still the recorded ones, then sweeps cgroups and
/// scratch directories; but not those of instances handed over to this daemon (`kept`).
pub(super) fn clean_orphans(
    left: &[InstanceRecord],
    kept: &[InstanceRecord],
    keep_dirs: &[std::path::PathBuf],
    tenders: &Tenders,
    scratch_dir: &std::path::Path,
) {
    let is_kept = |record: &InstanceRecord| kept.iter().any(|kept| kept.id == record.id);
    for record in left.iter().filter(|record| !is_kept(record)) {
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
            // The start time matched: that pid is still the recorded process.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as libc::pid_t),
                nix::sys::signal::Signal::SIGKILL,
            );
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
    let keep_cgroups: Vec<std::path::PathBuf> = kept
        .iter()
        .flat_map(|record| record.footprint.cgroups.iter().cloned())
        .collect();
    for tender in tenders.all() {
        tender.sweep_orphans(&keep_cgroups);
    }
    if let Ok(entries) = std::fs::read_dir(scratch_dir) {
        for entry in entries.flatten() {
            if !kept.iter().any(|record| record.scratch == entry.path())
                && !keep_dirs.contains(&entry.path())
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

pub(super) fn is_zombie(pid: u32) -> bool {
    revboot_sandbox::stat::read(pid).is_none_or(|stat| stat.state == 'Z')
}
