//! Per-client gatekeepers in front of a legacy backend: each client gets its own instance,
//! reaches the backend through the upstream the deployer grants, and nothing else.
//!
//! The legacy backend is a plain TCP server in this test that writes one line per request
//! it receives to its own log file: what the policy refuses must never show up there.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Daemon, eventually, example_source, git, push_service};

pub(crate) const NAME: &str = "gatekeeper.revboot.test";
const CLIENTS: [&str; 3] = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];
/// A fourth client, over the per-client cap of three.
const OVER_CAP: &str = "127.0.0.24";

/// A gate requests wait at until it is opened (bounded by the backend's read timeout).
type Gate = Arc<(Mutex<bool>, std::sync::Condvar)>;

/// The legacy backend: answers `legacy backend saw <method> <path> for <x-forwarded-for>`
/// and appends the same line to its log file. A request for a path under `/api/wait`
/// is logged, then answered only once [`Backend::open_gate`] is called.
pub(crate) struct Backend {
    port: u16,
    log: PathBuf,
    stop: Arc<AtomicBool>,
    gate: Gate,
}

impl Backend {
    pub(crate) fn start(log: &Path) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        let port = listener.local_addr().expect("backend address").port();
        std::fs::write(log, "").expect("backend log");
        let file = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .append(true)
                .open(log)
                .expect("backend log"),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let gate = Gate::default();
        let gates = Arc::clone(&gate);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (file, gate) = (Arc::clone(&file), Arc::clone(&gates));
                std::thread::spawn(move || serve_one(stream, &file, &gate));
            }
        });
        Backend {
            port,
            log: log.to_owned(),
            stop,
            gate,
        }
    }

    /// Lets the requests under `/api/wait` be answered.
    pub(crate) fn open_gate(&self) {
        let (open, opened) = &*self.gate;
        *open.lock().expect("gate lock") = true;
        opened.notify_all();
    }

    /// Every request line the backend received so far.
    pub(crate) fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .expect("backend log")
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_one(stream: TcpStream, log: &Mutex<std::fs::File>, gate: &Gate) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut writer = stream.try_clone().expect("clone backend stream");
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut forwarded = String::from("-");
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "x-forwarded-for" => forwarded = value.trim().to_owned(),
                "content-length" => length = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    let _ = reader.read_exact(&mut body);
    let mut parts = request_line.split_whitespace();
    let seen = format!(
        "{} {} for {forwarded} ({length} body bytes)",
        parts.next().unwrap_or("?"),
        parts.next().unwrap_or("?")
    );
    writeln!(log.lock().expect("backend log lock"), "{seen}").expect("write backend log");
    if seen.contains(" /api/wait") {
        let (open, opened) = &**gate;
        let guard = open.lock().expect("gate lock");
        let _ = opened
            .wait_timeout_while(guard, Duration::from_secs(10), |open| !*open)
            .expect("gate lock");
    }
    let answer = format!("legacy backend saw {seen}\n");
    let _ = write!(
        writer,
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
}

/// curl from `source` to `address:8080` (a body of `body` bytes, if any).
pub(crate) fn curl_from(
    source: &str,
    address: &str,
    method: &str,
    path: &str,
    body: Option<usize>,
) -> Output {
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "--path-as-is",
            "--max-time",
            "20",
            "--interface",
            source,
        ])
        .args(["-X", method, "-w", "\n%{http_code}"])
        .args(["--resolve", &format!("{NAME}:8080:{address}")]);
    if let Some(bytes) = body {
        command.args(["--data-binary", "@-", "-H", "expect:"]);
        command.stdin(Stdio::piped());
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command
            .arg(format!("http://{NAME}:8080{path}"))
            .spawn()
            .expect("run curl");
        let mut stdin = child.stdin.take().expect("curl stdin");
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&vec![b'z'; bytes]);
        });
        let output = child.wait_with_output().expect("curl output");
        let _ = writer.join();
        return output;
    }
    command
        .arg(format!("http://{NAME}:8080{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl")
}

/// (HTTP status, body) of a curl that must have completed.
pub(crate) fn answered(output: &Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "curl failed: {text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status code"), body.to_owned())
}

