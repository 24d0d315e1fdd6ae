//! Running the build command in the build sandbox (steps 4 and 5 of the runner).
//!
//! 1. The command (argv, or `sh -c` for `shell`) gets a clean environment: `PATH` of the
//!    daemon, `HOME` and `CARGO_TARGET_DIR` in the service's cache (`target/` in the
//!    checkout links there), the daemon's `CARGO_HOME`/`RUSTUP_HOME`, `TMPDIR=/tmp`, the
//!    `REVBOOT_*` variables and the recipe's `build.env`.
//! 2. Its stdout and stderr share one pipe, read into the build's log as they come.
//! 3. It ends by exiting, at its time limit, over its disk limit (checked every
//!    [`DISK_CHECK`]), or when the daemon stops; in all but the first case its first process
//!    gets SIGKILL, and the kernel ends the rest of its pid namespace with it. A SIGKILL
//!    that its memory cgroup records as an OOM kill is [`Ending::OutOfMemory`].
//! 4. The pipe is drained for at most [`DRAIN_TIMEOUT`] after the end.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use revboot_sandbox::spawn::{self, Exit};
use revboot_store::Manifest;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::context::{Job, RunContext};
use crate::log::Tracker;
use crate::sandbox;

/// How long to keep reading output after the build's processes are gone (nothing should
/// hold the pipe then; a bound all the same).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a running build's disk use is checked.
const DISK_CHECK: Duration = Duration::from_secs(2);
/// Files of checkout and cache counted at most by a disk check.
const USAGE_ENTRIES: usize = 500_000;

/// How the command ended.
pub(super) enum Ending {
    Exited(Exit),
    TimedOut,
    Stopped,
    /// Killed at its memory limit.
    OutOfMemory,
    /// Stopped for its disk use (the reason).
    Disk(String),
}

