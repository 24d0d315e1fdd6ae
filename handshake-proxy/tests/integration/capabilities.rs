//! What the proxy promises, shown with the real deployer and the real hello image.
//!
//! The proxy's own hold path is shown with the kernel hand-off off (`steer = false`: as
//! without root, or for a qemu instance): with it on, a process instance's connections go
//! straight to its socket from the boot on (`steering.rs`).

use std::sync::Arc;
use std::time::Duration;

use revboot_deployer::{InstanceState, Instances};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    self, PATIENCE, World, connect, deploy, eventually, hello_image, http_get, manifest,
    service_address,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_at_once_on_a_cold_instance_are_all_served_by_one_boot() {
    support::raise_nofile();
    let world = World::new(1, |deployer, _| deployer.steer = false);
    // The gated image stays booting until the test opens it: every client arrives cold.
    let (revision, summoned) = support::summon_gated(&world);
    assert_ne!(summoned.backend.get(), Some(service_address(&summoned)));
    let address = service_address(&summoned);
    let start = Arc::new(tokio::sync::Barrier::new(500));
    let clients: Vec<_> = (0..500)
        .map(|n| {
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                http_get(address, None, &format!("/{n}")).await
            })
        })
        .collect();
    eventually("all 500 clients are held", || {
        world.proxy.metrics().held_now == 500
    })
    .await;
    assert_eq!(*summoned.state.borrow(), InstanceState::Booting);
    support::open_gate(&summoned).await;
    for (n, client) in clients.into_iter().enumerate() {
        let response = client
            .await
            .expect("client task")
            .expect("no refusal, no reset");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains(&format!("gated /{n} ({revision})")),
            "{response}"
        );
    }
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.refused, 0, "{metrics:?}");
    assert_eq!(metrics.held, 500, "{metrics:?}");
    assert_eq!(metrics.spliced, 500, "{metrics:?}");
    assert_eq!(metrics.held_now, 0, "{metrics:?}");
    let instances = world.deployer.list();
    assert_eq!(instances.len(), 1, "{instances:?}");
    world.shutdown().await;
    // Every life of an instance is written back: one boot, one record.
    let lives = world.store.runtime_logs("gated").expect("runtime logs");
    assert_eq!(lives.len(), 1, "{lives:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_before_the_instance_is_ready_is_answered() {
    let world = World::new(2, |deployer, _| deployer.steer = false);
    let (revision, summoned) = support::summon_gated(&world);
    let request = b"GET /early HTTP/1.1\r\nhost: test\r\n\r\n";
    let mut stream = connect(service_address(&summoned), None)
        .await
        .expect("connect");
    stream.write_all(request).await.expect("request sent");
    eventually("the request is held", || {
        world.proxy.metrics().held_now == 1
    })
    .await;
    assert_eq!(*summoned.state.borrow(), InstanceState::Booting);
    support::open_gate(&summoned).await;
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(
        response.contains(&format!("gated /early ({revision})")),
        "{response}"
    );
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.held, 1, "{metrics:?}");
    assert_eq!(metrics.replayed_bytes, request.len() as u64, "{metrics:?}");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_client_instance_refuses_every_other_client() {
    // The relay path: with no kernel hand-off, alice's connection is spliced by the proxy.
    let world = World::new(3, |deployer, _| deployer.steer = false);
    support::bob_refused_alice_served(&world).await;
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.refused_admission, 1, "{metrics:?}");
    assert_eq!(metrics.spliced, 1, "{metrics:?}");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_fails_to_boot_closes_every_held_connection() {
    let world = World::new(4, |deployer, _| deployer.steer = false);
    // hello never prints this, so it never becomes ready: the boot fails at the timeout.
    let run = "port = 8080\nmemory_mib = 32\nboot_timeout_ms = 1500\n\
               ready = { probe = \"console\", line = \"never printed\" }";
    let revision = deploy(&world.store, "stuck", &hello_image(), &manifest(run));
    let summoned = world
        .proxy
        .summon("stuck", &revision, None)
        .expect("summon");
    let address = service_address(&summoned);
    let mut held = Vec::new();
    for n in 0..20 {
        let mut stream = connect(address, None).await.expect("connect");
        let request = format!("GET /{n} HTTP/1.1\r\nhost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        held.push(stream);
    }
    for mut stream in held {
        let mut response = Vec::new();
        let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
            .await
            .expect("closed, not left hanging");
        if read.is_ok() {
            assert!(response.is_empty(), "answered: {response:?}");
        }
    }
    let mut state = summoned.state.clone();
    let state = state
        .wait_for(InstanceState::is_final)
        .await
        .expect("state");
    assert!(matches!(*state, InstanceState::Crashed { .. }), "{state:?}");
    drop(state);
    let metrics = world.proxy.metrics();
    assert_eq!(metrics.boot_failures, 20, "{metrics:?}");
    assert_eq!(metrics.held_now, 0, "{metrics:?}");
    assert_eq!(metrics.spliced, 0, "{metrics:?}");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_quiet_connection_keeps_its_instance_until_it_closes() {
    let idle = Duration::from_millis(300);
    let world = World::new(5, |deployer, _| {
        deployer.steer = false;
        deployer.idle_timeout_override_ms = Some(idle.as_millis() as u64);
    });
    let (_, summoned) = support::summon_hello(&world);
    let mut state = summoned.state.clone();
    let quiet = connect(service_address(&summoned), None)
        .await
        .expect("connect");
    tokio::time::timeout(PATIENCE, state.wait_for(InstanceState::is_serving))
        .await
        .expect("ready in time")
        .expect("state");
    eventually("the proxy spliced the quiet connection", || {
        world.proxy.metrics().spliced == 1
    })
    .await;
    support::still_serving_after_idle(&state, idle).await;
    let instances = world.deployer.list();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].connections, 1);
    support::reaped_once_closed(&mut state, quiet).await;
    eventually("the released address lost its listener", || {
        world.proxy.metrics().listeners == 0
    })
    .await;
    world.shutdown().await;
}
