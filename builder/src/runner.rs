//! Running one build.
//!
//! 1. Read `revboot.toml` from the pushed commit and validate it; an invalid or missing
//!    recipe ends the build as failed, with the parser's message (key and line) in the log.
//! 2. A re-run of a build that a daemon stop interrupted first looks in the store for a
//!    successful deployment of the same service, source commit, ref and recipe written since
//!    the interrupted build started: the daemon died after writing it, before the queue saved
//!    that the build had finished. The re-run adopts it (and makes the live move the build
//!    would have made) instead of building again, so one push never leaves two deployments.
//! 3. Check the commit out into a fresh directory under `<data>/builds/` with
//!    `git archive | tar -x -m` (file times are the checkout time, so a build tool's
//!    cache never mistakes new sources for old). Nothing is shared with other builds.
//! 4. Run the command (argv, or `sh -c` for `shell`) in the build sandbox
//!    ([`crate::sandbox`]: its own namespaces, an unprivileged uid, only the system, the
//!    toolchain, its checkout and its cache visible) with a clean environment: `PATH` of the
//!    daemon, `HOME` in the per-service cache `<data>/cache/<service>/`, `CARGO_TARGET_DIR`
//!    there too (and `target/` in the checkout linked to it), `CARGO_HOME`/`RUSTUP_HOME` of
//!    the daemon (read-only) so offline Rust builds find their toolchain and registry,
//!    `TMPDIR=/tmp` (the sandbox's own), plus the recipe's `build.env`.
//! 5. stdout and stderr share one pipe; lines are timestamped into the log as they come.
//!    At the wall-clock limit, over the disk limit, or when the daemon stops, the build's
//!    first process gets SIGKILL; when it ends, for whatever reason, the kernel kills every
//!    other process of its pid namespace, so nothing it started lives on. The memory limit
//!    ends it through the kernel's OOM killer, and the build says so.
//! 6. Success: the boot image is checked against its tender (a process image must be a
//!    static ELF, [`revboot_store::image`]); the artifacts are streamed into a deployment
//!    commit with the manifest, log and source link; live moves to it when the recipe
//!    (`run.deploy`) and push option allow, the ref is the deploy branch and the build is
//!    the tip of the newest push of it (a push's older commits never move live). Failure or
//!    interruption: a commit with the log and no image; live untouched.
//! 7. A deployment that cannot be written makes the build a failed one, recorded as such
//!    (a commit with the log and the reason, no image). When the disk is full, the store has
//!    left nothing of the deployment behind; the reason is `no space left on device while
//!    writing the deployment`, and the build is marked to run again by itself once the
//!    deployment repository's file system has room for it ([`Outcome::retry_when_free_bytes`],
//!    see the queue). If even the failed build cannot be written, the pusher is told so and
//!    only the builder's build records keep it.
//!
//! Crash tests stop a build at one point with a fail point: with
//! `REVBOOT_FAILPOINT=after-deployment-commit` in the daemon's environment, a build pauses
//! for [`FAILPOINT_PAUSE`] right after its successful deployment commit is on the branch, so
//! that the test can kill the daemon there. Nothing else reads the variable.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use revboot_sandbox::spawn::{self, Exit};
use revboot_store::manifest::artifact_name;
use revboot_store::{BuildStatus, ImageInput, Manifest, NewDeployment, Revision, Store};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::git;
use crate::log::Tracker;
use crate::repos::SourceRepos;
use crate::sandbox;
use crate::state::{BuildState, Outcome};

/// How long the checkout (`git archive | tar`) may take.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long to keep reading output after the build's processes are gone (nothing should
/// hold the pipe then; a bound all the same).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a build waits at a fail point (module docs) before it goes on.
const FAILPOINT_PAUSE: Duration = Duration::from_secs(600);
/// Why a build failed whose deployment did not fit on the disk.
pub(crate) const NO_SPACE: &str = "no space left on device while writing the deployment";
/// Free space a retry needs beyond three times its images (the build's artifact, the store's
/// spool and the blob): the log, trees, commit and ref.
const RETRY_SLACK_BYTES: u64 = 1 << 20;
/// How often a running build's disk use is checked.
const DISK_CHECK: Duration = Duration::from_secs(2);
/// Files of checkout and cache counted at most by a disk check.
const USAGE_ENTRIES: usize = 500_000;

