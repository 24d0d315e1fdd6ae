//! The daemon killed with SIGKILL at the worst moment of a build: its deployment commit is
//! on the branch, and the queue has not yet saved that the build finished.
//!
//! The daemon is this test binary re-run as a child (`crash::child`, ignored unless the
//! environment asks for it), stopped at the moment by the runner's fail point and killed
//! there, with everything it started, as `kill -9` on its process group would.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use revboot_builder::BuildState;
use revboot_store::{Revision, Store};

use crate::support::*;

const DATA_ENV: &str = "REVBOOT_TEST_CRASH_DATA";
const WORK_ENV: &str = "REVBOOT_TEST_CRASH_WORK";

/// The child: a daemon on the data directory pushes the work repository and reports the
/// deployment once it is on the branch; the build waits at the fail point meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the crash test"]
async fn child() {
    let (Some(data), Some(work)) = (std::env::var_os(DATA_ENV), std::env::var_os(WORK_ENV)) else {
        return;
    };
    let daemon = daemon(Path::new(&data), |_| {}).await;
    let (work, url) = (PathBuf::from(work), daemon.url("crashy"));
    // The push waits for the build, which waits at the fail point until the parent kills us.
    tokio::spawn(async move { push(&work, &url, &[]).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let revision = loop {
        if let Some(first) = daemon
            .store
            .history("crashy")
            .ok()
            .and_then(|h| h.first().cloned())
        {
            break first.revision;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no deployment written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("COMMITTED {revision}");
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_deployment_commit_does_not_deploy_the_build_twice() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    // The build's HOME is in its service's cache, which the host sees too.
    let runs = data.join("cache/crashy/home/runs");
    let recipe = "[build]\nshell = \"echo run >> $HOME/runs; mkdir -p out; cp exit0 out/a && echo $REVBOOT_SOURCE_COMMIT >> out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "crashy", recipe).await;
    let commit = head(&work).await;

    let mut child = revboot_testkit::test_child("crash::child")
        .env(DATA_ENV, &data)
        .env(WORK_ENV, &work)
        .env("REVBOOT_FAILPOINT", "after-deployment-commit")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let lines = revboot_testkit::stdout_lines(&mut child);
    let written: Revision = tokio::task::spawn_blocking(move || {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(300))
                .expect("the child reports the deployment");
            // The test harness prints the test's name on the same line first.
            if let Some((_, revision)) = line.split_once("COMMITTED ") {
                return revision.parse().expect("revision");
            }
        }
    })
    .await
    .expect("reader");
    // The moment: the commit is on the branch, the saved queue still has the build running.
    let state = std::fs::read_to_string(data.join("builder/state.json")).expect("state");
    assert!(state.contains("\"state\": \"running\""), "{state}");
    let group = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    killpg(group, Signal::SIGKILL).expect("kill -9 the daemon's process group");
    child.wait().expect("reaped");
    let store = Store::open(data.join("deploy.git")).expect("store");
    assert_eq!(store.history("crashy").expect("history").len(), 1);
    assert_eq!(store.live("crashy").expect("live"), None);

    // The next daemon re-runs the build: it adopts the deployment and makes it live.
    let second = daemon(&data, |_| {}).await;
    let old = wait_record(&second.builder, "the interrupted build", |r| {
        r.state == BuildState::Interrupted
    })
    .await;
    let rerun = old.requeued_as.expect("re-queued");
    let record = wait_record(&second.builder, "the re-run", |r| {
        r.id == rerun && r.state.is_finished()
    })
    .await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    assert_eq!(record.rerun_of, Some(old.id));
    assert_eq!(record.source_commit, commit);
    assert_eq!(record.revision, Some(written.to_hex()));
    assert!(record.made_live);
    let history = second.store.history("crashy").expect("history");
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(second.store.live("crashy").expect("live"), Some(written));
    let runs = std::fs::read_to_string(&runs).expect("runs");
    assert_eq!(runs.lines().count(), 1, "the build command ran again");
    revboot_testkit::assert_fsck_clean(second.store.path());
    second.stop().await;
}
