//! A hostile build recipe: pushed code that tries to read the daemon's secrets, write
//! outside its work directory, reach the network and outlive the daemon. Each attempt is
//! reported in the build log; each must fail, and the host must be as it was.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use revboot_builder::BuildState;

use crate::support::*;

/// One line per attempt: `ATTEMPT <name> allowed` or `ATTEMPT <name> refused`.
fn attempts(data: &Path, outside: &Path, listener: std::net::SocketAddr) -> String {
    let data = data.display();
    let outside = outside.display();
    let tries = [
        ("read-hook-token", format!("cat {data}/builder/hook-token")),
        // The data directory's path exists inside (the checkout and the cache are below
        // it), but only as the empty directories that lead to them.
        (
            "list-data",
            format!("ls -a {data} | grep -q -e deploy.git -e builder -e src"),
        ),
        ("read-other-source", format!("ls {data}/src/other.git")),
        ("read-other-cache", format!("ls {data}/cache/other")),
        ("read-deploy-repo", format!("ls {data}/deploy.git")),
        ("write-outside", format!("touch {outside}")),
        ("write-usr", "touch /usr/hostile".to_owned()),
        ("write-etc", "touch /etc/hostile".to_owned()),
        ("write-toolchain", "touch $CARGO_HOME/hostile".to_owned()),
        ("read-shadow", "cat /etc/shadow".to_owned()),
        (
            "see-host-processes",
            "test $(ls /proc | grep -c '^[0-9]') -gt 20".to_owned(),
        ),
        ("become-root", "test $(id -u) = 0".to_owned()),
        ("mknod", "mknod $HOME/kmsg c 1 11".to_owned()),
        ("mount", "mount -t tmpfs none $HOME".to_owned()),
        ("unshare", "unshare -U true".to_owned()),
        (
            "connect",
            format!("curl -s --max-time 3 http://{listener}/ -o /dev/null"),
        ),
    ];
    tries
        .iter()
        .map(|(name, command)| {
            format!("if {command} >/dev/null 2>&1; then echo ATTEMPT {name} allowed; else echo ATTEMPT {name} refused; fi; ")
        })
        .collect()
}

fn recipe(script: &str, network: bool) -> String {
    format!(
        "[build]\nshell = '''\n{script}\nmkdir -p out && cp exit0 out/a\n'''\nartifacts = [\"out/a\"]\nnetwork = {network}\n"
    )
}

/// The `ATTEMPT` lines of the build log of `commit`.
async fn reported(daemon: &Daemon, commit: &str) -> Vec<(String, String)> {
    let record = wait_finished(&daemon.builder, commit).await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    let revision = record.revision.expect("recorded").parse().expect("hex");
    let log = String::from_utf8(daemon.store.build_log(&revision).expect("log")).expect("utf8");
    let lines: Vec<(String, String)> = log
        .lines()
        .filter_map(|line| line.split_once("] ATTEMPT "))
        .filter_map(|(_, rest)| rest.split_once(' '))
        .map(|(name, outcome)| (name.to_owned(), outcome.trim().to_owned()))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_recipe_reaches_nothing_of_the_host() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let daemon = daemon(&data, |_| {}).await;
    // Another service with a source repository and a cache, to be out of reach.
    let other = recipe_fixture(tmp.path(), "other", &recipe("true", false)).await;
    let (ok, stderr) = push(&other, &daemon.url("other"), &[]).await;
    assert!(ok, "{stderr}");
    wait_finished(&daemon.builder, &head(&other).await).await;
    let token = std::fs::read(data.join("builder/hook-token")).expect("the hook token exists");
    let outside = tmp.path().join("outside");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let address = listener.local_addr().expect("address");

    let script = attempts(&data, &outside, address);
    let work = recipe_fixture(tmp.path(), "hostile", &recipe(&script, false)).await;
    let (ok, stderr) = push(&work, &daemon.url("hostile"), &[]).await;
    assert!(ok, "{stderr}");
    let lines = reported(&daemon, &head(&work).await).await;
    assert_eq!(lines.len(), 16, "{lines:?}");
    for (name, outcome) in &lines {
        assert_eq!(outcome, "refused", "{name}: {lines:?}");
    }
    assert!(
        !outside.exists(),
        "nothing was written outside the work directory"
    );
    assert!(!Path::new("/usr/hostile").exists() && !Path::new("/etc/hostile").exists());
    assert_eq!(
        std::fs::read(data.join("builder/hook-token")).expect("token"),
        token
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing reached the host's loopback"
    );

    // With `build.network = true` the same connection goes through: the refusal above was
    // the sandbox's.
    let allowed =
        format!("curl -s --max-time 5 http://{address}/ -o /dev/null; echo ATTEMPT connect tried");
    let accepting = std::thread::spawn(move || {
        listener.set_nonblocking(false).expect("blocking");
        let (stream, _) = listener.accept().expect("the build connects");
        drop(stream);
    });
    let online = recipe_fixture(tmp.path(), "online", &recipe(&allowed, true)).await;
    let (ok, stderr) = push(&online, &daemon.url("online"), &[]).await;
    assert!(ok, "{stderr}");
    reported(&daemon, &head(&online).await).await;
    accepting.join().expect("a connection arrived");
    daemon.stop().await;
}

