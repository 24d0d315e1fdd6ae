//! A DNS server for benchmarks (`bench/dns-qps.sh`), on the real deployer or a fake.
//!
//! ```text
//! dns-bench serve ADDR (--deployer IMAGE | --proxy IMAGE | --fake)   answer until SIGINT/SIGTERM
//! dns-bench cold COUNT (--deployer IMAGE | --proxy IMAGE | --fake)   time COUNT names that each summon
//! ```
//!
//! With `--deployer`, a temporary deployment repository gets `hello` deployments of IMAGE
//! (e.g. examples/hello's static binary) and a real deployer boots them, each instance on
//! its service address itself; `--proxy` puts the handshake proxy in front, as the daemon
//! does by default (instances on an ephemeral port, warm connections steered past the
//! proxy); `--fake` uses an in-memory stand-in whose summons cost nothing. `serve` prints `ready <name>` once the
//! live revision is running, `<name>` being a `<short-sha>.hello.revboot.test` it answers.
//! Rate limits are off: the benchmark measures the answer path.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use revboot_deployer::{BackendPort, Deployer, DeployerConfig, Instances};
use revboot_dns::{DnsConfig, DnsServer};
use revboot_proxy::{Proxy, ProxyConfig};
use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};
use revboot_testkit::instances::{Behaviour, Fake, FakeRevision, FakeService, revision};

const MANIFEST: &str = "[build]\ncommand = [\"true\"]\nartifacts = [\"hello\"]\n\n\
    [run]\nport = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }\n";

/// What answers behind the DNS server, and the revisions it knows.
struct Backend {
    instances: Arc<dyn Instances>,
    revisions: Vec<Revision>,
    deployer: Option<Arc<Deployer>>,
    _dir: Option<tempfile::TempDir>,
}

fn deploy(store: &Store, image: &Path, n: usize) -> anyhow::Result<Revision> {
    let file =
        std::fs::File::open(image).with_context(|| format!("Cannot open {}", image.display()))?;
    let source = format!("{n:08x}").repeat(5);
    Ok(store.write_deployment(NewDeployment {
        service: "hello",
        status: BuildStatus::Succeeded,
        manifest: Some(MANIFEST),
        images: vec![ImageInput {
            name: "hello".into(),
            reader: Box::new(file),
        }],
        build_log: b"bench\n",
        source_commit: &source,
        source_repo: "hello",
        source_ref: Some("refs/heads/main"),
        subject: "bench build",
    })?)
}

