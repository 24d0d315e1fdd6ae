//! The thread every sandbox is cloned from, and the daemon's re-execution of itself.
//!
//! A sandbox's parent-death signal follows the *thread* that cloned it ([`crate::spawn`]).
//! A daemon upgraded in place executes its new binary (`execve`), which ends every thread of
//! the process but the caller: a sandbox cloned from any other thread would die with it.
//! So a daemon that hands its sandboxes over makes its main thread their parent:
//!
//! 1. `main` calls [`serve`] with the daemon's work. The work runs on a thread of its own;
//!    the main thread runs what is handed to it ([`run`]) until the work returns.
//! 2. [`run`] runs a closure (a clone) on the main thread and returns its result; where no
//!    [`serve`] runs (tests, other programs), on the calling thread.
//! 3. [`exec`] has the main thread execute a program, keeping the descriptors it is given
//!    open across the `execve`. Every other thread ends there; the sandboxes the main
//!    thread cloned keep running, still its children, so that the new program can reap
//!    them — and, the main thread being their parent still, a `kill -9` of the new program
//!    kills them as it would have killed them before.
//! 4. The `execve` resets every handled signal to its default action, and SIGHUP's and
//!    SIGTERM's end the process: one arriving before the new program has installed its
//!    handlers would end the daemon. So the main thread blocks SIGHUP, SIGTERM and SIGINT
//!    ([`HANDOVER_SIGNALS`]) just before the `execve`; the mask is inherited, so such a
//!    signal stays pending in the new program (and its threads, which inherit the mask from
//!    the main thread) until it calls [`unblock_signals`] once its handlers are installed,
//!    and is handled then. The mask is the main thread's alone: the old program's other
//!    threads would still take such a signal with its handlers (tokio's, which only note
//!    it) and lose it with the `execve`. So [`hold_signals`] comes first: it blocks them on
//!    the main thread and makes every other thread that takes one pass it to the main
//!    thread (`tgkill`), where it stays pending. A SIGTERM or SIGINT taken before that is
//!    seen by [`stop_signalled`] (an action of ours beside tokio's, [`watch_stop`]): the
//!    daemon looks after holding, and writes what it saw into the hand-over's state.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::ThreadId;

/// Jobs queued for the main thread before callers wait.
const QUEUE: usize = 64;
/// The stack of the work's thread: the size of a main thread's.
const WORK_STACK: usize = 8 * 1024 * 1024;

type Run = Box<dyn FnOnce() + Send>;

enum Job {
    Run(Run),
    Exec(ExecRequest, SyncSender<io::Error>),
    WorkDone,
}

struct ExecRequest {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    keep: Vec<i32>,
}

struct Main {
    jobs: SyncSender<Job>,
    thread: ThreadId,
}

static MAIN: OnceLock<Main> = OnceLock::new();

/// Runs `work` on a thread of its own while this thread — the main thread — clones
/// sandboxes for it (module doc); returns what `work` returns. Call it once, from `main`.
///
/// # Panics
/// When called twice, or when the work's thread cannot be started.
pub fn serve<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
    let (jobs, queue) = sync_channel::<Job>(QUEUE);
    let done = jobs.clone();
    assert!(
        MAIN.set(Main {
            jobs,
            thread: std::thread::current().id(),
        })
        .is_ok(),
        "revboot_sandbox::parent::serve is called once"
    );
    let worker = std::thread::Builder::new()
        .name("revboot-work".into())
        .stack_size(WORK_STACK)
        .spawn(move || {
            // Told even when the work panics, so that the main thread stops serving.
            struct Done(SyncSender<Job>);
            impl Drop for Done {
                fn drop(&mut self) {
                    let _ = self.0.send(Job::WorkDone);
                }
            }
            let _done = Done(done);
            work()
        })
        .expect("the work's thread starts");
    serve_jobs(&queue);
    match worker.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn serve_jobs(queue: &Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        match job {
            Job::Run(run) => run(),
            Job::Exec(request, reply) => {
                let _ = reply.send(exec_here(&request));
            }
            Job::WorkDone => return,
        }
    }
}

/// True when [`serve`] runs: sandboxes are cloned from the main thread, and [`exec`] works.
pub fn is_served() -> bool {
    MAIN.get().is_some()
}

/// Runs `job` on the main thread when [`serve`] runs (and this is another thread), else
/// here; returns its result.
pub fn run<R: Send + 'static>(job: impl FnOnce() -> R + Send + 'static) -> R {
    let Some(main) = MAIN.get() else {
        return job();
    };
    if std::thread::current().id() == main.thread {
        return job();
    }
    let (reply, result) = sync_channel(1);
    let queued = main.jobs.send(Job::Run(Box::new(move || {
        let _ = reply.send(job());
    })));
    // The main thread serves until the work (this caller's) is done, and runs every job
    // it takes: neither can fail while the caller lives.
    assert!(queued.is_ok(), "the main thread serves while the work runs");
    result
        .recv()
        .expect("the main thread runs every job it takes")
}

