//! Every pushed commit is a deployment; the deployment repository is a git remote.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

use crate::support::{
    Daemon, Setup, commit_revision, curl, dig_ok, eventually, git, hello_source, history, push, run,
};

const ZONE: &str = "revboot.test";

/// The check both bisections run: the revision's greeting is `hello`.
const CHECK: &str = "curl -sf --max-time 20 --resolve \"$REVBOOT_NAME:8080:$REVBOOT_ADDR\" \
                     \"http://$REVBOOT_NAME:8080/\" | grep -q '^hello from'";

/// git with the test's identity, whatever the outcome.
fn git_any(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .args(["-c", "user.name=ci", "-c", "user.email=ci@revboot.test"])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .expect("git runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The deployment repository's URL, with the token (or without).
fn deploy_url(daemon: &Daemon, token: bool) -> String {
    match token {
        true => format!(
            "http://git:{}@{}/git/-/deploy.git",
            daemon.token, daemon.http
        ),
        false => format!("http://{}/git/-/deploy.git", daemon.http),
    }
}

/// The status word of a `dig` answer.
fn dig_status(daemon: &Daemon, name: &str) -> String {
    let output = daemon.dig_from("127.0.0.1", name);
    output
        .lines()
        .find_map(|line| line.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("none")
        .to_owned()
}

/// Eight commits in one push, the fifth broken: eight deployments, each booting by name;
/// `revboot bisect` through the API (no data directory), over the source history too, and
/// `git bisect run` in a clone of the deployment repository made over HTTP all name the
/// fifth; the clone checks the service out and the README's git commands work in it.
#[test]
fn every_pushed_commit_boots_by_name_and_every_bisection_names_the_fifth() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    for n in 2..=8 {
        let greeting = if n >= 5 { "broken" } else { "hello" };
        commit_revision(&work, &format!("v{n}"), greeting);
    }
    let pushed = push(&daemon, &work);
    assert!(
        pushed.contains("8 new commits; 8 builds queued"),
        "{pushed}"
    );
    let all = history(&daemon, "hello");
    assert_eq!(all.len(), 8, "{all:?}");
    for (n, deployment) in all.iter().rev().enumerate() {
        let n = n + 1;
        assert_eq!(deployment["status"], "succeeded", "{deployment}");
        assert_eq!(deployment["live"], n == 8, "{deployment}");
        let name = format!(
            "{}.hello.{ZONE}",
            deployment["short"].as_str().expect("short")
        );
        let body = curl(&name, &dig_ok(&daemon, &name, false), 8080);
        let greeting = if n >= 5 { "broken" } else { "hello" };
        assert!(body.starts_with(&format!("{greeting} from v{n}")), "{body}");
    }
    let fifth = all[3]["revision"].as_str().expect("revision").to_owned();
    let (first, last) = (short(&all[7]), short(&all[0]));

    // revboot bisect talks to the daemon alone: its data directory here is an empty one.
    let elsewhere = temp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let bisect = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_revboot"))
            .args(["--url", &format!("http://{}", daemon.http)])
            .args(["--data", &elsewhere.to_string_lossy()])
            .args(args)
            .args(["--", "sh", "-c", CHECK])
            .env("REVBOOT_TOKEN", &daemon.token)
            .stdin(Stdio::null())
            .output()
            .expect("revboot runs");
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let found = bisect(&["bisect", "hello", "--good", &first, "--bad", &last]);
    assert!(found.contains(&fifth), "{found}");
    assert!(found.contains("hello v5"), "{found}");
    let source = |d: &serde_json::Value| d["source_commit"].as_str().expect("source").to_owned();
    let found = bisect(&[
        "bisect",
        "hello",
        "--source",
        "--good",
        &source(&all[7]),
        "--bad",
        &source(&all[0]),
    ]);
    assert!(
        found.contains(&format!("first bad source commit: {}", source(&all[3]))),
        "{found}"
    );

    // A check that passes on the revision given as bad is named as the reason nothing was
    // found (git's own output only says the revision "was both good and bad").
    let passing = Command::new(env!("CARGO_BIN_EXE_revboot"))
        .args(["--url", &format!("http://{}", daemon.http)])
        .args(["--data", &elsewhere.to_string_lossy()])
        .args(["bisect", "hello", "--good", &short(&all[1]), "--bad", &last])
        .args(["--", "true"])
        .env("REVBOOT_TOKEN", &daemon.token)
        .stdin(Stdio::null())
        .output()
        .expect("revboot runs");
    assert_eq!(passing.status.code(), Some(1), "{}", text(&passing));
    let said = String::from_utf8_lossy(&passing.stderr);
    assert!(
        said.contains(&format!("The check passed on `{last}`, given as --bad")),
        "{said}"
    );

    // A clone over HTTP checks the service out; the README's commands work in it.
    let clone = temp.path().join("deploy");
    run(Command::new("git")
        .args(["clone", "-q", &deploy_url(&daemon, true)])
        .arg(&clone));
    assert!(clone.join("build.log").is_file(), "nothing checked out");
    assert!(clone.join("image/hello").is_file(), "nothing checked out");
    let log = git(&clone, &["log", "--format=%H", "hello"]);
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), 8);
    let build_log = git(&clone, &["show", "hello:build.log"]);
    assert!(
        String::from_utf8_lossy(&build_log.stdout).contains("Compiling hello"),
        "{}",
        String::from_utf8_lossy(&build_log.stdout)
    );
    // git bisect run over the deployments, asking DNS for each revision's own name.
    let dig = format!(
        "dig @{} -p {} +short +time=5 +tries=1",
        daemon.dns.ip(),
        daemon.dns.port()
    );
    let script = format!(
        "name=$(git rev-parse --short=12 HEAD).hello.{ZONE}; addr=$({dig} $name A); \
         curl -sf --max-time 20 --resolve $name:8080:$addr http://$name:8080/ | grep -q '^hello from'"
    );
    git(&clone, &["bisect", "start", "hello", &first]);
    let bisected = git(&clone, &["bisect", "run", "sh", "-c", &script]);
    let out = String::from_utf8_lossy(&bisected.stdout);
    assert!(
        out.contains(&format!("{fifth} is the first bad commit")),
        "{out}"
    );

    // git fetch follows new deployments.
    git(&clone, &["bisect", "reset"]);
    commit_revision(&work, "v9", "hello");
    push(&daemon, &work);
    git(&clone, &["pull", "-q", "--ff-only"]);
    let log = git(&clone, &["log", "--format=%H", "hello"]);
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), 9);
}

