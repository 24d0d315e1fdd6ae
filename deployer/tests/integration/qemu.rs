//! The qemu tender against real `qemu-system-x86_64` and the `examples/hello-vm` unikernel,
//! built here from its sources (with cargo features for the bad images).
//!
//! Runs under TCG unless `REVBOOT_QEMU_ACCEL` says otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use revboot_deployer::config::{BackendPort, SandboxConfig};
use revboot_deployer::tender::qemu::{QemuConfig, QemuTender};
use revboot_deployer::tender::{
    BootSpec, ExitReport, ExitStatus, NotReady, Running, Tender, TenderHost,
};
use revboot_store::Revision;
use revboot_store::manifest::Manifest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a test waits for anything (boot, an answer, an exit); generous for TCG on a
/// shared machine. Not a timing assertion: only a bound on waiting.
pub(super) const PATIENCE: Duration = Duration::from_secs(60);
/// The boot timeout given to the bad images.
const BOOT_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) const REVISION: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello-vm")
}

/// Builds hello-vm (with `feature`, for a bad image) and returns the kernel image.
pub(super) fn build_image(feature: Option<&str>) -> PathBuf {
    let dir = example_dir();
    let variant = feature.unwrap_or("service");
    let target_dir = dir.join("target").join(variant);
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // The example's own .cargo/config.toml must apply, not anything cargo set for us.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME") || key.starts_with("RUSTFLAGS") {
            cargo.env_remove(key);
        }
    }
    cargo
        .current_dir(&dir)
        .args([
            "build",
            "--release",
            "--offline",
            "--locked",
            "--quiet",
            "--target-dir",
        ])
        .arg(&target_dir);
    if let Some(feature) = feature {
        cargo.args(["--features", feature]);
    }
    let output = cargo.output().expect("cargo runs");
    assert!(
        output.status.success(),
        "building hello-vm ({variant}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    target_dir.join("x86_64-unknown-linux-gnu/release/hello-vm")
}

pub(super) fn manifest() -> Manifest {
    let text = std::fs::read_to_string(example_dir().join("revboot.toml")).expect("revboot.toml");
    Manifest::from_toml(&text).expect("the example manifest parses")
}

struct Booted {
    running: Box<dyn Running>,
    manifest: Manifest,
    _scratch: tempfile::TempDir,
}

/// A host for a tender used without a deployer: its own cgroup name (a tender sweeps the
/// cgroups of its name when it starts) and root directory.
pub(super) fn host(dir: &std::path::Path, name: &str) -> TenderHost {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    TenderHost {
        name: format!("{name}-{}-{n}", std::process::id()),
        root: dir.join("root"),
        sandbox: SandboxConfig::default(),
        runtime: tokio::runtime::Handle::current(),
        // Apart from `uid()`'s: the uids of qemu processes started ahead of instances.
        uids: revboot_sandbox::uids::UidPool::new(revboot_sandbox::uids::UidRange {
            base: 2_060_000_000 + (std::process::id() % 1_000_000) * 16,
            count: 16,
        }),
        scratch: dir.join("scratch"),
    }
}

/// A tender that boots cold only: the tests of booting share one image, and a snapshot
/// beside it would be restored by the next.
fn cold() -> QemuConfig {
    QemuConfig {
        restore: false,
        ..QemuConfig::default()
    }
}

/// A uid of this test process's own for a VM started without a deployer, one per call.
pub(super) fn uid() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 16;
    2_050_000_000 + (std::process::id() % 1_000_000) * 16 + n
}

async fn boot(feature: Option<&'static str>) -> Booted {
    let image = tokio::task::spawn_blocking(move || build_image(feature))
        .await
        .expect("build task");
    let scratch = tempfile::tempdir().expect("scratch");
    let tender: Arc<dyn Tender> =
        Arc::new(QemuTender::new(cold(), &host(scratch.path(), "qemu-boot")).expect("qemu tender"));
    let manifest = manifest();
    let spec = spec("qemu-test", scratch.path().join("scratch"));
    let prepared = tender.prepare(spec).expect("prepare");
    let running = tokio::time::timeout(PATIENCE, prepared.boot(image))
        .await
        .expect("boot in time")
        .expect("qemu starts");
    Booted {
        running,
        manifest,
        _scratch: scratch,
    }
}

