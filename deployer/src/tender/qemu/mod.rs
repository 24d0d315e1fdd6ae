//! The qemu tender: kernel images booted in a `microvm`.
//!
//! 1. [`Tender::prepare`] checks the manifest (memory, kernel arguments) and claims the
//!    backend endpoint: the host side of qemu's user-mode port forward, on the instance's
//!    service address (the manifest port, or one the kernel picks).
//! 2. [`Prepared::boot`] spawns `qemu-system-x86_64 -M microvm` with no option ROMs, no
//!    default devices, no user config: the image is the `-kernel` (an ELF with a PVH note),
//!    the command line is the manifest's `args` plus `revboot.revision=<deployment commit>`,
//!    one virtio-net device (modern virtio-mmio) on `-netdev user,restrict=on` forwarding
//!    `<service address>:<port>` to the guest port. COM1 is qemu's stdout: the console.
//!    `-no-reboot`: a guest that resets (a triple fault) stops the VM. qemu runs in the
//!    sandbox of the `jail` module (its own namespaces but the network, a tmpfs root with
//!    `/usr`, the kernel and its scratch directory only, the instance's uid without
//!    capabilities, cgroup limits, landlock and seccomp) and under its own seccomp sandbox
//!    (`-sandbox on`, no spawning or privilege changes), with an environment of `PATH` only.
//! 3. The accelerator is hardware KVM when `/proc/cpuinfo` shows `vmx` or `svm` and
//!    `/dev/kvm` opens, TCG otherwise; [`QemuConfig::accel`] or `REVBOOT_QEMU_ACCEL`
//!    (`kvm`, `tcg`, `auto`) override the guess.
//! 4. A supervisor task owns the child through its pidfd. It holds a QMP session (the `qmp`
//!    module; `<scratch>/qmp.sock`, made by qemu inside its sandbox) to learn why the guest
//!    stopped (the reason goes on the console) and to stop it.
//! 5. Stop: QMP `quit` (SIGTERM when QMP is not up). Kill: SIGKILL. Once qemu is reaped and
//!    its output drained, its cgroups are removed (an OOM kill read first), the exit is
//!    reported and the QMP socket removed.
//!
//! Readiness with user networking: qemu accepts forwarded connections on the host side
//! before the guest listens, so a `tcp` probe proves only that qemu runs. `console` (a line
//! the guest prints once it listens) or `http` prove the guest is serving.

use std::ffi::OsString;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use revboot_sandbox::cgroup::InstanceGroups;
use revboot_sandbox::spawn::{self, Exit};
use revboot_store::manifest::{Ready, TenderKind};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

mod accel;
mod jail;
mod qmp;

pub use accel::{Accel, AccelChoice, kvm_usable};
use accel::{accel_from_env, resolve_accel};
use jail::Jail;
use qmp::{Qmp, qmp_connect};

use super::{
    BootError, BootSpec, BoxFuture, ExitReport, ExitStatus, Footprint, NotReady, Prepared, Running,
    Tender, TenderHost, probe_ready,
};
use crate::addresses::Family;
use crate::config::BackendPort;
use crate::console::Console;

/// The environment variable that overrides the accelerator: `kvm`, `tcg` or `auto`.
pub const ACCEL_ENV: &str = "REVBOOT_QEMU_ACCEL";
/// The qemu binary used unless configured otherwise.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";
/// The longest kernel command line passed to a guest.
pub const MAX_CMDLINE: usize = 2048;
/// Guest memory bounds, MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 8..=16 * 1024;

/// How long a QMP command may take to answer.
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for QMP events still in flight after qemu exited.
const QMP_DRAIN: Duration = Duration::from_millis(300);
/// How long console readers may take to drain after qemu exited.
const CONSOLE_DRAIN: Duration = Duration::from_secs(1);
/// Pending stop/kill requests per instance.
const CONTROL_QUEUE: usize = 4;
/// Longest `unix:` socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Settings of the qemu tender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The qemu binary (a path, or a name looked up in `PATH`).
    pub binary: PathBuf,
    /// The accelerator; `REVBOOT_QEMU_ACCEL` overrides it.
    pub accel: AccelChoice,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from(DEFAULT_BINARY),
            accel: AccelChoice::Auto,
        }
    }
}

