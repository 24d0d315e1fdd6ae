//! The server as `dig` sees it.

use std::process::Command;

use crate::support::*;
use revboot_testkit::instances::{Boot, revision};

fn dig(port: u16, args: &[&str]) -> String {
    let output = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+norec",
            "+time=3",
            "+tries=2",
        ])
        .args(args)
        .output()
        .expect("dig runs");
    assert!(
        output.status.success(),
        "dig failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_authoritative_answers_and_negative_answers_over_udp_and_tcp() {
    let fake = fake(16, Boot::Instant);
    let server = start(config(), fake).await;
    let port = server.local_addr().port();
    let label = format!("{}.Hello.revboot.test", revision(2).short(7));
    let out = tokio::task::spawn_blocking(move || {
        [
            dig(port, &[&label, "A"]),
            dig(port, &["+tcp", &label, "A"]),
            dig(port, &["nope.revboot.test", "A"]),
            dig(port, &["example.com", "A"]),
        ]
    })
    .await
    .expect("dig task");
    for (transport, answer) in [("udp", &out[0]), ("tcp", &out[1])] {
        assert!(answer.contains("status: NOERROR"), "{transport}: {answer}");
        assert!(answer.contains(" aa"), "{transport}: AA flag: {answer}");
        assert!(
            answer.contains("udp: 1232"),
            "{transport}: EDNS size: {answer}"
        );
        let record: Vec<&str> = answer
            .lines()
            .filter(|l| !l.starts_with(';'))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.get(3) == Some(&"A"))
            .unwrap_or_else(|| panic!("{transport}: an A record: {answer}"));
        assert!(
            record[0].ends_with(".Hello.revboot.test."),
            "{transport}: case echoed: {record:?}"
        );
        assert_eq!(record[1..4], ["1", "IN", "A"], "{transport}: TTL 1");
        assert!(
            record[4].starts_with("127."),
            "{transport}: loopback: {record:?}"
        );
    }
    assert!(out[2].contains("status: NXDOMAIN"), "{}", out[2]);
    assert!(out[2].contains("AUTHORITY: 1"), "{}", out[2]);
    assert!(out[2].contains("SOA"), "{}", out[2]);
    assert!(out[3].contains("status: REFUSED"), "{}", out[3]);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_challenges_are_txt_records_as_soon_as_published_and_gone_when_withdrawn() {
    let fake = fake(16, Boot::Instant);
    let config = config();
    let challenges = config.challenges.clone();
    let server = start(config, fake).await;
    let port = server.local_addr().port();
    let name = "_acme-challenge.hello.revboot.test";
    let ask = move |args: &'static [&'static str]| {
        tokio::task::spawn_blocking(move || {
            let mut full = vec![name];
            full.extend_from_slice(args);
            dig(port, &full)
        })
    };
    let before = ask(&["TXT"]).await.expect("dig task");
    assert!(before.contains("status: NXDOMAIN"), "{before}");
    // A wildcard and its base name: two values at one name, both answered.
    challenges.publish(name, "first-value").expect("publish");
    challenges.publish(name, "second-value").expect("publish");
    let udp = ask(&["TXT"]).await.expect("dig task");
    let tcp = ask(&["+tcp", "TXT"]).await.expect("dig task");
    for answer in [&udp, &tcp] {
        assert!(answer.contains("status: NOERROR"), "{answer}");
        assert!(answer.contains(" aa"), "{answer}");
        assert!(answer.contains("\"first-value\""), "{answer}");
        assert!(answer.contains("\"second-value\""), "{answer}");
    }
    let other_type = ask(&["A"]).await.expect("dig task");
    assert!(other_type.contains("status: NOERROR"), "{other_type}");
    assert!(other_type.contains("ANSWER: 0"), "{other_type}");
    challenges.withdraw(name, "first-value");
    challenges.withdraw(name, "second-value");
    let after = ask(&["TXT"]).await.expect("dig task");
    assert!(after.contains("status: NXDOMAIN"), "{after}");
    server.shutdown().await.expect("clean shutdown");
}
