//! Per-client instances when a service's client slots are all taken: a new client gets the
//! slot of the quietest client with no connection open, a client with a connection in
//! flight keeps its own, and while every slot has one, new clients are refused and the log
//! says so once per service per window, not once per refusal.

use std::io::{Read as _, Write as _};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Daemon, eventually, git, hello_source, push, run};

const NAME: &str = "hello.revboot.test";
/// Served once, then quiet.
const QUIET: &str = "127.0.0.41";
/// Keeps a connection open.
const BUSY: &str = "127.0.0.42";
/// Comes when both slots are taken.
const NEW: &str = "127.0.0.43";
/// Come while both slots have a connection open.
const REFUSED: [&str; 6] = [
    "127.0.0.51",
    "127.0.0.52",
    "127.0.0.53",
    "127.0.0.54",
    "127.0.0.55",
    "127.0.0.56",
];
/// How long one refusal line covers the next ones of its service.
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// GET / from `source` through the address DNS gave it.
fn get_from(source: &str, address: &str) -> String {
    let output = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--interface", source])
        .args(["--resolve", &format!("{NAME}:8080:{address}")])
        .arg(format!("http://{NAME}:8080/")));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The clients with an instance, sorted.
fn clients(daemon: &Daemon) -> Vec<String> {
    let mut clients: Vec<String> = daemon
        .instances()
        .iter()
        .filter_map(|instance| instance["client"].as_str().map(str::to_owned))
        .collect();
    clients.sort();
    clients
}

#[test]
fn full_client_slots_go_to_new_clients_and_refusals_are_logged_once_per_window() {
    let temp = tempfile::tempdir().expect("temp dir");
    // Two client slots; nothing is reaped for idleness while the test runs.
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        "[instances]\nmax_clients_per_service = 2\nidle_timeout_ms = 600000\n",
    );
    let work = hello_source(temp.path());
    let manifest = work.join("revboot.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    assert!(
        text.trim_end().ends_with("idle_timeout_secs = 60"),
        "{text}"
    );
    std::fs::write(&manifest, format!("{text}per_client = true\n")).expect("write manifest");
    git(&work, &["commit", "-q", "-am", "hello per client"]);
    assert!(push(&daemon, &work).contains("succeeded"));

    let quiet = daemon.address_for(QUIET, NAME);
    assert!(get_from(QUIET, &quiet).starts_with("hello from v1"));
    let busy = daemon.address_for(BUSY, NAME);
    let mut held = daemon.hold_connection(BUSY, &busy, 8080);
    assert_eq!(clients(&daemon), [QUIET, BUSY]);

    // Both slots taken: the new client gets the quiet client's, never the busy one's.
    let new = daemon.address_for(NEW, NAME);
    assert!(get_from(NEW, &new).starts_with("hello from v1"));
    assert!(
        eventually(|| clients(&daemon) == [BUSY, NEW]),
        "{:?}",
        daemon.instances()
    );
    let reclaimed = || {
        let logs = daemon.cli(&["logs", "hello", "--console"]);
        String::from_utf8_lossy(&logs.stdout)
            .contains("stopped: client slot reclaimed for a new client")
    };
    assert!(eventually(reclaimed), "the quiet client's record says why");

    // Both slots with a connection open: new clients are refused, with the reason.
    let _also_held = daemon.hold_connection(NEW, &new, 8080);
    let started = Instant::now();
    for client in REFUSED {
        let refused = daemon.dig_from(client, NAME);
        assert!(refused.contains("status: SERVFAIL"), "{refused}");
        assert!(
            refused.contains("Per-client instance limit for `hello` reached (2 clients)"),
            "{refused}"
        );
    }
    let windows = 1 + started.elapsed().as_secs() / LOG_WINDOW.as_secs();
    assert_eq!(clients(&daemon), [BUSY, NEW]);

    // The busy client's connection was kept all along.
    held.write_all(b"GET / HTTP/1.1\r\nhost: hello.revboot.test\r\nconnection: close\r\n\r\n")
        .expect("send a request on the held connection");
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut answer = String::new();
    held.read_to_string(&mut answer).expect("an answer");
    assert!(answer.contains("hello from v1"), "{answer}");

    let log = daemon.stop();
    let lines = log
        .lines()
        .filter(|line| line.contains("summon refused"))
        .count() as u64;
    assert!(
        (1..=windows).contains(&lines),
        "{lines} lines for {} refusals within {windows} log windows:\n{log}",
        REFUSED.len()
    );
}