/// The port of the instance's own socket on its service address (beside the proxy's 8080).
fn backend_port(address: &str) -> u16 {
    let output = Command::new("ss")
        .args(["-Hltn", "src", address])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit_once(':'))
        .filter_map(|(_, port)| port.parse::<u16>().ok())
        .find(|port| *port != 8080)
        .unwrap_or_else(|| panic!("no instance socket on {address}: {text}"))
}

/// The host pid of the gatekeeper serving `client`, found by its environment.
pub(crate) fn gatekeeper_pid(client: &str) -> Option<u32> {
    let wanted = format!("REVBOOT_CLIENT={client}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let mut vars = environ.split(|b| *b == 0);
            let ours = vars.clone().any(|v| v == b"REVBOOT_SERVICE=gatekeeper");
            (ours && vars.any(|v| v == wanted.as_bytes())).then_some(pid)
        })
}

/// Pushes the gatekeeper example, pointed at `backend`.
pub(crate) fn push_gatekeeper(daemon: &Daemon, temp: &Path, backend: &Backend) {
    let work = example_source(temp, "gatekeeper");
    let manifest = work.join("revboot.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    assert!(text.contains("\"127.0.0.1:9000\""), "{text}");
    let text = text.replace(
        "\"127.0.0.1:9000\"",
        &format!("\"127.0.0.1:{}\"", backend.port),
    );
    std::fs::write(&manifest, text).expect("write manifest");
    git(
        &work,
        &["commit", "-q", "-am", "gatekeeper for the test backend"],
    );
    push_service(daemon, &work, "gatekeeper");
}

