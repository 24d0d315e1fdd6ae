//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store, WriteError};

/// Stock git, as on the machine.
pub const GIT: &str = "/usr/local/bin/git";

/// The manifest every test deployment carries.
pub const MANIFEST: &str = "[build]\ncommand = [\"make\"]\nartifacts = [\"out/hello\"]\n";

/// Runs stock git in `dir` with a clean environment; panics with its output on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = git_output(dir, args);
    assert!(
        output.status.success(),
        "git {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("git prints UTF-8")
}

/// Runs stock git and returns whatever happened.
pub fn git_output(dir: &Path, args: &[&str]) -> Output {
    Command::new(GIT)
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@localhost")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@localhost")
        .output()
        .expect("git runs")
}

pub use revboot_testkit::assert_fsck_clean;

/// A fresh store in a temporary directory.
pub fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::init(dir.path().join("deploy.git")).expect("init");
    (dir, store)
}

/// The source commit id used for build number `n`.
pub fn source(n: u32) -> String {
    format!("{n:08x}").repeat(5)
}

/// One deployment of `service`: a successful one when `image` is given.
pub fn deploy(store: &Store, service: &str, n: u32, image: Option<Vec<u8>>) -> Revision {
    deploy_from(store, service, &source(n), "refs/heads/main", image)
}

/// One deployment with a given source commit and ref.
pub fn deploy_from(
    store: &Store,
    service: &str,
    source_commit: &str,
    source_ref: &str,
    image: Option<Vec<u8>>,
) -> Revision {
    try_deploy_from(store, service, source_commit, source_ref, image).expect("deployment written")
}

/// As [`deploy_from`], handing back whatever the store answered.
pub fn try_deploy_from(
    store: &Store,
    service: &str,
    source_commit: &str,
    source_ref: &str,
    image: Option<Vec<u8>>,
) -> Result<Revision, WriteError> {
    let (status, images) = match image {
        Some(bytes) => (
            BuildStatus::Succeeded,
            vec![ImageInput {
                name: "hello".into(),
                reader: Box::new(std::io::Cursor::new(bytes)),
            }],
        ),
        None => (BuildStatus::Failed, Vec::new()),
    };
    store.write_deployment(NewDeployment {
        service,
        status,
        manifest: Some(MANIFEST),
        images,
        build_log: format!("building {source_commit}\n").as_bytes(),
        source_commit,
        source_repo: service,
        source_ref: Some(source_ref),
        subject: &format!("Build {}", &source_commit[..8]),
    })
}

/// Binary-looking bytes: a deterministic pseudo-random stream, with ELF magic.
pub fn binary(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The directory with the fixture scripts.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
