//! A real unikernel through the whole daemon: push examples/hello-vm, dig, curl through the
//! proxy into the qemu microvm, then idle reaping writes its console back to the store.

use std::time::{Duration, Instant};

use crate::follow::Follower;
use crate::support::{Daemon, curl, dig_ok, example_source, push_service};

#[test]
fn hello_vm_boots_on_query_answers_by_revision_and_is_reaped() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        "[instances]\nidle_timeout_ms = 1500\n",
    );
    let work = example_source(temp.path(), "hello-vm");
    let pushed = push_service(&daemon, &work, "hello-vm");
    assert!(pushed.contains("succeeded"), "{pushed}");

    let output = daemon.cli(&["--json", "log", "hello-vm"]);
    let history: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).expect("JSON");
    let revision = history[0]["revision"]
        .as_str()
        .expect("revision")
        .to_owned();
    let name = format!("{}.hello-vm.revboot.test", &revision[..7]);

    // Followed from before it boots: the VM's serial console comes live, then its end.
    let mut follower = Follower::start(&daemon, &["logs", "hello-vm", "--console", "-f"]);
    let address = dig_ok(&daemon, &name, false);
    follower.expect("hello-vm: listening");
    let body = curl(&name, &address, 8080);
    assert_eq!(
        body.trim(),
        format!("hello from v1 ({revision})"),
        "answer not from the VM"
    );

    // No connections, no queries: the VM is stopped and its console lands in the store.
    let ended = follower.expect("ended:");
    assert!(ended.contains("stopped"), "{ended}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let console = loop {
        let logs = daemon.cli(&["logs", "hello-vm", &revision[..7], "--console"]);
        let text = String::from_utf8_lossy(&logs.stdout).into_owned();
        if text.contains("stopped: idle") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "not reaped within 60s:\n{text}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        console.contains("hello-vm: listening"),
        "console of the VM missing:\n{console}"
    );
    let ps = daemon.cli(&["--json", "ps"]);
    let instances: Vec<serde_json::Value> = serde_json::from_slice(&ps.stdout).expect("JSON");
    assert!(
        instances.is_empty(),
        "still running after reaping: {instances:?}"
    );
}
