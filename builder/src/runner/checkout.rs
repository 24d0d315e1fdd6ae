//! The build's files: its checkout (step 3 of the runner), and its artifacts found in the
//! checkout or the service's cache afterwards (step 6).
//!
//! 1. The commit is exported with `git archive` to a file, which `tar -x -m` unpacks into a
//!    fresh directory within [`CHECKOUT_TIMEOUT`] (file times are the checkout's).
//! 2. Each artifact must be a regular file inside the checkout or the cache (through the
//!    `target` link), never a link out of them.
//! 3. The image that boots (`run.image`, or the first artifact) must run on its tender: a
//!    process image must be a static ELF.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use revboot_store::Manifest;
use revboot_store::manifest::artifact_name;

use super::context::short;
use crate::git;

/// How long the checkout (`git archive | tar`) may take.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(300);

/// `git archive <commit> | tar -x -m -C <dir>`.
pub(super) async fn check_out(
    repo: &Path,
    commit: &str,
    dir: &Path,
    workdir: &Path,
) -> Result<(), String> {
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

/// The artifacts by name, each a regular file of the checkout or the cache; the image that
/// boots must run on its tender (a process image must be static).
pub(super) fn collect_artifacts(
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
