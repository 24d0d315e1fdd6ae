//! Source repositories: one bare repository per service, `<data>/src/<service>.git`.
//!
//! 1. A repository is created by [`crate::Builder::add_service`] or by the first
//!    authenticated push to `/git/<service>.git`: `git init --bare -b main` in a temporary
//!    directory beside the final one, configured, then renamed into place (so a half-made
//!    repository is never visible and two racing creators both succeed).
//! 2. Every repository carries a `proc-receive` hook (see [`hook_script`]) that takes over
//!    the branch updates of a push (`receive.procReceiveRefs = refs/heads/`): it hands them
//!    to the daemon, waits for the builds, and moves each branch only if its tip built (or
//!    at once, with `-o revboot.wait=false` or when the daemon cannot be reached). On a
//!    node of a cluster a push the daemon cannot be reached for is refused instead: the
//!    branch would move here without etcd, and the nodes would differ. Tags go through the
//!    hook too (they are not built; in a cluster they move through etcd as branches do).
//!    Hooks and that setting are rewritten whenever the daemon starts, so they always
//!    carry the current daemon URL, hook token and whether the node is in a cluster.
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
    /// A Unix socket the daemon serves the router on too: the hook talks to it instead of
    /// `base_url` (which may be HTTPS with a certificate for a public name).
    pub(crate) socket: Option<PathBuf>,
    /// A node of a cluster: a branch moves only once the daemon took it (etcd agreed), so a
    /// push the daemon cannot be reached for is refused rather than stored.
    pub(crate) cluster: bool,
}

impl HookTarget {
    /// The URL of `path` as the hook reaches it, and the curl options that go with it.
    pub(crate) fn reach(&self, path: &str) -> (String, String) {
        match &self.socket {
            Some(socket) => (
                format!("http://localhost{path}"),
                format!("--unix-socket {} ", shell_quote(&socket.to_string_lossy())),
            ),
            None => (
                format!("{}{path}", self.base_url.trim_end_matches('/')),
                String::new(),
            ),
        }
    }
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
        hand_refs_to_hook(staging.path()).await.map_err(git_err)?;
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

    /// Rewrites the hook of an existing repository (current URL and token) and makes it
    /// take over branch and tag updates.
    pub(crate) async fn refresh_hook(&self, service: &str) -> std::io::Result<()> {
        let path = self.path(service);
        write_hook(&path, service, &self.hook)?;
        hand_refs_to_hook(&path)
            .await
            .map_err(std::io::Error::other)?;
        Ok(())
    }

    /// The commits a push of `refname` from `old` to `new` brings, oldest first, the tip
    /// last: at most the newest `limit`; and how many there are in all. They are the
    /// commits of `new` not in `old` (for a new branch: not on any other branch), in
    /// topological order.
    pub(crate) async fn new_commits(
        &self,
        service: &str,
        old: &str,
        new: &str,
        refname: &str,
        limit: usize,
    ) -> Result<(Vec<String>, usize), GitError> {
        let path = self.path(service);
        let exclude;
        let mut range = vec![new.to_owned()];
        if old.bytes().all(|b| b == b'0') {
            let branch = refname.strip_prefix("refs/heads/").unwrap_or(refname);
            exclude = format!("--exclude={branch}");
            range.extend(["--not".to_owned(), exclude, "--branches".to_owned()]);
        } else {
            range.push(format!("^{old}"));
        }
        let range: Vec<&str> = range.iter().map(String::as_str).collect();
        let mut count = vec!["rev-list", "--count"];
        count.extend(&range);
        let total: usize = git::run_text(Some(&path), &count)
            .await?
            .parse()
            .unwrap_or(0);
        let max = format!("--max-count={}", limit.max(1));
        let mut list = vec!["rev-list", "--topo-order", &max];
        list.extend(&range);
        let text = git::run_text(Some(&path), &list).await?;
        let mut commits: Vec<String> = text.lines().map(str::to_owned).collect();
        commits.reverse();
        Ok((commits, total))
    }