pub(super) async fn run_command(
    ctx: &RunContext,
    job: &Job,
    manifest: &Manifest,
    checkout: &Path,
    cache: &Path,
    tracker: &Tracker,
    mut stop: watch::Receiver<bool>,
) -> Result<(Ending, f64), String> {
    let home = cache.join("home");
    let target = cache.join("target");
    for dir in [&home, &target] {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let link = checkout.join("target");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(&target, &link)
            .map_err(|e| format!("cannot link the target cache: {e}"))?;
    }
    let argv: Vec<String> = match &manifest.build.shell {
        Some(shell) => vec!["sh".into(), "-c".into(), shell.clone()],
        None => manifest.build.command.clone(),
    };
    if argv.is_empty() {
        return Err("the build command is empty".into());
    }
    tracker.note(&format!(
        "running {argv:?} (time limit {}s, {})",
        manifest.build.timeout_secs,
        if manifest.build.network {
            "with the host's network"
        } else {
            "no network"
        }
    ));
    let (reader, writer) =
        std::io::pipe().map_err(|e| format!("cannot create the log pipe: {e}"))?;
    let mut env: Vec<(String, OsString)> = vec![
        ("HOME".into(), home.into_os_string()),
        ("TMPDIR".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("CARGO_TARGET_DIR".into(), target.into_os_string()),
        ("CARGO_TERM_COLOR".into(), "never".into()),
        ("REVBOOT_SERVICE".into(), job.service.clone().into()),
        ("REVBOOT_SOURCE_COMMIT".into(), job.commit.clone().into()),
        ("REVBOOT_SOURCE_REF".into(), job.refname.clone().into()),
        ("REVBOOT_BUILD_ID".into(), job.id.to_string().into()),
    ];
    if let Some(cargo_home) = &ctx.cargo_home {
        env.push(("CARGO_HOME".into(), cargo_home.clone().into_os_string()));
    }
    if let Some(rustup_home) = &ctx.rustup_home {
        env.push(("RUSTUP_HOME".into(), rustup_home.clone().into_os_string()));
    }
    env.extend(
        manifest
            .build
            .env
            .iter()
            .map(|(key, value)| (key.clone(), OsString::from(value))),
    );
    let started = Instant::now();
    let running = ctx
        .sandbox
        .launch(sandbox::Launch {
            id: job.id,
            argv,
            env,
            checkout: checkout.to_owned(),
            cache: cache.to_owned(),
            network: manifest.build.network,
            output: OwnedFd::from(writer),
        })
        .await?;
    let sandbox::Running { pidfd, groups } = running;
    // A blocking wait on a thread of its own (builds are few): it returns when the build's
    // first process is gone, whoever ended it.
    let pidfd = std::sync::Arc::new(pidfd);
    let waited = std::sync::Arc::clone(&pidfd);
    let mut ended = tokio::task::spawn_blocking(move || spawn::reap_blocking(waited.as_raw_fd()));
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
        .map_err(|e| format!("cannot read the log pipe: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(manifest.build.timeout_secs);
    let mut disk = tokio::time::interval(DISK_CHECK);
    disk.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buffer = vec![0u8; 16 * 1024];
    let mut pipe_open = true;
    let ending = loop {
        tokio::select! {
            read = pipe.read(&mut buffer), if pipe_open => match read {
                Ok(0) | Err(_) => pipe_open = false,
                Ok(n) => tracker.output(&buffer[..n]),
            },
            waited = &mut ended => match waited {
                Ok(Ok(Some(exit))) => break Ending::Exited(exit),
                Ok(Ok(None)) => break Ending::Exited(Exit::Signal(0)),
                Ok(Err(error)) => return Err(format!("cannot wait for the build: {error}")),
                Err(error) => return Err(format!("cannot wait for the build: {error}")),
            },
            () = tokio::time::sleep_until(deadline) => break Ending::TimedOut,
            _ = disk.tick() => {
                if let Some(reason) = over_disk(ctx, checkout, cache).await {
                    break Ending::Disk(reason);
                }
            },
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break Ending::Stopped;
                }
            }
        }
    };
    let command_secs = started.elapsed().as_secs_f64();
    // Whatever the ending, nothing the build started outlives it: its first process is
    // pid 1 of its namespace, and when it dies the kernel kills the rest.
    if !matches!(ending, Ending::Exited(_)) {
        spawn::send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = ended.await;
    }
    let ending = match (ending, groups) {
        (ending, Some(groups)) => {
            let oom = groups.oom_killed();
            let _ = tokio::task::spawn_blocking(move || groups.remove()).await;
            match ending {
                Ending::Exited(Exit::Signal(libc::SIGKILL)) if oom => Ending::OutOfMemory,
                ending => ending,
            }
        }
        (ending, None) => ending,
    };
    let drain_until = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while pipe_open {
        match tokio::time::timeout_at(drain_until, pipe.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => tracker.output(&buffer[..n]),
            Ok(_) => pipe_open = false,
            Err(_) => {
                tracker.note("output still open after the build ended; stopped reading");
                pipe_open = false;
            }
        }
    }
    Ok((ending, command_secs))
}

/// Why the build must stop for its disk use, if it must.
async fn over_disk(ctx: &RunContext, checkout: &Path, cache: &Path) -> Option<String> {
    let limits = ctx.limits.clone();
    let (checkout, cache, data) = (
        checkout.to_owned(),
        cache.to_owned(),
        ctx.builds_root.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let reserve = limits.disk_reserve_mib * 1024 * 1024;
        if sandbox::free_bytes(&data).is_ok_and(|free| free < reserve) {
            return Some(format!(
                "stopped: the data directory's file system has less than {} MiB free ([builds] disk_reserve_mib)",
                limits.disk_reserve_mib
            ));
        }
        let quota = limits.disk_mib * 1024 * 1024;
        match sandbox::usage(&[&checkout, &cache], USAGE_ENTRIES) {
            Some(used) if used <= quota => None,
            Some(used) => Some(format!(
                "stopped: checkout and cache use {} MiB, over the limit of {} MiB ([builds] disk_mib)",
                used / (1024 * 1024),
                limits.disk_mib
            )),
            None => Some(format!(
                "stopped: checkout and cache hold more than {USAGE_ENTRIES} files"
            )),
        }
    })
    .await
    .ok()
    .flatten()
}
