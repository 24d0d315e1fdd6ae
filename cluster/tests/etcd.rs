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
        replicate_every_ms: None,
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

/// A 3-member etcd and nodes `a` and `b` on it, each seeing both; their stop senders.
async fn two_nodes(
    dir: &std::path::Path,
) -> (
    EtcdCluster,
    watch::Sender<bool>,
    watch::Sender<bool>,
    Cluster,
    Cluster,
) {
    let etcd = EtcdCluster::start(3, dir);
    let (stop_a, _) = watch::channel(false);
    let (stop_b, _) = watch::channel(false);
    let a = join(&etcd, "a", &stop_a).await;
    let b = join(&etcd, "b", &stop_b).await;
    assert!(until(|| a.nodes().len() == 2 && b.nodes().len() == 2).await);
    (etcd, stop_a, stop_b, a, b)
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
    let (_etcd, _stop_a, _stop_b, a, b) = two_nodes(dir.path()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_holds_an_instance_on_its_node_while_it_lives_and_goes_with_its_lease() {
    use revboot_cluster::Claimed;
    use revboot_cluster::placement::{self, Candidate};
    let dir = tempfile::tempdir().expect("temp dir");
    let (_etcd, stop_a, _stop_b, a, b) = two_nodes(dir.path()).await;
    // A key the hash gives to b.
    let both = [
        Candidate {
            id: "a",
            capacity: 1,
        },
        Candidate {
            id: "b",
            capacity: 1,
        },
    ];
    let key = (0..)
        .map(|n| format!("hello/{n:040x}"))
        .find(|key| placement::owner(&both, key) == Some("b"))
        .expect("a key");
    assert_eq!(b.owner(&key).expect("an owner").id, "b");

    // a claims it (as after a summon it won while b was away): both answer a from now on,
    // and b's own claim is refused, naming a.
    assert_eq!(a.claim(&key).await.expect("claimed"), Claimed::Mine);
    // Each node sees it once its own watch brings it (waited for, bounded).
    assert!(
        until(|| [&a, &b]
            .iter()
            .all(|node| node.owner(&key).is_some_and(|o| o.id == "a")))
        .await
    );
    assert_eq!(
        b.claim(&key).await.expect("asked"),
        Claimed::Theirs("a".to_owned())
    );
    assert_eq!(a.my_claims(), std::slice::from_ref(&key));

    // Released, the hash decides again.
    a.release(&key).await.expect("released");
    assert!(until(|| b.owner(&key).is_some_and(|o| o.id == "b")).await);

    // Claimed again, and a leaves: its lease goes, and the claim with it.
    assert_eq!(a.claim(&key).await.expect("claimed"), Claimed::Mine);
    assert!(until(|| b.claim_of(&key).as_deref() == Some("a")).await);
    stop_a.send_replace(true);
    assert!(until(|| b.claim_of(&key).is_none() && b.nodes().len() == 1).await);
    assert_eq!(b.owner(&key).expect("an owner").id, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_moves_the_records_one_of_two_at_once_wins_and_a_deleted_service_stays_deleted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_etcd, _stop_a, _stop_b, a, b) = two_nodes(dir.path()).await;
    let (v1, c1, zero) = ("1".repeat(40), "c".repeat(40), "0".repeat(40));
    a.add_source("hello").await.expect("add");
    a.move_ref("hello", "refs/heads/main", &zero, &c1)
        .await
        .expect("push");
    a.move_live("hello", None, &v1, "deploy")
        .await
        .expect("live");
    a.announce_head("hello", &v1).await.expect("announce");

    // A build of hello runs on b: a rename is refused, naming b.
    let lock = b
        .lock_builds("hello", Duration::from_secs(5))
        .await
        .expect("lock");
    let refused = a
        .retire("hello", Some("web"), false)
        .await
        .expect_err("building");
    assert!(refused.to_string().contains("runs on node b"), "{refused}");
    drop(lock);

    // Renamed on a while b deletes it: one wins, the other is refused saying why.
    let lock_gone = async {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            match a.retire("hello", Some("web"), false).await {
                Err(error) if error.to_string().contains("runs on node") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
        panic!("the build lock was not released");
    };
    let (renamed, deleted) = tokio::join!(lock_gone, b.retire("hello", None, false));
    assert!(
        renamed.is_ok() != deleted.is_ok(),
        "{renamed:?} {deleted:?}"
    );
    if let Err(error) = &deleted {
        // Renamed: the records moved to the new name, the source record saying from where.
        assert!(
            error.to_string().contains("renamed to `web` by node a"),
            "{error}"
        );
        assert!(
            until(|| a.sources().iter().any(|(s, r, _)| s == "web"
                && r.renamed_from.as_deref() == Some("hello")
                && r.refs["refs/heads/main"].commit == c1)
                && a.live()
                    .iter()
                    .any(|(s, r, _)| s == "web" && r.revision == v1)
                && a.heads().iter().any(|(s, h)| s == "web" && h.commit == v1))
            .await
        );
    } else {
        let error = renamed.expect_err("refused");
        assert!(error.to_string().contains("deleted by node b"), "{error}");
    }
    assert!(
        until(|| b.retired_record("hello").is_some()
            && !b.sources().iter().any(|(s, _, _)| s == "hello")
            && !b.live().iter().any(|(s, _, _)| s == "hello"))
        .await
    );

    // Nothing brings hello back: a push, a live move, an announcement, a recording.
    let pushed = b.move_ref("hello", "refs/heads/main", &c1, &v1).await;
    assert!(pushed.is_err_and(|e| e.to_string().contains("the push was not taken")),);
    assert!(
        b.move_live("hello", Some(&v1), &c1, "rollback")
            .await
            .is_err()
    );
    assert!(b.announce_head("hello", &v1).await.is_err());
    b.add_source("hello").await.expect("answered");
    assert!(!b.sources().iter().any(|(s, _, _)| s == "hello"));

    // The record names hello's newest deployment then.
    let retired = b.retired_record("hello").expect("retired");
    assert_eq!(retired.head.as_deref(), Some(v1.as_str()));

    // Added again, it is a new service: recorded with no ref, saying what it replaces, and
    // the record goes.
    assert!(b.revive("hello").await.expect("revive"));
    assert!(
        until(|| a.retired_record("hello").is_none()
            && a.sources().iter().any(|(s, r, _)| s == "hello"
                && r.refs.is_empty()
                && r.replaces.as_ref() == Some(&retired)))
        .await
    );
    assert!(!b.revive("hello").await.expect("revive"), "exists already");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_handed_over_keeps_the_node_and_its_claims_and_one_not_to_keep_joins_anew() {
    use revboot_cluster::Claimed;
    let dir = tempfile::tempdir().expect("temp dir");
    let (etcd, stop_a, _stop_b, a, b) = two_nodes(dir.path()).await;
    let key = "hello/handed";
    assert_eq!(a.claim(key).await.expect("claimed"), Claimed::Mine);
    assert!(until(|| b.claim_of(key).as_deref() == Some("a")).await);

    // a hands its lease over (an upgrade in place) and stops: the lease is not revoked, and
    // the next program of a keeps it, its record and its claim as they were.
    let lease = a.hand_over();
    stop_a.send_replace(true);
    let (stop_next, _) = watch::channel(false);
    let me = a.me().clone();
    let next = Cluster::join_with(
        &config(&etcd, "a"),
        "revboot.test",
        me.clone(),
        Some(lease),
        stop_next.subscribe(),
    )
    .await
    .expect("joined");
    assert_eq!(next.hand_over(), lease, "the same lease");
    assert_eq!(next.claim(key).await.expect("asked"), Claimed::Mine);
    assert_eq!(b.claim_of(key).as_deref(), Some("a"));
    assert_eq!(b.nodes().len(), 2);

    // A lease that is not there any more, or not this node's, is left: the node joins anew.
    let (stop_c, _) = watch::channel(false);
    let mut c = me.clone();
    c.id = "c".to_owned();
    for handed in [Some(lease), Some(0x7e57_0000_0001)] {
        let joined = Cluster::join_with(
            &config(&etcd, "c"),
            "revboot.test",
            c.clone(),
            handed,
            stop_c.subscribe(),
        )
        .await
        .expect("joined anew");
        assert_ne!(joined.hand_over(), lease);
    }
    assert!(until(|| b.nodes().len() == 3).await);
}
