//! The process tender: a static ELF run as a sandboxed process, solo5-spt style.
//!
//! Start-up of one instance:
//!
//! 1. `prepare`: bind the listening socket on the service address (manifest port, or an
//!    ephemeral one behind the proxy) with a deep backlog; from here on the kernel completes
//!    handshakes and queues them.
//! 2. On the spawner thread (one long-lived thread, so that `PR_SET_PDEATHSIG` means "the
//!    daemon died"): take the instance's cgroups (made ahead, a few spare)
//!    and write their limits, build the landlock ruleset, open the pipes; everything the
//!    child needs is allocated here (the `spawn` module).
//! 3. `clone` with new pid and cgroup namespaces and a pidfd, the posix_spawn way
//!    (`CLONE_VM | CLONE_VFORK`: no page tables copied, the spawner sleeps until the exec):
//!    the child is pid 1 of its own pid namespace. Between clone and exec it only makes
//!    system calls, in the order [`revboot_sandbox`] gives: reset the signal handlers, join
//!    the cgroups, enter net, ipc, uts and mount namespaces made ahead of time with the
//!    root's shared part assembled (the `namespaces` module; or make them and assemble it), give
//!    the root to its uid, bind its upstream grants and mount its `/proc`, make the tmpfs
//!    its root (moved over `/` and `chroot`: nothing of the host's tree stays reachable, so not even a
//!    pathname unix socket outside it can be reached), set rlimits, move stdin
//!    (`/dev/null`), stdout+stderr (console pipe) and the socket (fd 3) into place, become
//!    its uid with no capability, set the parent-death signal and no-new-privileges,
//!    restrict itself with landlock, mark every other fd close-on-exec, install the
//!    seccomp filters, and `execveat` the image (through the fd the landlock rule names, so
//!    a replaced cache file cannot swap the binary) with a clean environment
//!    (`LISTEN_FDS=1`, `LISTEN_PID=1`, `REVBOOT_*`, the manifest's `env`).
//! 4. A failing step writes `(step, detail, errno)` to a close-on-exec pipe and exits 127.
//!    The vfork clone returns only once the exec is past its point of no return or the
//!    child has exited, so the parent reads the pipe once, without waiting: empty means the
//!    image is executing.
//! 5. A watcher copies the console until its pipe ends (every process of the instance is
//!    gone, or it closed its output), then opens a pidfd, waits, reaps with
//!    `waitid(P_PIDFD)` (the kernel has then killed every other process of the pid
//!    namespace), reads the OOM counter, removes the cgroups, then reports the exit (after
//!    which the deployer takes the instance's uid back). While it runs, an instance costs
//!    the daemon one descriptor, its console pipe: the pid is the daemon's unreaped child,
//!    so signals go by pid, and a pidfd is opened only when needed.
//!
//! Stop: the image is pid 1 of its namespace, and the kernel drops a signal pid 1 has no
//! handler for. A stop therefore sends `SIGTERM` only to an image that catches it
//! (`SigCgt` in its `/proc` status) and `SIGKILL` to one that does not — what `SIGTERM`'s
//! default action would have done to any other process.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use revboot_sandbox::cgroup::{Cgroups, Controller, InstanceGroups, Limits, Spares};
use revboot_sandbox::root::{Layout, Quota};
use revboot_sandbox::seccomp;
use revboot_store::manifest::TenderKind;
use socket2::{Domain, Socket, Type};
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::admit;
use super::{
    BootError, BootSpec, BoxFuture, ExitReport, ExitStatus, Footprint, Prepared, Running, Tender,
    TenderHost,
};
use crate::config::{BackendPort, SandboxConfig};
use crate::console::Console;
use crate::upstream::Grants;

#[allow(unsafe_code)] // Assembling a root in a namespace of this thread.
mod namespaces;
mod spawn;

use namespaces::NamespacePool;
use revboot_sandbox::spawn::{Exit, fd_above, reap_blocking, send_signal};
use spawn::{Launch, Spawner};

