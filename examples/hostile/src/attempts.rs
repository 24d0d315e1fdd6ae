//! One function per attempt. Each undoes what it did, then says what happened.

use std::ffi::{CString, c_int, c_long, c_uint, c_ulong};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::Duration;

use crate::sys::{self, ChildEnd, Ended, check, describe, in_child};

/// How long a child that should end at once may take.
const CHILD_LIMIT: Duration = Duration::from_secs(5);
/// How long the `memory` child may take to touch its pages.
const MEMORY_LIMIT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;
const O_NONBLOCK: c_int = 0o4000;
const EPERM: i32 = 1;
const EACCES: i32 = 13;
const ENOSYS: i32 = 38;

/// The answer to one attempt, one line: `allowed: <what happened>` or `refused: <why>`.
#[derive(Debug)]
pub enum Outcome {
    Allowed(String),
    Refused(String),
}

impl Outcome {
    /// Reads back a line written by `Display` (a child's answer).
    pub fn parse(line: &str) -> Option<Outcome> {
        match line.strip_prefix("allowed: ") {
            Some(what) => Some(Outcome::Allowed(what.to_owned())),
            None => line
                .strip_prefix("refused: ")
                .map(|why| Outcome::Refused(why.to_owned())),
        }
    }

    fn is_allowed(&self) -> bool {
        matches!(self, Outcome::Allowed(_))
    }

    /// The same outcome with its text rewritten.
    fn map_text(self, rewrite: impl FnOnce(String) -> String) -> Outcome {
        match self {
            Outcome::Allowed(what) => Outcome::Allowed(rewrite(what)),
            Outcome::Refused(why) => Outcome::Refused(rewrite(why)),
        }
    }