/// Everything builds share.
#[derive(Debug)]
pub(crate) struct RunContext {
    pub(crate) repos: SourceRepos,
    pub(crate) store: Store,
    pub(crate) cache_root: PathBuf,
    pub(crate) builds_root: PathBuf,
    pub(crate) zone: String,
    pub(crate) cargo_home: Option<PathBuf>,
    pub(crate) rustup_home: Option<PathBuf>,
    /// How often the queue looks for free space for builds that failed for lack of it.
    pub(crate) space_check: Duration,
    pub(crate) sandbox: sandbox::Sandbox,
    pub(crate) limits: sandbox::SandboxConfig,
}

/// One build to run.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) service: String,
    pub(crate) refname: String,
    pub(crate) commit: String,
    pub(crate) deploy_option: Option<bool>,
    /// Whether it is the tip of the newest push of its branch (only a tip moves live).
    pub(crate) tip: bool,
    /// For a re-run of an interrupted build: when that one started (unix ms); a deployment
    /// it wrote since then is adopted.
    pub(crate) adopt_since_ms: Option<u64>,
    /// Whether the build runs again by itself should its deployment not fit on the disk.
    pub(crate) retry_when_full: bool,
}

/// Why a build could not be written to the store.
#[derive(Debug)]
struct NotRecorded {
    /// What went wrong, with its causes, on one line.
    message: String,
    /// The deployment repository's file system is full.
    out_of_space: bool,
}

impl NotRecorded {
    fn reason(&self) -> &str {
        if self.out_of_space {
            "no space left on device"
        } else {
            &self.message
        }
    }
}

/// How the command ended.
enum Ending {
    Exited(Exit),
    TimedOut,
    Stopped,
    /// Killed at its memory limit.
    OutOfMemory,
    /// Stopped for its disk use (the reason).
    Disk(String),
}

