//! `hostile`: what an attacker would push to revboot — a service that tries to leave its
//! sandbox, one attempt per request, and says whether it worked.
//!
//! It listens like `examples/hello`: the socket from the systemd convention (`LISTEN_FDS=1`,
//! `LISTEN_PID` = our pid, fd 3), otherwise `HOSTILE_ADDR` (default `127.0.0.1:8080`), and
//! prints `hostile ready` once listening. Requests are served one at a time, in order.
//!
//! `GET /` answers `hostile ready`. `GET /try/<attempt>?<key>=<value>&…` makes one attempt
//! and answers `200` with one line: `allowed: <what happened>` when it worked, or
//! `refused: <why>`, with the errno name and number or whatever stopped it. An unknown
//! attempt is a `404`; a bad, unknown or repeated parameter a `400`, and nothing is tried.
//!
//! Every attempt undoes what it did before it answers: it writes back the value it read,
//! removes what it created (in the working directory, named `hostile-<what>-<pid>`), kills
//! and reaps its children, and changes ids, namespaces or its root only in a forked child.
//! So running it unsandboxed, as root, leaves the host as it was.
//!
//! The attempts, and what `refused` means for each:
//!
//! 1. `whoami`: not an attack. `allowed: uid=<real>,<effective> gid=<real>,<effective>
//!    capeff=<hex> nonewprivs=<0|1> seccomp=<0|1|2>`, from `/proc/self/status`, else from
//!    `capget` and `prctl`, else `unknown`.
//! 2. `core_pattern`: write `/proc/sys/kernel/core_pattern` back (the value read, or `core`
//!    if it cannot be read). Refused: the kernel's core handler cannot be set.
//! 3. `proc_sys?path=` (default `/proc/sys/kernel/hostname`): write a `/proc/sys` setting
//!    back. Refused: it cannot be read (there is nothing to write back) or written.
//! 4. `sys?path=` (default `/sys/kernel/rcu_expedited`, which Debian kernels have, unlike
//!    `/sys/kernel/uevent_helper`): the same for a `/sys` setting.
//! 5. `mknod_char`: make a character device 1:11 (`/dev/kmsg`) in the working directory and
//!    open it for reading. Refused: it cannot be made, or made but not opened (a `nodev`
//!    mount, a device cgroup).
//! 6. `mknod_block`: the same for a block device 7:0 (`/dev/loop0`).
//! 7. `read?path=` (required): read the first bytes (at most 32 are shown). Refused: the
//!    file cannot be opened or read.
//! 8. `list?path=` (required): list a directory (a count and the first names). Refused: it
//!    cannot be opened.
//! 9. `write?path=` (required): create the file exclusively, write a byte, remove it.
//!    Refused: it cannot be created.
//! 10. `ptrace`: fork a child that waits, `PTRACE_ATTACH` to it, detach, kill and reap it.
//!     Refused: the attach failed.
//! 11. `mount`: mount a tmpfs on a new directory in the working directory, unmount it.
//!     Refused: the mount failed.
//! 12. `unshare?flags=` (default `user,mount`; any of `user`, `mount`, `net`, `pid`, `uts`,
//!     `ipc`, `cgroup`, separated by `,` or `|`): each in a child of its own, each reported.
//!     Refused: every one failed.
//! 13. `setuid?uid=` (default 0), in a child. Allowed: the call returned 0 and the ids are
//!     now `uid` (or still root). Refused: the call failed or changed nothing.
//! 14. `setgid?gid=` (default 0): the same for the group ids.
//! 15. `raw_socket`: `socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)` and
//!     `socket(AF_PACKET, SOCK_RAW, 0)`, each reported. Refused: neither opened.
//! 16. `fill_disk?mib=` (default 1024): write a file in the working directory 1 MiB at a
//!     time up to `mib` MiB, stopping at the first error; the file is removed. Refused: it
//!     stopped early; the answer gives the MiB written and the errno (`ENOSPC`, `EDQUOT` or
//!     `EFBIG` for a size limit; `SIGXFSZ` is ignored so that a file-size limit is `EFBIG`).
//! 17. `forks?n=` (default 10000): fork `n` children that wait, counting until a fork fails;
//!     all are killed and reaped before the answer. Refused: fewer than `n`, with the errno.
//! 18. `memory?mib=` (default 1024): a child maps `mib` MiB and writes to every page; it
//!     gets 30 s. Refused: the mapping failed (with the errno), or the child was killed
//!     (the signal is named) or ran out of time.
//! 19. `connect?addr=<ip:port>` (required): a TCP connection, 2 s timeout. Refused: it
//!     did not connect.
//! 20. `keyctl`: the id of the user keyring (`KEYCTL_GET_KEYRING_ID`).
//! 21. `perf_event_open`: a software CPU-clock counter on this process, user space only.
//! 22. `userfaultfd`: a userfaultfd descriptor.
//! 23. `bpf`: a one-entry array map (`BPF_MAP_CREATE`).
//! 24. `kexec`: `kexec_load` with 17 segments, one over the kernel's maximum: once permitted
//!     it fails with `EINVAL` and loads nothing. (Zero segments would unload a loaded kernel.)
//! 25. `syslog`: read the end of the kernel log (`SYSLOG_ACTION_READ_ALL`; only the count
//!     is shown).
//!
//!     For 20 to 25, raw system calls: allowed when the call did not fail with `EPERM`,
//!     `EACCES` or `ENOSYS` (another error means it got past the permission checks); a
//!     returned descriptor is closed at once. Refused: one of those three.
//! 26. `exec_written`: write a program into the working directory (129 bytes of x86-64
//!     ELF that exits 0: it needs neither `/proc` nor a shell), make it executable, and
//!     `execve` it in a child. Refused: it could not be written, or `execve` failed, or it
//!     did not exit 0.
//! 27. `sethostname`: set the hostname to the value it has. Refused: the call failed.
//! 28. `chroot`: `chroot(".")` in a child. Refused: the call failed.
//!
//! An allowed answer is not always an escape: inside namespaces of the instance's own,
//! `sethostname`, `proc_sys` on the hostname, `unshare`, `raw_socket` and `mount` may work
//! and touch only those namespaces. Whoever reads the answers judges that.

