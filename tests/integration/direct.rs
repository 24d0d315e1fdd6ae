//! `[instances] direct = true`: no proxy in front, clients reach the instance's own socket.
//! dig answers its service address, curl reaches it (the proxy accepts nothing), an open
//! quiet connection keeps it past the idle timeout, and closing it lets reaping happen.

use std::time::{Duration, Instant};

use crate::support::{Daemon, curl, dig_ok, hello_source, history, push};

/// Bound on every wait in this test (not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(60);

fn running(daemon: &Daemon) -> usize {
    let ps = daemon.cli(&["--json", "ps"]);
    let instances: Vec<serde_json::Value> = serde_json::from_slice(&ps.stdout).expect("JSON");
    instances.len()
}

#[test]
fn direct_instances_serve_without_the_proxy_and_open_connections_keep_them() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        "[instances]\ndirect = true\nidle_timeout_ms = 1000\n",
    );
    let work = hello_source(temp.path());
    let pushed = push(&daemon, &work);
    assert!(pushed.contains("succeeded"), "{pushed}");
    let revision = history(&daemon, "hello")[0]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let name = format!("{}.hello.revboot.test", &revision[..7]);

    let address = dig_ok(&daemon, &name, false);
    let body = curl(&name, &address, 8080);
    assert_eq!(body.trim(), format!("hello from v1 ({revision})"));
    let text = daemon.metrics();
    assert!(
        text.contains("revboot_proxy_connections_total{outcome=\"accepted\"} 0"),
        "the proxy took a connection:\n{text}"
    );

    // A connection that says nothing: hello accepts it and waits for its request.
    let quiet = std::net::TcpStream::connect((address.as_str(), 8080)).expect("connect");
    std::thread::sleep(Duration::from_millis(3_000));
    assert_eq!(running(&daemon), 1, "reaped with a connection open");
    drop(quiet);
    let deadline = Instant::now() + PATIENCE;
    while running(&daemon) > 0 {
        assert!(
            Instant::now() < deadline,
            "not reaped after the connection closed:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
