//! Pushes over smart HTTP with stock git.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use revboot_builder::BuildState;
use revboot_store::{BuildStatus, Revision};

use crate::support::*;

/// Runs the image on a listening socket the test holds (fd 3, the systemd convention the
/// image follows, as revboot hands it over) and returns its answer to `GET /`.
fn run_image_and_get(image: &std::path::Path, revision: &Revision) -> String {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // Held for the whole exchange: no other program can take the port meanwhile.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let addr = listener.local_addr().expect("its address");
    let fd = listener.as_raw_fd();
    // The image takes fd 3 when LISTEN_PID is its own pid: the shell sets it to $$ and
    // execs the image, which keeps that pid.
    let spawn = || {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\"")
            .arg(image)
            .env_clear()
            .env("LISTEN_FDS", "1")
            .env("REVBOOT_REVISION", revision.to_hex())
            .stdout(std::process::Stdio::piped());
        // SAFETY: dup2 and fcntl are async-signal-safe; the listener outlives the spawn.
        unsafe {
            command.pre_exec(move || {
                // The listener may be fd 3 already: dup2 onto itself would leave it
                // close-on-exec, and the image would find no fd 3.
                let moved = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn()
    };
    // The image file was just written in this process; a child forked meanwhile by another
    // test's thread may still hold its descriptor open for writing (ETXTBSY) until it
    // execs, for a moment only: the shell's exec then fails and its output ends before the
    // image's `ready` line.
    let mut attempts = 0;
    let mut child = loop {
        let mut child = spawn().expect("the shell runs");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("the image's first line");
        if line.contains("ready") {
            break child;
        }
        let status = child.wait().expect("the shell ends");
        assert!(attempts < 50, "the image never started: {status}");
        attempts += 1;
        std::thread::sleep(Duration::from_millis(20));
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let answer = loop {
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                // Bounded, and generous: on a loaded host the image may take seconds to
                // start accepting on the listener it was handed.
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .expect("timeout");
                stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n")
                    .expect("write");
                let mut answer = String::new();
                stream.read_to_string(&mut answer).expect("read");
                break answer;
            }
            Err(error) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "image never listened: {error}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_of_hello_deploys_an_image_that_answers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let work = hello_fixture(tmp.path(), "hello").await;
    let source_commit = head(&work).await;

    let (ok, stderr) = push(&work, &daemon.url("hello"), &[]).await;
    assert!(ok, "push failed:\n{stderr}");
    let remote = remote_lines(&stderr);
    // The log streamed through the hook: start, the compiler's output, the result.
    assert!(
        remote.iter().any(|l| l.contains("build #1 started")),
        "{stderr}"
    );
    assert!(
        remote
            .iter()
            .any(|l| l.contains("] ") && l.contains("Compiling hello")),
        "{stderr}"
    );
    let record = wait_finished(&daemon.builder, &source_commit).await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    assert!(record.made_live);
    let revision: Revision = record
        .revision
        .as_deref()
        .expect("revision")
        .parse()
        .expect("hex");
    let name = format!("{}.hello.{ZONE}", revision.short(12));
    assert!(
        remote.iter().any(|l| l.contains(&name)),
        "{name} not in\n{stderr}"
    );

    assert_eq!(daemon.store.live("hello").expect("live"), Some(revision));
    let deployment = daemon
        .store
        .deployment("hello", &revision)
        .expect("deployment");
    assert_eq!(deployment.status, BuildStatus::Succeeded);
    assert_eq!(deployment.source_commit, source_commit);
    assert_eq!(deployment.source_ref.as_deref(), Some("refs/heads/main"));
    let log = String::from_utf8(daemon.store.build_log(&revision).expect("log")).expect("utf8");
    assert!(log.contains("Compiling hello"), "{log}");
    assert_eq!(
        daemon
            .builder
            .build_log("hello", &revision)
            .expect("log via builder"),
        log.as_bytes()
    );

    let image = daemon
        .store
        .materialize_image(&revision, &tmp.path().join("images"))
        .expect("image");
    let answer = run_image_and_get(&image, &revision);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("hello from v1 ({})", revision.to_hex())),
        "{answer}"
    );
    assert_eq!(daemon.builder.services().expect("services"), vec!["hello"]);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compile_error_is_a_failed_build_and_live_stays() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let work = hello_fixture(tmp.path(), "hello").await;
    let (ok, stderr) = push(&work, &daemon.url("hello"), &[]).await;
    assert!(ok, "{stderr}");
    let good = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(good.state, BuildState::Succeeded, "{good:#?}");
    let live_before = daemon
        .store
        .live("hello")
        .expect("live")
        .expect("some live");

    let main_rs = work.join("src/main.rs");
    let text = std::fs::read_to_string(&main_rs).expect("read");
    let broken = text.replace(
        "const REVISION: &str = \"v1\";",
        "const REVISION: &str = 42;",
    );
    assert_ne!(text, broken, "fixture changed shape");
    std::fs::write(&main_rs, broken).expect("write");
    let bad_commit = commit_all(&work, "break it").await;
    let (ok, stderr) = push(&work, &daemon.url("hello"), &[]).await;
    // The build fails, and so does the push.
    assert!(!ok, "{stderr}");
    let remote = remote_lines(&stderr);
    assert!(
        remote.iter().any(|l| l.contains("error[E0308]")),
        "{stderr}"
    );
    assert!(
        remote.iter().any(|l| l.contains("build #2 failed")),
        "{stderr}"
    );

    let record = wait_finished(&daemon.builder, &bad_commit).await;
    assert_eq!(record.state, BuildState::Failed, "{record:#?}");
    assert!(!record.made_live);
    let failed: Revision = record
        .revision
        .as_deref()
        .expect("recorded")
        .parse()
        .expect("hex");
    let deployment = daemon
        .store
        .deployment("hello", &failed)
        .expect("deployment");
    assert_eq!(deployment.status, BuildStatus::Failed);
    assert!(deployment.image.is_none());
    let log = String::from_utf8(daemon.store.build_log(&failed).expect("log")).expect("utf8");
    assert!(log.contains("error[E0308]: mismatched types"), "{log}");
    assert_eq!(daemon.store.live("hello").expect("live"), Some(live_before));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_recipe_fails_with_key_and_line() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let recipe = "[build]\ncommand = [\"true\"]\nartifacts = [\"a\"]\n\n[run]\nprot = 80\n";
    let work = recipe_fixture(tmp.path(), "typo", recipe).await;
    let (ok, stderr) = push(&work, &daemon.url("typo"), &[]).await;
    assert!(!ok, "{stderr}");
    assert!(
        remote_lines(&stderr)
            .iter()
            .any(|l| l.contains("line 6") && l.contains("prot")),
        "{stderr}"
    );
    let record = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(record.state, BuildState::Failed);
    let revision: Revision = record
        .revision
        .as_deref()
        .expect("recorded")
        .parse()
        .expect("hex");
    let log = String::from_utf8(daemon.store.build_log(&revision).expect("log")).expect("utf8");
    assert!(
        log.contains("revboot.toml, line 6") && log.contains("prot"),
        "{log}"
    );
    assert_eq!(daemon.store.live("typo").expect("live"), None);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_name_no_certificate_can_cover_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let recipe = "[build]\nshell = \"mkdir -p out && cp exit0 out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "dashes", recipe).await;
    // `--` in the third and fourth characters: DNS keeps such labels for encodings, and no
    // CA issues `*.ab--cd.<zone>`.
    let (ok, stderr) = push(&work, &daemon.url("ab--cd"), &[]).await;
    assert!(!ok, "the push went through:\n{stderr}");
    assert!(daemon.builder.services().expect("services").is_empty());
    assert!(
        daemon
            .store
            .history("ab--cd")
            .unwrap_or_default()
            .is_empty()
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_without_credentials_is_rejected_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let recipe = "[build]\nshell = \"mkdir -p out && cp exit0 out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "guarded", recipe).await;

    // A new service: no repository may appear.
    let (ok, stderr) = push(&work, &daemon.anonymous_url("guarded"), &[]).await;
    assert!(!ok, "push without credentials succeeded:\n{stderr}");
    let wrong = daemon.url("guarded").replace(TOKEN, "wrong-token");
    let (ok, stderr_wrong) = push(&work, &wrong, &[]).await;
    assert!(!ok, "push with a wrong token succeeded:\n{stderr_wrong}");
    assert!(daemon.builder.services().expect("services").is_empty());
    assert!(
        !daemon
            .builder
            .source_repo("guarded")
            .expect("name")
            .exists()
    );

    // An existing service: its refs stay as they were.
    daemon.builder.add_service("guarded").await.expect("add");
    let (ok, stderr) = push(&work, &daemon.anonymous_url("guarded"), &[]).await;
    assert!(!ok, "{stderr}");
    let repo = daemon.builder.source_repo("guarded").expect("name");
    let refs = git_ok(&repo, &["for-each-ref"]).await;
    assert_eq!(refs, "", "refs changed by a rejected push");
    assert!(daemon.builder.build_records(None).await.is_empty());
    assert!(
        daemon
            .store
            .history("guarded")
            .map(|h| h.is_empty())
            .unwrap_or(true)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_over_its_time_limit_is_killed_with_every_process_it_started() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut uid = 0;
    let daemon = daemon(&tmp.path().join("data"), |c| uid = c.sandbox.uid).await;
    let recipe = "[build]\nshell = \"sleep 300 & echo waiting; sleep 300\"\nartifacts = [\"a\"]\ntimeout_secs = 2\n";
    let work = recipe_fixture(tmp.path(), "slow", recipe).await;
    let (ok, stderr) = push(&work, &daemon.url("slow"), &[]).await;
    assert!(!ok, "{stderr}");
    assert!(
        remote_lines(&stderr)
            .iter()
            .any(|l| l.contains("killed: the build ran longer than its limit of 2s")),
        "{stderr}"
    );
    let record = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(record.state, BuildState::Failed);
    // The build's first process is reaped before the build is recorded, and the kernel
    // killed the rest of its pid namespace before that: nothing runs as its uid.
    assert_eq!(
        processes_of(uid),
        Vec::<u32>::new(),
        "build processes survived"
    );
    let revision: Revision = record
        .revision
        .as_deref()
        .expect("recorded")
        .parse()
        .expect("hex");
    let deployment = daemon
        .store
        .deployment("slow", &revision)
        .expect("deployment");
    assert_eq!(deployment.status, BuildStatus::Failed);
    let log = String::from_utf8(daemon.store.build_log(&revision).expect("log")).expect("utf8");
    assert!(log.contains("waiting") && log.contains("killed"), "{log}");
    assert_eq!(daemon.store.live("slow").expect("live"), None);
    daemon.stop().await;
}

/// A recipe whose build waits until `gate` exists, then writes the commit as its image.
fn gated_recipe(gate: &std::path::Path) -> String {
    format!(
        "[build]\nshell = \"while [ ! -e {} ]; do sleep 0.05; done; mkdir -p out; cp exit0 out/image; echo $REVBOOT_SOURCE_COMMIT >> out/image\"\nartifacts = [\"out/image\"]\ntimeout_secs = 120\n",
        gate.display()
    )
}

/// Starts a push of `main` of `work` in the background.
fn push_in_background(
    work: &std::path::Path,
    url: &str,
    extra: &'static [&'static str],
) -> tokio::task::JoinHandle<(bool, String)> {
    let (work, url) = (work.to_owned(), url.to_owned());
    tokio::spawn(async move { push(&work, &url, extra).await })
}

/// A newer push of a branch keeps the queued builds of its history (no hole) and takes the
/// live move from them; a force push supersedes the queued builds it rewrote, and the push
/// that waited for one of them fails, its branch left where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_pushes_keep_queued_history_and_supersede_what_they_rewrote() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let gate = gates(&tmp.path().join("data")).join("gate");
    let work = recipe_fixture(tmp.path(), "svc", &gated_recipe(&gate)).await;
    let url = daemon.url("svc");

    // A occupies the service; B waits behind it; C arrives: B stays, C is the tip.
    let a = head(&work).await;
    let push_a = push_in_background(&work, &url, &[]);
    wait_record(&daemon.builder, "A running", |r| {
        r.source_commit == a && r.state == BuildState::Running
    })
    .await;
    let b = commit_all(&work, "b").await;
    let push_b = push_in_background(&work, &url, &[]);
    let record_b = wait_record(&daemon.builder, "B queued", |r| {
        r.source_commit == b && r.state == BuildState::Queued
    })
    .await;
    let c = commit_all(&work, "c").await;
    let push_c = push_in_background(&work, &url, &[]);
    wait_record(&daemon.builder, "C queued", |r| r.source_commit == c).await;
    // A force push that drops C supersedes it, and keeps B, which is in its history.
    git_ok(&work, &["reset", "-q", "--hard", &b]).await;
    let d = commit_all(&work, "d").await;
    let push_d = push_in_background(&work, &url, &["--force"]);
    let record_d = wait_record(&daemon.builder, "D queued", |r| r.source_commit == d).await;
    let superseded = wait_record(&daemon.builder, "C superseded", |r| {
        r.source_commit == c && r.state.is_finished()
    })
    .await;
    assert_eq!(superseded.state, BuildState::Superseded);
    assert_eq!(superseded.superseded_by, Some(record_d.id));
    let kept = wait_record(&daemon.builder, "B", |r| r.id == record_b.id).await;
    assert_eq!(kept.state, BuildState::Queued);
    assert!(!kept.tip, "{kept:?}");

    std::fs::write(&gate, "open").expect("open gate");
    for (name, pushed) in [("A", push_a), ("B", push_b), ("D", push_d)] {
        let (ok, stderr) = pushed.await.expect("push");
        assert!(ok, "push {name}:\n{stderr}");
    }
    let (ok_c, stderr_c) = push_c.await.expect("push C");
    assert!(!ok_c, "{stderr_c}");
    assert!(
        stderr_c.contains(&format!("superseded by build #{}", record_d.id)),
        "{stderr_c}"
    );

    // A, B and D recorded in that order, C never built; live is D, the branch is at D.
    wait_finished(&daemon.builder, &d).await;
    let history = daemon.store.history("svc").expect("history");
    let built: Vec<&str> = history.iter().map(|d| d.source_commit.as_str()).collect();
    assert_eq!(built, vec![d.as_str(), b.as_str(), a.as_str()]);
    let live = daemon.store.live("svc").expect("live").expect("live set");
    assert_eq!(live, history[0].revision);
    let source = daemon.builder.source_repo("svc").expect("name");
    assert_eq!(git_ok(&source, &["rev-parse", "main"]).await, d);
    daemon.stop().await;
}

/// Every commit of a push is built, oldest first; only the tip moves live. A push whose tip
/// fails to build fails (git push exits non-zero, the reason and the log's end in its
/// output) and leaves the branch where it was; with `-o revboot.wait=false` it returns once
/// queued and the branch moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pushed_commit_builds_and_a_failed_tip_fails_the_push() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let recipe = "[build]\nshell = \"test ! -e broken || { echo the build broke; exit 3; }; mkdir -p out; cp exit0 out/image; cat note >> out/image 2>/dev/null || true\"\nartifacts = [\"out/image\"]\n";
    let work = recipe_fixture(tmp.path(), "many", recipe).await;
    let mut commits = vec![head(&work).await];
    for n in 2..=8 {
        std::fs::write(work.join("note"), format!("revision {n}\n")).expect("write");
        commits.push(commit_all(&work, &format!("revision {n}")).await);
    }
    let (ok, stderr) = push(&work, &daemon.url("many"), &[]).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("8 new commits; 8 builds queued"),
        "{stderr}"
    );
    let history = daemon.store.history("many").expect("history");
    let built: Vec<&str> = history
        .iter()
        .rev()
        .map(|d| d.source_commit.as_str())
        .collect();
    let expected: Vec<&str> = commits.iter().map(String::as_str).collect();
    assert_eq!(built, expected);
    assert!(history.iter().all(|d| d.status == BuildStatus::Succeeded));
    let live = daemon.store.live("many").expect("live").expect("set");
    assert_eq!(live, history[0].revision);
    let reflog =
        std::fs::read_to_string(daemon.store.path().join("logs/refs/live/many")).expect("reflog");
    assert_eq!(
        reflog.lines().count(),
        1,
        "live moved to the tip only:\n{reflog}"
    );

    // A broken tip: the push fails, the branch stays, the failure is recorded.
    let source = daemon.builder.source_repo("many").expect("name");
    std::fs::write(work.join("broken"), "").expect("write");
    let broken = commit_all(&work, "break it").await;
    let (ok, stderr) = push(&work, &daemon.url("many"), &[]).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("the build broke"), "{stderr}");
    assert!(
        stderr.contains(
            "[remote rejected] main -> main (failed: the build command failed (exit status 3))"
        ),
        "{stderr}"
    );
    assert_eq!(git_ok(&source, &["rev-parse", "main"]).await, commits[7]);
    let history = daemon.store.history("many").expect("history");
    assert_eq!(history[0].source_commit, broken);
    assert_eq!(history[0].status, BuildStatus::Failed);
    assert_eq!(daemon.store.live("many").expect("live"), Some(live));

    // Without waiting: the push succeeds at once and the branch moves; the build goes on.
    let (ok, stderr) = push(&work, &daemon.url("many"), &["-o", "revboot.wait=false"]).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("not waiting for the builds"), "{stderr}");
    assert_eq!(git_ok(&source, &["rev-parse", "main"]).await, broken);
    let record = wait_record(&daemon.builder, "the second build of the broken tip", |r| {
        r.source_commit == broken && r.state.is_finished() && r.id > history.len() as u64
    })
    .await;
    assert_eq!(record.state, BuildState::Failed);
    daemon.stop().await;
}

