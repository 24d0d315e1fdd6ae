//! Recording a build in the deployment repository and moving live (steps 2, 6 and 7 of the
//! runner).
//!
//! 1. Success: the artifacts are streamed into a deployment commit with the manifest, the
//!    log and the source link; the pusher is told the deployment's DNS name, and live moves
//!    to it when the recipe, the push option, the branch and its being the tip allow.
//! 2. Failure or interruption: a commit with the log and no image; live is untouched.
//! 3. A deployment that cannot be written is recorded as a failed build with the reason;
//!    one that did not fit on the disk ([`NO_SPACE`]) runs again by itself once there is
//!    room, as the queue decides. If even the failed build cannot be written, only the
//!    builder's build records keep it.
//! 4. A re-run of an interrupted build adopts a successful deployment of the same service,
//!    source commit, ref and recipe written since that build started, instead of building
//!    again.

use std::path::PathBuf;
use std::time::Duration;

use revboot_store::{BuildStatus, ImageInput, Manifest, NewDeployment, Revision};

use super::context::{Job, RunContext, short};
use crate::log::Tracker;
use crate::state::{BuildState, Outcome};

/// How long a build waits at a fail point (module docs) before it goes on.
const FAILPOINT_PAUSE: Duration = Duration::from_secs(600);
/// Why a build failed whose deployment did not fit on the disk.
const NO_SPACE: &str = "no space left on device while writing the deployment";
/// Free space a retry needs beyond three times its images (the build's artifact, the store's
/// spool and the blob): the log, trees, commit and ref.
const RETRY_SLACK_BYTES: u64 = 1 << 20;

/// Why a build could not be written to the store.
#[derive(Debug)]
struct NotRecorded {
    /// What went wrong, with its causes, on one line.
    message: String,
    /// The deployment repository's file system is full.
    out_of_space: bool,
    /// The cluster's build lock was not this node's any more ([`crate::coordinate`]).
    lock_lost: bool,
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

fn dns_name(revision: &Revision, service: &str, zone: &str) -> String {
    format!("{}.{service}.{zone}", revision.short(12))
}

pub(super) async fn fail(
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
        refused: None,
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

pub(super) async fn interrupted(
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
        refused: None,
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn succeed(
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
        Err(error) if error.lock_lost => return lock_lost(job, &error.message, command_secs),
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
    let (made_live, refused) = announce(ctx, job, manifest, revision, &mut result_lines).await;
    let mut summary = format!("succeeded: deployment {}", revision.short(12));
    if let Some(why) = &refused {
        summary.push_str(&format!("; not made live: {why}"));
    }
    Outcome {
        state: BuildState::Succeeded,
        revision: Some(revision),
        made_live,
        summary,
        result_lines,
        command_secs: Some(command_secs),
        retry_when_free_bytes: None,
        refused,
    }
}

/// A build whose deployment was not written because the cluster's build lock was not this
/// node's any more (`reason`): interrupted, and the deployments another node wrote meanwhile
/// are fetched as any others (the daemon's part).
fn lock_lost(job: &Job, reason: &str, command_secs: f64) -> Outcome {
    tracing::warn!(
        service = job.service,
        build = job.id,
        reason,
        "build interrupted: its deployment was not written"
    );
    Outcome {
        state: BuildState::Interrupted,
        revision: None,
        made_live: false,
        summary: format!("interrupted: {reason}"),
        result_lines: vec![format!(
            "build #{} interrupted: {reason}; its deployment was not written, so that the service's deployments stay one line",
            job.id
        )],
        command_secs: Some(command_secs),
        retry_when_free_bytes: None,
        refused: None,
    }
}

/// The deployment of `job` that an interrupted run of it wrote since `since_ms`, if any:
/// succeeded, of the same source commit, ref and recipe.
pub(super) async fn written_before_the_stop(
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

/// Takes over a deployment that the interrupted run of `job` wrote, or, in a cluster,
/// that another node wrote of the same commit (`elsewhere`).
pub(super) async fn adopt(
    ctx: &RunContext,
    job: &Job,
    tracker: &Tracker,
    manifest: &Manifest,
    revision: Revision,
    elsewhere: bool,
) -> Outcome {
    let short = revision.short(12);
    let when = if elsewhere {
        "by another node of the cluster"
    } else {
        "before the daemon stopped"
    };
    tracker.note(&format!(
        "deployment {short} of this commit was written {when}; adopting it instead of building again"
    ));
    tracing::info!(id = job.id, service = job.service, revision = %revision, elsewhere, "adopted a deployment written earlier");
    let mut result_lines = vec![format!(
        "build #{}: deployment {short} was written {when}; adopted, not built again",
        job.id
    )];
    let (made_live, refused) = announce(ctx, job, manifest, revision, &mut result_lines).await;
    Outcome {
        state: BuildState::Succeeded,
        revision: Some(revision),
        made_live,
        summary: format!("succeeded: deployment {short} (written {when})"),
        result_lines,
        command_secs: None,
        retry_when_free_bytes: None,
        refused,
    }
}

/// Names the deployment's DNS name to the pusher and moves live to it where the recipe, the
/// push, the branch and the promotion's gate ([`crate::gate`]) allow; returns whether live
/// now names it, and why the gate refused it.
async fn announce(
    ctx: &RunContext,
    job: &Job,
    manifest: &Manifest,
    revision: Revision,
    result_lines: &mut Vec<String>,
) -> (bool, Option<String>) {
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
    let gate = ctx
        .gate
        .as_ref()
        .filter(|_| skip.is_none() && crate::gate::gated(manifest));
    if let Some(gate) = gate {
        match gate.admit(&job.service, revision, manifest).await {
            Ok(lines) => result_lines.extend(lines),
            Err(why) => {
                tracing::warn!(service = job.service, revision = %revision, why, "promotion refused");
                result_lines.push(format!("health check failed: {why}; live unchanged"));
                return (false, Some(format!("health check failed: {why}")));
            }
        }
    }
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
                    if let Some(gate) = &ctx.gate {
                        gate.promoted(&job.service, revision);
                    }
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
    (made_live, None)
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
    // In a cluster, the build lock is checked right before the branch moves.
    let lock = ctx.coordinator.clone().zip(job.lock.clone());
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || {
        let check = || match &lock {
            Some((coordinator, held)) => handle.block_on(coordinator.check_lock(&service, held)),
            None => Ok(()),
        };
        let succeeded = status == BuildStatus::Succeeded;
        let mut images = Vec::new();
        for (name, path) in &artifacts {
            let file = std::fs::File::open(path).map_err(|e| NotRecorded {
                message: format!("cannot open artifact {}: {e}", path.display()),
                out_of_space: false,
                lock_lost: false,
            })?;
            images.push(ImageInput {
                name: name.clone(),
                reader: Box::new(std::io::BufReader::new(file)),
            });
        }
        store
            .write_deployment_checked(
                NewDeployment {
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
                },
                check,
            )
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
                    lock_lost: matches!(error, revboot_store::WriteError::Refused { .. }),
                }
            })
    })
    .await
    .map_err(|error| NotRecorded {
        message: format!("the store task failed: {error}"),
        out_of_space: false,
        lock_lost: false,
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
