//! Test support: a builder served on 127.0.0.1, source fixtures made with real git, and a
//! git client with an isolated configuration.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use revboot_builder::{BuildRecord, BuildState, Builder, BuilderConfig};
use revboot_store::Store;

pub const TOKEN: &str = "test-push-token";
pub const ZONE: &str = "revboot.test";

/// The git used by tests: stock git.
pub fn git_bin() -> &'static str {
    if Path::new("/usr/local/bin/git").exists() {
        "/usr/local/bin/git"
    } else {
        "git"
    }
}

pub struct Daemon {
    pub builder: Builder,
    pub store: Store,
    pub base: String,
    server: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// The push URL with credentials.
    pub fn url(&self, service: &str) -> String {
        let host = self.base.trim_start_matches("http://");
        format!("http://git:{TOKEN}@{host}/git/{service}.git")
    }

    /// The push URL without credentials.
    pub fn anonymous_url(&self, service: &str) -> String {
        format!("{}/git/{service}.git", self.base)
    }

    pub async fn stop(self) {
        self.builder.shutdown().await;
        self.server.abort();
    }
}

/// The directory next to `data` whose files builds can read (`[builds.sandbox]
/// readonly_paths`): where tests put the gates builds wait for. Nothing else of the test's
/// files is visible in a build.
pub fn gates(data: &Path) -> PathBuf {
    data.parent()
        .expect("the data directory has a parent")
        .join("gates")
}

/// A build uid of this test daemon's own, so that "no process of the build is left" is a
/// question about one uid, whatever other tests run.
fn next_build_uid() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    2_000_000_000 + (std::process::id() % 1_000_000) * 64 + n % 64
}

/// Host processes running as `uid`.
pub fn processes_of(uid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().next())
                    .is_some_and(|real| real == uid.to_string())
            })
        })
        .collect()
}

/// Starts a builder on `data` and serves its router on a random loopback port.
pub async fn daemon(data: &Path, tweak: impl FnOnce(&mut BuilderConfig)) -> Daemon {
    let store = Store::init(data.join("deploy.git")).expect("store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let mut config = BuilderConfig::new(data, store.clone(), ZONE, base.clone());
    config.push_tokens = vec![TOKEN.to_owned()];
    config.max_parallel = 2;
    config.sandbox.uid = next_build_uid();
    std::fs::create_dir_all(gates(data)).expect("gates");
    config.sandbox.readonly_paths = vec![gates(data)];
    tweak(&mut config);
    let builder = Builder::start(config).await.expect("builder starts");
    let router = builder.router();
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    Daemon {
        builder,
        store,
        base,
        server,
    }
}

/// A git command with an isolated configuration and identity.
pub fn git_command(home: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(git_bin());
    command
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_CONFIG_GLOBAL")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Dev")
        .env("GIT_AUTHOR_EMAIL", "dev@example.invalid")
        .env("GIT_COMMITTER_NAME", "Dev")
        .env("GIT_COMMITTER_EMAIL", "dev@example.invalid")
        .env("GIT_ASKPASS", "/bin/false")
        .env("SSH_ASKPASS", "/bin/false")
        .kill_on_drop(true);
    command
}

/// Runs git in `dir` with a time limit and returns its output (whatever the status).
pub async fn git(dir: &Path, args: &[&str]) -> Output {
    let home = dir.parent().expect("fixture has a parent").join("home");
    std::fs::create_dir_all(&home).expect("home");
    let mut command = git_command(&home);
    command.current_dir(dir).args(args);
    tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("git finished in time")
        .expect("git runs")
}

/// Runs git and expects success; returns stdout.
pub async fn git_ok(dir: &Path, args: &[&str]) -> String {
    let output = git(dir, args).await;
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A working repository at `<root>/<name>` holding a copy of `examples/hello`, committed.
pub async fn hello_fixture(root: &Path, name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    let dir = root.join(name);
    copy_tree(&source, &dir);
    init_and_commit(&dir, "hello v1").await;
    dir
}

/// A working repository with a `revboot.toml` and `exit0` (a static ELF recipes copy as
/// their image: [`revboot_testkit::EXIT_0`]), committed.
pub async fn recipe_fixture(root: &Path, name: &str, recipe: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("revboot.toml"), recipe).expect("write recipe");
    std::fs::write(dir.join("exit0"), revboot_testkit::EXIT_0).expect("write exit0");
    init_and_commit(&dir, "first").await;
    dir
}

async fn init_and_commit(dir: &Path, message: &str) {
    git_ok(dir, &["init", "-q", "-b", "main"]).await;
    git_ok(dir, &["add", "-A"]).await;
    git_ok(dir, &["commit", "-q", "-m", message]).await;
}

/// Commits all changes in `dir`; returns the new commit id.
pub async fn commit_all(dir: &Path, message: &str) -> String {
    git_ok(dir, &["add", "-A"]).await;
    git_ok(dir, &["commit", "-q", "--allow-empty", "-m", message]).await;
    head(dir).await
}

pub async fn head(dir: &Path) -> String {
    git_ok(dir, &["rev-parse", "HEAD"]).await
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read example") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        let path = entry.path();
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).expect("copy");
        }
    }
}

/// Pushes `main` of `dir` to `url`; returns (success, stderr).
pub async fn push(dir: &Path, url: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["push", "--progress"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[url, "main"]);
    let output = git(dir, &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

/// The `remote:` lines of git's stderr.
pub fn remote_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|line| line.strip_prefix("remote: "))
        .collect()
}

/// Waits until `check` finds a record, polling the builder (at most 120 s).
pub async fn wait_record(
    builder: &Builder,
    what: &str,
    check: impl Fn(&BuildRecord) -> bool,
) -> BuildRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(record) = builder
            .build_records(None)
            .await
            .into_iter()
            .find(|r| check(r))
        {
            return record;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:#?}",
            builder.build_records(None).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the build of `commit` to finish.
pub async fn wait_finished(builder: &Builder, commit: &str) -> BuildRecord {
    wait_record(builder, &format!("build of {commit}"), |r| {
        r.source_commit == commit && r.state.is_finished() && r.state != BuildState::Interrupted
    })
    .await
}
