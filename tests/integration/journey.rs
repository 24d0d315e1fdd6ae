//! The whole journey: push → dig → curl → second revision → rollback → bisect → restart.

use crate::support::{Daemon, commit_revision, curl, dig_ok, git, hello_source, history, push};

const ZONE: &str = "revboot.test";

fn short(entry: &serde_json::Value) -> String {
    entry["short"].as_str().expect("short revision").to_owned()
}

#[test]
fn push_dig_curl_rollback_bisect_restart() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    let daemon = Daemon::start(&data);
    let work = hello_source(temp.path());

    // Push v1 over smart HTTP with stock git: the pusher sees the build live.
    let pushed = push(&daemon, &work);
    assert!(
        pushed.contains("remote:"),
        "no build progress in push output:\n{pushed}"
    );
    let v1 = history(&daemon, "hello");
    assert_eq!(v1.len(), 1, "{v1:?}");
    assert_eq!(v1[0]["status"], "succeeded", "{v1:?}");
    let v1_short = short(&v1[0]);

    // dig the revision's own name over UDP and TCP; curl through the proxy.
    let name = format!("{v1_short}.hello.{ZONE}");
    let address = dig_ok(&daemon, &name, false);
    assert_eq!(
        dig_ok(&daemon, &name, true),
        address,
        "UDP and TCP answers differ"
    );
    assert!(address.starts_with(daemon.pool.split(".0/").next().expect("pool prefix")));
    let body = curl(&name, &address, 8080);
    assert!(body.starts_with("hello from v1"), "{body}");
    // Ready now: the kernel hands the next connection straight to the instance's socket
    // (sk_lookup), and the API and /metrics count it.
    let steered = || {
        let ps = daemon.cli(&["--json", "ps"]);
        let listed: Vec<serde_json::Value> = serde_json::from_slice(&ps.stdout).expect("JSON");
        listed
            .iter()
            .find(|instance| instance["address"] == address.as_str())
            .and_then(|instance| instance["steered"].as_u64())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while steered().is_none() {
        assert!(std::time::Instant::now() < deadline, "never steered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = steered().expect("steered");
    let body = curl(&name, &address, 8080);
    assert!(body.starts_with("hello from v1"), "{body}");
    assert_eq!(steered(), Some(before + 1));
    let metrics = daemon.metrics();
    assert!(metrics.contains("revboot_steered_instances 1"), "{metrics}");

    // A second revision goes live; the old name still boots the old one.
    commit_revision(&work, "v2", "hello");
    push(&daemon, &work);
    let both = history(&daemon, "hello");
    assert_eq!(both.len(), 2);
    assert_eq!(both[0]["live"], true);
    let v2_short = short(&both[0]);
    let live = format!("hello.{ZONE}");
    let live_address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &live_address, 8080).starts_with("hello from v2"));
    let old_address = dig_ok(&daemon, &name, false);
    assert!(curl(&name, &old_address, 8080).starts_with("hello from v1"));

    // Rollback: the bare name answers v1 again.
    let rolled = daemon.cli(&["rollback", "hello", &v1_short]);
    assert!(
        rolled.status.success(),
        "{}",
        String::from_utf8_lossy(&rolled.stderr)
    );
    let text = String::from_utf8_lossy(&rolled.stdout);
    assert!(
        text.contains(&v1_short) && text.contains(&v2_short),
        "{text}"
    );
    let live_address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &live_address, 8080).starts_with("hello from v1"));

    // Six more revisions; from v6 on the greeting is broken. Bisect finds v6.
    for n in 3..=8 {
        let greeting = if n >= 6 { "broken" } else { "hello" };
        commit_revision(&work, &format!("v{n}"), greeting);
        push(&daemon, &work);
    }
    let all = history(&daemon, "hello");
    assert_eq!(all.len(), 8);
    let first = short(&all[7]);
    let last = short(&all[0]);
    let check = "curl -sf --max-time 20 --resolve \"$REVBOOT_NAME:8080:$REVBOOT_ADDR\" \
                 \"http://$REVBOOT_NAME:8080/\" | grep -q '^hello from'";
    let bisected = daemon.cli(&[
        "bisect", "hello", "--good", &first, "--bad", &last, "--", "sh", "-c", check,
    ]);
    let out = String::from_utf8_lossy(&bisected.stdout);
    assert!(
        bisected.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&bisected.stderr)
    );
    let v6 = &all[2];
    assert!(
        out.contains(v6["revision"].as_str().expect("revision")),
        "{out}"
    );
    assert!(out.contains("hello v6"), "{out}");

    // Restart: everything still resolves and boots; console logs were written back. New
    // ports, picked by the daemon again: the old ones, free for a moment, may have been
    // taken by any program on the host since.
    let pool = daemon.pool.clone();
    daemon.stop();
    let daemon = Daemon::start_with(&data, 0, 0, &pool);
    let address = dig_ok(&daemon, &name, false);
    assert!(curl(&name, &address, 8080).starts_with("hello from v1"));
    let logs = daemon.cli(&["logs", "hello", &v1_short]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(text.contains("build log"), "{text}");
    assert!(
        text.contains("hello v1 ready"),
        "console log missing:\n{text}"
    );

    // The deployment repository is plain git.
    git(&data.join("deploy.git"), &["fsck", "--strict"]);
}