/// Why the qemu tender cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QemuSetupError {
    /// `REVBOOT_QEMU_ACCEL` holds something else than `kvm`, `tcg` or `auto`.
    #[error("`{ACCEL_ENV}` must be `kvm`, `tcg` or `auto`, not `{0}`")]
    BadAccel(String),
    /// KVM was asked for and is not usable.
    #[error("Hardware KVM was asked for but is not usable: {0}")]
    NoKvm(String),
    /// qemu's sandbox cannot be set up (the binary is missing, no thread…).
    #[error("Cannot set up qemu's sandbox: {0}")]
    Sandbox(String),
}

/// The qemu tender with `config`, as [`crate::Deployer::with_tenders`] takes it.
pub fn make(config: QemuConfig) -> super::MakeTender {
    Box::new(move |host: &TenderHost| {
        QemuTender::new(config, host)
            .map(|tender| std::sync::Arc::new(tender) as std::sync::Arc<dyn Tender>)
            .map_err(|error| super::TenderSetupError {
                kind: TenderKind::Qemu,
                source: Box::new(error),
            })
    })
}

/// Boots kernel images in qemu microvms.
#[derive(Debug, Clone)]
pub struct QemuTender {
    accel: Accel,
    jail: Arc<Jail>,
}

impl QemuTender {
    /// A tender with `config`, the accelerator overridden by `REVBOOT_QEMU_ACCEL`, for the
    /// deployer whose host is `host`.
    pub fn new(config: QemuConfig, host: &TenderHost) -> Result<QemuTender, QemuSetupError> {
        let choice = match std::env::var(ACCEL_ENV) {
            Ok(value) => accel_from_env(&value)?,
            Err(_) => config.accel,
        };
        let accel = resolve_accel(choice)?;
        let jail = Jail::new(host, &config.binary, accel)
            .map_err(|error| QemuSetupError::Sandbox(error.to_string()))?;
        info!(accel = accel.as_arg(), binary = %config.binary.display(), "qemu tender ready");
        Ok(QemuTender {
            accel,
            jail: Arc::new(jail),
        })
    }

    /// The accelerator instances run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }
}

/// The kernel command line of an instance: the manifest's arguments, then the deployment.
fn kernel_cmdline(spec: &BootSpec) -> Result<String, String> {
    let mut parts = Vec::with_capacity(spec.run.args.len() + 1);
    for arg in &spec.run.args {
        if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "kernel argument {arg:?} is empty or holds whitespace or control characters"
            ));
        }
        if arg.starts_with("revboot.") {
            return Err(format!(
                "kernel argument {arg:?}: `revboot.` arguments are set by revboot"
            ));
        }
        parts.push(arg.clone());
    }
    parts.push(format!("revboot.revision={}", spec.revision.to_hex()));
    let cmdline = parts.join(" ");
    if cmdline.len() > MAX_CMDLINE {
        return Err(format!(
            "kernel command line is {} bytes, at most {MAX_CMDLINE}",
            cmdline.len()
        ));
    }
    Ok(cmdline)
}

fn invalid(what: &str, message: String) -> BootError {
    BootError::Setup {
        what: what.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, message),
    }
}

