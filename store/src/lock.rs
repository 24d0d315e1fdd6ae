//! Writer locks and recovery from writers that died.
//!
//! 1. Every store writer of a service takes an exclusive `flock` on
//!    `<repo>/revboot/locks/<service>` for the whole write (bounded wait). The kernel drops
//!    it when the process dies, so it can never go stale.
//! 2. Holding it, the writer looks for `<ref>.lock` files left by gix or git. A lock that
//!    stays for [`STALE_REF_LOCK`] and is older than that is from a dead writer (git holds ref
//!    locks for milliseconds) and is removed, with a warning.
//! 3. Image spools (`spool-<pid>-<n>`) and the quarantines of writes (`objects-<pid>-<n>/`,
//!    see [`crate::quarantine`]) live in `<repo>/revboot/tmp/`; [`sweep_spools`] removes the
//!    ones whose process is gone.
//! 4. Linking a write's objects into `objects/` and moving its ref happen under the
//!    repository-wide objects lock `<repo>/revboot/locks/.objects`, taken after the service's
//!    lock and held only while the objects are linked and the ref moves, so that a write that
//!    takes its objects back out after a failed ref update removes nothing another store
//!    writer relies on.
//! 5. A loose object written straight into `objects/` (by git, or by gix outside a
//!    quarantine) goes to `objects/.tmp*` first and is renamed into place; a killed writer
//!    leaves its temporary behind. [`sweep_object_temporaries`] removes those not
//!    written to for [`ABANDONED_TEMPORARY`] (a live writer keeps touching its file).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::WriteError;

/// How long a writer waits for another writer of the same service.
pub const WRITER_WAIT: Duration = Duration::from_secs(30);
/// How long a ref lock must persist (and how old it must be) to count as stale.
pub const STALE_REF_LOCK: Duration = Duration::from_secs(2);

/// The store's private directory inside the repository.
pub fn private_dir(repo: &Path) -> PathBuf {
    repo.join("revboot")
}

/// The spool directory.
pub fn spool_dir(repo: &Path) -> PathBuf {
    private_dir(repo).join("tmp")
}

/// An exclusive lock on one service's writes; released on drop or process death.
#[derive(Debug)]
pub struct ServiceLock {
    _file: File,
}

impl ServiceLock {
    /// Waits (at most [`WRITER_WAIT`]) for the service's write lock.
    pub fn acquire(repo: &Path, name: &str) -> Result<ServiceLock, WriteError> {
        ServiceLock::acquire_file(repo, name, name)
    }

    /// Waits (at most [`WRITER_WAIT`]) for the objects lock, for a write to `service` (named
    /// if the wait times out).
    pub fn objects(repo: &Path, service: &str) -> Result<ServiceLock, WriteError> {
        ServiceLock::acquire_file(repo, ".objects", service)
    }

    fn acquire_file(repo: &Path, file: &str, service: &str) -> Result<ServiceLock, WriteError> {
        let dir = private_dir(repo).join("locks");
        fs::create_dir_all(&dir).map_err(|source| WriteError::Io {
            action: "create lock directory",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join(file);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| WriteError::Io {
                action: "open lock file",
                path: path.clone(),
                source,
            })?;
        let deadline = Instant::now() + WRITER_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(ServiceLock { _file: file }),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(WriteError::Busy {
                        service: service.to_owned(),
                    });
                }
                Err(TryLockError::Error(source)) => {
                    return Err(WriteError::Io {
                        action: "lock",
                        path,
                        source,
                    });
                }
            }
        }
    }
}

/// With the service lock held: waits out a `<ref>.lock` of a live git, removes a stale one.
pub fn clear_stale_ref_lock(repo: &Path, reference: &str) -> Result<(), WriteError> {
    let lock = repo.join(format!("{reference}.lock"));
    let deadline = Instant::now() + STALE_REF_LOCK;
    loop {
        let Ok(meta) = fs::metadata(&lock) else {
            return Ok(());
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        if Instant::now() >= deadline && age >= STALE_REF_LOCK {
            tracing::warn!(lock = %lock.display(), age_ms = age.as_millis() as u64, "removing stale ref lock left by a dead writer");
            return match fs::remove_file(&lock) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(WriteError::Io {
                    action: "remove stale lock",
                    path: lock,
                    source,
                }),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a temporary object file must be untouched to count as abandoned.
pub const ABANDONED_TEMPORARY: Duration = Duration::from_secs(10 * 60);

/// Removes temporary object files in `objects/` untouched for `older_than`. Returns how many.
pub fn sweep_object_temporaries(repo: &Path, older_than: Duration) -> usize {
    let Ok(entries) = fs::read_dir(repo.join("objects")) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let abandoned = entry.file_name().to_string_lossy().starts_with(".tmp")
            && entry.metadata().is_ok_and(|m| {
                m.is_file()
                    && m.modified()
                        .ok()
                        .and_then(|t| now.duration_since(t).ok())
                        .is_some_and(|age| age >= older_than)
            });
        if abandoned && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed temporary objects of dead writers");
    }
    removed
}

/// Removes spool files and quarantines of processes that no longer exist. Returns how many
/// were removed.
pub fn sweep_spools(repo: &Path) -> usize {
    let Ok(entries) = fs::read_dir(spool_dir(repo)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| {
                n.strip_prefix("spool-")
                    .or_else(|| n.strip_prefix("objects-"))
            })
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "removed image spools and quarantines of dead writers"
        );
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_waits_until_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ServiceLock::acquire(dir.path(), "svc").expect("first");
        let path = dir.path().to_owned();
        let waiter = std::thread::spawn(move || ServiceLock::acquire(&path, "svc").is_ok());
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        assert!(waiter.join().expect("thread"));
    }

    #[test]
    fn old_ref_lock_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("refs/heads")).expect("mkdir");
        let lock = dir.path().join("refs/heads/svc.lock");
        let file = File::create(&lock).expect("create");
        file.set_modified(SystemTime::now() - Duration::from_secs(60))
            .expect("set mtime");
        clear_stale_ref_lock(dir.path(), "refs/heads/svc").expect("cleared");
        assert!(!lock.exists());
    }

    #[test]
    fn spools_of_dead_processes_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(spool_dir(dir.path())).expect("mkdir");
        // pid_max on Linux is at most 2^22, so this pid cannot exist.
        let dead = spool_dir(dir.path()).join("spool-99999999-0");
        let mine = spool_dir(dir.path()).join(format!("spool-{}-0", std::process::id()));
        let dead_quarantine = spool_dir(dir.path()).join("objects-99999999-1");
        File::create(&dead).expect("create");
        File::create(&mine).expect("create");
        fs::create_dir_all(dead_quarantine.join("ab")).expect("mkdir");
        File::create(dead_quarantine.join("ab/cdef")).expect("create");
        assert_eq!(sweep_spools(dir.path()), 2);
        assert!(!dead.exists());
        assert!(!dead_quarantine.exists());
        assert!(mine.exists());
    }
}
