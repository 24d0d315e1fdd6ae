//! What the daemon writes to its log: no secrets, and plain text when it is not a terminal.

use std::process::Command;

use crate::support::{Daemon, Setup, git, hello_source, push};

#[test]
fn push_token_never_reaches_the_log() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    // A generated token, and every line the daemon writes at debug level.
    let daemon = Daemon::start_setup(
        &data,
        &Setup {
            token: None,
            log_filter: "debug",
            ..Setup::default()
        },
    );
    let token = daemon.token.clone();
    assert_eq!(token.len(), 32, "{token:?}");
    let hook_token = std::fs::read_to_string(data.join("builder/hook-token"))
        .expect("the hook token")
        .trim()
        .to_owned();

    // A push (basic auth, then the hook with its own token), a clone, API calls with the
    // token and with a wrong one, and the CLI.
    let work = hello_source(temp.path());
    assert!(push(&daemon, &work).contains("succeeded"));
    git(
        temp.path(),
        &["clone", "-q", &daemon.remote("hello"), "hello-clone"],
    );
    let wrong = Command::new("git")
        .args([
            "push",
            &daemon.remote("hello").replace(&token, "not-the-token"),
        ])
        .arg("main")
        .current_dir(&work)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("run git");
    assert!(!wrong.status.success());
    for authorization in [format!("Bearer {token}"), "Bearer not-the-token".to_owned()] {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-H"])
            .arg(format!("authorization: {authorization}"))
            .arg(format!("http://{}/api/v1/instances", daemon.http))
            .output()
            .expect("run curl");
        assert!(output.status.success());
    }
    let ps = daemon.cli(&["ps"]);
    assert!(
        ps.status.success(),
        "{}",
        String::from_utf8_lossy(&ps.stderr)
    );

    let log = daemon.stop();
    let file = data.join("token").display().to_string();
    assert!(
        log.lines()
            .any(|line| line.contains("generated the token") && line.contains(&file)),
        "the log says where the token is:\n{log}"
    );
    assert!(log.contains("push with: git push"), "{log}");
    assert!(
        !log.contains(&token),
        "the push token is in the log:\n{log}"
    );
    assert!(!log.contains(&hook_token), "the hook token is in the log");
}

#[test]
fn log_file_has_no_colour_codes() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let log = daemon.stop();
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log written to a file:\n{log}"
    );
}
