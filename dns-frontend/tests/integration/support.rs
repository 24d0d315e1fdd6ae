//! Starting a server on a fake deployer, and DNS clients to ask it.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::op::{DnsRequest, DnsRequestOptions, DnsResponse, Edns, Message, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use revboot_dns::{DnsConfig, DnsServer, RunningServer};
use tokio::net::UdpSocket;

use revboot_testkit::instances::{Behaviour, Boot, Fake, FakeRevision, FakeService, revision};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A config listening on a free loopback port, limits generous enough for tests.
pub fn config() -> DnsConfig {
    let mut config = DnsConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        ..DnsConfig::default()
    };
    config.limits.rrl_per_second = 0;
    config.limits.boots_per_second = 0;
    // Tests change the deployer and query at once: see every change.
    config.generation_poll = Duration::ZERO;
    config
}

/// The standard fake with the default behaviour but for `cap` and `boot`.
pub fn fake(cap: usize, boot: Boot) -> Arc<Fake> {
    fake_with(Behaviour {
        cap,
        boot,
        ..Behaviour::default()
    })
}

/// The standard fake: `hello` (live = revision 1, also 2 and a failed 3, tag `v1` on 1),
/// `amb` (two revisions sharing a prefix), `solo` (per-client), `empty` (no live).
pub fn fake_with(behaviour: Behaviour) -> Arc<Fake> {
    let fake = Fake::new(behaviour);
    fake.add_service(
        "hello",
        FakeService {
            per_client: false,
            port: 8080,
            reach: revboot_deployer::Reach::Address,
            revisions: vec![
                FakeRevision {
                    revision: revision(1),
                    tags: vec!["v1".into()],
                    bootable: true,
                },
                FakeRevision {
                    revision: revision(2),
                    tags: vec![],
                    bootable: true,
                },
                FakeRevision {
                    revision: revision(3),
                    tags: vec![],
                    bootable: false,
                },
            ],
            live: Some(revision(1)),
        },
    );
    let shared_prefix = |tail: &str| -> revboot_store::Revision {
        format!("abcdef0{tail:0>33}").parse().expect("hex")
    };
    fake.add_service(
        "amb",
        FakeService {
            per_client: false,
            port: 8080,
            reach: revboot_deployer::Reach::Address,
            revisions: vec![
                FakeRevision {
                    revision: shared_prefix("1"),
                    tags: vec![],
                    bootable: true,
                },
                FakeRevision {
                    revision: shared_prefix("2"),
                    tags: vec![],
                    bootable: true,
                },
            ],
            live: None,
        },
    );
    fake.add_service(
        "solo",
        FakeService {
            per_client: true,
            port: 8080,
            reach: revboot_deployer::Reach::Address,
            revisions: vec![FakeRevision {
                revision: revision(10),
                tags: vec![],
                bootable: true,
            }],
            live: Some(revision(10)),
        },
    );
    fake.add_service(
        "empty",
        FakeService {
            per_client: false,
            port: 8080,
            reach: revboot_deployer::Reach::Address,
            revisions: vec![FakeRevision {
                revision: revision(20),
                tags: vec![],
                bootable: true,
            }],
            live: None,
        },
    );
    fake
}

pub async fn start(
    config: DnsConfig,
    instances: Arc<dyn revboot_deployer::Instances>,
) -> RunningServer {
    DnsServer::bind(config, instances)
        .await
        .expect("server binds")
        .spawn()
}

pub fn name(text: &str) -> Name {
    Name::from_str(text).expect("valid name")
}

pub async fn udp_client(server: SocketAddr) -> Client<TokioRuntimeProvider> {
    let stream = UdpClientStream::builder(server, TokioRuntimeProvider::default())
        .with_timeout(Some(TIMEOUT))
        .build();
    let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(background);
    client
}

pub async fn tcp_client(server: SocketAddr) -> Client<TokioRuntimeProvider> {
    tcp_client_from(server, None).await
}

/// A TCP client whose connection comes from `from` (a loopback address; any port).
pub async fn tcp_client_from(
    server: SocketAddr,
    from: Option<std::net::IpAddr>,
) -> Client<TokioRuntimeProvider> {
    let bind = from.map(|ip| SocketAddr::new(ip, 0));
    let (stream, handle) =
        TcpClientStream::new(server, bind, Some(TIMEOUT), TokioRuntimeProvider::default());
    let stream = stream.await.expect("TCP connects");
    let (client, background) = Client::<TokioRuntimeProvider>::new(stream, handle);
    tokio::spawn(background);
    client
}

/// Asks `qname`/`qtype` with the client's defaults (EDNS on).
pub async fn ask(
    client: &mut Client<TokioRuntimeProvider>,
    qname: &str,
    qtype: RecordType,
) -> DnsResponse {
    tokio::time::timeout(TIMEOUT, client.query(name(qname), DNSClass::IN, qtype))
        .await
        .expect("answer in time")
        .expect("a response")
}

/// Sends `message` as built (EDNS as the message says).
pub async fn send(client: &Client<TokioRuntimeProvider>, message: Message) -> DnsResponse {
    let mut options = DnsRequestOptions::default();
    options.use_edns = message.edns.is_some();
    let mut responses = client.send(DnsRequest::new(message, options));
    tokio::time::timeout(TIMEOUT, responses.next())
        .await
        .expect("answer in time")
        .expect("a response")
        .expect("no error")
}

/// A query message for `qname`/`qtype`, with EDNS if `edns`.
pub fn query(qname: &str, qtype: RecordType, edns: bool) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name(qname), qtype));
    if edns {
        let mut opt = Edns::new();
        opt.set_max_payload(1232);
        message.set_edns(opt);
    }
    message
}

/// Sends raw bytes over UDP from `from` and returns the raw reply, if one comes in 2 s.
pub async fn raw_udp(server: SocketAddr, from: &str, packet: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(from).await.expect("client socket binds");
    socket.send_to(packet, server).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await {
        Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
        _ => None,
    }
}

/// A wire query for `labels` (as given, case kept) and `qtype`, without EDNS.
pub fn wire_query(id: u16, labels: &[&str], qtype: u16) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in labels {
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.push(0);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p
}

/// Waits (bounded) until `fake` has been summoned more than `before` times.
pub async fn until_summoned(fake: &Fake, before: u64) {
    tokio::time::timeout(TIMEOUT, async {
        while fake.summons.load(Ordering::SeqCst) <= before {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("summoned in time");
}
