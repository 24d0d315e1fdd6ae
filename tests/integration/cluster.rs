//! Three revboot nodes on one 3-member etcd (`[cluster]`), each on loopback addresses of its
//! own: membership, deployments replicated by git, one live pointer by compare-and-swap,
//! and what etcd losing its quorum does to live moves.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

use revboot_cluster::placement::{self, Candidate};
use revboot_testkit::etcd::EtcdCluster;
use revboot_testkit::netns::Netns;

use crate::support::{
    Daemon, Setup, commit_revision, curl, eventually, example_source, git, hello_source, history,
    push, request, write_manifest,
};

/// Starts node `id` of the cluster on `etcd`, its data in `dir`: a membership lease of
/// 2 s, instances never reaped during a test, boots not rate-limited.
pub(super) fn node(dir: &Path, etcd: &EtcdCluster, id: &str, prefix: &str) -> Daemon {
    node_via(dir, &etcd.toml_endpoints(), id, prefix)
}

/// As [`node`], with more keys of `[cluster]` (lines of TOML).
pub(super) fn node_with(
    dir: &Path,
    etcd: &EtcdCluster,
    id: &str,
    prefix: &str,
    cluster: &str,
) -> Daemon {
    node_configured(dir, &etcd.toml_endpoints(), id, prefix, cluster)
}

/// As [`node`], reaching etcd at `endpoints` (TOML list).
fn node_via(dir: &Path, endpoints: &str, id: &str, prefix: &str) -> Daemon {
    node_configured(dir, endpoints, id, prefix, "")
}

fn node_configured(dir: &Path, endpoints: &str, id: &str, prefix: &str, more: &str) -> Daemon {
    let config = format!(
        "[dns]\nboots_per_second = 10000\nboot_burst = 10000\n\
         [instances]\nidle_timeout_ms = 600000\n\
         [cluster]\netcd = {endpoints}\nnode = \"{id}\"\nttl_s = 2\nprefix = \"{prefix}\"\n{more}"
    );
    Daemon::start_setup(
        &dir.join(id),
        &Setup {
            config: &config,
            ..Setup::default()
        },
    )
}

/// A 1-member etcd in `dir` and nodes n1 and n2 on it (as [`node`], under a prefix named
/// after `test`), once each sees both.
pub(super) fn two_nodes(dir: &Path, test: &str) -> (EtcdCluster, String, [Daemon; 2]) {
    let etcd = EtcdCluster::start(1, dir);
    let prefix = format!("/revboot-e2e-{test}-{}", std::process::id());
    let nodes = [
        node(dir, &etcd, "n1", &prefix),
        node(dir, &etcd, "n2", &prefix),
    ];
    for daemon in &nodes {
        assert!(eventually(|| node_ids(daemon).len() == 2));
    }
    (etcd, prefix, nodes)
}