const DATA_ENV: &str = "REVBOOT_TEST_ORPHAN_DATA";
const WORK_ENV: &str = "REVBOOT_TEST_ORPHAN_WORK";
const UID_ENV: &str = "REVBOOT_TEST_ORPHAN_UID";

/// The child: a daemon whose build starts a background sleeper and sleeps; it waits to be
/// killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the orphan test"]
async fn orphan_child() {
    let (Some(data), Some(work), Some(uid)) = (
        std::env::var_os(DATA_ENV),
        std::env::var_os(WORK_ENV),
        std::env::var(UID_ENV).ok().and_then(|u| u.parse().ok()),
    ) else {
        return;
    };
    let daemon = daemon(Path::new(&data), |c| c.sandbox.uid = uid).await;
    let (work, url) = (PathBuf::from(work), daemon.url("sleepy"));
    tokio::spawn(async move { push(&work, &url, &[]).await });
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_dies_with_a_daemon_killed_by_sigkill() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A uid of this test's own: the question "is anything of the build left" is about it.
    let uid = 2_099_000_000 + std::process::id() % 900_000;
    let recipe = "[build]\nshell = \"sleep 300 & sleep 300 & echo started; sleep 300\"\nartifacts = [\"a\"]\ntimeout_secs = 600\n";
    let work = recipe_fixture(tmp.path(), "sleepy", recipe).await;
    let mut child = revboot_testkit::test_child("sandbox::orphan_child")
        .env(DATA_ENV, tmp.path().join("data"))
        .env(WORK_ENV, &work)
        .env(UID_ENV, uid.to_string())
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    // Its build is running once three processes run as the build uid.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while processes_of(uid).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // kill -9 of the daemon alone (not its group: the build has a session of its own).
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    // The kernel kills the build's first process with the daemon, and its pid namespace
    // with it; a bounded wait for that to happen, not a timing assertion.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !processes_of(uid).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        processes_of(uid),
        Vec::<u32>::new(),
        "the build outlived the daemon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamically_linked_image_fails_its_build_saying_how_to_link_statically() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    // The host's `true` is dynamically linked: it would build, get a name, and never boot.
    let recipe = "[build]\nshell = \"mkdir -p out && cp /usr/bin/true out/true\"\nartifacts = [\"out/true\"]\n";
    let work = recipe_fixture(tmp.path(), "dynamic", recipe).await;
    let (_, stderr) = push(&work, &daemon.url("dynamic"), &[]).await;
    let record = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(record.state, BuildState::Failed, "{record:#?}");
    let message = record.message.expect("a reason");
    assert!(
        message.contains("image `true` is dynamically linked"),
        "{message}"
    );
    assert!(message.contains("crt-static"), "{message}");
    assert!(stderr.contains("dynamically linked"), "{stderr}");
    assert_eq!(daemon.store.live("dynamic").expect("live"), None);
    daemon.stop().await;
}
