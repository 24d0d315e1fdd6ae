//! `hello-tls`: a revboot service that ends TLS itself, behind the front door's TLS port.
//!
//! 1. Take the listening socket from the systemd convention (`LISTEN_FDS=1`, `LISTEN_PID` =
//!    our pid, fd 3), as revboot's process tender passes it; otherwise bind `HELLO_ADDR`
//!    (default `127.0.0.1:8443`).
//! 2. The certificate chain and its key are PEM text in the environment: `TLS_CERT` and
//!    `TLS_KEY`, set as the service's variables (`revboot config set hello-tls --stdin
//!    TLS_KEY < key.pem`), so the key stays out of git and out of the image. Without them
//!    the service says so on its console and exits.
//! 3. Each connection on a thread of its own (at most `THREADS` at once, then in turn):
//!    the TLS handshake, then every HTTP request is answered
//!    `hello-tls from <REVISION> (<deployment>) for <server name>`, where the server name is
//!    the one the client's ClientHello asked for (the front door routed by it and passed
//!    the ClientHello through untouched).
//! 4. Each request is one console line, `hello-tls: <server name> <method> <path>`.
//!
//! Built like every example: a static binary (`.cargo/config.toml`: `crt-static`), since
//! the process tender runs it in an empty mount namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// Change this line to make a new revision.
const REVISION: &str = "v1";
/// Connections served at once; more wait for their turn.
const THREADS: usize = 32;
/// How long a client may stay silent in the middle of a handshake or a request.
const SILENCE: Duration = Duration::from_secs(30);

fn listener() -> std::io::Result<TcpListener> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    if ours && std::env::var("LISTEN_FDS").as_deref() == Ok("1") {
        // SAFETY: by the LISTEN_FDS convention fd 3 is a listening socket handed to us and
        // owned by nothing else in this process.
        return Ok(unsafe { TcpListener::from_raw_fd(3) });
    }
    let addr = std::env::var("HELLO_ADDR").unwrap_or_else(|_| "127.0.0.1:8443".to_owned());
    TcpListener::bind(addr)
}

/// The server's TLS configuration from `TLS_CERT` and `TLS_KEY`.
fn tls_config() -> Result<ServerConfig, String> {
    let cert = std::env::var("TLS_CERT").map_err(|_| "TLS_CERT is not set".to_owned())?;
    let key = std::env::var("TLS_KEY").map_err(|_| "TLS_KEY is not set".to_owned())?;
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("TLS_CERT: {error}"))?;
    if chain.is_empty() {
        return Err("TLS_CERT holds no certificate".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|error| format!("TLS_KEY: {error}"))?;
    ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| format!("the certificate and key do not go together: {error}"))
}

fn serve(tcp: TcpStream, config: Arc<ServerConfig>, deployment: &str) -> Result<(), String> {
    tcp.set_read_timeout(Some(SILENCE))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(SILENCE))
        .map_err(|e| e.to_string())?;
    let connection = ServerConnection::new(config).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(connection, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|error| format!("handshake: {error}"))?;
    }
    let name = tls.conn.server_name().unwrap_or("-").to_owned();
    let mut reader = BufReader::new(tls);
    loop {
        let mut request_line = String::new();
        if reader
            .read_line(&mut request_line)
            .map_err(|e| e.to_string())?
            == 0
        {
            return Ok(());
        }
        let mut header = String::new();
        let mut close = false;
        loop {
            header.clear();
            if reader.read_line(&mut header).map_err(|e| e.to_string())? <= 2 {
                break;
            }
            close |= header.to_ascii_lowercase().starts_with("connection: close");
        }
        let mut words = request_line.split_whitespace();
        let method = words.next().unwrap_or("-");
        let path = words.next().unwrap_or("/");
        let _ = writeln!(std::io::stdout(), "hello-tls: {name} {method} {path}");
        let body = format!("hello-tls from {REVISION} ({deployment}) for {name}\n");
        let tls = reader.get_mut();
        write!(
            tls,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-revision: {REVISION}\r\n\r\n{body}",
            body.len()
        )
        .and_then(|()| tls.flush())
        .map_err(|e| e.to_string())?;
        if close {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            return Ok(());
        }
    }
}

fn main() {
    let deployment = std::env::var("REVBOOT_REVISION").unwrap_or_else(|_| "local".to_owned());
    let deployment: &'static str = Box::leak(deployment.into_boxed_str());
    let config = match tls_config() {
        Ok(config) => Arc::new(config),
        Err(error) => {
            eprintln!("hello-tls: {error}");
            std::process::exit(2);
        }
    };
    let listener = match listener() {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("hello-tls: cannot listen: {error}");
            std::process::exit(1);
        }
    };
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    for stream in listener.incoming() {
        let tcp = match stream {
            Ok(tcp) => tcp,
            Err(error) => {
                eprintln!("hello-tls: accept: {error}");
                continue;
            }
        };
        let config = Arc::clone(&config);
        let answer = move || {
            if let Err(error) = serve(tcp, config, deployment) {
                eprintln!("hello-tls: {error}");
            }
        };
        if LIVE.fetch_add(1, Ordering::SeqCst) < THREADS {
            std::thread::spawn(move || {
                answer();
                LIVE.fetch_sub(1, Ordering::SeqCst);
            });
        } else {
            LIVE.fetch_sub(1, Ordering::SeqCst);
            answer();
        }
    }
}
