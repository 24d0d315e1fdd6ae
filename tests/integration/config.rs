//! Configuration variables and secrets (`revboot config`): set with the CLI, in the
//! instance's environment, sealed on disk, and nowhere else.

use std::path::Path;
use std::process::Command;

use crate::support::{Daemon, Setup, curl, dig_ok, eventually, git, hello_source, push};

const ZONE: &str = "revboot.test";

/// The environment of a process, as `NAME=value` entries.
fn environment(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("read the environment");
    raw.split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

/// The pid of the one instance of `hello` that is serving.
fn serving_pid(daemon: &Daemon) -> u64 {
    let mut pid = None;
    let found = eventually(|| {
        pid = daemon
            .instances()
            .iter()
            .find(|i| i["service"] == "hello" && (i["state"] == "ready" || i["state"] == "idle"))
            .and_then(|i| i["pid"].as_u64());
        pid.is_some()
    });
    assert!(found, "no serving instance: {:?}", daemon.instances());
    pid.expect("found")
}

/// Every file under `dir` that holds `needle` as plain bytes.
pub fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if kind.is_file()
            && std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn a_secret_set_with_the_cli_reaches_the_instance_and_nothing_else() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    // Every line the daemon writes, debug included.
    let daemon = Daemon::start_setup(
        &data,
        &Setup {
            log_filter: "debug",
            ..Setup::default()
        },
    );
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let secret = format!("sk-live-{}", std::process::id() * 7919);

    // Bad input changes nothing and says why.
    let bad = daemon.cli(&["config", "set", "hello", "PATH=/bin"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("PATH"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let no_service = daemon.cli(&["config", "set", "nope", "A=1"]);
    assert!(!no_service.status.success());
    let no_equals = daemon.cli(&["config", "set", "hello", &secret]);
    assert!(!no_equals.status.success());
    assert!(!String::from_utf8_lossy(&no_equals.stderr).contains(&secret));

    let set = daemon.cli(&[
        "config",
        "set",
        "hello",
        &format!("API_KEY={secret}"),
        "MODE=fast",
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(!String::from_utf8_lossy(&set.stdout).contains(&secret));

    // Listings name the variables; only --show gives values.
    let list = daemon.cli(&["config", "list", "hello"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && text.contains("API_KEY") && text.contains("MODE"),
        "{text}"
    );
    assert!(!text.contains(&secret), "{text}");
    let api = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "-H"])
        .arg(format!("authorization: Bearer {}", daemon.token))
        .arg(format!(
            "http://{}/api/v1/services/hello/config",
            daemon.http
        ))
        .output()
        .expect("run curl");
    let api = String::from_utf8_lossy(&api.stdout);
    assert!(api.contains("API_KEY") && !api.contains(&secret), "{api}");
    // A value from standard input never is an argument (the process list shows arguments).
    let stdin_secret = format!("sk-stdin-{}", std::process::id() * 104_729);
    let from_stdin = daemon.cli_with_input(
        &["config", "set", "hello", "--stdin", "STDIN_KEY"],
        format!("{stdin_secret}\n").as_bytes(),
    );
    assert!(
        from_stdin.status.success(),
        "{}",
        String::from_utf8_lossy(&from_stdin.stderr)
    );
    let two_names = daemon.cli_with_input(&["config", "set", "hello", "--stdin", "A", "B"], b"x");
    assert!(!two_names.status.success());
    let shown = daemon.cli(&["config", "list", "hello", "--show"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("API_KEY={secret}")), "{shown}");
    assert!(
        shown.contains(&format!("STDIN_KEY={stdin_secret}\n")),
        "{shown}"
    );

    // An instance booted after the change has it in its environment.
    let live = format!("hello.{ZONE}");
    let address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let pid = serving_pid(&daemon);
    let env = environment(pid);
    assert!(env.contains(&format!("API_KEY={secret}")), "{env:?}");
    assert!(env.contains(&"MODE=fast".to_owned()), "{env:?}");
    // Exactly the value given, its trailing newline dropped.
    assert!(
        env.contains(&format!("STDIN_KEY={stdin_secret}")),
        "{env:?}"
    );

    // --restart replaces the running instance: the next boot has the change.
    let changed = daemon.cli(&["config", "unset", "hello", "MODE", "--restart"]);
    let changed_text = String::from_utf8_lossy(&changed.stdout);
    assert!(changed.status.success(), "{changed_text}");
    assert!(
        changed_text.contains("1 instance(s) stopped"),
        "{changed_text}"
    );
    assert!(
        eventually(|| daemon
            .instances()
            .iter()
            .all(|i| i["pid"].as_u64() != Some(pid))),
        "the instance was not replaced"
    );
    let address = dig_ok(&daemon, &live, false);
    assert!(curl(&live, &address, 8080).starts_with("hello from v1"));
    let env = environment(serving_pid(&daemon));
    assert!(env.contains(&format!("API_KEY={secret}")), "{env:?}");
    assert!(
        !env.iter().any(|entry| entry.starts_with("MODE=")),
        "{env:?}"
    );

    // Nowhere else: no file of the data directory holds it in the clear (the variables are
    // sealed), nor any object of the deployment repository, nor the daemon's log.
    let log = daemon.stop();
    assert!(log.contains("configuration changed"), "{log}");
    assert!(!log.contains(&secret), "the secret is in the daemon's log");
    assert!(
        !log.contains(&stdin_secret),
        "the secret is in the daemon's log"
    );
    let clear = files_holding(&data, secret.as_bytes());
    assert!(clear.is_empty(), "the secret is in the clear in {clear:?}");
    let deploy = data.join("deploy.git");
    let everything = git(&deploy, &["log", "--all", "-p", "--format=%H %B"]);
    let everything = String::from_utf8_lossy(&everything.stdout);
    assert!(everything.contains("hello v1"), "the repository was read");
    assert!(
        !everything.contains(&secret),
        "the secret is in the repository"
    );
}
