//! Renaming and deleting a service in a cluster of three revboot nodes on a 3-member etcd:
//! the operation taken on any node reaches every node (API, DNS, source repositories), a
//! node that was down meanwhile applies it when it starts and brings nothing back, two
//! operations at once on two nodes are one won and one refused, and a push to a renamed
//! service's old URL is refused naming the new name.

use std::path::Path;
use std::process::{Output, Stdio};

use revboot_testkit::etcd::EtcdCluster;

use crate::cluster::{node, rev_parse};
use crate::cluster_sources::{served_everywhere, source_ref, three_nodes};
use crate::lifecycle::{cli_json, dig_status};
use crate::support::{Daemon, eventually, git, hello_source, history, push, push_service};

const ZONE: &str = "revboot.test";

/// The HTTP status of `GET /api/v1/services/<service>/deployments` on a node.
fn api_status(daemon: &Daemon, service: &str) -> u16 {
    crate::support::request(
        daemon,
        "GET",
        &format!("/api/v1/services/{service}/deployments"),
        None,
        true,
    )
    .0
}

/// Whether a node has no trace of `service`: no source repository, no deployments (the
/// CLI's `not_found`), NXDOMAIN for its name.
fn gone(daemon: &Daemon, service: &str) -> bool {
    !daemon.data.join(format!("src/{service}.git")).exists()
        && cli_json(daemon, &["log", service]).1["error"] == "not_found"
        && dig_status(daemon, &format!("{service}.{ZONE}")) == "NXDOMAIN"
}

/// `git push` of main to `service` on a node, whatever its outcome.
fn try_push(daemon: &Daemon, work: &Path, service: &str) -> Output {
    daemon
        .command("git")
        .args(["push", &daemon.remote(service), "main"])
        .current_dir(work)
        .stdin(Stdio::null())
        .output()
        .expect("run git")
}

