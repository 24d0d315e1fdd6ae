//! Health-gated promotion (`[deploy] check`) and warm services (`[run] min_instances`).

use crate::support::{
    Daemon, commit_revision, curl, dig_ok, eventually, hello_source, history, push, push_refused,
    write_manifest,
};

const ZONE: &str = "revboot.test";

fn short(entry: &serde_json::Value) -> String {
    entry["short"].as_str().expect("short revision").to_owned()
}

fn live_body(daemon: &Daemon) -> String {
    let live = format!("hello.{ZONE}");
    let address = dig_ok(daemon, &live, false);
    curl(&live, &address, 8080)
}

#[test]
fn a_revision_that_fails_its_check_never_goes_live() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    assert!(live_body(&daemon).starts_with("hello from v1"));

    // v2 waits for a console line hello never prints: built, recorded, refused.
    write_manifest(
        &work,
        "[deploy]\ncheck = { console = \"never printed\", within_ms = 1500 }\n",
    );
    commit_revision(&work, "v2", "hello");
    let refused = push_refused(&daemon, &work);
    assert!(
        refused.contains("health check failed")
            && refused.contains("the console did not print `never printed`"),
        "{refused}"
    );
    let builds = history(&daemon, "hello");
    assert_eq!(builds.len(), 2, "{builds:?}");
    assert_eq!(builds[0]["status"], "succeeded", "{builds:?}");
    assert_eq!(builds[0]["live"], false, "{builds:?}");
    assert_eq!(builds[1]["live"], true, "{builds:?}");
    assert!(live_body(&daemon).starts_with("hello from v1"));
    // The refusal is recorded: the build's record says why it did not go live.
    // The instance that failed is stopped, its console record says why.
    let v2 = short(&builds[0]);
    let recorded = eventually(|| {
        let log = daemon.cli(&["logs", "hello", &v2]);
        String::from_utf8_lossy(&log.stdout).contains("stopped: failed its health check")
    });
    assert!(
        recorded,
        "{}",
        String::from_utf8_lossy(&daemon.cli(&["logs", "hello", &v2]).stdout)
    );

    // `revboot deploy` checks it the same way; --no-check moves anyway.
    let deployed = daemon.cli(&["deploy", "hello", &v2]);
    assert!(!deployed.status.success());
    let why = String::from_utf8_lossy(&deployed.stderr);
    assert!(why.contains("failed its health check"), "{why}");
    assert!(live_body(&daemon).starts_with("hello from v1"));
    let forced = daemon.cli(&["deploy", "hello", &v2, "--no-check"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert!(live_body(&daemon).starts_with("hello from v2"));

    // v3 checks GET /health (hello answers every path): it passes and goes live.
    write_manifest(
        &work,
        "[deploy]\ncheck = { http = \"/health\", within_ms = 20000 }\n",
    );
    commit_revision(&work, "v3", "hello");
    let pushed = push(&daemon, &work);
    assert!(
        pushed.contains("health check passed") && pushed.contains("GET /health answered"),
        "{pushed}"
    );
    assert!(live_body(&daemon).starts_with("hello from v3"));
}

#[test]
fn a_warm_service_serves_its_first_request_warm() {
    let temp = tempfile::tempdir().expect("temp dir");
    // Idle instances are reaped after a second: the warm one must outlive that.
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        "[instances]\nidle_timeout_ms = 1000\n",
    );
    let work = hello_source(temp.path());
    write_manifest(&work, "min_instances = 1\n");
    crate::support::git(&work, &["commit", "-q", "-am", "hello, warm"]);
    let pushed = push(&daemon, &work);
    assert!(pushed.contains("booted warm"), "{pushed}");
    let v1 = short(&history(&daemon, "hello")[0]);

    // The push returned once the live revision was booted and ready: before any query.
    let serving = |daemon: &Daemon| {
        daemon
            .instances()
            .into_iter()
            .filter(|i| i["state"] == "ready" || i["state"] == "idle")
            .map(|i| {
                (
                    i["revision"].as_str().unwrap_or("").to_owned(),
                    i["pid"].as_u64(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = serving(&daemon);
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].0.starts_with(&v1), "{before:?}");
    let metrics = daemon.metrics();
    let boots = |text: &str| {
        text.lines()
            .find(|line| line.starts_with("revboot_boots_total "))
            .map(str::to_owned)
    };
    let boots_before = boots(&metrics);
    assert!(boots_before.is_some(), "{metrics}");

    // The first request is served by that instance: nothing boots for it.
    assert!(live_body(&daemon).starts_with("hello from v1"));
    assert_eq!(serving(&daemon), before);
    assert_eq!(boots(&daemon.metrics()), boots_before);

    // Idle reaping passes it by: several idle timeouts later it is the same process.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(serving(&daemon), before);

    // Killed, it is booted again without a request.
    let killed = daemon.cli(&["kill", "hello", &v1]);
    assert!(
        killed.status.success(),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    assert!(
        eventually(|| {
            let now = serving(&daemon);
            now.len() == 1 && now != before
        }),
        "the warm instance was not booted again: {:?}",
        daemon.instances()
    );

    // A new revision: it is booted warm before live moves, and the old one is reaped once idle.
    commit_revision(&work, "v2", "hello");
    push(&daemon, &work);
    let v2 = short(&history(&daemon, "hello")[0]);
    assert!(
        eventually(|| {
            let now = serving(&daemon);
            now.len() == 1 && now[0].0.starts_with(&v2)
        }),
        "{:?}",
        daemon.instances()
    );
    assert!(live_body(&daemon).starts_with("hello from v2"));
}
