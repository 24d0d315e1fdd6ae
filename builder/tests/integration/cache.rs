//! The per-service build cache.

use revboot_builder::BuildState;
use revboot_store::Revision;

use crate::support::*;

/// A Rust service with one registry dependency (`itoa`, which the workspace's own
/// dependencies put in the local cargo registry, so `--offline` finds it).
async fn rust_fixture(root: &std::path::Path) -> std::path::PathBuf {
    let dir = root.join("counter");
    std::fs::create_dir_all(dir.join("src")).expect("mkdir");
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"counter\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n\n[dependencies]\nitoa = \"1\"\n",
    )
    .expect("Cargo.toml");
    std::fs::write(
        dir.join("src/main.rs"),
        "fn main() { println!(\"{}\", itoa::Buffer::new().format(1)); }\n",
    )
    .expect("main.rs");
    std::fs::write(
        dir.join("revboot.toml"),
        "[build]\ncommand = [\"cargo\", \"build\", \"--offline\", \"--target\", \"x86_64-unknown-linux-gnu\"]\nartifacts = [\"target/x86_64-unknown-linux-gnu/debug/counter\"]\n",
    )
    .expect("recipe");
    // A process image is static (a dynamically linked one is refused at build time).
    std::fs::create_dir_all(dir.join(".cargo")).expect("mkdir");
    std::fs::write(
        dir.join(".cargo/config.toml"),
        "[build]\nrustflags = [\"-C\", \"target-feature=+crt-static\"]\n",
    )
    .expect("cargo config");
    std::fs::write(dir.join(".gitignore"), "/target\n").expect("gitignore");
    git_ok(&dir, &["init", "-q", "-b", "main"]).await;
    commit_all(&dir, "counter 1").await;
    dir
}

async fn build_log_of(daemon: &Daemon, commit: &str) -> String {
    let record = wait_finished(&daemon.builder, commit).await;
    assert_eq!(record.state, BuildState::Succeeded, "{record:#?}");
    let revision: Revision = record
        .revision
        .as_deref()
        .expect("rev")
        .parse()
        .expect("hex");
    String::from_utf8(daemon.store.build_log(&revision).expect("log")).expect("utf8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_rebuild_reuses_the_service_target_dir() {
    let tmp = tempfile::tempdir().expect("tmp");
    let daemon = daemon(&tmp.path().join("data"), |_| {}).await;
    let work = rust_fixture(tmp.path()).await;
    let (ok, stderr) = push(&work, &daemon.url("counter"), &[]).await;
    assert!(ok, "{stderr}");
    let first = build_log_of(&daemon, &head(&work).await).await;
    assert!(first.contains("Compiling itoa"), "{first}");
    assert!(first.contains("Compiling counter"), "{first}");

    std::fs::write(
        work.join("src/main.rs"),
        "fn main() { println!(\"{}\", itoa::Buffer::new().format(2)); }\n",
    )
    .expect("main.rs");
    let second_commit = commit_all(&work, "counter 2").await;
    let (ok, stderr) = push(&work, &daemon.url("counter"), &[]).await;
    assert!(ok, "{stderr}");
    let second = build_log_of(&daemon, &second_commit).await;
    // A fresh checkout, but the dependency comes from the service's cache.
    assert!(second.contains("Compiling counter"), "{second}");
    assert!(!second.contains("Compiling itoa"), "{second}");
    daemon.stop().await;
}