mod attempts;
mod sys;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::time::Duration;

use attempts::{NAMESPACES, Outcome};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head read; the rest is ignored.
const MAX_HEAD: u64 = 16 * 1024;

/// One attempt, with its parameters checked.
#[derive(Debug)]
enum Attempt {
    Whoami,
    CorePattern,
    ProcSys(String),
    Sys(String),
    MknodChar,
    MknodBlock,
    Read(String),
    List(String),
    Write(String),
    Ptrace,
    Mount,
    Unshare(Vec<(&'static str, i32)>),
    Setuid(u32),
    Setgid(u32),
    RawSocket,
    FillDisk(u32),
    Forks(u32),
    Memory(u32),
    Connect(SocketAddr),
    Keyctl,
    PerfEventOpen,
    Userfaultfd,
    Bpf,
    Kexec,
    Syslog,
    ExecWritten,
    Sethostname,
    Chroot,
}

/// Why a request makes no attempt.
#[derive(Debug)]
enum Rejection {
    /// 404.
    NotFound(String),
    /// 400.
    BadRequest(String),
}

impl Attempt {
    fn parse(name: &str, mut params: Params) -> Result<Attempt, Rejection> {
        let attempt = match name {
            "whoami" => Attempt::Whoami,
            "core_pattern" => Attempt::CorePattern,
            "proc_sys" => Attempt::ProcSys(params.text("path", "/proc/sys/kernel/hostname")),
            "sys" => Attempt::Sys(params.text("path", "/sys/kernel/rcu_expedited")),
            "mknod_char" => Attempt::MknodChar,
            "mknod_block" => Attempt::MknodBlock,
            "read" => Attempt::Read(params.required("path")?),
            "list" => Attempt::List(params.required("path")?),
            "write" => Attempt::Write(params.required("path")?),
            "ptrace" => Attempt::Ptrace,
            "mount" => Attempt::Mount,
            "unshare" => Attempt::Unshare(namespaces(&params.text("flags", "user,mount"))?),
            "setuid" => Attempt::Setuid(params.number("uid", 0)?),
            "setgid" => Attempt::Setgid(params.number("gid", 0)?),
            "raw_socket" => Attempt::RawSocket,
            "fill_disk" => Attempt::FillDisk(params.number("mib", 1024)?),
            "forks" => Attempt::Forks(params.number("n", 10_000)?),
            "memory" => match params.number("mib", 1024)? {
                0 => return Err(Rejection::BadRequest("mib: at least 1".to_owned())),
                mib => Attempt::Memory(mib),
            },
            "connect" => {
                let addr = params.required("addr")?;
                Attempt::Connect(addr.parse().map_err(|_| {
                    Rejection::BadRequest(format!("addr: `{addr}` is not an ip:port"))
                })?)
            }
            "keyctl" => Attempt::Keyctl,
            "perf_event_open" => Attempt::PerfEventOpen,
            "userfaultfd" => Attempt::Userfaultfd,
            "bpf" => Attempt::Bpf,
            "kexec" => Attempt::Kexec,
            "syslog" => Attempt::Syslog,
            "exec_written" => Attempt::ExecWritten,
            "sethostname" => Attempt::Sethostname,
            "chroot" => Attempt::Chroot,
            _ => return Err(Rejection::NotFound(format!("no attempt `{name}`"))),
        };
        params.finish()?;
        Ok(attempt)
    }

    fn run(self) -> Outcome {
        match self {
            Attempt::Whoami => attempts::whoami(),
            Attempt::CorePattern => attempts::core_pattern(),
            Attempt::ProcSys(path) | Attempt::Sys(path) => attempts::setting(&path),
            Attempt::MknodChar => attempts::mknod_char(),
            Attempt::MknodBlock => attempts::mknod_block(),
            Attempt::Read(path) => attempts::read(&path),
            Attempt::List(path) => attempts::list(&path),
            Attempt::Write(path) => attempts::write(&path),
            Attempt::Ptrace => attempts::ptrace(),
            Attempt::Mount => attempts::mount(),
            Attempt::Unshare(namespaces) => attempts::unshare(&namespaces),
            Attempt::Setuid(uid) => attempts::setuid(uid),
            Attempt::Setgid(gid) => attempts::setgid(gid),
            Attempt::RawSocket => attempts::raw_socket(),
            Attempt::FillDisk(mib) => attempts::fill_disk(mib),
            Attempt::Forks(n) => attempts::forks(n),
            Attempt::Memory(mib) => attempts::memory(mib),
            Attempt::Connect(address) => attempts::connect(address),
            Attempt::Keyctl => attempts::keyctl(),
            Attempt::PerfEventOpen => attempts::perf_event_open(),
            Attempt::Userfaultfd => attempts::userfaultfd(),
            Attempt::Bpf => attempts::bpf(),
            Attempt::Kexec => attempts::kexec(),
            Attempt::Syslog => attempts::syslog(),
            Attempt::ExecWritten => attempts::exec_written(),
            Attempt::Sethostname => attempts::sethostname(),
            Attempt::Chroot => attempts::chroot(),
        }
    }
}

/// `user,mount` (or `user|mount`) as namespace flags.
fn namespaces(list: &str) -> Result<Vec<(&'static str, i32)>, Rejection> {
    list.split([',', '|'])
        .map(|name| {
            NAMESPACES
                .iter()
                .find(|(known, _)| *known == name)
                .copied()
                .ok_or_else(|| Rejection::BadRequest(format!("flags: no namespace `{name}`")))
        })
        .collect()
}

/// The query's `key=value` pairs, percent-decoded. Each is taken once; any left over is a
/// bad request.
#[derive(Debug)]
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Result<Params, Rejection> {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((decode(key)?, decode(value)?))
            })
            .collect::<Result<_, Rejection>>()?;
        Ok(Params(pairs))
    }

    fn take(&mut self, key: &str) -> Option<String> {
        let index = self.0.iter().position(|(known, _)| known == key)?;
        Some(self.0.remove(index).1)
    }

    fn text(&mut self, key: &str, default: &str) -> String {
        self.take(key).unwrap_or_else(|| default.to_owned())
    }

    fn required(&mut self, key: &str) -> Result<String, Rejection> {
        self.take(key)
            .ok_or_else(|| Rejection::BadRequest(format!("missing parameter `{key}`")))
    }

    fn number(&mut self, key: &str, default: u32) -> Result<u32, Rejection> {
        match self.take(key) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|_| {
                Rejection::BadRequest(format!(
                    "{key}: `{value}` is not a number from 0 to {}",
                    u32::MAX
                ))
            }),
        }
    }

    fn finish(self) -> Result<(), Rejection> {
        match self.0.first() {
            None => Ok(()),
            Some((key, _)) => Err(Rejection::BadRequest(format!(
                "unknown or repeated parameter `{key}`"
            ))),
        }
    }
}