/// Pending spawns queued for the spawner thread.
const SPAWN_QUEUE: usize = 256;
/// Listen backlog of an instance socket (the kernel caps it at `somaxconn`).
const BACKLOG: i32 = 4096;

/// The process tender.
#[derive(Debug)]
pub struct ProcessTender {
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::SyncSender<Job>,
}

#[derive(Debug)]
struct Shared {
    /// Cgroups, a few made ahead with the default limits; `None` where unusable.
    spares: Option<Spares>,
    spawner: Spawner,
    runtime: tokio::runtime::Handle,
}

/// Why the process tender could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessTenderError {
    /// The seccomp filter did not compile.
    #[error(transparent)]
    Seccomp(#[from] seccomp::FilterError),
    /// The root's mount point cannot serve.
    #[error(transparent)]
    Layout(#[from] revboot_sandbox::root::LayoutError),
    /// A host resource could not be opened.
    #[error("Cannot set up the process tender: {what}")]
    Io {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The process tender for a deployer, as [`crate::Deployer::with_tenders`] takes it.
pub fn make() -> super::MakeTender {
    Box::new(|host: &TenderHost| {
        ProcessTender::new(
            &host.name,
            host.sandbox.clone(),
            &host.root,
            host.runtime.clone(),
        )
        .map(|tender| Arc::new(tender) as Arc<dyn Tender>)
        .map_err(|error| super::TenderSetupError {
            kind: TenderKind::Process,
            source: Box::new(error),
        })
    })
}

impl ProcessTender {
    /// Sets the tender up: cgroup hierarchies under `revboot/<name>`, the seccomp filters,
    /// the root's shared part (assembled on `mountpoint`, an empty directory, inside each
    /// instance's own mount namespace), the namespace pool, the spawner thread.
    pub fn new(
        name: &str,
        sandbox: SandboxConfig,
        mountpoint: &Path,
        runtime: tokio::runtime::Handle,
    ) -> Result<ProcessTender, ProcessTenderError> {
        spawn::raise_nofile();
        let spares = match Cgroups::detect(name) {
            Ok(cgroups) => {
                let defaults = revboot_store::manifest::Run::default();
                let defaults = Limits {
                    memory_bytes: defaults.memory_mib * 1024 * 1024,
                    pids: defaults.pids,
                    cpu_percent: defaults.cpu_percent,
                };
                Some(
                    Spares::start(cgroups, defaults, SPARE_CGROUPS).map_err(|source| {
                        ProcessTenderError::Io {
                            what: "the cgroup thread",
                            source,
                        }
                    })?,
                )
            }
            Err(error) => {
                warn!(%error, "cgroups unusable: instances run WITHOUT memory, pids and cpu limits");
                None
            }
        };
        let io = |what| move |source| ProcessTenderError::Io { what, source };
        // Early, while the daemon holds few descriptors (see revboot_sandbox::spawn).
        revboot_sandbox::spawn::reserve().map_err(io("a descriptor block for spawns"))?;
        std::fs::create_dir_all(mountpoint).map_err(io("the root's mount point"))?;
        let mountpoint = std::path::absolute(mountpoint).map_err(io("the root's mount point"))?;
        let devnull = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(io("/dev/null"))?;
        let devnull = fd_above(devnull.into()).map_err(io("/dev/null"))?;
        let base = Layout::new(
            &mountpoint,
            Quota {
                bytes: sandbox.scratch_mib * 1024 * 1024,
                inodes: sandbox.scratch_inodes,
                exec: false,
            },
        )?
        .devices()?
        // The mount point of the `/proc` an instance may ask for (`run.proc`).
        .dir(Path::new("/proc"))?;
        let base = Arc::new(base);
        let spawner = Spawner {
            filters: seccomp::compile()?,
            mountpoint: std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).map_err(
                |_| revboot_sandbox::root::LayoutError {
                    path: mountpoint.clone(),
                    why: "it contains a NUL byte",
                },
            )?,
            namespaces: NamespacePool::start(Arc::clone(&base)),
            base,
            devnull,
            last_cap: revboot_sandbox::creds::Identity::new(0).last_cap,
            sandbox: sandbox.clone(),
        };
        let shared = Arc::new(Shared {
            spares,
            spawner,
            runtime,
        });
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(SPAWN_QUEUE);
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("revboot-spawner".into())
            .spawn(move || {
                while let Ok(job) = queue.recv() {
                    // The clone runs on the daemon's main thread when it is the parent of
                    // every sandbox (revboot_sandbox::parent: an upgrade in place keeps them).
                    let shared = Arc::clone(&worker);
                    let (job, result) = revboot_sandbox::parent::run(move || {
                        let result = shared.spawn(&job);
                        (job, result)
                    });
                    if let Err(Ok(orphan)) = job.reply.send(result) {
                        // The boot was abandoned (timed out) while spawning: end it here.
                        warn!(
                            id = job.spec.id,
                            "boot abandoned during spawn: killing the instance"
                        );
                        orphan.kill();
                    }
                }
                if let Some(spares) = &worker.spares {
                    spares.close();
                }
            })
            .map_err(io("spawner thread"))?;
        Ok(ProcessTender { shared, jobs })
    }

    /// The cgroup layout in use (`v1`, `v2`, `hybrid`, `none`).
    pub fn cgroup_layout(&self) -> &'static str {
        self.shared
            .spares
            .as_ref()
            .map_or("none", |spares| spares.cgroups().layout())
    }
}

impl Tender for ProcessTender {
    fn kind(&self) -> TenderKind {
        TenderKind::Process
    }

    fn prepare(&self, spec: BootSpec) -> Result<Box<dyn Prepared>, BootError> {
        let port = match spec.backend_port {
            BackendPort::Same => spec.run.port,
            BackendPort::Ephemeral => 0,
        };
        let address = SocketAddr::new(spec.addresses.primary(), port);
        // A per-client instance's socket takes connections only from its service addresses
        // (the proxy, the probes) and from its client at the service port (with no proxy in
        // front, or steered there by the deployer; see `admit`).
        let admitted = spec.client.map(|client| {
            let own: Vec<IpAddr> = spec.addresses.iter().collect();
            (own, (client, spec.run.port))
        });
        let dual_stack = spec.addresses.v4().is_some() && spec.addresses.v6().is_some();
        let bind = || -> io::Result<(Socket, SocketAddr)> {
            let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
            // Also on an ephemeral port: connections the kernel steers here from the service
            // port inherit this flag and linger on that port in TIME_WAIT; without it there,
            // the proxy could not bind the service address again.
            socket.set_reuse_address(true)?;
            if address.is_ipv6() {
                // With an address of each family the kernel steers IPv4 connections here too.
                socket.set_only_v6(!dual_stack)?;
                // An address of a prefix routed to `lo` ("AnyIP") is local to the kernel's
                // routing but not an interface address, which an IPv6 bind checks for.
                socket.set_freebind_v6(true)?;
            }
            socket.bind(&address.into())?;
            if let Some((sources, client)) = &admitted {
                admit::admit_only(&socket, sources, Some(*client))?;
            }
            socket.listen(BACKLOG)?;
            // Only an ephemeral port needs asking for (a syscall on the summon path).
            if port != 0 {
                return Ok((socket, address));
            }
            let local = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("not an inet socket"))?;
            Ok((socket, local))
        };
        let (listener, backend) = bind().map_err(|source| BootError::Bind { address, source })?;
        let handoff = match spec.run.handoff {
            true => Some(crate::Handoff::pair().map_err(|source| BootError::Setup {
                what: "hand-off socket".into(),
                source,
            })?),
            false => None,
        };
        Ok(Box::new(ProcessPrepared {
            spec,
            listener,
            handoff,
            backend,
            shared: Arc::clone(&self.shared),
            jobs: self.jobs.clone(),
        }))
    }

    fn shutdown(&self) {
        if let Some(spares) = &self.shared.spares {
            spares.close();
        }
    }

    fn adopt(&self, adopted: super::Adopted) -> Result<Box<dyn Running>, BootError> {
        self.adopt_running(adopted)
    }

    fn sweep_orphans(&self, keep: &[PathBuf]) {
        if let Some(spares) = &self.shared.spares {
            let removed = spares.cgroups().sweep(keep);
            if removed > 0 {
                warn!(removed, "removed orphaned instance cgroups");
            }
        }
    }
}

