//! Packing: letting stock git delta-compress near-identical images.
//!
//! 1. Only one repack runs per repository (`flock` on `revboot/locks/.repack`); a second
//!    caller gets [`MaintenanceError::Busy`] at once.
//! 2. `git repack -a -d` writes one new pack with every reachable object, then deletes the
//!    old packs and the loose objects that are now packed. It never uses `--prune` or `-f`
//!    on loose objects: objects of a deployment being written at the same moment are still
//!    unreachable, stay loose and survive.
//! 3. Readers keep working: a pack that is deleted stays readable through the readers'
//!    open maps, and a reader that misses an object refreshes its pack list and finds it in
//!    the new pack (gix and git both do this).
//! 4. `core.bigFileThreshold` is raised so that images (up to [`crate::MAX_IMAGE_BYTES`]) are
//!    delta candidates; the delta window is 50 objects, bounded by `--window-memory`.
//! 5. The run is bounded by [`REPACK_TIMEOUT`]; on timeout the child is killed (its
//!    temporary pack is ignored by git and cleaned by the next repack).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{MaintenanceError, RepackReport, Store};

/// The longest a repack may run.
pub const REPACK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The git program used for maintenance.
pub const GIT: &str = "git";

impl Store {
    /// Packs the repository with `git repack -a -d` (delta window suited to large images),
    /// safe while other threads and processes read. Returns the sizes before and after.
    pub fn repack(&self) -> Result<RepackReport, MaintenanceError> {
        let path = self.path();
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| MaintenanceError::Io {
                action,
                path,
                source,
            }
        };
        let dir = crate::lock::private_dir(path).join("locks");
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let lock_path = dir.join(".repack");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(MaintenanceError::Busy),
            Err(TryLockError::Error(source)) => {
                return Err(MaintenanceError::Io {
                    action: "lock",
                    path: lock_path,
                    source,
                });
            }
        }
        let objects = path.join("objects");
        let bytes_before = object_bytes(&objects);
        let stderr_path =
            crate::lock::spool_dir(path).join(format!("repack-{}.err", std::process::id()));
        let stderr = File::create(&stderr_path).map_err(io("create", &stderr_path))?;
        let started = Instant::now();
        let mut child = Command::new(GIT)
            .arg("-C")
            .arg(path)
            .args([
                "-c",
                "core.bigFileThreshold=2g",
                "-c",
                "pack.deltaCacheSize=256m",
                "-c",
                "pack.deltaCacheLimit=65535",
                "repack",
                "-a",
                "-d",
                "-q",
                "--window=50",
                "--depth=50",
                "--window-memory=512m",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| MaintenanceError::Spawn {
                program: GIT.into(),
                source,
            })?;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < REPACK_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = fs::remove_file(&stderr_path);
                    return Err(MaintenanceError::Failed {
                        status: "timed out".into(),
                        stderr: format!("killed after {}s", REPACK_TIMEOUT.as_secs()),
                    });
                }
                Err(source) => {
                    return Err(MaintenanceError::Spawn {
                        program: GIT.into(),
                        source,
                    });
                }
            }
        };
        let elapsed = started.elapsed();
        let stderr_text = fs::read_to_string(&stderr_path).unwrap_or_default();
        let _ = fs::remove_file(&stderr_path);
        if !status.success() {
            let tail: String = stderr_text
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(MaintenanceError::Failed {
                status: status.to_string(),
                stderr: tail.trim().to_owned(),
            });
        }
        let bytes_after = object_bytes(&objects);
        let packs_after = fs::read_dir(objects.join("pack"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                    .count()
            })
            .unwrap_or(0);
        tracing::info!(
            bytes_before,
            bytes_after,
            packs_after,
            elapsed_ms = elapsed.as_millis() as u64,
            "repacked deployment repository"
        );
        Ok(RepackReport {
            bytes_before,
            bytes_after,
            packs_after,
            elapsed,
        })
    }
}

/// Bytes in loose objects and packs (what `git count-objects -v` calls size + size-pack).
pub fn object_bytes(objects: &Path) -> u64 {
    fn walk(dir: &Path, total: &mut u64) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk(&entry.path(), total);
            } else {
                *total += meta.len();
            }
        }
    }
    let mut total = 0;
    walk(objects, &mut total);
    total
}