fn short(entry: &serde_json::Value) -> String {
    entry["short"].as_str().expect("short revision").to_owned()
}

/// A name for a source commit that was pushed but not built builds it and then serves it; a
/// made-up source prefix is NXDOMAIN and builds nothing; a flood of either stays within the
/// bounds (one build for the real commit, none for the made-up ones).
#[test]
fn a_query_for_an_unbuilt_source_commit_builds_and_serves_it() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start_setup(
        &temp.path().join("data"),
        &Setup {
            config: "[builds]\nmax_commits_per_push = 1\n",
            ..Setup::default()
        },
    );
    let work = hello_source(temp.path());
    commit_revision(&work, "v2", "hello");
    commit_revision(&work, "v3", "hello");
    let pushed = push(&daemon, &work);
    assert!(
        pushed.contains("the 2 older commits are built on demand"),
        "{pushed}"
    );
    assert_eq!(history(&daemon, "hello").len(), 1);
    let v2 = String::from_utf8_lossy(&git(&work, &["rev-parse", "HEAD~1"]).stdout)
        .trim()
        .to_owned();
    let name = format!("{}.hello.{ZONE}", &v2[..10]);

    // A flood: the unbuilt commit asked for again and again, and made-up prefixes.
    let mut made_up = Vec::new();
    for n in 0..100u32 {
        let fake = format!("{:08x}ab", n.wrapping_mul(2_654_435_761));
        if !v2.starts_with(&fake[..7]) {
            made_up.push(format!("{fake}.hello.{ZONE}"));
        }
    }
    for fake in &made_up[..3] {
        assert_eq!(dig_status(&daemon, fake), "NXDOMAIN", "{fake}");
    }
    for round in 0..50 {
        let status = dig_status(&daemon, &name);
        assert!(
            matches!(status.as_str(), "SERVFAIL" | "NOERROR"),
            "{status}: {}",
            daemon.dig_from("127.0.0.1", &name)
        );
        let fake = &made_up[round % made_up.len()];
        assert_ne!(dig_status(&daemon, fake), "NOERROR", "{fake}");
        if status == "NOERROR" {
            break;
        }
    }
    let served = eventually(|| !daemon.dig(&name, false).is_empty());
    assert!(served, "{name} never answered; log:\n{}", daemon.log());
    let body = curl(&name, &dig_ok(&daemon, &name, false), 8080);
    assert!(body.starts_with("hello from v2"), "{body}");
    for fake in &made_up {
        assert_ne!(dig_status(&daemon, fake), "NOERROR", "{fake}");
    }
    let after = history(&daemon, "hello");
    assert_eq!(after.len(), 2, "one build on demand, no other: {after:?}");
    assert_eq!(
        after[0]["live"], false,
        "a build on demand never moves live"
    );
}