#[derive(Debug)]
struct ProcessPrepared {
    spec: BootSpec,
    listener: Socket,
    /// The daemon's end and the instance's of its hand-off socket (`crate::handoff`).
    handoff: Option<(crate::Handoff, OwnedFd)>,
    backend: SocketAddr,
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::SyncSender<Job>,
}

#[derive(Debug)]
struct Job {
    spec: BootSpec,
    image: PathBuf,
    listener: OwnedFd,
    /// The instance's end of its hand-off socket, placed at fd 4.
    handoff: Option<OwnedFd>,
    reply: oneshot::Sender<Result<Spawned, BootError>>,
}

#[derive(Debug)]
struct Spawned {
    pid: u32,
    pid_start: Option<u64>,
    pidfd: OwnedFd,
    console: OwnedFd,
    groups: Option<InstanceGroups>,
}

impl Prepared for ProcessPrepared {
    fn backend(&self) -> Option<SocketAddr> {
        Some(self.backend)
    }

    fn handoff(&self) -> Option<crate::Handoff> {
        self.handoff.as_ref().map(|(ours, _)| ours.clone())
    }

    fn boot(
        self: Box<Self>,
        image: PathBuf,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, BootError>> {
        Box::pin(async move {
            let ProcessPrepared {
                spec,
                listener,
                handoff,
                backend,
                shared,
                jobs,
            } = *self;
            let setup = |what: &str| {
                let what = what.to_owned();
                move |source| BootError::Setup { what, source }
            };
            super::make_scratch(&spec)?;
            let listener_fd = fd_above(listener.into()).map_err(setup("listening socket"))?;
            // The daemon's end stays with the deployer's entry (`Prepared::handoff`).
            let handoff = handoff
                .map(|(_, theirs)| fd_above(theirs))
                .transpose()
                .map_err(setup("hand-off socket"))?;
            let console_bytes = spec.console_bytes;
            // The only way out of the empty network namespace; revoked when dropped.
            let upstreams = Grants::open(&spec.scratch, &spec.run.upstreams).map_err(|error| {
                BootError::Setup {
                    what: "upstream grants".into(),
                    source: error.into_io(),
                }
            })?;
            let (reply, result) = oneshot::channel();
            let gone = || BootError::Setup {
                what: "spawn queue".into(),
                source: io::Error::other("spawner thread gone"),
            };
            let job = Job {
                spec,
                image,
                listener: listener_fd,
                handoff,
                reply,
            };
            match jobs.try_send(job) {
                Ok(()) => {}
                // A full queue: wait for room on a blocking thread; the boot timeout bounds
                // the wait.
                Err(std::sync::mpsc::TrySendError::Full(job)) => {
                    tokio::task::spawn_blocking(move || jobs.send(job).map_err(drop))
                        .await
                        .map_err(|_| gone())?
                        .map_err(|_| gone())?;
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(gone()),
            }
            let spawned = result.await.map_err(|_| BootError::Setup {
                what: "spawner thread".into(),
                source: io::Error::other("spawner thread gone"),
            })??;
            let console = Console::new(console_bytes);
            let footprint = Footprint {
                pid: Some(spawned.pid),
                pid_start: spawned.pid_start,
                cgroups: spawned
                    .groups
                    .as_ref()
                    .map(InstanceGroups::dirs)
                    .unwrap_or_default(),
            };
            // The pidfd closes here: while it runs, an instance costs the daemon one
            // descriptor, its console pipe (module doc, step 5).
            drop(spawned.pidfd);
            let child = Arc::new(Child {
                pid: spawned.pid,
                reaped: std::sync::RwLock::new(false),
            });
            let (exit_tx, exit) = watch::channel(None);
            let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(spawned.console)
                .map_err(setup("console pipe"))?;
            let (handover, handover_rx) = oneshot::channel();
            shared.runtime.spawn(watch_exit(
                Arc::clone(&child),
                reader,
                spawned.groups,
                console.clone(),
                exit_tx,
                handover_rx,
            ));
            Ok(Box::new(ProcessRunning {
                backend,
                console,
                footprint,
                child,
                exit,
                handover: std::sync::Mutex::new(Some(handover)),
                _upstreams: upstreams,
            }) as Box<dyn Running>)
        })
    }
}

/// The instance's first process between spawn and reap. Its pid stays the daemon's child
/// until reaped, so it cannot be reused meanwhile; the lock keeps a signal from racing the
/// reap.
#[derive(Debug)]
struct Child {
    pid: u32,
    reaped: std::sync::RwLock<bool>,
}

impl Child {
    fn signal(&self, signal: libc::c_int) {
        let reaped = self.reaped.read().unwrap_or_else(|e| e.into_inner());
        if !*reaped && !revboot_sandbox::spawn::kill(self.pid, signal) {
            debug!(signal, error = %io::Error::last_os_error(), "signal not delivered");
        }
    }

    /// A pidfd of the process, while it is not reaped.
    fn pidfd(&self) -> io::Result<OwnedFd> {
        let reaped = self.reaped.read().unwrap_or_else(|e| e.into_inner());
        if *reaped {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        revboot_sandbox::spawn::pidfd_open(self.pid)
    }

    /// Reaps it if it has ended (through `pidfd`, its own).
    fn reap(&self, pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
        let mut reaped = self.reaped.write().unwrap_or_else(|e| e.into_inner());
        let status = match revboot_sandbox::spawn::reap(pidfd.as_raw_fd())? {
            None => return Ok(None),
            Some(Exit::Code(code)) => ExitStatus::Code(code),
            Some(Exit::Signal(signal)) => ExitStatus::Signal(signal),
        };
        *reaped = true;
        Ok(Some(status))
    }
}

/// Copies the console into its ring until the end of the pipe, then waits for the exit:
///
/// 1. The pipe ends when every process of the instance has closed it: normally when pid 1
///    died and the kernel killed the rest of its pid namespace (an instance can close its
///    output earlier; nothing changes then but how long step 2 waits).
/// 2. Only then a pidfd is opened, waited on, and the process reaped: a running instance
///    holds no descriptor of the daemon but its console pipe.
///
/// Asked to hand the instance over (an upgrade in place), it gives the pipe's descriptor
/// back instead and ends there: the instance is the next daemon's to watch.
async fn watch_exit(
    child: Arc<Child>,
    mut reader: tokio::net::unix::pipe::Receiver,
    groups: Option<InstanceGroups>,
    console: Console,
    exit: watch::Sender<Option<ExitReport>>,
    mut handover: oneshot::Receiver<HandOver>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut may_hand_over = true;
    loop {
        tokio::select! {
            read = reader.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(read) => console.push(&buffer[..read]),
            },
            asked = &mut handover, if may_hand_over => match asked {
                Ok(reply) => {
                    let _ = reply.send(reader.into_blocking_fd().ok());
                    return;
                }
                // The instance's handle is gone: nobody will ask.
                Err(_) => may_hand_over = false,
            },
        }
    }
    drop(reader);
    console.close();
    let status = match wait_for_exit(&child).await {
        Ok(status) => status,
        Err(error) => {
            warn!(%error, pid = child.pid, "cannot reap instance");
            ExitStatus::Unknown
        }
    };
    let oom_killed = groups.as_ref().is_some_and(InstanceGroups::oom_killed);
    if let Some(groups) = groups {
        let _ = tokio::task::spawn_blocking(move || groups.remove()).await;
    }
    let report = ExitReport { status, oom_killed };
    debug!(%report, "instance exited");
    let _ = exit.send(Some(report));
}

/// Waits on a pidfd of `child` until it can be reaped, and reaps it.
#[allow(unsafe_code)] // Registering the pidfd with the reactor.
async fn wait_for_exit(child: &Child) -> io::Result<ExitStatus> {
    let pidfd = child.pidfd()?;
    if let Some(status) = child.reap(&pidfd)? {
        return Ok(status);
    }
    // SAFETY: the AsyncFd owns the pidfd, so it stays open while registered.
    let waiter = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|error| io::Error::other(error.to_string()))?;
    loop {
        let mut guard = waiter.readable().await?;
        if let Some(status) = child.reap(waiter.get_ref())? {
            return Ok(status);
        }
        guard.clear_ready();
    }
}

/// What the process tender hands over of its own ([`super::Handed::tender`]).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Own {
    /// The instance's upstream grants, if it has any.
    grants: Option<crate::upstream::GrantsState>,
}