impl Tender for QemuTender {
    fn families(&self) -> &'static [Family] {
        // User networking forwards from IPv4 host addresses.
        &[Family::Ipv4]
    }

    fn kind(&self) -> TenderKind {
        TenderKind::Qemu
    }

    fn prepare(&self, spec: BootSpec) -> Result<Box<dyn Prepared>, BootError> {
        if !MEMORY_MIB.contains(&spec.run.memory_mib) {
            return Err(invalid(
                "guest memory",
                format!(
                    "memory_mib = {} is outside {}..={}",
                    spec.run.memory_mib,
                    MEMORY_MIB.start(),
                    MEMORY_MIB.end()
                ),
            ));
        }
        let cmdline =
            kernel_cmdline(&spec).map_err(|message| invalid("kernel command line", message))?;
        if matches!(spec.run.ready, Ready::Socket | Ready::Tcp) {
            warn!(
                service = spec.service,
                "qemu: a `socket` or `tcp` probe only shows that qemu runs (user networking \
                 accepts for the guest); use `console` or `http` to know the guest serves"
            );
        }
        let (Some(v4), None) = (spec.addresses.v4(), spec.addresses.v6()) else {
            return Err(invalid(
                "port forward",
                format!(
                    "qemu user networking forwards IPv4 only, not {}",
                    spec.addresses
                ),
            ));
        };
        let qmp = spec.scratch.join("qmp.sock");
        if qmp.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "QMP socket",
                format!("{} is longer than a unix socket path may be", qmp.display()),
            ));
        }
        // Claim the forwarded port: check that it is free now (or let the kernel pick one),
        // then release it for qemu to bind. Another process could take it in between; qemu
        // then fails to start and says so on the console.
        let port = match spec.backend_port {
            BackendPort::Same => spec.run.port,
            BackendPort::Ephemeral => 0,
        };
        let probe = SocketAddr::new(IpAddr::V4(v4), port);
        let listener = TcpListener::bind(probe).map_err(|source| BootError::Bind {
            address: probe,
            source,
        })?;
        let backend = listener.local_addr().map_err(|source| BootError::Bind {
            address: probe,
            source,
        })?;
        drop(listener);
        Ok(Box::new(QemuPrepared {
            jail: Arc::clone(&self.jail),
            accel: self.accel,
            guest_port: spec.run.guest_port.unwrap_or(spec.run.port),
            cmdline,
            qmp,
            backend,
            spec,
        }))
    }
}

/// A qemu instance with its forwarded port chosen.
#[derive(Debug)]
struct QemuPrepared {
    jail: Arc<Jail>,
    accel: Accel,
    guest_port: u16,
    cmdline: String,
    qmp: PathBuf,
    backend: SocketAddr,
    spec: BootSpec,
}

impl QemuPrepared {
    /// The qemu argv (without the binary), with the paths as qemu sees them in its
    /// sandbox: the QMP socket in [`jail::RUN`], the kernel at [`jail::KERNEL`].
    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |arg: &str| args.push(arg.into());
        push("-M");
        push("microvm,x-option-roms=off,rtc=off");
        push("-accel");
        push(self.accel.as_arg());
        if self.accel == Accel::Kvm {
            push("-cpu");
            push("host");
        }
        push("-smp");
        push("1");
        push("-m");
        push(&format!("{}M", self.spec.run.memory_mib));
        for arg in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            push(arg);
        }
        // qemu's own seccomp filter: no spawning, no privilege changes, no obsolete calls.
        push("-sandbox");
        push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
        push("-serial");
        push("stdio");
        push("-append");
        push(&self.cmdline);
        push("-global");
        push("virtio-mmio.force-legacy=false");
        push("-netdev");
        push(&format!(
            "user,id=net0,restrict=on,hostfwd=tcp:{}:{}-:{}",
            self.backend.ip(),
            self.backend.port(),
            self.guest_port
        ));
        push("-device");
        push("virtio-net-device,netdev=net0");
        args.push("-qmp".into());
        args.push(format!("unix:{}/qmp.sock,server=on,wait=off", jail::RUN).into());
        args.push("-kernel".into());
        args.push(jail::KERNEL.into());
        args
    }
}

impl Prepared for QemuPrepared {
    fn backend(&self) -> SocketAddr {
        self.backend
    }

    fn boot(
        self: Box<Self>,
        image: PathBuf,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, BootError>> {
        Box::pin(async move {
            super::make_scratch(&self.spec)?;
            let _ = std::fs::remove_file(&self.qmp);
            let jailed = self
                .jail
                .start(&self.spec, self.args(), &image, self.backend.port())
                .await?;
            let pid = jailed.pid;
            let console = Console::new(self.spec.console_bytes);
            let output = tokio::net::unix::pipe::Receiver::from_owned_fd(jailed.console).map_err(
                |source| BootError::Setup {
                    what: "console pipe".into(),
                    source,
                },
            )?;
            let readers = [Some(tokio::spawn(pump(output, console.clone()))), None];
            let cgroups = Jail::dirs(jailed.groups.as_ref());
            let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
            let (attached_tx, attached) = watch::channel(false);
            let (exit_tx, exit_rx) = watch::channel(None);
            info!(
                id = self.spec.id,
                service = self.spec.service,
                revision = %self.spec.revision.short(12),
                pid,
                backend = %self.backend,
                accel = self.accel.as_arg(),
                "qemu instance started"
            );
            tokio::spawn(supervise(Supervised {
                id: self.spec.id.clone(),
                attached: attached_tx,
                _jail: Arc::clone(&self.jail),
                pidfd: Arc::new(jailed.pidfd),
                groups: jailed.groups,
                pid,
                qmp: self.qmp.clone(),
                console: console.clone(),
                control: control_rx,
                exit: exit_tx,
                readers,
            }));
            Ok(Box::new(QemuRunning {
                backend: self.backend,
                console,
                pid,
                pid_start: pid_start(pid),
                cgroups,
                attached,
                control: control_tx,
                exit: exit_rx,
            }) as Box<dyn Running>)
        })
    }
}

/// Copies one output stream of qemu to the console.
async fn pump(mut stream: impl AsyncRead + Unpin, console: Console) {
    let mut buf = vec![0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(read) => console.push(&buf[..read]),
        }
    }
}