/// The node ids `GET /api/v1/nodes` of `daemon` lists.
pub(super) fn node_ids(daemon: &Daemon) -> Vec<String> {
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
pub(super) fn rev_parse(daemon: &Daemon, reference: &str) -> String {
    rev_parse_in(&daemon.data.join("deploy.git"), reference)
}

/// `git rev-parse` of a ref in a repository (empty when absent).
pub(super) fn rev_parse_in(repo: &Path, reference: &str) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(repo)
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
    // The winner once every node agrees: node 1 follows the others' move by etcd's watch,
    // and may not have yet when the rollbacks return.
    assert!(eventually(|| nodes.iter().all(|d| rev_parse(
        d,
        "refs/live/hello"
    ) == rev_parse(
        &nodes[0],
        "refs/live/hello"
    ))));
    let winner = rev_parse(&nodes[0], "refs/live/hello");
    assert!(winner == v1 || winner == v2 || winner == v3);

    // A push of refs/live/hello with stock git to node 2 is a live move like any other:
    // through etcd, followed by every node.
    let target = if winner == v1 { &v2 } else { &v1 };
    let deploy = format!(
        "http://git:{}@{}/git/-/deploy.git",
        nodes[1].token, nodes[1].http
    );
    git(
        temp.path(),
        &["clone", "-q", "--bare", &deploy, "deploy-clone"],
    );
    git(
        &temp.path().join("deploy-clone"),
        &["push", "-q", &deploy, &format!("+{target}:refs/live/hello")],
    );
    for daemon in &nodes {
        assert!(eventually(
            || rev_parse(daemon, "refs/live/hello") == *target
        ));
    }
    let reflog = git(
        &nodes[0].data.join("deploy.git"),
        &["reflog", "show", "refs/live/hello"],
    );
    let reflog = String::from_utf8_lossy(&reflog.stdout).into_owned();
    assert!(
        reflog.contains("push to refs/live with git (node n2)"),
        "{reflog}"
    );

    // etcd with 2 of 3 members: live moves work.
    etcd.kill(2);
    let moved = nodes[0].cli(&["rollback", "hello", &v3[..7]]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    for daemon in &nodes {
        assert!(eventually(|| rev_parse(daemon, "refs/live/hello") == v3));
    }
    // 1 of 3: refused with a clear error, nothing moves.
    etcd.kill(1);
    let refused = nodes[0].cli(&["rollback", "hello", &v1[..7]]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("etcd did not answer"), "{stderr}");
    assert_eq!(rev_parse(&nodes[0], "refs/live/hello"), v3);
    // Every node knows it is cut off; the live name's owner still answers it and serves it,
    // the others answer SERVFAIL (dig +short prints nothing) rather than a stale placement.
    for daemon in &nodes {
        assert!(eventually(|| !connected(daemon)));
    }
    let answers: Vec<String> = nodes
        .iter()
        .map(|d| d.dig("hello.revboot.test", false))
        .collect();
    let given: Vec<&String> = answers.iter().filter(|a| !a.is_empty()).collect();
    assert_eq!(given.len(), 1, "{answers:?}");
    let body = curl("hello.revboot.test", given[0], 8080);
    assert!(body.starts_with("hello from v3"), "{body}");
}

/// Whether `daemon` says it is connected to etcd (`GET /api/v1/nodes`).
fn connected(daemon: &Daemon) -> bool {
    let (status, body) = request(daemon, "GET", "/api/v1/nodes", None, true);
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    view["connected"].as_bool().expect("connected")
}

/// One A query of `name` over UDP from `socket` to `server`: the address answered, if any
/// (none for SERVFAIL, NXDOMAIN or no answer within the socket's timeout).
pub(super) fn ask(socket: &UdpSocket, server: SocketAddr, name: &str, id: u16) -> Option<IpAddr> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    socket
        .send_to(&message.to_vec().expect("encodes"), server)
        .ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let (len, _) = socket.recv_from(&mut buf).ok()?;
        let reply = Message::from_vec(&buf[..len]).ok()?;
        if reply.metadata.id == id {
            return reply
                .answers
                .iter()
                .find_map(|record| record.data.ip_addr());
        }
    }
}

/// A UDP socket for [`ask`], its reads bounded.
pub(super) fn query_socket() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a client socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    socket
}

/// The DNS names of `revisions` of hello.
fn names_of(revisions: &[String]) -> Vec<String> {
    revisions
        .iter()
        .map(|revision| format!("{}.hello.revboot.test", &revision[..12]))
        .collect()
}

/// How many of `nodes` run an instance of `revision`.
fn running_on(nodes: &[Option<Daemon>], revision: &str) -> usize {
    nodes
        .iter()
        .flatten()
        .filter(|daemon| {
            daemon
                .instances()
                .iter()
                .any(|instance| instance["revision"] == revision && instance["state"] != "stopped")
        })
        .count()
}

/// The node whose pool holds `address`.
fn owner_of(nodes: &[Option<Daemon>], address: IpAddr) -> &Daemon {
    nodes
        .iter()
        .flatten()
        .find(|daemon| {
            let prefix = daemon.pool.trim_end_matches("0/24");
            address.to_string().starts_with(prefix)
        })
        .unwrap_or_else(|| panic!("{address} is in no node's pool"))
}

