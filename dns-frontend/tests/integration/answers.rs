//! Answers as a real DNS client (hickory-net, UDP and TCP) sees them, on a fake deployer.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use hickory_net::client::Client;
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_proto::op::{DnsResponse, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::{RData, RecordType};
use revboot_deployer::InstanceState;
use revboot_dns::{DnsServer, Nameserver};

use crate::support::*;
use revboot_testkit::instances::{Addresses, Behaviour, Boot, revision};

const EDE: u16 = 15;

fn address(response: &DnsResponse) -> Option<IpAddr> {
    response.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    })
}

pub fn ede_text(response: &DnsResponse) -> Option<String> {
    let edns = response.edns.as_ref()?;
    edns.options()
        .options
        .iter()
        .find_map(|(_, option)| match option {
            EdnsOption::Unknown(EDE, value) if value.len() >= 2 => {
                Some(String::from_utf8_lossy(&value[2..]).into_owned())
            }
            _ => None,
        })
}

/// NXDOMAIN or NODATA as RFC 2308 wants them: AA, no answers, the zone's SOA in authority
/// with TTL equal to the SOA minimum.
fn assert_negative(response: &DnsResponse, rcode: ResponseCode, what: &str) {
    assert_eq!(response.response_code, rcode, "{what}: rcode");
    assert!(response.authoritative, "{what}: AA");
    assert!(response.answers.is_empty(), "{what}: no answers");
    let soa = response
        .authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some((r, soa)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{what}: SOA in authority"));
    assert_eq!(soa.0.name.to_string(), "revboot.test.", "{what}: SOA owner");
    assert_eq!(soa.1.minimum, 5, "{what}: SOA minimum");
    assert_eq!(soa.0.ttl, 5, "{what}: negative TTL");
}

async fn both(server: std::net::SocketAddr) -> [(&'static str, Client<TokioRuntimeProvider>); 2] {
    [
        ("udp", udp_client(server).await),
        ("tcp", tcp_client(server).await),
    ]
}

#[tokio::test]
async fn short_sha_boots_that_revision_and_answers_its_address() {
    let fake = fake(16, Boot::Manual);
    let server = start(config(), fake.clone()).await;
    for (transport, mut client) in both(server.local_addr()).await {
        let label = revision(2).short(7);
        let response = ask(
            &mut client,
            &format!("{label}.hello.revboot.test."),
            RecordType::A,
        )
        .await;
        assert_eq!(response.response_code, ResponseCode::NoError, "{transport}");
        assert!(response.authoritative, "{transport}: AA");
        assert_eq!(response.answers.len(), 1, "{transport}");
        assert_eq!(response.answers[0].ttl, 1, "{transport}: default TTL");
        let key = fake
            .keys()
            .into_iter()
            .find(|k| k.revision == revision(2))
            .expect("revision 2 was summoned");
        assert!(
            address(&response).is_some_and(|a| a.is_loopback()),
            "{transport}"
        );
        // Answered at once, while the instance is still booting.
        assert_eq!(fake.running(), 1, "{transport}");
        let _ = key;
        let edns = response.edns.as_ref().expect("OPT echoed");
        assert_eq!(edns.max_payload(), 1232, "{transport}: advertised UDP size");
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn live_name_follows_the_live_pointer() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    let first = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    let via_label = ask(
        &mut client,
        &format!("{}.hello.revboot.test.", revision(1).short(9)),
        RecordType::A,
    )
    .await;
    assert_eq!(address(&first), address(&via_label), "live is revision 1");
    fake.set_live("hello", revision(2));
    let second = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    let rev2 = ask(
        &mut client,
        &format!("{}.hello.revboot.test.", revision(2).short(7)),
        RecordType::A,
    )
    .await;
    assert_eq!(address(&second), address(&rev2), "live moved to revision 2");
    assert_ne!(address(&first), address(&second));
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn negative_answers_have_the_right_codes_and_sections() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake.clone()).await;
    for (transport, mut client) in both(server.local_addr()).await {
        let t = transport;
        let r = ask(&mut client, "nope.revboot.test.", RecordType::A).await;
        assert_negative(&r, ResponseCode::NXDomain, &format!("{t}: unknown service"));
        let r = ask(&mut client, "fffffff.hello.revboot.test.", RecordType::A).await;
        assert_negative(&r, ResponseCode::NXDomain, &format!("{t}: unknown label"));
        let r = ask(&mut client, "a.b.hello.revboot.test.", RecordType::A).await;
        assert_negative(&r, ResponseCode::NXDomain, &format!("{t}: too deep"));
        let summons = fake.summons.load(Ordering::SeqCst);
        let r = ask(&mut client, "hello.revboot.test.", RecordType::TXT).await;
        assert_negative(&r, ResponseCode::NoError, &format!("{t}: NODATA for TXT"));
        assert_eq!(
            fake.summons.load(Ordering::SeqCst),
            summons,
            "{t}: TXT does not summon"
        );
        let r = ask(&mut client, "hello.revboot.test.", RecordType::AAAA).await;
        assert_negative(
            &r,
            ResponseCode::NoError,
            &format!("{t}: NODATA for AAAA of IPv4"),
        );
        let r = ask(&mut client, "empty.revboot.test.", RecordType::A).await;
        assert_negative(
            &r,
            ResponseCode::NoError,
            &format!("{t}: service without live"),
        );
        let r = ask(
            &mut client,
            &format!("{}.hello.revboot.test.", revision(3).short(8)),
            RecordType::A,
        )
        .await;
        assert_negative(&r, ResponseCode::NoError, &format!("{t}: failed build"));
        assert!(
            ede_text(&r).is_some_and(|e| e.contains("build failed")),
            "{t}: EDE {:?}",
            ede_text(&r)
        );
        let r = ask(&mut client, "revboot.test.", RecordType::MX).await;
        assert_negative(&r, ResponseCode::NoError, &format!("{t}: apex MX"));

        let r = ask(&mut client, "example.com.", RecordType::A).await;
        assert_eq!(
            r.response_code,
            ResponseCode::Refused,
            "{t}: outside the zone"
        );
        assert!(!r.authoritative, "{t}: no AA outside the zone");
        assert!(r.authorities.is_empty(), "{t}: no SOA outside the zone");

        let r = ask(&mut client, "abcdef0.amb.revboot.test.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::Refused, "{t}: ambiguous");
        let text = ede_text(&r).unwrap_or_default();
        assert!(
            text.contains("ambiguous"),
            "{t}: EDE names the problem: {text:?}"
        );
        assert!(r.answers.is_empty(), "{t}: never a guess");
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn apex_has_soa_and_ns_with_the_servers_address() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake).await;
    let mut client = udp_client(server.local_addr()).await;
    let soa = ask(&mut client, "revboot.test.", RecordType::SOA).await;
    assert!(soa.authoritative);
    assert!(matches!(soa.answers.as_slice(), [r] if matches!(r.data, RData::SOA(_))));
    let ns = ask(&mut client, "revboot.test.", RecordType::NS).await;
    let names: Vec<String> = ns
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["ns.revboot.test."]);
    assert!(
        ns.additionals
            .iter()
            .any(|r| r.name.to_string() == "ns.revboot.test." && matches!(r.data, RData::A(_))),
        "glue for the in-zone name server"
    );
    let a = ask(&mut client, "ns.revboot.test.", RecordType::A).await;
    assert_eq!(address(&a), Some(server.local_addr().ip()));
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_answer_too_big_for_udp_is_truncated_and_complete_over_tcp() {
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    config.nameservers = (0..24)
        .map(|i| Nameserver {
            name: format!("ns{i:02}-a-rather-long-label-to-fill-packets.revboot.test"),
            addresses: vec![IpAddr::from([127, 0, 0, 1])],
        })
        .collect();
    let server = start(config, fake).await;
    let udp = udp_client(server.local_addr()).await;
    let r = send(&udp, query("revboot.test.", RecordType::NS, false)).await;
    assert!(r.truncation, "TC over UDP without EDNS (512 bytes)");
    assert!(
        r.answers.is_empty(),
        "a truncated answer carries no records"
    );
    let tcp = tcp_client(server.local_addr()).await;
    let r = send(&tcp, query("revboot.test.", RecordType::NS, false)).await;
    assert!(!r.truncation);
    assert_eq!(r.answers.len(), 24, "the full answer over TCP");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn edns_is_echoed_only_when_asked_and_bad_versions_get_badvers() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake).await;
    let client = udp_client(server.local_addr()).await;
    let plain = send(&client, query("hello.revboot.test.", RecordType::A, false)).await;
    assert!(plain.edns.is_none(), "no OPT to a client without EDNS");
    assert!(address(&plain).is_some());
    let mut v1 = query("hello.revboot.test.", RecordType::A, true);
    if let Some(edns) = v1.edns.as_mut() {
        edns.set_version(1);
    }
    let r = send(&client, v1).await;
    // Extended rcode 16 (BADVERS; hickory reads 16 as BADSIG, its TSIG twin).
    assert_eq!(u16::from(r.response_code), 16);
    assert_eq!(r.edns.as_ref().map(|e| e.version()), Some(0));
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn bad_edns_versions_get_badvers_when_the_name_is_cached_too() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake).await;
    let udp = udp_client(server.local_addr()).await;
    let tcp = tcp_client(server.local_addr()).await;
    // An instance's address (written straight to the wire) and a negative answer.
    for (qname, rcode) in [
        ("hello.revboot.test.", ResponseCode::NoError),
        ("nope.revboot.test.", ResponseCode::NXDomain),
    ] {
        let v0 = send(&udp, query(qname, RecordType::A, true)).await;
        assert_eq!(v0.response_code, rcode, "{qname}: EDNS 0 is answered");
        for client in [&udp, &tcp, &udp] {
            let mut v1 = query(qname, RecordType::A, true);
            if let Some(edns) = v1.edns.as_mut() {
                edns.set_version(1);
            }
            let r = send(client, v1).await;
            // Extended rcode 16 (BADVERS; hickory reads 16 as BADSIG, its TSIG twin).
            assert_eq!(u16::from(r.response_code), 16, "{qname}: {r:?}");
            assert_eq!(r.edns.as_ref().map(|e| e.version()), Some(0), "{qname}");
            assert!(r.answers.is_empty(), "{qname}: no cached answer: {r:?}");
        }
        let again = send(&tcp, query(qname, RecordType::A, true)).await;
        assert_eq!(again.response_code, rcode, "{qname}: EDNS 0 still answered");
    }
    assert!(server.metrics().cache_hits >= 2, "{:?}", server.metrics());
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn malformed_and_unimplemented_queries() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake).await;
    let addr = server.local_addr();
    let mut two_questions = wire_query(7, &["hello", "revboot", "test"], 1);
    two_questions[5] = 2;
    let r = raw_udp(addr, "127.0.0.1:0", &two_questions)
        .await
        .expect("a reply");
    assert_eq!(&r[..2], &[0, 7], "id echoed");
    assert_eq!(r[3] & 0x0f, 1, "FORMERR");
    let cut = wire_query(8, &["hello", "revboot", "test"], 1);
    let r = raw_udp(addr, "127.0.0.1:0", &cut[..cut.len() - 3])
        .await
        .expect("a reply");
    assert_eq!(r[3] & 0x0f, 1, "FORMERR for a cut question");
    let mut update = wire_query(9, &["revboot", "test"], 6);
    update[2] = 5 << 3;
    let r = raw_udp(addr, "127.0.0.1:0", &update)
        .await
        .expect("a reply");
    assert_eq!(r[3] & 0x0f, 4, "NOTIMP for UPDATE");
    let mut response = wire_query(10, &["hello", "revboot", "test"], 1);
    response[2] |= 0x80;
    assert_eq!(
        raw_udp(addr, "127.0.0.1:0", &response).await,
        None,
        "responses are ignored"
    );
    assert_eq!(
        raw_udp(addr, "127.0.0.1:0", &[1, 2, 3]).await,
        None,
        "runts are ignored"
    );
    let metrics = server.metrics();
    assert_eq!(metrics.formerr, 2);
    assert_eq!(metrics.notimp, 1);
    assert_eq!(metrics.ignored, 2);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn matching_is_case_insensitive_and_the_question_case_is_echoed() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake).await;
    let addr = server.local_addr();
    let mut answers = Vec::new();
    // The second and third are cache hits rendered from the first: the echo must still
    // follow each query's own case.
    for (id, labels) in [
        (1u16, ["HeLLo", "ReVbOoT", "TeSt"]),
        (2, ["hello", "revboot", "test"]),
        (3, ["HELLO", "REVBOOT", "TEST"]),
    ] {
        let q = wire_query(id, &labels, 1);
        let r = raw_udp(addr, "127.0.0.1:0", &q).await.expect("a reply");
        assert_eq!(&r[..2], &id.to_be_bytes());
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_ne!(r[2] & 0x04, 0, "AA");
        assert_eq!(&r[12..q.len()], &q[12..], "question echoed as sent");
        answers.push(r[q.len()..].to_vec());
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "same answer records"
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn per_client_services_give_each_source_address_its_instance() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake.clone()).await;
    let addr = server.local_addr();
    let q = wire_query(1, &["solo", "revboot", "test"], 1);
    let a1 = raw_udp(addr, "127.0.0.1:0", &q).await.expect("reply");
    let a2 = raw_udp(addr, "127.0.0.2:0", &q).await.expect("reply");
    let a1_again = raw_udp(addr, "127.0.0.1:0", &q).await.expect("reply");
    assert_ne!(a1[q.len()..], a2[q.len()..], "two clients, two addresses");
    assert_eq!(
        a1[q.len()..],
        a1_again[q.len()..],
        "one client, one address"
    );
    let clients: Vec<_> = fake
        .keys()
        .into_iter()
        .filter_map(|k| k.client.map(|c| c.network()))
        .collect();
    assert_eq!(clients.len(), 2);
    assert!(clients.contains(&IpAddr::from([127, 0, 0, 2])));
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn client_subnet_picks_the_instance_only_when_trusted() {
    use hickory_proto::rr::rdata::opt::ClientSubnet;
    for trust in [false, true] {
        let fake = fake(16, Boot::Instant);
        let mut config = config();
        config.trust_ecs = trust;
        let server = start(config, fake.clone()).await;
        let client = udp_client(server.local_addr()).await;
        let mut q = query("solo.revboot.test.", RecordType::A, true);
        let subnet: ClientSubnet = "10.1.2.0/24".parse().expect("subnet");
        if let Some(edns) = q.edns.as_mut() {
            edns.options_mut().insert(EdnsOption::Subnet(subnet));
        }
        let r = send(&client, q).await;
        assert!(address(&r).is_some());
        let clients: Vec<_> = fake
            .keys()
            .into_iter()
            .filter_map(|k| k.client.map(|c| c.network()))
            .collect();
        let echoed = r.edns.as_ref().and_then(|e| {
            e.options().options.iter().find_map(|(_, o)| match o {
                EdnsOption::Subnet(s) => Some(s.scope_prefix()),
                _ => None,
            })
        });
        if trust {
            assert_eq!(clients, [IpAddr::from([10, 1, 2, 0])]);
            assert_eq!(echoed, Some(24), "scope covers the subnet");
        } else {
            assert_eq!(clients, [IpAddr::from([127, 0, 0, 1])]);
            assert_eq!(echoed, None, "untrusted subnet not echoed");
        }
        server.shutdown().await.expect("clean shutdown");
    }
}

