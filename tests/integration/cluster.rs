//! Three revboot nodes on one 3-member etcd (`[cluster]`), each on loopback addresses of its
//! own: membership, deployments replicated by git, one live pointer by compare-and-swap,
//! and what etcd losing its quorum does to live moves.

use std::path::Path;
use std::process::Command;

use revboot_testkit::etcd::EtcdCluster;

use crate::support::{
    Daemon, Setup, commit_revision, eventually, git, hello_source, history, push, request,
};

/// Starts node `id` of the cluster on `etcd`, its data in `dir`.
fn node(dir: &Path, etcd: &EtcdCluster, id: &str, prefix: &str) -> Daemon {
    let config = format!(
        "[cluster]\netcd = {}\nnode = \"{id}\"\nttl_s = 3\nprefix = \"{prefix}\"\n",
        etcd.toml_endpoints()
    );
    Daemon::start_setup(
        &dir.join(id),
        &Setup {
            config: &config,
            ..Setup::default()
        },
    )
}

/// The node ids `GET /api/v1/nodes` of `daemon` lists.
fn node_ids(daemon: &Daemon) -> Vec<String> {
    let (status, body) = request(daemon, "GET", "/api/v1/nodes", None, true);
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    view["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|node| node["id"].as_str().expect("id").to_owned())
        .collect()
}

/// `git rev-parse` of a ref in a node's deployment repository (empty when absent).
fn rev_parse(daemon: &Daemon, reference: &str) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(daemon.data.join("deploy.git"))
        .args(["rev-parse", "--verify", "--quiet", reference])
        .output()
        .expect("run git");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn revisions(daemon: &Daemon) -> Vec<String> {
    history(daemon, "hello")
        .iter()
        .map(|d| d["revision"].as_str().expect("revision").to_owned())
        .collect()
}

#[test]
fn three_nodes_share_deployments_by_git_and_one_live_pointer_through_etcd() {
    let temp = tempfile::tempdir().expect("temp dir");
    let mut etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-e2e-{}", std::process::id());
    let nodes: Vec<Daemon> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| node(temp.path(), &etcd, id, &prefix))
        .collect();

    // Membership: every node lists the three (`revboot nodes` and the API).
    for daemon in &nodes {
        assert!(
            eventually(|| node_ids(daemon) == ["n1", "n2", "n3"]),
            "{:?}",
            node_ids(daemon)
        );
    }
    let listed = nodes[1].cli(&["nodes"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success() && text.contains("n3"), "{text}");

    // A push to node 1 becomes a deployment of node 3, fetched with git, and live there.
    let work = hello_source(temp.path());
    push(&nodes[0], &work);
    let v1 = revisions(&nodes[0])[0].clone();
    for daemon in &nodes[1..] {
        assert!(
            eventually(|| rev_parse(daemon, "refs/live/hello") == v1),
            "live on {} is {:?}; log:\n{}",
            daemon.data.display(),
            rev_parse(daemon, "refs/live/hello"),
            daemon.log()
        );
        assert_eq!(rev_parse(daemon, "refs/heads/hello"), v1);
    }
    let reflog = git(
        &nodes[2].data.join("deploy.git"),
        &["reflog", "show", "refs/live/hello"],
    );
    let reflog = String::from_utf8_lossy(&reflog.stdout).into_owned();
    assert!(reflog.contains("(node n1)"), "{reflog}");
    let answer = nodes[2].dig(&format!("{}.hello.revboot.test", &v1[..7]), false);
    assert!(answer.parse::<std::net::Ipv4Addr>().is_ok(), "{answer}");

    // Two more revisions, pushed to node 1, reach every node.
    commit_revision(&work, "v2", "hello");
    push(&nodes[0], &work);
    commit_revision(&work, "v3", "hello");
    push(&nodes[0], &work);
    let all = revisions(&nodes[0]);
    let (v3, v2) = (all[0].clone(), all[1].clone());
    for daemon in &nodes {
        assert!(eventually(|| rev_parse(daemon, "refs/live/hello") == v3));
    }

    // Two rollbacks at once on two nodes, to two revisions: at most one wins unless they
    // happened one after the other, and a loser says who won; every node ends up agreeing.
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| nodes[1].cli(&["rollback", "hello", &v1[..7]]));
        let b = scope.spawn(|| nodes[2].cli(&["rollback", "hello", &v2[..7]]));
        (a.join().expect("a"), b.join().expect("b"))
    });
    for output in [&a, &b] {
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains("moved meanwhile"), "{stderr}");
        }
    }
    assert!(a.status.success() || b.status.success());
    let winner = rev_parse(&nodes[0], "refs/live/hello");
    assert!(eventually(|| nodes.iter().all(|d| rev_parse(
        d,
        "refs/live/hello"
    ) == rev_parse(
        &nodes[0],
        "refs/live/hello"
    ))));
    assert!(winner == v1 || winner == v2 || winner == v3);

    // etcd with 2 of 3 members: live moves work.
    etcd.kill(2);
    let moved = nodes[0].cli(&["rollback", "hello", &v3[..7]]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    // 1 of 3: refused with a clear error, nothing moves; names still answer.
    etcd.kill(1);
    let refused = nodes[0].cli(&["rollback", "hello", &v1[..7]]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("etcd did not answer"), "{stderr}");
    assert_eq!(rev_parse(&nodes[0], "refs/live/hello"), v3);
    let answer = nodes[0].dig("hello.revboot.test", false);
    assert!(answer.parse::<std::net::Ipv4Addr>().is_ok(), "{answer}");
}
