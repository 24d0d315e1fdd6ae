//! Tenders: the backends that run images.
//!
//! A tender turns an image and its manifest into a running instance, and tells the deployer
//! where it accepts connections, what it prints and how it ended.
//!
//! 1. [`Tender::prepare`] (synchronous, fast) claims the backend endpoint — the process
//!    tender binds the listening socket, so the address is known, and connections can
//!    queue, before anything boots. A VM tender whose forward binds a port of qemu's own
//!    picking learns it once qemu runs ([`Prepared::backend`] is then `None`), and
//!    [`Running::ready`] succeeds only once [`Running::backend`] is known.
//! 2. [`Prepared::boot`] (async) starts the image and resolves once it runs.
//! 3. [`Running::ready`] waits for the manifest's readiness probe (a default covers the
//!    probes every backend shares).
//! 4. [`Running::stop`] asks for a graceful stop, [`Running::kill`] forces one; the
//!    deployer kills after its grace.
//! 5. [`Running::exit`] resolves to an [`ExitReport`] once the instance ended *and* its
//!    resources (cgroups, sockets) are released.
//!
//! The traits are object safe; async steps return boxed futures so that backends can be
//! stored as `Arc<dyn Tender>`.

pub mod admit;
pub mod process;
pub mod qemu;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use revboot_store::Revision;
use revboot_store::manifest::{Ready, Run, TenderKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::addresses::{ClientNet, Family, ServiceAddresses};
use crate::config::BackendPort;
use crate::console::Console;

/// A boxed, sendable future, as the tender traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a tender needs to start one instance.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// A short unique id, used for cgroup and scratch names (`[a-z0-9-]`).
    pub id: String,
    /// The service.
    pub service: String,
    /// The deployment commit.
    pub revision: Revision,
    /// The `[run]` table of the manifest.
    pub run: Run,
    /// The service addresses of the instance, one per family.
    pub addresses: ServiceAddresses,
    /// For a per-client instance, its client: the backend socket admits only it (where
    /// clients connect directly) and the service addresses (the proxy, the probes).
    pub client: Option<ClientNet>,
    /// Where the backend socket goes on the primary address
    /// ([`ServiceAddresses::primary`]).
    pub backend_port: BackendPort,
    /// A private directory the instance may write to; the tender creates it at boot (see
    /// [`make_scratch`]), the deployer removes it after the end.
    pub scratch: PathBuf,
    /// Console bytes to keep.
    pub console_bytes: usize,
    /// The host uid (and gid) the instance runs as: its own while it lives (the deployer
    /// leases it from `[sandbox] uids` and takes it back once the instance has ended).
    pub uid: u32,
    /// The service's configuration variables (`revboot config`), as they were at the
    /// summon: the instance's environment, over the manifest's `run.env`.
    pub vars: std::sync::Arc<crate::vars::ServiceVars>,
}

/// The variables of an instance: the manifest's `[run.env]`, the service's configuration
/// variables (`revboot config`) over entries of the same name.
pub fn variables(spec: &BootSpec) -> std::collections::BTreeMap<&str, &str> {
    let mut own: std::collections::BTreeMap<&str, &str> = spec
        .run
        .env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    own.extend(spec.vars.iter());
    own
}

/// Creates the scratch directory of `spec`. Tenders call it at the start of `boot`, in the
/// instance's own task: a directory made during `summon` would put a file-system journal
/// stall on the path of a DNS answer.
pub fn make_scratch(spec: &BootSpec) -> Result<(), BootError> {
    std::fs::create_dir_all(&spec.scratch).map_err(|source| BootError::Setup {
        what: "scratch directory".into(),
        source,
    })
}

impl From<revboot_sandbox::spawn::SpawnError> for BootError {
    fn from(error: revboot_sandbox::spawn::SpawnError) -> BootError {
        use revboot_sandbox::spawn::SpawnError;
        match error {
            SpawnError::Step { step, source } => BootError::Exec { step, source },
            SpawnError::Setup { what, source } => BootError::Setup {
                what: what.into(),
                source,
            },
            other => BootError::Setup {
                what: "the sandbox".into(),
                source: std::io::Error::other(other),
            },
        }
    }
}

