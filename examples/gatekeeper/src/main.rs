//! `gatekeeper`: a per-client front for a legacy HTTP backend.
//!
//! revboot boots one gatekeeper per client (`per_client = true`); only that client can reach
//! it. Each request goes through the policy and, if it passes, to the upstream:
//!
//! 1. Read the request head (bounded by `GATEKEEPER_MAX_REQUEST_BYTES`; larger → 431).
//! 2. Rate: a token bucket of `GATEKEEPER_RATE_PER_SEC` requests per second (burst the same);
//!    empty → 429.
//! 3. Method must be in `GATEKEEPER_METHODS` → else 405 with `Allow`.
//! 4. Path must start with one of `GATEKEEPER_PATHS` and hold no `..` segment → else 403.
//! 5. Head plus body (`Content-Length`) must fit `GATEKEEPER_MAX_REQUEST_BYTES` → else 413;
//!    chunked request bodies are refused (411) so the size is always known.
//! 6. Forward to the upstream granted by revboot (`REVBOOT_UPSTREAM_0`, `unix:<path>` or
//!    `tcp:<addr>`), with `Connection: close` and `X-Forwarded-For: <client>`, and stream
//!    the answer back. Unreachable upstream → 502.
//!
//! Every refusal is answered with a clear status and body and logged as one line on the
//! console, which revboot keeps with the instance's record.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most this many requests are handled at once; more wait in the accept queue.
const MAX_CONCURRENT: usize = 16;
/// Read and write timeout on client and upstream sockets.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// After a refusal, at most this many further request bytes are read and dropped…
const DRAIN_BYTES: u64 = 1 << 20;
/// …for at most this long between reads.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

struct Policy {
    methods: Vec<String>,
    paths: Vec<String>,
    max_request_bytes: usize,
    rate_per_sec: f64,
    upstream: Option<String>,
    client: String,
}