/// A CI pushes a prebuilt `examples/hello` deployment with stock git into a clone of the
/// deployment repository made over HTTP: it answers at its DNS name and goes live. A push
/// with a missing image, a broken manifest, a rewritten history or no token is refused with
/// the reason, and changes nothing.
#[test]
fn a_ci_pushes_a_prebuilt_deployment_and_malformed_pushes_change_nothing() {
    let temp = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::start(&temp.path().join("data"));
    let work = hello_source(temp.path());
    push(&daemon, &work);
    let clone = temp.path().join("ci");
    run(Command::new("git")
        .args(["clone", "-q", &deploy_url(&daemon, true)])
        .arg(&clone));
    let remote_tip = || {
        let output = git_any(
            temp.path(),
            &["ls-remote", &deploy_url(&daemon, true), "refs/heads/hello"],
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let before = remote_tip();

    // The CI's commit: the image it built (here: the one of the first build), its log, its
    // manifest and the trailers.
    let image = std::fs::read(clone.join("image/hello")).expect("image");
    let trailer = format!(
        "Image: hello {} {}",
        image.len(),
        hex(&Sha256::digest(&image))
    );
    let commit = |message_extra: &str| {
        std::fs::write(clone.join("build.log"), "built by the CI\n").expect("log");
        git(&clone, &["add", "-A"]);
        let message = format!(
            "hello from the CI\n\nBuild-Status: succeeded\nSource-Commit: {}\nSource-Repo: hello\n{trailer}\n{message_extra}",
            "c1".repeat(20)
        );
        let output = git_any(&clone, &["commit", "-q", "--allow-empty", "-m", &message]);
        assert!(output.status.success(), "{}", text(&output));
    };
    let push_ci = |extra: &[&str]| {
        git_any(
            &clone,
            &[&["push"][..], extra, &["origin", "hello"]].concat(),
        )
    };

    // Missing image.
    git(&clone, &["rm", "-q", "image/hello"]);
    commit("");
    let refused = push_ci(&[]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("boots image/hello, which is missing"),
        "{}",
        text(&refused)
    );
    assert_eq!(remote_tip(), before);
    git(&clone, &["reset", "-q", "--hard", "origin/hello"]);

    // A broken manifest.
    std::fs::write(clone.join("revboot.toml"), "[run\nport = 8080\n").expect("write");
    commit("");
    let refused = push_ci(&[]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("revboot.toml is invalid"),
        "{}",
        text(&refused)
    );
    assert_eq!(remote_tip(), before);
    git(&clone, &["reset", "-q", "--hard", "origin/hello"]);

    // A rewritten history (forced).
    git(&clone, &["reset", "-q", "--soft", "HEAD"]);
    let output = git_any(&clone, &["commit", "-q", "--amend", "-m", "rewritten"]);
    assert!(output.status.success(), "{}", text(&output));
    let refused = push_ci(&["--force"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("not a fast-forward"),
        "{}",
        text(&refused)
    );
    assert_eq!(remote_tip(), before);
    git(&clone, &["reset", "-q", "--hard", "origin/hello"]);

    // No token.
    commit("");
    let refused = git_any(&clone, &["push", &deploy_url(&daemon, false), "hello"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert_eq!(remote_tip(), before);

    // The good push: accepted, named, live, and it answers at its name.
    let pushed = push_ci(&[]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let pushed_text = text(&pushed);
    assert!(
        pushed_text.contains("live: hello.revboot.test now answers with"),
        "{pushed_text}"
    );
    let tip = String::from_utf8_lossy(&git(&clone, &["rev-parse", "HEAD"]).stdout)
        .trim()
        .to_owned();
    assert_eq!(remote_tip().split_whitespace().next(), Some(tip.as_str()));
    let all = history(&daemon, "hello");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["revision"], tip.as_str());
    assert_eq!(all[0]["live"], true);
    let name = format!("{}.hello.{ZONE}", &tip[..12]);
    let body = curl(&name, &dig_ok(&daemon, &name, false), 8080);
    assert!(body.contains(&tip), "{body}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
