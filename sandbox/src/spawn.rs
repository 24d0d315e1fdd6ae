//! Starting a program in a sandbox: the one place where a child runs between `clone` and
//! `exec`.
//!
//! 1. The caller prepares a [`Plan`]: every path, argument and descriptor the child
//!    needs, allocated before the clone.
//! 2. [`spawn`] clones the posix_spawn way (`CLONE_VM | CLONE_VFORK`: the child borrows
//!    the caller's memory on a stack of its own, and the calling thread sleeps until the
//!    child has executed the program or exited), with new pid and cgroup namespaces, a
//!    pidfd, and new mount, net, ipc and uts namespaces unless the plan enters ones made
//!    ahead of time. A fork-like clone would copy the caller's page tables for every
//!    spawn, and every page the caller then wrote would take a copy-on-write fault.
//! 3. Nor does the clone copy the descriptor table (`CLONE_FILES`): a daemon with thousands
//!    of instances holds tens of thousands of descriptors, and copying them (and closing
//!    them again at `exec`) made each boot slower than the one before. Every descriptor the
//!    child needs is duplicated into a block of `SLOTS` numbers claimed once, low in the
//!    table; the child's first step, `close_range(end of block, ∞, CLOSE_RANGE_UNSHARE)`,
//!    gives it a table of its own holding only the numbers below the block's end.
//! 4. The child makes system calls only, in the order the crate doc gives: reset the signal
//!    handlers, join the cgroups, enter or make its namespaces, assemble its root and
//!    enter it, set the hostname, bring loopback up (a fresh network namespace only,
//!    when asked), `chdir`, set rlimits, place its descriptors at 0, 1, 2, …, start a new
//!    session, drop to its uid ([`crate::creds`]), set the parent-death signal and
//!    no-new-privileges, apply landlock and the seccomp filters, and `exec`.
//! 5. A failing step writes `(step, detail, errno)` to a close-on-exec pipe and exits 127.
//!    Since the clone returns only once the exec is past its point of no return or the
//!    child has exited, the caller reads the pipe once without waiting: empty means the
//!    program runs.
//!
//! The parent-death signal is sent when the *thread* that cloned the child ends: spawn
//! from a thread that lives as long as the sandboxes it starts.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::creds::{self, Identity};
use crate::root::{self, Layout};
use crate::seccomp::BpfProgram;

/// The program to execute.
#[derive(Debug, Clone, Copy)]
pub enum Program<'a> {
    /// An open file, executed with `execveat(AT_EMPTY_PATH)`: the file checked is the
    /// file that runs, whatever happens to its path meanwhile.
    Fd(RawFd),
    /// A path as the sandbox sees it.
    Path(&'a CStr),
}

/// Namespaces of the child, beyond its own pid and cgroup namespaces.
#[derive(Debug, Clone, Copy)]
pub enum Namespaces {
    /// New mount, ipc and uts namespaces, and a new (empty) network namespace unless
    /// `host_network`; the child assembles the whole root.
    Fresh {
        /// Keep the caller's network namespace (a build that may fetch).
        host_network: bool,
    },
    /// Enter these net, ipc, uts and mount namespaces (mount propagation private, root's
    /// shared part assembled, hostname set), made ahead of time.
    Enter([(RawFd, libc::c_int); 4]),
}

