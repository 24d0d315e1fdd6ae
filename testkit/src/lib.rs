//! Test and benchmark support shared by the revboot crates.
//!
//! The deployer's, the DNS front end's and the proxy's tests and benchmarks boot the same
//! example images. They are built here, once, into one target directory
//! (`target/deployer-images/<binary>`, which `bench/dns-qps.sh` also uses), so no crate
//! builds its own copy.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit lives in the workspace")
        .to_path_buf()
}

/// Builds a static image from a cargo project (release, for the host target) and returns
/// the binary. Panics if the build fails: callers are tests and benchmarks.
pub fn build_image(project: &Path, binary: &str) -> PathBuf {
    let target_dir = workspace().join("target/deployer-images").join(binary);
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // The project's own .cargo/config.toml (crt-static) must apply, not what cargo set for us.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME") || key.starts_with("RUSTFLAGS") {
            cargo.env_remove(key);
        }
    }
    let status = cargo
        .current_dir(project)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "--release", "--offline", "--quiet"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {} failed", project.display());
    target_dir
        .join("x86_64-unknown-linux-gnu/release")
        .join(binary)
}

/// The `examples/hello` image.
pub fn hello_image() -> PathBuf {
    build_image(&workspace().join("examples/hello"), "hello")
}

/// The `examples/hostile` image: one attempt to leave the sandbox per request.
pub fn hostile_image() -> PathBuf {
    build_image(&workspace().join("examples/hostile"), "hostile")
}
