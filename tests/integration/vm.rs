//! A real unikernel through the whole daemon: push examples/hello-vm, dig, curl through the
//! proxy into the qemu microvm, then idle reaping writes its console back to the store; then
//! the same name again, which restores the snapshot the first boot saved (or, with
//! `qemu_restore = false`, boots cold again). A secret set with the CLI reaches the guest in
//! fw_cfg, and no file, argument or log. A warm VM service keeps two replicas, two qemu
//! processes on one name, each booted again when killed.

use std::time::{Duration, Instant};

use crate::follow::Follower;
use crate::support::{Daemon, curl, curl_path, dig_ok, example_source, push_service};

/// Push, query and curl twice, each time until the VM is reaped; `restore` is the daemon's
/// `[instances] qemu_restore`.
fn journey(restore: bool) {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        &format!("[instances]\nidle_timeout_ms = 1500\nqemu_restore = {restore}\n"),
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
    if restore {
        follower.expect("snapshot of the ready guest saved");
    }
    let body = curl(&name, &address, 8080);
    assert_eq!(
        body.trim(),
        format!("hello from v1 ({revision})"),
        "answer not from the VM"
    );

    // No connections, no queries: the VM is stopped and its console lands in the store.
    let ended = follower.expect("ended:");
    assert!(ended.contains("stopped"), "{ended}");
    let console = reaped_console(&daemon, &revision);
    assert!(
        console.contains("hello-vm: listening"),
        "console of the VM missing:\n{console}"
    );

    // The same name again: restored from the snapshot, or booted cold without restore.
    let address = dig_ok(&daemon, &name, false);
    if restore {
        follower.expect("[revboot] restored from the snapshot of a ready guest");
    } else {
        follower.expect("hello-vm: listening");
    }
    // The snapshot is stored beside the image, in the data directory, and only with restore.
    let images = temp.path().join("data/deployer/images");
    let snapshots = std::fs::read_dir(&images)
        .unwrap_or_else(|error| panic!("{}: {error}", images.display()))
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".snapshots"))
        .count();
    assert_eq!(snapshots, usize::from(restore), "in {}", images.display());
    let body = curl(&name, &address, 8080);
    assert_eq!(body.trim(), format!("hello from v1 ({revision})"));
    if restore {
        // The restored guest noticed its new seed before it answered.
        let id = curl_path(&name, &address, 8080, "/id");
        assert!(id.starts_with("random "), "{id}");
        follower.expect("hello-vm: restored with a new seed, reseeded");
    }
    let ended = follower.expect("ended:");
    assert!(ended.contains("stopped"), "{ended}");
    let ps = daemon.cli(&["--json", "ps"]);
    let instances: Vec<serde_json::Value> = serde_json::from_slice(&ps.stdout).expect("JSON");
    assert!(
        instances.is_empty(),
        "still running after reaping: {instances:?}"
    );
}