    fn text(&self) -> &str {
        match self {
            Outcome::Allowed(text) | Outcome::Refused(text) => text,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allowed(what) => write!(f, "allowed: {what}"),
            Outcome::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

fn allowed(what: impl Into<String>) -> Outcome {
    Outcome::Allowed(what.into())
}

fn refused(why: impl Into<String>) -> Outcome {
    Outcome::Refused(why.into())
}

/// Several tries in one answer: allowed if any was, each reported.
fn any_of(tries: Vec<Outcome>) -> Outcome {
    let text = tries
        .iter()
        .map(Outcome::text)
        .collect::<Vec<_>>()
        .join("; ");
    if tries.iter().any(Outcome::is_allowed) {
        allowed(text)
    } else {
        refused(text)
    }
}

/// Adds a failed clean-up to the outcome, so that a leftover is never silent.
fn cleaned_up(outcome: Outcome, removed: io::Result<()>, what: &str) -> Outcome {
    match removed {
        Ok(()) => outcome,
        Err(error) => {
            outcome.map_text(|text| format!("{text}; removing {what} failed: {}", describe(&error)))
        }
    }
}

/// What a child made by [`in_child`] said; or how it ended if it could not say.
fn child_outcome(end: io::Result<ChildEnd>) -> Outcome {
    match end {
        Err(error) => refused(format!("fork: {}", describe(&error))),
        Ok(ChildEnd {
            said: Some(outcome),
            ..
        }) => outcome,
        Ok(ChildEnd { said: None, ended }) => {
            refused(format!("the child {ended} before it answered"))
        }
    }
}

/// A file or directory name in the working directory, private to this process.
fn scratch(what: &str) -> String {
    format!("hostile-{what}-{}", std::process::id())
}

fn c_string(name: &str) -> CString {
    CString::new(name).expect("scratch names hold no NUL")
}

/// Who the server runs as, and under which restrictions.
pub fn whoami() -> Outcome {
    const PR_GET_SECCOMP: c_int = 21;
    const PR_GET_NO_NEW_PRIVS: c_int = 39;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
    };
    let unknown = || "unknown".to_owned();
    let capeff = field("CapEff:")
        .or_else(effective_capabilities)
        .unwrap_or_else(unknown);
    let nonewprivs = field("NoNewPrivs:")
        .or_else(|| prctl_get(PR_GET_NO_NEW_PRIVS))
        .unwrap_or_else(unknown);
    let seccomp = field("Seccomp:")
        .or_else(|| prctl_get(PR_GET_SECCOMP))
        .unwrap_or_else(unknown);
    // SAFETY: the id getters have no preconditions.
    let (uid, euid, gid, egid) =
        unsafe { (sys::getuid(), sys::geteuid(), sys::getgid(), sys::getegid()) };
    allowed(format!(
        "uid={uid},{euid} gid={gid},{egid} capeff={capeff} nonewprivs={nonewprivs} seccomp={seccomp}"
    ))
}

/// The effective capability set from `capget`, for when `/proc` is not there.
fn effective_capabilities() -> Option<String> {
    const SYS_CAPGET: c_long = 125;
    const VERSION_3: u32 = 0x2008_0522;
    // struct __user_cap_header_struct { version, pid = 0 (this process) }.
    let mut header = [VERSION_3, 0];
    // Two struct __user_cap_data_struct { effective, permitted, inheritable }: bits 0-31, 32-63.
    let mut data = [[0u32; 3]; 2];
    // SAFETY: capget reads the header and fills both data structs, as version 3 says.
    check(unsafe { sys::syscall(SYS_CAPGET, header.as_mut_ptr(), data.as_mut_ptr()) }).ok()?;
    let effective = (u64::from(data[1][0]) << 32) | u64::from(data[0][0]);
    Some(format!("{effective:016x}"))
}

/// A `prctl` getter's answer, for when `/proc` is not there.
fn prctl_get(option: c_int) -> Option<String> {
    let zero: c_ulong = 0;
    // SAFETY: a getter prctl with its unused arguments zero.
    let value = unsafe { sys::prctl(option, zero, zero, zero, zero) };
    check(value.into()).ok().map(|value| value.to_string())
}

/// Write the kernel's core pattern back.
pub fn core_pattern() -> Outcome {
    write_back("/proc/sys/kernel/core_pattern", Some(b"core"))
}

/// Write a `/proc/sys` or `/sys` setting back.
pub fn setting(path: &str) -> Outcome {
    write_back(path, None)
}

/// Writes back to `path` the value read from it (or `unreadable` if it cannot be read).
fn write_back(path: &str, unreadable: Option<&[u8]>) -> Outcome {
    const MAX: usize = 64 * 1024;
    let mut value = Vec::new();
    let read = File::options()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .and_then(|file| file.take(MAX as u64 + 1).read_to_end(&mut value));
    match (read, unreadable) {
        (Ok(_), _) if value.len() > MAX => {
            return refused(format!("{path} holds more than {MAX} bytes: not a setting"));
        }
        (Ok(_), _) => {}
        (Err(_), Some(fallback)) => value = fallback.to_vec(),
        (Err(error), None) => return refused(format!("read {path}: {}", describe(&error))),
    }
    if value.is_empty() {
        // Writing nothing would prove nothing; an empty setting reads back as a newline.
        value.push(b'\n');
    }
    let written = OpenOptions::new()
        .write(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|error| format!("open {path} for writing: {}", describe(&error)))
        .and_then(|mut file| {
            file.write_all(&value)
                .map_err(|error| format!("write {path}: {}", describe(&error)))
        });
    match written {
        Ok(()) => allowed(format!("wrote {} bytes back to {path}", value.len())),
        Err(why) => refused(why),
    }
}

/// A character device for the kernel log (`/dev/kmsg`, 1:11).
pub fn mknod_char() -> Outcome {
    const S_IFCHR: c_uint = 0o020000;
    device_node("kmsg", S_IFCHR, 1, 11)
}

/// A block device for the first loop device (`/dev/loop0`, 7:0).
pub fn mknod_block() -> Outcome {
    const S_IFBLK: c_uint = 0o060000;
    device_node("loop0", S_IFBLK, 7, 0)
}

/// Makes a device node in the working directory, opens it for reading, removes it.
fn device_node(device: &str, kind: c_uint, major: u64, minor: u64) -> Outcome {
    let node = scratch(device);
    let _ = fs::remove_file(&node);
    // glibc's makedev.
    let number = ((major & 0xfff) << 8)
        | ((major & !0xfff) << 32)
        | (minor & 0xff)
        | ((minor & !0xff) << 12);
    let c_node = c_string(&node);
    // SAFETY: mknod with a valid path.
    let made = unsafe { sys::mknod(c_node.as_ptr(), kind | 0o600, number) };
    if let Err(error) = check(made.into()) {
        return refused(format!(
            "mknod {node} ({major}:{minor}): {}",
            describe(&error)
        ));
    }
    let opened = File::options()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(&node);
    let outcome = match opened {
        Ok(_) => allowed(format!(
            "made {node} ({major}:{minor}, {device}) and opened it for reading"
        )),
        Err(error) => refused(format!(
            "made {node} ({major}:{minor}) but opening it failed: {}",
            describe(&error)
        )),
    };
    cleaned_up(outcome, fs::remove_file(&node), &node)
}

/// The first bytes of a file.
pub fn read(path: &str) -> Outcome {
    const SHOWN: u64 = 32;
    let file = match File::options()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(error) => return refused(format!("open {path}: {}", describe(&error))),
    };
    let mut head = Vec::new();
    match file.take(SHOWN).read_to_end(&mut head) {
        Ok(count) => allowed(format!(
            "read {count} bytes of {path}: \"{}\"",
            head.escape_ascii()
        )),
        Err(error) => refused(format!("opened {path}, but read: {}", describe(&error))),
    }
}

/// The names in a directory.
pub fn list(path: &str) -> Outcome {
    const SHOWN: usize = 8;
    const MAX: usize = 100_000;
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(error) => return refused(format!("open directory {path}: {}", describe(&error))),
    };
    let mut names: Vec<String> = entries
        .take(MAX)
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let count = names.len();
    let more = if count > SHOWN { ", …" } else { "" };
    names.truncate(SHOWN);
    allowed(format!(
        "{count} entries in {path}: {}{more}",
        names.join(", ")
    ))
}

