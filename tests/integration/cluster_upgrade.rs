//! A node of a cluster upgraded in place: its etcd lease goes to the new program, so the
//! node's record and its claims never leave etcd, and no other node boots a copy of an
//! instance it runs meanwhile.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use revboot_testkit::etcd::EtcdCluster;

use crate::cluster::{ask, node_ids, query_socket, rev_parse};
use crate::support::{Daemon, Setup, eventually, hello_source, push};

/// The nodes' membership lease: long enough for the new program of a loaded machine to
/// start and take the lease over (it is renewed right before the exec).
const TTL_S: u64 = 6;

/// Node `id`, run from `binary` (a copy that an upgrade executes again).
fn node(dir: &Path, etcd: &EtcdCluster, id: &str, prefix: &str, binary: &Path) -> Daemon {
    let config = format!(
        "[dns]\nboots_per_second = 10000\nboot_burst = 10000\n\
         [instances]\nidle_timeout_ms = 600000\n\
         [cluster]\netcd = {}\nnode = \"{id}\"\nttl_s = {TTL_S}\nprefix = \"{prefix}\"\n",
        etcd.toml_endpoints()
    );
    Daemon::start_setup(
        &dir.join(id),
        &Setup {
            config: &config,
            binary: Some(binary),
            ..Setup::default()
        },
    )
}

/// Whether `daemon` runs an instance of hello.
fn runs_hello(daemon: &Daemon) -> bool {
    (daemon.instances().iter()).any(|i| i["service"] == "hello" && i["state"] != "stopped")
}

#[test]
fn an_upgrade_in_place_keeps_the_node_s_lease_and_claims_in_etcd_and_no_other_node_boots_a_copy() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(1, temp.path());
    let prefix = format!("/revboot-e2e-upgrade-{}", std::process::id());
    let binary = temp.path().join("revboot");
    std::fs::copy(env!("CARGO_BIN_EXE_revboot"), &binary).expect("copy the binary");
    let nodes = [
        node(temp.path(), &etcd, "n1", &prefix, &binary),
        node(temp.path(), &etcd, "n2", &prefix, &binary),
    ];
    for daemon in &nodes {
        assert!(eventually(|| node_ids(daemon).len() == 2));
    }
    push(&nodes[0], &hello_source(temp.path()));
    for daemon in &nodes {
        assert!(eventually(
            || !rev_parse(daemon, "refs/live/hello").is_empty()
        ));
    }

    // The live name, asked of n1, boots hello on its owner; the other node does not run it.
    let (name, socket) = ("hello.revboot.test", query_socket());
    let mut address = None;
    assert!(eventually(|| {
        address = ask(&socket, nodes[0].dns, name, 1);
        address.is_some()
    }));
    assert!(eventually(|| nodes.iter().any(runs_hello)));
    let (owner, other) = match runs_hello(&nodes[0]) {
        true => (&nodes[0], &nodes[1]),
        false => (&nodes[1], &nodes[0]),
    };
    assert!(!runs_hello(other));
    let owner_id = owner.data.file_name().expect("an id").to_string_lossy();

    // Its claim, seen by a client of etcd's own; every change under the prefix from then on
    // is watched.
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let mut client = runtime
        .block_on(Client::connect(etcd.endpoints(), None))
        .expect("an etcd client");
    let claims = format!("{prefix}/claims/");
    let mut claim = None;
    assert!(eventually(|| {
        let got = runtime
            .block_on(client.get(claims.as_str(), Some(GetOptions::new().with_prefix())))
            .expect("get the claims");
        claim = (got.kvs().first()).map(|kv| {
            (
                kv.key().to_vec(),
                kv.lease(),
                got.header().map_or(0, |h| h.revision()),
            )
        });
        claim.is_some()
    }));
    let (claim_key, lease, revision) = claim.expect("a claim");
    let events: Arc<Mutex<Vec<(EventType, String)>>> = Arc::default();
    let mut stream = runtime
        .block_on(
            client.watch(
                format!("{prefix}/"),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .expect("a watch");
    let seen = events.clone();
    runtime.spawn(async move {
        while let Ok(Some(response)) = stream.message().await {
            let mut seen = seen.lock().expect("events");
            for event in response.events() {
                let key = event
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.key()).into_owned());
                seen.push((event.event_type(), key.unwrap_or_default()));
            }
        }
    });

    // Meanwhile the other node is asked for the name again and again, and looked at.
    let done = Arc::new(AtomicBool::new(false));
    let asking = std::thread::scope(|scope| {
        let asker = scope.spawn(|| {
            let socket = query_socket();
            let (mut answers, mut copies, mut id) = (Vec::new(), 0, 100u16);
            while !done.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                answers.push(ask(&socket, other.dns, name, id));
                copies += usize::from(runs_hello(other));
                std::thread::sleep(Duration::from_millis(50));
            }
            (answers, copies)
        });
        let upgraded = owner.cli(&["--json", "upgrade"]);
        assert!(
            upgraded.status.success(),
            "{}",
            String::from_utf8_lossy(&upgraded.stderr)
        );
        assert!(eventually(|| owner
            .log()
            .contains("kept the lease the previous program handed over")));
        // Longer than the lease's TTL: had the new program not kept it alive, it would have
        // expired by now.
        std::thread::sleep(Duration::from_secs(TTL_S + 1));
        done.store(true, Ordering::Relaxed);
        asker.join().expect("the asking thread")
    });
    let (answers, copies) = asking;

    // The lease is alive, the claim is still under it, and neither the claim nor the node's
    // record ever left etcd.
    let alive = runtime
        .block_on(client.lease_time_to_live(lease, None))
        .expect("the lease");
    assert!(alive.ttl() > 0, "the lease expired");
    let now = runtime
        .block_on(client.get(claim_key.clone(), None))
        .expect("the claim");
    assert_eq!(now.kvs().first().map(|kv| kv.lease()), Some(lease));
    let node_key = format!("{prefix}/nodes/{owner_id}");
    let claim_key = String::from_utf8_lossy(&claim_key).into_owned();
    let events = events.lock().expect("events").clone();
    let deleted: Vec<&(EventType, String)> = (events.iter())
        .filter(|(kind, key)| *kind == EventType::Delete && (*key == claim_key || *key == node_key))
        .collect();
    assert!(deleted.is_empty(), "{deleted:?} of {events:?}");
    // The watch saw the new program write the node's record again, under the same lease.
    assert!(
        events.contains(&(EventType::Put, node_key.clone())),
        "{events:?}"
    );

    // The other node answered the owner's address whenever it answered, and never ran hello.
    assert!(answers.iter().any(Option::is_some), "{answers:?}");
    assert!(
        answers
            .iter()
            .flatten()
            .all(|answer| Some(*answer) == address),
        "{answers:?}"
    );
    assert_eq!(copies, 0);
    assert!(!runs_hello(other));
    assert!(runs_hello(owner));
}
