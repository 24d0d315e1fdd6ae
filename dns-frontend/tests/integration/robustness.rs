//! Arbitrary packets and floods, of queries or of idle TCP connections: no panic, no hang,
//! bounded summons, still answering.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use revboot_deployer::InstanceState;
use revboot_dns::DnsConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;
use revboot_testkit::instances::{Behaviour, Boot, FakeRevision, FakeService, revision};

/// A small deterministic generator (the flood needs volume, not quality).
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

fn packets() -> impl Strategy<Value = Vec<u8>> {
    let valid = wire_query(0x4242, &["abcdef1", "hello", "revboot", "test"], 1);
    let mut with_opt = valid.clone();
    with_opt[11] = 1;
    with_opt.extend_from_slice(&[
        0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 11, 0, 8, 0, 7, 0, 1, 24, 0, 10, 1, 2,
    ]);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (
            prop_oneof![Just(valid), Just(with_opt)],
            proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            any::<usize>(),
        )
            .prop_map(|(mut p, edits, cut)| {
                for (at, byte) in edits {
                    let len = p.len();
                    p[at % len] = byte;
                }
                let keep = p.len() - cut % 8;
                p.truncate(keep.max(1));
                p
            }),
    ]
}

#[test]
fn arbitrary_packets_neither_crash_nor_hang_the_server() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    config.trust_ecs = true;
    let server = runtime.block_on(start(config, fake));
    let addr = server.local_addr();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let tcp = runtime
        .block_on(tokio::net::TcpStream::connect(addr))
        .expect("tcp connects");
    let tcp = std::cell::RefCell::new(tcp);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&packets(), |packet| {
            udp.send_to(&packet, addr).expect("udp send");
            let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&packet);
            runtime
                .block_on(tcp.borrow_mut().write_all(&framed))
                .expect("tcp send");
            Ok(())
        })
        .expect("no case fails");
    // The TCP connection that carried every case still answers a good query.
    let good = wire_query(7, &["hello", "revboot", "test"], 1);
    let mut framed = (good.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&good);
    let mut tcp = tcp.into_inner();
    let answered = runtime.block_on(async {
        tcp.write_all(&framed).await.expect("tcp send");
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let len = tcp.read_u16().await.expect("framed reply") as usize;
                let mut reply = vec![0u8; len];
                tcp.read_exact(&mut reply).await.expect("reply body");
                if reply[..2] == [0, 7] {
                    return reply;
                }
            }
        })
        .await
        .expect("answer in time")
    });
    assert_eq!(answered[3] & 0x0f, 0, "NOERROR after the fuzz over TCP");
    runtime.block_on(async {
        let mut client = udp_client(addr).await;
        let r = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::NoError, "UDP still answers");
        server.shutdown().await.expect("clean shutdown");
    });
}

