//! Namespace sets made ahead of time, so that making them is off the boot path.
//!
//! 1. A helper thread keeps [`NAMESPACE_POOL`] sets ready. For each, it enters fresh net,
//!    ipc, uts and mount namespaces (`unshare`), makes mount propagation private, sets the
//!    hostname and assembles the root's shared part (the tmpfs with its quota and the
//!    device nodes, [`revboot_sandbox::root`]) in that mount namespace; then it keeps a
//!    descriptor of each namespace and goes back to the host's mount namespace, so that the
//!    next set starts from the host's mounts, never from another set's.
//! 2. A spawn takes one set (`take`) and its child enters it with `setns`; a set serves one
//!    instance only and dies with it. An empty pool is not an error: the child then makes
//!    fresh namespaces in the clone and assembles the root itself.
//! 3. A set that cannot be made ends the helper with one warning; instances keep booting
//!    with namespaces of their own.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use revboot_sandbox::root::{self, Layout};
use tracing::warn;

use revboot_sandbox::spawn::fd_above;

/// The hostname inside an instance.
pub(super) const HOSTNAME: &std::ffi::CStr = c"revboot";
/// Namespace sets kept ready.
const NAMESPACE_POOL: usize = 16;
/// How long the helper waits after a set was taken before it makes the next: the instance
/// that took it starts first.
const REFILL_PAUSE: Duration = Duration::from_millis(20);

/// Fresh net, ipc, uts and mount namespaces for one instance, made ahead of time.
#[derive(Debug)]
pub(super) struct Namespaces {
    fds: [(OwnedFd, libc::c_int); 4],
}

impl Namespaces {
    pub(super) fn raw(&self) -> [(RawFd, libc::c_int); 4] {
        self.fds
            .each_ref()
            .map(|(fd, kind)| (fd.as_raw_fd(), *kind))
    }

    /// Moves the calling thread into new namespaces, assembles `root` there, keeps handles
    /// on them and returns the thread to the mount namespace `home`.
    fn make(root: &Layout, home: &OwnedFd) -> io::Result<Namespaces> {
        use nix::sched::CloneFlags;
        let flags = CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS;
        // unshare affects only this thread, which does nothing else.
        nix::sched::unshare(flags).map_err(io::Error::from)?;
        // SAFETY: this thread is in a mount namespace of its own (just above).
        if !unsafe { root::make_private() } {
            return Err(io::Error::last_os_error());
        }
        nix::unistd::sethostname(HOSTNAME.to_str().expect("an ASCII hostname"))
            .map_err(io::Error::from)?;
        let assembled = {
            // SAFETY: this thread is in a mount namespace of its own with private
            // propagation (just above).
            unsafe { root.apply() }
        };
        let made = assembled
            .map_err(|step| {
                let cause = io::Error::last_os_error();
                io::Error::new(cause.kind(), format!("{}: {cause}", root.describe(step)))
            })
            .and_then(|()| {
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
            });
        // Back home whatever happened, so the next set copies the host's mounts (this thread
        // shares no file system attributes since its unshare, as setns requires).
        nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
        made
    }
}

/// Keeps [`NAMESPACE_POOL`] namespace sets ready (see the module doc).
#[derive(Debug)]
pub(super) struct NamespacePool {
    sets: Mutex<Vec<Namespaces>>,
    wanted: Condvar,
}

impl NamespacePool {
    /// Starts the helper thread; `root` is the part of every instance's root that does not
    /// depend on the instance.
    pub(super) fn start(root: Arc<Layout>) -> Arc<NamespacePool> {
        let pool = Arc::new(NamespacePool {
            sets: Mutex::new(Vec::with_capacity(NAMESPACE_POOL)),
            wanted: Condvar::new(),
        });
        let weak = Arc::downgrade(&pool);
        let spawned = std::thread::Builder::new()
            .name("revboot-namespaces".into())
            .spawn(move || {
                // The thread's own mount namespace, before any unshare: where it returns.
                let home = match File::open("/proc/thread-self/ns/mnt") {
                    Ok(file) => OwnedFd::from(file),
                    Err(error) => {
                        warn!(%error, "cannot pre-make namespaces: instances make their own at boot");
                        return;
                    }
                };
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
                                std::thread::sleep(REFILL_PAUSE);
                            }
                            continue;
                        }
                    }
                    match Namespaces::make(&root, &home) {
                        Ok(set) => pool.sets.lock().expect("pool lock is never poisoned").push(set),
                        Err(error) => {
                            warn!(%error, "cannot pre-make namespaces: instances make their own at boot");
                            return;
                        }
                    }
                }
            });
        if let Err(error) = spawned {
            warn!(%error, "no namespace pool thread: instances make their own at boot");
        }
        pool
    }

    /// A ready set, if any.
    pub(super) fn take(&self) -> Option<Namespaces> {
        let set = self.sets.lock().expect("pool lock is never poisoned").pop();
        self.wanted.notify_one();
        set
    }
}
