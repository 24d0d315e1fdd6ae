//! The spawn path: from a prepared instance to a running, sandboxed image.
//!
//! Everything here runs on the spawner thread except [`child`], which runs in the cloned
//! child, sharing the daemon's memory until it executes the image (see the module doc of
//! [`super`] for the numbered start-up). This is the crate's one place with raw system calls
//! on the spawn path; each `unsafe` block says why it holds.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Once};

use landlock::{
    ABI, Access, AccessFs, AccessNet, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr,
};
use revboot_sandbox::creds::{self, Identity};
use revboot_sandbox::root::{self, Layout};
use revboot_sandbox::seccomp::{BpfProgram, Filters};
use tracing::{debug, warn};

use super::namespaces::{HOSTNAME, NamespacePool};
use crate::config::SandboxConfig;
use crate::tender::{BootError, BootSpec};
use crate::upstream;

/// Landlock ABI the ruleset is written for (best effort on older kernels).
const LANDLOCK_ABI: ABI = ABI::V5;
/// Where an instance finds its upstream grants (the scratch directory, bound read-only).
pub(super) const UPSTREAM_DIR: &str = "/upstream";

/// What every spawn shares: compiled filters, the root's shared part, the namespace pool.
#[derive(Debug)]
pub(super) struct Spawner {
    pub(super) filters: Filters,
    pub(super) sandbox: SandboxConfig,
    /// The part of every root that does not depend on the instance.
    pub(super) base: Arc<Layout>,
    /// The mount point the root is assembled on, as the child needs it.
    pub(super) mountpoint: CString,
    pub(super) namespaces: Arc<NamespacePool>,
    pub(super) devnull: OwnedFd,
    pub(super) last_cap: u32,
}

/// One spawn's inputs beyond the shared ones.
#[derive(Debug)]
pub(super) struct Launch<'a> {
    pub(super) spec: &'a BootSpec,
    pub(super) image: &'a Path,
    pub(super) listener: RawFd,
    /// `tasks`/`cgroup.procs` files of the instance's groups, to join.
    pub(super) cgroup_procs: Vec<RawFd>,
    /// False: no memory controller, so the heap is bounded by `RLIMIT_DATA` instead.
    pub(super) memory_enforced: bool,
    pub(super) uid: u32,
}

/// A started image.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) pid: u32,
    pub(super) pid_start: Option<u64>,
    pub(super) pidfd: OwnedFd,
    pub(super) console: OwnedFd,
}

/// Steps of the child's start-up, reported with an errno when one fails.
const STEPS: &[&str] = &[
    "joining the cgroups",
    "making / private",
    "assembling the root",
    "setting the hostname",
    "setting rlimits",
    "placing fds",
    "dropping privileges",
    "setting the parent-death signal",
    "setting no-new-privileges",
    "landlock",
    "closing fds",
    "seccomp",
    "execveat",
    "moving into the root",
    "entering the pre-made namespaces",
    "assembling the instance's part of the root",
];
const STEP_CGROUPS: u32 = 0;
const STEP_PRIVATE: u32 = 1;
const STEP_BASE: u32 = 2;
const STEP_HOSTNAME: u32 = 3;
const STEP_RLIMITS: u32 = 4;
const STEP_FDS: u32 = 5;
const STEP_CREDENTIALS: u32 = 6;
const STEP_PARENT_DEATH: u32 = 7;
const STEP_NO_NEW_PRIVS: u32 = 8;
const STEP_LANDLOCK: u32 = 9;
const STEP_CLOSE: u32 = 10;
const STEP_SECCOMP: u32 = 11;
const STEP_EXEC: u32 = 12;
const STEP_PIVOT: u32 = 13;
const STEP_SETNS: u32 = 14;
const STEP_OWN: u32 = 15;

