//! How revboot is installed: `cargo install` into an empty root, and the Debian package in
//! a clean Debian root, where systemd starts its unit.
//!
//! A test binary of its own, unlike the crate's other end-to-end tests (`integration`):
//! cargo runs test binaries one after another, so building the whole crate here never
//! competes for the cores with the daemons of those tests, whose waits are bounded.

mod deb;
mod install;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cargo profile the tests install and package (see the workspace's Cargo.toml).
pub const PROFILE: &str = "packaging-test";

/// Runs a command to its end, at most `limit`, and panics with its output if it fails.
pub fn run_for(command: &mut Command, limit: Duration) -> Output {
    let child: Child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    let id = child.id();
    // The watchdog kills the command if it outlives its limit; wait_with_output then ends.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &id.to_string()])
                .status();
        }
    });
    let started = Instant::now();
    let output = child.wait_with_output().expect("wait for the command");
    let _ = done.send(());
    let _ = watchdog.join();
    assert!(
        output.status.success(),
        "{command:?} failed ({:?}, after {:?} of {limit:?}):\n{}\n{}",
        output.status,
        started.elapsed(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The cargo target directory the tests were built in.
pub fn target_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_revboot"));
    exe.parent()
        .and_then(|profile| profile.parent())
        .expect("the binary is in <target>/<profile>/")
        .to_owned()
}

/// The target directory of what the tests install and package: beside the tests' (whose
/// binary the other tests run), kept between runs so that a second run builds nothing.
pub fn install_target() -> PathBuf {
    target_dir().join("install-test")
}

/// The root `cargo install --path .` installed into, emptied first; once per run.
pub fn installed() -> PathBuf {
    static ROOT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut root = ROOT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(root) = &*root {
        return root.clone();
    }
    let dir = install_target().join("root");
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => panic!("cannot empty {}: {error}", dir.display()),
    }
    std::fs::create_dir_all(&dir).expect("the install root");
    // --offline: the crates the tests were built from are all there.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_for(
        Command::new(cargo)
            .args(["install", "--quiet", "--locked", "--offline"])
            .args(["--profile", PROFILE, "--path"])
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg("--root")
            .arg(&dir)
            .env("CARGO_TARGET_DIR", install_target())
            .current_dir(Path::new(&dir)),
        Duration::from_secs(1800),
    );
    *root = Some(dir.clone());
    dir
}