/// Waits (bounded) until every node in `nodes` answers `name` with one and the same
/// address, other than `not`; that address.
fn agreed(nodes: &[Option<Daemon>], socket: &UdpSocket, name: &str, not: Option<IpAddr>) -> IpAddr {
    let mut answer = None;
    let mut id = 0u16;
    let found = eventually(|| {
        let answers: Vec<Option<IpAddr>> = nodes
            .iter()
            .flatten()
            .map(|daemon| {
                id = id.wrapping_add(1);
                ask(socket, daemon.dns, name, id)
            })
            .collect();
        answer = answers[0];
        answer.is_some() && answer != not && answers.iter().all(|a| *a == answer)
    });
    assert!(found, "the nodes do not agree on {name}");
    answer.expect("an address")
}

/// Deployments `2..=count` of hello, written with stock git onto node `daemon`'s branch as
/// a CI would push them: each the first deployment's tree (its image) with a subject of its
/// own, so that a test has many revisions without as many builds.
fn more_deployments(dir: &Path, daemon: &Daemon, count: usize) {
    let deploy = format!(
        "http://git:{}@{}/git/-/deploy.git",
        daemon.token, daemon.http
    );
    // Where the daemon runs (its network namespace, if it has one).
    let git_there = |dir: &Path, args: &[&str]| {
        crate::support::run(
            daemon
                .command("git")
                .args(["-c", "user.name=e2e", "-c", "user.email=e2e@revboot.test"])
                .args(args)
                .current_dir(dir),
        )
    };
    git_there(dir, &["clone", "-q", "--bare", &deploy, "ci-deploy"]);
    let repo = dir.join("ci-deploy");
    let out = |args: &[&str]| {
        String::from_utf8_lossy(&git(&repo, args).stdout)
            .trim()
            .to_owned()
    };
    let mut parent = out(&["rev-parse", "refs/heads/hello"]);
    let tree = out(&["rev-parse", &format!("{parent}^{{tree}}")]);
    let message = out(&["log", "-1", "--format=%B", &parent]);
    let body = message.split_once("\n").map_or("", |(_, body)| body);
    for n in 2..=count {
        let text = format!("hello, deployment {n} of the same image\n{body}");
        parent = out(&["commit-tree", &tree, "-p", &parent, "-m", &text]);
    }
    git_there(
        &repo,
        &["push", "-q", &deploy, &format!("{parent}:refs/heads/hello")],
    );
}

/// The zone's NS set as `daemon` answers it (names, sorted), and the address each name
/// server's name answers.
fn ns_set(daemon: &Daemon) -> Vec<(String, String)> {
    let names = daemon
        .command("dig")
        .arg(format!("@{}", daemon.dns.ip()))
        .args(["-p", &daemon.dns.port().to_string()])
        .args(["+short", "+time=5", "+tries=1", "revboot.test", "NS"])
        .output()
        .expect("run dig");
    let mut names: Vec<String> = String::from_utf8_lossy(&names.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let address = daemon.dig(&name, false);
            (name, address)
        })
        .collect()
}

/// Whether every node in `nodes` answers the NS set of exactly `ids`, each at its glue.
fn ns_lists(nodes: &[Option<Daemon>], ids: &[&str]) -> bool {
    let expected: Vec<(String, String)> = ids
        .iter()
        .map(|id| (format!("{id}.ns.revboot.test."), "127.0.0.1".to_owned()))
        .collect();
    nodes
        .iter()
        .flatten()
        .all(|daemon| ns_set(daemon) == expected)
}

