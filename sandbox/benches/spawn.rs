//! The cost of a sandbox, beside a plain fork/exec of the same program in the same run.
//!
//! 1. `/bin/true` started by `std::process::Command` and waited for (the anchor).
//! 2. `/bin/true` started by [`revboot_sandbox::spawn`] in a build's sandbox: new mount,
//!    pid, ipc, uts, cgroup and network namespaces, loopback up, a tmpfs root with the
//!    host's system directories bound read-only, `/dev`, `/tmp`, a written `/etc/passwd`, a
//!    writable work directory, a full read-only `/proc`, an unprivileged uid, the seccomp
//!    filters; waited for.
//!
//! The two alternate, `SPAWN_N` times each (default 300); p50 and p99 of each and their
//! ratio are printed. Run as root: `cargo bench -p revboot-sandbox --bench spawn`.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use revboot_sandbox::creds::Identity;
use revboot_sandbox::root::{Access, Layout, Quota};
use revboot_sandbox::seccomp;
use revboot_sandbox::spawn::{self, Namespaces, Plan, Program};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let n: usize = std::env::var("SPAWN_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let base = Layout::new(
        &root,
        Quota {
            bytes: 64 << 20,
            inodes: 4096,
            exec: true,
        },
    )
    .and_then(|l| l.devices())
    .and_then(|l| l.dir_with_mode(Path::new("/tmp"), 0o1777))
    .and_then(|l| l.host_system(&["alternatives", "ld.so.cache", "ssl", "localtime"]))
    .and_then(|l| {
        l.file(
            Path::new("/etc/passwd"),
            b"build:x:2099999990:2099999990::/:/bin/sh\n",
            0o644,
        )
    })
    .and_then(|l| l.bind(&work, &work, Access::WritableExec))
    .unwrap();
    let own = base.after().proc_full().unwrap();
    let filters = seccomp::compile().unwrap();
    let filters = [&filters.deny, &filters.clone3];
    let argv = [CString::from(c"true")];
    let mountpoint = CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
    let devnull = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    let null = devnull.as_raw_fd();
    let fds = [null, null, null];
    let identity = Identity::new(2_099_999_990);
    let plan = Plan {
        program: Program::Path(c"/bin/true"),
        argv: &argv,
        envp: &[],
        cgroup_procs: &[],
        namespaces: Namespaces::Fresh {
            host_network: false,
        },
        base: &base,
        own: &own,
        mountpoint: &mountpoint,
        hostname: c"build",
        loopback: true,
        cwd: c"/",
        rlimits: &[(libc::RLIMIT_CORE, 0)],
        fds: &fds,
        new_session: true,
        identity,
        die_with_parent: true,
        landlock: None,
        filters: &filters,
    };
    let mut plain = Vec::with_capacity(n);
    let mut sandboxed = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let status = std::process::Command::new("/bin/true").status().unwrap();
        plain.push(start.elapsed());
        assert!(status.success());
        let start = Instant::now();
        let started = spawn::spawn(&plan).unwrap();
        let exit = spawn::reap_blocking(started.pidfd.as_raw_fd()).unwrap();
        sandboxed.push(start.elapsed());
        assert_eq!(exit, Some(spawn::Exit::Code(0)));
    }
    plain.sort();
    sandboxed.sort();
    let (p50, p99) = (percentile(&plain, 0.5), percentile(&plain, 0.99));
    let (s50, s99) = (percentile(&sandboxed, 0.5), percentile(&sandboxed, 0.99));
    println!(
        "/bin/true to its exit over {n}: build sandbox p50 {} p99 {} | fork/exec p50 {} p99 {} | ratio p50 {:.2}x, sandbox cost p50 {}",
        ms(s50),
        ms(s99),
        ms(p50),
        ms(p99),
        s50.as_secs_f64() / p50.as_secs_f64(),
        ms(s50.saturating_sub(p50)),
    );
}
