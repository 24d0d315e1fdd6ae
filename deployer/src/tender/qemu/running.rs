//! A running qemu instance, booted cold or restored: what the deployer holds
//! ([`QemuRunning`]), and how one is put together from a started qemu ([`launch`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use revboot_sandbox::uids::Lease;
use revboot_store::manifest::Ready;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::jail::{Jail, Jailed};
use super::pool::{Pool, Shape};
use super::qmp::Qmp;
use super::snapshot::Known;
use super::snapshot::{SAVE_TIMEOUT, SavePlan};
use super::supervise::{Control, Supervised, supervise};
use super::{CONTROL_QUEUE, QemuPrepared, QemuTender};
use crate::console::Console;
use crate::tender::{
    Adopted, BootError, BoxFuture, ExitReport, Footprint, Handed, NotReady, Running, probe_ready,
};

/// How long the supervisor may take to hand an instance over.
const HAND_OVER: Duration = Duration::from_secs(5);
/// How long a snapshot waits for the guest to finish the console line it is printing.
const LINE_END: Duration = Duration::from_millis(200);
/// How long qemu is given to be seen ending when QMP could not say where its forward listens.
const EXIT_AFTER_QMP: Duration = Duration::from_secs(2);

/// What [`launch`] puts together.
pub(super) struct Launch {
    pub(super) jailed: Jailed,
    /// The QMP session, when it is already up (a restore); otherwise the supervisor connects.
    pub(super) qmp: Option<Qmp>,
    /// The QMP socket on the host.
    pub(super) qmp_path: PathBuf,
    /// A scratch directory of qemu's own, removed once it has ended.
    pub(super) scratch: Option<PathBuf>,
    /// A uid of qemu's own, given back once it has ended.
    pub(super) lease: Option<Lease>,
    pub(super) console: Console,
    /// Where its forward listens, when known already (otherwise the supervisor learns it
    /// once QMP is up: the `forward` module).
    pub(super) backend: Option<SocketAddr>,
    pub(super) restored: bool,
    pub(super) save: Option<Save>,
    /// The tender's record of qemu's version.
    pub(super) version: Arc<std::sync::OnceLock<String>>,
}

/// A snapshot to save once the instance is ready, and whom to tell.
#[derive(Debug, Clone)]
pub(super) struct Save {
    pub(super) plan: SavePlan,
    pub(super) pool: Arc<Pool>,
    pub(super) known: Arc<Known>,
    pub(super) shape: Shape,
}

/// Starts the supervisor of a started qemu and returns the instance.
pub(super) fn launch(
    prepared: &QemuPrepared,
    jail: &Arc<Jail>,
    launch: Launch,
) -> Result<Box<dyn Running>, BootError> {
    let pid = launch.jailed.pid;
    info!(
        id = prepared.spec.id,
        service = prepared.spec.service,
        revision = %prepared.spec.revision.short(12),
        pid,
        forward = prepared.forward.arg(),
        backend = ?launch.backend,
        accel = prepared.accel.as_arg(),
        restored = launch.restored,
        "qemu instance started"
    );
    tend(
        prepared.spec.id.clone(),
        prepared.forward.host,
        Arc::clone(jail),
        pid_start(pid),
        launch,
    )
}