/// Has the main thread execute `program` with `args` (without `argv[0]`, which is
/// `program`) and this process's environment plus `env`, keeping the descriptors `keep`
/// open across the `execve` (module doc). Returns only if the `execve` failed (or no
/// [`serve`] runs), with why; the descriptors are close-on-exec again then.
pub fn exec(
    program: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    keep: &[BorrowedFd<'_>],
) -> io::Error {
    let Some(main) = MAIN.get() else {
        return io::Error::new(
            io::ErrorKind::Unsupported,
            "the daemon's main thread does not clone its sandboxes (parent::serve)",
        );
    };
    let request = ExecRequest {
        program: program.to_owned(),
        args: args.to_vec(),
        env: env.to_vec(),
        keep: keep.iter().map(AsRawFd::as_raw_fd).collect(),
    };
    let (reply, answer) = sync_channel(1);
    if main.jobs.send(Job::Exec(request, reply)).is_err() {
        return io::Error::other("the main thread no longer serves");
    }
    answer
        .recv()
        .unwrap_or_else(|_| io::Error::other("the main thread no longer serves"))
}

/// The signals blocked across the `execve` of an upgrade in place (module doc, rule 4).
pub const HANDOVER_SIGNALS: [i32; 3] = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT];

/// Unblocks [`HANDOVER_SIGNALS`] on the main thread (on this thread where no [`serve`]
/// runs), so that one pending since the `execve` is handled now (module doc, rule 4), and
/// notes SIGTERM and SIGINT from now on ([`watch_stop`], the first time). Call it once the
/// program's handlers for them are installed; a program not started by an upgrade has
/// nothing blocked.
pub fn unblock_signals() -> io::Result<()> {
    static WATCHED: OnceLock<()> = OnceLock::new();
    if WATCHED.get().is_none() {
        watch_stop()?;
        let _ = WATCHED.set(());
    }
    run(|| mask(libc::SIG_UNBLOCK))
}

/// Set by [`watch_stop`]'s action when SIGTERM or SIGINT comes.
static STOP_SIGNALLED: AtomicBool = AtomicBool::new(false);
/// The thread [`hold_signals`] passes the held signals to (a thread id, 0 when none).
static HOLDER: AtomicI32 = AtomicI32::new(0);
/// The actions [`hold_signals`] replaced, to put back when the `execve` fails.
static REPLACED: Mutex<Vec<(libc::c_int, libc::sigaction)>> = Mutex::new(Vec::new());

/// Notes every SIGTERM and SIGINT from now on, for [`stop_signalled`], beside the handlers
/// the program installed for them (tokio's, through the same registry). Call it once, with
/// those handlers in: it replaces the default action (ending the process) by a note.
#[allow(unsafe_code)] // signal_hook_registry::register: the action must be signal-safe.
pub fn watch_stop() -> io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the action only stores into an atomic, which is async-signal-safe.
        unsafe {
            signal_hook_registry::register(signal, || {
                STOP_SIGNALLED.store(true, Ordering::SeqCst);
            })
        }?;
    }
    Ok(())
}

/// True once SIGTERM or SIGINT came since [`watch_stop`] (module doc, rule 4).
pub fn stop_signalled() -> bool {
    STOP_SIGNALLED.load(Ordering::SeqCst)
}

/// Before an upgrade's last look at its signals (module doc, rule 4): blocks
/// [`HANDOVER_SIGNALS`] on the main thread and has any other thread that takes one pass it
/// to the main thread, where it stays pending across the `execve`. [`exec`] undoes it when
/// the `execve` fails.
pub fn hold_signals() -> io::Result<()> {
    if !is_served() {
        return Ok(());
    }
    run(hold_here)
}

/// Which of [`HANDOVER_SIGNALS`] are pending on the main thread (on this thread where no
/// [`serve`] runs): held by [`hold_signals`], or blocked since an `execve` (module doc).
pub fn pending_signals() -> io::Result<Vec<i32>> {
    run(pending_here)
}

/// [`pending_signals`], on this thread.
#[allow(unsafe_code)] // sigpending and sigismember on a local set.
fn pending_here() -> io::Result<Vec<i32>> {
    // SAFETY: sigpending fills the local set; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(HANDOVER_SIGNALS
            .into_iter()
            .filter(|signal| libc::sigismember(&set, *signal) == 1)
            .collect())
    }
}

