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
//! In a cluster ([`crate::coordinate`]), a build first takes the service's build lock (no
//! lock, no build: it fails saying why) and, between steps 1 and 3, adopts a deployment of
//! the same commit, ref and recipe that another node wrote, as step 2 does.
//!
//! Crash tests stop a build at one point with a fail point: with
//! `REVBOOT_FAILPOINT=after-deployment-commit` in the daemon's environment, a build pauses
//! for [`record::FAILPOINT_PAUSE`] right after its successful deployment commit is on the
//! branch, so that the test can kill the daemon there. Nothing else reads the variable.

mod checkout;
mod command;
mod context;
mod record;

use std::sync::Arc;

use revboot_sandbox::spawn::Exit;
use revboot_store::Manifest;
use tokio::sync::watch;

use crate::git;
use crate::log::Tracker;
use crate::state::Outcome;

use checkout::{check_out, collect_artifacts};
use command::{Ending, run_command};
use context::short;
pub(crate) use context::{Job, RunContext};
use record::{adopt, fail, interrupted, succeed, written_before_the_stop};

/// Runs a build to its end, records it in the store, and returns the outcome; a build
/// that succeeded gives the service's source tags of its commit their deployment tag
/// (see the `tags` module).
pub(crate) async fn run(
    ctx: Arc<RunContext>,
    job: Job,
    tracker: Arc<Tracker>,
    stop: watch::Receiver<bool>,
) -> Outcome {
    let service = job.service.clone();
    let outcome = build(Arc::clone(&ctx), job, tracker, stop).await;
    if outcome.state == crate::state::BuildState::Succeeded {
        crate::tags::name_deployments(&ctx.repos, &ctx.store, &service, &[]).await;
    }
    outcome
}

async fn build(
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
    // In a cluster, one node at a time writes the service's deployments (crate::coordinate):
    // the lock goes with the job, released when the build ends.
    let mut job = job;
    job.lock = match &ctx.coordinator {
        None => None,
        Some(coordinator) => match coordinator.lock_builds(&job.service).await {
            Ok(held) => Some(Arc::new(held)),
            Err(reason) => {
                tracing::warn!(service = job.service, reason, "no build lock: not built");
                return Outcome::internal(format!(
                    "cannot take the cluster's build lock of `{}`: {reason}",
                    job.service
                ));
            }
        },
    };
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
        return adopt(&ctx, &job, &tracker, &manifest, revision, false).await;
    }
    // Another node of the cluster built this commit already (one build per commit).
    if ctx.coordinator.is_some()
        && !job.refname.is_empty()
        && let Some(revision) = written_before_the_stop(&ctx, &job, &manifest_text, 0).await
    {
        return adopt(&ctx, &job, &tracker, &manifest, revision, true).await;
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
    let artifacts = match failure {
        Some(message) => Err(message),
        None => {
            tracker.note(&format!("the build command finished in {command_secs:.2}s"));
            collect_artifacts(&manifest, &checkout, &cache)
        }
    };
    let artifacts = match artifacts {
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