/// A new file: created exclusively, one byte written, removed.
pub fn write(path: &str) -> Outcome {
    let mut file = match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(file) => file,
        Err(error) => return refused(format!("create {path}: {}", describe(&error))),
    };
    let wrote = match file.write_all(b"x") {
        Ok(()) => "wrote a byte".to_owned(),
        Err(error) => format!("writing failed: {}", describe(&error)),
    };
    drop(file);
    cleaned_up(
        allowed(format!("created {path}, {wrote}, removed it")),
        fs::remove_file(path),
        path,
    )
}

/// Attach to a child with ptrace.
pub fn ptrace() -> Outcome {
    const SYS_PTRACE: c_long = 101;
    const PTRACE_ATTACH: c_long = 16;
    const PTRACE_DETACH: c_long = 17;
    let child = match sys::fork_paused() {
        Ok(pid) => pid,
        Err(error) => return refused(format!("fork: {}", describe(&error))),
    };
    let pid = c_long::from(child);
    // SAFETY: ptrace of our own child; no memory is passed.
    let attached =
        check(unsafe { sys::syscall(SYS_PTRACE, PTRACE_ATTACH, pid, 0 as c_long, 0 as c_long) });
    let outcome = match attached {
        Ok(_) => {
            // The child stops once attached; it can be detached only while stopped.
            let detached = sys::wait_change(child).and_then(|_| {
                // SAFETY: as above.
                check(unsafe {
                    sys::syscall(SYS_PTRACE, PTRACE_DETACH, pid, 0 as c_long, 0 as c_long)
                })
            });
            let detached = match detached {
                Ok(_) => "then detached".to_owned(),
                Err(error) => format!("detaching failed: {}", describe(&error)),
            };
            allowed(format!("PTRACE_ATTACH to child {child} worked, {detached}"))
        }
        Err(error) => refused(format!(
            "PTRACE_ATTACH to child {child}: {}",
            describe(&error)
        )),
    };
    sys::kill_and_reap(child);
    outcome
}

/// A tmpfs mounted on a new directory in the working directory, then unmounted.
pub fn mount() -> Outcome {
    const MS_NOSUID_NODEV_NOEXEC: c_ulong = 2 | 4 | 8;
    const MNT_DETACH: c_int = 2;
    let dir = scratch("mnt");
    let _ = fs::remove_dir(&dir);
    if let Err(error) = fs::create_dir(&dir) {
        return refused(format!("mkdir {dir}: {}", describe(&error)));
    }
    let target = c_string(&dir);
    // SAFETY: mount with valid strings.
    let mounted = unsafe {
        sys::mount(
            c"hostile".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            MS_NOSUID_NODEV_NOEXEC,
            c"size=1m".as_ptr().cast(),
        )
    };
    let outcome = match check(mounted.into()) {
        Ok(_) => {
            // SAFETY: umount2 with a valid path.
            let unmounted = check(unsafe { sys::umount2(target.as_ptr(), MNT_DETACH) }.into());
            match unmounted {
                Ok(_) => allowed(format!("mounted a tmpfs on {dir}, then unmounted it")),
                Err(error) => allowed(format!(
                    "mounted a tmpfs on {dir}; unmounting failed: {}",
                    describe(&error)
                )),
            }
        }
        Err(error) => refused(format!("mount tmpfs on {dir}: {}", describe(&error))),
    };
    cleaned_up(outcome, fs::remove_dir(&dir), &dir)
}

