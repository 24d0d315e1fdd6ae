//! The supervisor of a qemu instance: one task owns the child until it is reaped.
//!
//! 1. It holds a QMP session (the `qmp` module; `<scratch>/qmp.sock`, made by qemu inside
//!    its sandbox) to learn why the guest stopped (the reason goes on the console), to stop
//!    it, and to save its snapshot (the `snapshot` module). As the session comes up, it
//!    asks which port the forward bound when that is not known yet (the `forward` module),
//!    then says it is attached.
//! 2. Stop: QMP `quit` (SIGTERM when QMP is not up). Kill: SIGKILL.
//! 3. Once qemu is reaped and its output drained, its cgroups are removed (an OOM kill read
//!    first), the exit is reported, the QMP socket removed, and a restored qemu's own
//!    scratch directory and uid given back.
//! 4. Hand-over (an upgrade in place): the console pump gives its pipe back, the QMP
//!    session is closed (qemu listens for the next one), and the supervisor ends there,
//!    undoing nothing; the next daemon's supervisor takes qemu back (`QemuTender::adopt`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use revboot_sandbox::cgroup::InstanceGroups;
use revboot_sandbox::spawn::{self, Exit};
use revboot_sandbox::uids::Lease;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::forward;
use super::jail::Jail;
use super::qmp::{Qmp, qmp_connect};
use super::snapshot::{self, Found, SavePlan};
use super::{CONSOLE_DRAIN, QMP_DRAIN, QMP_REPLY_TIMEOUT};
use crate::console::Console;
use crate::tender::{ExitReport, ExitStatus};

/// What `stop`, `kill` and a snapshot ask of the supervisor.
#[derive(Debug)]
pub(super) enum Control {
    Stop,
    Kill,
    /// Save a snapshot of the guest; the snapshot, or why not.
    Snapshot(SavePlan, oneshot::Sender<Result<Found, String>>),
    /// Stop supervising and hand qemu to the next daemon (rule 4); `None` if its console
    /// pipe cannot be had (qemu is ending).
    HandOver(oneshot::Sender<Option<Handing>>),
}

/// What the supervisor hands to the next daemon's (rule 4).
#[derive(Debug)]
pub(super) struct Handing {
    /// The read end of qemu's console pipe.
    pub(super) console: OwnedFd,
    /// The QMP socket on the host.
    pub(super) qmp: PathBuf,
    /// qemu's own scratch directory (a restored one's).
    pub(super) scratch: Option<PathBuf>,
    /// qemu's own uid (a restored one's).
    pub(super) uid: Option<u32>,
}

/// Asks the console pump for its pipe (rule 4).
pub(super) type PumpHandOver = oneshot::Sender<oneshot::Sender<Option<OwnedFd>>>;

/// Everything the supervisor owns.
pub(super) struct Supervised {
    pub(super) id: String,
    /// Where the forward listens, once known; shared with the instance.
    pub(super) backend: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    /// The forward's host address.
    pub(super) host: std::net::Ipv4Addr,
    /// Set once QMP is up or given up on (and the forward's port learnt, or not).
    pub(super) attached: watch::Sender<bool>,
    /// Keeps the thread that started qemu alive while qemu runs: qemu's parent-death
    /// signal follows that thread.
    pub(super) _jail: Arc<Jail>,
    pub(super) pidfd: Arc<OwnedFd>,
    pub(super) groups: Option<InstanceGroups>,
    pub(super) pid: u32,
    /// The QMP session, when the qemu came with one (a restore).
    pub(super) session: Option<Qmp>,
    pub(super) qmp: PathBuf,
    /// qemu's own scratch directory (a restored one's), removed once it has ended.
    pub(super) scratch: Option<PathBuf>,
    /// qemu's own uid (a restored one's), given back once it has ended.
    pub(super) _lease: Option<Lease>,
    pub(super) console: Console,
    /// Where qemu's version goes once QMP's greeting said it (the tender's).
    pub(super) version: Arc<std::sync::OnceLock<String>>,
    pub(super) control: mpsc::Receiver<Control>,
    pub(super) exit: watch::Sender<Option<ExitReport>>,
    /// The console pump.
    pub(super) reader: tokio::task::JoinHandle<()>,
    /// Asks the console pump for its pipe.
    pub(super) reader_handover: Option<PumpHandOver>,
}

