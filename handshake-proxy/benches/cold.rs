//! Cold starts through the proxy against cold starts on the instance's own socket, in one
//! run: the real deployer, the real `examples/hello` image, a real store, loopback TCP.
//!
//! Each round summons a stopped instance (what a DNS answer does), connects, sends a
//! request and times the first byte of the answer; then kills the instance and waits until
//! it is gone. Rounds alternate between the two paths so that both see the same noise:
//!
//! - `proxied`: connect to the service address; the proxy holds the connection until the
//!   instance is ready, then splices it;
//! - `direct`: connect to the instance's own listening socket (bound before the boot; the
//!   kernel holds the handshake until the instance accepts).
//!
//! `cargo bench -p revboot-proxy --bench cold -- [rounds per path, default 1000]`; run as
//! root (the process tender's sandbox needs it).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use revboot_deployer::{BackendPort, Deployer, DeployerConfig, InstanceState, Instances};
use revboot_proxy::{Proxy, ProxyConfig};
use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(30);

use revboot_testkit::hello_image;

fn deploy(store: &Store, image: &Path) -> Revision {
    let manifest = "[build]\ncommand = [\"true\"]\nartifacts = [\"hello\"]\n\n[run]\n\
                    port = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }\n";
    store
        .write_deployment(NewDeployment {
            service: "hello",
            status: BuildStatus::Succeeded,
            manifest: Some(manifest),
            images: vec![ImageInput {
                name: "hello".to_owned(),
                reader: Box::new(std::fs::File::open(image).expect("image")),
            }],
            build_log: b"bench\n",
            source_commit: &"cd".repeat(20),
            source_repo: "hello",
            source_ref: Some("refs/heads/main"),
            subject: "bench build",
        })
        .expect("deployment")
}

/// Connect, request, first byte; the time to the first byte. Reads the rest.
async fn first_byte(to: SocketAddr, started: Instant) -> std::io::Result<Duration> {
    let exchange = async {
        let mut stream = TcpStream::connect(to).await?;
        stream.set_nodelay(true)?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
            .await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        let at = started.elapsed();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
        std::io::Result::Ok(at)
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    let p50 = percentile(&samples, 0.50);
    println!(
        "{name:8} n={} p50={:.2} ms p99={:.2} ms mean={:.2} ms max={:.2} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
    );
    p50
}

async fn run(rounds: usize) {
    let image = hello_image();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::init(dir.path().join("deploy.git")).expect("store");
    let revision = deploy(&store, &image);
    let mut config = DeployerConfig::new(dir.path().join("state"));
    config.name = format!("proxy-bench-{}", std::process::id());
    config.pools = vec!["127.81.0.0/16".parse().expect("pool")];
    config.backend_port = BackendPort::Ephemeral;
    config.stop_grace_ms = 200;
    // Kill-and-reboot in a loop is not a crash loop.
    config.backoff.after_crashes = u32::MAX;
    let deployer =
        Deployer::new(config, store, tokio::runtime::Handle::current()).expect("deployer");
    let inner: Arc<dyn Instances> = deployer.clone();
    let proxy = Proxy::new(ProxyConfig::default(), inner);
    let mut proxied = Vec::with_capacity(rounds);
    let mut direct = Vec::with_capacity(rounds);
    let mut failures = 0usize;
    let mut ready_states = Vec::with_capacity(rounds);
    for round in 0..rounds * 2 {
        let through_proxy = round % 2 == 0;
        let started = Instant::now();
        let (summoned, to) = if through_proxy {
            let summoned = proxy.summon("hello", &revision, None).expect("summon");
            let to = SocketAddr::new(summoned.addresses.primary(), summoned.port);
            (summoned, to)
        } else {
            let summoned = deployer.summon("hello", &revision, None).expect("summon");
            let to = summoned
                .backend
                .get()
                .expect("a process instance's backend is known");
            (summoned, to)
        };
        // A new instance every round: the previous one was killed and is gone.
        let mut watching = summoned.state.clone();
        let ready_at = tokio::spawn(async move {
            let _ = watching.wait_for(InstanceState::is_serving).await;
            started.elapsed()
        });
        match first_byte(to, started).await {
            Ok(at) if through_proxy => proxied.push(at),
            Ok(at) => {
                direct.push(at);
                if let Ok(Ok(ready)) = tokio::time::timeout(PATIENCE, ready_at).await {
                    ready_states.push(ready);
                }
            }
            Err(error) => {
                let path = if through_proxy { "proxied" } else { "direct" };
                eprintln!("round {round} ({path}, {to}): {error}");
                failures += 1;
            }
        }
        let mut state = deployer.kill(&summoned.key).expect("running");
        tokio::time::timeout(PATIENCE, state.wait_for(InstanceState::is_final))
            .await
            .expect("gone in time")
            .expect("state");
    }
    println!("cold start: summon + connect + request + first byte, hello on the process tender");
    let p = report("proxied", proxied);
    let d = report("direct", direct);
    println!("(direct rounds: summon to the deployer reporting Ready)");
    report("ready", ready_states);
    println!(
        "proxied p50 - direct p50 = {:.3} ms",
        (p.as_secs_f64() - d.as_secs_f64()) * 1e3
    );
    println!("failed rounds: {failures}");
    let metrics = proxy.metrics();
    println!(
        "proxy: held={} spliced={} refused={} boot_failures={}",
        metrics.held, metrics.spliced, metrics.refused, metrics.boot_failures
    );
    proxy.shutdown();
    deployer.shutdown().await;
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let rounds = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse::<usize>().ok())
        .unwrap_or(1000);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(rounds));
}
