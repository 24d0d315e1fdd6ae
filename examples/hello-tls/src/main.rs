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
//! 5. With `REVBOOT_HANDOFF_FD` set (the manifest's `handoff = true`), a second thread
//!    receives the connections revboot's front door hands over on that Unix socket (one
//!    byte, one descriptor as `SCM_RIGHTS`, the ClientHello still unread: the front door
//!    only peeked at the server name) and serves them like accepted ones, TLS handshake
//!    first: no relay carries their bytes. The listener keeps serving the rest.
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

/// `recvmsg(2)` for one descriptor, written out by hand as `examples/hello` does (each
/// example is a project of its own that users push alone, so they share no code); the
/// `libc` crate would do too.
mod handoff {
    use std::os::fd::{FromRawFd, RawFd};

    #[repr(C)]
    struct IoVec {
        base: *mut u8,
        len: usize,
    }

    #[repr(C)]
    struct MsgHdr {
        name: *mut u8,
        name_len: u32,
        iov: *mut IoVec,
        iov_len: usize,
        control: *mut u8,
        control_len: usize,
        flags: i32,
    }

    /// `struct cmsghdr` and room for one descriptor (`CMSG_SPACE(4)` on 64-bit Linux).
    #[repr(C, align(8))]
    struct Control {
        len: usize,
        level: i32,
        kind: i32,
        fds: [RawFd; 2],
    }

    const SOL_SOCKET: i32 = 1;
    const SCM_RIGHTS: i32 = 1;
    const MSG_CMSG_CLOEXEC: i32 = 0x4000_0000;
    const EINTR: i32 = 4;

    unsafe extern "C" {
        fn recvmsg(fd: RawFd, message: *mut MsgHdr, flags: i32) -> isize;
    }

    /// The next connection handed over on `fd`; `None` once the daemon's end is closed.
    pub fn receive(fd: RawFd) -> std::io::Result<Option<std::net::TcpStream>> {
        loop {
            let mut byte = 0u8;
            let mut iov = IoVec {
                base: &mut byte,
                len: 1,
            };
            let mut control = Control {
                len: 0,
                level: 0,
                kind: 0,
                fds: [-1; 2],
            };
            let mut message = MsgHdr {
                name: std::ptr::null_mut(),
                name_len: 0,
                iov: &mut iov,
                iov_len: 1,
                control: (&raw mut control).cast(),
                control_len: std::mem::size_of::<Control>(),
                flags: 0,
            };
            // SAFETY: every pointer in `message` points at a live local of the right size.
            let received = unsafe { recvmsg(fd, &mut message, MSG_CMSG_CLOEXEC) };
            if received < 0 {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() == Some(EINTR) {
                    continue;
                }
                return Err(error);
            }
            if received == 0 {
                return Ok(None);
            }
            let one_fd = std::mem::size_of::<usize>() + 8 + 4;
            if message.control_len >= one_fd
                && control.level == SOL_SOCKET
                && control.kind == SCM_RIGHTS
                && control.fds[0] >= 0
            {
                // SAFETY: the kernel just made this descriptor ours (SCM_RIGHTS).
                return Ok(Some(unsafe {
                    std::net::TcpStream::from_raw_fd(control.fds[0])
                }));
            }
            // A byte without a descriptor: nothing to serve; wait for the next one.
        }
    }
}

/// Serves `tcp` on a thread of its own, or in turn once `THREADS` are busy (step 3).
fn dispatch(tcp: TcpStream, config: &Arc<ServerConfig>, deployment: &'static str) {
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    let config = Arc::clone(config);
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

/// Step 5: serves the connections handed over on `fd` until the daemon closes its end.
fn receive_handed(fd: i32, config: Arc<ServerConfig>, deployment: &'static str) {
    loop {
        match handoff::receive(fd) {
            Ok(Some(tcp)) => dispatch(tcp, &config, deployment),
            Ok(None) => return,
            Err(error) => {
                eprintln!("hello-tls: receiving a handed connection: {error}; ending that loop");
                return;
            }
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
    if let Some(fd) = std::env::var("REVBOOT_HANDOFF_FD")
        .ok()
        .and_then(|fd| fd.parse::<i32>().ok())
    {
        let config = Arc::clone(&config);
        if let Err(error) = std::thread::Builder::new()
            .name("handoff".into())
            .spawn(move || receive_handed(fd, config, deployment))
        {
            eprintln!("hello-tls: cannot receive handed connections: {error}");
        }
    }
    for stream in listener.incoming() {
        match stream {
            Ok(tcp) => dispatch(tcp, &config, deployment),
            Err(error) => eprintln!("hello-tls: accept: {error}"),
        }
    }
}