/// Why an instance could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The backend endpoint could not be claimed.
    #[error("Cannot bind {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A resource (cgroup, pipe, sandbox) could not be set up.
    #[error("Cannot set up {what}")]
    Setup {
        /// What.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image did not start.
    #[error("Cannot start the image: {step} failed")]
    Exec {
        /// The step of the start-up that failed.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No tender for this kind is registered.
    #[error("No `{0:?}` tender is available")]
    Unavailable(TenderKind),
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitStatus {
    /// It exited with a status code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// Unknown (e.g. the handle was lost).
    Unknown,
}

/// The end of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    /// How it ended.
    pub status: ExitStatus,
    /// The memory limit was hit and the kernel killed it.
    pub oom_killed: bool,
}

impl ExitReport {
    /// True for an exit with status 0.
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Code(0) && !self.oom_killed
    }
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oom_killed {
            return write!(f, "killed at its memory limit (OOM)");
        }
        match self.status {
            ExitStatus::Code(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by signal {signal}"),
            ExitStatus::Unknown => write!(f, "ended, status unknown"),
        }
    }
}

/// What the deployer records durably about a running instance, so that a restarted daemon
/// can find and remove it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Footprint {
    /// The host pid of the instance's top process.
    pub pid: Option<u32>,
    /// That process's start time (`/proc/<pid>/stat` field 22), to tell a reused pid apart.
    pub pid_start: Option<u64>,
    /// Cgroup directories created for it.
    pub cgroups: Vec<PathBuf>,
}

/// Why an instance did not become ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    /// The probe did not succeed within the boot timeout.
    #[error("not ready after {ms} ms ({probe})")]
    Timeout {
        /// The timeout.
        ms: u64,
        /// The probe.
        probe: String,
    },
    /// The instance ended before it was ready.
    #[error("exited before it was ready")]
    Exited,
    /// Its tender could not tell where it accepts connections (qemu did not say which
    /// port its forward bound).
    #[error("its tender could not tell where it accepts connections")]
    NoBackend,
}

/// A backend that runs images.
pub trait Tender: Send + Sync + fmt::Debug + 'static {
    /// Which manifests this tender runs.
    fn kind(&self) -> TenderKind;

    /// The address families an instance of this tender can be served on (both unless the
    /// backend cannot forward one).
    fn families(&self) -> &'static [Family] {
        &[Family::Ipv4, Family::Ipv6]
    }

    /// Claims the backend endpoint for an instance; fast and synchronous.
    fn prepare(&self, spec: BootSpec) -> Result<Box<dyn Prepared>, BootError>;

    /// Releases what the tender keeps ready (spare cgroups and the like) once every
    /// instance ended; called by [`crate::Deployer::shutdown`].
    fn shutdown(&self) {}

    /// Removes what instances of an earlier daemon left behind (cgroups, scratch state)
    /// but the cgroups in `keep` (instances handed over to this daemon); called once at
    /// start-up, after recorded processes were killed.
    fn sweep_orphans(&self, keep: &[PathBuf]) {
        let _ = keep;
    }

    /// Tends on an instance that the previous daemon handed over in an upgrade in place
    /// ([`Running::hand_over`]). By default the backend cannot.
    fn adopt(&self, adopted: Adopted) -> Result<Box<dyn Running>, BootError> {
        drop(adopted);
        Err(BootError::Setup {
            what: "an instance handed over".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this tender does not adopt instances",
            ),
        })
    }
}