/// Everything a child needs, prepared by the caller.
#[derive(Debug)]
pub struct Plan<'a> {
    /// What to execute.
    pub program: Program<'a>,
    /// `argv`, with `argv[0]`.
    pub argv: &'a [CString],
    /// The whole environment, `KEY=value`.
    pub envp: &'a [CString],
    /// Opened `tasks` (v1) or `cgroup.procs` (v2) files to join.
    pub cgroup_procs: &'a [RawFd],
    /// Which namespaces.
    pub namespaces: Namespaces,
    /// The root's shared part: applied only with [`Namespaces::Fresh`].
    pub base: &'a Layout,
    /// The child's own part of its root, applied in any case.
    pub own: &'a Layout,
    /// The mount point both layouts assemble on.
    pub mountpoint: &'a CStr,
    /// Hostname, set with [`Namespaces::Fresh`].
    pub hostname: &'a CStr,
    /// Bring up `lo` in a fresh network namespace (a build's tests may use loopback).
    pub loopback: bool,
    /// Working directory, inside the root.
    pub cwd: &'a CStr,
    /// rlimits, set for the soft and hard limit alike.
    pub rlimits: &'a [(libc::__rlimit_resource_t, u64)],
    /// Descriptors placed at 0, 1, 2, …; every other descriptor closes at exec.
    pub fds: &'a [RawFd],
    /// Start a new session (no controlling terminal, its own process group).
    pub new_session: bool,
    /// Who it runs as.
    pub identity: Identity,
    /// `SIGKILL` when the spawning thread ends.
    pub die_with_parent: bool,
    /// A landlock ruleset to restrict itself with.
    pub landlock: Option<RawFd>,
    /// Seccomp filters, installed in order.
    pub filters: &'a [&'a BpfProgram],
}

/// A started program.
#[derive(Debug)]
pub struct Started {
    /// Its pid (in the caller's pid namespace).
    pub pid: u32,
    /// A pidfd of it.
    pub pidfd: OwnedFd,
}

/// Why a child did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// Preparing the spawn failed (stack, pipe, clone).
    #[error("Cannot start a sandbox: {what}")]
    Setup {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A step in the child failed.
    #[error("Cannot start the sandboxed program: {step} failed")]
    Step {
        /// The step.
        step: &'static str,
        /// The cause, with what the step was doing.
        #[source]
        source: io::Error,
    },
}

/// Steps of the child, reported with an errno when one fails.
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
    "exec",
    "moving into the root",
    "entering the pre-made namespaces",
    "assembling the sandbox's own part of the root",
    "bringing up loopback",
    "entering the working directory",
    "starting a session",
    "taking a descriptor table of its own",
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
const STEP_LOOPBACK: u32 = 16;
const STEP_CWD: u32 = 17;
const STEP_SESSION: u32 = 18;
const STEP_UNSHARE_FILES: u32 = 19;

/// The most descriptors a plan may place.
const MAX_FDS: usize = 16;
/// Slots in the block every child's descriptors go through: up to [`MAX_FDS`] placed ones,
/// cgroup files, namespaces, the image, the landlock ruleset, the report pipe.
const SLOTS: usize = 32;
/// The block, claimed by the first spawn (or [`reserve`]) and kept for the process's life.
static BLOCK: std::sync::Mutex<Option<Block>> = std::sync::Mutex::new(None);

/// Claims the block of descriptor slots now, while the process holds few descriptors: the
/// lower the block, the less each child copies (module doc). Tenders call it as they start;
/// a spawn claims it otherwise.
pub fn reserve() -> io::Result<()> {
    let mut block = BLOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if block.is_none() {
        *block = Some(Block::claim()?);
    }
    Ok(())
}

/// [`SLOTS`] consecutive descriptor numbers, each holding `/dev/null` while unused.
#[derive(Debug)]
struct Block {
    base: RawFd,
    /// `/dev/null`, put back into a slot once a spawn is done with it.
    placeholder: OwnedFd,
}