    /// Whether `commit` is `tip` or an ancestor of it.
    pub(crate) async fn in_history(
        &self,
        service: &str,
        commit: &str,
        tip: &str,
    ) -> Result<bool, GitError> {
        let not_tip = format!("^{tip}");
        let text = git::run_text(
            Some(&self.path(service)),
            &["rev-list", "--max-count=1", commit, &not_tip],
        )
        .await?;
        Ok(text.is_empty())
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

/// The refs the `proc-receive` hook takes over.
const PROC_RECEIVE_KEY: &str = "receive.procReceiveRefs";
const PROC_RECEIVE_REFS: [&str; 2] = ["refs/heads/", "refs/tags/"];

/// Sets [`PROC_RECEIVE_KEY`] (a key of several values) to [`PROC_RECEIVE_REFS`].
async fn hand_refs_to_hook(git_dir: &Path) -> Result<(), GitError> {
    let [first, rest @ ..] = PROC_RECEIVE_REFS;
    git::run(
        Some(git_dir),
        &["config", "--replace-all", PROC_RECEIVE_KEY, first],
    )
    .await?;
    for refs in rest {
        git::run(Some(git_dir), &["config", "--add", PROC_RECEIVE_KEY, refs]).await?;
    }
    Ok(())
}

fn write_hook(git_dir: &Path, service: &str, target: &HookTarget) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let hooks = git_dir.join("hooks");
    std::fs::create_dir_all(&hooks)?;
    let staging = hooks.join(".proc-receive.new");
    std::fs::write(&staging, hook_script(service, target))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&staging, hooks.join("proc-receive"))?;
    // Written by earlier versions: builds are queued by proc-receive now.
    match std::fs::remove_file(hooks.join("post-receive")) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Quotes a string for a POSIX shell single-quoted context.
pub(crate) fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The `proc-receive` hook of a source repository.
///
/// 1. It speaks git's proc-receive protocol (pkt-lines) with `receive-pack`: the version
///    (asking for push options), then the pushed branch updates `<old> <new> <ref>` and the
///    push options.
/// 2. It posts them to the daemon's hook endpoint with curl and prints the streamed answer
///    (build logs and results) on stderr, which git relays to the pusher as `remote:` lines;
///    the answer's `revboot-verdict ok|ng <ref> [reason]` lines are its verdicts.
/// 3. For each update: a verdict `ng` is reported to git with its reason (the push fails,
///    the branch stays where it was); otherwise the hook moves the branch itself
///    (`git update-ref` from the old value, so a concurrent push is not overwritten) and
///    reports `ok`. With no verdict — the daemon cannot be reached, or stopped following —
///    the branch moves: the push is stored and the daemon builds it on its next start (it
///    compares branch heads with what it has built).
/// 4. On a node of a cluster, a ref with no verdict moves only if the daemon said it took
///    it (`revboot-taken <ref>`: etcd moved it); otherwise it is refused — the daemon (or
///    etcd) could not be asked, and moving it here alone would make the nodes differ.
pub(crate) fn hook_script(service: &str, target: &HookTarget) -> String {
    let (url, via) = target.reach(&format!("/git/-/hook/{service}"));
    let max_time = target.max_time_secs;
    format!(
        r#"#!/bin/sh
# revboot proc-receive hook for `{service}`: hands the pushed branches to the revboot daemon,
# prints the builds' progress (git shows it to the pusher as "remote:" lines), and moves a
# branch only if its tip built (or at once with -o revboot.wait=false).
# Generated by revboot and rewritten whenever the daemon starts; local edits are lost.
LC_ALL=C
export LC_ALL
url={url}
token={token}
cluster={cluster}
# One pkt-line into $pkt; status 2 at a flush packet, 1 at the end of input.
pkt_read() {{
  len=$(head -c 4)
  [ ${{#len}} -eq 4 ] || return 1
  n=$((0x$len))
  [ "$n" -gt 4 ] || return 2
  pkt=$(head -c $((n - 4)) | tr '\000' ' ')
}}
pkt_write() {{ printf '%04x%s\n' $((${{#1}} + 5)) "$1"; }}
# Moves $1 from $2 to $3; a branch that moved meanwhile (another push of it finished first)
# still moves if $3 is a fast-forward of where it is now. The reason is left in $moved.
move_ref() {{
  if [ "$3" = 0000000000000000000000000000000000000000 ]; then
    moved=$(git update-ref -d "$1" "$2" 2>&1) && return 0
    # Deleted meanwhile: what the push asked for.
    ! git rev-parse -q --verify "$1" >/dev/null
    return
  fi
  moved=$(git update-ref -m push "$1" "$3" "$2" 2>&1) && return 0
  now=$(git rev-parse -q --verify "$1") || return 1
  git merge-base --is-ancestor "$now" "$3" || return 1
  moved=$(git update-ref -m push "$1" "$3" "$now" 2>&1)
}}
options=no
while pkt_read; do case $pkt in *push-options*) options=yes ;; esac; done
if [ $options = yes ]; then printf '001bversion=1\000push-options\n'; else pkt_write version=1; fi
printf 0000
body=$(mktemp) && verdicts=$(mktemp) && taken=$(mktemp) || exit 1
trap 'rm -f "$body" "$verdicts" "$verdicts.status" "$taken"' EXIT
while pkt_read; do printf 'ref %s\n' "$pkt" >>"$body"; done
if [ $options = yes ]; then
  while pkt_read; do printf 'option %s\n' "$pkt" >>"$body"; done
fi
if command -v curl >/dev/null 2>&1; then
  {{
    curl {via}-sS -N --connect-timeout 5 --max-time {max_time} \
      -H "Authorization: Bearer $token" -H 'Content-Type: text/plain' \
      --data-binary @"$body" "$url"
    echo $? >"$verdicts.status"
  }} | while IFS= read -r line; do
    case $line in
      "revboot-verdict "*) printf '%s\n' "${{line#revboot-verdict }}" >>"$verdicts" ;;
      "revboot-taken "*) printf '%s\n' "${{line#revboot-taken }}" >>"$taken" ;;
      *) printf '%s\n' "$line" >&2 ;;
    esac
  done
  status=$(cat "$verdicts.status" 2>/dev/null)
else
  status=127
fi
stored="the push is stored and will be built when the daemon starts"
case $status in
  0|28) unreached= ;;
  7) unreached="revboot on this node is not running: the push was not taken"
     echo "revboot: the daemon is not running (cannot connect to $url)." >&2 ;;
  127) unreached="revboot on this node cannot be reached (curl is not installed): the push was not taken"
     echo "revboot: curl is not installed, so this hook cannot reach the daemon." >&2 ;;
  *) unreached="revboot on this node did not answer (curl exit status $status): the push was not taken"
     echo "revboot: could not hand the push to the daemon (curl exit status $status)." >&2 ;;
esac
if [ $status = 28 ]; then
  echo "revboot: stopped waiting after {max_time}s; the build goes on in the daemon." >&2
elif [ -n "$unreached" ] && [ $cluster = 1 ]; then
  echo "revboot: $unreached (this node is part of a cluster, whose etcd must agree to every push)." >&2
elif [ -n "$unreached" ]; then
  echo "revboot: $stored." >&2
fi
while read -r word old new ref; do
  [ "$word" = ref ] || continue
  verdict=$(grep -F " $ref" "$verdicts" | while read -r v r reason; do
    [ "$r" = "$ref" ] && printf '%s %s\n' "$v" "$reason" && break
  done)
  case $verdict in
    ng*) pkt_write "ng $ref ${{verdict#ng }}" ;;
    "") if [ $cluster = 1 ] && ! grep -qxF "$ref" "$taken"; then
          pkt_write "ng $ref ${{unreached:-revboot on this node did not take it: the push was not taken}}"
        elif move_ref "$ref" "$old" "$new"; then pkt_write "ok $ref"; else pkt_write "ng $ref $(printf '%s' "$moved" | tr '\n' ' ')"; fi ;;
    *)
      if move_ref "$ref" "$old" "$new"; then pkt_write "ok $ref"; else pkt_write "ng $ref $(printf '%s' "$moved" | tr '\n' ' ')"; fi ;;
  esac
done <"$body"
printf 0000
exit 0
"#,
        url = shell_quote(&url),
        token = shell_quote(&target.token),
        cluster = u8::from(target.cluster),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs git with no user or system configuration; its output, whatever the outcome.
    fn git(cwd: &Path, args: &[&str]) -> std::process::Output {
        std::process::Command::new("git")
            .current_dir(cwd)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("git runs")
    }