impl Policy {
    fn from_env() -> Policy {
        let list = |key: &str, default: &str| -> Vec<String> {
            std::env::var(key)
                .unwrap_or_else(|_| default.to_owned())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let number = |key: &str, default: f64| -> f64 {
            std::env::var(key)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Policy {
            methods: list("GATEKEEPER_METHODS", "GET,HEAD")
                .into_iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            paths: list("GATEKEEPER_PATHS", "/"),
            max_request_bytes: number("GATEKEEPER_MAX_REQUEST_BYTES", 16384.0) as usize,
            rate_per_sec: number("GATEKEEPER_RATE_PER_SEC", 50.0).max(0.001),
            upstream: std::env::var("REVBOOT_UPSTREAM_0")
                .ok()
                .or_else(|| std::env::var("GATEKEEPER_UPSTREAM").ok()),
            client: std::env::var("REVBOOT_CLIENT").unwrap_or_else(|_| "unknown".to_owned()),
        }
    }
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Request {
    method: String,
    path: String,
    head: Vec<u8>,
    content_length: usize,
    chunked: bool,
}

enum Refusal {
    Status(u16, &'static str, String),
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
    let addr = std::env::var("GATEKEEPER_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    TcpListener::bind(addr)
}

/// Reads the request head: request line and headers, up to the blank line.
fn read_head(reader: &mut BufReader<TcpStream>, limit: usize) -> Result<Request, Refusal> {
    let mut head = Vec::new();
    let mut method = String::new();
    let mut path = String::new();
    let mut content_length = 0usize;
    let mut chunked = false;
    loop {
        let mut line = Vec::new();
        let read = reader
            .by_ref()
            .take((limit + 1 - head.len().min(limit)) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| Refusal::Status(400, "Bad Request", format!("unreadable request: {e}")))?;
        if read == 0 {
            return Err(Refusal::Status(400, "Bad Request", "request ended early".into()));
        }
        head.extend_from_slice(&line);
        if head.len() > limit {
            return Err(Refusal::Status(
                431,
                "Request Header Fields Too Large",
                format!("request head over {limit} bytes"),
            ));
        }
        if !line.ends_with(b"\n") {
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if method.is_empty() {
            let mut parts = text.split_whitespace();
            method = parts.next().unwrap_or_default().to_owned();
            path = parts.next().unwrap_or_default().to_owned();
            if method.is_empty() || !path.starts_with('/') || parts.next().is_none() {
                return Err(Refusal::Status(400, "Bad Request", "malformed request line".into()));
            }
            continue;
        }
        if text.is_empty() {
            break;
        }
        if let Some((name, value)) = text.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            if name == "content-length" {
                content_length = value.parse().map_err(|_| {
                    Refusal::Status(400, "Bad Request", "invalid Content-Length".into())
                })?;
            } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    Ok(Request {
        method,
        path,
        head,
        content_length,
        chunked,
    })
}

fn check(policy: &Policy, request: &Request) -> Result<(), Refusal> {
    if !policy.methods.iter().any(|m| *m == request.method) {
        return Err(Refusal::Status(
            405,
            "Method Not Allowed",
            format!("method {} not allowed", request.method),
        ));
    }
    let path_only = request.path.split(['?', '#']).next().unwrap_or_default();
    let traversal = path_only.split('/').any(|segment| segment == ".." || segment == "%2e%2e");
    if traversal || !policy.paths.iter().any(|p| path_only.starts_with(p.as_str())) {
        return Err(Refusal::Status(
            403,
            "Forbidden",
            format!("path {path_only} not allowed"),
        ));
    }
    if request.chunked {
        return Err(Refusal::Status(
            411,
            "Length Required",
            "chunked request bodies are not accepted".into(),
        ));
    }
    if request.head.len() + request.content_length > policy.max_request_bytes {
        return Err(Refusal::Status(
            413,
            "Payload Too Large",
            format!(
                "request of {} bytes over {}",
                request.head.len() + request.content_length,
                policy.max_request_bytes
            ),
        ));
    }
    Ok(())
}

trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

fn connect_upstream(spec: &str) -> io::Result<Box<dyn Duplex>> {
    if let Some(path) = spec.strip_prefix("unix:") {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        return Ok(Box::new(stream));
    }
    let address = spec.strip_prefix("tcp:").unwrap_or(spec);
    let stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(Box::new(stream))
}

/// The head as sent upstream: `Connection: close`, our `X-Forwarded-For`.
fn rewrite_head(head: &[u8], client: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(head.len() + 64);
    for (index, line) in text.split("\r\n").enumerate() {
        let lower = line.to_ascii_lowercase();
        if line.is_empty() {
            continue;
        }
        if index > 0
            && (lower.starts_with("connection:")
                || lower.starts_with("keep-alive:")
                || lower.starts_with("x-forwarded-for:"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n");
    out.push_str(&format!("X-Forwarded-For: {client}\r\n\r\n"));
    out.into_bytes()
}

fn respond(stream: &mut TcpStream, status: u16, reason: &str, extra: &str, body: &str) {
    let body = format!("{status} {reason}: {body}\n");
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-gatekeeper: refused\r\n{extra}\r\n{body}",
        body.len()
    );
}

/// After a refusal: end our side, then read (bounded, briefly) what the client still sends,
/// so that unread request bytes do not turn the close into a reset that loses the answer.
fn finish_refusal(client: &TcpStream, reader: &mut BufReader<TcpStream>) {
    let _ = client.shutdown(Shutdown::Write);
    let _ = client.set_read_timeout(Some(DRAIN_TIMEOUT));
    let _ = io::copy(&mut reader.by_ref().take(DRAIN_BYTES), &mut io::sink());
}

fn handle(stream: TcpStream, policy: &Policy, bucket: &Mutex<Bucket>) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut client = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let request = match read_head(&mut reader, policy.max_request_bytes) {
        Ok(request) => request,
        Err(Refusal::Status(status, reason, why)) => {
            eprintln!("gatekeeper: refused {status} from {}: {why}", policy.client);
            respond(&mut client, status, reason, "", &why);
            finish_refusal(&client, &mut reader);
            return Ok(());
        }
    };
    let allowed = bucket
        .lock()
        .map(|mut bucket| bucket.take(policy.rate_per_sec))
        .unwrap_or(false);
    let verdict = if allowed {
        check(policy, &request)
    } else {
        Err(Refusal::Status(
            429,
            "Too Many Requests",
            format!("over {} requests per second", policy.rate_per_sec),
        ))
    };
    if let Err(Refusal::Status(status, reason, why)) = verdict {
        eprintln!(
            "gatekeeper: refused {status} {} {} from {}: {why}",
            request.method, request.path, policy.client
        );
        let extra = if status == 405 {
            format!("allow: {}\r\n", policy.methods.join(", "))
        } else {
            String::new()
        };
        respond(&mut client, status, reason, &extra, &why);
        finish_refusal(&client, &mut reader);
        return Ok(());
    }
    let Some(spec) = policy.upstream.as_deref() else {
        respond(&mut client, 502, "Bad Gateway", "", "no upstream granted");
        return Ok(());
    };
    let mut upstream = match connect_upstream(spec) {
        Ok(upstream) => upstream,
        Err(error) => {
            eprintln!("gatekeeper: upstream {spec} unreachable: {error}");
            respond(&mut client, 502, "Bad Gateway", "", "upstream unreachable");
            return Ok(());
        }
    };
    upstream.write_all(&rewrite_head(&request.head, &policy.client))?;
    // The body: exactly Content-Length bytes, already bounded by the policy.
    io::copy(
        &mut reader.by_ref().take(request.content_length as u64),
        &mut upstream,
    )?;
    upstream.flush()?;
    let copied = io::copy(&mut upstream, &mut client)?;
    eprintln!(
        "gatekeeper: forwarded {} {} from {} ({copied} bytes back)",
        request.method, request.path, policy.client
    );
    Ok(())
}

fn main() {
    let policy = Arc::new(Policy::from_env());
    let listener = match listener() {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("gatekeeper: cannot listen: {error}");
            std::process::exit(1);
        }
    };
    let bucket = Arc::new(Mutex::new(Bucket {
        tokens: policy.rate_per_sec,
        last: Instant::now(),
    }));
    println!(
        "gatekeeper ready for {}: methods {:?}, paths {:?}, max {} bytes, {} req/s, upstream {}",
        policy.client,
        policy.methods,
        policy.paths,
        policy.max_request_bytes,
        policy.rate_per_sec,
        policy.upstream.as_deref().unwrap_or("none")
    );
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("gatekeeper: accept: {error}");
                continue;
            }
        };
        while active.load(Ordering::Acquire) >= MAX_CONCURRENT {
            std::thread::sleep(Duration::from_millis(1));
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (policy, bucket, handler_active) = (policy.clone(), bucket.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                if let Err(error) = handle(stream, &policy, &bucket) {
                    eprintln!("gatekeeper: {error}");
                }
                handler_active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(error) = spawned {
            eprintln!("gatekeeper: cannot start a handler: {error}");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