/// The console the store keeps of the last instance of `revision`, once it was reaped.
fn reaped_console(daemon: &Daemon, revision: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = daemon.cli(&["logs", "hello-vm", &revision[..7], "--console"]);
        let text = String::from_utf8_lossy(&logs.stdout).into_owned();
        if text.contains("stopped: idle") {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "not reaped within 60s:\n{text}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn hello_vm_boots_on_query_answers_by_revision_is_reaped_and_restores_its_snapshot() {
    journey(true);
}

#[test]
fn hello_vm_boots_cold_every_time_with_restore_off() {
    journey(false);
}

/// `GET /env/NAME` of hello-vm at `address`.
fn guest_var(name: &str, address: &str, var: &str) -> String {
    crate::support::curl_path(name, address, 8080, &format!("/env/{var}"))
        .trim()
        .to_owned()
}

#[test]
fn a_secret_set_with_the_cli_reaches_a_vm_in_fw_cfg_and_no_file_argument_or_log() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    let daemon = Daemon::start(&data);
    let work = example_source(temp.path(), "hello-vm");
    let pushed = push_service(&daemon, &work, "hello-vm");
    assert!(pushed.contains("succeeded"), "{pushed}");
    let secret = format!("sk-vm-{}", std::process::id() * 7919);
    let set = daemon.cli(&["config", "set", "hello-vm", &format!("API_KEY={secret}")]);
    assert!(set.status.success(), "{set:?}");

    let name = "hello-vm.revboot.test";
    let address = dig_ok(&daemon, name, false);
    assert_eq!(
        guest_var(name, &address, "API_KEY"),
        format!("API_KEY={secret}")
    );
    assert_eq!(guest_var(name, &address, "NOPE"), "NOPE is not set");
    let instances = daemon.instances();
    let pid = instances[0]["pid"].as_u64().expect("the VM's pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("qemu's command line");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("opt/org.revboot/env"), "{cmdline}");
    assert!(
        !cmdline.contains(&secret),
        "the secret is on qemu's command line"
    );
    // Once qemu has read it, no file holds it: not its scratch directory, not the snapshot
    // saved when the guest was ready.
    let clear = crate::config::files_holding(&data, secret.as_bytes());
    assert!(clear.is_empty(), "the secret is in the clear in {clear:?}");

    // A new value, and an instance restored from the snapshot: it reads its own qemu's.
    let other = format!("sk-vm-other-{}", std::process::id() * 104_729);
    let set = daemon.cli(&[
        "config",
        "set",
        "hello-vm",
        &format!("API_KEY={other}"),
        "--restart",
    ]);
    assert!(set.status.success(), "{set:?}");
    assert!(crate::support::eventually(|| daemon
        .instances()
        .first()
        .and_then(|i| i["pid"].as_u64())
        .is_none_or(|now| now != pid)));
    let address = dig_ok(&daemon, name, false);
    assert_eq!(
        guest_var(name, &address, "API_KEY"),
        format!("API_KEY={other}")
    );
    let log = daemon.log();
    assert!(log.contains("restored from its snapshot"), "{log}");
    assert!(
        !log.contains(&secret) && !log.contains(&other),
        "a secret is in the daemon's log"
    );
    let clear = crate::config::files_holding(&data, other.as_bytes());
    assert!(clear.is_empty(), "the secret is in the clear in {clear:?}");
}

/// The VMs of hello-vm's live revision that serve: (replica, pid), in replica order.
fn vm_replicas(daemon: &Daemon) -> Vec<(u64, Option<u64>)> {
    let mut serving: Vec<(u64, Option<u64>)> = daemon
        .instances()
        .into_iter()
        .filter(|i| i["state"] == "ready" || i["state"] == "idle")
        .map(|i| (i["replica"].as_u64().unwrap_or(0), i["pid"].as_u64()))
        .collect();
    serving.sort();
    serving
}

#[test]
fn a_warm_vm_service_keeps_two_replicas_each_serves_and_one_killed_is_booted_again() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = example_source(temp.path(), "hello-vm");
    let manifest = work.join("revboot.toml");
    let mut text = std::fs::read_to_string(&manifest).expect("read revboot.toml");
    assert!(
        text.trim_end().ends_with("idle_timeout_secs = 60"),
        "{text}"
    );
    text.push_str("min_instances = 2\n");
    std::fs::write(&manifest, text).expect("write revboot.toml");
    crate::support::git(&work, &["commit", "-q", "-am", "hello-vm, two replicas"]);
    let pushed = push_service(&daemon, &work, "hello-vm");
    assert!(
        pushed.contains("booted warm") && pushed.contains("min_instances = 2"),
        "{pushed}"
    );

    // The push returned once both VMs were booted and ready: two qemu processes.
    let before = vm_replicas(&daemon);
    assert_eq!(
        before.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 1],
        "{before:?}"
    );
    assert!(
        before[0].1.is_some() && before[1].1.is_some() && before[0].1 != before[1].1,
        "{before:?}"
    );
    let name = "hello-vm.revboot.test";
    let address = dig_ok(&daemon, name, false);
    assert!(curl(name, &address, 8080).starts_with("hello from v1"));

    // Each killed in turn: the other serves alone meanwhile, so both serve, and the killed
    // one is booted again without a request.
    let mut now = before;
    for replica in [0, 1] {
        let victim = now[replica].1.expect("a pid");
        crate::support::run(
            std::process::Command::new("kill").args(["-KILL", &victim.to_string()]),
        );
        assert!(
            crate::support::eventually(|| vm_replicas(&daemon).iter().all(|r| r.1 != Some(victim))),
            "the killed VM is still listed: {:?}",
            daemon.instances()
        );
        let address = dig_ok(&daemon, name, false);
        let body = curl(name, &address, 8080);
        assert!(body.starts_with("hello from v1"), "{body}");
        let other = now[1 - replica];
        assert!(
            crate::support::eventually(|| {
                let again = vm_replicas(&daemon);
                again.len() == 2
                    && again[1 - replica] == other
                    && again[replica].1.is_some_and(|pid| pid != victim)
            }),
            "replica #{replica} was not booted again: {:?}",
            daemon.instances()
        );
        now = vm_replicas(&daemon);
    }
    let address = dig_ok(&daemon, name, false);
    assert!(curl(name, &address, 8080).starts_with("hello from v1"));
}
