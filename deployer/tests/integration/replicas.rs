//! Replicas of a revision (`[run] min_instances` above 1) with the real `examples/hello`:
//! one service address, their own sockets and processes, the address handed on.

use std::collections::HashSet;

use revboot_deployer::{Activity, BackendPort, InstanceState, Instances, SummonError};

use crate::support::{self, World, deploy, hello_image, http_get, manifest, source};

const THREE: &str =
    "port = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }\nmin_instances = 3";

/// Deploys hello asking for three replicas.
fn deploy_three(world: &World) -> revboot_store::Revision {
    deploy(
        &world.store,
        "hello",
        &hello_image(),
        &manifest("hello", THREE),
        &source(1),
    )
}

/// Deploys hello asking for three replicas, summons it and boots the other two: the
/// revision and the three summons, replica 0 first.
fn three_booted(world: &World) -> (revboot_store::Revision, Vec<revboot_deployer::Summoned>) {
    let revision = deploy_three(world);
    let first = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    let others = world
        .deployer
        .boot_replicas("hello", &revision)
        .expect("replicas booted");
    (revision, std::iter::once(first).chain(others).collect())
}

/// The `x-instance` hello answers with at `backend`.
async fn answered_by(backend: std::net::SocketAddr) -> String {
    let response = http_get(backend, "/").await.expect("answer");
    response
        .lines()
        .find_map(|line| line.strip_prefix("x-instance: "))
        .unwrap_or_else(|| panic!("no x-instance: {response}"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_address_which_outlives_the_first_and_goes_back_with_the_last() {
    let world = World::new(47, |config| config.backend_port = BackendPort::Ephemeral);
    let (revision, all) = three_booted(&world);
    let first = all[0].clone();
    let replicas: Vec<u16> = all.iter().map(|s| s.key.replica).collect();
    assert_eq!(replicas, [0, 1, 2]);
    let address = first.addresses.primary();
    let mut ids = HashSet::new();
    for summoned in &all {
        assert_eq!(summoned.addresses.primary(), address, "{:?}", summoned.key);
        support::wait_state(&mut summoned.state.clone(), InstanceState::is_serving).await;
        ids.insert(answered_by(support::backend_of(summoned)).await);
    }
    assert_eq!(ids.len(), 3, "three processes answer: {ids:?}");
    assert_eq!(world.deployer.list().len(), 3);

    // The proxy's look-up gives the replica with the fewest open connections.
    for _ in 0..2 {
        world
            .deployer
            .activity(&first.key, Activity::ConnectionOpened);
    }
    for _ in 0..6 {
        let picked = world.deployer.by_address(address).expect("known address");
        assert_ne!(picked.key, first.key, "the busy replica was picked");
    }
    for _ in 0..2 {
        world
            .deployer
            .activity(&first.key, Activity::ConnectionClosed);
    }
    let picked: HashSet<u16> = (0..6)
        .map(|_| {
            world
                .deployer
                .by_address(address)
                .expect("known address")
                .key
                .replica
        })
        .collect();
    assert_eq!(picked.len(), 3, "equals are taken in turn: {picked:?}");

    // The first ends: the others keep the address, and serve on it.
    let mut ended = world.deployer.kill(&first.key).expect("running");
    support::wait_state(&mut ended, InstanceState::is_final).await;
    assert!(
        support::eventually(|| world.deployer.list().len() == 2).await,
        "{:?}",
        world.deployer.list()
    );
    let picked = world.deployer.by_address(address).expect("still served");
    assert_ne!(picked.key.replica, 0);
    assert!(picked.state.borrow().is_serving());
    let summoned = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    assert_ne!(
        summoned.key.replica, 0,
        "a running replica serves the summon"
    );
    assert_eq!(summoned.addresses.primary(), address);

    // The last ends: the address is free.
    for summoned in &all[1..] {
        let mut ended = world.deployer.kill(&summoned.key).expect("running");
        support::wait_state(&mut ended, InstanceState::is_final).await;
    }
    assert!(
        support::eventually(|| world.deployer.by_address(address).is_none()).await,
        "the address is still taken"
    );
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_the_caps_cannot_hold_are_refused_and_none_boots() {
    let world = World::new(48, |config| {
        config.backend_port = BackendPort::Ephemeral;
        config.max_per_service = 2;
    });
    let revision = deploy_three(&world);
    let refused = world.deployer.boot_replicas("hello", &revision);
    let Err(error) = refused else {
        panic!("booted: {refused:?}");
    };
    assert!(
        matches!(
            error,
            SummonError::Replicas {
                replicas: 3,
                limit: 2,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("max_per_service"), "{error}");
    assert!(world.deployer.list().is_empty());
    world.deployer.shutdown().await;
}

/// The `steered` count of each replica, by index, of those listed.
fn steered_by_replica(world: &World) -> Vec<(u16, Option<u64>)> {
    let mut steered: Vec<_> = world
        .deployer
        .list()
        .into_iter()
        .map(|info| (info.key.replica, info.steered))
        .collect();
    steered.sort();
    steered
}

/// A stand-in for the proxy on the service address and port: it answers what reaches it
/// with `x-instance: proxy`, so that a connection the kernel passes on is told apart.
async fn stand_in_proxy(front: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(front)
        .await
        .expect("bind the proxy's address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let answer = "HTTP/1.1 200 OK\r\nx-instance: proxy\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    })
}

/// Who answers `count` requests to `front`, each on a new connection, and how often.
async fn answers(
    front: std::net::SocketAddr,
    count: usize,
) -> std::collections::HashMap<String, usize> {
    let mut answers = std::collections::HashMap::new();
    for _ in 0..count {
        *answers.entry(answered_by(front).await).or_default() += 1;
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_steered_each_to_its_own_socket_and_one_that_ends_passes_its_share_on() {
    let world = World::new(57, |config| config.backend_port = BackendPort::Ephemeral);
    let (revision, all) = three_booted(&world);
    let first = all[0].clone();
    let mut ids = Vec::new();
    for summoned in &all {
        support::wait_state(&mut summoned.state.clone(), InstanceState::is_serving).await;
        ids.push(answered_by(support::backend_of(summoned)).await);
    }
    assert!(
        support::eventually(|| steered_by_replica(&world).iter().all(|r| r.1.is_some())).await,
        "not all steered: {:?}",
        steered_by_replica(&world)
    );
    let front = std::net::SocketAddr::new(first.addresses.primary(), first.port);
    let proxy = stand_in_proxy(front).await;

    // Every connection to the shared address goes to a replica's own socket, spread over
    // more than one; none reaches the proxy; each replica counts its own.
    let answered = answers(front, 30).await;
    assert!(!answered.contains_key("proxy"), "{answered:?}");
    assert!(answered.len() > 1, "{answered:?}");
    let steered = steered_by_replica(&world);
    for (replica, id) in ids.iter().enumerate() {
        let got = answered.get(id).copied().unwrap_or(0) as u64;
        assert_eq!(steered[replica], (replica as u16, Some(got)), "{steered:?}");
    }

    // kill -9 of replica 1: every connection is still served, by the others or (its
    // socket gone before its slot) by the proxy.
    let replica = |index: u16| {
        let list = world.deployer.list();
        list.into_iter().find(|info| info.key.replica == index)
    };
    let pid = replica(1).and_then(|info| info.pid).expect("a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    // Its files closed (a zombie, or reaped): connections queued on its socket before
    // that would be reset with it, as for any instance killed.
    assert!(
        support::eventually(
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| stat
                .rsplit(") ")
                .next()
                .is_some_and(|s| s.starts_with('Z')))
        )
        .await,
        "process {pid} did not end"
    );
    let answered = answers(front, 20).await;
    assert!(!answered.contains_key(&ids[1]), "{answered:?}");
    support::wait_state(&mut all[1].state.clone(), InstanceState::is_final).await;

    // Booted again, it is steered again, in its slot.
    world
        .deployer
        .boot_replicas("hello", &revision)
        .expect("replica 1 booted again");
    assert!(
        support::eventually(|| {
            let steered = steered_by_replica(&world);
            steered.len() == 3 && steered.iter().all(|r| r.1.is_some())
        })
        .await,
        "{:?}",
        world.deployer.list()
    );
    assert_ne!(replica(1).expect("replica 1").pid, Some(pid));
    let answered = answers(front, 60).await;
    assert!(!answered.contains_key("proxy"), "{answered:?}");
    assert_eq!(answered.len(), 3, "{answered:?}");
    proxy.abort();
    world.deployer.shutdown().await;
}
