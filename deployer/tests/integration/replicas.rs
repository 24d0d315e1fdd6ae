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
    let revision = deploy_three(&world);
    let first = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    let others = world
        .deployer
        .boot_replicas("hello", &revision)
        .expect("replicas booted");
    let all: Vec<_> = std::iter::once(first.clone()).chain(others).collect();
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
