//! Sources in a cluster of three revboot nodes on a 3-member etcd: any node takes a push
//! and builds, branches move by compare-and-swap in etcd (two pushes of one branch at once
//! on two nodes: one wins, the other is refused as git refuses a push that is not a
//! fast-forward), the others fetch the sources with stock git, a service added on one node
//! exists on all, and a restarted node catches up.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use revboot_testkit::etcd::EtcdCluster;

use revboot_cluster::placement::{self, Candidate};

use crate::cluster::{node, node_ids, node_with, rev_parse, rev_parse_in};
use crate::support::{
    Daemon, commit_revision, curl, eventually, git, hello_source, history, push, request,
};

/// The commit of `refname` in a node's source repository of hello (empty when absent).
pub(super) fn source_ref(daemon: &Daemon, refname: &str) -> String {
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
pub(super) fn consistent(nodes: &[Daemon]) {
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
pub(super) fn served_everywhere(nodes: &[Daemon], name: &str, greeting: &str) {
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

/// Nodes n1 to n3, once each lists the three.
pub(super) fn three_nodes(dir: &Path, etcd: &EtcdCluster, prefix: &str) -> Vec<Daemon> {
    let nodes: Vec<Daemon> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| node(dir, etcd, id, prefix))
        .collect();
    for daemon in &nodes {
        assert!(eventually(|| node_ids(daemon) == ["n1", "n2", "n3"]));
    }
    nodes
}

#[test]
fn any_node_takes_a_push_and_builds_and_sources_replicate_through_etcd_and_git() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-src-{}", std::process::id());
    let mut nodes = three_nodes(temp.path(), &etcd, &prefix);

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

/// `git push` of `refspecs` from a working copy to a node, whatever its outcome.
fn push_refs(daemon: &Daemon, work: &Path, refspecs: &[&str]) -> Output {
    daemon
        .command("git")
        .arg("push")
        .arg(daemon.remote("hello"))
        .args(refspecs)
        .current_dir(work)
        .stdin(Stdio::null())
        .output()
        .expect("run git")
}

fn pushed(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    stderr
}

/// A branch deleted by `git push --delete` on one node and a tag pushed to another go
/// through etcd and reach every node: the tag names the deployment of its commit in every
/// node's DNS. A push to a node whose daemon is stopped (its source repository by path,
/// where the hook runs without the daemon) is refused, and no node's branch moves.
#[test]
fn deletions_and_tags_reach_every_node_and_a_push_to_a_stopped_node_is_refused() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-refs-{}", std::process::id());
    let mut nodes = three_nodes(temp.path(), &etcd, &prefix);
    let work = hello_source(temp.path());
    push(&nodes[0], &work);
    let c1 = head(&work);

    // A branch pushed to node 1 and a tag pushed to node 2 reach every node.
    git(&work, &["tag", "-a", "-m", "first", "v1"]);
    pushed(&push_refs(&nodes[0], &work, &["main:refs/heads/feature"]));
    pushed(&push_refs(&nodes[1], &work, &["v1"]));
    let tag = rev_parse_in(&work.join(".git"), "refs/tags/v1");
    for daemon in &nodes {
        assert!(
            eventually(|| source_ref(daemon, "refs/heads/feature") == c1
                && source_ref(daemon, "refs/tags/v1") == tag),
            "{}",
            daemon.log()
        );
    }
    // The tag names the same deployment of its commit on every node: the first (main's;
    // the branch pushed to node 1 may build it again, before or after the tag comes).
    let built = history(&nodes[0], "hello")
        .iter()
        .rev()
        .find(|d| d["source_commit"] == c1.as_str())
        .and_then(|d| d["revision"].as_str().map(str::to_owned))
        .expect("c1 built");
    for daemon in &nodes {
        assert!(
            eventually(|| rev_parse(daemon, "refs/tags/hello/v1^{commit}") == built),
            "{}",
            daemon.log()
        );
        let address = crate::support::dig_ok(daemon, "v1.hello.revboot.test", false);
        assert!(address.parse::<std::net::Ipv4Addr>().is_ok(), "{address}");
    }
    served_everywhere(&nodes, "v1.hello.revboot.test", "hello");

    // Deleted on node 3: gone everywhere, and from etcd.
    pushed(&push_refs(&nodes[2], &work, &["--delete", "feature"]));
    for daemon in &nodes {
        assert!(
            eventually(|| source_ref(daemon, "refs/heads/feature").is_empty()),
            "{}",
            daemon.log()
        );
    }
    assert_eq!(source_ref(&nodes[0], "refs/heads/main"), c1);

    // Node 2 stopped: a push to its source repository by path is refused by its hook, and
    // main moves on no node.
    let stopped = nodes.remove(1);
    let repo = stopped.data.join("src/hello.git");
    stopped.stop();
    commit_revision(&work, "v2", "hello");
    let output = Command::new("git")
        .args(["push", &repo.display().to_string(), "main"])
        .current_dir(&work)
        .stdin(Stdio::null())
        .output()
        .expect("run git");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("revboot on this node is not running: the push was not taken"),
        "{stderr}"
    );
    assert_eq!(rev_parse_in(&repo, "refs/heads/main"), c1);
    for daemon in &nodes {
        assert_eq!(source_ref(daemon, "refs/heads/main"), c1);
    }
    for daemon in &nodes {
        assert!(!built_commits(daemon).contains(&head(&work)));
    }
}