#[test]
fn every_node_answers_where_an_instance_is_placed_and_a_killed_node_s_names_move() {
    let temp = tempfile::tempdir().expect("temp dir");
    let etcd = EtcdCluster::start(3, temp.path());
    let prefix = format!("/revboot-e2e-placement-{}", std::process::id());
    let mut nodes: Vec<Option<Daemon>> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| Some(node(temp.path(), &etcd, id, &prefix)))
        .collect();
    for daemon in nodes.iter().flatten() {
        assert!(eventually(|| node_ids(daemon).len() == 3));
    }
    // Every node is a name server of the zone: each answers the three, with their glue,
    // though no `[dns] nameservers` is written.
    assert!(eventually(|| ns_lists(&nodes, &["n1", "n2", "n3"])));

    // 50 revisions on node 1 (one build, 49 deployments pushed with git); every node
    // fetches them.
    let work = hello_source(temp.path());
    push(nodes[0].as_ref().expect("n1"), &work);
    more_deployments(temp.path(), nodes[0].as_ref().expect("n1"), 50);
    let all = revisions(nodes[0].as_ref().expect("n1"));
    assert_eq!(all.len(), 50, "{all:?}");
    for daemon in nodes.iter().flatten() {
        assert!(eventually(
            || rev_parse(daemon, "refs/heads/hello") == all[0]
        ));
    }

    // Every node answers each revision's name with the same address, in its owner's
    // pool, where the revision answers.
    let socket = query_socket();
    let names = names_of(&all);
    let answers: Vec<IpAddr> = names
        .iter()
        .map(|name| agreed(&nodes, &socket, name, None))
        .collect();
    for (name, address) in names.iter().zip(&answers) {
        owner_of(&nodes, *address);
        let body = curl(name, &address.to_string(), 8080);
        assert!(body.starts_with("hello from"), "{name}: {body}");
    }

    // 10,000 queries spread over the nodes: the same answer every time.
    let live: Vec<&Daemon> = nodes.iter().flatten().collect();
    for i in 0..10_000usize {
        let (k, daemon) = (i % names.len(), live[i % live.len()]);
        let id = u16::try_from(i % 60_000).expect("fits");
        let mut answer = ask(&socket, daemon.dns, &names[k], id);
        if answer.is_none() {
            // A lost datagram or a kept answer being renewed: asked again.
            answer = ask(&socket, daemon.dns, &names[k], id.wrapping_add(1));
        }
        assert_eq!(
            answer,
            Some(answers[k]),
            "query {i}: {} at {}",
            names[k],
            daemon.dns
        );
    }

    // A fourth node joins: it is a name server too, and no instance moves (each runs under
    // its node's claim), though the hash alone would give the new node a share.
    nodes.push(Some(node(temp.path(), &etcd, "n4", &prefix)));
    for daemon in nodes.iter().flatten() {
        assert!(eventually(|| node_ids(daemon).len() == 4));
        assert!(eventually(
            || rev_parse(daemon, "refs/heads/hello") == all[0]
        ));
    }
    assert!(eventually(|| ns_lists(&nodes, &["n1", "n2", "n3", "n4"])));
    for (name, address) in names.iter().zip(&answers) {
        assert_eq!(agreed(&nodes, &socket, name, None), *address, "{name}");
    }
    let hashed_to_n4 = (all.iter())
        .filter(|r| owner(&["n1", "n2", "n3", "n4"], r) == "n4")
        .count();
    assert!(hashed_to_n4 > 0, "the hash gives n4 none of 50");
    let listed: Vec<Vec<serde_json::Value>> =
        nodes.iter().flatten().map(Daemon::instances).collect();
    for revision in &all {
        let running = listed.iter().filter(|instances| {
            instances
                .iter()
                .any(|i| i["revision"] == revision.as_str() && i["state"] != "stopped")
        });
        assert_eq!(running.count(), 1, "{revision}");
    }

    // Per-client instances are placed too: each client of a per-client service gets one
    // instance on one node, every node answers that client alike, and the client is served.
    let solo = example_source(&temp.path().join("solo"), "hello");
    write_manifest(&solo, "per_client = true\n");
    commit_revision(&solo, "solo", "solo");
    crate::support::push_service(nodes[1].as_ref().expect("n2"), &solo, "solo");
    for daemon in nodes.iter().flatten() {
        assert!(eventually(
            || !rev_parse(daemon, "refs/live/solo").is_empty()
        ));
    }
    for client in CLIENTS {
        let from = UdpSocket::bind((client, 0)).expect("a client socket");
        from.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let address = agreed(&nodes, &from, "solo.revboot.test", None);
        let body = get_from(client, "solo.revboot.test", &address.to_string());
        assert!(body.starts_with("solo from solo"), "{client}: {body}");
        let running: Vec<&Daemon> = nodes
            .iter()
            .flatten()
            .filter(|daemon| {
                daemon.instances().iter().any(|i| {
                    i["service"] == "solo" && i["client"] == client && i["state"] != "stopped"
                })
            })
            .collect();
        assert_eq!(running.len(), 1, "{client}");
        assert_eq!(running[0].data, owner_of(&nodes, address).data, "{client}");
    }

    // kill -9 the owner of the first name: the survivors agree on a new owner within the
    // lease's TTL (waited for, bounded), and the name answers there.
    let four = ["n1", "n2", "n3", "n4"];
    let victim = owner_of(&nodes, answers[0]).data.clone();
    let slot = nodes
        .iter()
        .position(|d| d.as_ref().is_some_and(|d| d.data == victim))
        .expect("the owner");
    let killed = nodes[slot].take().expect("running");
    drop(killed.kill());
    let moved = agreed(&nodes, &socket, &names[0], Some(answers[0]));
    owner_of(&nodes, moved);
    let body = curl(&names[0], &moved.to_string(), 8080);
    assert!(body.starts_with("hello from"), "{body}");
    // It is no name server of the zone any more.
    let left: Vec<&str> = four
        .iter()
        .copied()
        .filter(|id| *id != four[slot])
        .collect();
    assert!(eventually(|| ns_lists(&nodes, &left)));

    // A new revision pushed to a survivor meanwhile; the killed node restarts, rejoins and
    // catches up by git.
    commit_revision(&work, "v7", "hello");
    let survivor = nodes.iter().flatten().next().expect("a survivor");
    crate::support::push_service(survivor, &work, "hello");
    let tip = rev_parse(survivor, "refs/heads/hello");
    let id = four[slot];
    let back = node(temp.path(), &etcd, id, &prefix);
    assert!(eventually(|| rev_parse(&back, "refs/heads/hello") == tip));
    assert!(eventually(|| node_ids(&back).len() == 4));

    // Back in the cluster, it does not take its names back: the node that stood in runs
    // the instance under its claim, every node answers its address, and one node runs it.
    nodes[slot] = Some(back);
    assert_eq!(agreed(&nodes, &socket, &names[0], None), moved);
    assert!(eventually(|| running_on(&nodes, &all[0]) == 1));
}

