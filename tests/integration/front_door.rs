//! The front door of a real `revboot serve`: stock git pushes, dig asks, curl connects by
//! host name to one shared address, and the named revision boots.

use std::process::Command;

use crate::support::{
    Daemon, Setup, commit_revision, git, hello_source, history, push, run, serve_refused,
};

const ZONE: &str = "revboot.test";

/// `curl -i` of `http://<name>:<port>/` with `name` resolved to the front door (a build on
/// demand may come first: minutes at most).
pub fn curl_front(name: &str, front: std::net::SocketAddr) -> String {
    let output = run(Command::new("curl")
        .args(["-sS", "-i", "--max-time", "180", "--resolve"])
        .arg(format!("{name}:{}:{}", front.port(), front.ip()))
        .arg(format!("http://{name}:{}/", front.port())));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn front_door_serves_each_pushed_revision_by_host_name_and_dns_answers_its_address() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_setup(
        &temp.path().join("data"),
        &Setup {
            config: "[front]\nhttp = \"127.0.0.1:0\"\n",
            ..Setup::default()
        },
    );
    let front = daemon.front("front_http=");
    let work = hello_source(temp.path());
    let manifest = work.join("revboot.toml");
    let mut text = std::fs::read_to_string(&manifest).expect("revboot.toml");
    text.push_str("reach = \"front\"\n");
    std::fs::write(&manifest, text).expect("write revboot.toml");
    git(&work, &["commit", "-q", "--amend", "-a", "--no-edit"]);
    push(&daemon, &work);
    commit_revision(&work, "v2", "hi");
    push(&daemon, &work);
    let builds = history(&daemon, "hello");
    assert_eq!(builds.len(), 2, "{builds:?}");
    assert!(daemon.cli(&["--json", "ps"]).stdout.starts_with(b"[]"));

    for (build, greeting) in builds.iter().zip(["hi from v2", "hello from v1"]) {
        let short = build["short"].as_str().expect("short revision");
        let name = format!("{short}.hello.{ZONE}");
        // DNS answers the front door's address for a service reached there.
        assert_eq!(daemon.dig(&name, false), front.ip().to_string(), "{name}");
        let answer = curl_front(&name, front);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{name}: {answer}");
        assert!(answer.contains(greeting), "{name}: {answer}");
        assert!(
            answer.contains(build["revision"].as_str().expect("revision")),
            "{answer}"
        );
    }
    // No revision, the live one; an unknown label, a clear 404.
    assert!(curl_front(&format!("hello.{ZONE}"), front).contains("hi from v2"));
    let unknown = curl_front(&format!("nosuch.hello.{ZONE}"), front);
    assert!(unknown.starts_with("HTTP/1.1 404 Not Found"), "{unknown}");
    assert!(unknown.contains("nosuch"), "{unknown}");

    let metrics = daemon.metrics();
    assert!(
        metrics.contains("revboot_proxy_connections_total{outcome=\"front_routed\"} 3"),
        "{metrics}"
    );
    daemon.stop();
}

#[test]
fn a_front_door_address_the_host_does_not_own_is_an_error_at_start_that_names_it() {
    let temp = tempfile::tempdir().expect("temp dir");
    let config = temp.path().join("revbootd.toml");
    // A documentation address no interface of this host has; binding it sends nothing.
    std::fs::write(&config, "[front]\nhttp = \"192.0.2.1:8000\"\n").expect("write config");
    let (status, stderr) = serve_refused(&config, &temp.path().join("data"), "127.89.250.0/24");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("192.0.2.1:8000"), "{stderr}");
    assert!(stderr.contains("not an address of this host"), "{stderr}");
}

/// A name for a source commit that was pushed but not built, asked for at the front door:
/// the connection waits while the commit is built on demand (as a DNS query would have it
/// built), then that revision answers; a made-up prefix is a 404 at once and builds nothing.
#[test]
fn front_door_builds_an_unbuilt_source_commit_on_demand_and_serves_it() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_setup(
        &temp.path().join("data"),
        &Setup {
            config: "[builds]\nmax_commits_per_push = 1\n[front]\nhttp = \"127.0.0.1:0\"\n",
            ..Setup::default()
        },
    );
    let front = daemon.front("front_http=");
    let work = hello_source(temp.path());
    crate::support::write_manifest(&work, "reach = \"front\"\n");
    git(&work, &["commit", "-q", "-am", "hello at the front door"]);
    commit_revision(&work, "v2", "built on demand");
    commit_revision(&work, "v3", "hello");
    assert!(push(&daemon, &work).contains("built on demand"));
    assert_eq!(history(&daemon, "hello").len(), 1, "only the tip is built");
    let v2 = String::from_utf8_lossy(&git(&work, &["rev-parse", "--short=10", "HEAD~1"]).stdout)
        .trim()
        .to_owned();

    let unknown = curl_front(&format!("0123456789.hello.{ZONE}"), front);
    assert!(unknown.starts_with("HTTP/1.1 404 Not Found"), "{unknown}");
    let answer = curl_front(&format!("{v2}.hello.{ZONE}"), front);
    assert!(
        answer.starts_with("HTTP/1.1 200 OK"),
        "{answer}\n{}",
        daemon.log()
    );
    assert!(answer.contains("built on demand from v2"), "{answer}");
    let after = history(&daemon, "hello");
    assert_eq!(after.len(), 2, "one build on demand, no other: {after:?}");
    assert_eq!(
        after[0]["live"], false,
        "a build on demand never moves live"
    );
    daemon.stop();
}
