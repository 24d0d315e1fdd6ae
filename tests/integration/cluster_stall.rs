//! A node of a cluster that stalls (SIGSTOP) longer than its leases while it builds: the
//! build lock passes to another node, which builds; the stalled builder, once it goes on,
//! finds the lock is not its own any more, writes nothing, and takes the other's line, so
//! the service's deployments stay one line on every node.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use etcd_client::Client;

use crate::cluster::{rev_parse, two_nodes};
use crate::cluster_sources::consistent;
use crate::support::{Daemon, commit_revision, eventually, git, hello_source, push};

/// `git push` of `refspec` of a working copy to a node's hello, whatever its outcome.
fn push_ref(daemon: &Daemon, work: &Path, refspec: &str) -> Output {
    daemon
        .command("git")
        .args(["push", &daemon.remote("hello"), refspec])
        .current_dir(work)
        .stdin(Stdio::null())
        .output()
        .expect("run git")
}

/// Sends `signal` to a process.
fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// A stopped daemon, continued when this ends (the test's failures included).
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

#[test]
fn a_builder_stalled_past_its_build_lock_writes_nothing_and_the_deployments_stay_one_line() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (etcd, prefix, nodes) = two_nodes(temp.path(), "stall");
    let work = hello_source(temp.path());
    push(&nodes[0], &work);
    let first = rev_parse(&nodes[0], "refs/heads/hello");
    assert!(eventually(
        || rev_parse(&nodes[1], "refs/heads/hello") == first
    ));

    // v2, pushed to n1, builds once a gate file exists in the build's HOME (the service's
    // cache on n1): n1 holds the build lock meanwhile.
    git(&work, &["checkout", "-q", "-b", "other"]);
    git(&work, &["checkout", "-q", "main"]);
    let manifest = std::fs::read_to_string(work.join("revboot.toml")).expect("the manifest");
    let command = (manifest.lines())
        .find(|line| line.starts_with("command = "))
        .expect("a build command");
    let gated = manifest.replacen(
        command,
        "shell = 'while [ ! -e \"$HOME/gate\" ]; do sleep 0.1; done; exec cargo build --release --offline --target x86_64-unknown-linux-gnu'",
        1,
    );
    std::fs::write(work.join("revboot.toml"), gated).expect("write the manifest");
    commit_revision(&work, "v2", "hello");
    let slow = std::thread::spawn({
        let (remote, work) = (nodes[0].remote("hello"), work.clone());
        let mut command = nodes[0].command("git");
        command
            .args(["push", &remote, "main"])
            .current_dir(work)
            .stdin(Stdio::null());
        move || command.output().expect("run git")
    });
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let mut client = runtime
        .block_on(Client::connect(etcd.endpoints(), None))
        .expect("an etcd client");
    let lock = format!("{prefix}/builds/hello");
    let mut holder = || {
        let got = runtime
            .block_on(client.get(lock.as_str(), None))
            .expect("get the lock");
        got.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    };
    assert!(eventually(|| holder().is_some_and(|h| h.contains("\"n1\""))));

    // n1 stalls, longer than the lock's TTL: the lock goes with its lease.
    let stopped = Stopped(nodes[0].pid());
    signal(stopped.0, "STOP");
    assert!(eventually(|| holder().is_none()));

    // Meanwhile n2 takes a push of another branch and builds it on top of v1.
    git(&work, &["checkout", "-q", "other"]);
    commit_revision(&work, "v3", "hello");
    let pushed = push_ref(&nodes[1], &work, "other");
    let stderr = String::from_utf8_lossy(&pushed.stderr);
    assert!(pushed.status.success(), "{stderr}");
    let theirs = rev_parse(&nodes[1], "refs/heads/hello");
    assert_ne!(theirs, first, "{stderr}");
    assert_eq!(rev_parse(&nodes[1], "refs/heads/hello^"), first);

    // n1 goes on, its build with it: it finds the lock is not its own, writes nothing, and
    // says so; then it fetches n2's line, a fast-forward of its own.
    std::fs::write(nodes[0].data.join("cache/hello/home/gate"), b"").expect("open the gate");
    drop(stopped);
    let slow = slow.join().expect("the push to n1");
    let said = String::from_utf8_lossy(&slow.stderr);
    assert!(
        said.contains("lost the cluster's build lock of `hello`"),
        "{said}"
    );
    assert!(eventually(
        || rev_parse(&nodes[0], "refs/heads/hello") == theirs
    ));
    // Every node's source and deployment repositories agree and pass `git fsck`.
    consistent(&nodes);
    assert_eq!(rev_parse(&nodes[1], "refs/heads/hello"), theirs);
    assert!(nodes[0].log().contains("lost the build lock"));
}
