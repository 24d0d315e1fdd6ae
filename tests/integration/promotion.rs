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

/// A daemon that reaps idle instances after a second (a warm instance must outlive that),
/// and hello pushed to it with `min_instances`: the daemon, the working copy, the short
/// live revision.
fn warm_service(dir: &std::path::Path, min_instances: u32) -> (Daemon, std::path::PathBuf, String) {
    let daemon =
        Daemon::start_configured(&dir.join("data"), "[instances]\nidle_timeout_ms = 1000\n");
    let work = hello_source(dir);
    write_manifest(&work, &format!("min_instances = {min_instances}\n"));
    crate::support::git(&work, &["commit", "-q", "-am", "hello, warm"]);
    let pushed = push(&daemon, &work);
    assert!(
        pushed.contains("booted warm")
            && pushed.contains(&format!("min_instances = {min_instances}")),
        "{pushed}"
    );
    let v1 = short(&history(&daemon, "hello")[0]);
    (daemon, work, v1)
}

#[test]
fn a_warm_service_serves_its_first_request_warm() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, work, v1) = warm_service(temp.path(), 1);

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

/// The replicas of the live revision that serve: (replica, pid, revision).
fn replicas(daemon: &Daemon) -> Vec<(u64, Option<u64>, String)> {
    let mut serving: Vec<(u64, Option<u64>, String)> = daemon
        .instances()
        .into_iter()
        .filter(|i| i["state"] == "ready" || i["state"] == "idle")
        .map(|i| {
            (
                i["replica"].as_u64().unwrap_or(0),
                i["pid"].as_u64(),
                i["revision"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    serving.sort();
    serving
}

/// A GET of the live name: (body, the `x-instance` header hello answers with), or why not.
fn get_live(daemon: &Daemon) -> Result<(String, String), String> {
    let live = format!("hello.{ZONE}");
    let address = dig_ok(daemon, &live, false);
    let output = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20"])
        .args(["--resolve", &format!("{live}:8080:{address}")])
        .arg(format!("http://{live}:8080/"))
        .output()
        .map_err(|error| error.to_string())?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("{text}{}", String::from_utf8_lossy(&output.stderr)));
    }
    let instance = text
        .lines()
        .find_map(|line| line.strip_prefix("x-instance: "))
        .ok_or_else(|| format!("no x-instance header: {text}"))?
        .trim()
        .to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((body, instance))
}

/// Connections the kernel steered to the serving instances, if every one is steered.
fn steered_total(daemon: &Daemon) -> Option<u64> {
    let instances = daemon.instances();
    let serving = instances
        .iter()
        .filter(|i| i["state"] == "ready" || i["state"] == "idle");
    serving.map(|i| i["steered"].as_u64()).sum()
}

/// Connections the proxy accepted so far (`/metrics`).
fn proxy_accepted(daemon: &Daemon) -> u64 {
    let metrics = daemon.metrics();
    let line = metrics
        .lines()
        .find(|line| line.starts_with("revboot_proxy_connections_total{outcome=\"accepted\"}"));
    let count = line.and_then(|line| line.rsplit(' ').next()?.parse().ok());
    count.unwrap_or_else(|| panic!("no accepted count: {metrics}"))
}

#[test]
fn a_warm_service_keeps_its_replicas_booted_and_spreads_connections_over_them() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (daemon, work, v1) = warm_service(temp.path(), 3);

    // The push returned once the three were booted and ready: before any request.
    let before = replicas(&daemon);
    let indexes: Vec<u64> = before.iter().map(|r| r.0).collect();
    assert_eq!(indexes, [0, 1, 2], "{before:?}");
    let pids: std::collections::HashSet<u64> = before.iter().filter_map(|r| r.1).collect();
    assert_eq!(pids.len(), 3, "three processes: {before:?}");
    assert!(before.iter().all(|r| r.2.starts_with(&v1)), "{before:?}");
    let ps = daemon.cli(&["ps"]);
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.contains(" #1") && ps.contains(" #2"), "{ps}");

    // One name, one address; its connections go to more than one replica, each handed to
    // the replica's own socket by the kernel: the proxy accepts none of them.
    let accepted = proxy_accepted(&daemon);
    let steered = steered_total(&daemon).expect("every replica is steered");
    let mut answered_by = std::collections::HashSet::new();
    for _ in 0..30 {
        let (body, instance) = get_live(&daemon).expect("served");
        assert!(body.starts_with("hello from v1"), "{body}");
        answered_by.insert(instance);
    }
    assert!(answered_by.len() > 1, "all answered by {answered_by:?}");
    assert_eq!(proxy_accepted(&daemon), accepted);
    assert_eq!(steered_total(&daemon), Some(steered + 30));

    // Idle reaping passes them by: several idle timeouts later they are the same processes.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(replicas(&daemon), before);

    // kill -9 of one replica: the others serve meanwhile, and the keeper boots it again.
    let (_, victim, _) = before[1].clone();
    let victim = victim.expect("a pid");
    crate::support::run(std::process::Command::new("kill").args(["-KILL", &victim.to_string()]));
    assert!(
        eventually(|| replicas(&daemon).iter().all(|r| r.1 != Some(victim))),
        "the killed replica is still listed: {:?}",
        daemon.instances()
    );
    for _ in 0..10 {
        let served = get_live(&daemon);
        assert!(
            served
                .as_ref()
                .is_ok_and(|(body, _)| body.starts_with("hello from v1")),
            "{served:?}"
        );
    }
    assert!(
        eventually(|| {
            let now = replicas(&daemon);
            now.len() == 3
                && now[0] == before[0]
                && now[2] == before[2]
                && now[1].0 == 1
                && now[1].1.is_some_and(|pid| pid != victim)
        }),
        "replica #1 was not booted again: {:?}",
        daemon.instances()
    );
    assert!(
        eventually(|| steered_total(&daemon).is_some()),
        "replica #1 is not steered again: {:?}",
        daemon.instances()
    );

    // More replicas than the bound: refused at push with the reason, nothing changes.
    write_manifest(&work, "min_instances = 100\n");
    crate::support::git(&work, &["commit", "-q", "-am", "hello, a hundred replicas"]);
    let refused = push_refused(&daemon, &work);
    assert!(
        refused.contains("run.min_instances") && refused.contains("at most 16"),
        "{refused}"
    );
    let now = replicas(&daemon);
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(now.iter().all(|r| r.2.starts_with(&v1)), "{now:?}");
    assert!(get_live(&daemon).is_ok_and(|(body, _)| body.starts_with("hello from v1")));

    // A new revision with a check: every replica is booted and checked before live moves,
    // and the old ones are reaped once idle.
    write_manifest(
        &work,
        "min_instances = 3\n[deploy]\ncheck = { http = \"/health\", within_ms = 20000 }\n",
    );
    commit_revision(&work, "v2", "hello");
    let pushed = push(&daemon, &work);
    assert!(
        pushed.contains("health check passed on 3 replicas"),
        "{pushed}"
    );
    let v2 = short(&history(&daemon, "hello")[0]);
    assert!(
        eventually(|| {
            let now = replicas(&daemon);
            now.len() == 3 && now.iter().all(|r| r.2.starts_with(&v2))
        }),
        "{:?}",
        daemon.instances()
    );
    assert!(get_live(&daemon).is_ok_and(|(body, _)| body.starts_with("hello from v2")));
}