/// Percent-decoding (`+` stays a plus: paths hold no spaces here).
fn decode(text: &str) -> Result<String, Rejection> {
    let bad = || Rejection::BadRequest(format!("bad percent-encoding in `{text}`"));
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

/// The status and body line for a request line.
fn answer(request_line: &str) -> (u16, String) {
    let mut words = request_line.split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return (400, "bad request line".to_owned());
    };
    if method != "GET" {
        return (405, format!("{method}: only GET"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/" {
        return (200, "hostile ready".to_owned());
    }
    let Some(name) = path.strip_prefix("/try/") else {
        return (404, format!("not found: {path}"));
    };
    match Params::parse(query).and_then(|params| Attempt::parse(name, params)) {
        Ok(attempt) => (200, attempt.run().to_string()),
        Err(Rejection::NotFound(why)) => (404, why),
        Err(Rejection::BadRequest(why)) => (400, why),
    }
}

fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new((&stream).take(MAX_HEAD));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let (status, body) = answer(&request_line);
    eprintln!("hostile: {} -> {status} {body}", request_line.trim_end());
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let body = format!("{body}\n");
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn listener() -> io::Result<TcpListener> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    if ours && std::env::var("LISTEN_FDS").as_deref() == Ok("1") {
        // SAFETY: by the LISTEN_FDS convention fd 3 is a listening socket handed to us and
        // owned by nothing else in this process.
        return Ok(unsafe { TcpListener::from_raw_fd(3) });
    }
    let addr = std::env::var("HOSTILE_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    TcpListener::bind(addr)
}

fn main() {
    // SAFETY: ignoring a signal has no preconditions. A write past RLIMIT_FSIZE then fails
    // with EFBIG instead of killing the server.
    unsafe { sys::signal(sys::SIGXFSZ, sys::SIG_IGN) };
    let listener = match listener() {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("hostile: cannot listen: {error}");
            std::process::exit(1);
        }
    };
    println!("hostile ready");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(error) = serve(stream) {
                    eprintln!("hostile: {error}");
                }
            }
            Err(error) => eprintln!("hostile: accept: {error}"),
        }
    }
}
