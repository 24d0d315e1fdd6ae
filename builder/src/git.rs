//! Running stock `git` as a subprocess, always with a time limit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// How long a plain git command (not a transfer) may take.
pub(crate) const GIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest output read from a plain git command.
const MAX_OUTPUT: usize = 16 * 1024 * 1024;

/// A git command that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GitError {
    /// `git` could not be started.
    #[error("Cannot run `git {args}`")]
    Spawn {
        /// The arguments.
        args: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `git` ran longer than its limit and was killed.
    #[error("`git {args}` took longer than {}s and was killed", GIT_TIMEOUT.as_secs())]
    Timeout {
        /// The arguments.
        args: String,
    },
    /// `git` exited unsuccessfully.
    #[error("`git {args}` failed ({status}): {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// The exit status.
        status: std::process::ExitStatus,
        /// What git printed on stderr (trimmed).
        stderr: String,
    },
    /// `git` printed more than the output limit.
    #[error("`git {args}` printed more than {MAX_OUTPUT} bytes")]
    TooMuchOutput {
        /// The arguments.
        args: String,
    },
}

/// The git binary: `$REVBOOT_GIT` if set, else `git` from `PATH`.
pub(crate) fn git_binary() -> PathBuf {
    std::env::var_os("REVBOOT_GIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("git"))
}

/// A `git` command with a predictable environment: no system or global config, no prompts.
pub(crate) fn command(git_dir: Option<&Path>) -> Command {
    let mut command = Command::new(git_binary());
    command
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .env_remove("GIT_QUARANTINE_PATH")
        .kill_on_drop(true)
        .stdin(Stdio::null());
    if let Some(git_dir) = git_dir {
        command.arg("--git-dir").arg(git_dir);
    }
    command
}

/// Runs `git [--git-dir DIR] ARGS` and returns its stdout.
pub(crate) async fn run(git_dir: Option<&Path>, args: &[&str]) -> Result<Vec<u8>, GitError> {
    let joined = args.join(" ");
    let mut command = command(git_dir);
    command.args(args);
    let output = tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .map_err(|_| GitError::Timeout {
            args: joined.clone(),
        })?
        .map_err(|source| GitError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if output.stdout.len() > MAX_OUTPUT {
        return Err(GitError::TooMuchOutput { args: joined });
    }
    if !output.status.success() {
        return Err(GitError::Failed {
            args: joined,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output.stdout)
}

/// Like [`run`], as trimmed UTF-8 (lossy).
pub(crate) async fn run_text(git_dir: Option<&Path>, args: &[&str]) -> Result<String, GitError> {
    let stdout = run(git_dir, args).await?;
    Ok(String::from_utf8_lossy(&stdout).trim().to_owned())
}
