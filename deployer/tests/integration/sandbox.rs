//! The sandbox holds: the probe image tries to get out and reports on its console.

use revboot_deployer::{InstanceState, Instances};

use crate::support::{self, World, deploy, hostile_image, manifest, probe_image, source};

/// Boots the probe with `args`, waits until it printed `probe done`, returns its console.
async fn probe(world: &World, args: &[&str]) -> String {
    let image = probe_image();
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let run = format!(
        "port = 8080\nmemory_mib = 32\nproc = true\nargs = [{}]\nready = {{ probe = \"console\", line = \"probe done\" }}",
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

/// Asks the running hostile service for one attempt; the answer's body line.
async fn attempt(backend: std::net::SocketAddr, request: &str) -> String {
    let response = support::http_get(backend, &format!("/try/{request}"))
        .await
        .unwrap_or_else(|error| panic!("{request}: {error}"));
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert!(
        body.starts_with("allowed: ") || body.starts_with("refused: "),
        "{request}: {response}"
    );
    body
}

/// The host state an escape would change.
fn host_state(token: &std::path::Path) -> Vec<(String, String)> {
    ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname"]
        .iter()
        .map(|path| {
            (
                path.to_string(),
                std::fs::read_to_string(path).expect("readable"),
            )
        })
        .chain(std::iter::once((
            "token".to_owned(),
            std::fs::read_to_string(token).expect("token"),
        )))
        .collect()
}

/// examples/hostile, written to escape, tries every way out it knows; each is refused, and
/// the refusals come from the sandbox (the control run in the testkit shows each attempt
/// succeeding as unsandboxed root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_service_is_refused_every_way_out_and_the_host_is_unchanged() {
    let world = World::new(24, |config| config.sandbox.scratch_mib = 8);
    // What the attacker is after: the data directory, a token in it, the daemon's API,
    // another instance.
    let data = world.dir.path();
    let token = data.join("token");
    std::fs::write(&token, "secret-token-4242\n").expect("token");
    let api = std::net::TcpListener::bind("127.0.0.1:0").expect("api listener");
    api.set_nonblocking(true).expect("nonblocking");
    let before = host_state(&token);

    let hello = deploy(
        &world.store,
        "hello",
        &support::hello_image(),
        &manifest(
            "hello",
            "port = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }",
        ),
        &source(1),
    );
    let neighbour = world
        .deployer
        .summon("hello", &hello, None)
        .expect("summon hello");
    let revision = deploy(
        &world.store,
        "hostile",
        &hostile_image(),
        &manifest(
            "hostile",
            "port = 8080\nmemory_mib = 64\npids = 64\nproc = true\nready = { probe = \"socket\" }",
        ),
        &source(2),
    );
    let summoned = world
        .deployer
        .summon("hostile", &revision, None)
        .expect("summon hostile");
    for mut state in [summoned.state.clone(), neighbour.state.clone()] {
        let state = support::wait_state(&mut state, |s| s.is_serving() || s.is_final()).await;
        assert!(state.is_serving(), "{state:?}");
    }
    let backend = support::backend_of(&summoned);

    let whoami = attempt(backend, "whoami").await;
    assert!(!whoami.contains("uid=0"), "not root: {whoami}");
    assert!(
        whoami.contains("capeff=0000000000000000"),
        "no capability: {whoami}"
    );
    assert!(whoami.contains("nonewprivs=1"), "{whoami}");
    assert!(whoami.contains("seccomp=2"), "{whoami}");

    let data_path = data.display().to_string();
    let token_path = token.display().to_string();
    let refused = [
        "core_pattern".to_owned(),
        "proc_sys".to_owned(),
        "proc_sys?path=/proc/sys/vm/drop_caches".to_owned(),
        "sys".to_owned(),
        "sys?path=/sys/kernel/mm/transparent_hugepage/enabled".to_owned(),
        "mknod_char".to_owned(),
        "mknod_block".to_owned(),
        format!("read?path={token_path}"),
        format!("list?path={data_path}"),
        "read?path=/etc/shadow".to_owned(),
        "list?path=/proc/1/root/etc".to_owned(),
        "ptrace".to_owned(),
        "mount".to_owned(),
        "unshare?flags=user,mount,net,pid,uts,ipc,cgroup".to_owned(),
        "setuid?uid=0".to_owned(),
        "setgid?gid=0".to_owned(),
        "raw_socket".to_owned(),
        format!("connect?addr={}", api.local_addr().expect("api address")),
        format!("connect?addr={}", support::backend_of(&neighbour)),
        "keyctl".to_owned(),
        "perf_event_open".to_owned(),
        "userfaultfd".to_owned(),
        "bpf".to_owned(),
        "kexec".to_owned(),
        "syslog".to_owned(),
        "exec_written".to_owned(),
        "sethostname".to_owned(),
        "chroot".to_owned(),
    ];
    for request in &refused {
        let answer = attempt(backend, request).await;
        assert!(answer.starts_with("refused: "), "{request}: {answer}");
    }
    // The system calls the filter refuses answer EPERM from seccomp, whatever the kernel.
    for request in [
        "ptrace",
        "mount",
        "keyctl",
        "perf_event_open",
        "userfaultfd",
        "bpf",
        "kexec",
        "sethostname",
        "chroot",
    ] {
        let answer = attempt(backend, request).await;
        assert!(answer.contains("EPERM"), "{request}: {answer}");
    }
    // Limits: its disk is an 8 MiB tmpfs, its pids 64, its memory 64 MiB.
    let disk = attempt(backend, "fill_disk?mib=1024").await;
    assert!(
        disk.starts_with("refused: ") && disk.contains("ENOSPC"),
        "{disk}"
    );
    let forks = attempt(backend, "forks?n=10000").await;
    assert!(forks.starts_with("refused: "), "{forks}");
    let memory = attempt(backend, "memory?mib=1024").await;
    assert!(memory.starts_with("refused: "), "{memory}");
    // Its own scratch space works: the refusals above are not a broken service.
    let own = attempt(backend, "write?path=/note").await;
    assert!(own.starts_with("allowed: "), "{own}");

    assert!(
        matches!(api.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing reached the daemon's API"
    );
    assert_eq!(host_state(&token), before, "the host is unchanged");
    assert!(
        world
            .deployer
            .list()
            .iter()
            .any(|i| i.key == summoned.key && i.state.is_serving()),
        "the hostile instance still runs: every attempt was answered, not fatal"
    );
    world.deployer.shutdown().await;
}

/// An instance that closes its output early is still watched: the end of its console is
/// not taken for its exit, signals still reach it, and its real exit is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_closes_its_output_is_still_watched_to_its_exit() {
    let world = World::new(25, |_| {});
    let console = probe(&world, &["silent"]).await;
    assert!(console.contains("probe done"), "{console}");
    let info = world.deployer.list().pop().expect("the probe runs");
    // Its console has ended; it has not.
    let answer = support::http_get(
        info.backend.expect("a process instance's backend is known"),
        "/",
    )
    .await
    .expect("an answer");
    assert!(answer.ends_with("probe ok\n"), "{answer}");
    assert!(world.deployer.list()[0].state.is_serving());
    // A summon of a running instance returns it, with its state: taken before the exit.
    let running = world
        .deployer
        .summon(&info.key.service, &info.key.revision, None)
        .expect("summon");
    assert_eq!(running.key, info.key);
    let mut state = running.state.clone();
    let _ = support::http_get(
        info.backend.expect("a process instance's backend is known"),
        "/exit",
    )
    .await;
    let end = support::wait_state(&mut state, InstanceState::is_final).await;
    assert_eq!(
        end,
        InstanceState::Crashed {
            reason: "exited with status 4".into()
        }
    );
    world.deployer.shutdown().await;
}