/// The namespaces `unshare` knows, by name.
pub const NAMESPACES: &[(&str, c_int)] = &[
    ("user", 0x1000_0000),
    ("mount", 0x0002_0000),
    ("net", 0x4000_0000),
    ("pid", 0x2000_0000),
    ("uts", 0x0400_0000),
    ("ipc", 0x0800_0000),
    ("cgroup", 0x0200_0000),
];

/// New namespaces, one at a time, each in a child of its own.
pub fn unshare(namespaces: &[(&str, c_int)]) -> Outcome {
    let tries = namespaces.iter().map(|&(name, flag)| {
        let end = in_child(CHILD_LIMIT, || {
            // SAFETY: unshare with a namespace flag, in the child only.
            match check(unsafe { sys::unshare(flag) }.into()) {
                Ok(_) => allowed("ok"),
                Err(error) => refused(describe(&error)),
            }
        });
        child_outcome(end).map_text(|text| format!("{name}: {text}"))
    });
    any_of(tries.collect())
}

/// `setuid(uid)`, in a child.
pub fn setuid(uid: u32) -> Outcome {
    // SAFETY (of both closures): the id calls have no preconditions.
    change_id(
        "setuid",
        uid,
        |id| unsafe { sys::setuid(id) },
        || unsafe { (sys::getuid(), sys::geteuid()) },
    )
}

/// `setgid(gid)`, in a child.
pub fn setgid(gid: u32) -> Outcome {
    // SAFETY (of both closures): the id calls have no preconditions.
    change_id(
        "setgid",
        gid,
        |id| unsafe { sys::setgid(id) },
        || unsafe { (sys::getgid(), sys::getegid()) },
    )
}

/// Calls `set(id)` in a child: allowed if it returned 0 and the id is now `id`, or root.
fn change_id(
    call: &str,
    id: u32,
    set: impl FnOnce(c_uint) -> c_int,
    current: impl Fn() -> (c_uint, c_uint),
) -> Outcome {
    child_outcome(in_child(CHILD_LIMIT, || {
        if let Err(error) = check(set(id).into()) {
            return refused(format!("{call}({id}): {}", describe(&error)));
        }
        let (real, effective) = current();
        let now = format!("{call}({id}) returned 0; now {real},{effective}");
        if (real, effective) == (id, id) || (real, effective) == (0, 0) {
            allowed(now)
        } else {
            refused(now)
        }
    }))
}

/// Raw IP and packet sockets.
pub fn raw_socket() -> Outcome {
    const AF_INET: c_int = 2;
    const AF_PACKET: c_int = 17;
    const SOCK_RAW_CLOEXEC: c_int = 3 | 0o2000000;
    const IPPROTO_ICMP: c_int = 1;
    let kinds = [
        ("AF_INET raw ICMP socket", AF_INET, IPPROTO_ICMP),
        ("AF_PACKET raw socket", AF_PACKET, 0),
    ];
    let tries = kinds.iter().map(|&(name, domain, protocol)| {
        // SAFETY: socket takes integers only.
        match check(unsafe { sys::socket(domain, SOCK_RAW_CLOEXEC, protocol) }.into()) {
            Ok(fd) => {
                // SAFETY: closes the socket just opened, owned by nothing else.
                unsafe { sys::close(fd as c_int) };
                allowed(format!("{name}: opened"))
            }
            Err(error) => refused(format!("{name}: {}", describe(&error))),
        }
    });
    any_of(tries.collect())
}