impl Block {
    /// Takes the lowest run of [`SLOTS`] free numbers at or above [`MAX_FDS`]. Numbers come
    /// from `F_DUPFD`, which only returns free ones, so no descriptor of another thread is
    /// ever overwritten; numbers of a broken run are given back.
    fn claim() -> io::Result<Block> {
        let placeholder = OwnedFd::from(File::options().read(true).write(true).open("/dev/null")?);
        let mut held: Vec<OwnedFd> = Vec::new();
        let mut run = 0;
        while run < SLOTS {
            if held.len() > 64 * SLOTS {
                return Err(io::Error::other("no run of free descriptor numbers"));
            }
            // SAFETY: F_DUPFD_CLOEXEC of an open descriptor returns a new one we own.
            let fd = unsafe {
                libc::fcntl(
                    placeholder.as_raw_fd(),
                    libc::F_DUPFD_CLOEXEC,
                    MAX_FDS as libc::c_int,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let follows = held.last().is_some_and(|last| last.as_raw_fd() + 1 == fd);
            run = if follows { run + 1 } else { 1 };
            // SAFETY: fresh, ours.
            held.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let slots = held.split_off(held.len() - SLOTS);
        drop(held);
        let base = slots[0].as_raw_fd();
        // The slots stay open for the process's life, holding /dev/null until used.
        for slot in slots {
            std::mem::forget(slot);
        }
        Ok(Block { base, placeholder })
    }

    /// The number just past the block.
    fn end(&self) -> RawFd {
        self.base + SLOTS as RawFd
    }

    fn slots(&self) -> Slots<'_> {
        Slots {
            block: self,
            used: 0,
        }
    }
}

/// The slots one spawn uses; dropping puts `/dev/null` back into each.
struct Slots<'a> {
    block: &'a Block,
    used: usize,
}

impl Slots<'_> {
    /// Duplicates `fd` into the next slot and returns the slot's number.
    fn put(&mut self, fd: RawFd) -> io::Result<RawFd> {
        if self.used == SLOTS {
            return Err(io::Error::other("more descriptors than slots"));
        }
        let slot = self.block.base + self.used as RawFd;
        // SAFETY: dup3 onto a slot of the block, which only this spawn (holding the block's
        // lock) uses; `fd` is the caller's, open.
        if unsafe { libc::dup3(fd, slot, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.used += 1;
        Ok(slot)
    }
}

impl Drop for Slots<'_> {
    fn drop(&mut self) {
        for n in 0..self.used {
            // SAFETY: as in `put`: our slot, our placeholder.
            unsafe {
                libc::dup3(
                    self.block.placeholder.as_raw_fd(),
                    self.block.base + n as RawFd,
                    libc::O_CLOEXEC,
                );
            }
        }
    }
}

/// Starts `plan`'s program (see the module doc). Blocks the calling thread until the
/// program runs or the child failed.
pub fn spawn(plan: &Plan<'_>) -> Result<Started, SpawnError> {
    let setup = |what| move |source| SpawnError::Setup { what, source };
    if plan.fds.len() > MAX_FDS {
        return Err(SpawnError::Setup {
            what: "placing fds",
            source: io::Error::new(io::ErrorKind::InvalidInput, "more than 16 descriptors"),
        });
    }
    let (error_read, error_write) = pipe(libc::O_NONBLOCK).map_err(setup("error pipe"))?;
    let pointers = |strings: &[CString]| {
        let mut list: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        list.push(std::ptr::null());
        list
    };
    let rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)> = plan
        .rlimits
        .iter()
        .map(|&(resource, value)| {
            (
                resource,
                libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                },
            )
        })
        .collect();
    // Every descriptor the child uses goes into the block of slots (module doc, step 3),
    // the only descriptors its copy of the table holds besides the caller's first few.
    let mut block = BLOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let block = match &mut *block {
        Some(block) => block,
        empty => empty.insert(Block::claim().map_err(setup("a descriptor block"))?),
    };
    let mut slots = block.slots();
    let mut put = |fd: RawFd| slots.put(fd).map_err(setup("a descriptor slot"));
    let cgroup_procs = plan
        .cgroup_procs
        .iter()
        .map(|&fd| put(fd))
        .collect::<Result<Vec<_>, _>>()?;
    let namespaces = match plan.namespaces {
        Namespaces::Enter(set) => {
            let mut entered = set;
            for (fd, _) in &mut entered {
                *fd = put(*fd)?;
            }
            Namespaces::Enter(entered)
        }
        fresh => fresh,
    };
    let sources = plan
        .fds
        .iter()
        .map(|&fd| put(fd))
        .collect::<Result<Vec<_>, _>>()?;
    let landlock = plan.landlock.map(&mut put).transpose()?;
    let image = match plan.program {
        Program::Fd(fd) => Some(put(fd)?),
        Program::Path(_) => None,
    };
    let error = put(error_write.as_raw_fd())?;
    let child = Child {
        plan,
        cgroup_procs,
        namespaces,
        landlock,
        image,
        argv: pointers(plan.argv),
        envp: pointers(plan.envp),
        rlimits,
        fds: sources,
        error,
        table_end: block.end(),
    };
    let mut pidfd: RawFd = -1;
    let mut flags = libc::CLONE_VM
        | libc::CLONE_VFORK
        | libc::CLONE_FILES
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_PIDFD
        | libc::SIGCHLD;
    if let Namespaces::Fresh { host_network } = plan.namespaces {
        flags |= libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if !host_network {
            flags |= libc::CLONE_NEWNET;
        }
    }
    let stack = ChildStack::new().map_err(setup("child stack"))?;
    // No handler of the caller may run in the child, which shares its memory: block every
    // signal across the clone; the child resets the handlers and unblocks them just before
    // exec.
    let blocked = BlockedSignals::all();
    // SAFETY: `clone_child` runs `run_child`, which makes nothing but system calls on
    // memory prepared above (alive until the child has exec'd: this thread sleeps until
    // then) and never returns; the stack is the child's alone.
    let pid = unsafe {
        libc::clone(
            clone_child,
            stack.top(),
            flags,
            (&raw const child).cast_mut().cast(),
            &mut pidfd as *mut RawFd,
        )
    };
    let clone_error = io::Error::last_os_error();
    drop(blocked);
    drop(stack);
    if pid < 0 {
        return Err(SpawnError::Setup {
            what: "clone",
            source: clone_error,
        });
    }
    // SAFETY: clone stored a fresh pidfd that we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(child);
    // The slots let go of the descriptors they held; then the write end closes for good.
    drop(slots);
    drop(error_write);
    let mut report = [0u8; 12];
    let filled = match File::from(error_read).read(&mut report) {
        Ok(filled) => filled,
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
        Err(source) => {
            return Err(SpawnError::Setup {
                what: "reading the start-up report",
                source,
            });
        }
    };
    if filled == 0 {
        return Ok(Started {
            pid: pid as u32,
            pidfd,
        });
    }
    // The child failed and exits 127: reap it so no zombie stays.
    let _ = reap_blocking(pidfd.as_raw_fd());
    let word = |at: usize| [report[at], report[at + 1], report[at + 2], report[at + 3]];
    let step = u32::from_ne_bytes(word(0));
    let detail = u32::from_ne_bytes(word(4)) as usize;
    let errno = io::Error::from_raw_os_error(i32::from_ne_bytes(word(8)));
    let what = match step {
        STEP_BASE => Some(plan.base.describe(detail)),
        STEP_OWN => Some(plan.own.describe(detail)),
        STEP_CREDENTIALS => Some(
            creds::Failure::ALL
                .get(detail)
                .map_or("?", |f| f.what())
                .to_owned(),
        ),
        _ => None,
    };
    let source = match what {
        Some(what) => io::Error::new(errno.kind(), format!("{what}: {errno}")),
        None => errno,
    };
    Err(SpawnError::Step {
        step: STEPS.get(step as usize).copied().unwrap_or("start-up"),
        source,
    })
}