/// The spec of instance `id` of hello-vm on 127.0.0.1, its scratch directory `scratch`.
pub(super) fn spec(id: &str, scratch: PathBuf) -> BootSpec {
    BootSpec {
        id: id.into(),
        service: "hello-vm".into(),
        revision: REVISION.parse::<Revision>().expect("revision"),
        run: manifest().run,
        addresses: revboot_deployer::ServiceAddresses::one("127.0.0.1".parse().expect("address")),
        client: None,
        backend_port: BackendPort::Ephemeral,
        scratch,
        console_bytes: 64 * 1024,
        uid: uid(),
        vars: Default::default(),
    }
}

pub(super) async fn exit_of(running: &dyn Running) -> ExitReport {
    let mut exit = running.exit();
    let report = tokio::time::timeout(PATIENCE, exit.wait_for(Option::is_some))
        .await
        .expect("qemu ends in time")
        .expect("exit channel open");
    report.expect("an exit report")
}

pub(super) fn console(running: &dyn Running) -> String {
    String::from_utf8_lossy(&running.console().tail()).into_owned()
}

/// `GET path` at `backend`, known once the instance is ready.
pub(super) async fn get(backend: Option<std::net::SocketAddr>, path: &str) -> String {
    let backend = backend.expect("the backend is known once the instance is ready");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(backend).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: hello-vm\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("an answer in time")
        .expect("an HTTP exchange")
}

#[tokio::test]
async fn hello_vm_answers_with_its_revision_and_stops_when_asked() {
    let vm = boot(None).await;
    vm.running
        .ready(&vm.manifest.run.ready, PATIENCE)
        .await
        .unwrap_or_else(|error| panic!("not ready: {error}\n{}", console(&*vm.running)));
    let response = get(vm.running.backend(), "/").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.ends_with(&format!("hello from v1 ({REVISION})\n")),
        "{response}"
    );
    assert!(response.contains("x-revision: v1"), "{response}");

    vm.running.stop();
    let report = exit_of(&*vm.running).await;
    assert_eq!(report.status, ExitStatus::Code(0), "{report}");
    let console = console(&*vm.running);
    assert!(
        console.contains(&format!("deployment {REVISION}")),
        "{console}"
    );
    assert!(console.contains("hello-vm: listening"), "{console}");
}

#[tokio::test]
async fn a_crash_on_request_ends_the_vm_and_says_why() {
    let vm = boot(None).await;
    vm.running
        .ready(&vm.manifest.run.ready, PATIENCE)
        .await
        .unwrap_or_else(|error| panic!("not ready: {error}\n{}", console(&*vm.running)));
    // The guest triple-faults without answering: the connection just ends.
    let _ = get(vm.running.backend(), "/crash").await;
    exit_of(&*vm.running).await;
    let console = console(&*vm.running);
    assert!(console.contains("crashing on request"), "{console}");
    assert!(console.contains("the guest reset itself"), "{console}");
}

#[tokio::test]
async fn never_ready_image_misses_its_boot_timeout_and_is_killed() {
    let vm = boot(Some("never-ready")).await;
    let ready = vm.running.ready(&vm.manifest.run.ready, BOOT_TIMEOUT).await;
    assert!(matches!(ready, Err(NotReady::Timeout { .. })), "{ready:?}");
    vm.running.kill();
    let report = exit_of(&*vm.running).await;
    assert_eq!(report.status, ExitStatus::Signal(9), "{report}");
    let console = console(&*vm.running);
    assert!(console.contains("never listening, on purpose"), "{console}");
    assert!(!console.contains("hello-vm: listening"), "{console}");
}

