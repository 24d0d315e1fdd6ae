//! The process tender: a static ELF run as a sandboxed process, solo5-spt style.
//!
//! Start-up of one instance:
//!
//! 1. `prepare`: bind the listening socket on the service address (manifest port, or an
//!    ephemeral one behind the proxy) with a deep backlog; from here on the kernel completes
//!    handshakes and queues them.
//! 2. On the spawner thread (one long-lived thread, so that `PR_SET_PDEATHSIG` means "the
//!    daemon died"): create the instance's cgroups with their limits, build the landlock
//!    ruleset, open the pipes; everything the child needs is allocated here.
//! 3. `clone` with new mount, pid, net, ipc, uts and cgroup namespaces and a pidfd, the
//!    posix_spawn way (`CLONE_VM | CLONE_VFORK`: no page tables copied, the spawner sleeps
//!    until the exec): the child is pid 1 of its own pid namespace. Between clone and exec
//!    it only makes system calls: reset the signal handlers, join the cgroups, make `/` private, make its scratch directory its root
//!    (`pivot_root`: nothing of the host's tree stays visible, so not even a pathname unix
//!    socket outside it can be reached) and mount its own `/proc` there, set the
//!    hostname and rlimits, move stdin (`/dev/null`), stdout+stderr (console pipe) and the
//!    socket (fd 3) into place, `chdir` to its root (the scratch directory), set the parent-death
//!    signal and no-new-privileges, restrict itself with landlock, mark every other fd
//!    close-on-exec,
//!    install the seccomp filters, and `execveat` the image (through the fd the landlock
//!    rule names, so a replaced cache file cannot swap the binary) with a clean environment
//!    (`LISTEN_FDS=1`, `LISTEN_PID=1`, `REVBOOT_*`, the manifest's `env`).
//! 4. A failing step writes `(step, errno)` to a close-on-exec pipe and exits 127. The
//!    vfork clone returns only once the exec is past its point of no return or the child
//!    has exited, so the parent reads the pipe once, without waiting: empty means the image
//!    is executing.
//! 5. A watcher waits on the pidfd, reaps with `waitid(P_PIDFD)`, reads the OOM counter,
//!    waits (bounded) for the console to drain, removes the cgroups, then reports the exit.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use landlock::{
    ABI, Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
};
use revboot_store::manifest::TenderKind;
use socket2::{Domain, Socket, Type};
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::admit;
use super::cgroup::{Cgroups, Controller, InstanceGroups, Limits};
use super::seccomp::{self, Filters};
use super::{
    BootError, BootSpec, BoxFuture, ExitReport, ExitStatus, Footprint, Prepared, Running, Tender,
};
use crate::config::{BackendPort, SandboxConfig};
use crate::console::Console;
use crate::upstream::{self, Grants};

/// Pending spawns queued for the spawner thread.
const SPAWN_QUEUE: usize = 256;
/// Listen backlog of an instance socket (the kernel caps it at `somaxconn`).
const BACKLOG: i32 = 4096;
/// How long an exit waits for the console to drain.
const CONSOLE_DRAIN: Duration = Duration::from_millis(500);
/// Landlock ABI the ruleset is written for (best effort on older kernels).
const LANDLOCK_ABI: ABI = ABI::V5;

/// The process tender.
#[derive(Debug)]
pub struct ProcessTender {
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::SyncSender<Job>,
}

#[derive(Debug)]
struct Shared {
    cgroups: Option<Cgroups>,
    filters: Filters,
    sandbox: SandboxConfig,
    devnull: OwnedFd,
    runtime: tokio::runtime::Handle,
    namespaces: Arc<NamespacePool>,
    /// Cgroups made ahead of time (between spawns), at most [`SPARE_CGROUPS`].
    spare_groups: std::sync::Mutex<Vec<InstanceGroups>>,
    spare_serial: std::sync::atomic::AtomicU64,
    closed: std::sync::atomic::AtomicBool,
}