/// A request to [`watch_exit`] for the console pipe, to hand it over.
type HandOver = oneshot::Sender<Option<OwnedFd>>;

#[derive(Debug)]
struct ProcessRunning {
    backend: SocketAddr,
    console: Console,
    footprint: Footprint,
    child: Arc<Child>,
    exit: watch::Receiver<Option<ExitReport>>,
    /// Asks the watcher for the console pipe (once).
    handover: std::sync::Mutex<Option<oneshot::Sender<HandOver>>>,
    /// The upstream grants, revoked when the instance is dropped.
    _upstreams: Grants,
}

impl ProcessRunning {
    fn signal(&self, signal: libc::c_int) {
        self.child.signal(signal);
    }
}

/// True if process `pid` has a handler for `SIGTERM` (`SigCgt` in its status). Unknown
/// (the process is gone or unreadable) counts as true, so a stop stays graceful.
fn catches_sigterm(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_none_or(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

impl Running for ProcessRunning {
    fn backend(&self) -> Option<SocketAddr> {
        Some(self.backend)
    }

    fn console(&self) -> &Console {
        &self.console
    }

    fn footprint(&self) -> Footprint {
        self.footprint.clone()
    }

    /// `SIGTERM` if the image handles it; pid 1 of a namespace ignores it otherwise, so
    /// `SIGKILL`, which is what `SIGTERM` would have done (module doc).
    fn stop(&self) {
        let graceful = self.footprint.pid.is_none_or(catches_sigterm);
        self.signal(if graceful {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        });
    }

    fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    fn exit(&self) -> watch::Receiver<Option<ExitReport>> {
        self.exit.clone()
    }

    /// Its upstream grants' sockets ([`Grants::hand_over`]), then the console pipe, from
    /// the watcher, which stops there.
    fn hand_over(&self) -> BoxFuture<'_, Option<super::Handed>> {
        Box::pin(async move {
            let (grants, fds) = if self._upstreams.paths().is_empty() {
                (None, Vec::new())
            } else {
                let (grants, fds) = self._upstreams.hand_over().await?;
                (Some(grants), fds)
            };
            let ask = self
                .handover
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()?;
            let (reply, answer) = oneshot::channel();
            ask.send(reply).ok()?;
            let console = answer.await.ok()??;
            Some(super::Handed {
                console,
                tail: self.console.tail(),
                tender: serde_json::to_value(Own { grants }).expect("numbers and paths serialise"),
                keep: Vec::new(),
                fds,
            })
        })
    }

    /// The socket was bound and listening before the process started (`LISTEN_FDS`).
    fn holds_handshakes(&self) -> bool {
        true
    }

    /// Descriptor 3, where the instance got its socket, unless it moved it.
    fn listener(&self) -> io::Result<OwnedFd> {
        let pidfd = self.child.pidfd()?;
        crate::steer::listener_at(pidfd.as_fd(), 3, self.backend).or_else(|_| {
            let pid = self
                .footprint
                .pid
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            crate::steer::listener_of(pid, self.backend)
        })
    }
}

impl ProcessTender {
    /// Tends on an instance of the previous daemon (an upgrade in place): its process is
    /// this process's child still (`revboot_sandbox::parent`), so it is watched and reaped
    /// as if it had been started here.
    fn adopt_running(&self, adopted: super::Adopted) -> Result<Box<dyn Running>, BootError> {
        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Setup { what, source }
        };
        let pid = adopted
            .footprint
            .pid
            .ok_or_else(|| setup("an instance handed over")(io::Error::other("no pid")))?;
        // A program older than the grants' hand-over handed `null`.
        let own: Own = serde_json::from_value(adopted.tender.clone()).unwrap_or_default();
        let upstreams = match &own.grants {
            Some(grants) => Grants::adopt(grants, crate::upstream::Limits::default())
                .map_err(setup("upstream grants handed over"))?,
            None => Grants::none(),
        };
        let console = Console::new(adopted.console_bytes);
        console.push(&adopted.tail);
        let groups = self
            .shared
            .spares
            .as_ref()
            .map(|spares| spares.cgroups().adopt(&adopted.footprint.cgroups));
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(adopted.console)
            .map_err(setup("console pipe"))?;
        let child = Arc::new(Child {
            pid,
            reaped: std::sync::RwLock::new(false),
        });
        let (exit_tx, exit) = watch::channel(None);
        let (handover, handover_rx) = oneshot::channel();
        self.shared.runtime.spawn(watch_exit(
            Arc::clone(&child),
            reader,
            groups,
            console.clone(),
            exit_tx,
            handover_rx,
        ));
        Ok(Box::new(ProcessRunning {
            backend: adopted.backend,
            console,
            footprint: adopted.footprint,
            child,
            exit,
            handover: std::sync::Mutex::new(Some(handover)),
            _upstreams: upstreams,
        }))
    }
}

