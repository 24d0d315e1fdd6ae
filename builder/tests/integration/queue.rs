//! Queue limits.

use revboot_builder::BuildState;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_refuses_with_a_message_and_builds_on_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let first = daemon(&data, |c| {
        c.max_parallel = 1;
        c.max_queued = 1;
    })
    .await;
    let gate = gates(&tmp.path().join("data")).join("gate");
    let gated = format!(
        "[build]\nshell = \"while [ ! -e {} ]; do sleep 0.05; done; mkdir -p out; cp exit0 out/a\"\nartifacts = [\"out/a\"]\ntimeout_secs = 120\n",
        gate.display()
    );
    let quick = "[build]\nshell = \"mkdir -p out && cp exit0 out/a\"\nartifacts = [\"out/a\"]\n";
    let one = recipe_fixture(tmp.path(), "one", &gated).await;
    let two = recipe_fixture(tmp.path(), "two", quick).await;
    let three = recipe_fixture(tmp.path(), "three", quick).await;

    let push_one = tokio::spawn({
        let (work, url) = (one.clone(), first.url("one"));
        async move { push(&work, &url, &[]).await }
    });
    wait_record(&first.builder, "one running", |r| {
        r.service == "one" && r.state == BuildState::Running
    })
    .await;
    let push_two = tokio::spawn({
        let (work, url) = (two.clone(), first.url("two"));
        async move { push(&work, &url, &[]).await }
    });
    wait_record(&first.builder, "two queued", |r| {
        r.service == "two" && r.state == BuildState::Queued
    })
    .await;
    // The queue holds one build: the third is refused, its push still lands.
    let (ok, stderr) = push(&three, &first.url("three"), &[]).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("The build queue is full (1 builds waiting)"),
        "{stderr}"
    );
    assert!(
        !first
            .builder
            .build_records(None)
            .await
            .iter()
            .any(|r| r.service == "three")
    );
    std::fs::write(&gate, "open").expect("gate");
    let (ok_one, e1) = push_one.await.expect("one");
    let (ok_two, e2) = push_two.await.expect("two");
    assert!(ok_one && ok_two, "{e1}\n{e2}");
    wait_finished(&first.builder, &head(&two).await).await;
    first.stop().await;

    // The refused push is built on the next start.
    let again = daemon(&data, |_| {}).await;
    let record = wait_finished(&again.builder, &head(&three).await).await;
    assert_eq!(record.state, BuildState::Succeeded);
    again.stop().await;
}