/// Clients of a per-client service: each loopback address is a client of its own.
const CLIENTS: [&str; 3] = ["127.0.0.61", "127.0.0.62", "127.0.0.63"];

/// GET / of `name` at `address` from `source`; the body.
fn get_from(source: &str, name: &str, address: &str) -> String {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--interface", source])
        .args(["--resolve", &format!("{name}:8080:{address}")])
        .arg(format!("http://{name}:8080/"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The owner of `revision`'s instance among `ids`, as every node computes it (the nodes'
/// capacity is the default `max_total`).
fn owner(ids: &[&str], revision: &str) -> String {
    let revision: revboot_store::Revision = revision.parse().expect("a revision");
    owner_of_key(
        ids,
        &revboot::placed::placement_key("hello", &revision, None),
    )
}

/// The owner of placement key `key` among `ids` by the hash.
fn owner_of_key(ids: &[&str], key: &str) -> String {
    let candidates: Vec<Candidate<'_>> = ids
        .iter()
        .map(|id| Candidate { id, capacity: 256 })
        .collect();
    placement::owner(&candidates, key)
        .expect("an owner")
        .to_owned()
}

/// The partition's network, two network namespaces the test makes: the hub holds etcd's
/// three members and nodes n1 and n2, the isle holds the third node; a veth pair joins them,
/// documentation-prefix addresses on both ends. Setting the isle's end down cuts the third
/// node off from etcd and from the other nodes; setting it up heals.
struct Partition {
    hub: Netns,
    isle: Netns,
}

/// etcd's members, in the hub.
const ETCD_IPS: [&str; 3] = ["192.0.2.21", "192.0.2.22", "192.0.2.23"];
/// The nodes' addresses (HTTP on 8080, DNS on 53): two in the hub, the third on the isle.
const NODE_IPS: [&str; 3] = ["192.0.2.11", "192.0.2.12", "192.0.2.13"];
/// Clients of a per-client service, in the hub.
const HUB_CLIENTS: [&str; 8] = [
    "192.0.2.61",
    "192.0.2.62",
    "192.0.2.63",
    "192.0.2.64",
    "192.0.2.65",
    "192.0.2.66",
    "192.0.2.67",
    "192.0.2.68",
];

impl Partition {
    fn new() -> Partition {
        let (hub, isle) = (Netns::new(), Netns::new());
        hub.veth("rb-hub", &isle, "rb-isle");
        for ip in ETCD_IPS.iter().chain(&NODE_IPS[..2]).chain(&HUB_CLIENTS) {
            hub.add_address("rb-hub", &format!("{ip}/24"));
        }
        isle.add_address("rb-isle", &format!("{}/24", NODE_IPS[2]));
        Partition { hub, isle }
    }

    /// Node `n` (0, 1: hub; 2: isle) with id `id`.
    fn node(&self, dir: &Path, etcd: &EtcdCluster, n: usize, id: &str, prefix: &str) -> Daemon {
        let config = format!(
            "[dns]\nboots_per_second = 10000\nboot_burst = 10000\n\
             [instances]\nidle_timeout_ms = 600000\n\
             [cluster]\netcd = {}\nnode = \"{id}\"\nttl_s = 2\nprefix = \"{prefix}\"\n",
            etcd.toml_endpoints()
        );
        let ip: IpAddr = NODE_IPS[n].parse().expect("an address");
        Daemon::start_setup(
            &dir.join(id),
            &Setup {
                config: &config,
                netns: Some(if n < 2 { &self.hub } else { &self.isle }),
                dns: Some(SocketAddr::new(ip, 53)),
                http: Some(SocketAddr::new(ip, 8080)),
                ..Setup::default()
            },
        )
    }

    /// The isle's end of the veth pair down (`false`) or up (`true`).
    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        self.isle.ip(&["link", "set", "rb-isle", state]);
    }
}

/// `dig` of `name` at `server`'s DNS, run where `from` runs, from `source` if given: the
/// whole output (status and answer).
fn dig_at(from: &Daemon, server: &Daemon, name: &str, source: Option<&str>) -> String {
    let mut command = from.command("dig");
    command
        .arg(format!("@{}", server.dns.ip()))
        .args(["-p", &server.dns.port().to_string()]);
    if let Some(source) = source {
        command.args(["-b", source]);
    }
    let output = command
        .args(["+time=3", "+tries=1", name, "A"])
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The address in a `dig` answer.
fn answered(output: &str) -> Option<IpAddr> {
    output
        .lines()
        .filter(|line| !line.starts_with(';'))
        .find_map(|line| line.split_whitespace().last()?.parse().ok())
}

/// Waits (bounded) until every node in `nodes`, asked from the hub (`nodes[0]`), answers
/// `name` (from `source`) with one and the same address, other than `not`; that address.
fn agreed_in(nodes: &[&Daemon], name: &str, source: Option<&str>, not: Option<IpAddr>) -> IpAddr {
    let mut answer = None;
    let found = eventually(|| {
        let answers: Vec<Option<IpAddr>> = nodes
            .iter()
            .map(|daemon| answered(&dig_at(nodes[0], daemon, name, source)))
            .collect();
        answer = answers[0];
        answer.is_some() && answer != not && answers.iter().all(|a| *a == answer)
    });
    assert!(found, "the nodes do not agree on {name}");
    answer.expect("an address")
}

/// The node of `nodes` whose pool holds `address`.
fn pool_of<'a>(nodes: &[&'a Daemon], address: IpAddr) -> &'a Daemon {
    nodes
        .iter()
        .find(|daemon| {
            address
                .to_string()
                .starts_with(daemon.pool.trim_end_matches("0/24"))
        })
        .unwrap_or_else(|| panic!("{address} is in no node's pool"))
}

