//! The kernel hand-off: once a process instance boots (its socket listens before it
//! starts), new connections to its service address reach its own socket without the
//! proxy's relay, and admission and reaping still hold.
//! Real deployer, real hello image, real loopback TCP; needs root (BPF).

use std::time::Duration;

use revboot_deployer::{InstanceState, Instances, Summoned};

use crate::support::{
    self, PATIENCE, World, connect, eventually, http_get, service_address, serving,
};

/// Waits until the instance is ready and its connections are steered.
async fn ready_and_steered(world: &World, summoned: &Summoned) {
    serving(summoned).await;
    steered(world, summoned).await;
}

/// Waits until the instance behind `summoned`, booting or ready, is steered.
async fn steered(world: &World, summoned: &Summoned) {
    assert!(
        world.deployer.steers(),
        "the sk_lookup program loads (root)"
    );
    eventually("the instance is steered", || {
        world
            .deployer
            .list()
            .iter()
            .any(|info| info.key == summoned.key && info.steered.is_some())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_connections_reach_the_instance_without_the_relay() {
    let world = World::new(11, |_, _| {});
    let (revision, summoned) = support::summon_hello(&world);
    ready_and_steered(&world, &summoned).await;
    let expected = format!("hello from v1 ({revision})");
    for n in 0..20 {
        let response = http_get(service_address(&summoned), None, &format!("/{n}"))
            .await
            .expect("served");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains(&expected), "{response}");
    }
    let relayed = world.proxy.metrics();
    assert_eq!(relayed.accepted, 0, "the proxy relayed: {relayed:?}");
    let info = world.deployer.list();
    assert_eq!(info[0].steered, Some(20), "{info:?}");
    let metrics = world.deployer.metrics();
    assert_eq!(
        (metrics.steered_connections, metrics.steered_instances),
        (20, 1)
    );

    // Stopped: the route goes with it, its count stays in the metrics.
    world.deployer.stop(&summoned.key).expect("stop");
    let mut state = summoned.state.clone();
    tokio::time::timeout(PATIENCE, state.wait_for(InstanceState::is_final))
        .await
        .expect("stopped in time")
        .expect("state");
    let metrics = world.deployer.metrics();
    assert_eq!(
        (metrics.steered_connections, metrics.steered_instances),
        (20, 0)
    );
    // Summoned again, the next connection is served by the new boot (held by the proxy, or
    // steered if the boot got that far first).
    let again = world
        .proxy
        .summon("hello", &revision, None)
        .expect("summon again");
    let response = http_get(service_address(&again), None, "/again")
        .await
        .expect("served after a new boot");
    assert!(response.contains(&expected), "{response}");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steered_per_client_instance_still_refuses_every_other_client() {
    let world = World::new(12, |_, _| {});
    assert!(
        world.deployer.steers(),
        "the sk_lookup program loads (root)"
    );
    support::bob_refused_alice_served(&world).await;
    // Bob went to the proxy, which refused him; alice went straight to her instance.
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.refused_admission, 1, "{metrics:?}");
    assert_eq!(metrics.spliced, 0, "{metrics:?}");
    assert_eq!(world.deployer.list()[0].steered, Some(1));
    world.shutdown().await;
}

/// A process instance's socket listens before its process starts, so connections made
/// during its boot wait in that socket's backlog: the kernel hands them over from the boot
/// on, and the proxy relays none of them (the gated image answers them while its boot, by
/// its readiness probe, has not ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_made_during_a_boot_reach_the_instance_without_the_relay() {
    let world = World::new(18, |_, _| {});
    let (revision, summoned) = support::summon_gated(&world);
    steered(&world, &summoned).await;
    for n in 0..20 {
        let response = http_get(service_address(&summoned), None, &format!("/{n}"))
            .await
            .expect("served");
        assert!(
            response.contains(&format!("gated /{n} ({revision})")),
            "{response}"
        );
    }
    assert_eq!(*summoned.state.borrow(), InstanceState::Booting);
    let relayed = world.proxy.metrics();
    assert_eq!(relayed.accepted, 0, "the proxy relayed: {relayed:?}");
    assert_eq!(world.deployer.list()[0].steered, Some(20));
    // Ready: the same route goes on.
    support::open_gate(&summoned).await;
    http_get(service_address(&summoned), None, "/ready")
        .await
        .expect("served");
    assert_eq!(world.deployer.list()[0].steered, Some(21));
    assert_eq!(world.proxy.metrics().accepted, 0);
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_quiet_steered_connection_keeps_its_instance_until_it_closes() {
    let idle = Duration::from_millis(300);
    let world = World::with_idle(13, idle);
    // Booting until the gate opens, so not reaped for idleness before the quiet connection
    // is in place, however slowly the machine gets there.
    let (_, summoned) = support::summon_gated(&world);
    steered(&world, &summoned).await;
    let quiet = connect(service_address(&summoned), None)
        .await
        .expect("connect");
    eventually("the quiet connection was steered", || {
        world.deployer.list()[0].steered == Some(1)
    })
    .await;
    support::open_gate(&summoned).await;
    // Not a byte from the quiet connection, no query either.
    let mut state = summoned.state.clone();
    support::still_serving_after_idle(&state, idle).await;
    assert_eq!(
        world.proxy.metrics().accepted,
        0,
        "nothing went through the proxy"
    );
    support::reaped_once_closed(&mut state, quiet).await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_steering_off_warm_connections_are_relayed() {
    let world = World::new(14, |deployer, _| deployer.steer = false);
    assert!(!world.deployer.steers());
    let (_, summoned) = support::summon_hello(&world);
    serving(&summoned).await;
    let response = http_get(service_address(&summoned), None, "/")
        .await
        .expect("served");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert_eq!(world.proxy.metrics().spliced, 1);
    assert_eq!(world.deployer.list()[0].steered, None);
    world.shutdown().await;
}

/// A steered connection closed by the instance lingers in TIME_WAIT on the service port (not
/// on the instance's own). A daemon started again hands out the same first addresses: its
/// proxy must still be able to listen on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_address_is_bound_again_after_steered_connections_closed() {
    let world = World::new(15, |_, _| {});
    let (_, summoned) = support::summon_hello(&world);
    ready_and_steered(&world, &summoned).await;
    for n in 0..5 {
        // `connection: close`: the instance closes first, so its side waits in TIME_WAIT.
        http_get(service_address(&summoned), None, &format!("/{n}"))
            .await
            .expect("served");
    }
    assert_eq!(
        world.proxy.metrics().accepted,
        0,
        "the connections were steered"
    );
    world.shutdown().await;
    drop(world);

    let world = World::new(15, |_, _| {});
    let (_, again) = support::summon_hello(&world);
    assert_eq!(
        again.addresses, summoned.addresses,
        "the first address again"
    );
    let response = http_get(service_address(&again), None, "/again")
        .await
        .expect("served by the new daemon");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    world.shutdown().await;
}

/// What the proxy would relay at an instance's own address (here with steering off; with it
/// on, a connection made before the boot began) goes to an instance that takes hand-offs
/// itself, unread: the proxy relays no byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_proxy_accepts_are_handed_to_an_instance_that_takes_them() {
    let world = World::new(19, |deployer, _| deployer.steer = false);
    let run = format!("{}\nhandoff = true", support::HELLO_RUN);
    let revision = support::deploy(
        &world.store,
        "hello",
        &support::hello_image(),
        &support::manifest(&run),
    );
    let summoned = world
        .proxy
        .summon("hello", &revision, None)
        .expect("summon");
    for _ in 0..2 {
        let response = http_get(service_address(&summoned), None, "/")
            .await
            .expect("served");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains(&revision.to_hex()), "{response}");
    }
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.handed_off, 2, "{metrics:?}");
    assert_eq!(metrics.spliced, 0, "{metrics:?}");
    assert_eq!(metrics.bytes_from_clients, 0, "{metrics:?}");
    assert_eq!(metrics.bytes_to_clients, 0, "{metrics:?}");
    world.shutdown().await;
}