#[test]
fn gatekeepers_per_client_reach_only_their_backend_and_enforce_policy() {
    let temp = tempfile::tempdir().expect("temp dir");
    let backend = Backend::start(&temp.path().join("backend.log"));
    let daemon = Daemon::start_configured(
        &temp.path().join("data"),
        "[instances]\nmax_clients_per_service = 3\nidle_timeout_ms = 6000\n",
    );

    push_gatekeeper(&daemon, temp.path(), &backend);

    // Three clients, three instances, three addresses; each reaches the backend as itself.
    let mut addresses = Vec::new();
    for client in CLIENTS {
        let address = daemon.address_for(client, NAME);
        let (status, body) = answered(&curl_from(client, &address, "GET", "/api/hello", None));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            format!("legacy backend saw GET /api/hello for {client} (0 body bytes)\n")
        );
        addresses.push(address);
    }
    let mut distinct = addresses.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{addresses:?}");
    let listed = daemon.instances();
    let mut clients: Vec<String> = listed
        .iter()
        .filter(|i| i["service"] == "gatekeeper")
        .map(|i| {
            i["client"]
                .as_str()
                .expect("per-client instance")
                .to_owned()
        })
        .collect();
    clients.sort();
    assert_eq!(clients, CLIENTS, "{listed:?}");
    for (client, address) in CLIENTS.iter().zip(&addresses) {
        let shown = listed
            .iter()
            .find(|i| i["client"] == *client)
            .expect("listed");
        assert_eq!(shown["address"], address.as_str(), "{shown}");
    }
    assert_eq!(backend.requests().len(), 3, "{:?}", backend.requests());

    // None can reach another's instance: .22 on .21's address gets no HTTP answer.
    assert_eq!(daemon.address_for(CLIENTS[0], NAME), addresses[0]);
    let intruder = curl_from(CLIENTS[1], &addresses[0], "GET", "/api/hello", None);
    let text = String::from_utf8_lossy(&intruder.stdout);
    assert!(!intruder.status.success(), "{text}");
    assert!(!text.contains("legacy backend"), "{text}");
    // Nor the instance's own socket behind the proxy: it admits only the proxy's source.
    let port = backend_port(&addresses[0]);
    for source in [CLIENTS[1], CLIENTS[0]] {
        let direct = Command::new("curl")
            .args(["-sS", "--connect-timeout", "2", "--max-time", "5"])
            .args(["--interface", source])
            .arg(format!("http://{}:{port}/api/hello", addresses[0]))
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&direct.stdout);
        assert!(!direct.status.success(), "{source} got through: {text}");
    }
    assert_eq!(backend.requests().len(), 3, "{:?}", backend.requests());

    // What the policy forbids gets its status and never reaches the backend.
    let before = backend.requests();
    let refusals = [
        ("DELETE", "/api/hello", None, 405),
        ("GET", "/admin/secrets", None, 403),
        ("GET", "/api/../admin", None, 403),
        ("POST", "/api/upload", Some(20_000), 413),
    ];
    for (method, path, body, expected) in refusals {
        let output = curl_from(CLIENTS[0], &addresses[0], method, path, body);
        let (status, text) = answered(&output);
        assert_eq!(status, expected, "{method} {path}: {text}");
        assert!(text.starts_with(&format!("{expected} ")), "{text}");
    }
    // A request that passes, after the refusals, proves the backend log is current.
    let (status, body) = answered(&curl_from(
        CLIENTS[0],
        &addresses[0],
        "POST",
        "/api/upload",
        Some(100),
    ));
    assert_eq!(status, 200, "{body}");
    let after = backend.requests();
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    assert_eq!(
        after.last().map(String::as_str),
        Some("POST /api/upload for 127.0.0.21 (100 body bytes)")
    );
    assert!(
        !after
            .iter()
            .any(|r| r.starts_with("DELETE") || r.contains("admin") || r.contains("20000")),
        "{after:?}"
    );

    // The cap: while each of the three has a connection open, a fourth client is refused
    // with a clear reason; the three keep theirs.
    let held: Vec<_> = CLIENTS
        .iter()
        .zip(&addresses)
        .map(|(client, address)| daemon.hold_connection(client, address, 8080))
        .collect();
    let refused = daemon.dig_from(OVER_CAP, NAME);
    assert!(refused.contains("status: SERVFAIL"), "{refused}");
    assert!(
        refused.contains("Per-client instance limit for `gatekeeper` reached (3 clients)"),
        "{refused}"
    );
    assert_eq!(
        daemon
            .instances()
            .iter()
            .filter(|i| i["client"] == OVER_CAP)
            .count(),
        0
    );
    drop(held);

    // A crashed gatekeeper affects only its client.
    let pid = gatekeeper_pid(CLIENTS[0]).expect("the gatekeeper of .21 runs");
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    assert!(
        eventually(|| !daemon
            .instances()
            .iter()
            .any(|i| i["client"] == CLIENTS[0] && i["state"] == "ready")),
        "the killed gatekeeper is no longer ready: {:?}",
        daemon.instances()
    );
    for (client, address) in CLIENTS.iter().zip(&addresses).skip(1) {
        assert_eq!(&daemon.address_for(client, NAME), address);
        let (status, body) = answered(&curl_from(client, address, "GET", "/public/x", None));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("for {client}")), "{body}");
    }
    // The crashed client's next query boots it a fresh gatekeeper.
    let again = daemon.address_for(CLIENTS[0], NAME);
    let (status, body) = answered(&curl_from(CLIENTS[0], &again, "GET", "/api/again", None));
    assert_eq!(status, 200, "{body}");
    assert!(gatekeeper_pid(CLIENTS[0]).is_some_and(|new| new != pid));

    // An operator kill of one client's gatekeeper (`--client`) leaves the others serving.
    let killed = daemon.cli(&["kill", "gatekeeper", "--client", CLIENTS[1]]);
    assert!(
        killed.status.success(),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    assert!(
        !daemon
            .instances()
            .iter()
            .any(|i| i["client"] == CLIENTS[1] && i["state"] == "ready")
    );
    let (status, body) = answered(&curl_from(
        CLIENTS[2],
        &addresses[2],
        "GET",
        "/api/still",
        None,
    ));
    assert_eq!(status, 200, "{body}");

    // Quiet clients are reaped; each left its own console record.
    assert!(
        eventually(|| daemon.instances().is_empty()),
        "idle gatekeepers reaped: {:?}",
        daemon.instances()
    );
    let logs = daemon.cli(&["logs", "gatekeeper", "--console"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.status.success(), "{text}");
    for client in CLIENTS {
        assert!(text.contains(&format!("for {client} started")), "{text}");
        assert!(
            text.contains(&format!("gatekeeper ready for {client}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("forwarded GET /api/hello from {client}")),
            "{text}"
        );
    }
    assert!(text.contains("crashed: killed by signal 9"), "{text}");
    assert!(text.contains("stopped: killed by operator"), "{text}");
    assert!(
        text.contains("refused 405 DELETE /api/hello from 127.0.0.21"),
        "{text}"
    );
    assert!(text.contains("stopped: idle"), "{text}");
}