/// A push of more commits than `max_commits_per_push` builds the newest and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_push_builds_its_newest_commits_and_says_so() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |c| c.max_commits_per_push = 3).await;
    let recipe =
        "[build]\nshell = \"mkdir -p out; cp exit0 out/image\"\nartifacts = [\"out/image\"]\n";
    let work = recipe_fixture(tmp.path(), "long", recipe).await;
    let mut commits = vec![head(&work).await];
    for n in 2..=5 {
        commits.push(commit_all(&work, &format!("revision {n}")).await);
    }
    let (ok, stderr) = push(&work, &daemon.url("long"), &[]).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("building the newest 3 commits"), "{stderr}");
    assert!(
        stderr.contains("the 2 older commits are built on demand"),
        "{stderr}"
    );
    let history = daemon.store.history("long").expect("history");
    let built: Vec<&str> = history
        .iter()
        .rev()
        .map(|d| d.source_commit.as_str())
        .collect();
    let expected: Vec<&str> = commits[2..].iter().map(String::as_str).collect();
    assert_eq!(built, expected);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_two_services_build_in_parallel() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let daemon = daemon(&data, |c| c.max_parallel = 2).await;
    // Each build marks that it started (in its own cache, which the host sees), then waits
    // (up to 60 s) for a gate the test opens once both marks exist: they can only both
    // succeed if they ran at the same time.
    let gate = gates(&data).join("both-started");
    let recipe = |me: &str| {
        format!(
            "[build]\nshell = \"touch $HOME/started; i=0; while [ ! -e {} ]; do i=$((i+1)); if [ $i -gt 1200 ]; then echo alone; exit 1; fi; sleep 0.05; done; mkdir -p out; cp exit0 out/image; echo {me} >> out/image\"\nartifacts = [\"out/image\"]\ntimeout_secs = 120\n",
            gate.display()
        )
    };
    let left = recipe_fixture(tmp.path(), "left", &recipe("left")).await;
    let right = recipe_fixture(tmp.path(), "right", &recipe("right")).await;
    let push_left = tokio::spawn({
        let (work, url) = (left.clone(), daemon.url("left"));
        async move { push(&work, &url, &[]).await }
    });
    let push_right = tokio::spawn({
        let (work, url) = (right.clone(), daemon.url("right"));
        async move { push(&work, &url, &[]).await }
    });
    let marks = ["left", "right"].map(|svc| data.join("cache").join(svc).join("home/started"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !marks.iter().all(|m| m.exists()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&gate, "open").expect("gate");
    let (ok_l, stderr_l) = push_left.await.expect("left");
    let (ok_r, stderr_r) = push_right.await.expect("right");
    assert!(ok_l && ok_r, "{stderr_l}\n{stderr_r}");
    let l = wait_finished(&daemon.builder, &head(&left).await).await;
    let r = wait_finished(&daemon.builder, &head(&right).await).await;
    assert_eq!(l.state, BuildState::Succeeded, "{l:#?}");
    assert_eq!(r.state, BuildState::Succeeded, "{r:#?}");
    let (ls, le) = (
        l.started_at_ms.expect("start"),
        l.finished_at_ms.expect("end"),
    );
    let (rs, re) = (
        r.started_at_ms.expect("start"),
        r.finished_at_ms.expect("end"),
    );
    assert!(
        ls <= re && rs <= le,
        "no overlap: left {ls}..{le}, right {rs}..{re}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_option_and_branch_keep_live() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let recipe = "[build]\nshell = \"mkdir -p out && cp exit0 out/a && echo $REVBOOT_SOURCE_COMMIT >> out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "opt", recipe).await;
    let (ok, stderr) = push(&work, &daemon.url("opt"), &["-o", "revboot.deploy=false"]).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("live unchanged: push option revboot.deploy=false"),
        "{stderr}"
    );
    let record = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(record.state, BuildState::Succeeded);
    assert!(!record.made_live);
    assert_eq!(daemon.store.live("opt").expect("live"), None);

    // A misspelt option builds nothing and says why.
    let second = commit_all(&work, "second").await;
    let (ok, stderr) = push(&work, &daemon.url("opt"), &["-o", "revboot.depoly=false"]).await;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("unknown push option `revboot.depoly=false`"),
        "{stderr}"
    );
    assert!(
        !daemon
            .builder
            .build_records(None)
            .await
            .iter()
            .any(|r| r.source_commit == second)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_runs_with_a_clean_environment_in_a_sandbox_of_its_own() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let mut uid = 0;
    let daemon = daemon(&data, |c| uid = c.sandbox.uid).await;
    let recipe = "[build]\nshell = \"mkdir -p out && cp exit0 out/a && env | sort > out/env && cat /proc/$$/stat > out/stat && id -u > out/id && hostname >> out/id\"\nartifacts = [\"out/a\", \"out/env\", \"out/stat\", \"out/id\"]\n[build.env]\nEXTRA = \"from-recipe\"\n";
    let work = recipe_fixture(tmp.path(), "envy", recipe).await;
    let (ok, stderr) = push(&work, &daemon.url("envy"), &[]).await;
    assert!(ok, "{stderr}");
    let record = wait_finished(&daemon.builder, &head(&work).await).await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    let revision: Revision = record
        .revision
        .as_deref()
        .expect("rev")
        .parse()
        .expect("hex");
    let read = |name: &str| {
        let mut text = String::new();
        daemon
            .store
            .open_image(&revision, Some(name))
            .expect("image")
            .read_to_string(&mut text)
            .expect("read");
        text
    };
    let env = read("env");
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    // The test process has CARGO_MANIFEST_DIR (set by cargo); the build must not.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let allowed = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "CARGO_TARGET_DIR",
        "CARGO_TERM_COLOR",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "REVBOOT_SERVICE",
        "REVBOOT_SOURCE_COMMIT",
        "REVBOOT_SOURCE_REF",
        "REVBOOT_BUILD_ID",
        "EXTRA",
        "PWD",
        "SHLVL",
        "OLDPWD",
        "_",
    ];
    for name in &names {
        assert!(
            allowed.contains(name),
            "unexpected variable {name} in\n{env}"
        );
    }
    assert!(env.contains("EXTRA=from-recipe"), "{env}");
    let home = data.join("cache/envy/home");
    assert!(env.contains(&format!("HOME={}", home.display())), "{env}");
    assert!(
        env.contains(&format!(
            "CARGO_TARGET_DIR={}",
            data.join("cache/envy/target").display()
        )),
        "{env}"
    );
    // /proc/<pid>/stat: pid (comm) state ppid pgrp session ...: the shell is pid 1 of a pid
    // namespace of its own, leading its own session.
    let stat = read("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    assert!(stat.starts_with("1 ("), "{stat}");
    assert_eq!((fields[2], fields[3]), ("1", "1"), "{stat}");
    // As the daemon's build uid, not root, in a uts namespace of its own.
    assert_eq!(read("id"), format!("{uid}\nbuild\n"));
    daemon.stop().await;
}

/// A pushed tag names the deployment of its commit (`<tag>.<service>.<zone>`), as a tag
/// made by hand in the deployment repository does: one pushed with its commit, once that
/// built; one pushed later, at once; one pushed after its commit built twice, the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_tag_names_the_deployment_of_its_commit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let recipe = "[build]\nshell = \"mkdir -p out && cp exit0 out/a && echo $REVBOOT_SOURCE_COMMIT >> out/a\"\nartifacts = [\"out/a\"]\n";
    let work = recipe_fixture(tmp.path(), "tagged", recipe).await;
    git_ok(&work, &["tag", "-a", "-m", "first", "v1"]).await;
    let url = daemon.url("tagged");
    let output = git(&work, &["push", &url, "main", "v1"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let first = head(&work).await;
    let record = wait_finished(&daemon.builder, &first).await;
    assert_eq!(record.state, BuildState::Succeeded);
    let named = |label: &str| {
        let revision = daemon
            .store
            .resolve("tagged", Some(label))
            .unwrap_or_else(|error| panic!("{label}: {error}"));
        daemon
            .store
            .deployment("tagged", &revision)
            .expect("a deployment")
            .source_commit
    };
    assert_eq!(named("v1"), first);

    git_ok(&work, &["tag", "later"]).await;
    git_ok(&work, &["push", &url, "later"]).await;
    assert_eq!(named("later"), first);

    // The commit built again from another branch: a tag pushed now names its first
    // deployment still, the one every node of a cluster agrees on.
    git_ok(&work, &["push", &url, "main:refs/heads/again"]).await;
    let again = wait_record(&daemon.builder, "the build of branch again", |r| {
        r.source_ref == "refs/heads/again" && r.state.is_finished()
    })
    .await;
    assert_eq!(again.state, BuildState::Succeeded);
    assert_ne!(again.revision, record.revision);
    git_ok(&work, &["tag", "third"]).await;
    git_ok(&work, &["push", &url, "third"]).await;
    let revision = daemon
        .store
        .resolve("tagged", Some("third"))
        .expect("third");
    assert_eq!(Some(revision.to_string()), record.revision);
    daemon.stop().await;
}
