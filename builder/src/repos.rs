//! Source repositories: one bare repository per service, `<data>/src/<service>.git`.
//!
//! 1. A repository is created by [`crate::Builder::add_service`] or by the first
//!    authenticated push to `/git/<service>.git`: `git init --bare -b main` in a temporary
//!    directory beside the final one, configured, then renamed into place (so a half-made
//!    repository is never visible and two racing creators both succeed).
//! 2. Every repository carries a `post-receive` hook (see [`hook_script`]) that hands the
//!    pushed refs to the daemon. Hooks are rewritten whenever the daemon starts, so they
//!    always carry the current daemon URL and hook token.
//! 3. The branch `HEAD` points to (`main` unless changed with stock git) is the deploy
//!    branch: only its builds move the live pointer. Other branches are built and reachable
//!    by their branch label.

use std::path::{Path, PathBuf};

use crate::git::{self, GitError};
use crate::name::{ServiceNameError, validate_service_name};

/// Why a source repository could not be created or prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddServiceError {
    /// The name is not a valid service name.
    #[error(transparent)]
    Name(#[from] ServiceNameError),
    /// A file operation failed.
    #[error("Cannot prepare source repository {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `git init` or `git config` failed.
    #[error("Cannot initialise source repository for `{service}`")]
    Git {
        /// The service.
        service: String,
        /// Why.
        #[source]
        source: GitError,
    },
}

/// What the hook needs to reach the daemon.
#[derive(Debug, Clone)]
pub(crate) struct HookTarget {
    /// Base URL of the router, e.g. `http://127.0.0.1:7070`.
    pub(crate) base_url: String,
    /// The per-daemon token the hook presents.
    pub(crate) token: String,
    /// How long the hook waits for the build's result.
    pub(crate) max_time_secs: u64,
}

/// The directory of source repositories.
#[derive(Debug, Clone)]
pub(crate) struct SourceRepos {
    root: PathBuf,
    hook: HookTarget,
}

/// A branch head in a source repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BranchHead {
    pub(crate) refname: String,
    pub(crate) commit: String,
}

impl SourceRepos {
    pub(crate) fn new(root: PathBuf, hook: HookTarget) -> SourceRepos {
        SourceRepos { root, hook }
    }

    /// `<data>/src`.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// `<data>/src/<service>.git` (the name must be valid).
    pub(crate) fn path(&self, service: &str) -> PathBuf {
        self.root.join(format!("{service}.git"))
    }

    pub(crate) fn exists(&self, service: &str) -> bool {
        validate_service_name(service).is_ok() && self.path(service).join("HEAD").is_file()
    }

    /// The services that have a source repository, sorted.
    pub(crate) fn list(&self) -> std::io::Result<Vec<String>> {
        let mut services = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(services),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(service) = name.to_str().and_then(|n| n.strip_suffix(".git")) else {
                continue;
            };
            if self.exists(service) {
                services.push(service.to_owned());
            }
        }
        services.sort();
        Ok(services)
    }

    /// Creates the repository of `service` if it does not exist; returns its path and
    /// whether it was created now.
    pub(crate) async fn create(&self, service: &str) -> Result<(PathBuf, bool), AddServiceError> {
        validate_service_name(service)?;
        let path = self.path(service);
        if self.exists(service) {
            return Ok((path, false));
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| AddServiceError::Io { path, source }
        };
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".new-{service}-"))
            .tempdir_in(&self.root)
            .map_err(io(&self.root))?;
        let git_err = |source| AddServiceError::Git {
            service: service.to_owned(),
            source,
        };
        let staging_str = staging.path().to_string_lossy().into_owned();
        git::run(
            None,
            &[
                "init",
                "--quiet",
                "--bare",
                "--template=",
                "-b",
                "main",
                &staging_str,
            ],
        )
        .await
        .map_err(git_err)?;
        for (key, value) in [
            // The daemon authenticates pushes itself; http-backend may then accept them.
            ("http.receivepack", "true"),
            ("receive.advertisePushOptions", "true"),
            ("receive.fsckObjects", "true"),
            ("core.logAllRefUpdates", "true"),
        ] {
            git::run(Some(staging.path()), &["config", key, value])
                .await
                .map_err(git_err)?;
        }
        write_hook(staging.path(), service, &self.hook).map_err(io(staging.path()))?;
        let staging = staging.keep();
        match std::fs::rename(&staging, &path) {
            Ok(()) => {
                tracing::info!(service, path = %path.display(), "created source repository");
                Ok((path, true))
            }
            Err(_) if self.exists(service) => {
                // Another creator won the race; theirs is as good as ours.
                let _ = std::fs::remove_dir_all(&staging);
                Ok((path, false))
            }
            Err(source) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(AddServiceError::Io { path, source })
            }
        }
    }

    /// Rewrites the hook of an existing repository (current URL and token).
    pub(crate) fn refresh_hook(&self, service: &str) -> std::io::Result<()> {
        write_hook(&self.path(service), service, &self.hook)
    }

    /// The branch heads (`refs/heads/*`) of a repository.
    pub(crate) async fn branch_heads(&self, service: &str) -> Result<Vec<BranchHead>, GitError> {
        let text = git::run_text(
            Some(&self.path(service)),
            &[
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                "refs/heads/",
            ],
        )
        .await?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(commit, refname)| BranchHead {
                refname: refname.to_owned(),
                commit: commit.to_owned(),
            })
            .collect())
    }

    /// The deploy branch: the ref `HEAD` points to.
    pub(crate) async fn deploy_branch(&self, service: &str) -> Result<String, GitError> {
        git::run_text(Some(&self.path(service)), &["symbolic-ref", "HEAD"]).await
    }
}