/// Everything the child touches, allocated before the clone.
struct ChildPlan<'a> {
    image: RawFd,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cgroup_procs: &'a [RawFd],
    devnull: RawFd,
    console: RawFd,
    listener: RawFd,
    error: RawFd,
    landlock: Option<RawFd>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    die_with_daemon: bool,
    filters: [&'a BpfProgram; 2],
    /// Pre-made net, ipc, uts and mount namespaces (root's shared part assembled) to
    /// enter; `None`: the clone made fresh ones and the child assembles `base` itself.
    namespaces: Option<[(RawFd, libc::c_int); 4]>,
    base: &'a Layout,
    own: &'a Layout,
    mountpoint: &'a CString,
    identity: Identity,
}

impl Spawner {
    /// Clones the child into its namespaces and waits until it has executed the image (or
    /// failed to).
    pub(super) fn spawn(&self, launch: Launch<'_>) -> Result<Started, BootError> {
        let spec = launch.spec;
        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Setup { what, source }
        };
        // The image is executed through this fd, so that the file landlock allows is the file
        // that runs, even if the cache path is replaced meanwhile.
        let image_fd = File::options()
            .read(true)
            .open(launch.image)
            .map_err(setup("image"))?;
        let image_fd = fd_above(image_fd.into()).map_err(setup("image"))?;
        let landlock = landlock_ruleset(&image_fd).map_err(|error| BootError::Setup {
            what: "landlock ruleset".into(),
            source: io::Error::other(error),
        })?;
        if landlock.is_none() {
            static WARN: Once = Once::new();
            WARN.call_once(|| {
                warn!("landlock unavailable: instances may execute files and use TCP beyond their socket")
            });
        }
        let own = self
            .own_layout(spec, launch.uid)
            .map_err(|error| BootError::Setup {
                what: "the instance's root".into(),
                source: io::Error::other(error),
            })?;
        let namespaces = self.namespaces.take();
        let (console_read, console_write) = pipe().map_err(setup("console pipe"))?;
        let (error_read, error_write) = pipe_with(libc::O_NONBLOCK).map_err(setup("error pipe"))?;

        let name = launch.image.file_name().unwrap_or(OsStr::new("image"));
        let mut argv = vec![cstring(name.as_bytes(), "argv")?];
        for arg in &spec.run.args {
            argv.push(cstring(arg.as_bytes(), "argv")?);
        }
        let env: Vec<CString> = environment(spec)
            .iter()
            .map(|entry| cstring(entry.as_bytes(), "environment"))
            .collect::<Result<_, _>>()?;
        let pointers = |strings: &[CString]| {
            let mut list: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
            list.push(std::ptr::null());
            list
        };
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
        if !launch.memory_enforced {
            // Without the memory controller, bound the heap at least.
            rlimits.push((libc::RLIMIT_DATA, limit(spec.run.memory_mib * 1024 * 1024)));
        }
        let plan = ChildPlan {
            image: image_fd.as_raw_fd(),
            argv: pointers(&argv),
            envp: pointers(&env),
            cgroup_procs: &launch.cgroup_procs,
            devnull: self.devnull.as_raw_fd(),
            console: console_write.as_raw_fd(),
            listener: launch.listener,
            error: error_write.as_raw_fd(),
            landlock: landlock.as_ref().map(AsRawFd::as_raw_fd),
            rlimits,
            die_with_daemon: self.sandbox.die_with_daemon,
            filters: [&self.filters.deny, &self.filters.clone3],
            namespaces: namespaces.as_ref().map(|set| set.raw()),
            base: &self.base,
            own: &own,
            mountpoint: &self.mountpoint,
            identity: Identity {
                uid: launch.uid,
                last_cap: self.last_cap,
            },
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
        // return or the child has exited, and a failing child writes its report (12 bytes,
        // atomic in a pipe) before it exits: an empty pipe now means the image runs. (Waiting
        // for EOF instead would wait for the exec to close every inherited descriptor, which
        // grows with the number of running instances.)
        let mut report = [0u8; 12];
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
            return Ok(Started {
                pid,
                pid_start: super::pid_start_time(pid),
                pidfd,
                console: console_read,
            });
        }
        // The child failed and exits 127: reap it so no zombie stays.
        let _ = reap_blocking(pidfd.as_raw_fd());
        let word = |at: usize| [report[at], report[at + 1], report[at + 2], report[at + 3]];
        let step = u32::from_ne_bytes(word(0));
        let detail = u32::from_ne_bytes(word(4)) as usize;
        let errno = io::Error::from_raw_os_error(i32::from_ne_bytes(word(8)));
        let source = match step {
            STEP_BASE => io::Error::new(
                errno.kind(),
                format!("{}: {errno}", self.base.describe(detail)),
            ),
            STEP_OWN => io::Error::new(errno.kind(), format!("{}: {errno}", own.describe(detail))),
            STEP_CREDENTIALS => io::Error::new(
                errno.kind(),
                format!(
                    "{}: {errno}",
                    CREDENTIAL_STEPS.get(detail).copied().unwrap_or("?")
                ),
            ),
            _ => errno,
        };
        Err(BootError::Exec {
            step: STEPS.get(step as usize).copied().unwrap_or("start-up"),
            source,
        })
    }

    /// The steps of the root that depend on the instance: its root is its uid's, its
    /// upstream grants (the scratch directory, read-only), its `/proc`.
    fn own_layout(&self, spec: &BootSpec, uid: u32) -> Result<Layout, root::LayoutError> {
        let mut own = self.base.after().own(Path::new("/"), uid)?;
        if !spec.run.upstreams.is_empty() {
            own = own.bind(
                &spec.scratch,
                Path::new(UPSTREAM_DIR),
                root::Access::ReadOnlyNoExec,
            )?;
        }
        if self.sandbox.mount_proc {
            own = own.proc()?;
        }
        Ok(own)
    }
}