/// What `stop` and `kill` ask of the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Stop,
    Kill,
}

/// A running qemu instance.
#[derive(Debug)]
struct QemuRunning {
    backend: SocketAddr,
    console: Console,
    pid: u32,
    pid_start: Option<u64>,
    cgroups: Vec<PathBuf>,
    control: mpsc::Sender<Control>,
    exit: watch::Receiver<Option<ExitReport>>,
    /// True once the supervisor's QMP session is up (or given up on): from then on a
    /// guest's crash is explained on the console.
    attached: watch::Receiver<bool>,
}

impl QemuRunning {
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
    fn backend(&self) -> SocketAddr {
        self.backend
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

    fn ready<'a>(
        &'a self,
        probe: &'a Ready,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), NotReady>> {
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            let result =
                probe_ready(self.backend, &self.console, self.exit(), probe, timeout).await;
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
                    Ok(())
                }
                other => other,
            }
        })
    }
}

/// The start time of a process (`/proc/<pid>/stat` field 22), to tell a reused pid apart.
fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Everything the supervisor owns.
struct Supervised {
    id: String,
    /// Set once QMP is up or given up on.
    attached: watch::Sender<bool>,
    /// Keeps the thread that started qemu alive while qemu runs: qemu's parent-death
    /// signal follows that thread.
    _jail: Arc<Jail>,
    pidfd: Arc<OwnedFd>,
    groups: Option<InstanceGroups>,
    pid: u32,
    qmp: PathBuf,
    console: Console,
    control: mpsc::Receiver<Control>,
    exit: watch::Sender<Option<ExitReport>>,
    readers: [Option<tokio::task::JoinHandle<()>>; 2],
}