/// A file in the working directory, grown 1 MiB at a time up to `mib` MiB, removed.
pub fn fill_disk(mib: u32) -> Outcome {
    let path = scratch("fill");
    let mut file = match File::create(&path) {
        Ok(file) => file,
        Err(error) => return refused(format!("create {path}: {}", describe(&error))),
    };
    let chunk = vec![0xa5u8; MIB];
    let mut written: u64 = 0;
    let mut stopped = None;
    'fill: for _ in 0..mib {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            match file.write(rest) {
                Ok(0) => {
                    stopped = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break 'fill;
                }
                Ok(count) => {
                    written += count as u64;
                    rest = &rest[count..];
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    stopped = Some(error);
                    break 'fill;
                }
            }
        }
    }
    drop(file);
    let outcome = match stopped {
        None => allowed(format!("wrote {mib} MiB to {path}")),
        Some(error) => refused(format!(
            "stopped after {} MiB ({written} bytes) of {mib} MiB: {}",
            written / MIB as u64,
            describe(&error)
        )),
    };
    cleaned_up(outcome, fs::remove_file(&path), &path)
}

/// `n` children that wait, counted until the first fork fails, then killed and reaped.
pub fn forks(n: u32) -> Outcome {
    let mut children = Vec::new();
    let mut failed = None;
    while children.len() < n as usize {
        match sys::fork_paused() {
            Ok(pid) => children.push(pid),
            Err(error) => {
                failed = Some(error);
                break;
            }
        }
    }
    let count = children.len();
    for &pid in &children {
        // SAFETY: signals our own child; all die before any is waited for.
        unsafe { sys::kill(pid, sys::SIGKILL) };
    }
    for pid in children {
        sys::kill_and_reap(pid);
    }
    match failed {
        None => allowed(format!("forked {n} children, then killed and reaped them")),
        Some(error) => refused(format!(
            "fork failed after {count} of {n} children: {}",
            describe(&error)
        )),
    }
}

/// A child that maps `mib` MiB and writes to every page.
pub fn memory(mib: u32) -> Outcome {
    const PAGE: usize = 4096;
    const PROT_READ_WRITE: c_int = 1 | 2;
    const MAP_PRIVATE_ANONYMOUS: c_int = 0x02 | 0x20;
    child_outcome(in_child(MEMORY_LIMIT, || {
        let bytes = mib as usize * MIB;
        // SAFETY: a new anonymous private mapping; nothing else refers to it.
        let base = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                bytes,
                PROT_READ_WRITE,
                MAP_PRIVATE_ANONYMOUS,
                -1,
                0,
            )
        };
        if base as isize == -1 {
            let error = io::Error::last_os_error();
            return refused(format!("allocating {mib} MiB failed: {}", describe(&error)));
        }
        for offset in (0..bytes).step_by(PAGE) {
            // SAFETY: offset is inside the mapping, which is readable and writable.
            unsafe { base.cast::<u8>().add(offset).write_volatile(1) };
        }
        allowed(format!("touched every page of {mib} MiB"))
    }))
}

/// A TCP connection, with a 2 s timeout.
pub fn connect(address: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
        Ok(_) => allowed(format!("connected to {address}")),
        Err(error) => refused(format!("connect to {address}: {}", describe(&error))),
    }
}

/// What a raw system call returns when it works.
enum Returns {
    /// A file descriptor, closed at once.
    Fd,
    /// A number.
    Value,
}

/// Allowed unless the call failed with EPERM, EACCES or ENOSYS: any other error means the
/// kernel got past its permission checks to the arguments.
fn kernel_call(call: &str, result: io::Result<c_long>, returns: Returns) -> Outcome {
    match (result, returns) {
        (Ok(fd), Returns::Fd) => {
            // SAFETY: closes the descriptor just returned, owned by nothing else.
            unsafe { sys::close(fd as c_int) };
            allowed(format!("{call} returned descriptor {fd}"))
        }
        (Ok(value), Returns::Value) => allowed(format!("{call} returned {value}")),
        (Err(error), _) if matches!(error.raw_os_error(), Some(EPERM | EACCES | ENOSYS)) => {
            refused(format!("{call}: {}", describe(&error)))
        }
        (Err(error), _) => allowed(format!(
            "{call} got past the permission checks: {}",
            describe(&error)
        )),
    }
}

