//! Deployer figures, each beside its anchor measured in the same run.
//!
//! 1. Cold start: summon → first byte of `examples/hello`'s HTTP response, over `COLD`
//!    cold starts; the anchor is a plain fork/exec of the same binary, handed the same kind
//!    of pre-bound socket, answering the same request.
//! 2. Crash detected → replacement ready: hello is crashed with `GET /crash`; from the
//!    moment its state turns `crashed` to the replacement's `ready`.
//! 3. Boot storm: `STORM` instances booted one after another and kept running (an idle
//!    timeout of an hour: none is reaped during the storm); the boot
//!    time (summon → ready) of the 1st, 100th, …, last, and memory per instance.
//!
//! Run as root: `cargo bench -p revboot-deployer --bench instances` (env `COLD`, `STORM`,
//! `CRASHES` change the counts). Prints one line per figure.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use revboot_deployer::{Deployer, DeployerConfig, InstanceState, Instances};
use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};

const PATIENCE: Duration = Duration::from_secs(30);

fn count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn deploy(store: &Store, image: &Path, run: &str) -> Revision {
    let manifest =
        format!("[build]\ncommand = [\"true\"]\nartifacts = [\"hello\"]\n[run]\n{run}\n");
    store
        .write_deployment(NewDeployment {
            service: "hello",
            status: BuildStatus::Succeeded,
            manifest: Some(&manifest),
            images: vec![ImageInput {
                name: "hello".into(),
                reader: Box::new(std::fs::File::open(image).unwrap()),
            }],
            build_log: b"",
            source_commit: &"ab".repeat(20),
            source_repo: "hello",
            source_ref: Some("refs/heads/main"),
            subject: "bench",
        })
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Sends a request and waits for the first byte of the answer.
/// Where a process instance accepts connections: known from its summon on.
fn backend_of(summoned: &revboot_deployer::Summoned) -> SocketAddr {
    summoned
        .backend
        .get()
        .expect("a process instance's backend is known from its summon")
}

fn first_byte(address: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&address, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(())
}

/// The anchor: fork, place the pre-bound socket on fd 3, exec hello; no sandbox, no deployer.
fn floor_once(image: &CString, address: SocketAddr) -> Duration {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&address.into()).unwrap();
    socket.listen(4096).unwrap();
    let argv = [image.as_ptr(), std::ptr::null()];
    let fds = c"LISTEN_FDS=1";
    let start = Instant::now();
    // SAFETY: the child only makes system calls and formats into a stack buffer.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let mut pid_env = *b"LISTEN_PID=0000000000\0";
            let mut value = libc::getpid() as u32;
            let mut at = 20;
            loop {
                pid_env[at] = b'0' + (value % 10) as u8;
                value /= 10;
                if value == 0 {
                    break;
                }
                at -= 1;
            }
            // Move the digits right after '=' (position 11).
            let digits = 21 - at;
            std::ptr::copy(
                pid_env.as_ptr().add(at),
                pid_env.as_mut_ptr().add(11),
                digits,
            );
            pid_env[11 + digits] = 0;
            let envp = [fds.as_ptr(), pid_env.as_ptr().cast(), std::ptr::null()];
            // dup2 onto itself would leave fd 3 close-on-exec.
            if socket.as_raw_fd() == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else {
                libc::dup2(socket.as_raw_fd(), 3);
            }
            libc::execve(image.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    first_byte(address).unwrap();
    let elapsed = start.elapsed();
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    elapsed
}

async fn wait(
    state: &mut tokio::sync::watch::Receiver<InstanceState>,
    done: impl FnMut(&InstanceState) -> bool,
) -> InstanceState {
    tokio::time::timeout(PATIENCE, state.wait_for(done))
        .await
        .unwrap()
        .unwrap()
        .clone()
}

async fn until_empty(deployer: &Deployer) {
    let deadline = Instant::now() + PATIENCE;
    while !deployer.list().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn meminfo_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let cold = count("COLD", 1000);
    let storm = count("STORM", 1000);
    let crashes = count("CRASHES", 200);
    let image = revboot_testkit::hello_image();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(dir.path().join("deploy.git")).unwrap();
    let shared = deploy(
        &store,
        &image,
        "port = 8080\nready = { probe = \"socket\" }",
    );
    let per_client = deploy(
        &store,
        &image,
        "port = 8080\nready = { probe = \"socket\" }\nper_client = true\nidle_timeout_secs = 3600",
    );
    let mut config = DeployerConfig::new(dir.path().join("state"));
    config.name = format!("bench-{}", std::process::id());
    config.pools = vec!["127.79.0.0/16".parse().unwrap()];
    config.max_instances = storm + 16;
    config.max_per_service = storm + 16;
    config.max_clients_per_service = storm + 16;
    config.stop_grace_ms = 100;
    config.backoff.after_crashes = u32::MAX;
    let deployer: Arc<Deployer> =
        Deployer::new(config, store.clone(), tokio::runtime::Handle::current()).unwrap();

    // Warm the image cache and the page cache.
    let warm = deployer.summon("hello", &shared, None).unwrap();
    tokio::task::spawn_blocking(move || first_byte(backend_of(&warm)))
        .await
        .unwrap()
        .unwrap();
    let mut state = deployer.kill(&warm_key(&deployer)).unwrap();
    wait(&mut state, InstanceState::is_final).await;
    until_empty(&deployer).await;

    // 1. Cold starts, alternating with the anchor so both see the same machine.
    let floor_image = CString::new(image.as_os_str().as_encoded_bytes()).unwrap();
    let floor_address = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 80, 0, 1)), 8080);
    let mut revboot = Vec::with_capacity(cold);
    let mut floor = Vec::with_capacity(cold);
    for _ in 0..cold {
        let start = Instant::now();
        let summoned = deployer.summon("hello", &shared, None).unwrap();
        let backend = backend_of(&summoned);
        let answered = tokio::task::spawn_blocking(move || first_byte(backend))
            .await
            .unwrap();
        if let Err(error) = answered {
            let mut state = summoned.state.clone();
            let end = wait(&mut state, InstanceState::is_final).await;
            panic!("no answer from {backend}: {error}; the instance: {end:?}");
        }
        revboot.push(start.elapsed());
        let mut state = deployer.kill(&summoned.key).unwrap();
        wait(&mut state, InstanceState::is_final).await;
        until_empty(&deployer).await;
        let image = floor_image.clone();
        floor.push(
            tokio::task::spawn_blocking(move || floor_once(&image, floor_address))
                .await
                .unwrap(),
        );
    }
    revboot.sort();
    floor.sort();
    let (r50, r99, f50, f99) = (
        percentile(&revboot, 0.5),
        percentile(&revboot, 0.99),
        percentile(&floor, 0.5),
        percentile(&floor, 0.99),
    );
    println!(
        "cold start summon→first byte over {cold}: revboot p50 {} p99 {} | fork/exec floor p50 {} p99 {} | ratio p50 {:.2}× p99 {:.2}×",
        ms(r50),
        ms(r99),
        ms(f50),
        ms(f99),
        r50.as_secs_f64() / f50.as_secs_f64(),
        r99.as_secs_f64() / f99.as_secs_f64()
    );

    // 2. Crash detected → replacement ready.
    let mut replacement = Vec::with_capacity(crashes);
    let mut current = deployer.summon("hello", &shared, None).unwrap();
    wait(&mut current.state.clone(), InstanceState::is_serving).await;
    for _ in 0..crashes {
        let backend = backend_of(&current);
        let mut state = current.state.clone();
        tokio::task::spawn_blocking(move || {
            let _ = TcpStream::connect(backend)
                .and_then(|mut s| s.write_all(b"GET /crash HTTP/1.1\r\n\r\n"));
        });
        let end = wait(&mut state, InstanceState::is_final).await;
        let detected = Instant::now();
        assert!(matches!(end, InstanceState::Crashed { .. }), "{end:?}");
        current = deployer.summon("hello", &shared, None).unwrap();
        wait(&mut current.state.clone(), InstanceState::is_serving).await;
        replacement.push(detected.elapsed());
    }
    replacement.sort();
    println!(
        "crash detected→replacement ready over {crashes}: p50 {} p99 {}",
        ms(percentile(&replacement, 0.5)),
        ms(percentile(&replacement, 0.99))
    );
    let mut state = deployer.kill(&current.key).unwrap();
    wait(&mut state, InstanceState::is_final).await;
    until_empty(&deployer).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 3. Boot storm: one after another, all kept running.
    let available_before = meminfo_available_kib();
    let mut boots = Vec::with_capacity(storm);
    let storm_start = Instant::now();
    for i in 0..storm {
        let client = IpAddr::V4(Ipv4Addr::new(
            127,
            200,
            (i / 250) as u8,
            (i % 250 + 1) as u8,
        ));
        let start = Instant::now();
        let summoned = deployer.summon("hello", &per_client, Some(client)).unwrap();
        let state = wait(&mut summoned.state.clone(), |s| {
            s.is_serving() || s.is_final()
        })
        .await;
        assert!(state.is_serving(), "instance {i}: {state:?}");
        boots.push(start.elapsed());
    }
    let storm_total = storm_start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let descriptors = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let kinds = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            let mut kinds = std::collections::BTreeMap::<String, usize>::new();
            for entry in dir.flatten() {
                let target = std::fs::read_link(entry.path()).unwrap_or_default();
                let target = target.to_string_lossy();
                let kind = if target.starts_with("/sys/fs/cgroup") {
                    "cgroup file".to_owned()
                } else if target.starts_with('/') {
                    "file".to_owned()
                } else {
                    target.chars().take_while(|c| *c != ':').collect()
                };
                *kinds.entry(kind).or_default() += 1;
            }
            kinds
        })
        .unwrap_or_default();
    let used_kib = available_before.saturating_sub(meminfo_available_kib());
    let cgroup_bytes: u64 = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/revboot/{}/memory.usage_in_bytes",
        deployer.config().name
    ))
    .ok()
    .and_then(|v| v.trim().parse().ok())
    .unwrap_or(0);
    let running = deployer
        .list()
        .iter()
        .filter(|i| i.state.is_serving())
        .count();
    let marks: Vec<String> = [1, 10, 100, 500, storm]
        .iter()
        .filter(|&&n| n <= storm)
        .map(|&n| format!("#{n} {}", ms(boots[n - 1])))
        .collect();
    let mut sorted = boots.clone();
    sorted.sort();
    println!(
        "boot storm {storm} (all running: {running}) in {:.2} s: {} | p50 {} p99 {} | last/first {:.2}×",
        storm_total.as_secs_f64(),
        marks.join(", "),
        ms(percentile(&sorted, 0.5)),
        ms(percentile(&sorted, 0.99)),
        boots[storm - 1].as_secs_f64() / boots[0].as_secs_f64()
    );
    // One boot is one sample of a shared machine: also the median of the ten boots ending
    // at each mark, the boot time at that many instances.
    let window = |n: usize| {
        let mut around = boots[n.saturating_sub(10)..n].to_vec();
        around.sort();
        around[around.len() / 2]
    };
    let windows: Vec<String> = [10, 100, 500, storm]
        .iter()
        .filter(|&&n| n <= storm)
        .map(|&n| format!("#{}–{n} {}", n.saturating_sub(9).max(1), ms(window(n))))
        .collect();
    println!(
        "  medians of ten: {} | last ten/first ten {:.2}×",
        windows.join(", "),
        window(storm).as_secs_f64() / window(10.min(storm)).as_secs_f64()
    );
    println!(
        "memory per instance: {:.0} KiB charged to its cgroup, {:.0} KiB of host memory (MemAvailable delta, kernel included)",
        cgroup_bytes as f64 / 1024.0 / storm as f64,
        used_kib as f64 / storm as f64
    );
    println!(
        "daemon descriptors with {storm} instances: {descriptors} ({:.2} per instance): {kinds:?}",
        descriptors as f64 / storm as f64
    );
    // STORM_HOLD_SECS keeps the storm running for a look from outside (slabinfo, ps).
    let hold = count("STORM_HOLD_SECS", 0);
    if hold > 0 {
        println!(
            "holding {storm} instances for {hold} s (pid {})",
            std::process::id()
        );
        tokio::time::sleep(Duration::from_secs(hold as u64)).await;
    }
    deployer.shutdown().await;
}

fn warm_key(deployer: &Deployer) -> revboot_deployer::InstanceKey {
    deployer.list().first().unwrap().key.clone()
}