/// How many of `nodes` run an instance of `service` (for `client`, when given).
fn running(nodes: &[&Daemon], service: &str, client: Option<&str>) -> usize {
    nodes
        .iter()
        .filter(|daemon| {
            daemon.instances().iter().any(|i| {
                i["service"] == service
                    && i["state"] != "stopped"
                    && client.is_none_or(|client| i["client"] == client)
            })
        })
        .count()
}

#[test]
fn a_node_cut_off_by_its_link_answers_only_its_own_names_and_no_instance_runs_twice_after() {
    let temp = tempfile::tempdir().expect("temp dir");
    let net = Partition::new();
    let etcd = EtcdCluster::start_in(&net.hub.path(), &ETCD_IPS, temp.path());
    let prefix = format!("/revboot-e2e-partition-{}", std::process::id());
    let n1 = net.node(temp.path(), &etcd, 0, "n1", &prefix);
    let n2 = net.node(temp.path(), &etcd, 1, "n2", &prefix);
    let work = hello_source(temp.path());
    push(&n1, &work);
    more_deployments(temp.path(), &n1, 12);
    let all = revisions(&n1);
    // A per-client service too (the same image), pushed with git as a CI would.
    let solo = example_source(&temp.path().join("solo"), "hello");
    write_manifest(&solo, "per_client = true\n");
    commit_revision(&solo, "solo", "solo");
    crate::support::push_service(&n1, &solo, "solo");
    let solo_live = rev_parse(&n1, "refs/live/solo");
    // The third node's id is picked so that it owns, by the hash, the first revision's
    // instance and not the second's, and the instance of a client of solo (placement is a
    // pure function of ids and keys).
    let solo_key = |client: &str| {
        let revision: revboot_store::Revision = solo_live.parse().expect("a revision");
        revboot::placed::placement_key("solo", &revision, client.parse().ok())
    };
    let (third, client) = (3..)
        .map(|n| format!("n{n}"))
        .find_map(|id| {
            let ids = ["n1", "n2", id.as_str()];
            let mine = owner(&ids, &all[0]) == id && owner(&ids, &all[1]) != id;
            let client = HUB_CLIENTS
                .iter()
                .find(|c| owner_of_key(&ids, &solo_key(c)) == id)?;
            mine.then(|| (id.clone(), *client))
        })
        .expect("an id");
    let n3 = net.node(temp.path(), &etcd, 2, &third, &prefix);
    let nodes = [&n1, &n2, &n3];
    for daemon in nodes {
        assert!(eventually(|| node_ids(daemon).len() == 3));
        assert!(eventually(
            || rev_parse(daemon, "refs/heads/hello") == all[0]
        ));
        assert!(eventually(
            || rev_parse(daemon, "refs/live/solo") == solo_live
        ));
    }
    let names = names_of(&all[..2]);
    let own = agreed_in(&nodes, &names[0], None, None);
    let theirs = agreed_in(&nodes, &names[1], None, None);
    assert_eq!(pool_of(&nodes, own).data, n3.data);
    let solo_own = agreed_in(&nodes, "solo.revboot.test", Some(client), None);
    assert_eq!(pool_of(&nodes, solo_own).data, n3.data);

    // Cut off by its link: it knows it, answers its own name and SERVFAIL for the other
    // (asked on the isle); the two others drop it and answer its names from one of them.
    net.link(false);
    assert!(eventually(|| !connected(&n3)));
    assert_eq!(answered(&dig_at(&n3, &n3, &names[0], None)), Some(own));
    // Its kept answer of the other's name ends within a second of knowing.
    assert!(eventually(
        || dig_at(&n3, &n3, &names[1], None).contains("SERVFAIL")
    ));
    let pair = [&n1, &n2];
    for daemon in pair {
        assert!(eventually(|| node_ids(daemon).len() == 2));
    }
    let stand_in = agreed_in(&pair, &names[0], None, Some(own));
    assert_eq!(agreed_in(&pair, &names[1], None, None), theirs);
    let solo_stand_in = agreed_in(&pair, "solo.revboot.test", Some(client), Some(solo_own));

    // Healed: it registers again; the stand-ins keep the instances under their claims,
    // every node answers their addresses, and the node that was cut off stops its copies:
    // no instance runs on two nodes.
    net.link(true);
    for daemon in nodes {
        assert!(eventually(|| node_ids(daemon).len() == 3));
    }
    assert_eq!(agreed_in(&nodes, &names[0], None, None), stand_in);
    assert_eq!(
        agreed_in(&nodes, "solo.revboot.test", Some(client), None),
        solo_stand_in
    );
    assert!(eventually(|| running_on_all(&nodes, &all[0]) == 1));
    assert!(eventually(|| running(&nodes, "solo", Some(client)) == 1));
    for revision in &all[..2] {
        assert_eq!(running_on_all(&nodes, revision), 1, "{revision}");
    }
}

/// How many of `nodes` run an instance of hello's `revision`.
fn running_on_all(nodes: &[&Daemon], revision: &str) -> usize {
    nodes
        .iter()
        .filter(|daemon| {
            daemon
                .instances()
                .iter()
                .any(|i| i["revision"] == revision && i["state"] != "stopped")
        })
        .count()
}
