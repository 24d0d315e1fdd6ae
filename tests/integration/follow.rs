//! Live consoles: `revboot logs -f` and the API's event stream follow a running instance's
//! output as it is written, and instances that start while they follow.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use crate::support::{Daemon, PATIENCE, curl, curl_path, dig_ok, hello_source, history, push, run};

/// A `revboot logs -f` running in the background; its stdout lines arrive on a channel.
pub struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Follower {
    pub fn start(daemon: &Daemon, args: &[&str]) -> Follower {
        let mut child = Command::new(env!("CARGO_BIN_EXE_revboot"))
            .args(["--url", &format!("http://{}", daemon.http)])
            .args(["--data", &daemon.data.to_string_lossy()])
            .args(args)
            .env("REVBOOT_TOKEN", &daemon.token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start revboot logs -f");
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Follower {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a line containing `text`; panics with what came instead.
    pub fn expect(&mut self, text: &str) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {text:?}; the follower printed:\n{:#?}",
                    self.seen
                ),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn logs_follow_prints_a_running_instance_output_as_it_is_written() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let revision = history(&daemon, "hello")[0]["short"]
        .as_str()
        .expect("short")
        .to_owned();

    // Following before any instance runs: the one that boots later is followed too.
    let mut follower = Follower::start(&daemon, &["logs", "hello", "--console", "-f"]);
    let name = format!("{revision}.hello.revboot.test");
    let address = dig_ok(&daemon, &name, false);
    let started = follower.expect("--- ");
    assert!(started.contains(&revision), "{started}");
    assert!(started.contains(&address), "{started}");
    follower.expect("hello v1 ready");

    // A request while following: its console line comes while the instance runs.
    assert!(curl(&name, &address, 8080).starts_with("hello from v1"));
    follower.expect("hello: GET /");
    assert!(curl_path(&name, &address, 8080, "/first-marker").starts_with("hello from v1"));
    follower.expect("hello: GET /first-marker");

    // A second follower joining now gets the kept tail first, then what comes.
    let mut late = Follower::start(&daemon, &["--json", "logs", "hello", "--console", "-f"]);
    let tail = late.expect("first-marker");
    let event: serde_json::Value = serde_json::from_str(&tail).expect("a JSON event");
    assert_eq!(event["kind"], "output", "{event}");
    curl_path(&name, &address, 8080, "/second-marker");
    late.expect("second-marker");
    follower.expect("hello: GET /second-marker");

    // Stopping the instance ends its part of the feed with its state.
    let stopped = daemon.cli(&["stop", "hello", &revision]);
    assert!(stopped.status.success(), "{stopped:?}");
    let ended = follower.expect("ended:");
    assert!(ended.contains("stopped"), "{ended}");
}

#[test]
fn the_console_feed_needs_the_token_and_a_known_service() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let url = format!(
        "http://{}/api/v1/services/hello/logs/console/follow",
        daemon.http
    );
    let status = |extra: &[&str], url: &str| {
        let output = run(Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .args(extra)
            .arg(url));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert_eq!(status(&[], &url), "401");
    let bearer = format!("authorization: Bearer {}", daemon.token);
    assert_eq!(status(&["-H", &bearer], &url), "404");
    let bad = format!("{url}?client=not-an-address");
    assert_eq!(status(&["-H", &bearer], &bad), "400");
    let output = daemon.cli(&["logs", "nothing", "--console", "-f"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("nothing"),
        "{output:?}"
    );
}