/// Sends `signal` through a pidfd; false if it was not delivered.
pub fn send_signal(pidfd: RawFd, signal: libc::c_int) -> bool {
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
    rc == 0
}

/// A pidfd of process `pid` (`pidfd_open`). For a child of the caller that was not reaped,
/// the pid cannot have been reused, so the pidfd is of that child.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `signal` to process `pid`; false if it was not delivered. Only for a child of the
/// caller that it has not reaped (whose pid cannot have been reused meanwhile).
pub fn kill(pid: u32, signal: libc::c_int) -> bool {
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

/// `waitid(P_PIDFD, WEXITED | WNOHANG)`: how the process ended, if it did.
pub fn reap(pidfd: RawFd) -> io::Result<Option<Exit>> {
    wait(pidfd, libc::WEXITED | libc::WNOHANG)
}

/// `waitid(P_PIDFD, WEXITED)`: waits for the process to end.
pub fn reap_blocking(pidfd: RawFd) -> io::Result<Option<Exit>> {
    wait(pidfd, libc::WEXITED)
}

fn wait(pidfd: RawFd, options: libc::c_int) -> io::Result<Option<Exit>> {
    // SAFETY: an all-zero siginfo_t is a valid value for the kernel to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t; the fd is owned by the caller.
    if unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, options) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` for a child event (or left it zeroed: si_pid 0).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(match info.si_code {
        libc::CLD_EXITED => Some(Exit::Code(status)),
        _ => Some(Exit::Signal(status)),
    })
}

/// Moves an fd to a number ≥ 10 (close-on-exec), clear of the numbers a child's
/// descriptors are placed at.
pub fn fd_above(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= MAX_FDS as RawFd {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we then own.
    let new = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_DUPFD_CLOEXEC,
            MAX_FDS as libc::c_int,
        )
    };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A close-on-exec pipe with extra `flags` (`O_NONBLOCK`), both ends clear of the placed
/// descriptors.
pub fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh fds that we own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((fd_above(read)?, fd_above(write)?))
}

/// What the child reads: the plan and what was derived from it.
struct Child<'a> {
    plan: &'a Plan<'a>,
    /// The plan's descriptors, as slots of the block.
    cgroup_procs: Vec<RawFd>,
    namespaces: Namespaces,
    landlock: Option<RawFd>,
    image: Option<RawFd>,
    /// The child's first step keeps a copy of the descriptors below this, and no others.
    table_end: RawFd,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    fds: Vec<RawFd>,
    error: RawFd,
}

/// The stack a vfork-style child runs on: mapped per spawn, with a guard page below.
struct ChildStack {
    base: *mut libc::c_void,
}

impl ChildStack {
    /// Far more than the child needs: a few small frames and no allocation.
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
extern "C" fn clone_child(child: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn` passes its `Child`, alive until this child has exec'd; we are the
    // freshly cloned child.
    unsafe { run_child(&*child.cast::<Child<'_>>()) }
}

/// `ifreq` as `SIOCGIFFLAGS`/`SIOCSIFFLAGS` use it: a name and the flags.
#[repr(C)]
struct InterfaceFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Brings `lo` up. System calls only.
unsafe fn loopback_up() -> bool {
    // SAFETY: a socket, two ioctls on a stack `ifreq`, a close.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return false;
        }
        let mut request = InterfaceFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        request.name[0] = b'l' as libc::c_char;
        request.name[1] = b'o' as libc::c_char;
        let ok = libc::ioctl(socket, libc::SIOCGIFFLAGS, &raw mut request) == 0 && {
            request.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS, &raw const request) == 0
        };
        libc::close(socket);
        ok
    }
}