/// Why the process tender could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessTenderError {
    /// The seccomp filter did not compile.
    #[error(transparent)]
    Seccomp(#[from] seccomp::FilterError),
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

impl ProcessTender {
    /// Sets the tender up: cgroup hierarchies under `revboot/<name>`, the seccomp filters,
    /// the spawner thread.
    pub fn new(
        name: &str,
        sandbox: SandboxConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<ProcessTender, ProcessTenderError> {
        raise_nofile();
        let cgroups = match Cgroups::detect(name) {
            Ok(cgroups) => Some(cgroups),
            Err(error) => {
                warn!(%error, "cgroups unusable: instances run WITHOUT memory, pids and cpu limits");
                None
            }
        };
        let devnull = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|source| ProcessTenderError::Io {
                what: "/dev/null",
                source,
            })?;
        let devnull = fd_above(devnull.into()).map_err(|source| ProcessTenderError::Io {
            what: "/dev/null",
            source,
        })?;
        let shared = Arc::new(Shared {
            cgroups,
            filters: seccomp::compile()?,
            sandbox,
            devnull,
            runtime,
            namespaces: NamespacePool::start(),
            spare_groups: std::sync::Mutex::new(Vec::new()),
            spare_serial: std::sync::atomic::AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(SPAWN_QUEUE);
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("revboot-spawner".into())
            .spawn(move || {
                loop {
                    // Spare cgroups are made when no spawn came for a while, so that making
                    // them never competes with an instance that is starting.
                    let job = if worker.spares_low() {
                        match queue.recv_timeout(SPARE_QUIET) {
                            Ok(job) => job,
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                worker.make_spare_group();
                                continue;
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    } else {
                        match queue.recv() {
                            Ok(job) => job,
                            Err(_) => break,
                        }
                    };
                    let result = worker.spawn(&job);
                    if let Err(Ok(orphan)) = job.reply.send(result) {
                        // The boot was abandoned (timed out) while spawning: end it here.
                        warn!(
                            id = job.spec.id,
                            "boot abandoned during spawn: killing the instance"
                        );
                        orphan.kill();
                    }
                }
                worker.remove_spare_groups();
            })
            .map_err(|source| ProcessTenderError::Io {
                what: "spawner thread",
                source,
            })?;
        Ok(ProcessTender { shared, jobs })
    }

    /// The cgroup layout in use (`v1`, `v2`, `hybrid`, `none`).
    pub fn cgroup_layout(&self) -> &'static str {
        self.shared.cgroups.as_ref().map_or("none", Cgroups::layout)
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
        let address = SocketAddr::new(spec.address, port);
        // A per-client instance's socket takes connections only from its service address
        // (the proxy, the probes) and from its client at the service port (with no proxy in
        // front, or steered there by the deployer; see `admit`).
        let v4 = |ip: IpAddr| match ip.to_canonical() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        };
        let admitted = spec.client.map(|client| {
            (
                v4(spec.address).into_iter().collect::<Vec<_>>(),
                v4(client).map(|client| (client, spec.run.port)),
            )
        });
        let bind = || -> io::Result<(Socket, SocketAddr)> {
            let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
            // Also on an ephemeral port: connections the kernel steers here from the service
            // port inherit this flag and linger on that port in TIME_WAIT; without it there,
            // the proxy could not bind the service address again.
            socket.set_reuse_address(true)?;
            socket.bind(&address.into())?;
            if let Some((sources, client)) = &admitted {
                admit::admit_only(&socket, sources, *client)?;
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
        Ok(Box::new(ProcessPrepared {
            spec,
            listener,
            backend,
            shared: Arc::clone(&self.shared),
            jobs: self.jobs.clone(),
        }))
    }

    fn shutdown(&self) {
        self.shared.remove_spare_groups();
    }

    fn sweep_orphans(&self) {
        if let Some(cgroups) = &self.shared.cgroups {
            let removed = cgroups.sweep();
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
    backend: SocketAddr,
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::SyncSender<Job>,
}

#[derive(Debug)]
struct Job {
    spec: BootSpec,
    image: PathBuf,
    listener: OwnedFd,
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
    fn backend(&self) -> SocketAddr {
        self.backend
    }

    fn boot(
        self: Box<Self>,
        image: PathBuf,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, BootError>> {
        Box::pin(async move {
            let ProcessPrepared {
                spec,
                listener,
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
            let pidfd = Arc::new(spawned.pidfd);
            let (exit_tx, exit) = watch::channel(None);
            let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(spawned.console)
                .map_err(setup("console pipe"))?;
            let watched = pidfd.try_clone().map_err(setup("pidfd"))?;
            // SAFETY: the AsyncFd owns `watched`, so the fd stays open while registered.
            let waiter =
                unsafe { AsyncFd::register_with_interest(watched, tokio::io::Interest::READABLE) }
                    .map_err(|error| BootError::Setup {
                        what: "pidfd".into(),
                        source: io::Error::other(error.to_string()),
                    })?;
            let drain = shared.runtime.spawn(read_console(reader, console.clone()));
            shared.runtime.spawn(watch_exit(
                waiter,
                spawned.groups,
                console.clone(),
                drain,
                exit_tx,
            ));
            Ok(Box::new(ProcessRunning {
                backend,
                console,
                footprint,
                pidfd,
                exit,
                _upstreams: upstreams,
            }) as Box<dyn Running>)
        })
    }
}

async fn read_console(mut reader: tokio::net::unix::pipe::Receiver, console: Console) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => console.push(&buffer[..read]),
        }
    }
    console.close();
}

async fn watch_exit(
    pidfd: AsyncFd<OwnedFd>,
    groups: Option<InstanceGroups>,
    console: Console,
    drain: tokio::task::JoinHandle<()>,
    exit: watch::Sender<Option<ExitReport>>,
) {
    let status = loop {
        let Ok(mut guard) = pidfd.readable().await else {
            break ExitStatus::Unknown;
        };
        match reap(pidfd.get_ref().as_raw_fd()) {
            Ok(Some(status)) => break status,
            Ok(None) => guard.clear_ready(),
            Err(error) => {
                warn!(%error, "cannot reap instance");
                break ExitStatus::Unknown;
            }
        }
    };
    let oom_killed = groups.as_ref().is_some_and(InstanceGroups::oom_killed);
    if !console.closed(CONSOLE_DRAIN).await {
        drain.abort();
        console.close();
    }
    if let Some(groups) = groups {
        let _ = tokio::task::spawn_blocking(move || groups.remove()).await;
    }
    let report = ExitReport { status, oom_killed };
    debug!(%report, "instance exited");
    let _ = exit.send(Some(report));
}

/// `waitid(P_PIDFD, WEXITED | WNOHANG)`: the status if the process ended.
fn reap(pidfd: RawFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: an all-zero siginfo_t is a valid value to pass for the kernel to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t; the fd is owned by the caller.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` for a child event (or left it zeroed: si_pid 0).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ExitStatus::Code(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => ExitStatus::Signal(status),
        _ => ExitStatus::Unknown,
    }))
}

#[derive(Debug)]
struct ProcessRunning {
    backend: SocketAddr,
    console: Console,
    footprint: Footprint,
    pidfd: Arc<OwnedFd>,
    exit: watch::Receiver<Option<ExitReport>>,
    /// The upstream grants, revoked when the instance is dropped.
    _upstreams: Grants,
}

impl ProcessRunning {
    fn signal(&self, signal: libc::c_int) {
        // SAFETY: pidfd_send_signal with a valid pidfd and a null info pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            debug!(signal, error = %io::Error::last_os_error(), "signal not delivered");
        }
    }
}

impl Running for ProcessRunning {
    fn backend(&self) -> SocketAddr {
        self.backend
    }

    fn console(&self) -> &Console {
        &self.console
    }

    fn footprint(&self) -> Footprint {
        self.footprint.clone()
    }

    fn stop(&self) {
        self.signal(libc::SIGTERM);
    }

    fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    fn exit(&self) -> watch::Receiver<Option<ExitReport>> {
        self.exit.clone()
    }

    /// Descriptor 3, where the instance got its socket, unless it moved it.
    fn listener(&self) -> io::Result<OwnedFd> {
        crate::steer::listener_at(self.pidfd.as_fd(), 3, self.backend).or_else(|_| {
            let pid = self
                .footprint
                .pid
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            crate::steer::listener_of(pid, self.backend)
        })
    }
}

/// The hostname inside an instance.
const HOSTNAME: &[u8] = b"revboot";
/// Namespace sets kept ready.
const NAMESPACE_POOL: usize = 16;

/// Fresh net, ipc, uts and mount namespaces for one instance (mount propagation already
/// private, hostname set), made ahead of time.
#[derive(Debug)]
struct Namespaces {
    fds: [(OwnedFd, libc::c_int); 4],
}

impl Namespaces {
    fn raw(&self) -> [(RawFd, libc::c_int); 4] {
        self.fds
            .each_ref()
            .map(|(fd, kind)| (fd.as_raw_fd(), *kind))
    }

    /// Moves the calling thread into new namespaces and keeps handles on them.
    fn make() -> io::Result<Namespaces> {
        // SAFETY: unshare, mount and sethostname affect only the namespaces of this thread,
        // which does nothing else.
        unsafe {
            let flags =
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            if libc::unshare(flags) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
                || libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let open = |name: &str| -> io::Result<OwnedFd> {
            let file = File::open(format!("/proc/thread-self/ns/{name}"))?;
            fd_above(file.into())
        };
        Ok(Namespaces {
            fds: [
                (open("net")?, libc::CLONE_NEWNET),
                (open("ipc")?, libc::CLONE_NEWIPC),
                (open("uts")?, libc::CLONE_NEWUTS),
                (open("mnt")?, libc::CLONE_NEWNS),
            ],
        })
    }
}

/// Keeps [`NAMESPACE_POOL`] namespace sets ready, so that creating them (a network namespace
/// alone costs milliseconds) is off the boot path. Each set serves one instance only and
/// dies with it; when the pool is empty the clone creates fresh namespaces itself.
#[derive(Debug)]
struct NamespacePool {
    sets: std::sync::Mutex<Vec<Namespaces>>,
    wanted: std::sync::Condvar,
}

impl NamespacePool {
    fn start() -> Arc<NamespacePool> {
        let pool = Arc::new(NamespacePool {
            sets: std::sync::Mutex::new(Vec::with_capacity(NAMESPACE_POOL)),
            wanted: std::sync::Condvar::new(),
        });
        let weak = Arc::downgrade(&pool);
        let spawned = std::thread::Builder::new()
            .name("revboot-namespaces".into())
            .spawn(move || {
                loop {
                    let Some(pool) = weak.upgrade() else { return };
                    {
                        let sets = pool.sets.lock().expect("pool lock is never poisoned");
                        if sets.len() >= NAMESPACE_POOL {
                            // Woken by `take`; the timeout notices a dropped pool.
                            let (sets, wait) = pool
                                .wanted
                                .wait_timeout(sets, Duration::from_secs(1))
                                .expect("pool lock is never poisoned");
                            drop(sets);
                            if !wait.timed_out() {
                                // Let the instance that took a set start before refilling.
                                std::thread::sleep(SPARE_QUIET);
                            }
                            continue;
                        }
                    }
                    match Namespaces::make() {
                        Ok(set) => pool.sets.lock().expect("pool lock is never poisoned").push(set),
                        Err(error) => {
                            warn!(%error, "cannot pre-make namespaces: instances create their own at boot");
                            return;
                        }
                    }
                }
            });
        if let Err(error) = spawned {
            warn!(%error, "no namespace pool thread: instances create their own at boot");
        }
        pool
    }

    fn take(&self) -> Option<Namespaces> {
        let set = self.sets.lock().expect("pool lock is never poisoned").pop();
        self.wanted.notify_one();
        set
    }
}

/// Every instance holds a few fds in the daemon (pidfd, console pipe): lift the soft fd
/// limit to the hard one, so that thousands of instances fit.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let old = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                debug!(
                    from = old,
                    to = limit.rlim_max,
                    "raised the open-file limit"
                );
            }
        }
    }
}

/// Moves an fd to a number ≥ 10 (close-on-exec), so that placing fds 0–3 in the child never
/// overwrites one that is still needed.
fn fd_above(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= 10 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we then own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe_with(0)
}

/// A close-on-exec pipe with extra `flags` (`O_NONBLOCK`), both ends above fd 10.
fn pipe_with(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh fds that we own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((fd_above(read)?, fd_above(write)?))
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, BootError> {
    CString::new(bytes).map_err(|_| BootError::Setup {
        what: what.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

/// The start time of a process (`/proc/<pid>/stat` field 22).
pub fn pid_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Steps of the child's start-up, reported with an errno when one fails.
const STEPS: &[&str] = &[
    "joining the cgroups",
    "making / private",
    "mounting /proc",
    "setting the hostname",
    "setting rlimits",
    "placing fds",
    "entering the scratch directory",
    "setting the parent-death signal",
    "setting no-new-privileges",
    "landlock",
    "closing fds",
    "seccomp",
    "execveat",
    "moving the root to the scratch directory",
    "entering the pre-made namespaces",
];

/// Everything the child touches, allocated before the clone.
struct ChildPlan<'a> {
    image: RawFd,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    scratch: CString,
    cgroup_procs: Vec<RawFd>,
    devnull: RawFd,
    console: RawFd,
    listener: RawFd,
    error: RawFd,
    landlock: Option<RawFd>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    mount_proc: bool,
    die_with_daemon: bool,
    filters: [&'a seccompiler::BpfProgram; 2],
    /// Pre-made net, ipc, uts and mount namespaces to enter; `None`: clone made fresh ones.
    namespaces: Option<[(RawFd, libc::c_int); 4]>,
}

/// Spare cgroups kept ready.
const SPARE_CGROUPS: usize = 8;
/// How long without a spawn before spare cgroups are made.
const SPARE_QUIET: Duration = Duration::from_millis(20);

impl Shared {
    /// True if spare cgroups should be made.
    fn spares_low(&self) -> bool {
        self.cgroups.is_some()
            && !self.closed.load(std::sync::atomic::Ordering::Acquire)
            && self
                .spare_groups
                .lock()
                .expect("spare lock is never poisoned")
                .len()
                < SPARE_CGROUPS
    }

    /// Makes one spare cgroup set if fewer than [`SPARE_CGROUPS`] are ready; false if none
    /// was needed (or none can be made).
    fn make_spare_group(&self) -> bool {
        let Some(cgroups) = &self.cgroups else {
            return false;
        };
        if self.closed.load(std::sync::atomic::Ordering::Acquire)
            || self
                .spare_groups
                .lock()
                .expect("spare lock is never poisoned")
                .len()
                >= SPARE_CGROUPS
        {
            return false;
        }
        let serial = self
            .spare_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("spare-{}-{serial}", std::process::id());
        match cgroups.create(&name) {
            Ok(groups) => {
                let mut spare = self
                    .spare_groups
                    .lock()
                    .expect("spare lock is never poisoned");
                if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                    drop(spare);
                    groups.remove();
                    return false;
                }
                spare.push(groups);
                true
            }
            Err(error) => {
                debug!(%error, "cannot make a spare cgroup");
                false
            }
        }
    }

    /// Removes the spare cgroups and makes no more.
    fn remove_spare_groups(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let spare = std::mem::take(
            &mut *self
                .spare_groups
                .lock()
                .expect("spare lock is never poisoned"),
        );
        for groups in spare {
            groups.remove();
        }
    }

    /// Runs on the spawner thread.
    fn spawn(&self, job: &Job) -> Result<Spawned, BootError> {
        let spec = &job.spec;
        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Setup { what, source }
        };
        let groups = match &self.cgroups {
            Some(cgroups) => {
                let spare = self
                    .spare_groups
                    .lock()
                    .expect("spare lock is never poisoned")
                    .pop();
                let groups = match spare {
                    Some(groups) => groups,
                    None => cgroups.create(&spec.id).map_err(setup("cgroups"))?,
                };
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
        match self.spawn_in(job, groups.as_ref()) {
            Ok((pid, pid_start, pidfd, console)) => Ok(Spawned {
                pid,
                pid_start,
                pidfd,
                console,
                groups,
            }),
            Err(error) => {
                if let Some(groups) = groups {
                    groups.remove();
                }
                Err(error)
            }
        }
    }

    fn spawn_in(
        &self,
        job: &Job,
        groups: Option<&InstanceGroups>,
    ) -> Result<(u32, Option<u64>, OwnedFd, OwnedFd), BootError> {
        let spec = &job.spec;
        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Setup { what, source }
        };
        // The image is executed through this fd, so that the file landlock allows is the file
        // that runs, even if the cache path is replaced meanwhile.
        let image_fd = File::options()
            .read(true)
            .open(&job.image)
            .map_err(setup("image"))?;
        let image_fd = fd_above(image_fd.into()).map_err(setup("image"))?;
        let landlock =
            landlock_ruleset(&spec.scratch, &image_fd).map_err(|error| BootError::Setup {
                what: "landlock ruleset".into(),
                source: io::Error::other(error),
            })?;
        if landlock.is_none() {
            static WARN: Once = Once::new();
            WARN.call_once(|| {
                warn!("landlock unavailable: instances are NOT confined to their scratch directory")
            });
        }
        let namespaces = self.namespaces.take();
        let (console_read, console_write) = pipe().map_err(setup("console pipe"))?;
        let (error_read, error_write) = pipe_with(libc::O_NONBLOCK).map_err(setup("error pipe"))?;

        let name = job.image.file_name().unwrap_or(OsStr::new("image"));
        let mut argv = vec![cstring(name.as_bytes(), "argv")?];
        for arg in &spec.run.args {
            argv.push(cstring(arg.as_bytes(), "argv")?);
        }
        let mut env = vec![
            "LISTEN_FDS=1".to_owned(),
            "LISTEN_PID=1".to_owned(),
            "LISTEN_FDNAMES=http".to_owned(),
            format!("REVBOOT_SERVICE={}", spec.service),
            format!("REVBOOT_REVISION={}", spec.revision),
            format!("REVBOOT_INSTANCE={}", spec.id),
            "PATH=/".to_owned(),
        ];
        // Before the manifest's entries: the first of two equal keys wins in getenv.
        if let Some(client) = spec.client {
            env.push(format!("REVBOOT_CLIENT={client}"));
        }
        // The instance sees its scratch directory as `/`.
        env.extend(upstream::environment(
            Path::new("/"),
            spec.run.upstreams.len(),
        ));
        for (key, value) in &spec.run.env {
            env.push(format!("{key}={value}"));
        }
        let env: Vec<CString> = env
            .iter()
            .map(|entry| cstring(entry.as_bytes(), "environment"))
            .collect::<Result<_, _>>()?;
        let pointers = |strings: &[CString]| {
            let mut list: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
            list.push(std::ptr::null());
            list
        };
        let memory_enforced = self
            .cgroups
            .as_ref()
            .is_some_and(|c| c.has(Controller::Memory));
        let limit = |value: u64| libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        let mut rlimits = vec![
            (libc::RLIMIT_NOFILE, limit(self.sandbox.nofile)),
            (libc::RLIMIT_CORE, limit(0)),
            (
                libc::RLIMIT_FSIZE,
                limit(self.sandbox.file_size_mib * 1024 * 1024),
            ),
            (libc::RLIMIT_MEMLOCK, limit(64 * 1024)),
        ];
        if !memory_enforced {
            // Without the memory controller, bound the heap at least.
            rlimits.push((libc::RLIMIT_DATA, limit(spec.run.memory_mib * 1024 * 1024)));
        }
        let plan = ChildPlan {
            image: image_fd.as_raw_fd(),
            argv: pointers(&argv),
            envp: pointers(&env),
            scratch: cstring(spec.scratch.as_os_str().as_bytes(), "scratch path")?,
            cgroup_procs: groups
                .map(|g| g.procs.iter().map(AsRawFd::as_raw_fd).collect())
                .unwrap_or_default(),
            devnull: self.devnull.as_raw_fd(),
            console: console_write.as_raw_fd(),
            listener: job.listener.as_raw_fd(),
            error: error_write.as_raw_fd(),
            landlock: landlock.as_ref().map(AsRawFd::as_raw_fd),
            rlimits,
            mount_proc: self.sandbox.mount_proc,
            die_with_daemon: self.sandbox.die_with_daemon,
            filters: [&self.filters.deny, &self.filters.clone3],
            namespaces: namespaces.as_ref().map(Namespaces::raw),
        };

        let mut pidfd: RawFd = -1;
        let fresh = if plan.namespaces.is_some() {
            0
        } else {
            libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS
        };
        // posix_spawn's way: the child borrows this address space (CLONE_VM) on a stack of
        // its own, and this thread sleeps until the child has exec'd or exited (CLONE_VFORK).
        // A fork-like clone would copy the daemon's page tables for every boot, and every
        // page the daemon then wrote would take a copy-on-write fault.
        let flags = fresh
            | libc::CLONE_VM
            | libc::CLONE_VFORK
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWCGROUP
            | libc::CLONE_PIDFD
            | libc::SIGCHLD;
        let stack = ChildStack::new().map_err(setup("child stack"))?;
        // No handler of this process may run in the child, which shares its memory: block
        // every signal across the clone; the child resets the handlers and unblocks them
        // just before exec.
        let blocked = BlockedSignals::all();
        // SAFETY: `clone_child` runs `child`, which makes nothing but system calls on memory
        // prepared above (alive until the child has exec'd: this thread sleeps until then)
        // and never returns; the stack is the child's alone.
        let pid = unsafe {
            libc::clone(
                clone_child,
                stack.top(),
                flags,
                (&raw const plan).cast_mut().cast(),
                &mut pidfd as *mut RawFd,
            )
        };
        let clone_error = io::Error::last_os_error();
        drop(blocked);
        drop(stack);
        if pid < 0 {
            return Err(BootError::Exec {
                step: "clone",
                source: clone_error,
            });
        }
        let pid = pid as u32;
        // SAFETY: clone stored a fresh pidfd that we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        drop(plan);
        drop(error_write);
        drop(console_write);
        // With CLONE_VFORK, clone returns once the child's exec is past its point of no
        // return or the child has exited, and a failing child writes its report (8 bytes,
        // atomic in a pipe) before it exits: an empty pipe now means the image runs. (Waiting
        // for EOF instead would wait for the exec to close every inherited descriptor, which
        // grows with the number of running instances.)
        let mut report = [0u8; 8];
        let filled = match File::from(error_read).read(&mut report) {
            Ok(filled) => filled,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Err(error) => {
                return Err(BootError::Exec {
                    step: "reading the start-up report",
                    source: error,
                });
            }
        };
        if filled == 0 {
            let pid_start = pid_start_time(pid);
            return Ok((pid, pid_start, pidfd, console_read));
        }
        // The child failed and exits 127: reap it so no zombie stays.
        let _ = reap_blocking(pidfd.as_raw_fd());
        let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
        let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
        Err(BootError::Exec {
            step: STEPS.get(step).copied().unwrap_or("start-up"),
            source: io::Error::from_raw_os_error(errno),
        })
    }
}

impl Spawned {
    /// Kills and reaps an instance nobody will tend, and removes its cgroups.
    fn kill(self) {
        // SAFETY: pidfd_send_signal with a valid pidfd and a null info pointer.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
        let _ = reap_blocking(self.pidfd.as_raw_fd());
        if let Some(groups) = self.groups {
            groups.remove();
        }
    }
}

fn reap_blocking(pidfd: RawFd) -> io::Result<()> {
    // SAFETY: zeroed siginfo_t is valid for the kernel to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and fd.
    if unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, libc::WEXITED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The stack a vfork-style child runs on: mapped per spawn, with a guard page below.
struct ChildStack {
    base: *mut libc::c_void,
}

impl ChildStack {
    /// Far more than `child` needs: a few small frames and no allocation.
    const SIZE: usize = 256 * 1024;
    const GUARD: usize = 4096;

    fn new() -> io::Result<ChildStack> {
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::SIZE + Self::GUARD,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base };
        // SAFETY: the lowest page of the mapping just made.
        if unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address (stacks grow down); page-aligned, so 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which clone treats as the initial stack
        // pointer.
        unsafe { self.base.cast::<u8>().add(Self::SIZE + Self::GUARD).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the child no longer runs on it (it has exec'd
        // or exited before clone returned).
        unsafe { libc::munmap(self.base, Self::SIZE + Self::GUARD) };
    }
}

/// Every signal blocked on this thread until dropped, which restores the earlier mask.
struct BlockedSignals {
    previous: libc::sigset_t,
}

impl BlockedSignals {
    fn all() -> BlockedSignals {
        // SAFETY: sigset_t is plain data that the calls below initialise.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
            BlockedSignals { previous }
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `all`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// The entry point `clone` calls in the child.
extern "C" fn clone_child(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn_in` passes its `ChildPlan`, alive until this child has exec'd; we are
    // the freshly cloned child.
    unsafe { child(&*plan.cast::<ChildPlan<'_>>()) }
}

/// The landlock ruleset: everything below the scratch directory, execute+read of the image,
/// no TCP bind or connect at all. `None` where the kernel has no landlock.
fn landlock_ruleset(
    scratch: &Path,
    image: &OwnedFd,
) -> Result<Option<OwnedFd>, Box<dyn std::error::Error + Send + Sync>> {
    let ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))?
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))?
        .create()?
        .add_rule(PathBeneath::new(
            PathFd::new(scratch)?,
            AccessFs::from_all(LANDLOCK_ABI),
        ))?
        .add_rule(PathBeneath::new(
            image,
            AccessFs::Execute | AccessFs::ReadFile,
        ))?;
    let fd: Option<OwnedFd> = ruleset.into();
    fd.map(fd_above).transpose().map_err(Into::into)
}

/// The child between clone and exec. Only system calls; never returns.
///
/// # Safety
/// Must only be called in a freshly cloned child process.
unsafe fn child(plan: &ChildPlan<'_>) -> ! {
    let fail = |step: u32| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&step.to_ne_bytes());
        report[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: writing 8 bytes from a stack buffer, then exiting without unwinding.
        unsafe {
            libc::write(plan.error, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    };
    // SAFETY (whole block): plain system calls on fds and memory prepared by the parent.
    unsafe {
        // The handlers are the daemon's (this child shares its memory until exec): back to
        // the defaults, while every signal is still blocked. Exec would reset them anyway,
        // but ignored ones (SIGPIPE) would stay ignored in the image.
        for signal in 1..=libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        for &fd in &plan.cgroup_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(0);
            }
        }
        if let Some(namespaces) = &plan.namespaces {
            for (fd, kind) in namespaces {
                if libc::setns(*fd, *kind) != 0 {
                    fail(14);
                }
            }
        } else if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(1);
        }
        // The scratch directory becomes the root: bind it onto itself (a mount point), stack
        // the old root under it and detach that.
        if libc::mount(
            plan.scratch.as_ptr(),
            plan.scratch.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
            || libc::chdir(plan.scratch.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(13);
        }
        if plan.mount_proc {
            // May exist from an earlier boot in this scratch directory; mount reports the rest.
            libc::mkdir(c"/proc".as_ptr(), 0o555);
        }
        if plan.mount_proc
            && libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ) != 0
        {
            fail(2);
        }
        if plan.namespaces.is_none()
            && libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) != 0
        {
            fail(3);
        }
        for (resource, limit) in &plan.rlimits {
            if libc::setrlimit(*resource, limit) != 0 {
                fail(4);
            }
        }
        if libc::dup2(plan.devnull, 0) < 0
            || libc::dup2(plan.console, 1) < 0
            || libc::dup2(plan.console, 2) < 0
            || libc::dup2(plan.listener, 3) < 0
        {
            fail(5);
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            fail(6);
        }
        if plan.die_with_daemon && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
        {
            fail(7);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(8);
        }
        if let Some(ruleset) = plan.landlock
            && libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0) != 0
        {
            fail(9);
        }
        // Keep 0–3; everything else closes at exec (the error pipe and the image fd are
        // still needed until then).
        if libc::close_range(
            4,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        ) != 0
        {
            fail(10);
        }
        for filter in plan.filters {
            let program = libc::sock_fprog {
                len: filter.len() as libc::c_ushort,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &program as *const libc::sock_fprog,
            ) != 0
            {
                fail(11);
            }
        }
        // ETXTBSY: a child forked elsewhere in this process (a git, another instance) may
        // still hold an inherited write descriptor of a freshly materialised image until its
        // own exec closes it. That window is short: retry for up to 50 ms.
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // The image starts with no signal blocked.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for _ in 0..50 {
            libc::syscall(
                libc::SYS_execveat,
                plan.image,
                c"".as_ptr(),
                plan.argv.as_ptr(),
                plan.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            if *libc::__errno_location() != libc::ETXTBSY {
                break;
            }
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
        fail(12)
    }
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

    #[test]
    fn fds_move_above_ten() {
        let (read, write) = pipe().expect("pipe");
        assert!(read.as_raw_fd() >= 10 && write.as_raw_fd() >= 10);
    }
}