/// The names of [`creds::Failure`], in its order.
const CREDENTIAL_STEPS: &[&str] = &[
    "the capability bounding set",
    "the secure bits",
    "the supplementary groups",
    "the gid",
    "the uid",
    "a capability survived the uid change",
];

fn credential_index(failure: creds::Failure) -> u32 {
    match failure {
        creds::Failure::Bounding => 0,
        creds::Failure::SecureBits => 1,
        creds::Failure::Groups => 2,
        creds::Failure::Gid => 3,
        creds::Failure::Uid => 4,
        creds::Failure::Survived => 5,
    }
}

/// The instance's environment: the socket hand-off, who it is, its grants, the manifest's.
fn environment(spec: &BootSpec) -> Vec<String> {
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
    env.extend(upstream::environment(
        Path::new(UPSTREAM_DIR),
        spec.run.upstreams.len(),
    ));
    for (key, value) in &spec.run.env {
        env.push(format!("{key}={value}"));
    }
    env
}

/// Every instance holds a few fds in the daemon (pidfd, console pipe): lift the soft fd
/// limit to the hard one, so that thousands of instances fit.
pub(super) fn raise_nofile() {
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
pub(super) fn fd_above(fd: OwnedFd) -> io::Result<OwnedFd> {
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

/// Sends `signal` through a pidfd; false if it was not delivered.
pub(super) fn send_signal(pidfd: RawFd, signal: libc::c_int) -> bool {
    // SAFETY: pidfd_send_signal with a pidfd the caller owns and a null info pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        debug!(signal, error = %io::Error::last_os_error(), "signal not delivered");
    }
    rc == 0
}

/// `waitid(P_PIDFD, WEXITED | WNOHANG)`: `Some((si_code, si_status))` if the process ended.
pub(super) fn reap(pidfd: RawFd) -> io::Result<Option<(i32, i32)>> {
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
    Ok(Some((info.si_code, status)))
}

pub(super) fn reap_blocking(pidfd: RawFd) -> io::Result<()> {
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
    // SAFETY: `spawn` passes its `ChildPlan`, alive until this child has exec'd; we are the
    // freshly cloned child.
    unsafe { child(&*plan.cast::<ChildPlan<'_>>()) }
}

/// The landlock ruleset. The mount namespace already decides what exists for an instance;
/// landlock adds: nothing executes but its image, no device node is made anywhere, no
/// ioctl on a device, no TCP bind or connect at all. `None` where the kernel has no
/// landlock.
fn landlock_ruleset(
    image: &OwnedFd,
) -> Result<Option<OwnedFd>, Box<dyn std::error::Error + Send + Sync>> {
    let handled = AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::IoctlDev;
    let ruleset = Ruleset::default()
        .handle_access(handled)?
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))?
        .create()?
        .add_rule(PathBeneath::new(image, AccessFs::Execute))?;
    let fd: Option<OwnedFd> = ruleset.into();
    fd.map(fd_above).transpose().map_err(Into::into)
}

/// The child between clone and exec. Only system calls; never returns.
///
/// # Safety
/// Must only be called in a freshly cloned child process.
unsafe fn child(plan: &ChildPlan<'_>) -> ! {
    let fail_with = |step: u32, detail: u32| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut report = [0u8; 12];
        report[..4].copy_from_slice(&step.to_ne_bytes());
        report[4..8].copy_from_slice(&detail.to_ne_bytes());
        report[8..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: writing 12 bytes from a stack buffer, then exiting without unwinding.
        unsafe {
            libc::write(plan.error, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    };
    let fail = |step: u32| -> ! { fail_with(step, 0) };
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
        for &fd in plan.cgroup_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(STEP_CGROUPS);
            }
        }
        if let Some(namespaces) = &plan.namespaces {
            for (fd, kind) in namespaces {
                if libc::setns(*fd, *kind) != 0 {
                    fail(STEP_SETNS);
                }
            }
        } else {
            if !root::make_private() {
                fail(STEP_PRIVATE);
            }
            if let Err(step) = plan.base.apply() {
                fail_with(STEP_BASE, step as u32);
            }
            if libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) != 0 {
                fail(STEP_HOSTNAME);
            }
        }
        if let Err(step) = plan.own.apply() {
            fail_with(STEP_OWN, step as u32);
        }
        if !root::pivot(plan.mountpoint) {
            fail(STEP_PIVOT);
        }
        for (resource, limit) in &plan.rlimits {
            if libc::setrlimit(*resource, limit) != 0 {
                fail(STEP_RLIMITS);
            }
        }
        if libc::dup2(plan.devnull, 0) < 0
            || libc::dup2(plan.console, 1) < 0
            || libc::dup2(plan.console, 2) < 0
            || libc::dup2(plan.listener, 3) < 0
        {
            fail(STEP_FDS);
        }
        if let Err(failure) = creds::drop_to(plan.identity) {
            fail_with(STEP_CREDENTIALS, credential_index(failure));
        }
        // After the credential change, which clears it.
        if plan.die_with_daemon && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
        {
            fail(STEP_PARENT_DEATH);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(STEP_NO_NEW_PRIVS);
        }
        if let Some(ruleset) = plan.landlock
            && libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0) != 0
        {
            fail(STEP_LANDLOCK);
        }
        // Keep 0–3; everything else closes at exec (the error pipe and the image fd are
        // still needed until then).
        if libc::close_range(
            4,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        ) != 0
        {
            fail(STEP_CLOSE);
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
                fail(STEP_SECCOMP);
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
        fail(STEP_EXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_move_above_ten() {
        let (read, write) = pipe().expect("pipe");
        assert!(read.as_raw_fd() >= 10 && write.as_raw_fd() >= 10);
    }

    #[test]
    fn every_step_and_credential_failure_has_a_name() {
        assert_eq!(STEPS.len() as u32, STEP_OWN + 1);
        assert_eq!(
            CREDENTIAL_STEPS.len() as u32,
            credential_index(creds::Failure::Survived) + 1
        );
    }
}