/// Runs a build to its end, records it in the store, and returns the outcome.
pub(crate) async fn run(
    ctx: Arc<RunContext>,
    job: Job,
    tracker: Arc<Tracker>,
    stop: watch::Receiver<bool>,
) -> Outcome {
    tracker.start_clock();
    tracker.note(&format!(
        "build #{} of {} {} at {}",
        job.id, job.service, job.refname, job.commit
    ));
    let repo = ctx.repos.path(&job.service);
    let subject = git::run_text(Some(&repo), &["log", "-1", "--format=%s", &job.commit])
        .await
        .unwrap_or_default();
    let spec = format!("{}:{}", job.commit, revboot_store::manifest::FILE_NAME);
    let manifest_text = match git::run(Some(&repo), &["show", &spec]).await {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => {
                let message = "revboot.toml is not valid UTF-8".to_owned();
                return fail(&ctx, &job, &subject, &tracker, None, message, None).await;
            }
        },
        Err(error) => {
            tracing::debug!(%error, "no recipe");
            let message = format!(
                "no {} at the root of commit {}",
                revboot_store::manifest::FILE_NAME,
                short(&job.commit)
            );
            return fail(&ctx, &job, &subject, &tracker, None, message, None).await;
        }
    };
    let manifest = match Manifest::from_toml(&manifest_text) {
        Ok(manifest) => manifest,
        Err(error) => {
            let message = format!("invalid recipe: {error}");
            return fail(&ctx, &job, &subject, &tracker, None, message, None).await;
        }
    };
    if let Some(since_ms) = job.adopt_since_ms
        && let Some(revision) = written_before_the_stop(&ctx, &job, &manifest_text, since_ms).await
    {
        return adopt(&ctx, &job, &tracker, &manifest, revision).await;
    }
    let workdir = match tempfile::Builder::new()
        .prefix(&format!("{}-{}-", job.service, job.id))
        .tempdir_in(&ctx.builds_root)
    {
        Ok(dir) => dir,
        Err(error) => {
            let message = format!("cannot create a build directory: {error}");
            let text = Some(manifest_text.as_str());
            return fail(&ctx, &job, &subject, &tracker, text, message, None).await;
        }
    };
    let checkout = workdir.path().join("src");
    if let Err(message) = check_out(&repo, &job.commit, &checkout, workdir.path()).await {
        let text = Some(manifest_text.as_str());
        return fail(&ctx, &job, &subject, &tracker, text, message, None).await;
    }
    let cache = ctx.cache_root.join(&job.service);
    let (ending, command_secs) =
        match run_command(&ctx, &job, &manifest, &checkout, &cache, &tracker, stop).await {
            Ok(result) => result,
            Err(message) => {
                let text = Some(manifest_text.as_str());
                return fail(&ctx, &job, &subject, &tracker, text, message, None).await;
            }
        };
    let text = Some(manifest_text.as_str());
    let failure = match ending {
        Ending::Exited(Exit::Code(0)) => None,
        Ending::Exited(Exit::Code(code)) => {
            Some(format!("the build command failed (exit status {code})"))
        }
        Ending::Exited(Exit::Signal(signal)) => Some(format!(
            "the build command failed (killed by signal {signal})"
        )),
        Ending::OutOfMemory => Some(format!(
            "killed: the build used more than its {} MiB of memory ([builds] memory_mib)",
            ctx.limits.memory_mib
        )),
        Ending::Disk(reason) => Some(reason),
        Ending::TimedOut => Some(format!(
            "killed: the build ran longer than its limit of {}s (build.timeout_secs)",
            manifest.build.timeout_secs
        )),
        Ending::Stopped => {
            return interrupted(&ctx, &job, &subject, &tracker, text, command_secs).await;
        }
    };
    if let Some(message) = failure {
        return fail(
            &ctx,
            &job,
            &subject,
            &tracker,
            text,
            message,
            Some(command_secs),
        )
        .await;
    }
    tracker.note(&format!("the build command finished in {command_secs:.2}s"));
    let artifacts = match collect_artifacts(&manifest, &checkout, &cache) {
        Ok(artifacts) => artifacts,
        Err(message) => {
            return fail(
                &ctx,
                &job,
                &subject,
                &tracker,
                text,
                message,
                Some(command_secs),
            )
            .await;
        }
    };
    succeed(
        &ctx,
        &job,
        &subject,
        &tracker,
        &manifest,
        &manifest_text,
        artifacts,
        command_secs,
    )
    .await
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// `git archive <commit> | tar -x -m -C <dir>`.
async fn check_out(repo: &Path, commit: &str, dir: &Path, workdir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tar_path = workdir.join("source.tar");
    let tar_str = tar_path.to_string_lossy().into_owned();
    // Writing the archive to a file (not a pipe between two children) keeps each step's
    // error separate and needs no extra process plumbing; sources are small.
    git::run(
        Some(repo),
        &["archive", "--format=tar", "-o", &tar_str, commit],
    )
    .await
    .map_err(|e| format!("cannot export commit {}: {e}", short(commit)))?;
    let mut tar = tokio::process::Command::new("tar");
    tar.arg("-x")
        .arg("-m")
        .arg("-f")
        .arg(&tar_path)
        .arg("-C")
        .arg(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(CHECKOUT_TIMEOUT, tar.output())
        .await
        .map_err(|_| "the checkout took too long".to_owned())?
        .map_err(|e| format!("cannot run tar: {e}"))?;
    let _ = std::fs::remove_file(&tar_path);
    if !output.status.success() {
        return Err(format!(
            "cannot unpack the checkout: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_command(
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

/// The artifacts by name, each a regular file of the checkout or the cache; the image that
/// boots must run on its tender (a process image must be static).
fn collect_artifacts(
    manifest: &Manifest,
    checkout: &Path,
    cache: &Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    let artifacts = manifest
        .build
        .artifacts
        .iter()
        .map(|artifact| {
            locate_artifact(checkout, cache, artifact)
                .map(|path| (artifact_name(artifact).to_owned(), path))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let boot = manifest
        .run
        .image
        .as_deref()
        .and_then(|name| artifacts.iter().find(|(artifact, _)| artifact == name))
        .or(artifacts.first());
    if let Some((name, path)) = boot {
        revboot_store::image::check_path(name, manifest.run.tender, path)
            .map_err(|error| error.to_string())?;
    }
    Ok(artifacts)
}

/// Finds an artifact after the build: a regular file inside the checkout or the
/// service's cache (through the `target` link).
fn locate_artifact(checkout: &Path, cache: &Path, artifact: &str) -> Result<PathBuf, String> {
    let path = checkout.join(artifact);
    let missing = || format!("artifact `{artifact}` was not produced by the build");
    let real = path.canonicalize().map_err(|_| missing())?;
    let inside = [checkout, cache]
        .iter()
        .filter_map(|root| root.canonicalize().ok())
        .any(|root| real.starts_with(root));
    if !inside {
        return Err(format!(
            "artifact `{artifact}` points outside the checkout and the build cache"
        ));
    }
    if !real.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(format!("artifact `{artifact}` is not a regular file"));
    }
    Ok(real)
}

fn dns_name(revision: &Revision, service: &str, zone: &str) -> String {
    format!("{}.{service}.{zone}", revision.short(12))
}

async fn fail(
    ctx: &RunContext,
    job: &Job,
    subject: &str,
    tracker: &Tracker,
    manifest: Option<&str>,
    message: String,
    command_secs: Option<f64>,
) -> Outcome {
    tracker.note(&format!("build failed: {message}"));
    let log = tracker.finish_log();
    let recorded = record(
        ctx,
        job,
        subject,
        BuildStatus::Failed,
        manifest,
        &log,
        Vec::new(),
    )
    .await;
    let mut outcome = Outcome {
        state: BuildState::Failed,
        revision: None,
        made_live: false,
        summary: format!("failed: {message}"),
        result_lines: vec![format!("build #{} failed: {message}", job.id)],
        command_secs,
        retry_when_free_bytes: None,
    };
    match recorded {
        Ok(revision) => {
            outcome.revision = Some(revision);
            outcome.result_lines.push(format!(
                "failed build recorded as {}; live unchanged",
                revision.short(12)
            ));
        }
        Err(error) => outcome.result_lines.push(format!(
            "the failed build could not be recorded in the deployment repository ({}); only the builder's build records keep it; live unchanged",
            error.reason()
        )),
    }
    outcome
}

async fn interrupted(
    ctx: &RunContext,
    job: &Job,
    subject: &str,
    tracker: &Tracker,
    manifest: Option<&str>,
    command_secs: f64,
) -> Outcome {
    tracker.note("build interrupted: the daemon is stopping; it will run again on start");
    let log = tracker.finish_log();
    let recorded = record(
        ctx,
        job,
        subject,
        BuildStatus::Interrupted,
        manifest,
        &log,
        Vec::new(),
    )
    .await;
    Outcome {
        state: BuildState::Interrupted,
        revision: recorded.ok(),
        made_live: false,
        summary: "interrupted: the daemon stopped".into(),
        result_lines: vec![format!(
            "build #{} interrupted by a daemon stop; it will run again when the daemon starts",
            job.id
        )],
        command_secs: Some(command_secs),
        retry_when_free_bytes: None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn succeed(
    ctx: &RunContext,
    job: &Job,
    subject: &str,
    tracker: &Tracker,
    manifest: &Manifest,
    manifest_text: &str,
    artifacts: Vec<(String, PathBuf)>,
    command_secs: f64,
) -> Outcome {
    let sizes: Vec<u64> = artifacts
        .iter()
        .map(|(_, path)| path.metadata().map(|m| m.len()).unwrap_or(0))
        .collect();
    let listed: Vec<String> = artifacts
        .iter()
        .zip(&sizes)
        .map(|((name, _), size)| format!("{name} ({size} bytes)"))
        .collect();
    tracker.note(&format!("storing image {}", listed.join(", ")));
    let log = tracker.finish_log();
    let revision = match record(
        ctx,
        job,
        subject,
        BuildStatus::Succeeded,
        Some(manifest_text),
        &log,
        artifacts,
    )
    .await
    {
        Ok(revision) => revision,
        Err(error) => {
            let message = if error.out_of_space {
                NO_SPACE.to_owned()
            } else {
                format!("the deployment could not be written: {}", error.message)
            };
            let text = Some(manifest_text);
            let mut outcome = fail(
                ctx,
                job,
                subject,
                tracker,
                text,
                message,
                Some(command_secs),
            )
            .await;
            if !error.out_of_space {
                return outcome;
            }
            if !job.retry_when_full {
                outcome.result_lines.push(format!(
                    "it failed this way {} times in a row and is not retried by itself again; push again once there is room",
                    crate::state::MAX_SPACE_RETRIES + 1
                ));
                return outcome;
            }
            let images: u64 = sizes.iter().sum();
            let needed = images.saturating_mul(3) + log.len() as u64 + RETRY_SLACK_BYTES;
            outcome.retry_when_free_bytes = Some(needed);
            outcome.result_lines.push(format!(
                "it builds again by itself once the deployment repository has {:.1} MiB free (checked every {}s)",
                needed as f64 / f64::from(1 << 20),
                ctx.space_check.as_secs()
            ));
            return outcome;
        }
    };
    let mut result_lines = vec![format!(
        "build #{} succeeded (build command {command_secs:.2}s, total {:.2}s)",
        job.id,
        tracker.elapsed()
    )];
    let made_live = announce(ctx, job, manifest, revision, &mut result_lines).await;
    Outcome {
        state: BuildState::Succeeded,
        revision: Some(revision),
        made_live,
        summary: format!("succeeded: deployment {}", revision.short(12)),
        result_lines,
        command_secs: Some(command_secs),
        retry_when_free_bytes: None,
    }
}

/// The deployment of `job` that an interrupted run of it wrote since `since_ms`, if any:
/// succeeded, of the same source commit, ref and recipe.
async fn written_before_the_stop(
    ctx: &RunContext,
    job: &Job,
    manifest_text: &str,
    since_ms: u64,
) -> Option<Revision> {
    let store = ctx.store.clone();
    let (service, commit, refname) = (job.service.clone(), job.commit.clone(), job.refname.clone());
    let manifest_text = manifest_text.to_owned();
    let since = i64::try_from(since_ms / 1000).unwrap_or(i64::MAX);
    let found = tokio::task::spawn_blocking(move || {
        // No branch yet: nothing was written.
        let history = store.history(&service).ok()?;
        history
            .into_iter()
            .filter(|d| {
                d.status == BuildStatus::Succeeded
                    && d.time >= since
                    && d.source_commit == commit
                    && d.source_ref.as_deref() == Some(refname.as_str())
            })
            .map(|d| d.revision)
            .find(|revision| {
                store.manifest_text(revision).ok().flatten().as_deref() == Some(&manifest_text)
            })
    })
    .await;
    found.unwrap_or_else(|error| {
        tracing::warn!(%error, service = job.service, "cannot look for an earlier deployment");
        None
    })
}

/// Takes over a deployment that the interrupted run of `job` wrote.
async fn adopt(
    ctx: &RunContext,
    job: &Job,
    tracker: &Tracker,
    manifest: &Manifest,
    revision: Revision,
) -> Outcome {
    let short = revision.short(12);
    tracker.note(&format!(
        "deployment {short} of this commit was written before the daemon stopped; adopting it instead of building again"
    ));
    tracing::info!(id = job.id, service = job.service, revision = %revision, "adopted the deployment of an interrupted build");
    let mut result_lines = vec![format!(
        "build #{}: deployment {short} was written before the daemon stopped; adopted, not built again",
        job.id
    )];
    let made_live = announce(ctx, job, manifest, revision, &mut result_lines).await;
    Outcome {
        state: BuildState::Succeeded,
        revision: Some(revision),
        made_live,
        summary: format!("succeeded: deployment {short} (written before a daemon stop)"),
        result_lines,
        command_secs: None,
        retry_when_free_bytes: None,
    }
}

/// Names the deployment's DNS name to the pusher and moves live to it where the recipe, the
/// push and the branch allow; returns whether live now names it.
async fn announce(
    ctx: &RunContext,
    job: &Job,
    manifest: &Manifest,
    revision: Revision,
    result_lines: &mut Vec<String>,
) -> bool {
    let name = dns_name(&revision, &job.service, &ctx.zone);
    result_lines.push(format!(
        "deployment {} answers at {name}",
        revision.short(12)
    ));
    let deploy_branch = ctx
        .repos
        .deploy_branch(&job.service)
        .await
        .unwrap_or_else(|_| "refs/heads/main".into());
    let skip = if !manifest.run.deploy {
        Some("run.deploy = false in revboot.toml".to_owned())
    } else if job.deploy_option == Some(false) {
        Some("push option revboot.deploy=false".to_owned())
    } else if !job.tip {
        Some("not the tip of the newest push of its branch".to_owned())
    } else if job.refname != deploy_branch {
        Some(format!(
            "{} is not the deploy branch {deploy_branch}",
            job.refname
        ))
    } else {
        None
    };
    let mut made_live = false;
    match skip {
        Some(reason) => result_lines.push(format!("live unchanged: {reason}")),
        None => {
            let store = ctx.store.clone();
            let service = job.service.clone();
            let reason = format!(
                "build #{} of {} at {}",
                job.id,
                job.refname,
                short(&job.commit)
            );
            let moved =
                tokio::task::spawn_blocking(move || store.set_live(&service, &revision, &reason))
                    .await;
            match moved {
                Ok(Ok(_)) => {
                    made_live = true;
                    result_lines.push(format!(
                        "live: {}.{} now answers with {}",
                        job.service,
                        ctx.zone,
                        revision.short(12)
                    ));
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, service = job.service, "cannot move live");
                    result_lines.push(format!("live unchanged: cannot move it: {error}"));
                }
                Err(error) => result_lines.push(format!("live unchanged: {error}")),
            }
        }
    }
    made_live
}

/// Writes the deployment commit (on a blocking thread: the store does file I/O).
async fn record(
    ctx: &RunContext,
    job: &Job,
    subject: &str,
    status: BuildStatus,
    manifest: Option<&str>,
    log: &[u8],
    artifacts: Vec<(String, PathBuf)>,
) -> Result<Revision, NotRecorded> {
    let store = ctx.store.clone();
    let service = job.service.clone();
    let commit = job.commit.clone();
    let refname = job.refname.clone();
    let subject = subject.to_owned();
    let manifest = manifest.map(str::to_owned);
    let log = log.to_vec();
    let result = tokio::task::spawn_blocking(move || {
        let succeeded = status == BuildStatus::Succeeded;
        let mut images = Vec::new();
        for (name, path) in &artifacts {
            let file = std::fs::File::open(path).map_err(|e| NotRecorded {
                message: format!("cannot open artifact {}: {e}", path.display()),
                out_of_space: false,
            })?;
            images.push(ImageInput {
                name: name.clone(),
                reader: Box::new(std::io::BufReader::new(file)),
            });
        }
        store
            .write_deployment(NewDeployment {
                service: &service,
                status,
                manifest: manifest.as_deref(),
                images,
                build_log: &log,
                source_commit: &commit,
                source_repo: &service,
                // A build on demand is of a commit, not of a branch.
                source_ref: (!refname.is_empty()).then_some(refname.as_str()),
                subject: &subject,
            })
            .inspect(|_| {
                if succeeded {
                    failpoint("after-deployment-commit");
                }
            })
            .map_err(|error| {
                let mut message = error.to_string();
                let mut cause = std::error::Error::source(&error);
                while let Some(inner) = cause {
                    message.push_str(&format!(": {inner}"));
                    cause = inner.source();
                }
                NotRecorded {
                    message,
                    out_of_space: error.is_out_of_space(),
                }
            })
    })
    .await
    .map_err(|error| NotRecorded {
        message: format!("the store task failed: {error}"),
        out_of_space: false,
    })?;
    if let Err(error) = &result {
        tracing::error!(
            error = error.message,
            service = job.service,
            "cannot write deployment"
        );
    }
    result
}

/// Pauses here for [`FAILPOINT_PAUSE`] when `REVBOOT_FAILPOINT` names `name` (module docs).
fn failpoint(name: &str) {
    if std::env::var_os("REVBOOT_FAILPOINT").is_some_and(|value| value == name) {
        tracing::warn!(failpoint = name, "paused at a fail point");
        std::thread::sleep(FAILPOINT_PAUSE);
    }
}