#[test]
fn a_service_deleted_on_one_node_is_gone_everywhere_and_a_node_down_meanwhile_brings_nothing_back()
{
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-retire-{}", std::process::id());
    let mut nodes = three_nodes(temp.path(), &etcd, &prefix);

    // Two renames of one service at once on two nodes: one wins, the other is refused
    // with its reason, and every node ends with the winner's name alone.
    let (code, _) = cli_json(&nodes[0], &["service", "add", "scratch"]);
    assert_eq!(code, 0);
    for daemon in &nodes {
        assert!(eventually(|| daemon
            .data
            .join("src/scratch.git/HEAD")
            .is_file()));
    }
    let ((a, a_view), (b, b_view)) = std::thread::scope(|scope| {
        let a = scope.spawn(|| cli_json(&nodes[0], &["service", "rename", "scratch", "left"]));
        let b = scope.spawn(|| cli_json(&nodes[1], &["service", "rename", "scratch", "right"]));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!((a == 0) != (b == 0), "one wins: {a_view} {b_view}");
    let (winner, loser, refused) = if a == 0 {
        ("left", "right", b_view)
    } else {
        ("right", "left", a_view)
    };
    // Refused by etcd (the other won there first) or by the node (it had applied it).
    assert!(
        matches!(refused["error"].as_str(), Some("conflict" | "not_found")),
        "{refused}"
    );
    for daemon in &nodes {
        assert!(
            eventually(
                || daemon.data.join(format!("src/{winner}.git/HEAD")).is_file()
                    && !daemon.data.join("src/scratch.git").exists()
            ),
            "{}",
            daemon.log()
        );
        assert!(!daemon.data.join(format!("src/{loser}.git")).exists());
    }

    // hello, built on node 1 and served by every node.
    let work = hello_source(temp.path());
    push(&nodes[0], &work);
    let live = rev_parse(&nodes[0], "refs/live/hello");
    for daemon in &nodes {
        assert!(eventually(|| rev_parse(daemon, "refs/live/hello") == live));
    }
    served_everywhere(&nodes, &format!("hello.{ZONE}"), "hello");

    // Nodes 1 and 3 down; hello deleted on node 2: gone there.
    let n3 = nodes.pop().expect("n3");
    let n1 = nodes.remove(0);
    let (n1_data, n3_data) = (n1.data.clone(), n3.data.clone());
    n1.stop();
    n3.stop();
    let (code, deleted) = cli_json(
        &nodes[0],
        &["service", "delete", "hello", "--remove-deployments"],
    );
    assert_eq!(code, 0, "{deleted}");
    assert!(gone(&nodes[0], "hello"), "{}", nodes[0].log());
    assert_eq!(api_status(&nodes[0], "hello"), 404);
    assert!(nodes[0].instances().iter().all(|i| i["service"] != "hello"));

    // Node 1 started again deletes it too, and nothing of it comes back.
    nodes.insert(0, node(temp.path(), &etcd, "n1", &prefix));
    assert_eq!(nodes[0].data, n1_data);
    assert!(
        eventually(|| gone(&nodes[0], "hello")),
        "{}",
        nodes[0].log()
    );
    // Logged once done (the line may follow by a moment what the checks above see).
    assert!(
        eventually(|| nodes[0]
            .log()
            .contains("renamed or deleted a service as another node of the cluster did")),
        "{}",
        nodes[0].log()
    );
    for daemon in &nodes {
        assert!(gone(daemon, "hello"), "{}", daemon.log());
        assert_eq!(api_status(daemon, "hello"), 404);
        // A push of it is refused, saying so, and creates nothing.
        let output = try_push(daemon, &work, "hello");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains("Service `hello` was deleted"), "{stderr}");
        assert!(gone(daemon, "hello"));
    }

    // Added again on node 1, it is a new service: a push to node 2 builds its first
    // deployment.
    let (code, added) = cli_json(&nodes[0], &["service", "add", "hello"]);
    assert_eq!(code, 0, "{added}");
    assert!(eventually(|| nodes[1]
        .data
        .join("src/hello.git/HEAD")
        .is_file()));
    push(&nodes[1], &work);
    let live = rev_parse(&nodes[1], "refs/live/hello");
    assert_ne!(live, "");

    // Node 3, down for both, deletes the hello it has (the one from before) when it
    // starts, then takes the new one: no node has a deployment of the earlier hello.
    nodes.push(node(temp.path(), &etcd, "n3", &prefix));
    assert_eq!(nodes[2].data, n3_data);
    for daemon in &nodes {
        assert!(
            eventually(|| rev_parse(daemon, "refs/live/hello") == live
                && history(daemon, "hello").len() == 1),
            "{}",
            daemon.log()
        );
    }
    // Logged once done (the line may follow by a moment what the checks above see).
    assert!(
        eventually(|| nodes[2]
            .log()
            .contains("renamed or deleted a service as another node of the cluster did")),
        "{}",
        nodes[2].log()
    );
    served_everywhere(&nodes, &format!("hello.{ZONE}"), "hello");
}

#[test]
fn a_service_renamed_on_one_node_is_served_under_its_new_name_everywhere() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-rename-{}", std::process::id());
    let nodes = three_nodes(temp.path(), &etcd, &prefix);

    // hello with a tag, built on node 1; its live name served (an instance runs) everywhere.
    let work = hello_source(temp.path());
    push(&nodes[0], &work);
    git(&work, &["tag", "-a", "-m", "first", "v1"]);
    let output = nodes[0]
        .command("git")
        .args(["push", &nodes[0].remote("hello"), "v1"])
        .current_dir(&work)
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let live = rev_parse(&nodes[0], "refs/live/hello");
    let main = source_ref(&nodes[0], "refs/heads/main");
    for daemon in &nodes {
        assert!(eventually(|| rev_parse(daemon, "refs/live/hello") == live
            && rev_parse(daemon, "refs/tags/hello/v1^{commit}") == live));
    }
    served_everywhere(&nodes, &format!("hello.{ZONE}"), "hello");

    // Renamed on node 3.
    let (code, renamed) = cli_json(&nodes[2], &["service", "rename", "hello", "web"]);
    assert_eq!(code, 0, "{renamed}");
    assert_eq!(renamed["live"], live.as_str());
    for daemon in &nodes {
        assert!(
            eventually(|| gone(daemon, "hello")
                && daemon.data.join("src/web.git/HEAD").is_file()
                && rev_parse(daemon, "refs/live/web") == live),
            "{}",
            daemon.log()
        );
        // Sources, deployments, the live pointer and tags moved; no instance of hello runs.
        assert_eq!(
            crate::cluster::rev_parse_in(&daemon.data.join("src/web.git"), "refs/heads/main"),
            main
        );
        assert_eq!(rev_parse(daemon, "refs/tags/web/v1^{commit}"), live);
        assert!(eventually(|| daemon
            .instances()
            .iter()
            .all(|i| i["service"] != "hello")));
        assert_eq!(api_status(daemon, "web"), 200);
        // A push to the old URL is refused, naming the new name.
        let output = try_push(daemon, &work, "hello");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains("renamed to `web`"), "{stderr}");
    }
    served_everywhere(&nodes, &format!("web.{ZONE}"), "hello");
    served_everywhere(&nodes, &format!("v1.web.{ZONE}"), "hello");

    // A push to the new name on node 2 builds on top and goes live everywhere.
    crate::support::commit_revision(&work, "v2", "hello");
    push_service(&nodes[1], &work, "web");
    let v2 = rev_parse(&nodes[1], "refs/live/web");
    assert_ne!(v2, live);
    for daemon in &nodes {
        assert!(
            eventually(|| rev_parse(daemon, "refs/live/web") == v2),
            "{}",
            daemon.log()
        );
    }
    served_everywhere(&nodes, &format!("web.{ZONE}"), "v2");

    // Deleted on node 1 keeping its deployments: archived on every node, as on a single
    // host (its deployments under refs/revboot/deleted/web/, its sources under .deleted).
    let (code, deleted) = cli_json(
        &nodes[0],
        &["service", "delete", "web", "--keep-deployments"],
    );
    assert_eq!(code, 0, "{deleted}");
    for daemon in &nodes {
        assert!(eventually(|| gone(daemon, "web")), "{}", daemon.log());
        let archived = crate::support::run(
            std::process::Command::new("git")
                .arg("-C")
                .arg(daemon.data.join("deploy.git"))
                .args([
                    "for-each-ref",
                    "--format=%(objectname)",
                    "refs/revboot/deleted/web/",
                ]),
        );
        assert!(
            String::from_utf8_lossy(&archived.stdout).contains(&v2),
            "{}",
            daemon.log()
        );
        let sources = std::fs::read_dir(daemon.data.join("src/.deleted")).expect("archive");
        assert!(
            sources
                .filter_map(Result::ok)
                .any(|entry| entry.file_name().to_string_lossy().starts_with("web-"))
        );
    }
}