#[tokio::test]
async fn triple_fault_image_ends_before_ready_with_its_console_tail() {
    let vm = boot(Some("triple-fault")).await;
    let ready = vm.running.ready(&vm.manifest.run.ready, PATIENCE).await;
    assert_eq!(ready, Err(NotReady::Exited));
    let report = exit_of(&*vm.running).await;
    // -no-reboot turns the reset into a normal qemu exit; the console says what happened.
    assert_eq!(report.status, ExitStatus::Code(0), "{report}");
    let console = console(&*vm.running);
    assert!(console.contains("triple-faulting on purpose"), "{console}");
    // From qemu's SHUTDOWN event, or (when the guest died before QMP was up) from the exit.
    assert!(
        console.contains("the guest reset itself") || console.contains("exited on its own"),
        "{console}"
    );
}

#[tokio::test]
async fn spinning_image_prints_nothing_misses_its_boot_timeout_and_is_killed() {
    let vm = boot(Some("spin")).await;
    let ready = vm.running.ready(&vm.manifest.run.ready, BOOT_TIMEOUT).await;
    assert!(matches!(ready, Err(NotReady::Timeout { .. })), "{ready:?}");
    vm.running.kill();
    let report = exit_of(&*vm.running).await;
    assert_eq!(report.status, ExitStatus::Signal(9), "{report}");
    let console = console(&*vm.running);
    assert!(!console.contains("hello-vm"), "{console}");
}

#[tokio::test]
async fn a_taken_port_is_refused_before_anything_boots() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let scratch = tempfile::tempdir().expect("scratch");
    let tender = QemuTender::new(cold(), &host(scratch.path(), "qemu-taken")).expect("qemu tender");
    let mut run = manifest().run;
    run.port = port;
    let spec = BootSpec {
        id: "qemu-taken".into(),
        service: "hello-vm".into(),
        revision: REVISION.parse::<Revision>().expect("revision"),
        run,
        addresses: revboot_deployer::ServiceAddresses::one("127.0.0.1".parse().expect("address")),
        client: None,
        backend_port: BackendPort::Same,
        scratch: scratch.path().join("scratch"),
        console_bytes: 4096,
        uid: uid(),
        vars: Default::default(),
    };
    let error = tender.prepare(spec).expect_err("the port is taken");
    assert!(error.to_string().contains(&port.to_string()), "{error}");
}

/// The forward's host port is qemu's own pick as it binds it. It used to be picked by the
/// tender at `prepare` (a port bound and released for qemu to bind), and another process
/// could take it in between: qemu then could not bind its forward and the boot failed. Here
/// another process takes whatever port is named before the boot, and holds a port of the
/// forward's address besides: the VM boots, serves, and says where once it runs.
#[tokio::test]
async fn a_vm_boots_while_another_process_holds_the_port_named_before_its_boot() {
    let image = tokio::task::spawn_blocking(|| build_image(None))
        .await
        .expect("build task");
    let scratch = tempfile::tempdir().expect("scratch");
    let tender = QemuTender::new(cold(), &host(scratch.path(), "qemu-pick")).expect("tender");
    let prepared = tender
        .prepare(spec("qemu-pick", scratch.path().join("scratch")))
        .expect("prepare");
    // With a port picked ahead, this listener would take it from qemu.
    let named = prepared.backend();
    let _taken = named.map(|port| std::net::TcpListener::bind(port).expect("bind"));
    assert_eq!(named, None, "a port was picked before qemu started");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = held.local_addr().expect("addr");
    let running = tokio::time::timeout(PATIENCE, prepared.boot(image))
        .await
        .expect("boot in time")
        .expect("qemu starts");
    let ready = running.ready(&manifest().run.ready, PATIENCE).await;
    assert_eq!(ready, Ok(()), "{}", console(&*running));
    let backend = running.backend().expect("known once ready");
    assert_eq!(backend.ip(), held.ip());
    assert_ne!(backend.port(), held.port());
    let response = get(Some(backend), "/").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    running.stop();
    exit_of(&*running).await;
}