fn backend(args: &[String], count: usize) -> anyhow::Result<Backend> {
    match args {
        [flag] if flag == "--fake" => {
            let fake = Fake::new(Behaviour {
                cap: count + 16,
                ..Behaviour::default()
            });
            let revisions: Vec<Revision> = (0..count as u64).map(revision).collect();
            fake.add_service(
                "hello",
                FakeService {
                    per_client: false,
                    port: 8080,
                    reach: revboot_deployer::Reach::Address,
                    revisions: revisions
                        .iter()
                        .map(|r| FakeRevision {
                            revision: *r,
                            tags: vec![],
                            bootable: true,
                        })
                        .collect(),
                    live: revisions.first().copied(),
                },
            );
            Ok(Backend {
                instances: fake,
                revisions,
                deployer: None,
                _dir: None,
            })
        }
        [flag, image] if flag == "--deployer" || flag == "--proxy" => {
            let image = PathBuf::from(image);
            let dir = tempfile::tempdir()?;
            let store = Store::init(dir.path().join("deploy.git"))?;
            let revisions = (0..count)
                .map(|n| deploy(&store, &image, n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            store.set_live("hello", &revisions[0], "bench")?;
            let mut config = DeployerConfig::new(dir.path().join("state"));
            config.name = format!("dns-bench-{}", std::process::id());
            config.pools = vec!["127.81.0.0/16".parse().expect("pool")];
            config.max_instances = count + 16;
            config.stop_grace_ms = 200;
            let proxied = flag == "--proxy";
            if proxied {
                // The daemon's default: the proxy on the service address, the instance on
                // an ephemeral port beside it, warm connections steered past the proxy.
                config.backend_port = BackendPort::Ephemeral;
            }
            let deployer = Deployer::new(config, store, tokio::runtime::Handle::current())?;
            let instances: Arc<dyn Instances> = if proxied {
                Proxy::new(ProxyConfig::default(), deployer.clone())
            } else {
                deployer.clone()
            };
            Ok(Backend {
                instances,
                revisions,
                deployer: Some(deployer),
                _dir: Some(dir),
            })
        }
        _ => bail!("Expected --fake, --deployer IMAGE or --proxy IMAGE"),
    }
}

fn config(listen: SocketAddr) -> DnsConfig {
    let mut config = DnsConfig {
        listen,
        ..DnsConfig::default()
    };
    config.limits.rrl_per_second = 0;
    config.limits.boots_per_second = 0;
    config
}

fn query(id: u16, label: &str) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for part in [label, "hello", "revboot", "test"] {
        p.push(part.len() as u8);
        p.extend_from_slice(part.as_bytes());
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    p
}

/// Sends `packet` and waits for the reply with the same id.
async fn exchange(
    socket: &tokio::net::UdpSocket,
    server: SocketAddr,
    packet: &[u8],
) -> anyhow::Result<Vec<u8>> {
    socket.send_to(packet, server).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .context("No answer in 5 s")??;
        if buf[..2] == packet[..2] {
            return Ok(buf[..len].to_vec());
        }
    }
}

async fn serve(listen: SocketAddr, args: &[String]) -> anyhow::Result<()> {
    let backend = backend(args, 1)?;
    let server = DnsServer::bind(config(listen), backend.instances.clone())
        .await?
        .spawn();
    let label = backend.revisions[0].short(7);
    // Summon the live revision and wait until it serves, so the benchmark hits a running one.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    exchange(&socket, server.local_addr(), &query(1, &label)).await?;
    let summoned = backend
        .instances
        .summon("hello", &backend.revisions[0], None)?;
    let mut state = summoned.state.clone();
    tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| s.is_serving()))
        .await
        .context("Instance not ready in 30 s")??;
    println!("ready {label}.hello.revboot.test");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let metrics = server.metrics();
    server.shutdown().await?;
    eprintln!("{metrics:?}");
    if let Some(deployer) = backend.deployer {
        deployer.shutdown().await;
    }
    Ok(())
}