/// The id of the user keyring.
pub fn keyctl() -> Outcome {
    const SYS_KEYCTL: c_long = 250;
    const KEYCTL_GET_KEYRING_ID: c_long = 0;
    const KEY_SPEC_USER_KEYRING: c_long = -4;
    // SAFETY: integer arguments only.
    let result = check(unsafe {
        sys::syscall(
            SYS_KEYCTL,
            KEYCTL_GET_KEYRING_ID,
            KEY_SPEC_USER_KEYRING,
            0 as c_long,
        )
    });
    kernel_call(
        "keyctl(KEYCTL_GET_KEYRING_ID, user keyring)",
        result,
        Returns::Value,
    )
}

/// A software counter on this process.
pub fn perf_event_open() -> Outcome {
    const SYS_PERF_EVENT_OPEN: c_long = 298;
    const PERF_FLAG_FD_CLOEXEC: c_long = 8;
    // The first struct perf_event_attr (64 bytes): type PERF_TYPE_SOFTWARE (1) and size in
    // the first word, config PERF_COUNT_SW_CPU_CLOCK (0) in the second, and in the sixth the
    // flags disabled (bit 0), exclude_kernel (bit 5), exclude_hv (bit 6).
    let mut attr = [0u64; 8];
    attr[0] = 1 | (64 << 32);
    attr[5] = 1 | (1 << 5) | (1 << 6);
    // SAFETY: attr is a valid perf_event_attr of the size it states.
    let result = check(unsafe {
        sys::syscall(
            SYS_PERF_EVENT_OPEN,
            attr.as_ptr(),
            0 as c_long,  // this process
            -1 as c_long, // any CPU
            -1 as c_long, // no group
            PERF_FLAG_FD_CLOEXEC,
        )
    });
    kernel_call(
        "perf_event_open(cpu clock, this process)",
        result,
        Returns::Fd,
    )
}

/// A userfaultfd descriptor.
pub fn userfaultfd() -> Outcome {
    const SYS_USERFAULTFD: c_long = 323;
    const O_CLOEXEC: c_long = 0o2000000;
    // SAFETY: integer arguments only.
    let result = check(unsafe { sys::syscall(SYS_USERFAULTFD, O_CLOEXEC | O_NONBLOCK as c_long) });
    kernel_call("userfaultfd", result, Returns::Fd)
}

/// A one-entry BPF array map.
pub fn bpf() -> Outcome {
    const SYS_BPF: c_long = 321;
    const BPF_MAP_CREATE: c_long = 0;
    // union bpf_attr for BPF_MAP_CREATE: map_type BPF_MAP_TYPE_ARRAY (2), key_size 4,
    // value_size 4, max_entries 1; the rest zero.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[2, 4, 4, 1]);
    // SAFETY: attr is a valid bpf_attr of the size passed.
    let result = check(unsafe {
        sys::syscall(
            SYS_BPF,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            size_of_val(&attr) as c_long,
        )
    });
    kernel_call("bpf(BPF_MAP_CREATE, array)", result, Returns::Fd)
}

/// `kexec_load` with arguments it refuses after its permission checks.
pub fn kexec() -> Outcome {
    const SYS_KEXEC_LOAD: c_long = 246;
    // One segment more than KEXEC_SEGMENT_MAX (16): EINVAL once permitted. Zero segments
    // would not fail: it unloads a loaded kexec kernel.
    const SEGMENTS: c_long = 17;
    // SAFETY: the kernel rejects the segment count before it reads the (null) segments.
    let result = check(unsafe {
        sys::syscall(
            SYS_KEXEC_LOAD,
            0 as c_long,
            SEGMENTS,
            std::ptr::null::<u8>(),
            0 as c_long,
        )
    });
    kernel_call("kexec_load(17 segments)", result, Returns::Value)
}

/// The kernel log.
pub fn syslog() -> Outcome {
    const SYS_SYSLOG: c_long = 103;
    const SYSLOG_ACTION_READ_ALL: c_long = 3;
    // Whole records only: a small buffer reads nothing when the last line is longer.
    let mut buffer = vec![0u8; 8192];
    // SAFETY: the kernel writes at most buffer.len() bytes into buffer.
    let result = check(unsafe {
        sys::syscall(
            SYS_SYSLOG,
            SYSLOG_ACTION_READ_ALL,
            buffer.as_mut_ptr(),
            buffer.len() as c_long,
        )
    });
    kernel_call("syslog(SYSLOG_ACTION_READ_ALL)", result, Returns::Value)
}

