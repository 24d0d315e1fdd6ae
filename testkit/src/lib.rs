//! Test and benchmark support shared by the revboot crates.
//!
//! The deployer's, the DNS front end's and the proxy's tests and benchmarks boot the same
//! example images. They are built here, once, into one target directory
//! (`target/deployer-images/<binary>`, which `bench/dns-qps.sh` also uses), so no crate
//! builds its own copy.
//!
//! Crash tests run their subject as a child process ([`test_child`]: the test binary again,
//! running one ignored test) so that it can die by SIGKILL, and check the repository it
//! leaves with stock git ([`assert_fsck_clean`], [`unreachable_objects`]). Disk-full tests
//! run theirs in a mount namespace of its own ([`test_child_with_own_mounts`]) on a small
//! tmpfs ([`mount_tmpfs`]) that goes away with the child, however it ends.
//!
//! Tests of serving beyond loopback make network namespaces of their own ([`netns`]), joined
//! by veth pairs, where documentation prefixes and routes live without touching the host.
//!
//! Cluster tests start a real etcd cluster on loopback addresses of their own ([`etcd`]).
//!
//! With the feature `instances`, the module `instances` holds the one stand-in for the
//! deployer behind `revboot_deployer::Instances` that the DNS front end's and the proxy's
//! tests and benchmarks use.

pub mod etcd;
#[cfg(feature = "instances")]
pub mod instances;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::mpsc;

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

/// The `testkit/images/gated` image: ready when a request for `/open` reaches it, so a
/// test decides when a boot ends ([`GATED_RUN`] is its `[run]` table).
pub fn gated_image() -> PathBuf {
    build_image(&workspace().join("testkit/images/gated"), "gated")
}

/// The `[run]` table for [`gated_image`]: ready on its console line `gated open`, with a boot
/// timeout long enough for any test's steps before it opens.
pub const GATED_RUN: &str = "port = 8080\nmemory_mib = 32\nboot_timeout_ms = 60000\n\
                             ready = { probe = \"console\", line = \"gated open\" }";

/// The `examples/hostile` image: one attempt to leave the sandbox per request.
pub fn hostile_image() -> PathBuf {
    build_image(&workspace().join("examples/hostile"), "hostile")
}

/// The smallest static x86-64 Linux program, `exit(0)` (129 bytes: an ELF header, one
/// loadable segment, three instructions): an image that passes the build's static check,
/// for tests whose images never run. Bytes appended to it change nothing.
#[rustfmt::skip]
pub const EXIT_0: [u8; 129] = [
    0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 0, 0x3e, 0, 1, 0, 0, 0,          // ET_EXEC, EM_X86_64, version 1
    0x78, 0, 0x40, 0, 0, 0, 0, 0,       // entry point 0x400078
    64, 0, 0, 0, 0, 0, 0, 0,            // program headers at 64
    0, 0, 0, 0, 0, 0, 0, 0,             // no section headers
    0, 0, 0, 0, 64, 0, 56, 0,           // flags, header size, program header size
    1, 0, 0, 0, 0, 0, 0, 0,             // one program header, no sections
    1, 0, 0, 0, 5, 0, 0, 0,             // PT_LOAD, readable and executable
    0, 0, 0, 0, 0, 0, 0, 0,             // from file offset 0
    0, 0, 0x40, 0, 0, 0, 0, 0,          // virtual address 0x400000
    0, 0, 0x40, 0, 0, 0, 0, 0,          // physical address 0x400000
    129, 0, 0, 0, 0, 0, 0, 0,           // size in the file
    129, 0, 0, 0, 0, 0, 0, 0,           // size in memory
    0, 0x10, 0, 0, 0, 0, 0, 0,          // aligned to 4 KiB
    0x31, 0xff,                         // xor edi, edi
    0xb8, 60, 0, 0, 0,                  // mov eax, 60 (exit)
    0x0f, 0x05,                         // syscall
];

/// Which part of `127.0.0.0/8` a crate's tests take service addresses from: the second
/// octet of their pools.
#[derive(Debug, Clone, Copy)]
pub enum PoolRange {
    /// The deployer's tests: `127.150-179.*`.
    Deployer = 150,
    /// The handshake proxy's tests: `127.180-209.*`.
    Proxy = 180,
    /// The DNS front end's tests: `127.210-239.*`.
    Dns = 210,
}