/// Cgroup sets kept ready, with the default limits.
const SPARE_CGROUPS: usize = 16;

impl Shared {
    /// Runs on the spawner thread.
    fn spawn(&self, job: &Job) -> Result<Spawned, BootError> {
        let spec = &job.spec;
        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Setup { what, source }
        };
        let groups = match &self.spares {
            Some(spares) => {
                let mut groups = spares.take(&spec.id).map_err(setup("cgroups"))?;
                let limits = Limits {
                    memory_bytes: spec.run.memory_mib * 1024 * 1024,
                    pids: spec.run.pids,
                    cpu_percent: spec.run.cpu_percent,
                };
                if let Err(error) = groups.limit(limits) {
                    groups.remove();
                    return Err(BootError::Setup {
                        what: "cgroup limits".into(),
                        source: error,
                    });
                }
                Some(groups)
            }
            None => None,
        };
        let launch = Launch {
            spec,
            image: &job.image,
            listener: job.listener.as_raw_fd(),
            handoff: job.handoff.as_ref().map(AsRawFd::as_raw_fd),
            cgroup_procs: groups
                .as_ref()
                .map(|g| g.procs.iter().map(AsRawFd::as_raw_fd).collect())
                .unwrap_or_default(),
            memory_enforced: self
                .spares
                .as_ref()
                .is_some_and(|s| s.cgroups().has(Controller::Memory)),
            uid: spec.uid,
        };
        match self.spawner.spawn(launch) {
            Ok(started) => Ok(Spawned {
                pid: started.pid,
                pid_start: started.pid_start,
                pidfd: started.pidfd,
                console: started.console,
                groups: groups.map(|mut groups| {
                    groups.joined();
                    groups
                }),
            }),
            Err(error) => {
                if let Some(groups) = groups {
                    groups.remove();
                }
                Err(error)
            }
        }
    }
}

impl Spawned {
    /// Kills and reaps an instance nobody will tend, and removes its cgroups.
    fn kill(self) {
        send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = reap_blocking(self.pidfd.as_raw_fd());
        if let Some(groups) = self.groups {
            groups.remove();
        }
    }
}

/// The start time of a process (`/proc/<pid>/stat` field 22).
pub fn pid_start_time(pid: u32) -> Option<u64> {
    revboot_sandbox::stat::read(pid).map(|stat| stat.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_start_time() {
        let start = pid_start_time(std::process::id()).expect("own stat");
        assert!(start > 0);
        assert_eq!(pid_start_time(u32::MAX), None);
    }
}