/// The same images through the deployer: summoned, watched, reaped, recorded in the store.
mod through_the_deployer {

    use revboot_deployer::tender::process;
    use revboot_deployer::tender::qemu::{self, QemuConfig};
    use revboot_deployer::{InstanceState, Instances};

    use super::build_image;
    use crate::support::{self, World, deploy, http_get, source};

    const RUN: &str = "tender = \"qemu\"\nport = 8080\nguest_port = 8080\nmemory_mib = 32\n\
        ready = { probe = \"console\", line = \"hello-vm: listening\" }\nboot_timeout_ms = 3000";

    fn world(index: u8, tweak: impl FnOnce(&mut revboot_deployer::DeployerConfig)) -> World {
        World::with_tenders(
            index,
            tweak,
            vec![process::make(), qemu::make(QemuConfig::default())],
        )
    }

    /// Summons `feature`'s image and returns how it ended and its runtime record.
    async fn crash_of(index: u8, feature: &'static str) -> (String, String, String) {
        let world = world(index, |_| {});
        let image = tokio::task::spawn_blocking(move || build_image(Some(feature)))
            .await
            .expect("build task");
        let revision = deploy(
            &world.store,
            "hello-vm",
            &image,
            &support::manifest("hello-vm", RUN),
            &source(index),
        );
        let summoned = world
            .deployer
            .summon("hello-vm", &revision, None)
            .expect("summon");
        let mut state = summoned.state.clone();
        let end = support::wait_state(&mut state, InstanceState::is_final).await;
        let InstanceState::Crashed { reason } = end else {
            panic!("{feature}: expected a crash, got {end:?}");
        };
        assert!(
            support::eventually(|| !world
                .store
                .runtime_logs("hello-vm")
                .unwrap_or_default()
                .is_empty())
            .await,
            "{feature}: a runtime record is written"
        );
        let record = world
            .store
            .runtime_logs("hello-vm")
            .expect("logs")
            .remove(0);
        assert!(
            support::eventually(|| world
                .deployer
                .by_address(summoned.addresses.primary())
                .is_none())
            .await
        );
        world.deployer.shutdown().await;
        (
            reason,
            record.outcome,
            String::from_utf8_lossy(&record.console).into_owned(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_ready_vm_is_killed_at_its_boot_timeout_and_recorded_as_crashed() {
        let (reason, outcome, console) = crash_of(60, "never-ready").await;
        // The deployer gives the probe what is left of the 3000 ms boot timeout.
        assert!(
            reason.starts_with("not ready after") && reason.contains("hello-vm: listening"),
            "{reason}"
        );
        assert_eq!(outcome, format!("crashed: {reason}"));
        assert!(console.contains("never listening, on purpose"), "{console}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn triple_faulting_vm_is_recorded_as_crashed_with_its_console_tail() {
        let (reason, outcome, console) = crash_of(61, "triple-fault").await;
        assert!(reason.contains("exited before it was ready"), "{reason}");
        assert_eq!(outcome, format!("crashed: {reason}"));
        assert!(console.contains("triple-faulting on purpose"), "{console}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spinning_vm_is_killed_at_its_boot_timeout_and_recorded_as_crashed() {
        let (reason, outcome, console) = crash_of(62, "spin").await;
        // The deployer gives the probe what is left of the 3000 ms boot timeout.
        assert!(
            reason.starts_with("not ready after") && reason.contains("hello-vm: listening"),
            "{reason}"
        );
        assert_eq!(outcome, format!("crashed: {reason}"));
        assert!(!console.contains("hello-vm"), "{console}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hello_vm_answers_by_revision_and_idle_reaping_keeps_its_console() {
        let world = world(63, |config| {
            config.idle_timeout_override_ms = Some(500);
            config.backend_port = revboot_deployer::BackendPort::Ephemeral;
        });
        let image = tokio::task::spawn_blocking(|| build_image(None))
            .await
            .expect("build task");
        let revision = deploy(
            &world.store,
            "hello-vm",
            &image,
            &support::manifest("hello-vm", RUN),
            &source(63),
        );
        let summoned = world
            .deployer
            .summon("hello-vm", &revision, None)
            .expect("summon");
        let mut state = summoned.state.clone();
        let ready =
            support::wait_state(&mut state, |state| state.is_serving() || state.is_final()).await;
        assert!(ready.is_serving(), "{ready:?}");
        let response = http_get(support::backend_of(&summoned), "/")
            .await
            .expect("an answer");
        assert!(
            response.ends_with(&format!("hello from v1 ({})\n", revision.to_hex())),
            "{response}"
        );
        // Ready, qemu's forwarded socket is steered: the service port answers although
        // nothing but that socket (on another port) listens.
        assert!(
            support::eventually(|| world
                .deployer
                .list()
                .first()
                .is_some_and(|info| info.steered.is_some()))
            .await,
            "qemu's socket is steered"
        );
        let front = std::net::SocketAddr::new(summoned.addresses.primary(), summoned.port);
        let response = http_get(front, "/")
            .await
            .expect("an answer at the service port");
        assert!(
            response.ends_with(&format!("hello from v1 ({})\n", revision.to_hex())),
            "{response}"
        );
        assert_eq!(world.deployer.metrics().steered_connections, 1);
        let end = support::wait_state(&mut state, InstanceState::is_final).await;
        assert_eq!(end, InstanceState::Stopped);
        assert!(
            support::eventually(|| !world
                .store
                .runtime_logs("hello-vm")
                .unwrap_or_default()
                .is_empty())
            .await
        );
        let record = world
            .store
            .runtime_logs("hello-vm")
            .expect("logs")
            .remove(0);
        assert!(
            record.outcome.starts_with("stopped: idle"),
            "{}",
            record.outcome
        );
        let console = String::from_utf8_lossy(&record.console);
        assert!(console.contains("hello-vm: listening"), "{console}");
        world.deployer.shutdown().await;
    }
}

/// qemu itself is confined as a process instance is: its own uid without capabilities, its
/// own root (the data directory is not in it), its own pid namespace, cgroup limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_unprivileged_in_a_root_of_its_own() {
    use revboot_deployer::Instances;
    use revboot_deployer::tender::{process, qemu};
    let world = crate::support::World::with_tenders(
        64,
        |_| {},
        vec![process::make(), qemu::make(QemuConfig::default())],
    );
    let image = tokio::task::spawn_blocking(|| build_image(None))
        .await
        .expect("build task");
    let run = "tender = \"qemu\"\nport = 8080\nguest_port = 8080\nmemory_mib = 32\n\
        ready = { probe = \"console\", line = \"hello-vm: listening\" }";
    let revision = crate::support::deploy(
        &world.store,
        "hello-vm",
        &image,
        &crate::support::manifest("hello-vm", run),
        &crate::support::source(64),
    );
    let summoned = world
        .deployer
        .summon("hello-vm", &revision, None)
        .expect("summon");
    let mut state = summoned.state.clone();
    let ready = crate::support::wait_state(&mut state, |s| s.is_serving() || s.is_final()).await;
    assert!(ready.is_serving(), "{ready:?}");
    let pid = world.deployer.list()[0].pid.expect("qemu's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| crate::support::proc_status(pid, name);
    assert_ne!(field("Uid:"), "0", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    // Its root: the kernel image and the QMP socket's directory; not the data directory.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("run/image/kernel").is_file());
    assert!(root.join("run/qemu/qmp.sock").exists());
    let data = world.dir.path().strip_prefix("/").expect("absolute");
    assert!(
        !root.join(data).exists(),
        "the data directory is not in qemu's root"
    );
    assert!(!root.join("etc/shadow").exists());
    // Its own pid namespace (it is pid 1 there) and its cgroup.
    let inner = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        inner
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "{inner}"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(cgroups.contains("-qemu/"), "{cgroups}");
    world.deployer.shutdown().await;
}
