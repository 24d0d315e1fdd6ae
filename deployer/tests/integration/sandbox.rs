//! The sandbox holds: the probe image tries to get out and reports on its console.

use revboot_deployer::{InstanceState, Instances};

use crate::support::{self, World, deploy, manifest, probe_image, source};

/// Boots the probe with `args`, waits until it printed `probe done`, returns its console.
async fn probe(world: &World, args: &[&str]) -> String {
    let image = probe_image();
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let run = format!(
        "port = 8080\nmemory_mib = 32\nargs = [{}]\nready = {{ probe = \"console\", line = \"probe done\" }}",
        args.join(", ")
    );
    let revision = deploy(
        &world.store,
        "probe",
        &image,
        &manifest("probe", &run),
        &source(9),
    );
    let summoned = world
        .deployer
        .summon("probe", &revision, None)
        .expect("summon");
    let mut state = summoned.state.clone();
    let state = support::wait_state(&mut state, |s| s.is_serving() || s.is_final()).await;
    assert!(state.is_serving(), "{state:?}");
    let console = world.deployer.console(&summoned.key).expect("console");
    String::from_utf8_lossy(&console).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_write_outside_its_scratch_directory() {
    let world = World::new(20, |_| {});
    let outside = world.dir.path().join("escaped.txt");
    let console = probe(&world, &["write", outside.to_str().expect("utf-8 path")]).await;
    assert!(console.contains("probe write-outside: denied"), "{console}");
    assert!(!outside.exists(), "the file outside was not created");
    assert!(console.contains("probe write-scratch: ok"), "{console}");
    assert!(console.contains("probe read-etc: denied"), "{console}");
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_open_outbound_connections() {
    let world = World::new(21, |_| {});
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let target = listener.local_addr().expect("addr").to_string();
    let console = probe(&world, &["connect", &target]).await;
    assert!(console.contains("probe connect: denied"), "{console}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing reached the host listener"
    );
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_see_host_processes() {
    let world = World::new(22, |_| {});
    let host = std::process::id().to_string();
    let console = probe(&world, &["procs", &host]).await;
    assert!(console.contains("probe pid: 1\n"), "{console}");
    assert!(console.contains("probe signal-host: denied"), "{console}");
    let listed = console
        .lines()
        .find_map(|line| line.strip_prefix("probe proc-pids: "))
        .expect("proc line");
    assert!(
        listed.starts_with("denied") || listed == "1",
        "only its own pid namespace is visible: {listed}"
    );
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_no_signal_blocked() {
    let world = World::new(44, |_| {});
    // The spawner blocks every signal across the clone; the image must not inherit that.
    let console = probe(&world, &["signals"]).await;
    assert!(
        console.contains("probe SigBlk: 0000000000000000\n"),
        "{console}"
    );
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_killed_at_its_memory_limit_and_recorded_as_such() {
    let world = World::new(23, |_| {});
    let image = probe_image();
    let run = "port = 8080\nmemory_mib = 16\nargs = [\"memory\", \"256\"]\nready = { probe = \"socket\" }";
    let revision = deploy(
        &world.store,
        "probe",
        &image,
        &manifest("probe", run),
        &source(9),
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
            reason: "killed at its memory limit (OOM)".into()
        }
    );
    assert!(
        support::eventually(|| !world
            .store
            .runtime_logs("probe")
            .unwrap_or_default()
            .is_empty())
        .await
    );
    let record = &world.store.runtime_logs("probe").expect("logs")[0];
    assert_eq!(record.outcome, "crashed: killed at its memory limit (OOM)");
    let console = String::from_utf8_lossy(&record.console);
    assert!(!console.contains("survived"), "{console}");
    world.deployer.shutdown().await;
}