/// How long the console pump may take to give its pipe back.
const PUMP_HAND_OVER: std::time::Duration = std::time::Duration::from_secs(2);

/// Owns the qemu child until it is reaped: QMP events and stop requests, kill, exit.
pub(super) async fn supervise(mut s: Supervised) {
    let connect = qmp_connect(s.qmp.clone());
    tokio::pin!(connect);
    // A blocking wait on a thread of its own returns when qemu is gone, whoever ended it.
    let waited = Arc::clone(&s.pidfd);
    let mut ended = tokio::task::spawn_blocking(move || spawn::reap_blocking(waited.as_raw_fd()));
    let mut qmp: Option<Qmp> = s.session.take();
    let mut connecting = qmp.is_none();
    if !connecting {
        let _ = s.attached.send(true);
    }
    let mut stopping = false;
    let mut guest_stopped = false;
    let status = loop {
        tokio::select! {
            status = &mut ended => break match status {
                Ok(Ok(Some(exit))) => Some(exit),
                _ => None,
            },
            session = &mut connect, if connecting => {
                connecting = false;
                match session {
                    // A stop asked for meanwhile was already a SIGTERM.
                    Ok(mut session) => {
                        let _ = s.version.set(session.version().to_owned());
                        // qemu has read the guest's variables.
                        super::pool::forget_env(&s.qmp);
                        if s.backend.get().is_none() {
                            match forward::learn(&mut session, s.host).await {
                                Ok(backend) => {
                                    let _ = s.backend.set(backend);
                                }
                                Err(error) => {
                                    warn!(id = s.id, error, "where the qemu forward listens is unknown");
                                }
                            }
                        }
                        qmp = Some(session);
                    }
                    Err(error) => {
                        warn!(id = s.id, %error, "qemu QMP unreachable; stop falls back to SIGTERM");
                    }
                }
                let _ = s.attached.send(true);
            }
            event = next_event(&mut qmp) => match event {
                Some(event) => guest_stopped |= note_event(&s.console, &event),
                None => qmp = None,
            },
            control = s.control.recv() => match control {
                Some(Control::Stop) if !stopping => {
                    stopping = true;
                    if qmp.is_some() {
                        quit(&mut qmp, &s.pidfd).await;
                    } else {
                        // qemu quits as cleanly on SIGTERM; QMP may still be on its way.
                        spawn::send_signal(s.pidfd.as_raw_fd(), libc::SIGTERM);
                    }
                }
                Some(Control::Stop) => {}
                Some(Control::Snapshot(plan, reply)) => {
                    let saved = match qmp.as_mut() {
                        Some(session) if !stopping => snapshot::save(session, &plan).await,
                        Some(_) => Err("the instance is stopping".into()),
                        None => Err("QMP is not up".into()),
                    };
                    let _ = reply.send(saved);
                }
                Some(Control::HandOver(reply)) => {
                    if stopping {
                        let _ = reply.send(None);
                        continue;
                    }
                    let Some(console) = take_pipe(s.reader_handover.take()).await else {
                        let _ = reply.send(None);
                        continue;
                    };
                    // The session closes: qemu takes the next daemon's, and its exit is
                    // that daemon's to report.
                    drop(qmp);
                    info!(id = s.id, pid = s.pid, "qemu instance handed over");
                    let _ = reply.send(Some(Handing {
                        console,
                        qmp: s.qmp.clone(),
                        scratch: s.scratch.take(),
                        uid: s._lease.as_ref().map(Lease::uid),
                    }));
                    // Its lease is not given back: the uid stays qemu's.
                    std::mem::forget(s._lease.take());
                    return;
                }
                Some(Control::Kill) | None => {
                    if !spawn::send_signal(s.pidfd.as_raw_fd(), libc::SIGKILL) {
                        warn!(id = s.id, error = %io::Error::last_os_error(), "cannot kill qemu");
                    }
                }
            },
        }
    };
    // qemu sends its SHUTDOWN event just before it exits: read what is left.
    if let Some(mut session) = qmp.take() {
        while let Ok(Some(event)) = tokio::time::timeout(QMP_DRAIN, session.event()).await {
            guest_stopped |= note_event(&s.console, &event);
        }
    }
    let exited_clean = status == Some(Exit::Code(0));
    if exited_clean && !stopping && !guest_stopped {
        s.console.push(
            b"[qemu] exited on its own: with -no-reboot, a guest reset (a triple fault) or power-off ends the VM\n",
        );
    }
    let _ = tokio::time::timeout(CONSOLE_DRAIN, s.reader).await;
    let _ = std::fs::remove_file(&s.qmp);
    if let Some(scratch) = s.scratch.take() {
        let _ = std::fs::remove_dir_all(scratch);
    }
    let oom_killed = s.groups.as_ref().is_some_and(InstanceGroups::oom_killed);
    if let Some(groups) = s.groups.take() {
        let _ = tokio::task::spawn_blocking(move || groups.remove()).await;
    }
    let report = ExitReport {
        status: match status {
            Some(Exit::Code(code)) => ExitStatus::Code(code),
            Some(Exit::Signal(signal)) => ExitStatus::Signal(signal),
            None => ExitStatus::Unknown,
        },
        oom_killed,
    };
    info!(id = s.id, pid = s.pid, %report, "qemu instance ended");
    // The exit first, then the end of the console: a console wait that sees the end can
    // rely on the exit being known.
    let _ = s.exit.send(Some(report));
    s.console.close();
}