/// What a running instance hands to the next daemon of an upgrade in place.
#[derive(Debug)]
pub struct Handed {
    /// The read end of its console pipe: output written meanwhile waits in the pipe.
    pub console: std::os::fd::OwnedFd,
    /// The console's kept tail so far.
    pub tail: Vec<u8>,
    /// What the backend needs besides to tend the instance again, opaque to the deployer
    /// (the qemu tender: its QMP socket, the scratch directory and uid of a restored qemu).
    pub tender: serde_json::Value,
    /// Directories of the backend's own that the next daemon's start-up clean-up leaves
    /// (a restored qemu's scratch directory).
    pub keep: Vec<PathBuf>,
    /// Descriptors of the backend's own kept open across the exec, their numbers in
    /// `tender` (the process tender: its upstream grants' sockets).
    pub fds: Vec<std::os::fd::OwnedFd>,
}

/// An instance the previous daemon handed over, as the tender gets it back.
#[derive(Debug)]
pub struct Adopted {
    /// Where it accepts connections; port 0 when it was not known yet (the tender learns
    /// it again).
    pub backend: SocketAddr,
    /// Its process and cgroups.
    pub footprint: Footprint,
    /// The read end of its console pipe.
    pub console: std::os::fd::OwnedFd,
    /// Its console's tail, as handed over.
    pub tail: Vec<u8>,
    /// Console bytes to keep.
    pub console_bytes: usize,
    /// What the tender handed over of its own ([`Handed::tender`]).
    pub tender: serde_json::Value,
}

/// An instance whose endpoint is claimed but that has not started.
pub trait Prepared: Send + fmt::Debug {
    /// Where the instance will accept connections; `None` when the tender learns it once
    /// the instance runs ([`Running::backend`]).
    fn backend(&self) -> Option<SocketAddr>;

    /// The daemon's end of the instance's hand-off socket, for an instance that takes
    /// connections handed to it (`crate::handoff`); none by default.
    fn handoff(&self) -> Option<crate::Handoff> {
        None
    }

    /// Boots `image` (a path in the image cache).
    fn boot(
        self: Box<Self>,
        image: PathBuf,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, BootError>>;
}

/// A running instance.
pub trait Running: Send + Sync + fmt::Debug {
    /// Where the instance accepts connections; known once [`Running::ready`] succeeded at
    /// the latest (`None` before, for a tender that learns it after the start).
    fn backend(&self) -> Option<SocketAddr>;

    /// Its console.
    fn console(&self) -> &Console;

    /// What to record durably.
    fn footprint(&self) -> Footprint;

    /// Asks for a graceful stop (SIGTERM, an ACPI power button…).
    fn stop(&self);

    /// Forces a stop.
    fn kill(&self);

    /// The exit, once the instance ended and its resources are released.
    fn exit(&self) -> watch::Receiver<Option<ExitReport>>;

    /// A descriptor of the listening socket the instance accepts on, for the kernel
    /// hand-off of warm connections ([`crate::steer`]). By default, the socket bound to
    /// [`Running::backend`] in the instance's top process, taken with `pidfd_getfd`.
    fn listener(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        let pid = self.footprint().pid.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "the instance has no pid")
        })?;
        let backend = self.backend().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "its address is not known yet")
        })?;
        crate::steer::listener_of(pid, backend)
    }

    /// True if the socket [`Running::listener`] gives listens from the start of the boot
    /// and the instance accepts nothing it is not ready for (the kernel holds a connection
    /// in its backlog until the instance takes it): connections may then go to it in the
    /// kernel ([`crate::steer`]) while it boots, not only once it is ready. By default
    /// false: qemu's user networking accepts for a guest that may not listen yet.
    fn holds_handshakes(&self) -> bool {
        false
    }

    /// Stops watching the instance and hands it to the next daemon of an upgrade in place
    /// ([`Tender::adopt`] there): its exit is no longer reported here. `None` if this
    /// instance cannot be handed over (it is then stopped, as at a shutdown). By default
    /// none can.
    fn hand_over(&self) -> BoxFuture<'_, Option<Handed>> {
        Box::pin(async { None })
    }

    /// Waits until the instance is ready by `probe`, at most `timeout`.
    fn ready<'a>(
        &'a self,
        probe: &'a Ready,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), NotReady>> {
        let Some(backend) = self.backend() else {
            return Box::pin(async { Err(NotReady::NoBackend) });
        };
        Box::pin(probe_ready(
            backend,
            self.console(),
            self.exit(),
            probe,
            timeout,
        ))
    }
}