/// A node whose background replication is slowed down (`replicate_every_ms`) and is
/// asked by DNS for a revision it has not fetched yet fetches it first: the query answers,
/// and the instance it placed on itself boots from the fetched revision.
#[test]
fn a_node_asked_for_a_revision_it_has_not_fetched_fetches_it_first_and_boots_it() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(1, temp.path());
    let prefix = format!("/revboot-first-{}", std::process::id());
    let n1 = node(temp.path(), &etcd, "n1", &prefix);
    // Ten minutes: no background fetch of deployments within the test.
    let n2 = node_with(
        temp.path(),
        &etcd,
        "n2",
        &prefix,
        "replicate_every_ms = 600000\n",
    );
    for daemon in [&n1, &n2] {
        assert!(eventually(|| node_ids(daemon) == ["n1", "n2"]));
    }
    let capacity = |daemon: &Daemon, id: &str| {
        let (_, body) = request(daemon, "GET", "/api/v1/nodes", None, true);
        let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        view["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|node| node["id"] == id)
            .and_then(|node| node["capacity"].as_u64())
            .expect("capacity")
    };
    let candidates = [
        Candidate {
            id: "n1",
            capacity: capacity(&n1, "n1"),
        },
        Candidate {
            id: "n2",
            capacity: capacity(&n1, "n2"),
        },
    ];
    // Revisions built on node 1 until one is placed on node 2 (one in two, by the hash).
    let work = hello_source(temp.path());
    let mut revision = String::new();
    for round in 0..12 {
        if round > 0 {
            commit_revision(&work, &format!("v{round}"), &format!("round {round}"));
        }
        push(&n1, &work);
        revision = rev_parse(&n1, "refs/heads/hello");
        let key = format!("hello/{revision}");
        if placement::owner(&candidates, &key) == Some("n2") {
            break;
        }
    }
    assert_eq!(
        placement::owner(&candidates, &format!("hello/{revision}")),
        Some("n2")
    );
    // Node 2 has not fetched it: the only fetch there can be the one the query makes.
    assert!(rev_parse(&n2, &format!("{revision}^{{commit}}")).is_empty());
    let name = format!("{}.hello.revboot.test", &revision[..7]);
    let mut answer = String::new();
    assert!(
        eventually(|| {
            answer = n2.dig(&name, false);
            answer.parse::<std::net::Ipv4Addr>().is_ok()
        }),
        "{answer}\n{}",
        n2.log()
    );
    assert_eq!(rev_parse(&n2, &format!("{revision}^{{commit}}")), revision);
    let body = curl(&name, &answer, 8080);
    // hello answers with the deployment commit it was booted from.
    assert!(body.contains(&revision[..7]), "{body}");
    let instances = n2.instances();
    assert!(
        instances
            .iter()
            .any(|i| i["revision"].as_str() == Some(revision.as_str())),
        "{instances:?}"
    );
    assert!(
        n2.log().contains("fetched deployments from a peer"),
        "{}",
        n2.log()
    );
}
