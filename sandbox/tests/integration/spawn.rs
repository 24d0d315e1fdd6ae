//! `spawn` with a layout of the host's system directories: a shell inside sees only what it
//! was given, as an unprivileged uid with no capability.

use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;

use revboot_sandbox::creds::Identity;
use revboot_sandbox::root::{Access, Layout, Quota};
use revboot_sandbox::seccomp;
use revboot_sandbox::spawn::{self, Exit, Namespaces, Plan, Program};

/// A plan with nothing but the program, its root and its uid.
fn plan<'a>(
    program: &'a CStr,
    argv: &'a [CString],
    (base, own): (&'a Layout, &'a Layout),
    mountpoint: &'a CStr,
    uid: u32,
) -> Plan<'a> {
    Plan {
        program: Program::Path(program),
        argv,
        envp: &[],
        cgroup_procs: &[],
        namespaces: Namespaces::Fresh {
            host_network: false,
        },
        base,
        own,
        mountpoint,
        hostname: c"sandbox",
        loopback: false,
        cwd: c"/",
        rlimits: &[],
        fds: &[],
        new_session: false,
        identity: Identity::new(uid),
        die_with_parent: true,
        landlock: None,
        filters: &[],
    }
}

/// Runs `script` with `sh -c` in a sandbox whose root has the host's system directories, a
/// writable /tmp and `shared` bound writable at /work; returns its exit and output.
fn run_in_sandbox(script: &str, shared: &Path) -> (Exit, String) {
    let mountpoint = tempfile::tempdir().expect("mount point");
    let base = Layout::new(
        mountpoint.path(),
        Quota {
            bytes: 4 << 20,
            inodes: 1024,
            exec: false,
        },
    )
    .and_then(|l| l.devices())
    .and_then(|l| l.host_system(&["alternatives", "ld.so.cache"]))
    .and_then(|l| l.dir_with_mode(Path::new("/tmp"), 0o1777))
    .and_then(|l| l.bind(shared, Path::new("/work"), Access::Writable))
    .and_then(|l| {
        l.file(
            Path::new("/etc/passwd"),
            b"sandbox:x:100123:100123::/tmp:/bin/sh\n",
            0o644,
        )
    })
    .expect("layout");
    let own = base.after().proc().expect("proc");
    let filters = seccomp::compile().expect("filters");
    let (read, write) = spawn::pipe(0).expect("pipe");
    let argv = [
        c"sh".to_owned(),
        c"-c".to_owned(),
        CString::new(script).expect("script"),
    ];
    let envp = [c"PATH=/usr/bin:/bin".to_owned()];
    let mountpoint_c =
        CString::new(mountpoint.path().as_os_str().as_encoded_bytes()).expect("path");
    let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
    let fds = [devnull.as_raw_fd(), write.as_raw_fd(), write.as_raw_fd()];
    let filters = [&filters.deny, &filters.clone3];
    let plan = Plan {
        envp: &envp,
        loopback: true,
        cwd: c"/work",
        rlimits: &[(libc::RLIMIT_CORE, 0)],
        fds: &fds,
        new_session: true,
        filters: &filters,
        ..plan(c"/bin/sh", &argv, (&base, &own), &mountpoint_c, 100_123)
    };
    let started = spawn::spawn(&plan).expect("started");
    drop(write);
    let mut output = String::new();
    std::fs::File::from(read)
        .read_to_string(&mut output)
        .expect("output");
    let exit = spawn::reap_blocking(started.pidfd.as_raw_fd())
        .expect("reaped")
        .expect("ended");
    (exit, output)
}

#[test]
fn a_shell_sees_only_its_root_as_an_unprivileged_uid() {
    let shared = tempfile::tempdir().expect("shared");
    std::os::unix::fs::chown(shared.path(), Some(100_123), Some(100_123)).expect("chown");
    let secret = tempfile::NamedTempFile::new().expect("secret");
    let script = format!(
        "id -u; grep CapEff /proc/self/status; echo written > /work/out && echo work-ok; \
         echo x > /tmp/x && echo tmp-ok; touch /usr/x 2>/dev/null || echo usr-read-only; \
         test -e {secret} || echo secret-invisible; test -e /etc/shadow || echo shadow-invisible; \
         grep -q sandbox /etc/passwd && echo passwd-ok; hostname; \
         cat /sys/kernel/rcu_expedited 2>/dev/null || echo no-sys; \
         ls /dev | tr '\\n' ' '; echo; \
         grep -q -e cgroup -e ' /work/main' /proc/self/mountinfo && echo host-mounts-listed || echo host-mounts-hidden; \
         cd /; cd ..; echo \" $(ls -a | tr '\\n' ' ')\"; exit 7",
        secret = secret.path().display()
    );
    let (exit, output) = run_in_sandbox(&script, shared.path());
    assert_eq!(exit, Exit::Code(7), "{output}");
    let mut lines: Vec<&str> = output.lines().collect();
    // `..` of its root is its root: what it holds, not the host's top directories.
    let above = lines.pop().expect("the listing of /..");
    assert!(
        above.contains(" work ") && above.contains(" usr "),
        "{above}"
    );
    for host in [" home ", " root ", " boot ", " var "] {
        assert!(!above.contains(host), "{host} in {above}");
    }
    assert_eq!(
        lines,
        [
            "100123",
            "CapEff:\t0000000000000000",
            "work-ok",
            "tmp-ok",
            "usr-read-only",
            "secret-invisible",
            "shadow-invisible",
            "passwd-ok",
            "sandbox",
            "no-sys",
            "null random urandom zero ",
            "host-mounts-hidden",
        ],
        "{output}"
    );
    assert_eq!(
        std::fs::read_to_string(shared.path().join("out")).expect("written through the bind"),
        "written\n"
    );
}

#[test]
fn a_failing_step_names_itself() {
    let shared = tempfile::tempdir().expect("shared");
    // A bind of a path the host does not have fails in the child, by name.
    let mountpoint = tempfile::tempdir().expect("mount point");
    let base = Layout::new(
        mountpoint.path(),
        Quota {
            bytes: 1 << 20,
            inodes: 64,
            exec: false,
        },
    )
    .and_then(|l| l.bind(shared.path(), Path::new("/work"), Access::Writable))
    .expect("layout");
    std::fs::remove_dir(shared.path()).expect("gone before the spawn");
    let own = base.after();
    let argv = [c"true".to_owned()];
    let mountpoint_c =
        CString::new(mountpoint.path().as_os_str().as_encoded_bytes()).expect("path");
    let plan = plan(c"/bin/true", &argv, (&base, &own), &mountpoint_c, 100_124);
    let error = spawn::spawn(&plan).expect_err("the bind fails");
    let message = format!(
        "{error}: {}",
        std::error::Error::source(&error).expect("cause")
    );
    assert!(message.contains("assembling the root failed"), "{message}");
    assert!(
        message.contains(&format!("bind {}", shared.path().display())),
        "{message}"
    );
}