/// [`hold_signals`], on the main thread.
#[allow(unsafe_code)] // gettid and sigaction: raw system calls.
fn hold_here() -> io::Result<()> {
    mask(libc::SIG_BLOCK)?;
    // SAFETY: gettid has no arguments and cannot fail.
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    HOLDER.store(me, Ordering::SeqCst);
    let mut replaced = REPLACED.lock().unwrap_or_else(PoisonError::into_inner);
    if !replaced.is_empty() {
        return Ok(());
    }
    for signal in HANDOVER_SIGNALS {
        // SAFETY: a zeroed sigaction with an empty mask and a plain handler is valid;
        // sigaction writes the old action into a local.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = pass_to_holder as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, &action, &mut old) != 0 {
                let error = io::Error::last_os_error();
                drop(replaced);
                release_here();
                return Err(error);
            }
            replaced.push((signal, old));
        }
    }
    Ok(())
}

/// The held signals' handler on the threads that do not block them: passes the signal on
/// to the main thread, which does.
#[allow(unsafe_code)] // errno, getpid and tgkill: all async-signal-safe.
extern "C" fn pass_to_holder(signal: libc::c_int) {
    // SAFETY: errno is this thread's; getpid and tgkill are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            HOLDER.load(Ordering::SeqCst),
            signal,
        );
        *libc::__errno_location() = errno;
    }
}

/// Undoes [`hold_here`]: the handlers it replaced are back, then the signals are unblocked
/// (those pending are handled by them).
#[allow(unsafe_code)] // sigaction: a raw system call.
fn release_here() {
    let mut replaced = REPLACED.lock().unwrap_or_else(PoisonError::into_inner);
    for (signal, old) in replaced.drain(..) {
        // SAFETY: `old` is the action sigaction returned for this signal.
        unsafe { libc::sigaction(signal, &old, std::ptr::null_mut()) };
    }
    let _ = mask(libc::SIG_UNBLOCK);
}

/// Blocks or unblocks [`HANDOVER_SIGNALS`] on this thread.
#[allow(unsafe_code)] // sigemptyset, sigaddset and pthread_sigmask on a local set.
fn mask(how: libc::c_int) -> io::Result<()> {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask reads it
    // and writes nothing back (a null old set).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in HANDOVER_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        match libc::pthread_sigmask(how, &set, std::ptr::null_mut()) {
            0 => Ok(()),
            error => Err(io::Error::from_raw_os_error(error)),
        }
    }
}

/// Takes ownership of descriptor `fd`, kept open across the `execve` of an upgrade in place
/// by the previous program (its number comes with what it handed over), and makes it
/// close-on-exec again. Fails if `fd` is not open, or was taken already.
#[allow(unsafe_code)] // fcntl and from_raw_fd on a descriptor this process inherited.
pub fn take_fd(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    static TAKEN: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if fd < 3 || taken.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not one handed over"),
        ));
    }
    // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    taken.push(fd);
    // SAFETY: the descriptor is open (F_GETFD succeeded), was inherited across the exec
    // for this purpose, and is taken once (the list above).
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// On the main thread: the `execve` itself.
#[allow(unsafe_code)] // fcntl and execve: raw system calls.
fn exec_here(request: &ExecRequest) -> io::Error {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
    };
    let prepared = (|| {
        let program = cstring(request.program.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for arg in &request.args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(key, _)| !request.env.iter().any(|(k, _)| k == key))
            .collect();
        env.extend(request.env.iter().cloned());
        let envp = env
            .iter()
            .map(|(key, value)| {
                let mut entry = key.as_bytes().to_vec();
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                cstring(&entry)
            })
            .collect::<io::Result<Vec<CString>>>()?;
        Ok::<_, io::Error>((program, argv, envp))
    })();
    let (program, argv, envp) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => return error,
    };
    let set_cloexec = |on: bool| {
        for &fd in &request.keep {
            // SAFETY: F_GETFD/F_SETFD on a descriptor the caller holds open.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    let flags = if on {
                        flags | libc::FD_CLOEXEC
                    } else {
                        flags & !libc::FD_CLOEXEC
                    };
                    libc::fcntl(fd, libc::F_SETFD, flags);
                }
            }
        }
    };
    set_cloexec(false);
    // Rule 4: pending, not fatal, until the new program handles them (held already when
    // the caller called hold_signals; this holds them otherwise).
    let held = hold_here().is_ok();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and arrays, alive across the call; returns only on
    // failure.
    unsafe { libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    let error = io::Error::last_os_error();
    if held {
        release_here();
    }
    set_cloexec(true);
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_serve_jobs_run_here_and_exec_is_refused() {
        let here = std::thread::current().id();
        assert!(run(move || std::thread::current().id() == here));
        let error = exec(Path::new("/bin/true"), &[], &[], &[]);
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
    }
}