/// Starts the supervisor of a qemu, started here ([`launch`]) or handed over by the
/// previous daemon ([`adopt`]), and the pump of its console; the instance. Its forward
/// listens on `host`.
fn tend(
    id: String,
    host: Ipv4Addr,
    jail: Arc<Jail>,
    pid_start: Option<u64>,
    launch: Launch,
) -> Result<Box<dyn Running>, BootError> {
    let Launch {
        jailed,
        qmp,
        qmp_path,
        scratch,
        lease,
        console,
        backend,
        restored,
        save,
        version,
    } = launch;
    let backend = Arc::new(backend.map_or_else(OnceLock::new, OnceLock::from));
    let output =
        tokio::net::unix::pipe::Receiver::from_owned_fd(jailed.console).map_err(|source| {
            BootError::Setup {
                what: "console pipe".into(),
                source,
            }
        })?;
    let (reader_handover, asked) = oneshot::channel();
    let reader = tokio::spawn(pump(output, console.clone(), asked));
    let cgroups = Jail::dirs(jailed.groups.as_ref());
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (attached_tx, attached) = watch::channel(false);
    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(supervise(Supervised {
        id,
        backend: Arc::clone(&backend),
        host,
        attached: attached_tx,
        _jail: jail,
        pidfd: Arc::new(jailed.pidfd),
        groups: jailed.groups,
        pid: jailed.pid,
        session: qmp,
        qmp: qmp_path,
        scratch,
        _lease: lease,
        console: console.clone(),
        version,
        control: control_rx,
        exit: exit_tx,
        reader,
        reader_handover: Some(reader_handover),
    }));
    Ok(Box::new(QemuRunning {
        backend,
        console,
        pid: jailed.pid,
        pid_start,
        cgroups,
        attached,
        control: control_tx,
        exit: exit_rx,
        restored,
        save,
    }))
}

/// Copies qemu's output to the console until it ends, or until the supervisor asks for
/// the pipe back (a hand-over).
async fn pump(
    mut stream: tokio::net::unix::pipe::Receiver,
    console: Console,
    mut handover: oneshot::Receiver<oneshot::Sender<Option<OwnedFd>>>,
) {
    let mut buf = vec![0u8; 4096];
    let mut may_hand_over = true;
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(read) => console.push(&buf[..read]),
            },
            asked = &mut handover, if may_hand_over => match asked {
                Ok(reply) => {
                    let _ = reply.send(stream.into_blocking_fd().ok());
                    return;
                }
                Err(_) => may_hand_over = false,
            },
        }
    }
}

/// A running qemu instance.
#[derive(Debug)]
pub(super) struct QemuRunning {
    /// Where its forward listens: known at the start, or once the supervisor learnt it.
    backend: Arc<OnceLock<SocketAddr>>,
    console: Console,
    pid: u32,
    pid_start: Option<u64>,
    cgroups: Vec<PathBuf>,
    control: mpsc::Sender<Control>,
    exit: watch::Receiver<Option<ExitReport>>,
    /// Restored from a snapshot of a ready guest: a `console` probe's line was printed
    /// before the snapshot, and readiness is the snapshot's.
    restored: bool,
    /// Where to save a snapshot once the instance is ready (a cold boot with restore on).
    save: Option<Save>,
    /// True once the supervisor's QMP session is up (or given up on): from then on a
    /// guest's crash is explained on the console.
    attached: watch::Receiver<bool>,
}

impl QemuRunning {
    /// Saves the snapshot of `save` through the supervisor; waits at most `patience` (what
    /// is left of the boot timeout) for it, the instance being ready either way.
    async fn save(&self, save: &Save, patience: Duration) {
        let (reply, answer) = oneshot::channel();
        let revision = save.plan.revision;
        if self
            .control
            .try_send(Control::Snapshot(save.plan.clone(), reply))
            .is_err()
        {
            return;
        }
        let result = tokio::time::timeout(patience.min(SAVE_TIMEOUT), answer).await;
        match result {
            Ok(Ok(Ok(found))) => {
                let bytes = found.meta.bytes;
                info!(pid = self.pid, revision = %revision.short(12), bytes, "qemu snapshot saved");
                save.known.insert(revision);
                save.pool.want(save.shape, Some(found));
                self.console.push_line(&format!(
                    "[revboot] snapshot of the ready guest saved ({bytes} bytes)"
                ));
            }
            Ok(Ok(Err(error))) => {
                warn!(pid = self.pid, revision = %revision.short(12), error, "qemu snapshot not saved");
                self.console
                    .push_line(&format!("[revboot] snapshot not saved: {error}"));
            }
            _ => warn!(
                pid = self.pid,
                "qemu snapshot: no answer from the supervisor"
            ),
        }
    }

