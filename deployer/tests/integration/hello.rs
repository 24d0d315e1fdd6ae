//! The lifecycle with the real `examples/hello` image.

use std::io::{Read, Write};
use std::time::Duration;

use revboot_deployer::{Activity, InstanceState, Instances, SummonError};

use crate::support::{self, PATIENCE, World, deploy, hello_image, http_get, manifest, source};

const HELLO_RUN: &str = "port = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }";

/// Deploys hello (its own `[run]`, source commit 1) and summons it.
fn summon_hello(world: &World) -> (revboot_store::Revision, revboot_deployer::Summoned) {
    summon_hello_built_from(world, 1)
}

/// Deploys hello as built from source commit `n` and summons it.
fn summon_hello_built_from(
    world: &World,
    n: u8,
) -> (revboot_store::Revision, revboot_deployer::Summoned) {
    let revision = deploy(
        &world.store,
        "hello",
        &hello_image(),
        &manifest("hello", HELLO_RUN),
        &source(n),
    );
    let summoned = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    (revision, summoned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summon_connect_and_the_right_revision_answers() {
    let world = World::new(1, |_| {});
    let (revision, summoned) = summon_hello(&world);
    assert_eq!(summoned.port, 8080);
    assert_eq!(
        support::backend_of(&summoned).ip(),
        summoned.addresses.primary()
    );
    let response = http_get(support::backend_of(&summoned), "/")
        .await
        .expect("answer");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(&format!("hello from v1 ({revision})")),
        "{response}"
    );
    let mut state = summoned.state.clone();
    support::wait_state(&mut state, InstanceState::is_serving).await;
    // A second summon finds the same instance.
    let again = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    assert_eq!(again.addresses.primary(), summoned.addresses.primary());
    assert_eq!(world.deployer.list().len(), 1);
    let by_address = world
        .deployer
        .by_address(summoned.addresses.primary())
        .expect("known address");
    assert_eq!(by_address.key, summoned.key);
    world.deployer.shutdown().await;
    assert!(world.deployer.list().is_empty());
    assert!(matches!(
        world.deployer.summon("hello", &revision, None),
        Err(SummonError::ShuttingDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_revisions_run_side_by_side_on_different_addresses() {
    let world = World::new(2, |_| {});
    let image = hello_image();
    let first = deploy(
        &world.store,
        "hello",
        &image,
        &manifest("hello", HELLO_RUN),
        &source(1),
    );
    let second = deploy(
        &world.store,
        "hello",
        &image,
        &manifest("hello", HELLO_RUN),
        &source(2),
    );
    assert_ne!(first, second);
    let a = world
        .deployer
        .summon("hello", &first, None)
        .expect("summon first");
    let b = world
        .deployer
        .summon("hello", &second, None)
        .expect("summon second");
    assert_ne!(a.addresses.primary(), b.addresses.primary());
    let (answer_a, answer_b) = tokio::join!(
        http_get(support::backend_of(&a), "/"),
        http_get(support::backend_of(&b), "/")
    );
    let states = || format!("{:?} / {:?}", *a.state.borrow(), *b.state.borrow());
    let (answer_a, answer_b) = (
        answer_a.unwrap_or_else(|e| panic!("first answers: {e}; {}", states())),
        answer_b.unwrap_or_else(|e| panic!("second answers: {e}; {}", states())),
    );
    assert!(answer_a.contains(&first.to_string()), "{answer_a}");
    assert!(answer_b.contains(&second.to_string()), "{answer_b}");
    assert_eq!(world.deployer.list().len(), 2);
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_as_the_boot_starts_is_served_not_refused() {
    let world = World::new(3, |_| {});
    let image = hello_image();
    let revision = deploy(
        &world.store,
        "hello",
        &image,
        &manifest("hello", HELLO_RUN),
        &source(1),
    );
    for _ in 0..5 {
        // The boot is held back until `held` drops (as a DNS answer holds it until the
        // answer has left): the connection below is surely made before the image runs.
        let scope = revboot_deployer::LaunchScope::open();
        let summoned = world
            .deployer
            .summon("hello", &revision, None)
            .expect("summon");
        let held = scope.close();
        assert_eq!(*summoned.state.borrow(), InstanceState::Booting);
        // The kernel completes the handshake on the socket the tender bound at summon.
        let mut stream =
            std::net::TcpStream::connect(support::backend_of(&summoned)).expect("accepted");
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .expect("request sent");
        drop(held);
        let response = tokio::task::spawn_blocking(move || {
            stream
                .set_read_timeout(Some(support::PATIENCE))
                .expect("timeout");
            let mut response = String::new();
            stream.read_to_string(&mut response).map(|_| response)
        })
        .await
        .expect("reader")
        .expect("served");
        assert!(response.contains("hello from v1"), "{response}");
        let mut state = world.deployer.kill(&summoned.key).expect("running");
        support::wait_state(&mut state, InstanceState::is_final).await;
        // The key is free again as soon as the state is final.
    }
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reaping_stops_the_instance_and_writes_its_log_back() {
    let world = World::new(4, |config| config.idle_timeout_override_ms = Some(1_000));
    let (revision, summoned) = summon_hello(&world);
    // An open connection keeps it alive past the idle timeout.
    world
        .deployer
        .activity(&summoned.key, Activity::ConnectionOpened);
    let response = http_get(support::backend_of(&summoned), "/")
        .await
        .expect("answer");
    assert!(response.contains("hello from v1"));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        summoned.state.borrow().is_serving(),
        "{:?}",
        *summoned.state.borrow()
    );
    world
        .deployer
        .activity(&summoned.key, Activity::ConnectionClosed);
    let mut state = summoned.state.clone();
    let end = support::wait_state(&mut state, InstanceState::is_final).await;
    assert_eq!(end, InstanceState::Stopped);
    assert!(
        support::eventually(|| !world
            .store
            .runtime_logs("hello")
            .unwrap_or_default()
            .is_empty())
        .await,
        "a runtime record is written"
    );
    let logs = world.store.runtime_logs("hello").expect("logs");
    let record = &logs[0];
    assert_eq!(record.revision, revision);
    assert!(
        record.outcome.starts_with("stopped: idle"),
        "{}",
        record.outcome
    );
    assert!(record.boot_ms.is_some());
    assert!(
        String::from_utf8_lossy(&record.console).contains("hello v1 ready"),
        "{:?}",
        String::from_utf8_lossy(&record.console)
    );
    // The address is free again.
    assert!(
        support::eventually(|| world
            .deployer
            .by_address(summoned.addresses.primary())
            .is_none())
        .await
    );
    assert!(support::bindable(summoned.addresses.primary(), 8080));
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stop_is_recorded_as_idle_not_as_killed_by_signal_9() {
    // hello is pid 1 of its pid namespace with no SIGTERM handler: SIGTERM does nothing and
    // the SIGKILL after the grace ends it. Still, the deployer asked for the stop.
    let world = World::new(12, |config| config.idle_timeout_override_ms = Some(1_000));
    let (revision, summoned) = summon_hello(&world);
    let mut state = summoned.state.clone();
    let end = support::wait_state(&mut state, InstanceState::is_final).await;
    assert_eq!(end, InstanceState::Stopped);

    // An operator's stop reads as one too.
    let (other, summoned) = summon_hello_built_from(&world, 2);
    let mut state = summoned.state.clone();
    support::wait_state(&mut state, InstanceState::is_serving).await;
    let mut state = world.deployer.stop(&summoned.key).expect("running");
    support::wait_state(&mut state, InstanceState::is_final).await;

    let records = || world.store.runtime_logs("hello").unwrap_or_default();
    assert!(
        support::eventually(|| records().len() == 2).await,
        "two records"
    );
    let outcome = |of: revboot_store::Revision| {
        records()
            .into_iter()
            .find(|record| record.revision == of)
            .map(|record| record.outcome)
            .expect("a record")
    };
    assert_eq!(outcome(revision), "stopped: idle for 1s");
    assert_eq!(outcome(other), "stopped: by operator");
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_recorded_with_its_console_tail_and_the_next_summon_boots_again() {
    let world = World::new(5, |_| {});
    let (revision, summoned) = summon_hello(&world);
    let _ = http_get(support::backend_of(&summoned), "/crash").await;
    let mut state = summoned.state.clone();
    let end = support::wait_state(&mut state, InstanceState::is_final).await;
    assert_eq!(
        end,
        InstanceState::Crashed {
            reason: "exited with status 3".into()
        }
    );
    assert!(
        support::eventually(|| !world
            .store
            .runtime_logs("hello")
            .unwrap_or_default()
            .is_empty())
        .await
    );
    let record = &world.store.runtime_logs("hello").expect("logs")[0];
    assert_eq!(record.outcome, "crashed: exited with status 3");
    let console = String::from_utf8_lossy(&record.console);
    assert!(console.contains("hello: crashing on request"), "{console}");
    // One crash is not a loop: the next summon boots a new instance.
    let again = world
        .deployer
        .summon("hello", &revision, None)
        .expect("boots again");
    let response = http_get(support::backend_of(&again), "/")
        .await
        .expect("answer");
    assert!(response.contains("hello from v1"));
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_backs_off() {
    let world = World::new(6, |config| {
        config.backoff.after_crashes = 2;
        config.backoff.base_ms = 60_000;
        config.backoff.max_ms = 120_000;
    });
    let image = hello_image();
    let revision = deploy(
        &world.store,
        "hello",
        &image,
        &manifest("hello", HELLO_RUN),
        &source(1),
    );
    for _ in 0..2 {
        let summoned = world
            .deployer
            .summon("hello", &revision, None)
            .expect("boots");
        let _ = http_get(support::backend_of(&summoned), "/crash").await;
        let mut state = summoned.state.clone();
        let end = support::wait_state(&mut state, InstanceState::is_final).await;
        assert!(matches!(end, InstanceState::Crashed { .. }), "{end:?}");
    }
    match world.deployer.summon("hello", &revision, None) {
        Err(SummonError::Backoff { retry_in, .. }) => {
            assert!(retry_in > Duration::from_secs(1) && retry_in <= Duration::from_secs(60));
        }
        other => panic!("expected a back-off, got {other:?}"),
    }
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_readiness_probe_is_a_crash_with_the_reason() {
    let world = World::new(7, |_| {});
    let image = hello_image();
    let run = "port = 8080\nboot_timeout_ms = 300\nready = { probe = \"console\", line = \"never printed\" }";
    let revision = deploy(
        &world.store,
        "hello",
        &image,
        &manifest("hello", run),
        &source(1),
    );
    let summoned = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    let mut state = summoned.state.clone();
    let end = support::wait_state(&mut state, InstanceState::is_final).await;
    match end {
        InstanceState::Crashed { reason } => {
            assert!(reason.contains("not ready after 300 ms"), "{reason}")
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_refuse_fast_with_a_reason() {
    let world = World::new(8, |config| {
        config.max_instances = 3;
        config.max_per_service = 2;
        config.max_clients_per_service = 1;
    });
    let image = hello_image();
    let shared = manifest("hello", HELLO_RUN);
    let per_client = manifest("hello", &format!("{HELLO_RUN}\nper_client = true"));
    let r1 = deploy(&world.store, "hello", &image, &shared, &source(1));
    let r2 = deploy(&world.store, "hello", &image, &shared, &source(2));
    let r3 = deploy(&world.store, "hello", &image, &shared, &source(3));
    world.deployer.summon("hello", &r1, None).expect("first");
    world.deployer.summon("hello", &r2, None).expect("second");
    assert!(matches!(
        world.deployer.summon("hello", &r3, None),
        Err(SummonError::ServiceCap { limit: 2, .. })
    ));
    let other = deploy(&world.store, "other", &image, &per_client, &source(4));
    assert!(matches!(
        world.deployer.summon("other", &other, None),
        Err(SummonError::ClientRequired { .. })
    ));
    let client = world
        .deployer
        .summon("other", &other, Some("127.0.0.5".parse().unwrap()))
        .expect("client instance");
    assert_eq!(
        client.key.client.map(|client| client.network()),
        Some("127.0.0.5".parse().unwrap())
    );
    assert!(matches!(
        world
            .deployer
            .summon("other", &other, Some("127.0.0.6".parse().unwrap())),
        Err(SummonError::GlobalCap { limit: 3 }) | Err(SummonError::ClientCap { limit: 1, .. })
    ));
    let _ = PATIENCE;
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_summons_boot_one_instance() {
    let world = World::new(9, |_| {});
    let image = hello_image();
    let revision = deploy(
        &world.store,
        "hello",
        &image,
        &manifest("hello", HELLO_RUN),
        &source(1),
    );
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let deployer = world.deployer.clone();
            std::thread::spawn(move || deployer.summon("hello", &revision, None).expect("summon"))
        })
        .collect();
    let summoned: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("joins"))
        .collect();
    assert!(
        summoned
            .iter()
            .all(|s| s.addresses.primary() == summoned[0].addresses.primary())
    );
    assert_eq!(world.deployer.list().len(), 1);
    let response = http_get(support::backend_of(&summoned[0]), "/")
        .await
        .expect("answer");
    assert!(response.contains(&revision.to_string()));
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_the_backend_is_an_ephemeral_port_on_the_service_address() {
    let world = World::new(10, |config| {
        config.backend_port = revboot_deployer::BackendPort::Ephemeral;
    });
    let (_, summoned) = summon_hello(&world);
    assert_eq!(summoned.port, 8080);
    assert_eq!(
        support::backend_of(&summoned).ip(),
        summoned.addresses.primary()
    );
    assert_ne!(support::backend_of(&summoned).port(), 8080);
    // The service address and port stay free for the proxy to listen on.
    assert!(support::bindable(summoned.addresses.primary(), 8080));
    let response = http_get(support::backend_of(&summoned), "/")
        .await
        .expect("answer");
    assert!(response.contains("hello from v1"), "{response}");
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_exits_while_booting_is_a_crash_with_its_status() {
    let world = World::new(11, |_| {});
    let image = support::probe_image();
    // The probe allocates far more than its 4 MiB and is killed before it prints the line
    // its readiness waits for.
    let run = "port = 8080\nmemory_mib = 4\nargs = [\"memory\", \"64\"]\nready = { probe = \"console\", line = \"probe done\" }";
    let revision = deploy(
        &world.store,
        "probe",
        &image,
        &manifest("probe", run),
        &source(1),
    );
    let summoned = world
        .deployer
        .summon("probe", &revision, None)
        .expect("summon");
    let mut state = summoned.state.clone();
    let end = support::wait_state(&mut state, InstanceState::is_final).await;
    assert_eq!(
        end,
        InstanceState::Crashed {
            reason: "exited before it was ready: killed at its memory limit (OOM)".into()
        }
    );
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_manifests_are_read_ahead_so_a_cold_summon_reads_no_git() {
    let world = World::new(43, |_| {});
    let image = hello_image();
    let revisions: Vec<_> = (1..=3)
        .map(|n| {
            deploy(
                &world.store,
                "hello",
                &image,
                &manifest("hello", HELLO_RUN),
                &source(n),
            )
        })
        .collect();
    // The first query after the repository changed starts the warm-up.
    world
        .deployer
        .resolve("hello", Some(&revisions[0].short(12)))
        .expect("resolves");
    assert!(
        support::eventually(|| world.deployer.metrics().manifest_reads >= 3).await,
        "the warm-up reads every recent manifest"
    );
    // Settled: a second pass over the same generation finds nothing to read.
    let warmed = world.deployer.metrics().manifest_reads;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(world.deployer.metrics().manifest_reads, warmed);
    for revision in &revisions[1..] {
        let resolved = world
            .deployer
            .resolve("hello", Some(&revision.short(12)))
            .expect("resolves");
        let mut state = world
            .deployer
            .summon("hello", &resolved.revision, None)
            .expect("summon")
            .state;
        support::wait_state(&mut state, InstanceState::is_serving).await;
    }
    assert_eq!(
        world.deployer.metrics().manifest_reads,
        warmed,
        "resolve and summon of warmed revisions read no manifest"
    );
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_proxy_an_open_quiet_connection_keeps_the_instance_alive() {
    let world = World::new(45, |config| config.idle_timeout_override_ms = Some(1_000));
    let (_, summoned) = summon_hello(&world);
    // Clients reach the instance's own socket; nobody reports their connections.
    assert_eq!(
        summoned.backend.get(),
        Some(std::net::SocketAddr::new(
            summoned.addresses.primary(),
            summoned.port
        ))
    );
    let mut state = summoned.state.clone();
    support::wait_state(&mut state, InstanceState::is_serving).await;
    let quiet = tokio::net::TcpStream::connect(support::backend_of(&summoned))
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert!(
        summoned.state.borrow().is_serving(),
        "reaped with a connection open: {:?}",
        *summoned.state.borrow()
    );
    drop(quiet);
    let end = support::wait_state(&mut state, InstanceState::is_final).await;
    assert_eq!(end, InstanceState::Stopped);
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_is_not_an_executable_is_a_crash_that_says_so() {
    let world = World::new(46, |_| {});
    let garbage = world.dir.path().join("not-an-elf");
    std::fs::write(&garbage, b"this is not a program\n").expect("write the image");
    // /bin/sh is dynamically linked: no loader in an instance's root, so it cannot start.
    let dynamic = world.dir.path().join("sh");
    std::fs::copy("/bin/sh", &dynamic).expect("copy /bin/sh");
    for (n, image, expected) in [
        (2, &garbage, "image `not-an-elf` is not an ELF executable"),
        (3, &dynamic, "image `sh` is dynamically linked"),
    ] {
        let name = image
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let revision = deploy(
            &world.store,
            "broken",
            image,
            &manifest(&name, HELLO_RUN),
            &source(n),
        );
        let summoned = world
            .deployer
            .summon("broken", &revision, None)
            .expect("summon");
        let mut state = summoned.state.clone();
        let end = support::wait_state(&mut state, InstanceState::is_final).await;
        let InstanceState::Crashed { reason } = end else {
            panic!("not a crash: {end:?}");
        };
        assert!(reason.starts_with(expected), "{reason}");
        assert!(support::eventually(|| world.deployer.list().is_empty()).await);
    }
    world.deployer.shutdown().await;
}

/// An instance whose stop was ordered no longer answers for its key: a summon right after
/// the order boots a new instance, which serves while the old one is still on its way out
/// (hello ignores SIGTERM, so the old one lasts the stop grace), instead of handing out the
/// address of one about to end, whose connections would then be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summon_after_a_stop_was_ordered_boots_a_new_instance() {
    let world = World::new(13, |config| config.stop_grace_ms = 3_000);
    let (revision, old) = summon_hello(&world);
    let mut state = old.state.clone();
    support::wait_state(&mut state, InstanceState::is_serving).await;
    let mut stopping = world.deployer.stop(&old.key).expect("running");
    let new = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    assert_ne!(new.addresses, old.addresses);
    let mut state = new.state.clone();
    support::wait_state(&mut state, InstanceState::is_serving).await;
    let body = http_get(support::backend_of(&new), "/").await.expect("GET");
    assert!(body.contains("hello from"), "{body}");
    assert_eq!(
        support::wait_state(&mut stopping, InstanceState::is_final).await,
        InstanceState::Stopped
    );
    // The new one stays, and is what its key answers with.
    let again = world
        .deployer
        .summon("hello", &revision, None)
        .expect("summon");
    assert_eq!(again.addresses, new.addresses);
    world.deployer.shutdown().await;
}