fn percentiles(label: &str, mut micros: Vec<f64>) {
    micros.sort_by(f64::total_cmp);
    let at =
        |q: f64| micros[((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len()) - 1];
    println!(
        "{label}: {} names, p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        micros.len(),
        at(0.50),
        at(0.99),
        at(1.0),
    );
}

/// Times cold names: a third as direct deployer calls (its share of the cost), a third by
/// DNS one at a time (each instance ready and settled before the next query), a third by DNS back to
/// back (boots of earlier names compete for the CPU). Each cold query is paired with a
/// query for a name whose instance is running (a cached answer), by the same client right
/// after: the anchor, which shows what the machine and the measurement cost at that
/// moment. One at a time, a cached name is also asked after the same pause a cold name
/// follows: a sleeping server and client wake slower, so that is the like-for-like floor.
/// How long "one at a time" lets a ready instance settle before the next cold query, so
/// that mode times the answer path alone: hello is "ready" at exec while its start-up
/// still runs, and the process tender refills its namespace pool 20 ms after a boot (a
/// network namespace costs milliseconds of CPU). With 3 or 20 ms here the next answer
/// meets that work; "back to back" shows answers beside boots on purpose.
const SETTLE: Duration = Duration::from_millis(50);

async fn cold(count: usize, args: &[String]) -> anyhow::Result<()> {
    let backend = backend(args, count + 1)?;
    // Let the freshly written repository settle, as it would have long before a query.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server = DnsServer::bind(config("127.0.0.1:0".parse()?), backend.instances.clone())
        .await?
        .spawn();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    exchange(&socket, server.local_addr(), &query(0, "nonexistent")).await?;
    let (anchor, revisions) = backend.revisions.split_first().context("no revisions")?;
    let anchor = query(0xfff0, &anchor.short(7));
    exchange(&socket, server.local_addr(), &anchor).await?;
    let (direct, rest) = revisions.split_at(count / 3);
    let (spaced, back_to_back) = rest.split_at(rest.len() / 2);
    // The deployer's own share: resolve + summon called directly (no DNS), one at a time.
    let (mut resolve_us, mut summon_us) = (Vec::new(), Vec::new());
    for revision in direct {
        let started = Instant::now();
        let resolved = backend
            .instances
            .resolve("hello", Some(&revision.short(7)))?;
        resolve_us.push(micros(started));
        let started = Instant::now();
        let mut state = backend
            .instances
            .summon("hello", &resolved.revision, None)?
            .state;
        summon_us.push(micros(started));
        tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| s.is_serving()))
            .await
            .context("Instance not ready in 30 s")??;
        tokio::time::sleep(SETTLE).await;
    }
    percentiles("resolve() alone", resolve_us);
    percentiles("summon() alone", summon_us);
    // The client is another process in real life: here a blocking socket on its own
    // thread, so its wake-ups do not wait behind the deployer's tasks on this runtime.
    let runtime = tokio::runtime::Handle::current();
    let server_address = server.local_addr();
    let instances = backend.instances.clone();
    let (spaced, back_to_back) = (spaced.to_vec(), back_to_back.to_vec());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.connect(server_address)?;
        let exchange = |packet: &[u8]| -> anyhow::Result<Vec<u8>> {
            socket.send(packet)?;
            let mut buf = [0u8; 4096];
            loop {
                let len = socket.recv(&mut buf).context("No answer in 5 s")?;
                if buf[..2] == packet[..2] {
                    return Ok(buf[..len].to_vec());
                }
            }
        };
        for (label, revisions, wait) in [
            ("one at a time", &spaced, true),
            ("back to back", &back_to_back, false),
        ] {
            let mut cold_us = Vec::with_capacity(revisions.len());
            let mut anchor_us = Vec::with_capacity(revisions.len());
            let mut idle_us = Vec::with_capacity(revisions.len());
            for (i, revision) in revisions.iter().enumerate() {
                if wait {
                    let started = Instant::now();
                    exchange(&anchor)?;
                    idle_us.push(micros(started));
                    std::thread::sleep(SETTLE);
                }
                let packet = query(i as u16 + 1, &revision.short(7));
                let started = Instant::now();
                let reply = exchange(&packet)?;
                cold_us.push(micros(started));
                if reply[3] & 0x0f != 0 || reply[7] != 1 {
                    bail!(
                        "Cold name {i} was not answered with an address: rcode {}",
                        reply[3] & 0x0f
                    );
                }
                let started = Instant::now();
                exchange(&anchor)?;
                anchor_us.push(micros(started));
                if wait {
                    let mut state = instances.summon("hello", revision, None)?.state;
                    runtime.block_on(async {
                        tokio::time::timeout(
                            Duration::from_secs(30),
                            state.wait_for(|s| s.is_serving()),
                        )
                        .await
                        .context("Instance not ready in 30 s")?
                        .map(drop)
                        .context("Instance gone")
                    })?;
                    std::thread::sleep(SETTLE);
                }
            }
            percentiles(&format!("cold answers, {label}"), cold_us);
            percentiles(&format!("  anchor: a cached name, {label}"), anchor_us);
            if !idle_us.is_empty() {
                percentiles(
                    &format!("  anchor: a cached name after the same pause, {label}"),
                    idle_us,
                );
            }
        }
        Ok(())
    })
    .await??;
    println!("summons: {}", server.metrics().summons);
    server.shutdown().await?;
    if let Some(deployer) = backend.deployer {
        deployer.shutdown().await;
    }
    Ok(())
}

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match args.as_slice() {
            [mode, listen, rest @ ..] if mode == "serve" => serve(listen.parse()?, rest).await,
            [mode, count, rest @ ..] if mode == "cold" => cold(count.parse()?, rest).await,
            _ => bail!("Usage: dns-bench serve ADDR (--fake | --deployer IMAGE) | cold COUNT (--fake | --deployer IMAGE)"),
        }
    })
}