#[test]
fn replicas_the_instance_caps_cannot_hold_are_refused_at_push() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        "[instances]\nmax_per_service = 2\n",
    );
    let work = hello_source(temp.path());
    write_manifest(&work, "min_instances = 3\n");
    crate::support::git(&work, &["commit", "-q", "-am", "hello, three replicas"]);
    let refused = push_refused(&daemon, &work);
    assert!(
        refused.contains("asks for 3 replicas") && refused.contains("at most 2 instances"),
        "{refused}"
    );
    let builds = history(&daemon, "hello");
    assert_eq!(builds[0]["live"], false, "{builds:?}");
}

/// The live revision's replicas serve until live moves: a promotion whose new replicas the
/// per-service cap cannot hold beside them is refused before anything boots, naming the cap
/// (it failed later with the cap's bare message, a replica booted and left).
#[test]
fn a_promotion_the_caps_cannot_hold_beside_the_live_replicas_is_refused_at_push() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        "[instances]\nmax_per_service = 3\n",
    );
    let work = hello_source(temp.path());
    write_manifest(&work, "min_instances = 2\n");
    crate::support::git(&work, &["commit", "-q", "-am", "hello, two replicas"]);
    let pushed = push(&daemon, &work);
    assert!(pushed.contains("booted warm"), "{pushed}");
    let v1 = short(&history(&daemon, "hello")[0]);
    let before = replicas(&daemon);
    assert_eq!(before.len(), 2, "{before:?}");

    // Two more would make four: refused, and nothing of the new revision boots.
    commit_revision(&work, "v2", "hello");
    let refused = push_refused(&daemon, &work);
    assert!(
        refused.contains("promoting needs 4 at once")
            && refused.contains("at most 3 may run ([instances] max_per_service)"),
        "{refused}"
    );
    let builds = history(&daemon, "hello");
    assert_eq!(builds[0]["live"], false, "{builds:?}");
    let listed = daemon.instances();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(replicas(&daemon), before);
    assert!(get_live(&daemon).is_ok_and(|(body, _)| body.starts_with("hello from v1")));

    // One replica fits beside the two: promoted, and the old ones are reaped once idle.
    write_manifest(&work, "min_instances = 1\n");
    commit_revision(&work, "v3", "hello");
    let pushed = push(&daemon, &work);
    assert!(pushed.contains("booted warm"), "{pushed}");
    let v3 = short(&history(&daemon, "hello")[0]);
    assert_ne!(v3, v1);
    assert!(get_live(&daemon).is_ok_and(|(body, _)| body.starts_with("hello from v3")));
}