fn flood_name(rng: &mut SplitMix) -> Vec<u8> {
    let id = rng.next() as u16;
    match rng.next() % 10 {
        // A valid revision of `many`.
        0..=3 => {
            let label = revision(1000 + rng.next() % 2000).short(7);
            wire_query(id, &[&label, "many", "revboot", "test"], 1)
        }
        // A random label: almost always NXDOMAIN.
        4..=6 => {
            let label = format!("{:07x}", rng.next() & 0xfff_ffff);
            wire_query(id, &[&label, "many", "revboot", "test"], 1)
        }
        7 => wire_query(id, &["www", "example", "com"], 1),
        // Garbage.
        _ => (0..(rng.next() % 80) as usize)
            .map(|_| rng.next() as u8)
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_valid_and_invalid_names_stays_within_caps_and_legit_queries_get_through() {
    const CAP: usize = 8;
    const PER_SOURCE: usize = 25_000;
    const SOURCES: u8 = 4;
    let fake = fake(CAP, Boot::Instant);
    fake.add_service(
        "many",
        FakeService {
            per_client: false,
            port: 8080,
            reach: revboot_deployer::Reach::Address,
            revisions: (0..2000)
                .map(|i| FakeRevision {
                    revision: revision(1000 + i),
                    tags: vec![],
                    bootable: true,
                })
                .collect(),
            live: None,
        },
    );
    let mut config = config();
    // Low enough that each flooding /24 exceeds it even when the kernel drops most of the
    // flood before the server reads it.
    config.limits.rrl_per_second = 100;
    config.limits.rrl_burst = 200;
    config.limits.boots_per_second = 5;
    config.limits.boot_burst = 10;
    let server = start(config, fake.clone()).await;
    let addr = server.local_addr();
    // The service the legitimate client uses is running before the flood starts.
    let mut tcp = tcp_client(addr).await;
    let before = ask(&mut tcp, "hello.revboot.test.", RecordType::A).await;
    let mut client = udp_client(addr).await;
    assert_eq!(before.response_code, ResponseCode::NoError);
    let started = Instant::now();
    let mut flooders = Vec::new();
    for source in 1..=SOURCES {
        // Each source in its own /24, none in 127.0.0.0/24 where the legit client is.
        let from: SocketAddr = format!("127.0.{source}.1:0").parse().expect("address");
        flooders.push(tokio::spawn(async move {
            let socket = tokio::net::UdpSocket::bind(from)
                .await
                .expect("flood socket");
            let mut rng = SplitMix(u64::from(source));
            for i in 0..PER_SOURCE {
                let packet = flood_name(&mut rng);
                // Send errors (buffer full) are part of a flood; keep going.
                let _ = socket.send_to(&packet, addr).await;
                if i % 256 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // While the flood runs: a legitimate client (retrying, as resolvers do) gets its answer.
    let mut answered = None;
    for _ in 0..5 {
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
            break;
        }
    }
    let during_flood = flooders.iter().any(|f| !f.is_finished());
    for flooder in flooders {
        flooder.await.expect("flooder");
    }
    let elapsed = started.elapsed().as_secs() + 1;
    let answered = answered.expect("the legitimate query was answered");
    assert_eq!(answered.response_code, ResponseCode::NoError);
    assert_eq!(answered.answers.len(), 1);
    if !during_flood {
        eprintln!("note: the flood finished before the legitimate answer came back");
    }
    assert!(
        fake.running() <= CAP,
        "{} instances running",
        fake.running()
    );
    // Summons are bounded by the per-prefix boot limit, not by the flood's size.
    let summons = fake.summons.load(Ordering::SeqCst);
    let bound = u64::from(SOURCES) * (10 + 5 * elapsed) + 10;
    assert!(summons <= bound, "{summons} summons > {bound}");
    let metrics = server.metrics();
    assert!(metrics.boot_limited > 0, "{metrics:?}");
    assert!(metrics.rate_limited > 0, "{metrics:?}");
    // And the server is still up afterwards.
    let mut client = tcp_client(addr).await;
    let r = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    server.shutdown().await.expect("clean shutdown");
}

/// Sends a query for `labels` A over TCP.
async fn send_query(stream: &mut TcpStream, id: u16, labels: &[&str]) {
    let query = wire_query(id, labels, 1);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    stream.write_all(&framed).await.expect("tcp send");
}

/// Reads one framed reply.
async fn read_reply(stream: &mut TcpStream) -> Vec<u8> {
    let len = tokio::time::timeout(TIMEOUT, stream.read_u16())
        .await
        .expect("reply in time")
        .expect("framed reply");
    let mut reply = vec![0u8; usize::from(len)];
    stream.read_exact(&mut reply).await.expect("reply body");
    reply
}

async fn tcp_exchange(stream: &mut TcpStream, id: u16) -> Vec<u8> {
    send_query(stream, id, &["hello", "revboot", "test"]).await;
    read_reply(stream).await
}

/// Reads until EOF; true if the server closed the connection within the test's patience.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    matches!(
        tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// `count` TCP connections from `from` that never send anything.
async fn idle_connections(server: SocketAddr, from: IpAddr, count: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(from, 0))
            .expect("client socket binds");
        streams.push(socket.connect(server).await.expect("connect"));
    }
    streams
}

/// A TCP query for `hello` from `from`, as hickory's client sends it, gets its answer.
async fn answered_over_tcp(server: SocketAddr, from: IpAddr) {
    let mut client = tcp_client_from(server, Some(from)).await;
    let r = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError, "from {from}");
    assert_eq!(r.answers.len(), 1, "from {from}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_up_to_the_bounds_do_not_deny_tcp_to_anyone() {
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    let limits = DnsConfig::default().limits;
    config.limits.max_tcp_connections = limits.max_tcp_connections;
    config.limits.max_tcp_per_prefix = limits.max_tcp_per_prefix;
    let server = start(config, fake).await;
    let addr = server.local_addr();
    let ip = |text: &str| -> IpAddr { text.parse().expect("address") };
    // The whole bound's worth from one address: its /24 keeps its share, the rest of the
    // table stays open to others. The kernel hands connections over in the order they were
    // made, so the server has taken in every idle one before each query's.
    let mut idle = idle_connections(addr, ip("127.0.0.2"), limits.max_tcp_connections).await;
    answered_over_tcp(addr, ip("127.0.1.1")).await;
    answered_over_tcp(addr, ip("127.0.0.3")).await;
    // Each of several /24s with its share, the table full of idle connections: a newcomer
    // from elsewhere, or from one of them, still gets in.
    let prefixes = limits
        .max_tcp_connections
        .div_ceil(limits.max_tcp_per_prefix);
    for prefix in 0..prefixes {
        let from = ip(&format!("127.0.{}.2", 10 + prefix));
        idle.extend(idle_connections(addr, from, limits.max_tcp_per_prefix).await);
    }
    answered_over_tcp(addr, ip("127.0.2.1")).await;
    answered_over_tcp(addr, ip("127.0.10.3")).await;
    let metrics = server.metrics();
    assert_eq!(metrics.tcp_refused, 0, "{metrics:?}");
    assert!(metrics.tcp_evicted > 0, "{metrics:?}");
    drop(idle);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tcp_table_closes_the_connection_idle_longest_never_one_with_a_query_in_progress() {
    // Delayed answers keep their connections busy until the test says the instance is ready.
    let fake = fake_with(Behaviour {
        boot: Boot::Manual,
        boot_timeout: Duration::from_secs(60),
        ..Behaviour::default()
    });
    let mut config = config();
    config.delayed_answers = true;
    config.delay_limit = Duration::from_secs(60);
    config.limits.max_tcp_connections = 2;
    let server = start(config, fake.clone()).await;
    let addr = server.local_addr();
    let connect = || TcpStream::connect(addr);
    let mut a = connect().await.expect("connect");
    let mut b = connect().await.expect("connect");
    let mut c = connect().await.expect("connect");
    assert!(
        closed_by_server(&mut a).await,
        "a, idle longest, makes room for c"
    );
    assert_eq!(server.metrics().tcp_evicted, 1);
    // b and c ask for instances that are still booting: both have a query in progress.
    let before = fake.summons.load(Ordering::SeqCst);
    send_query(&mut b, 1, &["hello", "revboot", "test"]).await;
    let label = revision(2).short(7);
    send_query(&mut c, 2, &[&label, "hello", "revboot", "test"]).await;
    until_summoned(&fake, before + 1).await;
    let mut d = connect().await.expect("connect");
    assert!(
        closed_by_server(&mut d).await,
        "no idle connection to close for d"
    );
    assert_eq!(server.metrics().tcp_refused, 1);
    for key in fake.keys() {
        fake.set_state(&key, InstanceState::Ready);
    }
    // Nothing cut their queries short.
    assert_eq!(read_reply(&mut b).await[3] & 0x0f, 0, "b's answer came");
    assert_eq!(read_reply(&mut c).await[3] & 0x0f, 0, "c's answer came");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_are_closed() {
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    config.limits.tcp_idle_timeout = Duration::from_millis(300);
    let server = start(config, fake).await;
    let mut a = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    assert_eq!(tcp_exchange(&mut a, 1).await[3] & 0x0f, 0);
    assert!(closed_by_server(&mut a).await, "idle connection closed");
    let mut b = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    assert!(closed_by_server(&mut b).await, "silent connection closed");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_response_rate_answers_are_dropped_or_slipped_truncated() {
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    config.limits.rrl_per_second = 1;
    config.limits.rrl_burst = 1;
    config.limits.rrl_slip = 2;
    let server = start(config, fake).await;
    let socket = tokio::net::UdpSocket::bind("127.0.5.1:0")
        .await
        .expect("socket");
    for id in 1..=7u16 {
        let query = wire_query(id, &["hello", "revboot", "test"], 1);
        socket
            .send_to(&query, server.local_addr())
            .await
            .expect("send");
    }
    let (mut full, mut truncated) = (0, 0);
    let mut buf = [0u8; 1500];
    while let Ok(Ok((len, _))) =
        tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await
    {
        let reply = &buf[..len];
        if reply[2] & 0x02 != 0 {
            assert_eq!(reply[7], 0, "a slip carries no answer");
            truncated += 1;
        } else {
            full += 1;
        }
    }
    assert!(full >= 1, "the first answer is within the burst");
    assert!(truncated >= 1, "some refused answers slip as TC");
    assert!(full + truncated < 7, "the rest are dropped");
    assert!(server.metrics().rate_limited >= 1);
    server.shutdown().await.expect("clean shutdown");
}
