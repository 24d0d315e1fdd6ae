//! The control run of `examples/hostile`: unsandboxed, as root on the host, its attempts
//! work. So when a sandboxed instance answers `refused`, the sandbox refused, not a broken
//! attempt.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use revboot_testkit::hostile_image;

/// Where the control run listens: 127.78.0.x:PORT for the first x here that is free.
const ADDRESSES: std::ops::RangeInclusive<u8> = 1..=16;
const PORT: u16 = 7878;
/// A bound on one answer (the memory attempt alone may take 30 s), not a timing assertion.
const PATIENCE: Duration = Duration::from_secs(120);

/// The hostile binary running on the host in a scratch directory of its own.
struct Hostile {
    child: Child,
    stderr: Option<JoinHandle<String>>,
    address: SocketAddr,
    scratch: tempfile::TempDir,
}

impl Hostile {
    /// Starts it on the first free address of 127.78.0.x.
    fn start() -> Hostile {
        let image = hostile_image();
        for host in ADDRESSES {
            let address = SocketAddr::from((Ipv4Addr::new(127, 78, 0, host), PORT));
            let scratch = tempfile::tempdir().expect("scratch directory");
            let mut child = Command::new(&image)
                .current_dir(scratch.path())
                .env("HOSTILE_ADDR", address.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("hostile starts");
            let mut stderr = child.stderr.take().expect("stderr piped");
            let stderr = std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                text
            });
            let mut ready = String::new();
            let stdout = child.stdout.take().expect("stdout piped");
            let _ = BufReader::new(stdout).read_line(&mut ready);
            let mut hostile = Hostile {
                child,
                stderr: Some(stderr),
                address,
                scratch,
            };
            if ready.trim_end() == "hostile ready" {
                return hostile;
            }
            let stderr = hostile.stop();
            assert!(
                stderr.contains("Address already in use"),
                "hostile did not start on {address}: {stderr}"
            );
        }
        panic!("127.78.0.{ADDRESSES:?} port {PORT} are all in use");
    }

    /// `GET /try/<attempt>`: the status and the answer line.
    fn request(&self, attempt: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.address).expect("connect to hostile");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        write!(
            stream,
            "GET /try/{attempt} HTTP/1.1\r\nhost: hostile\r\nconnection: close\r\n\r\n"
        )
        .expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|status| status.parse().ok())
            .unwrap_or_else(|| panic!("{attempt}: not an HTTP response: {response:?}"));
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        (status, body.trim_end().to_owned())
    }

    /// The answer line of an attempt, which must be `allowed: …` or `refused: …`.
    fn attempt(&self, attempt: &str) -> String {
        let (status, answer) = self.request(attempt);
        assert_eq!(status, 200, "{attempt}: {answer}");
        assert!(
            answer.starts_with("allowed: ") || answer.starts_with("refused: "),
            "{attempt}: {answer}"
        );
        answer
    }

    /// Kills it; its console.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .and_then(|stderr| stderr.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn attempts_succeed_as_unsandboxed_root() {
    let hostile = Hostile::start();
    let whoami = hostile.attempt("whoami");
    assert!(whoami.starts_with("allowed: uid=0,0 gid=0,0 "), "{whoami}");

    let outside = tempfile::tempdir().expect("directory outside");
    let file = outside.path().join("secret");
    std::fs::write(&file, "secret\n").expect("write the file to read");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("the test's listener");
    let target = listener.local_addr().expect("listener address");
    let dir = outside.path().display();
    let read = format!("read?path={}", file.display());
    let list = format!("list?path={dir}");
    let write = format!("write?path={dir}/written");
    let connect = format!("connect?addr={target}");

    let cheap = [
        "core_pattern",
        "proc_sys",
        "mknod_char",
        read.as_str(),
        list.as_str(),
        write.as_str(),
        "ptrace",
        "mount",
        "unshare",
        "setuid",
        "setgid",
        "raw_socket",
        "fill_disk?mib=4",
        "forks?n=50",
        "memory?mib=64",
        connect.as_str(),
        "exec_written",
        "sethostname",
        "chroot",
    ];
    let refused: Vec<String> = cheap
        .iter()
        .map(|attempt| format!("{attempt}: {}", hostile.attempt(attempt)))
        .filter(|answer| !answer.contains(": allowed: "))
        .collect();
    assert!(
        refused.is_empty(),
        "refused to root on the host: {refused:#?}"
    );

    // Which of these the kernel allows depends on its configuration; one of the two will.
    let keyctl = hostile.attempt("keyctl");
    let perf = hostile.attempt("perf_event_open");
    assert!(
        keyctl.starts_with("allowed: ") || perf.starts_with("allowed: "),
        "{keyctl}\n{perf}"
    );
    // These depend on the kernel too (a loop driver, bpf, userfaultfd, kexec, printk, the
    // /sys file): each must still answer.
    for attempt in [
        "mknod_block",
        "sys",
        "userfaultfd",
        "bpf",
        "kexec",
        "syslog",
    ] {
        hostile.attempt(attempt);
    }

    assert!(
        listener.set_nonblocking(true).is_ok() && listener.accept().is_ok(),
        "the connection reached the test's listener"
    );
    assert!(
        !outside.path().join("written").exists(),
        "write removed its file"
    );
    let left: Vec<_> = std::fs::read_dir(hostile.scratch.path())
        .expect("scratch directory")
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert!(left.is_empty(), "attempts left files behind: {left:?}");
    // Bad requests change nothing and the server keeps answering.
    assert_eq!(hostile.request("forks?n=lots").0, 400);
    assert_eq!(hostile.request("forks?m=1").0, 400);
    assert_eq!(hostile.request("escape").0, 404);
    assert!(hostile.attempt("whoami").starts_with("allowed: "));
}
