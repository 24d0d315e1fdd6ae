//! With the real deployer, a real store and the real `examples/hello` image: a DNS answer
//! boots the revision it names, and the answered address serves that revision.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use revboot_deployer::{Deployer, DeployerConfig};
use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// How long a test waits for an instance to answer (a bound, not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(30);

use revboot_testkit::hello_image;

const MANIFEST: &str = "[build]\ncommand = [\"true\"]\nartifacts = [\"hello\"]\n\n\
    [run]\nport = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }\n";

fn deploy(store: &Store, image: &Path, n: u32) -> Revision {
    let file = std::fs::File::open(image).expect("image opens");
    let source = format!("{n:08x}").repeat(5);
    store
        .write_deployment(NewDeployment {
            service: "hello",
            status: BuildStatus::Succeeded,
            manifest: Some(MANIFEST),
            images: vec![ImageInput {
                name: "hello".into(),
                reader: Box::new(file),
            }],
            build_log: b"built by the dns test\n",
            source_commit: &source,
            source_repo: "hello",
            source_ref: Some("refs/heads/main"),
            subject: "dns test build",
        })
        .expect("deployment written")
}

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    deployer: Arc<Deployer>,
}

static NEXT: AtomicU8 = AtomicU8::new(0);

fn world(max_instances: usize) -> World {
    let index = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::init(dir.path().join("deploy.git")).expect("store");
    let mut config = DeployerConfig::new(dir.path().join("state"));
    config.name = format!("dns-test-{index}-{}", std::process::id());
    config.pools = vec![
        revboot_testkit::test_pool(revboot_testkit::PoolRange::Dns, index)
            .parse()
            .expect("pool"),
    ];
    config.max_instances = max_instances;
    config.stop_grace_ms = 200;
    let deployer = Deployer::new(config, store.clone(), tokio::runtime::Handle::current())
        .expect("deployer starts");
    World {
        _dir: dir,
        store,
        deployer,
    }
}

fn address(response: &hickory_proto::op::DnsResponse) -> IpAddr {
    response
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("an A record in {response:?}"))
}

