//! Push-to-deployed overhead for `examples/hello` with a warm build cache.
//!
//! Starts the builder and its router on a loopback port, pushes `examples/hello` once to warm
//! the per-service cache, then pushes `N` new revisions (the `REVISION` constant changes each
//! time) with stock git and measures, for each push: the wall time of `git push` (which ends
//! after the build's result is printed, i.e. after the deployment commit exists and live has
//! moved) and the build command's own time as the builder recorded it. The overhead is
//! their difference: pack transfer, hook round trip, queueing, checkout, storing the image
//! and moving live. Goal: ≤ 1 s.
//!
//! `cargo bench -p revboot-builder --bench push_overhead` (or `bench/push-overhead.sh`);
//! `PUSH_OVERHEAD_N` sets the number of measured pushes (default 10).
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use revboot_builder::{BuildState, Builder, BuilderConfig};
use revboot_store::Store;

const TOKEN: &str = "bench-token";

fn git(dir: &Path, home: &Path, args: &[&str]) -> std::process::Output {
    let git = if Path::new("/usr/local/bin/git").exists() {
        "/usr/local/bin/git"
    } else {
        "git"
    };
    let output = std::process::Command::new(git)
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.invalid")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.invalid")
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read") {
        let entry = entry.expect("entry");
        if entry.file_name() == "target" {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

async fn finished(builder: &Builder, commit: &str) -> revboot_builder::BuildRecord {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let records = builder.build_records(Some("hello")).await;
        if let Some(record) = records
            .into_iter()
            .find(|r| r.source_commit == commit && r.state.is_finished())
        {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "build of {commit} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("PUSH_OVERHEAD_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10)
        .max(1);
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let store = Store::init(data.join("deploy.git")).expect("store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let mut config = BuilderConfig::new(&data, store, "revboot.test", base.clone());
    config.push_tokens = vec![TOKEN.into()];
    let builder = Builder::start(config).await.expect("builder");
    let router = builder.router();
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    let url = format!(
        "http://git:{TOKEN}@{}/git/hello.git",
        base.trim_start_matches("http://")
    );

    let work = tmp.path().join("hello");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello"),
        &work,
    );
    git(&work, &home, &["init", "-q", "-b", "main"]);
    git(&work, &home, &["add", "-A"]);
    git(&work, &home, &["commit", "-q", "-m", "v1"]);

    let push = |work: &Path| {
        let started = Instant::now();
        git(work, &home, &["push", "-q", &url, "main"]);
        started.elapsed().as_secs_f64()
    };
    let head = |work: &Path| {
        String::from_utf8_lossy(&git(work, &home, &["rev-parse", "HEAD"]).stdout)
            .trim()
            .to_owned()
    };

    // Warm-up: the first build fills the per-service cache.
    let cold = tokio::task::block_in_place(|| push(&work));
    let record = finished(&builder, &head(&work)).await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    println!(
        "warm-up push: {cold:.3}s total, build command {:.3}s",
        record.command_secs.unwrap_or(0.0)
    );

    let main_rs = work.join("src/main.rs");
    let original = std::fs::read_to_string(&main_rs).expect("main.rs");
    let (mut totals, mut commands, mut overheads, mut queue, mut around) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    println!("push  total_s  command_s  overhead_s  queued_to_start_s  in_builder_not_command_s");
    for i in 0..n {
        let text = original.replace(
            "const REVISION: &str = \"v1\";",
            &format!("const REVISION: &str = \"b{i}\";"),
        );
        std::fs::write(&main_rs, text).expect("write");
        git(&work, &home, &["commit", "-q", "-am", &format!("b{i}")]);
        let total = tokio::task::block_in_place(|| push(&work));
        let record = finished(&builder, &head(&work)).await;
        assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
        assert!(record.made_live);
        let command = record.command_secs.expect("command time");
        let started = record.started_at_ms.expect("start");
        let ended = record.finished_at_ms.expect("end");
        let waited = (started - record.queued_at_ms) as f64 / 1000.0;
        let inside = (ended - started) as f64 / 1000.0 - command;
        println!(
            "{i:>4}  {total:7.3}  {command:9.3}  {:10.3}  {waited:17.3}  {inside:24.3}",
            total - command
        );
        totals.push(total);
        commands.push(command);
        overheads.push(total - command);
        queue.push(waited);
        around.push(inside);
    }
    for (name, values) in [
        ("total", &mut totals),
        ("build command", &mut commands),
        ("overhead (total - command)", &mut overheads),
        ("  of which queued→started", &mut queue),
        ("  of which checkout+store+live", &mut around),
    ] {
        let (min, median, max) = stats(values);
        println!("{name:<32} min {min:.3}s  median {median:.3}s  max {max:.3}s");
    }
    let (_, median, _) = stats(&mut overheads);
    println!(
        "push-to-deployed overhead, median of {n}: {median:.3}s (goal <= 1.000s): {}",
        if median <= 1.0 { "met" } else { "NOT met" }
    );
    builder.shutdown().await;
}
