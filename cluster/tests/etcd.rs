//! The cluster crate against a real 3-member etcd on loopback addresses of its own.

use std::time::{Duration, Instant};

use revboot_cluster::{Cluster, ClusterConfig, LiveCasError, NodeInfo};
use revboot_testkit::etcd::EtcdCluster;
use tokio::sync::watch;

/// Bound on every wait (not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(60);

fn config(etcd: &EtcdCluster, node: &str) -> ClusterConfig {
    ClusterConfig {
        etcd: etcd.endpoints(),
        node: node.to_owned(),
        ttl_s: 2,
        prefix: None,
    }
}

async fn join(etcd: &EtcdCluster, node: &str, stop: &watch::Sender<bool>) -> Cluster {
    let me = NodeInfo::new(
        node,
        &format!("http://{node}.invalid:8080"),
        "127.0.0.1:5353".parse().expect("address"),
    );
    Cluster::join(&config(etcd, node), "revboot.test", me, stop.subscribe())
        .await
        .expect("join")
}

async fn until(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_that_both_saw_v2_roll_back_one_wins_the_other_gets_a_conflict() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, dir.path());
    let (stop_a, _) = watch::channel(false);
    let (stop_b, _) = watch::channel(false);
    let a = join(&etcd, "a", &stop_a).await;
    let b = join(&etcd, "b", &stop_b).await;
    assert!(until(|| a.nodes().len() == 2 && b.nodes().len() == 2).await);
    let (v1, v2, v3) = ("1".repeat(40), "2".repeat(40), "3".repeat(40));

    a.move_live("hello", None, &v2, "deploy")
        .await
        .expect("first move");
    // Both believe v2 is live; a rolls back to v1 first, b to v3 after.
    a.move_live("hello", Some(&v2), &v1, "rollback to v1")
        .await
        .expect("a wins");
    let lost = b
        .move_live("hello", Some(&v2), &v3, "rollback to v3")
        .await
        .expect_err("b loses");
    match &lost {
        LiveCasError::Conflict { live, .. } => {
            assert_eq!(live.revision, v1);
            assert_eq!(live.node, "a");
        }
        other => panic!("not a conflict: {other}"),
    }
    let message = lost.to_string();
    assert!(message.contains("moved meanwhile"), "{message}");
    assert!(message.contains("node a"), "{message}");
    assert!(
        until(|| b
            .live()
            .iter()
            .any(|(s, r, _)| s == "hello" && r.revision == v1))
        .await
    );
    // Moving to what is live already is no conflict.
    b.move_live("hello", Some(&v2), &v1, "same")
        .await
        .expect("idempotent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_renewing_is_gone_within_its_ttl_and_etcd_down_refuses_moves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = EtcdCluster::start(3, dir.path());
    let (stop_a, _) = watch::channel(false);
    let (stop_b, _) = watch::channel(false);
    let a = join(&etcd, "a", &stop_a).await;
    let b = join(&etcd, "b", &stop_b).await;
    assert!(until(|| a.nodes().len() == 2).await, "{:?}", a.nodes());
    assert!(a.connected());
    // b leaves (its lease is revoked): a sees it gone.
    stop_b.send_replace(true);
    assert!(until(|| a.nodes().len() == 1).await, "{:?}", a.nodes());
    assert_eq!(a.nodes()[0].id, "a");
    drop(b);

    // 2 of 3 members: moves still work.
    etcd.kill(2);
    let v1 = "1".repeat(40);
    a.move_live("hello", None, &v1, "deploy")
        .await
        .expect("2 of 3");
    // 1 of 3: refused, saying why.
    etcd.kill(1);
    let refused = a
        .move_live("hello", Some(&v1), &"2".repeat(40), "rollback")
        .await
        .expect_err("no quorum");
    assert!(
        matches!(refused, LiveCasError::Unavailable { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("refused"), "{refused}");
    // Its lease cannot be renewed: the node knows it is cut off.
    assert!(until(|| !a.connected()).await);
}