    /// Waits (at most `timeout`) until the supervisor learnt where the forward listens,
    /// which it does as its QMP session comes up.
    async fn learnt(&self, timeout: Duration) -> Result<SocketAddr, NotReady> {
        let mut attached = self.attached.clone();
        // Whether it timed out, and whether the supervisor is still there (no `Ref` kept).
        let waited = tokio::time::timeout(timeout, attached.wait_for(|up| *up))
            .await
            .map(|attached| attached.is_ok());
        if let Some(backend) = self.backend() {
            return Ok(backend);
        }
        Err(match waited {
            Err(_) => NotReady::Timeout {
                ms: timeout.as_millis() as u64,
                probe: "qemu's port forward".into(),
            },
            // The supervisor ended: qemu exited before QMP was up.
            Ok(false) => NotReady::Exited,
            // QMP came up but could not say where the forward listens: most often qemu
            // was ending meanwhile (a guest that fails at once), which is what to report.
            Ok(true) => {
                let mut exit = self.exit.clone();
                let ended = tokio::time::timeout(EXIT_AFTER_QMP, exit.wait_for(Option::is_some))
                    .await
                    .is_ok();
                if ended {
                    NotReady::Exited
                } else {
                    NotReady::NoBackend
                }
            }
        })
    }

    fn request(&self, control: Control) {
        if self.exit.borrow().is_some() {
            return;
        }
        if let Err(error) = self.control.try_send(control) {
            // A full queue already holds requests; a closed one means the supervisor is
            // reaping the child. Either way it is ending.
            debug!(%error, pid = self.pid, "qemu control request not queued");
        }
    }
}

impl Running for QemuRunning {
    fn backend(&self) -> Option<SocketAddr> {
        self.backend.get().copied()
    }

    fn console(&self) -> &Console {
        &self.console
    }

    fn footprint(&self) -> Footprint {
        Footprint {
            pid: Some(self.pid),
            pid_start: self.pid_start,
            cgroups: self.cgroups.clone(),
        }
    }

    fn stop(&self) {
        self.request(Control::Stop);
    }

    fn kill(&self) {
        self.request(Control::Kill);
    }

    fn exit(&self) -> watch::Receiver<Option<ExitReport>> {
        self.exit.clone()
    }

    /// Through the supervisor, which stops there (the `supervise` module, rule 4).
    fn hand_over(&self) -> BoxFuture<'_, Option<Handed>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.control.try_send(Control::HandOver(reply)).ok()?;
            let handing = tokio::time::timeout(HAND_OVER, answer).await.ok()?.ok()??;
            let own = HandedQemu {
                qmp: handing.qmp,
                scratch: handing.scratch.clone(),
                uid: handing.uid,
                restored: self.restored,
            };
            Some(Handed {
                console: handing.console,
                tail: self.console.tail(),
                tender: serde_json::to_value(own).expect("paths and numbers serialise"),
                keep: handing.scratch.into_iter().collect(),
                fds: Vec::new(),
            })
        })
    }

    fn ready<'a>(
        &'a self,
        probe: &'a Ready,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), NotReady>> {
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            let backend = match self.backend() {
                Some(backend) => Ok(backend),
                None => self.learnt(timeout).await,
            };
            let left = timeout.saturating_sub(started.elapsed());
            let result = match backend {
                Err(not_ready) => Err(not_ready),
                // The line was printed before the snapshot was taken.
                Ok(_) if self.restored && matches!(probe, Ready::Console { .. }) => Ok(()),
                Ok(backend) => probe_ready(backend, &self.console, self.exit(), probe, left).await,
            };
            match result {
                // A console probe gives up when the console ends, which is when qemu
                // exited: say so rather than "timeout".
                Err(NotReady::Timeout { .. }) if self.exit.borrow().is_some() => {
                    Err(NotReady::Exited)
                }
                Ok(()) => {
                    // Ready means the supervisor can also tell why the guest stops: a
                    // guest that crashes right after it serves is then explained. QMP is
                    // usually up long before; the wait is bounded by the boot timeout.
                    let left = timeout.saturating_sub(started.elapsed());
                    let mut attached = self.attached.clone();
                    let _ = tokio::time::timeout(left, attached.wait_for(|up| *up)).await;
                    if let Some(save) = &self.save {
                        // Before any client's connection is let in: the guest is quiet, once
                        // it has finished the line the probe matched.
                        self.console.line_end(LINE_END).await;
                        self.save(save, timeout.saturating_sub(started.elapsed()))
                            .await;
                    }
                    Ok(())
                }
                other => other,
            }
        })
    }
}

