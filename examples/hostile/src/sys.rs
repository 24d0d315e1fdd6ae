//! The libc functions the attempts call, errno and signal names, and forked children.
//!
//! std links glibc statically (crt-static), so the few functions std does not wrap are
//! declared here. The server is single-threaded, so a forked child may allocate and run
//! ordinary Rust before it exits.

use std::ffi::{c_char, c_int, c_long, c_uint, c_ulong, c_void};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::attempts::Outcome;

unsafe extern "C" {
    pub fn fork() -> c_int;
    pub fn _exit(status: c_int) -> !;
    pub fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    pub fn kill(pid: c_int, signal: c_int) -> c_int;
    pub fn pause() -> c_int;
    pub fn getppid() -> c_int;
    pub fn prctl(option: c_int, ...) -> c_int;
    pub fn signal(signal: c_int, handler: usize) -> usize;
    pub fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
    pub fn getuid() -> c_uint;
    pub fn geteuid() -> c_uint;
    pub fn getgid() -> c_uint;
    pub fn getegid() -> c_uint;
    pub fn setuid(uid: c_uint) -> c_int;
    pub fn setgid(gid: c_uint) -> c_int;
    pub fn mknod(path: *const c_char, mode: c_uint, device: u64) -> c_int;
    pub fn mount(
        source: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_int;
    pub fn umount2(target: *const c_char, flags: c_int) -> c_int;
    pub fn unshare(flags: c_int) -> c_int;
    pub fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    pub fn close(fd: c_int) -> c_int;
    pub fn execv(path: *const c_char, argv: *const *const c_char) -> c_int;
    pub fn gethostname(name: *mut c_char, len: usize) -> c_int;
    pub fn sethostname(name: *const c_char, len: usize) -> c_int;
    pub fn mmap(
        addr: *mut c_void,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        offset: i64,
    ) -> *mut c_void;
    pub fn syscall(number: c_long, ...) -> c_long;
}

pub const SIGKILL: c_int = 9;
pub const SIGXFSZ: c_int = 25;
pub const SIG_IGN: usize = 1;
const O_CLOEXEC: c_int = 0o2000000;
const WNOHANG: c_int = 1;
const WALL: c_int = 0x4000_0000;
const PR_SET_PDEATHSIG: c_int = 1;
const EINTR: i32 = 4;

/// A libc return value: `-1` (or any negative value) means the call failed with `errno`.
pub fn check(ret: c_long) -> io::Result<c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `EPERM (errno 1)` for an OS error, the error's own text otherwise.
pub fn describe(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(number) => match errno_name(number) {
            Some(name) => format!("{name} (errno {number})"),
            None => format!("errno {number}"),
        },
        None => error.to_string(),
    }
}

fn errno_name(number: i32) -> Option<&'static str> {
    Some(match number {
        1 => "EPERM",
        2 => "ENOENT",
        3 => "ESRCH",
        4 => "EINTR",
        5 => "EIO",
        6 => "ENXIO",
        7 => "E2BIG",
        8 => "ENOEXEC",
        9 => "EBADF",
        10 => "ECHILD",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        18 => "EXDEV",
        19 => "ENODEV",
        20 => "ENOTDIR",
        21 => "EISDIR",
        22 => "EINVAL",
        23 => "ENFILE",
        24 => "EMFILE",
        26 => "ETXTBSY",
        27 => "EFBIG",
        28 => "ENOSPC",
        30 => "EROFS",
        31 => "EMLINK",
        36 => "ENAMETOOLONG",
        38 => "ENOSYS",
        40 => "ELOOP",
        93 => "EPROTONOSUPPORT",
        94 => "ESOCKTNOSUPPORT",
        95 => "EOPNOTSUPP",
        97 => "EAFNOSUPPORT",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        122 => "EDQUOT",
        126 => "ENOKEY",
        _ => return None,
    })
}

/// `SIGKILL (signal 9)`.
pub fn signal_name(number: c_int) -> String {
    let name = match number {
        1 => "SIGHUP",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => "signal",
    };
    format!("{name} (signal {number})")
}

