//! Sources in a cluster of three revboot nodes on a 3-member etcd: any node takes a push
//! and builds, branches move by compare-and-swap in etcd (two pushes of one branch at once
//! on two nodes: one wins, the other is refused as git refuses a push that is not a
//! fast-forward), the others fetch the sources with stock git, a service added on one node
//! exists on all, and a restarted node catches up.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use revboot_testkit::etcd::EtcdCluster;

use crate::cluster::{node, node_ids, rev_parse, rev_parse_in};
use crate::support::{Daemon, commit_revision, curl, eventually, git, hello_source, history, push};

/// The commit of `refname` in a node's source repository of hello (empty when absent).
fn source_ref(daemon: &Daemon, refname: &str) -> String {
    rev_parse_in(&daemon.data.join("src/hello.git"), refname)
}

fn head(work: &Path) -> String {
    let output = git(work, &["rev-parse", "HEAD"]);
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The source commits of hello's deployments on a node, newest first.
fn built_commits(daemon: &Daemon) -> Vec<String> {
    history(daemon, "hello")
        .iter()
        .map(|d| {
            d["source_commit"]
                .as_str()
                .expect("source_commit")
                .to_owned()
        })
        .collect()
}

/// `git push` of a working copy's main to a node, whatever its outcome.
fn try_push(daemon: &Daemon, work: &Path) -> Output {
    daemon
        .command("git")
        .args(["push", &daemon.remote("hello"), "main"])
        .current_dir(work)
        .stdin(Stdio::null())
        .output()
        .expect("run git")
}

/// Every node's source and deployment repositories come to agree, then pass `git fsck`.
///
/// Agreement first: a fetch still writing objects (or git's automatic maintenance after it)
/// is a repository in the middle of a change, which is not what the check is about.
fn consistent(nodes: &[Daemon]) {
    let state = |daemon: &Daemon| {
        (
            source_ref(daemon, "refs/heads/main"),
            rev_parse(daemon, "refs/heads/hello"),
        )
    };
    assert!(
        eventually(|| nodes.iter().all(|daemon| state(daemon) == state(&nodes[0]))),
        "main and hello differ: {:?}",
        nodes.iter().map(state).collect::<Vec<_>>()
    );
    for daemon in nodes {
        for repo in ["src/hello.git", "deploy.git"] {
            let output = Command::new("git")
                .arg("-C")
                .arg(daemon.data.join(repo))
                .args(["fsck", "--no-progress"])
                .output()
                .expect("run git");
            assert!(
                output.status.success(),
                "{repo} of {}: {}{}",
                daemon.data.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// What every node answers for `name`, and what the instance there says.
fn served_everywhere(nodes: &[Daemon], name: &str, greeting: &str) {
    for daemon in nodes {
        let mut answer = String::new();
        assert!(
            eventually(|| {
                answer = daemon.dig(name, false);
                answer.parse::<std::net::Ipv4Addr>().is_ok()
            }),
            "{name} on {}: {answer:?}",
            daemon.data.display()
        );
        let body = curl(name, &answer, 8080);
        assert!(body.contains(greeting), "{name} at {answer}: {body}");
    }
}

#[test]
fn any_node_takes_a_push_and_builds_and_sources_replicate_through_etcd_and_git() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-src-{}", std::process::id());
    let mut nodes: Vec<Daemon> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| node(temp.path(), &etcd, id, &prefix))
        .collect();
    for daemon in &nodes {
        assert!(eventually(|| node_ids(daemon) == ["n1", "n2", "n3"]));
    }

    // A service added on node 2 exists on every node.
    let added = nodes[1].cli(&["service", "add", "scratch"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    for daemon in &nodes {
        assert!(eventually(|| daemon
            .data
            .join("src/scratch.git/HEAD")
            .is_file()));
    }

    // A push to node 1: its sources reach every node.
    let work = hello_source(temp.path());
    push(&nodes[0], &work);
    let c1 = head(&work);
    for daemon in &nodes {
        assert!(
            eventually(|| source_ref(daemon, "refs/heads/main") == c1),
            "main on {} is {:?}",
            daemon.data.display(),
            source_ref(daemon, "refs/heads/main")
        );
    }

    // The next commit, pushed to node 2, is built there once (on top of node 1's build),
    // deploys, and every node serves it.
    commit_revision(&work, "v2", "hello");
    let output = push(&nodes[1], &work);
    assert!(output.contains("build #"), "{output}");
    let c2 = head(&work);
    let v2 = rev_parse(&nodes[1], "refs/live/hello");
    for daemon in &nodes {
        assert!(eventually(|| rev_parse(daemon, "refs/live/hello") == v2));
        assert!(eventually(|| source_ref(daemon, "refs/heads/main") == c2));
        assert_eq!(built_commits(daemon), [c2.clone(), c1.clone()]);
    }
    served_everywhere(&nodes, &format!("{}.hello.revboot.test", &v2[..7]), "v2");

    // Two pushes of main at once, of two different commits on top of c2, to nodes 1 and 3:
    // one wins; the other `git push` fails saying why; nothing of it is built anywhere.
    let other = temp.path().join("other");
    git(
        temp.path(),
        &["clone", "-q", &work.display().to_string(), "other"],
    );
    commit_revision(&work, "v3a", "hello");
    commit_revision(&other, "v3b", "hello");
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| try_push(&nodes[0], &work));
        let b = scope.spawn(|| try_push(&nodes[2], &other));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!(
        a.status.success() != b.status.success(),
        "one push wins:\n{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let (winner, loser, lost) = if a.status.success() {
        (head(&work), head(&other), b)
    } else {
        (head(&other), head(&work), a)
    };
    let stderr = String::from_utf8_lossy(&lost.stderr);
    assert!(
        stderr.contains("moved meanwhile") || stderr.contains("fetch first"),
        "{stderr}"
    );
    consistent(&nodes);
    for daemon in &nodes {
        assert_eq!(source_ref(daemon, "refs/heads/main"), winner);
        let built = built_commits(daemon);
        assert!(
            built.contains(&winner) && !built.contains(&loser),
            "{built:?}"
        );
    }

    // Node 3 down while node 1 takes a push; restarted, it catches up sources and
    // deployments.
    nodes.pop().expect("n3").stop();
    let work = if winner == head(&work) { work } else { other };
    commit_revision(&work, "v4", "hello");
    push(&nodes[0], &work);
    let c4 = head(&work);
    nodes.push(node(temp.path(), &etcd, "n3", &prefix));
    assert!(
        eventually(|| source_ref(&nodes[2], "refs/heads/main") == c4),
        "{}",
        nodes[2].log()
    );
    consistent(&nodes);
    assert_eq!(built_commits(&nodes[2])[0], c4);
}

/// A node asked for a name of a service whose deployments another node announced fetches
/// them first; a fetch that fails is SERVFAIL (not NXDOMAIN, which resolvers would cache),
/// and logged. The other node is a registration made here with the cluster's own client,
/// at an address where no revboot answers.
#[test]
fn a_revision_announced_by_a_node_that_cannot_be_fetched_from_is_servfail_and_logged() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-fetch-{}", std::process::id());
    let n1 = node(temp.path(), &etcd, "n1", &prefix);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_leave, stop) = tokio::sync::watch::channel(false);
    let config = revboot_cluster::ClusterConfig::from_toml(&format!(
        "etcd = {}\nnode = \"n9\"\nttl_s = 2\nprefix = \"{prefix}\"",
        etcd.toml_endpoints()
    ))
    .expect("config");
    let unreachable = revboot_cluster::NodeInfo::new(
        "n9",
        "http://127.0.0.1:9",
        "127.0.0.1:9".parse().expect("address"),
    );
    let n9 = runtime
        .block_on(revboot_cluster::Cluster::join(
            &config,
            "revboot.test",
            unreachable,
            stop,
        ))
        .expect("join");
    let announced = "ab".repeat(20);
    runtime
        .block_on(n9.announce_head("hello", &announced))
        .expect("announce");
    let name = format!("{}.hello.revboot.test", &announced[..7]);
    let mut answer = String::new();
    assert!(
        eventually(|| {
            let output = n1
                .command("dig")
                .arg(format!("@{}", n1.dns.ip()))
                .args(["-p", &n1.dns.port().to_string(), "+time=15", "+tries=1"])
                .args([name.as_str(), "A"])
                .output()
                .expect("run dig");
            answer = String::from_utf8_lossy(&output.stdout).into_owned();
            answer.contains("status: SERVFAIL")
                && n1
                    .log()
                    .contains("cannot fetch deployments asked for by DNS")
        }),
        "{answer}\n{}",
        n1.log()
    );
}