fn write_hook(git_dir: &Path, service: &str, target: &HookTarget) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let hooks = git_dir.join("hooks");
    std::fs::create_dir_all(&hooks)?;
    let staging = hooks.join(".post-receive.new");
    std::fs::write(&staging, hook_script(service, target))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&staging, hooks.join("post-receive"))
}

/// Quotes a string for a POSIX shell single-quoted context.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The `post-receive` hook of a source repository.
///
/// It reads git's `<old> <new> <ref>` lines, adds the push options, and posts them to the
/// daemon's hook endpoint with curl, printing the streamed answer (build log and result):
/// git relays hook output to the pusher as `remote:` lines. If the daemon cannot be reached
/// the hook says so; the push is stored anyway and the daemon builds it on its next start
/// (it compares branch heads with what it has built).
pub(crate) fn hook_script(service: &str, target: &HookTarget) -> String {
    let url = format!(
        "{}/git/-/hook/{service}",
        target.base_url.trim_end_matches('/')
    );
    let max_time = target.max_time_secs;
    format!(
        r#"#!/bin/sh
# revboot post-receive hook for `{service}`: hands the pushed refs to the revboot daemon and
# prints the build's progress (git shows it to the pusher as "remote:" lines).
# Generated by revboot and rewritten whenever the daemon starts; local edits are lost.
url={url}
token={token}
if ! command -v curl >/dev/null 2>&1; then
  echo "revboot: curl is not installed, so this hook cannot reach the daemon."
  echo "revboot: the push is stored and will be built when the daemon starts."
  exit 0
fi
body=$(
  while read -r old new ref; do printf 'ref %s %s %s\n' "$old" "$new" "$ref"; done
  i=0
  while [ "$i" -lt "${{GIT_PUSH_OPTION_COUNT:-0}}" ]; do
    eval "printf 'option %s\n' \"\$GIT_PUSH_OPTION_$i\""
    i=$((i + 1))
  done
)
printf '%s\n' "$body" | curl -sS -N --connect-timeout 5 --max-time {max_time} \
  -H "Authorization: Bearer $token" -H 'Content-Type: text/plain' \
  --data-binary @- "$url"
status=$?
case $status in
  0) ;;
  7) echo "revboot: the daemon is not running (cannot connect to $url)."
     echo "revboot: the push is stored and will be built when the daemon starts." ;;
  28) echo "revboot: stopped waiting after {max_time}s; the build goes on in the daemon." ;;
  *) echo "revboot: could not hand the push to the daemon (curl exit status $status)."
     echo "revboot: the push is stored and will be built when the daemon starts." ;;
esac
exit 0
"#,
        url = shell_quote(&url),
        token = shell_quote(&target.token),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_without_curl_says_so_and_succeeds() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("post-receive");
        let target = HookTarget {
            base_url: "http://127.0.0.1:9".into(),
            token: "t".into(),
            max_time_secs: 5,
        };
        std::fs::write(&path, hook_script("hello", &target)).expect("write");
        let output = std::process::Command::new("/bin/sh")
            .arg(&path)
            .env_clear()
            .env("PATH", dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("sh runs");
        assert!(output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("curl is not installed"), "{stdout}");
        assert!(
            stdout.contains("will be built when the daemon starts"),
            "{stdout}"
        );
    }

    #[test]
    fn hook_quotes_url_and_token() {
        let script = hook_script(
            "hello",
            &HookTarget {
                base_url: "http://127.0.0.1:7070/".into(),
                token: "it's".into(),
                max_time_secs: 60,
            },
        );
        assert!(script.contains("url='http://127.0.0.1:7070/git/-/hook/hello'\n"));
        assert!(script.contains(r"token='it'\''s'"));
        assert!(script.contains("--max-time 60"));
    }
}