/// A loopback /24 of service addresses for test world `index` of a crate's tests. The second
/// octet comes from the process id too, so that two test runs on one host (two checkouts'
/// suites, or a suite beside a daemon) seldom share addresses (1 in 30 pairs; the root
/// crate's end-to-end tests use `127.90-149.*`, a daemon's default pool `127.77.*`).
pub fn test_pool(range: PoolRange, index: u8) -> String {
    format!(
        "127.{}.{index}.0/24",
        range as u32 + std::process::id() % 30
    )
}

/// Stock git, as installed on the machine.
pub fn stock_git() -> &'static str {
    if Path::new("/usr/local/bin/git").exists() {
        "/usr/local/bin/git"
    } else {
        "git"
    }
}

/// This test binary again, running only its ignored test `name` (e.g. `crash::child`),
/// with its output uncaptured. The child test reads what it should do from the
/// environment the caller adds.
pub fn test_child(name: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("a test binary has a path"));
    command.args(child_arguments(name));
    command
}

fn child_arguments(name: &str) -> [&str; 5] {
    [
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]
}

/// As [`test_child`], in a mount namespace of its own (`unshare --mount --propagation
/// private`): what the child mounts is gone when it ends, and the host never sees it. Needs
/// root.
pub fn test_child_with_own_mounts(name: &str) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().expect("a test binary has a path"))
        .args(child_arguments(name));
    command
}

/// Runs a child test to its end and panics, with its output, unless it passed.
pub fn assert_child_passes(command: &mut Command) {
    let output = command.output().expect("the child test starts");
    assert!(
        output.status.success(),
        "the child test failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Mounts a tmpfs of `bytes` on `dir` (made if absent). Root only, and only in a child of
/// [`test_child_with_own_mounts`], whose namespace takes the mount with it.
pub fn mount_tmpfs(dir: &Path, bytes: u64) {
    std::fs::create_dir_all(dir).expect("mount point");
    let output = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(dir)
        .output()
        .expect("mount runs");
    assert!(
        output.status.success(),
        "cannot mount a tmpfs on {} (root is needed): {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The bytes that can still be written on the file system holding `path` (`df`).
pub fn available_bytes(path: &Path) -> u64 {
    let output = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or_else(|| panic!("df gave no figure for {}", path.display()))
}

/// The lines a child (spawned with piped stdout) prints, as they come.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// Runs stock git on the bare repository `repo` without system or user configuration.
fn git_in(repo: &Path, args: &[&str]) -> Output {
    Command::new(stock_git())
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git runs")
}

/// The objects of `repo` that no ref or reflog reaches (`git fsck --unreachable`).
pub fn unreachable_objects(repo: &Path) -> Vec<String> {
    let output = git_in(repo, &["fsck", "--unreachable", "--no-progress"]);
    assert!(
        output.status.success(),
        "fsck failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("unreachable "))
        .map(str::to_owned)
        .collect()
}

/// What a failed write may leave in a deployment repository: no unreachable object, and
/// nothing in the store's temporary directory (`revboot/tmp`: image spools, quarantines).
pub fn assert_no_leftovers(repo: &Path) {
    assert_eq!(unreachable_objects(repo), Vec::<String>::new());
    let leftovers: Vec<PathBuf> = std::fs::read_dir(repo.join("revboot/tmp"))
        .expect("the store's temporary directory")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `git fsck --strict` must pass without a single complaint (dangling objects are no fault).
pub fn assert_fsck_clean(repo: &Path) {
    let output = git_in(repo, &["fsck", "--strict", "--no-progress"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "fsck failed:\n{stdout}\n{stderr}");
    let complaints: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| !l.starts_with("dangling ") && !l.starts_with("Checking"))
        // The deployment repository has no default branch; git notes that, it is no fault.
        .filter(|l| !l.starts_with("notice: HEAD points to an unborn branch"))
        .collect();
    assert!(complaints.is_empty(), "fsck complained: {complaints:?}");
}