#[tokio::test]
async fn every_listen_address_answers_over_udp_and_tcp() {
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    config.also_listen = vec![
        "[::1]:0".parse().expect("address"),
        "127.0.0.1:0".parse().expect("address"),
    ];
    let server = DnsServer::bind(config, fake).await.expect("server binds");
    let also = server.also_addrs().to_vec();
    assert_eq!(also.len(), 2);
    assert!(also[0].ip().is_ipv6() && also[0].port() != 0, "{also:?}");
    let server = server.spawn();
    for listen in std::iter::once(server.local_addr()).chain(also) {
        let mut udp = udp_client(listen).await;
        let reply = ask(&mut udp, "hello.revboot.test.", RecordType::A).await;
        assert!(address(&reply).is_some(), "{listen} over UDP: {reply:?}");
        let mut tcp = tcp_client(listen).await;
        let reply = ask(&mut tcp, "hello.revboot.test.", RecordType::A).await;
        assert!(address(&reply).is_some(), "{listen} over TCP: {reply:?}");
    }
    server.shutdown().await.expect("clean shutdown");
}

/// The SOA's serial, asked at the apex.
async fn serial(client: &mut Client<TokioRuntimeProvider>) -> u32 {
    let soa = ask(client, "revboot.test.", RecordType::SOA).await;
    match soa.answers.first().map(|r| &r.data) {
        Some(RData::SOA(soa)) => soa.serial,
        other => panic!("no SOA: {other:?}"),
    }
}

