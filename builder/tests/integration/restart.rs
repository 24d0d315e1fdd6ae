//! The daemon not running: local-path pushes, missed pushes, interrupted builds.

use revboot_builder::BuildState;
use revboot_store::BuildStatus;

use crate::support::*;

const RECIPE: &str = "[build]\nshell = \"mkdir -p out && cp exit0 out/a && echo $REVBOOT_SOURCE_COMMIT >> out/a\"\nartifacts = [\"out/a\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_push_builds_through_the_hook() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let info = daemon.builder.add_service("local").await.expect("add");
    assert!(info.created);
    let work = recipe_fixture(tmp.path(), "local", RECIPE).await;
    let repo = info.source_repo.display().to_string();
    let (ok, stderr) = push(&work, &repo, &[]).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("remote: revboot: build #1 started"),
        "{stderr}"
    );
    let record = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(record.state, BuildState::Succeeded);
    assert!(record.made_live);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_while_daemon_is_down_is_built_on_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    // Made while no daemon runs; nothing listens on the hook's URL: the port is held by a
    // socket that is bound but never listens, so a connection to it is refused for as long
    // as the test runs.
    let unused = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|socket| {
            socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
            Ok(socket)
        })
        .expect("a bound socket");
    let address = unused
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("its address");
    let base = format!("http://{address}");
    let info = revboot_builder::create_source_repo(&data, &base, "later")
        .await
        .expect("create offline");
    assert!(info.created);
    let work = recipe_fixture(tmp.path(), "later", RECIPE).await;
    let (ok, stderr) = push(&work, &info.source_repo.display().to_string(), &[]).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("revboot: the daemon is not running"),
        "{stderr}"
    );
    assert!(
        stderr.contains("will be built when the daemon starts"),
        "{stderr}"
    );
    let commit = head(&work).await;

    let second = daemon(&data, |_| {}).await;
    let record = wait_finished(&second.builder, &commit).await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    // The hook was rewritten with the new daemon's address.
    let hook = std::fs::read_to_string(info.source_repo.join("hooks/proc-receive")).expect("hook");
    assert!(hook.contains(&second.base), "{hook}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_interrupted_by_shutdown_is_recorded_and_rerun() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let gate = gates(&tmp.path().join("data")).join("gate");
    let recipe = format!(
        "[build]\nshell = \"echo begun; while [ ! -e {} ]; do sleep 0.05; done; mkdir -p out; cp exit0 out/a\"\nartifacts = [\"out/a\"]\ntimeout_secs = 120\n",
        gate.display()
    );
    let first = daemon(&data, |_| {}).await;
    let work = recipe_fixture(tmp.path(), "halt", &recipe).await;
    let commit = head(&work).await;
    let pushing = tokio::spawn({
        let (work, url) = (work.clone(), first.url("halt"));
        async move { push(&work, &url, &[]).await }
    });
    let running = wait_record(&first.builder, "running", |r| {
        r.state == BuildState::Running
    })
    .await;
    first.builder.shutdown().await;
    let (ok, stderr) = pushing.await.expect("push");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("interrupted by a daemon stop"), "{stderr}");
    let history = first.store.history("halt").expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, BuildStatus::Interrupted);
    first.stop().await;

    std::fs::write(&gate, "open").expect("gate");
    let second = daemon(&data, |_| {}).await;
    let old = wait_record(&second.builder, "old record", |r| r.id == running.id).await;
    assert_eq!(old.state, BuildState::Interrupted);
    let rerun = old.requeued_as.expect("re-queued");
    let record = wait_record(&second.builder, "re-run finished", |r| {
        r.id == rerun && r.state.is_finished()
    })
    .await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    assert_eq!(record.source_commit, commit);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_builder_on_one_data_directory_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let first = daemon(&data, |_| {}).await;
    let store = revboot_store::Store::init(data.join("deploy.git")).expect("store");
    let config =
        revboot_builder::BuilderConfig::new(&data, store, ZONE, "http://127.0.0.1:9".to_owned());
    let error = revboot_builder::Builder::start(config.clone())
        .await
        .expect_err("data directory in use");
    assert!(
        matches!(error, revboot_builder::StartError::Locked { .. }),
        "{error}"
    );
    first.stop().await;
    // The lock's open file is shared, for a moment, with any child another test's thread is
    // forking (until its exec closes it): wait that out, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let second = loop {
        match revboot_builder::Builder::start(config.clone()).await {
            Err(revboot_builder::StartError::Locked { .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            started => break started.expect("free after shutdown"),
        }
    };
    second.shutdown().await;
}