/// Owns the qemu child until it is reaped: QMP events and stop requests, kill, exit.
async fn supervise(mut s: Supervised) {
    let connect = qmp_connect(s.qmp.clone());
    tokio::pin!(connect);
    // A blocking wait on a thread of its own returns when qemu is gone, whoever ended it.
    let waited = Arc::clone(&s.pidfd);
    let mut ended = tokio::task::spawn_blocking(move || spawn::reap_blocking(waited.as_raw_fd()));
    let mut connecting = true;
    let mut qmp: Option<Qmp> = None;
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
                    Ok(session) => qmp = Some(session),
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
    for reader in s.readers.into_iter().flatten() {
        let _ = tokio::time::timeout(CONSOLE_DRAIN, reader).await;
    }
    let _ = std::fs::remove_file(&s.qmp);
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
fn note_event(console: &Console, event: &serde_json::Value) -> bool {
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
    use revboot_store::Revision;
    use revboot_store::manifest::Run;

    fn spec(args: &[&str]) -> BootSpec {
        BootSpec {
            id: "t1".into(),
            service: "hello-vm".into(),
            revision: "0123456789abcdef0123456789abcdef01234567"
                .parse::<Revision>()
                .expect("a revision"),
            run: Run {
                tender: TenderKind::Qemu,
                args: args.iter().map(|arg| (*arg).to_owned()).collect(),
                memory_mib: 32,
                guest_port: Some(8080),
                ..Run::default()
            },
            addresses: crate::ServiceAddresses::one("127.0.0.1".parse().expect("an address")),
            client: None,
            backend_port: BackendPort::Ephemeral,
            scratch: std::env::temp_dir(),
            console_bytes: 4096,
            vars: Default::default(),
            uid: 2_050_000_000,
        }
    }

    fn test_runtime() -> tokio::runtime::Handle {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("a runtime")
            })
            .handle()
            .clone()
    }

    /// A TCG tender on a root of its own (`dir`), as a deployer would make it.
    fn tender(dir: &std::path::Path) -> QemuTender {
        let host = TenderHost {
            name: format!("qemu-unit-{}", std::process::id()),
            root: dir.to_owned(),
            sandbox: crate::config::SandboxConfig::default(),
            // The qemu tender starts its VMs from a thread of its own, not on the runtime.
            runtime: test_runtime(),
        };
        let config = QemuConfig {
            accel: AccelChoice::Tcg,
            ..QemuConfig::default()
        };
        QemuTender::new(config, &host).expect("a qemu tender")
    }

    #[test]
    fn command_line_appends_the_revision_and_refuses_what_would_split() {
        let line = kernel_cmdline(&spec(&["quiet", "loglevel=3"])).expect("valid");
        assert_eq!(
            line,
            "quiet loglevel=3 revboot.revision=0123456789abcdef0123456789abcdef01234567"
        );
        assert!(kernel_cmdline(&spec(&["two words"])).is_err());
        assert!(kernel_cmdline(&spec(&["line\nbreak"])).is_err());
        assert!(kernel_cmdline(&spec(&["revboot.revision=forged"])).is_err());
        let long = "x".repeat(MAX_CMDLINE);
        assert!(kernel_cmdline(&spec(&[&long])).is_err());
    }

    #[test]
    fn prepare_forwards_the_service_address_to_the_guest_port() {
        let dir = tempfile::tempdir().expect("dir");
        let tender = tender(dir.path());
        let prepared = tender.prepare(spec(&[])).expect("prepared");
        let backend = prepared.backend();
        assert_eq!(backend.ip(), "127.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_ne!(backend.port(), 0);
        let debug = format!("{prepared:?}");
        assert!(debug.contains("guest_port: 8080"), "{debug}");
    }

    #[test]
    fn argv_keeps_the_guest_on_loopback_and_boots_the_image_directly() {
        let dir = tempfile::tempdir().expect("dir");
        let tender = tender(dir.path());
        let spec = spec(&["quiet"]);
        let prepared = QemuPrepared {
            jail: Arc::clone(&tender.jail),
            accel: tender.accel,
            guest_port: 8080,
            cmdline: kernel_cmdline(&spec).expect("valid"),
            qmp: spec.scratch.join("qmp.sock"),
            backend: "127.77.0.9:41000".parse().expect("addr"),
            spec,
        };
        let args: Vec<String> = prepared
            .args()
            .into_iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            let at = args.iter().position(|arg| arg == flag).expect(flag);
            args[at + 1].clone()
        };
        assert!(after("-M").starts_with("microvm,"));
        assert_eq!(after("-accel"), "tcg");
        assert_eq!(after("-m"), "32M");
        // Paths as qemu sees them in its sandbox.
        assert_eq!(after("-kernel"), jail::KERNEL);
        assert_eq!(after("-qmp"), "unix:/run/qemu/qmp.sock,server=on,wait=off");
        assert_eq!(
            after("-netdev"),
            "user,id=net0,restrict=on,hostfwd=tcp:127.77.0.9:41000-:8080"
        );
        assert!(
            after("-append").ends_with("revboot.revision=0123456789abcdef0123456789abcdef01234567")
        );
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(args.iter().any(|arg| arg == flag), "{flag} in {args:?}");
        }
        assert!(
            !args.iter().any(|arg| arg == "-cpu"),
            "no -cpu host under TCG"
        );
    }

    #[test]
    fn prepare_refuses_bad_memory_and_ipv6() {
        let dir = tempfile::tempdir().expect("dir");
        let tender = tender(dir.path());
        let mut tiny = spec(&[]);
        tiny.run.memory_mib = 1;
        let error = tender.prepare(tiny).expect_err("too little memory");
        assert!(error.to_string().contains("guest memory"), "{error}");
        let mut v6 = spec(&[]);
        v6.addresses = crate::ServiceAddresses::one("::1".parse().expect("ip"));
        assert!(tender.prepare(v6).is_err());
    }

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