#[tokio::test]
async fn the_soa_serial_moves_with_deployments_and_name_servers_get_glue_of_both_families() {
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    let addresses = vec![
        IpAddr::from([192, 0, 2, 53]),
        "2001:db8::53".parse().expect("v6"),
    ];
    config.nameservers = vec![
        Nameserver {
            name: "ns1.revboot.test".to_owned(),
            addresses: addresses.clone(),
        },
        Nameserver {
            name: "ns.elsewhere.example".to_owned(),
            addresses: Vec::new(),
        },
    ];
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let server = start(config, fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    let first = serial(&mut client).await;
    assert!(
        u64::from(first) >= started,
        "a time serial: {first} < {started}"
    );
    assert_eq!(serial(&mut client).await, first, "nothing changed");
    fake.set_live("hello", revision(2));
    let mut moved = first;
    for _ in 0..1000 {
        moved = serial(&mut client).await;
        if moved != first {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        moved > first,
        "the serial moves with a deployment: {first} -> {moved}"
    );

    let ns = ask(&mut client, "revboot.test.", RecordType::NS).await;
    assert_eq!(ns.answers.len(), 2, "{:?}", ns.answers);
    let mut glue: Vec<IpAddr> = ns
        .additionals
        .iter()
        .filter(|r| r.name.to_string() == "ns1.revboot.test.")
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect();
    glue.sort();
    assert_eq!(
        glue, addresses,
        "A and AAAA glue for the in-zone name server only"
    );
    assert_eq!(ns.additionals.len(), 2, "{:?}", ns.additionals);
    let aaaa = ask(&mut client, "ns1.revboot.test.", RecordType::AAAA).await;
    assert_eq!(address(&aaaa), Some(addresses[1]));
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn repeated_queries_come_from_the_cache_until_the_generation_moves() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    ask(&mut client, "nope.revboot.test.", RecordType::A).await;
    let resolves = fake.resolves.load(Ordering::SeqCst);
    for _ in 0..20 {
        ask(&mut client, "hello.revboot.test.", RecordType::A).await;
        ask(&mut client, "nope.revboot.test.", RecordType::A).await;
    }
    assert_eq!(
        fake.resolves.load(Ordering::SeqCst),
        resolves,
        "no resolves on hits"
    );
    assert!(server.metrics().cache_hits >= 40);
    fake.set_live("hello", revision(2));
    ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    assert_eq!(
        fake.resolves.load(Ordering::SeqCst),
        resolves + 1,
        "resolved again"
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_stopped_instance_is_summoned_again() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    let first = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    let key = fake.keys().pop().expect("one instance");
    fake.set_state(&key, InstanceState::Stopped);
    assert_eq!(fake.running(), 0);
    let again = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    assert!(address(&again).is_some());
    assert_eq!(fake.running(), 1, "booted again by the query");
    assert_eq!(fake.summons.load(Ordering::SeqCst), 2);
    let _ = first;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn every_answered_query_counts_as_activity() {
    let fake = fake(16, Boot::Instant);
    let mut config = config();
    config.limits.activity_interval = std::time::Duration::ZERO;
    let server = start(config, fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    for _ in 0..5 {
        ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    }
    let key = fake.keys().pop().expect("one instance");
    assert_eq!(fake.activity_of(&key), 5);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn summons_per_client_are_rate_limited_and_deployer_refusals_are_servfail() {
    let fake = fake(2, Boot::Instant);
    let mut config = config();
    config.limits.boots_per_second = 1;
    config.limits.boot_burst = 3;
    let server = start(config, fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    let name = |n: u64| format!("{}.hello.revboot.test.", revision(n).short(7));
    let r = ask(&mut client, &name(1), RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    let r = ask(&mut client, &name(2), RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    // A third instance is past the fake deployer's cap of 2.
    let r = ask(&mut client, "solo.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::ServFail);
    assert!(
        ede_text(&r).is_some_and(|t| t.contains("limit")),
        "{:?}",
        ede_text(&r)
    );
    // The burst of 3 summons is spent: the next uncached name is refused before any summon.
    let summons = fake.summons.load(Ordering::SeqCst);
    let r = ask(&mut client, "v1.hello.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::Refused);
    assert_eq!(fake.summons.load(Ordering::SeqCst), summons);
    // Cached answers still flow.
    let r = ask(&mut client, &name(1), RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(server.metrics().boot_limited >= 1);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn ipv6_pool_addresses_get_aaaa() {
    let fake = fake_with(Behaviour {
        addresses: Addresses::V6,
        ..Behaviour::default()
    });
    let server = start(config(), fake).await;
    let mut client = udp_client(server.local_addr()).await;
    let r = ask(&mut client, "hello.revboot.test.", RecordType::AAAA).await;
    assert!(matches!(address(&r), Some(IpAddr::V6(_))));
    let r = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    assert_negative(&r, ResponseCode::NoError, "NODATA for A of IPv6");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn front_door_services_are_answered_with_the_front_doors_address_and_still_booted() {
    let fake = fake(16, Boot::Manual);
    fake.add_service(
        "front",
        revboot_testkit::instances::FakeService {
            reach: revboot_deployer::Reach::Front,
            ..revboot_testkit::instances::FakeService::one(8080, revision(40))
        },
    );
    let door: IpAddr = "127.0.0.9".parse().expect("address");
    let mut config = config();
    config.front = vec![door];
    let server = start(config, fake.clone()).await;
    for (transport, mut client) in both(server.local_addr()).await {
        let response = ask(&mut client, "front.revboot.test.", RecordType::A).await;
        assert_eq!(address(&response), Some(door), "{transport}");
        // Only an IPv4 front door: no AAAA for it.
        let response = ask(&mut client, "front.revboot.test.", RecordType::AAAA).await;
        assert_eq!(response.response_code, ResponseCode::NoError, "{transport}");
        assert!(response.answers.is_empty(), "{transport}");
        // Services reached at addresses of their own keep them.
        let response = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
        assert!(
            address(&response).is_some_and(|a| a != door && a.is_loopback()),
            "{transport}"
        );
    }
    assert!(
        fake.keys().iter().any(|key| key.service == "front"),
        "the query boots the instance behind the front door"
    );
    server.shutdown().await.expect("clean shutdown");
}