/// The readiness probes every backend shares: `socket` is ready at once (the listening
/// socket exists before boot, so the kernel holds early connections), `tcp` connects,
/// `http` sends `GET path` and wants a 2xx/3xx status line, `console` waits for a line.
pub async fn probe_ready(
    backend: SocketAddr,
    console: &Console,
    mut exit: watch::Receiver<Option<ExitReport>>,
    probe: &Ready,
    timeout: Duration,
) -> Result<(), NotReady> {
    let describe = match probe {
        Ready::Socket => "socket".to_owned(),
        Ready::Tcp => format!("tcp {backend}"),
        Ready::Http { path } => format!("http GET {path}"),
        Ready::Console { line } => format!("console line `{line}`"),
    };
    let attempt = async {
        match probe {
            Ready::Tcp => retry(|| async { tcp_connects(backend).await }).await,
            Ready::Http { path } => retry(|| async { http_ok(backend, path).await }).await,
            Ready::Console { line } => console.wait_for(line, timeout).await,
            _ => true,
        }
    };
    let outcome = {
        let exited = exit.wait_for(Option::is_some);
        tokio::select! {
            biased;
            ok = tokio::time::timeout(timeout, attempt) => match ok {
                Ok(true) => Ok(()),
                Ok(false) => Err(None),
                Err(_) => Err(Some(NotReady::Timeout { ms: timeout.as_millis() as u64, probe: describe.clone() })),
            },
            _ = exited => Err(Some(NotReady::Exited)),
        }
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(Some(not_ready)) => Err(not_ready),
        // The probe gave up early (the console ended): the instance is ending; say so
        // once its exit is known, within what is left of the timeout.
        Err(None) => {
            let ended = tokio::time::timeout(timeout, exit.wait_for(Option::is_some)).await;
            if matches!(ended, Ok(Ok(_))) {
                Err(NotReady::Exited)
            } else {
                Err(NotReady::Timeout {
                    ms: timeout.as_millis() as u64,
                    probe: describe,
                })
            }
        }
    }
}

async fn retry<F, Fut>(mut attempt: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut pause = Duration::from_micros(500);
    loop {
        if attempt().await {
            return true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

pub(crate) async fn tcp_connects(backend: SocketAddr) -> bool {
    admit::connect_from_own_address(backend).await.is_ok()
}

async fn http_ok(backend: SocketAddr, path: &str) -> bool {
    status_line(backend, path)
        .await
        .is_ok_and(|line| status_is_ok(&line))
}

/// True for a `HTTP/1.x 2xx` or `3xx` status line.
pub(crate) fn status_is_ok(line: &str) -> bool {
    let head = line.as_bytes();
    head.starts_with(b"HTTP/1.") && head.len() >= 12 && matches!(head[9], b'2' | b'3')
}

/// `GET path` on `backend` (from the service address, as every probe connects); the status
/// line of the answer (cut at 120 bytes), within two seconds.
pub(crate) async fn status_line(backend: SocketAddr, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = admit::connect_from_own_address(backend).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: {backend}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 120];
        let mut filled = 0;
        while filled < head.len() && !head[..filled].contains(&b'\n') {
            let read = stream.read(&mut head[filled..]).await?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        let line = head[..filled].split(|b| *b == b'\n').next().unwrap_or(&[]);
        Ok::<_, std::io::Error>(String::from_utf8_lossy(line).trim_end().to_owned())
    };
    match tokio::time::timeout(Duration::from_secs(2), exchange).await {
        Ok(Ok(line)) if line.is_empty() => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        )),
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 2 s",
        )),
    }
}