/// The smallest x86-64 Linux program, `exit(0)`: an ELF header, one loadable segment (the
/// whole file, at 0x400000) and three instructions at offset 120, the entry point.
#[rustfmt::skip]
const EXIT_0: [u8; 129] = [
    // ELF header: 64-bit, little-endian, version 1
    0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 0, 0x3e, 0, 1, 0, 0, 0,          // ET_EXEC, EM_X86_64, version 1
    0x78, 0, 0x40, 0, 0, 0, 0, 0,       // entry point 0x400078
    64, 0, 0, 0, 0, 0, 0, 0,            // program headers at 64
    0, 0, 0, 0, 0, 0, 0, 0,             // no section headers
    0, 0, 0, 0, 64, 0, 56, 0,           // flags, header size, program header size
    1, 0, 0, 0, 0, 0, 0, 0,             // one program header, no sections
    // Program header
    1, 0, 0, 0, 5, 0, 0, 0,             // PT_LOAD, readable and executable
    0, 0, 0, 0, 0, 0, 0, 0,             // from file offset 0
    0, 0, 0x40, 0, 0, 0, 0, 0,          // virtual address 0x400000
    0, 0, 0x40, 0, 0, 0, 0, 0,          // physical address 0x400000
    129, 0, 0, 0, 0, 0, 0, 0,           // size in the file
    129, 0, 0, 0, 0, 0, 0, 0,           // size in memory
    0, 0x10, 0, 0, 0, 0, 0, 0,          // aligned to 4 KiB
    // Code
    0x31, 0xff,                         // xor edi, edi
    0xb8, 60, 0, 0, 0,                  // mov eax, 60 (exit)
    0x0f, 0x05,                         // syscall
];

/// A program written into the working directory, executed in a child. The program is
/// [`EXIT_0`], not a copy of this binary or a script: it needs neither `/proc` nor a shell,
/// so it is the same program on the host and in a sandbox.
pub fn exec_written() -> Outcome {
    let path = format!("./{}", scratch("exec"));
    let written = fs::write(&path, EXIT_0)
        .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)));
    if let Err(error) = written {
        let _ = fs::remove_file(&path);
        return refused(format!("write {path}: {}", describe(&error)));
    }
    let c_path = c_string(&path);
    let argv = [c_path.as_ptr(), std::ptr::null()];
    let end = in_child(CHILD_LIMIT, || {
        // SAFETY: a null-terminated argv of valid strings; execv returns only on failure.
        unsafe { sys::execv(c_path.as_ptr(), argv.as_ptr()) };
        let error = io::Error::last_os_error();
        refused(format!("execve {path}: {}", describe(&error)))
    });
    let outcome = match end {
        Ok(ChildEnd {
            said: None,
            ended: Ended::Exited(0),
        }) => allowed(format!("executed {path}, written here, which exited 0")),
        Ok(ChildEnd { said: None, ended }) => {
            refused(format!("executed {path}, written here, which {ended}"))
        }
        other => child_outcome(other),
    };
    cleaned_up(outcome, fs::remove_file(&path), &path)
}

/// The hostname, set to the value it has.
pub fn sethostname() -> Outcome {
    let mut name = [0u8; 65];
    // SAFETY: gethostname writes at most name.len() bytes into name.
    let got = unsafe { sys::gethostname(name.as_mut_ptr().cast(), name.len()) };
    if let Err(error) = check(got.into()) {
        return refused(format!("gethostname: {}", describe(&error)));
    }
    let len = name
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(name.len());
    // SAFETY: sethostname reads len bytes of name.
    match check(unsafe { sys::sethostname(name.as_ptr().cast(), len) }.into()) {
        Ok(_) => allowed(format!("set the hostname to its own value ({len} bytes)")),
        Err(error) => refused(format!("sethostname: {}", describe(&error))),
    }
}

/// `chroot` into the working directory, in a child.
pub fn chroot() -> Outcome {
    child_outcome(in_child(CHILD_LIMIT, || {
        match std::os::unix::fs::chroot(".") {
            Ok(()) => allowed("chroot into the working directory (in a child)"),
            Err(error) => refused(format!("chroot .: {}", describe(&error))),
        }
    }))
}
