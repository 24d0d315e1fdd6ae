//! The transport itself: streaming in both directions, fetch authentication.

use std::time::Duration;

use revboot_builder::BuildState;
use tokio::io::AsyncReadExt;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_log_reaches_the_pusher_while_the_build_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    // The build prints a line, then waits for a gate that the test opens only after it
    // has seen that line in git's output: if output were held back until the build ends,
    // the build would hit its time limit and fail.
    let gate = gates(&tmp.path().join("data")).join("gate");
    let recipe = format!(
        "[build]\nshell = \"echo step-one; while [ ! -e {} ]; do sleep 0.05; done; echo step-two; mkdir -p out; cp exit0 out/a\"\nartifacts = [\"out/a\"]\ntimeout_secs = 60\n",
        gate.display()
    );
    let work = recipe_fixture(tmp.path(), "live", &recipe).await;
    let home = tmp.path().join("home");
    let mut command = git_command(&home);
    command
        .current_dir(&work)
        .args(["push", &daemon.url("live"), "main"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut child = command.spawn().expect("git push");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut opened = false;
    loop {
        let n = tokio::time::timeout_at(deadline, stderr.read(&mut chunk))
            .await
            .expect("push output in time")
            .expect("read");
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&seen);
        if !opened && text.contains("] step-one") {
            assert!(!text.contains("] step-two"), "{text}");
            std::fs::write(&gate, "open").expect("gate");
            opened = true;
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("push ends")
        .expect("wait");
    let text = String::from_utf8_lossy(&seen);
    assert!(status.success(), "{text}");
    assert!(
        opened,
        "the first line never arrived before the end:\n{text}"
    );
    assert!(
        text.contains("remote: [") && text.contains("] step-two"),
        "{text}"
    );
    let record = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(record.state, BuildState::Succeeded);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_push_streams_and_clones_back_intact() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |c| c.anonymous_fetch = true).await;
    let recipe =
        "[build]\nshell = \"mkdir -p out && cat exit0 blob > out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "big", recipe).await;
    // 4 MiB of incompressible bytes: more than git's 1 MiB post buffer, so the pack goes
    // out as a chunked request body.
    let mut blob = vec![0u8; 4 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in &mut blob {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    std::fs::write(work.join("blob"), &blob).expect("blob");
    let commit = commit_all(&work, "big blob").await;
    let (ok, stderr) = push(&work, &daemon.url("big"), &[]).await;
    assert!(ok, "{stderr}");
    let record = wait_finished(&daemon.builder, &commit).await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");

    // Anonymous clone (allowed here) gets the same bytes back.
    let clone = tmp.path().join("clone");
    let output = git(
        tmp.path(),
        &[
            "clone",
            "-q",
            &daemon.anonymous_url("big"),
            clone.to_str().expect("utf8"),
        ],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read(clone.join("blob")).expect("blob"), blob);
    assert_eq!(head(&clone).await, commit);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_needs_a_token_by_default() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let recipe = "[build]\nshell = \"mkdir -p out && cp exit0 out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "private", recipe).await;
    let (ok, stderr) = push(&work, &daemon.url("private"), &[]).await;
    assert!(ok, "{stderr}");
    let anonymous = git(
        tmp.path(),
        &["clone", "-q", &daemon.anonymous_url("private"), "anon"],
    )
    .await;
    assert!(!anonymous.status.success(), "anonymous clone worked");
    assert!(!tmp.path().join("anon/revboot.toml").exists());
    let with_token = git(
        tmp.path(),
        &["clone", "-q", &daemon.url("private"), "authed"],
    )
    .await;
    assert!(
        with_token.status.success(),
        "{}",
        String::from_utf8_lossy(&with_token.stderr)
    );
    assert!(tmp.path().join("authed/revboot.toml").exists());
    daemon.stop().await;
}

/// `GET <url>` with curl; returns the status code and the body.
async fn curl_get(url: &str) -> (u16, String) {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-s", "--max-time", "60", "-w", "\n%{http_code}", url])
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("curl finished in time")
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.parse().expect("status code"), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_refs_naming_the_service_twice_is_refused_before_auth() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Anonymous fetch on, so that the upload-pack advertisement is the one a duplicate could
    // smuggle a receive-pack past.
    let daemon = daemon(&tmp.path().join("data"), |c| c.anonymous_fetch = true).await;
    let recipe = "[build]\nshell = \"mkdir -p out && cp exit0 out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "twice", recipe).await;
    let (ok, stderr) = push(&work, &daemon.url("twice"), &[]).await;
    assert!(ok, "{stderr}");
    wait_finished(&daemon.builder, &head(&work).await).await;

    // Anonymous fetch is on, so only the service git runs decides whether a token is
    // needed: both orders, and a spelling git decodes to the same name, are refused before
    // anything else, with or without a (wrong) token.
    let wrong = daemon.url("twice").replace(TOKEN, "wrong-token");
    for base in [daemon.anonymous_url("twice"), wrong] {
        for query in [
            "service=git-upload-pack&service=git-receive-pack",
            "service=git-receive-pack&service=git-upload-pack",
            "service=git-upload-pack&serv%69ce=git-receive-pack",
        ] {
            let (status, body) = curl_get(&format!("{base}/info/refs?{query}")).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert_eq!(
                body.trim(),
                "Ambiguous query: the parameter `service` is given more than once",
                "{query}"
            );
        }
    }
    // The receive-pack advertisement still needs a token; upload-pack is anonymous.
    let base = daemon.anonymous_url("twice");
    let (status, _) = curl_get(&format!("{base}/info/refs?service=git-receive-pack")).await;
    assert_eq!(status, 401);
    let (status, body) = curl_get(&format!("{base}/info/refs?service=git-upload-pack")).await;
    assert_eq!(status, 200);
    assert!(body.contains("# service=git-upload-pack"), "{body}");

    // Pushes and fetches go on as before.
    let commit = commit_all(&work, "second").await;
    let (ok, stderr) = push(&work, &daemon.url("twice"), &[]).await;
    assert!(ok, "{stderr}");
    let clone = tmp.path().join("clone");
    let output = git(
        tmp.path(),
        &["clone", "-q", &base, clone.to_str().expect("utf8")],
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(head(&clone).await, commit);
    daemon.stop().await;
}