/// What the tenders of one deployer share of the host.
#[derive(Debug, Clone)]
pub struct TenderHost {
    /// Names the tenders' cgroups (`revboot/<name>…`): two deployers on one host differ.
    pub name: String,
    /// An empty directory that sandbox roots are assembled on, each in a mount namespace of
    /// its own, so one serves every instance.
    pub root: PathBuf,
    /// The instances' sandbox settings.
    pub sandbox: crate::config::SandboxConfig,
    /// The runtime instance tasks run on.
    pub runtime: tokio::runtime::Handle,
    /// The deployer's uids: a sandbox a tender starts ahead of any instance (a qemu waiting
    /// for a snapshot) leases its own, and gives it back once it has ended.
    pub uids: revboot_sandbox::uids::UidPool,
    /// Where scratch directories go ([`BootSpec::scratch`] is one); a tender names its own
    /// entries apart (`qemu-pool-…`). The deployer removes what is left at its next start.
    pub scratch: PathBuf,
}

/// Makes one tender for a deployer, from what the deployer's tenders share of the host:
/// what [`crate::Deployer::with_tenders`] receives, one per backend (a new backend is one
/// file with such a function, and one line where the daemon lists its tenders).
pub type MakeTender =
    Box<dyn FnOnce(&TenderHost) -> Result<Arc<dyn Tender>, TenderSetupError> + Send>;

/// Why a tender could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("Cannot set up the {kind:?} tender")]
pub struct TenderSetupError {
    /// Which tender.
    pub kind: TenderKind,
    /// The cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The tenders a deployer can use, by kind.
#[derive(Debug, Clone, Default)]
pub struct Tenders {
    by_kind: Vec<Arc<dyn Tender>>,
}

impl Tenders {
    /// An empty registry.
    pub fn new() -> Tenders {
        Tenders::default()
    }

    /// Adds (or replaces) the tender for its kind.
    pub fn register(&mut self, tender: Arc<dyn Tender>) {
        self.by_kind.retain(|known| known.kind() != tender.kind());
        self.by_kind.push(tender);
    }

    /// The tender for `kind`.
    pub fn get(&self, kind: TenderKind) -> Option<&Arc<dyn Tender>> {
        self.by_kind.iter().find(|tender| tender.kind() == kind)
    }

    /// All registered tenders.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Tender>> {
        self.by_kind.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reports_read_well() {
        let oom = ExitReport {
            status: ExitStatus::Signal(9),
            oom_killed: true,
        };
        assert_eq!(oom.to_string(), "killed at its memory limit (OOM)");
        let code = ExitReport {
            status: ExitStatus::Code(3),
            oom_killed: false,
        };
        assert_eq!(code.to_string(), "exited with status 3");
        assert!(!code.success());
    }

    #[tokio::test]
    async fn http_probe_waits_for_a_status_line() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let backend = listener.local_addr().expect("addr");
        let console = Console::new(1024);
        let (_exit_tx, exit) = watch::channel(None);
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 256];
            let _ = stream.read(&mut buf).await;
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("write");
        });
        let probe = Ready::Http { path: "/".into() };
        probe_ready(backend, &console, exit, &probe, Duration::from_secs(10))
            .await
            .expect("ready");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_missed_probe_is_a_timeout_and_an_exit_is_an_exit() {
        let console = Console::new(1024);
        let (exit_tx, exit) = watch::channel(None);
        let probe = Ready::Console {
            line: "never".into(),
        };
        let backend: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let missed = probe_ready(
            backend,
            &console,
            exit.clone(),
            &probe,
            Duration::from_millis(50),
        )
        .await;
        assert!(
            matches!(missed, Err(NotReady::Timeout { ms: 50, .. })),
            "{missed:?}"
        );
        exit_tx
            .send(Some(ExitReport {
                status: ExitStatus::Code(1),
                oom_killed: false,
            }))
            .expect("send");
        let ended = probe_ready(backend, &console, exit, &probe, Duration::from_secs(10)).await;
        assert_eq!(ended, Err(NotReady::Exited));
    }
}
