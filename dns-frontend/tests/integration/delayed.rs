//! Delayed mode: the answer waits (bounded) for the instance to be ready.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use revboot_deployer::InstanceState;

use crate::answers::ede_text;
use crate::support::*;
use revboot_testkit::instances::{Boot, revision};

#[tokio::test]
async fn delayed_answer_is_sent_once_the_instance_is_ready() {
    let fake = fake(16, Boot::Manual);
    let mut config = config();
    config.delayed_answers = true;
    let server = start(config, fake.clone()).await;
    for transport in ["udp", "tcp"] {
        let mut client = match transport {
            "udp" => udp_client(server.local_addr()).await,
            _ => tcp_client(server.local_addr()).await,
        };
        // A different revision each time, so that each starts booting.
        let name = match transport {
            "udp" => "hello.revboot.test.".to_owned(),
            _ => format!("{}.hello.revboot.test.", revision(2).short(7)),
        };
        let before = fake.summons.load(Ordering::SeqCst);
        let pending = tokio::spawn(async move { ask(&mut client, &name, RecordType::A).await });
        until_summoned(&fake, before).await;
        // Not answered while booting (absence over a while; a slow machine cannot make
        // the answer arrive early).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pending.is_finished(), "{transport}: answered before ready");
        for key in fake.keys() {
            fake.set_state(&key, InstanceState::Ready);
        }
        let response = pending.await.expect("query task");
        assert_eq!(response.response_code, ResponseCode::NoError, "{transport}");
        assert_eq!(response.answers.len(), 1, "{transport}");
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn delayed_answer_that_never_gets_ready_is_servfail_not_ready() {
    let fake = fake(16, Boot::Manual);
    let mut config = config();
    config.delayed_answers = true;
    config.delay_limit = Duration::from_millis(200);
    let server = start(config, fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    let r = ask(&mut client, "hello.revboot.test.", RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::ServFail);
    assert!(r.answers.is_empty());
    let text = ede_text(&r).unwrap_or_default();
    assert!(text.contains("not ready"), "{text:?}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn delayed_answer_for_a_crashed_boot_is_servfail() {
    let fake = fake(16, Boot::Manual);
    let mut config = config();
    config.delayed_answers = true;
    config.delay_limit = Duration::from_secs(3);
    let server = start(config, fake.clone()).await;
    let mut client = udp_client(server.local_addr()).await;
    let pending =
        tokio::spawn(async move { ask(&mut client, "hello.revboot.test.", RecordType::A).await });
    until_summoned(&fake, 0).await;
    let key = fake.keys().pop().expect("instance");
    fake.set_state(
        &key,
        InstanceState::Crashed {
            reason: "exited with status 3".into(),
        },
    );
    let r = pending.await.expect("query task");
    assert_eq!(r.response_code, ResponseCode::ServFail);
    let text = ede_text(&r).unwrap_or_default();
    assert!(text.contains("exited with status 3"), "{text:?}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn delayed_answers_beyond_the_bound_are_dropped() {
    let fake = fake(16, Boot::Manual);
    let mut config = config();
    config.delayed_answers = true;
    config.limits.max_delayed = 1;
    // One worker handles packets in order: the first query holds the delayed slot before
    // the second is read. (With two, the second could be read while the first, already
    // counted as a summon, has not taken the slot yet, and take it instead.)
    config.limits.udp_workers = 1;
    let server = start(config, fake.clone()).await;
    let addr = server.local_addr();
    // One plain socket, one query, no retransmissions: it takes the only delayed slot.
    let first = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("socket");
    let query = wire_query(8, &["hello", "revboot", "test"], 1);
    first.send_to(&query, addr).await.expect("send");
    until_summoned(&fake, 0).await;
    // The only delayed slot is taken: a second cold name is dropped, not queued.
    let second = wire_query(9, &[&revision(2).short(7), "hello", "revboot", "test"], 1);
    assert_eq!(raw_udp(addr, "127.0.0.1:0", &second).await, None);
    assert_eq!(server.metrics().overload_dropped, 1);
    for key in fake.keys() {
        fake.set_state(&key, InstanceState::Ready);
    }
    let mut buf = [0u8; 512];
    let (len, _) = tokio::time::timeout(TIMEOUT, first.recv_from(&mut buf))
        .await
        .expect("the delayed answer comes once ready")
        .expect("recv");
    assert_eq!(&buf[..2], &[0, 8]);
    assert_eq!(buf[3] & 0x0f, 0, "NOERROR");
    assert_eq!(u16::from_be_bytes([buf[6], buf[7]]), 1, "one answer");
    assert!(len > query.len());
    server.shutdown().await.expect("clean shutdown");
}