    /// A bare repository with the hook (of a cluster's node or not) and no daemon to reach,
    /// and a working copy with one commit, tagged `v1`: (temp dir, server, work).
    fn unreachable_daemon(cluster: bool) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let server = dir.path().join("hello.git");
        git(
            dir.path(),
            &["init", "-q", "--bare", server.to_str().expect("utf8")],
        );
        let target = HookTarget {
            // Port 9 (discard) on loopback: nothing listens there.
            base_url: "http://127.0.0.1:9".into(),
            token: "t".into(),
            max_time_secs: 5,
            socket: None,
            cluster,
        };
        write_hook(&server, "hello", &target).expect("hook");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(hand_refs_to_hook(&server))
            .expect("config");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("mkdir");
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["commit", "-q", "--allow-empty", "-m", "one"]);
        git(&work, &["tag", "v1"]);
        (dir, server, work)
    }

    /// `git rev-parse` of `refname` in `repo` (empty when absent).
    fn rev_parse(repo: &Path, refname: &str) -> String {
        let output = git(repo, &["rev-parse", "--verify", "-q", refname]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A push with no daemon to reach is stored: the hook moves the branch and the tag
    /// itself and says when it will be built.
    #[test]
    fn hook_without_a_daemon_stores_the_push_and_says_so() {
        let (_dir, server, work) = unreachable_daemon(false);
        let pushed = git(
            &work,
            &["push", server.to_str().expect("utf8"), "main", "v1"],
        );
        let stderr = String::from_utf8_lossy(&pushed.stderr);
        assert!(pushed.status.success(), "{stderr}");
        assert!(stderr.contains("the daemon is not running"), "{stderr}");
        assert!(
            stderr.contains("will be built when the daemon starts"),
            "{stderr}"
        );
        for refname in ["refs/heads/main", "refs/tags/v1"] {
            assert_eq!(rev_parse(&server, refname), rev_parse(&work, refname));
        }
    }

    /// On a node of a cluster, a push with no daemon to reach is refused: the branch would
    /// move here without etcd, and the nodes would differ.
    #[test]
    fn hook_of_a_cluster_node_without_a_daemon_refuses_the_push() {
        let (_dir, server, work) = unreachable_daemon(true);
        let pushed = git(
            &work,
            &["push", server.to_str().expect("utf8"), "main", "v1"],
        );
        let stderr = String::from_utf8_lossy(&pushed.stderr);
        assert!(!pushed.status.success(), "{stderr}");
        assert!(
            stderr.contains("revboot on this node is not running: the push was not taken"),
            "{stderr}"
        );
        for refname in ["refs/heads/main", "refs/tags/v1"] {
            assert_eq!(rev_parse(&server, refname), "", "{refname} moved: {stderr}");
        }
    }

    #[test]
    fn hook_quotes_url_and_token() {
        let script = hook_script(
            "hello",
            &HookTarget {
                base_url: "http://127.0.0.1:7070/".into(),
                token: "it's".into(),
                max_time_secs: 60,
                socket: None,
                cluster: false,
            },
        );
        assert!(script.contains("url='http://127.0.0.1:7070/git/-/hook/hello'\n"));
        assert!(script.contains(r"token='it'\''s'"));
        assert!(script.contains("--max-time 60"));
    }
}