/// The console pipe, from the pump (rule 4), within [`PUMP_HAND_OVER`].
async fn take_pipe(ask: Option<PumpHandOver>) -> Option<OwnedFd> {
    let (reply, answer) = oneshot::channel();
    ask?.send(reply).ok()?;
    tokio::time::timeout(PUMP_HAND_OVER, answer)
        .await
        .ok()?
        .ok()?
}

/// Asks qemu to quit over QMP; on failure, SIGTERM (qemu quits cleanly on it too).
async fn quit(qmp: &mut Option<Qmp>, pidfd: &OwnedFd) {
    let sent = match qmp.as_mut() {
        Some(session) => matches!(
            tokio::time::timeout(QMP_REPLY_TIMEOUT, session.execute("quit")).await,
            Ok(Ok(()))
        ),
        None => false,
    };
    if !sent {
        *qmp = None;
        spawn::send_signal(pidfd.as_raw_fd(), libc::SIGTERM);
    }
}

/// The next QMP event, or pending forever without a session; `None` when it closed.
async fn next_event(qmp: &mut Option<Qmp>) -> Option<serde_json::Value> {
    match qmp.as_mut() {
        Some(session) => session.event().await,
        None => std::future::pending().await,
    }
}

/// Puts what qemu says about a guest-initiated stop on the console, where the crash record
/// will show it; true if it was one.
pub(super) fn note_event(console: &Console, event: &serde_json::Value) -> bool {
    let name = event
        .get("event")
        .and_then(|name| name.as_str())
        .unwrap_or("");
    if name != "SHUTDOWN" && name != "RESET" && name != "GUEST_PANICKED" {
        return false;
    }
    let data = event.get("data");
    let guest = data
        .and_then(|data| data.get("guest"))
        .and_then(|guest| guest.as_bool());
    let reason = data
        .and_then(|data| data.get("reason"))
        .and_then(|reason| reason.as_str())
        .unwrap_or("unknown");
    if guest == Some(false) {
        return false; // we asked for it
    }
    let line = match (name, reason) {
        ("SHUTDOWN", "guest-reset") => {
            "[qemu] the guest reset itself (a triple fault, or a reboot); the VM stops\n".to_owned()
        }
        ("GUEST_PANICKED", _) => "[qemu] the guest panicked\n".to_owned(),
        _ => format!("[qemu] {name}: {reason}\n"),
    };
    console.push(line.as_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_reset_is_explained_on_the_console() {
        let console = Console::new(1024);
        let event = serde_json::json!({
            "event": "SHUTDOWN",
            "data": { "guest": true, "reason": "guest-reset" }
        });
        assert!(note_event(&console, &event));
        let ours = serde_json::json!({
            "event": "SHUTDOWN",
            "data": { "guest": false, "reason": "host-qmp-quit" }
        });
        assert!(!note_event(&console, &ours));
        let tail = String::from_utf8(console.tail()).expect("utf-8");
        assert!(tail.contains("triple fault"), "{tail}");
        assert!(!tail.contains("host-qmp-quit"), "{tail}");
    }
}
