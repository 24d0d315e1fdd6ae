//! `cargo install --path .` into an empty root gives a `revboot` whose `demo` works outside
//! the source tree: the hello service it pushes is built into the binary.

use std::process::Command;
use std::time::Duration;

use crate::{installed, run_for};

#[test]
fn cargo_install_gives_a_revboot_whose_demo_works_outside_the_source_tree() {
    let root = installed();
    let mut files: Vec<String> = std::fs::read_dir(root.join("bin"))
        .expect("the root has bin/")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    assert_eq!(files, ["revboot"]);

    // Outside the source tree, with a clean environment but for PATH and HOME (the
    // toolchain that builds hello is found there, as a user's): the demo pushes the
    // built-in hello twice with stock git, and both revisions are deployed.
    let temp = tempfile::tempdir().expect("temp dir");
    // A /24 apart from the other tests' (revboot_testkit::test_pool: 127.90-239.*) and a
    // daemon's default (127.77.*), from the process id.
    let pool = format!(
        "127.{}.{}.0/24",
        240 + std::process::id() % 15,
        std::process::id() / 15 % 256
    );
    let output = run_for(
        Command::new(root.join("bin/revboot"))
            .args(["--data", "data", "demo", "--once"])
            .args([
                "--http",
                "127.0.0.1:0",
                "--dns",
                "127.0.0.1:0",
                "--pool",
                &pool,
            ])
            .current_dir(temp.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").expect("PATH"))
            .env("HOME", std::env::var_os("HOME").expect("HOME")),
        Duration::from_secs(900),
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("revboot is serving"), "{said}");
    let data = temp.path().join("data");
    assert!(data.join("demo/hello/revboot.toml").is_file());
    assert!(data.join("token").is_file());
    let count = run_for(
        Command::new("git")
            .arg("-C")
            .arg(data.join("deploy.git"))
            .args(["rev-list", "--count", "refs/heads/hello"]),
        Duration::from_secs(60),
    );
    assert_eq!(String::from_utf8_lossy(&count.stdout).trim(), "2");
}
