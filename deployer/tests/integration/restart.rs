//! kill -9 of the daemon with instances running, then a restart: nothing is left over.
//!
//! The daemon is this test binary run again (`daemon_child`, selected by an environment
//! variable), so it is a separate process with a deployer of its own.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use revboot_deployer::{Deployer, InstanceState, Instances};
use revboot_store::{Revision, Store};

use crate::support::{self, PATIENCE, deploy, hello_image, http_get, manifest, source};

const DAEMON_ENV: &str = "REVBOOT_TEST_DAEMON_DIR";
const REVISIONS_ENV: &str = "REVBOOT_TEST_DAEMON_REVISIONS";
const INDEX: u8 = 30;

fn daemon_config(dir: &Path) -> revboot_deployer::DeployerConfig {
    let mut config = support::config(dir, INDEX);
    // Stable across the two processes: the restarted deployer must find the same cgroups.
    let unique: String = dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    config.name = format!("test-restart-{unique}");
    // Let the instances outlive the daemon, so that the restart has orphans to remove.
    config.sandbox.die_with_daemon = false;
    config
}

/// The daemon: summons every revision it is given, prints their pids, waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by daemon_killed_with_instances_running_leaves_no_orphan"]
#[allow(clippy::print_stdout)]
async fn daemon_child() {
    let Some(dir) = std::env::var_os(DAEMON_ENV).map(PathBuf::from) else {
        return;
    };
    let revisions: Vec<Revision> = std::env::var(REVISIONS_ENV)
        .expect("revisions given")
        .split(',')
        .map(|hex| hex.parse().expect("revision"))
        .collect();
    let store = Store::open(dir.join("deploy.git")).expect("store");
    let deployer = Deployer::new(
        daemon_config(&dir),
        store,
        tokio::runtime::Handle::current(),
    )
    .expect("deployer");
    let mut pids = Vec::new();
    for revision in &revisions {
        let summoned = deployer.summon("hello", revision, None).expect("summon");
        let mut state = summoned.state.clone();
        support::wait_state(&mut state, InstanceState::is_serving).await;
        let response = http_get(support::backend_of(&summoned), "/")
            .await
            .expect("answer");
        assert!(response.contains("hello from v1"));
    }
    for info in deployer.list() {
        pids.push(info.pid.expect("running").to_string());
    }
    println!("READY {}", pids.join(","));
    tokio::time::sleep(Duration::from_secs(120)).await;
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rfind(')')
                .map(|i| !stat[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn cgroup_children(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for controller in ["memory", "pids", "cpu"] {
        let parent = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("revboot")
            .join(name);
        if let Ok(entries) = std::fs::read_dir(&parent) {
            found.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_with_instances_running_leaves_no_orphan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::init(dir.path().join("deploy.git")).expect("store");
    let image = hello_image();
    let run = "port = 8080\nready = { probe = \"socket\" }";
    let revisions: Vec<Revision> = (1..=3)
        .map(|n| deploy(&store, "hello", &image, &manifest("hello", run), &source(n)))
        .collect();
    let hexes: Vec<String> = revisions.iter().map(Revision::to_hex).collect();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "restart::daemon_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(DAEMON_ENV, dir.path())
        .env(REVISIONS_ENV, hexes.join(","))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("daemon starts");
    let stdout = child.stdout.take().expect("stdout");
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(pids) = line.strip_prefix("READY ") {
                let _ = line_tx.send(pids.to_owned());
            }
        }
    });
    let pids: Vec<u32> = line_rx
        .recv_timeout(PATIENCE)
        .expect("daemon ready in time")
        .split(',')
        .map(|pid| pid.parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 3);
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    child.wait().expect("daemon reaped");
    // The orphans are still there: the daemon died without cleaning up.
    assert!(
        pids.iter().all(|&pid| alive(pid)),
        "instances outlived the daemon"
    );
    let config = daemon_config(dir.path());
    let name = config.name.clone();
    assert!(!cgroup_children(&name).is_empty());

    let deployer: Arc<Deployer> =
        Deployer::new(config, store.clone(), tokio::runtime::Handle::current())
            .expect("restarted deployer");
    assert!(
        support::eventually(|| pids.iter().all(|&pid| !alive(pid))).await,
        "no orphan process remains"
    );
    // The restarted deployer keeps a few spare groups of its own; nothing else is left.
    let own_spares = format!("spare-{}-", std::process::id());
    let left: Vec<PathBuf> = cgroup_children(&name)
        .into_iter()
        .filter(|dir| {
            !dir.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&own_spares)
        })
        .collect();
    assert!(left.is_empty(), "no orphan cgroup remains: {left:?}");
    let scratch = dir.path().join("state/scratch");
    assert_eq!(std::fs::read_dir(&scratch).expect("scratch dir").count(), 0);
    assert!(deployer.list().is_empty());
    // The addresses are free and the revisions boot again on demand.
    let summoned = deployer
        .summon("hello", &revisions[0], None)
        .expect("summon again");
    let response = http_get(support::backend_of(&summoned), "/")
        .await
        .expect("answer");
    assert!(response.contains(&revisions[0].to_string()), "{response}");
    deployer.shutdown().await;
    assert!(cgroup_children(&name).is_empty());
}
