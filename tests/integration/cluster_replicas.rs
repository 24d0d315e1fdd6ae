//! Replicas of a warm service (`[run] min_instances = 3`) in a cluster: they run on one
//! node, each claimed in etcd under a key of its own, every node's DNS answers their one
//! shared address, and the other nodes boot none.

use std::collections::BTreeSet;

use etcd_client::{Client, GetOptions};

use crate::cluster::{ask, query_socket, rev_parse, two_nodes};
use crate::support::{Daemon, curl, eventually, git, hello_source, push, write_manifest};

/// The replica indexes of hello that run on `daemon`.
fn replicas(daemon: &Daemon) -> BTreeSet<u64> {
    (daemon.instances().iter())
        .filter(|i| i["service"] == "hello" && i["state"] != "stopped")
        .map(|i| i["replica"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn the_replicas_of_a_warm_service_run_on_one_node_each_claimed_and_every_node_answers_their_address()
 {
    let temp = tempfile::tempdir().expect("temp dir");
    let (etcd, prefix, nodes) = two_nodes(temp.path(), "replicas");
    let work = hello_source(temp.path());
    write_manifest(&work, "min_instances = 3\n");
    git(&work, &["commit", "-q", "-am", "hello, three replicas"]);
    push(&nodes[0], &work);
    for daemon in &nodes {
        assert!(eventually(
            || !rev_parse(daemon, "refs/live/hello").is_empty()
        ));
    }

    // Each replica is claimed by one node: the first under the revision's key, the others
    // under `<key>#<n>`. (The node that built may boot them for its promotion while the
    // hash's owner boots them too: the claims decide, and the other stops its copies.)
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let mut client = runtime
        .block_on(Client::connect(etcd.endpoints(), None))
        .expect("an etcd client");
    let claims = format!("{prefix}/claims/");
    let mut held = Vec::new();
    assert!(eventually(|| {
        let got = runtime
            .block_on(client.get(claims.as_str(), Some(GetOptions::new().with_prefix())))
            .expect("get the claims");
        held = (got.kvs().iter())
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let value = String::from_utf8_lossy(kv.value()).into_owned();
                (key[claims.len()..].to_owned(), value)
            })
            .collect();
        held.len() == 3
    }));
    held.sort();
    let first = held[0].0.clone();
    let keys: Vec<String> = held.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(
        keys,
        [first.clone(), format!("{first}#1"), format!("{first}#2")]
    );
    let (owner, other) = match held[0].1.contains("\"n1\"") {
        true => (&nodes[0], &nodes[1]),
        false => (&nodes[1], &nodes[0]),
    };
    let owner_id = owner.data.file_name().expect("an id").to_string_lossy();
    for (key, value) in &held {
        assert!(value.contains(&format!("\"{owner_id}\"")), "{key}: {value}");
    }

    // The three replicas run on that node, and none on the other.
    let all: BTreeSet<u64> = [0, 1, 2].into();
    assert!(eventually(
        || replicas(owner) == all && replicas(other).is_empty()
    ));

    // Both nodes' DNS answer the replicas' one address, and it serves.
    let (name, socket) = ("hello.revboot.test", query_socket());
    let mut address = None;
    assert!(eventually(|| {
        address = ask(&socket, owner.dns, name, 1);
        address.is_some()
    }));
    assert!(eventually(|| ask(&socket, other.dns, name, 2) == address));
    let address = address.expect("an address").to_string();
    let body = curl(name, &address, 8080);
    assert!(body.starts_with("hello from"), "{body}");

    // The other node's keeper of warm services leaves them to their owner: it boots none
    // (it used to boot them again every second, and stop them again).
    let boots = || {
        (other.metrics().lines())
            .find_map(|line| line.strip_prefix("revboot_boots_total "))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .expect("the boots metric")
    };
    let before = boots();
    // A few of the keeper's rounds (one a second).
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(boots(), before);
    assert!(replicas(other).is_empty());
}