/// The child between clone and exec. Only system calls; never returns.
///
/// # Safety
/// Must only be called in a freshly cloned child process.
unsafe fn run_child(child: &Child<'_>) -> ! {
    let plan = child.plan;
    let fail_with = |step: u32, detail: u32| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut report = [0u8; 12];
        report[..4].copy_from_slice(&step.to_ne_bytes());
        report[4..8].copy_from_slice(&detail.to_ne_bytes());
        report[8..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: writing 12 bytes from a stack buffer, then exiting without unwinding.
        unsafe {
            libc::write(child.error, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    };
    let fail = |step: u32| -> ! { fail_with(step, 0) };
    // SAFETY (whole block): plain system calls on fds and memory prepared by the parent.
    unsafe {
        // The descriptor table is the caller's (CLONE_FILES): take a copy of its first
        // entries, those below the end of the block, and nothing above (module doc).
        if libc::syscall(
            libc::SYS_close_range,
            child.table_end as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        ) != 0
        {
            fail(STEP_UNSHARE_FILES);
        }
        // The handlers are the caller's (this child shares its memory until exec): back to
        // the defaults, while every signal is still blocked. Exec would reset them anyway,
        // but ignored ones (SIGPIPE) would stay ignored in the program.
        for signal in 1..=libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        for &fd in &child.cgroup_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(STEP_CGROUPS);
            }
        }
        match child.namespaces {
            Namespaces::Enter(namespaces) => {
                for (fd, kind) in namespaces {
                    if libc::setns(fd, kind) != 0 {
                        fail(STEP_SETNS);
                    }
                }
            }
            Namespaces::Fresh { host_network } => {
                if !root::make_private() {
                    fail(STEP_PRIVATE);
                }
                if let Err(step) = plan.base.apply() {
                    fail_with(STEP_BASE, step as u32);
                }
                if libc::sethostname(plan.hostname.as_ptr(), plan.hostname.count_bytes()) != 0 {
                    fail(STEP_HOSTNAME);
                }
                if plan.loopback && !host_network && !loopback_up() {
                    fail(STEP_LOOPBACK);
                }
            }
        }
        if let Err(step) = plan.own.apply() {
            fail_with(STEP_OWN, step as u32);
        }
        if !root::enter(plan.mountpoint) {
            fail(STEP_PIVOT);
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(STEP_CWD);
        }
        for (resource, limit) in &child.rlimits {
            if libc::setrlimit(*resource, limit) != 0 {
                fail(STEP_RLIMITS);
            }
        }
        for (target, &fd) in child.fds.iter().enumerate() {
            if libc::dup2(fd, target as libc::c_int) < 0 {
                fail(STEP_FDS);
            }
        }
        if plan.new_session && libc::setsid() < 0 {
            fail(STEP_SESSION);
        }
        if let Err(failure) = creds::drop_to(plan.identity) {
            fail_with(STEP_CREDENTIALS, failure as u32);
        }
        // After the credential change, which clears it.
        if plan.die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
        {
            fail(STEP_PARENT_DEATH);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(STEP_NO_NEW_PRIVS);
        }
        if let Some(ruleset) = child.landlock
            && libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0) != 0
        {
            fail(STEP_LANDLOCK);
        }
        // Keep the placed descriptors; everything else closes at exec (the error pipe and
        // an image fd are still needed until then).
        if libc::close_range(
            child.fds.len() as libc::c_uint,
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
        // ETXTBSY: a child forked elsewhere in the caller (a git, another sandbox) may still
        // hold an inherited write descriptor of a freshly written program until its own
        // exec closes it. That window is short: retry for up to 50 ms.
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // The program starts with no signal blocked.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for _ in 0..50 {
            match (plan.program, child.image) {
                (_, Some(fd)) => {
                    libc::syscall(
                        libc::SYS_execveat,
                        fd,
                        c"".as_ptr(),
                        child.argv.as_ptr(),
                        child.envp.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    );
                }
                (Program::Path(path), None) => {
                    libc::execve(path.as_ptr(), child.argv.as_ptr(), child.envp.as_ptr());
                }
                (Program::Fd(_), None) => {}
            }
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
    fn every_step_has_a_name() {
        assert_eq!(STEPS.len() as u32, STEP_UNSHARE_FILES + 1);
    }

    #[test]
    fn fds_move_clear_of_the_placed_numbers() {
        let (read, write) = pipe(0).expect("pipe");
        assert!(read.as_raw_fd() >= MAX_FDS as RawFd && write.as_raw_fd() >= MAX_FDS as RawFd);
    }
}