async fn http_get(address: SocketAddr) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("HTTP answer in time")
        .expect("HTTP exchange")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_sha_boots_that_revision_and_live_follows_the_pointer() {
    let image = tokio::task::spawn_blocking(hello_image)
        .await
        .expect("build");
    let world = world(16);
    let first = deploy(&world.store, &image, 1);
    let second = deploy(&world.store, &image, 2);
    world
        .store
        .set_live("hello", &first, "dns test")
        .expect("live set");
    let server = start(config(), world.deployer.clone()).await;
    let mut udp = udp_client(server.local_addr()).await;
    let mut tcp = tcp_client(server.local_addr()).await;

    // <short-sha>.hello.<zone>, over UDP and TCP: that revision boots and serves.
    for (transport, client, revision) in [("udp", &mut udp, second), ("tcp", &mut tcp, first)] {
        let qname = format!("{}.hello.revboot.test.", revision.short(7));
        let response = ask(client, &qname, RecordType::A).await;
        assert_eq!(response.response_code, ResponseCode::NoError, "{transport}");
        assert!(response.authoritative, "{transport}");
        let body = http_get(SocketAddr::new(address(&response), 8080)).await;
        assert!(body.starts_with("HTTP/1.1 200"), "{transport}: {body}");
        assert!(
            body.contains(&revision.to_hex()),
            "{transport}: serves {revision}: {body}"
        );
    }

    // hello.<zone> follows live.
    let live = ask(&mut udp, "hello.revboot.test.", RecordType::A).await;
    let body = http_get(SocketAddr::new(address(&live), 8080)).await;
    assert!(body.contains(&first.to_hex()), "live is the first: {body}");
    world
        .store
        .set_live("hello", &second, "dns test rollforward")
        .expect("live moved");
    let live = ask(&mut udp, "hello.revboot.test.", RecordType::A).await;
    let body = http_get(SocketAddr::new(address(&live), 8080)).await;
    assert!(
        body.contains(&second.to_hex()),
        "live moved to the second: {body}"
    );

    // Negative answers come from the real resolver too.
    let r = ask(&mut udp, "fffffff.hello.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    let r = ask(&mut udp, "nope.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert!(
        world.deployer.list().len() <= 2,
        "one instance per revision"
    );
    server.shutdown().await.expect("clean shutdown");
    world.deployer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stays_cached_while_other_instances_boot_and_not_after_its_own_stops() {
    let image = tokio::task::spawn_blocking(hello_image)
        .await
        .expect("build");
    let world = world(16);
    let revisions: Vec<Revision> = (1..=3).map(|n| deploy(&world.store, &image, n)).collect();
    world
        .store
        .set_live("hello", &revisions[0], "dns test")
        .expect("live set");
    let server = start(config(), world.deployer.clone()).await;
    let mut udp = udp_client(server.local_addr()).await;
    let cached = format!("{}.hello.revboot.test.", revisions[0].short(7));
    let first = address(&ask(&mut udp, &cached, RecordType::A).await);
    let misses = server.metrics().cache_misses;

    // Other names boot other instances; the first answer is still served from the cache.
    for revision in &revisions[1..] {
        let qname = format!("{}.hello.revboot.test.", revision.short(7));
        let other = address(&ask(&mut udp, &qname, RecordType::A).await);
        assert!(
            http_get(SocketAddr::new(other, 8080))
                .await
                .starts_with("HTTP/1.1 200")
        );
        let again = ask(&mut udp, &cached, RecordType::A).await;
        assert_eq!(address(&again), first);
    }
    assert_eq!(
        server.metrics().cache_misses,
        misses + 2,
        "only the two new names missed the cache"
    );

    // Its instance stopped: the next query boots it again rather than answer a dead address.
    let key = world
        .deployer
        .list()
        .into_iter()
        .find(|i| i.key.revision == revisions[0])
        .expect("the first instance runs")
        .key;
    let mut state = world.deployer.kill(&key).expect("kill");
    tokio::time::timeout(PATIENCE, state.wait_for(|s| s.is_final()))
        .await
        .expect("stopped in time")
        .expect("state");
    let booted = address(&ask(&mut udp, &cached, RecordType::A).await);
    assert_eq!(server.metrics().cache_misses, misses + 3);
    let body = http_get(SocketAddr::new(booted, 8080)).await;
    assert!(body.contains(&revisions[0].to_hex()), "{body}");
    server.shutdown().await.expect("clean shutdown");
    world.deployer.shutdown().await;
}

/// A small deterministic generator.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_distinct_revisions_stays_within_the_deployers_cap() {
    const CAP: usize = 4;
    const REVISIONS: u32 = 40;
    const PER_SOURCE: usize = 25_000;
    let image = tokio::task::spawn_blocking(hello_image)
        .await
        .expect("build");
    let world = world(CAP);
    let revisions: Vec<Revision> = (0..REVISIONS)
        .map(|n| deploy(&world.store, &image, 100 + n))
        .collect();
    world
        .store
        .set_live("hello", &revisions[0], "dns test")
        .expect("live set");
    let mut config = config();
    config.limits.rrl_per_second = 500;
    config.limits.rrl_burst = 1000;
    config.limits.boots_per_second = 5;
    config.limits.boot_burst = 10;
    let server = start(config, world.deployer.clone()).await;
    let addr = server.local_addr();
    // The legitimate service is running before the flood.
    let mut client = udp_client(addr).await;
    let mut tcp = tcp_client(addr).await;
    let live = address(&ask(&mut tcp, "hello.revboot.test.", RecordType::A).await);

    let mut flooders = Vec::new();
    for source in 1..=4u8 {
        let from: SocketAddr = format!("127.0.{source}.1:0").parse().expect("address");
        let labels: Vec<String> = revisions.iter().map(|r| r.short(7)).collect();
        flooders.push(tokio::spawn(async move {
            let socket = tokio::net::UdpSocket::bind(from)
                .await
                .expect("flood socket");
            let mut rng = SplitMix(u64::from(source));
            for i in 0..PER_SOURCE {
                let id = rng.next() as u16;
                let packet = match rng.next() % 4 {
                    0 | 1 => {
                        let label = &labels[(rng.next() % labels.len() as u64) as usize];
                        wire_query(id, &[label, "hello", "revboot", "test"], 1)
                    }
                    2 => {
                        let label = format!("{:07x}", rng.next() & 0xfff_ffff);
                        wire_query(id, &[&label, "hello", "revboot", "test"], 1)
                    }
                    _ => (0..(rng.next() % 64) as usize)
                        .map(|_| rng.next() as u8)
                        .collect(),
                };
                let _ = socket.send_to(&packet, addr).await;
                if i % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let mut peak = 0;
    let mut answered = None;
    let deadline = Instant::now() + PATIENCE;
    while flooders.iter().any(|f| !f.is_finished()) || answered.is_none() {
        peak = peak.max(world.deployer.list().len());
        if answered.is_none() {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                hickory_net::client::ClientHandle::query(
                    &mut client,
                    name("hello.revboot.test."),
                    hickory_proto::rr::DNSClass::IN,
                    RecordType::A,
                ),
            )
            .await;
            if let Ok(Ok(response)) = attempt {
                answered = Some(response);
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < deadline,
            "flood or legitimate answer took too long"
        );
    }
    for flooder in flooders {
        flooder.await.expect("flooder");
    }
    peak = peak.max(world.deployer.list().len());
    assert!(peak <= CAP, "{peak} instances at once, cap {CAP}");
    let answered = answered.expect("legitimate answer");
    assert_eq!(answered.response_code, ResponseCode::NoError);
    assert_eq!(address(&answered), live, "the running live instance");
    let body = http_get(SocketAddr::new(live, 8080)).await;
    assert!(body.contains(&revisions[0].to_hex()), "{body}");
    let metrics = server.metrics();
    assert!(
        metrics.servfail + metrics.boot_limited > 0,
        "caps were hit: {metrics:?}"
    );
    // Still answering after the flood.
    let mut tcp = tcp_client(addr).await;
    let r = ask(&mut tcp, "hello.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    server.shutdown().await.expect("clean shutdown");
    world.deployer.shutdown().await;
}