/// What a qemu instance hands over besides its console (`Handed::tender`).
#[derive(Debug, Serialize, Deserialize)]
struct HandedQemu {
    /// Its QMP socket on the host.
    qmp: PathBuf,
    /// qemu's own scratch directory (a restored one's).
    scratch: Option<PathBuf>,
    /// qemu's own uid (a restored one's).
    uid: Option<u32>,
    /// Restored from a snapshot: its console probe's line was printed before the snapshot,
    /// so one handed over while booting is ready at once in the next daemon too.
    #[serde(default)]
    restored: bool,
}

/// Tends a qemu instance the previous daemon handed over (an upgrade in place): qemu is
/// this process's child still (`revboot_sandbox::parent`), its pid checked against its
/// start time; its QMP session is opened again, its console pumped from the pipe handed
/// over, its cgroups, scratch directory and uid taken back.
pub(super) fn adopt(tender: &QemuTender, adopted: Adopted) -> Result<Box<dyn Running>, BootError> {
    let setup = |message: String| BootError::Setup {
        what: "a qemu instance handed over".into(),
        source: std::io::Error::other(message),
    };
    let own: HandedQemu = serde_json::from_value(adopted.tender)
        .map_err(|error| setup(format!("what it handed over: {error}")))?;
    let footprint = adopted.footprint;
    let pid = footprint.pid.ok_or_else(|| setup("no pid".into()))?;
    let pidfd = revboot_sandbox::spawn::pidfd_open(pid)
        .map_err(|error| setup(format!("pid {pid}: {error}")))?;
    // Checked once the pidfd holds the process: the pid cannot be reused meanwhile.
    if pid_start(pid) != footprint.pid_start || footprint.pid_start.is_none() {
        return Err(setup(format!("pid {pid} is another process now")));
    }
    let lease = match own.uid {
        Some(uid) => Some(
            tender
                .pool
                .uids()
                .lease_exact(uid)
                .ok_or_else(|| setup(format!("uid {uid} is not free")))?,
        ),
        None => None,
    };
    let console = Console::new(adopted.console_bytes);
    console.push(&adopted.tail);
    let _runtime = tender.pool.runtime().enter();
    let id = footprint
        .cgroups
        .first()
        .and_then(|dir| dir.file_name())
        .map_or_else(
            || format!("pid {pid}"),
            |name| name.to_string_lossy().into_owned(),
        );
    let jailed = Jailed {
        pid,
        pidfd,
        console: adopted.console,
        groups: tender.jail.adopt_groups(&footprint.cgroups),
    };
    let host = match adopted.backend.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    };
    tend(
        id,
        host,
        Arc::clone(&tender.jail),
        footprint.pid_start,
        Launch {
            jailed,
            qmp: None,
            qmp_path: own.qmp,
            scratch: own.scratch,
            lease,
            console,
            // Port 0: handed over before its port was learnt; the supervisor learns it.
            backend: (adopted.backend.port() != 0).then_some(adopted.backend),
            restored: own.restored,
            save: None,
            version: Arc::clone(&tender.version),
        },
    )
}

/// The start time of a process (`/proc/<pid>/stat` field 22), to tell a reused pid apart.
fn pid_start(pid: u32) -> Option<u64> {
    revboot_sandbox::stat::read(pid).map(|stat| stat.start_time)
}