/// How a forked child ended.
#[derive(Debug)]
pub enum Ended {
    Exited(c_int),
    Signaled(c_int),
    /// Still running at the deadline: killed with SIGKILL and reaped.
    TimedOut(Duration),
    /// `waitpid` failed (it should not: the child is ours).
    Lost(io::Error),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Exited(code) => write!(f, "exited with status {code}"),
            Ended::Signaled(signal) => write!(f, "was killed by {}", signal_name(*signal)),
            Ended::TimedOut(limit) => write!(
                f,
                "was still running after {} s and was killed",
                limit.as_secs()
            ),
            Ended::Lost(error) => write!(f, "could not be waited for ({})", describe(error)),
        }
    }
}

/// What a child made by [`in_child`] said before it ended, and how it ended.
#[derive(Debug)]
pub struct ChildEnd {
    pub said: Option<Outcome>,
    pub ended: Ended,
}

/// Runs `work` in a forked child, which sends its outcome back through a pipe and exits 0.
/// Waits at most `limit`, then kills the child. Anything `work` changes in its own process
/// (ids, namespaces, root) stays in the child.
pub fn in_child(limit: Duration, work: impl FnOnce() -> Outcome) -> io::Result<ChildEnd> {
    let (read, write) = pipe()?;
    let pid = fork_child()?;
    if pid == 0 {
        drop(read);
        let said = work().to_string();
        let _ = File::from(write).write_all(said.as_bytes());
        // SAFETY: ends the child without running the parent's exit handlers twice.
        unsafe { _exit(0) }
    }
    drop(write);
    let ended = wait_bounded(pid, limit);
    // The child has ended, so the write end is closed and this read ends.
    let mut said = String::new();
    let _ = File::from(read).take(4096).read_to_string(&mut said);
    Ok(ChildEnd {
        said: Outcome::parse(&said),
        ended,
    })
}

/// Forks a child that only waits to be killed; see [`kill_and_reap`].
pub fn fork_paused() -> io::Result<c_int> {
    let pid = fork_child()?;
    if pid == 0 {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { pause() };
        }
    }
    Ok(pid)
}

/// Forks. The child (`Ok(0)`) is killed if the server dies, so none outlives it.
fn fork_child() -> io::Result<c_int> {
    let parent = std::process::id();
    // SAFETY: the server is single-threaded, so the child's copy of the heap is consistent.
    let pid = check(unsafe { fork() }.into())? as c_int;
    if pid == 0 {
        // SAFETY: prctl with an integer argument; getppid and _exit have no preconditions.
        unsafe {
            prctl(PR_SET_PDEATHSIG, SIGKILL as c_ulong);
            if getppid() as u32 != parent {
                _exit(1);
            }
        }
    }
    Ok(pid)
}

/// Waits for child `pid` for at most `limit`, then kills it. Polls `waitpid` rather than
/// handling SIGCHLD: the server has nothing else to do meanwhile.
pub fn wait_bounded(pid: c_int, limit: Duration) -> Ended {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a status word.
        let got = unsafe { waitpid(pid, &mut status, WNOHANG | WALL) };
        if got == pid {
            return ended(status);
        }
        if got < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(EINTR) {
                return Ended::Lost(error);
            }
        }
        if Instant::now() >= deadline {
            kill_and_reap(pid);
            return Ended::TimedOut(limit);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the next change of child `pid` (an exit, or a stop under ptrace).
pub fn wait_change(pid: c_int) -> io::Result<c_int> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a status word.
        if unsafe { waitpid(pid, &mut status, WALL) } == pid {
            return Ok(status);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(EINTR) {
            return Err(error);
        }
    }
}

/// Kills child `pid` and waits until it is gone.
pub fn kill_and_reap(pid: c_int) {
    // SAFETY: signals our own child.
    unsafe { kill(pid, SIGKILL) };
    while let Ok(status) = wait_change(pid) {
        if !is_stopped(status) {
            break;
        }
    }
}

fn is_stopped(status: c_int) -> bool {
    status & 0xff == 0x7f
}

fn ended(status: c_int) -> Ended {
    if status & 0x7f == 0 {
        Ended::Exited((status >> 8) & 0xff)
    } else {
        Ended::Signaled(status & 0x7f)
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 fills two fds, which nothing else owns.
    check(unsafe { pipe2(fds.as_mut_ptr(), O_CLOEXEC) }.into())?;
    // SAFETY: both fds were just opened and are owned here alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
