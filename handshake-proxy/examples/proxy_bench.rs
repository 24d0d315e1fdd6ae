//! The processes `bench/proxy.sh` measures. Not a test: it prints what it serves and runs
//! until killed.
//!
//! - `proxy_bench backend [hand-off socket path]` — a keep-alive HTTP/1.1 backend on
//!   `127.0.0.1:<ephemeral>`: `GET /` answers 6 bytes, `GET /1m` answers 1 MiB. Prints
//!   `backend <address> <pid>`. With a path, it also takes connections handed over on a Unix
//!   socket listening there, as a process instance with `[run] handoff = true` does on
//!   `REVBOOT_HANDOFF_FD` (one byte, one descriptor each), and serves them alike.
//! - `proxy_bench proxy <backend> <service address> [multi|current] [buffer] [copy|zero]` — the
//!   handshake proxy fronting that backend as one always-ready instance on
//!   `<service address>:8080`, on a multi-thread (default) or current-thread tokio runtime,
//!   with the given splice buffer size, copying or with splice(2). Prints `proxied <address>`.
//! - `proxy_bench steer <backend> <service address> <backend pid>` — the same proxy, plus
//!   what the deployer does once an instance is ready: the kernel hands each new connection
//!   to the service address to the backend's own socket (taken from its process), so the
//!   proxy's listener only sees what the route passes on. Needs root.
//! - `proxy_bench bind <count>` — binds and closes `count` listeners on distinct loopback
//!   addresses the way the proxy does, and prints the mean cost of one.
//! - `proxy_bench front <backend> <front ip> [hand-off socket path]` — the proxy's front door
//!   on `<front ip>:<any>` in front of that backend, as the always-ready revision of `bench`
//!   (`reach = "front"`) in zone `revboot.test`. Prints `front <address>`. With a path (the
//!   backend's), every connection is handed to the backend instead of relayed.
//! - `proxy_bench firstbyte <count> <direct> <front>` — `count` rounds, each a fresh
//!   connection to `direct` and one to `front`, each sending `GET /` with
//!   `Host: bench.revboot.test` and timing connect → first byte of the answer; prints p50
//!   and p99 of both and their ratios (what `bench/front-door.sh` runs).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use std::os::fd::AsFd;

use revboot_deployer::{Instances, Reach, steer};
use revboot_proxy::{FrontConfig, Proxy, ProxyConfig};
use revboot_testkit::instances::{Addresses, Backend, Behaviour, Fake, FakeService, revision};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const PORT: u16 = 8080;
const MIB: usize = 1024 * 1024;

/// Receives connections handed over on `path` (each client of the Unix socket, a front
/// door) and serves them on `runtime`.
fn receive_handed(path: std::path::PathBuf, runtime: tokio::runtime::Handle, big: Arc<[u8]>) {
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind the hand-off socket");
    std::thread::spawn(move || {
        for door in listener.incoming() {
            let Ok(door) = door else { continue };
            let (runtime, big) = (runtime.clone(), Arc::clone(&big));
            std::thread::spawn(move || {
                while let Some(stream) = receive_one(&door) {
                    let _guard = runtime.enter();
                    let Ok(stream) = stream
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(stream))
                    else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    runtime.spawn(keep_alive(stream, Arc::clone(&big)));
                }
            });
        }
    });
}

/// One handed connection; `None` once the front door's end is closed.
#[allow(unsafe_code)] // Taking ownership of a descriptor the kernel just gave us.
fn receive_one(door: &std::os::unix::net::UnixStream) -> Option<std::net::TcpStream> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    loop {
        let mut byte = [0u8; 1];
        let mut slices = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let message = recvmsg::<()>(
            door.as_raw_fd(),
            &mut slices,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        if message.bytes == 0 {
            return None;
        }
        for control in message.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(fds) = control
                && let Some(&fd) = fds.first()
            {
                // SAFETY: received with SCM_RIGHTS, so a new descriptor nothing else owns.
                return Some(unsafe { std::net::TcpStream::from_raw_fd(fd) });
            }
        }
    }
}

async fn backend(handoff: Option<std::path::PathBuf>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let big: Arc<[u8]> = vec![b'x'; MIB].into();
    if let Some(path) = handoff {
        // Before the line that says it is up: a front door connects to it then.
        receive_handed(path, tokio::runtime::Handle::current(), Arc::clone(&big));
    }
    println!(
        "backend {} {}",
        listener.local_addr().expect("address"),
        std::process::id()
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(keep_alive(stream, Arc::clone(&big)));
    }
}

/// Answers requests on one connection until the client closes it.
async fn keep_alive(mut stream: TcpStream, big: Arc<[u8]>) {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(at) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let big_one = buffer.starts_with(b"GET /1m ");
        buffer.drain(..end);
        let body: &[u8] = if big_one { &big } else { b"hello\n" };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(body).await.is_err()
        {
            return;
        }
    }
}

async fn proxy(backend: SocketAddr, address: IpAddr, config: ProxyConfig, steer_from: Option<u32>) {
    // One instance, always ready, at a fixed backend: what the warm path looks like.
    let warm = Fake::new(Behaviour {
        backend: Backend::At(backend),
        addresses: Addresses::Fixed(address),
        ..Behaviour::default()
    });
    warm.add_service("bench", FakeService::one(PORT, revision(1)));
    let proxy = Proxy::new(config, warm);
    let summoned = proxy.summon("bench", &revision(1), None).expect("listen");
    // Steered: the deployer's kernel hand-off of a ready instance, here for the backend's
    // socket taken from its process; the proxy's listener stays behind it.
    let _steered = steer_from.map(|pid| {
        let socket = steer::listener_of(pid, backend).expect("the backend's socket");
        let steering = steer::Steering::open(16).expect("steering needs root");
        let fronts: Vec<SocketAddr> = summoned.addresses.with_port(summoned.port).collect();
        let steered = steering
            .steer(&fronts, None, 0, socket.as_fd())
            .expect("steer");
        (socket, steered)
    });
    println!("proxied {}:{}", summoned.addresses.primary(), summoned.port);
    std::future::pending::<()>().await;
}

async fn front(backend: SocketAddr, address: IpAddr, handoff: Option<std::path::PathBuf>) {
    let warm = Fake::new(Behaviour {
        backend: Backend::At(backend),
        ..Behaviour::default()
    });
    warm.add_service(
        "bench",
        FakeService {
            reach: Reach::Front,
            ..FakeService::one(PORT, revision(1))
        },
    );
    if let Some(path) = handoff {
        let socket = std::os::unix::net::UnixStream::connect(path).expect("the backend's socket");
        warm.set_handoff("bench", revboot_deployer::Handoff::from_fd(socket.into()));
    }
    let mut door = FrontConfig::new("revboot.test");
    door.http = Some(SocketAddr::new(address, 0));
    let proxy = Proxy::with_front(ProxyConfig::default(), door, warm).expect("front door");
    let at = proxy.front_addresses().http.expect("http");
    println!("front {at}");
    std::future::pending::<()>().await;
}

/// Connect, send one request, read the first byte of the answer; how long it took.
async fn first_byte(to: SocketAddr) -> std::time::Duration {
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: bench.revboot.test\r\n\r\n";
    let started = Instant::now();
    let mut stream = TcpStream::connect(to).await.expect("connect");
    let _ = stream.set_nodelay(true);
    stream.write_all(REQUEST).await.expect("send");
    let mut byte = [0u8; 1];
    let read = stream.read(&mut byte).await.expect("read");
    assert_eq!(read, 1, "an answer from {to}");
    started.elapsed()
}

async fn first_bytes(count: usize, direct: SocketAddr, front: SocketAddr) {
    let (mut straight, mut door) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..count {
        // Interleaved, so both sides see the same machine load.
        straight.push(first_byte(direct).await);
        door.push(first_byte(front).await);
    }
    let quantile = |samples: &mut Vec<std::time::Duration>, q: f64| {
        samples.sort();
        let at = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[at].as_secs_f64() * 1e6
    };
    let (d50, d99) = (quantile(&mut straight, 0.5), quantile(&mut straight, 0.99));
    let (f50, f99) = (quantile(&mut door, 0.5), quantile(&mut door, 0.99));
    println!("first byte of a new connection, {count} rounds (µs):");
    println!("  direct      p50 {d50:8.1}  p99 {d99:8.1}");
    println!("  front door  p50 {f50:8.1}  p99 {f99:8.1}");
    println!(
        "  front/direct p50 {:.2}x (+{:.1} µs)  p99 {:.2}x (+{:.1} µs)",
        f50 / d50,
        f50 - d50,
        f99 / d99,
        f99 - d99
    );
}

fn bind_cost(count: u32) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _inside = runtime.enter();
    let started = Instant::now();
    for n in 0..count {
        let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 66, 0, 1)) + n);
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket
            .bind(SocketAddr::new(IpAddr::V4(address), PORT))
            .expect("bind");
        drop(socket.listen(1024).expect("listen"));
    }
    let each = started.elapsed() / count;
    println!("bind+listen+close of one listener: {each:?} (mean of {count})");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = || tokio::runtime::Runtime::new().expect("runtime");
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["backend", rest @ ..] => runtime().block_on(backend(rest.first().map(Into::into))),
        [mode @ ("proxy" | "steer"), backend, address, rest @ ..] => {
            // `steer <backend> <address> <backend pid>`; `proxy <backend> <address> [options]`.
            let (steer_from, rest) = match *mode {
                "steer" => (
                    Some(
                        rest.first()
                            .expect("the backend's pid")
                            .parse()
                            .expect("a pid"),
                    ),
                    &[][..],
                ),
                _ => (None, rest),
            };
            let backend = backend.parse().expect("backend address");
            let address = address.parse().expect("service address");
            let mut config = ProxyConfig::default();
            if let Some(size) = rest.get(1) {
                config.splice_buffer = size.parse().expect("buffer size");
            }
            config.zero_copy = rest.get(2) == Some(&"zero");
            let runtime = match rest.first() {
                Some(&"current") => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime"),
                _ => runtime(),
            };
            runtime.block_on(proxy(backend, address, config, steer_from));
        }
        ["bind", count] => bind_cost(count.parse().expect("a count")),
        ["front", backend, address, rest @ ..] => runtime().block_on(front(
            backend.parse().expect("backend address"),
            address.parse().expect("front door address"),
            rest.first().map(Into::into),
        )),
        ["firstbyte", count, direct, front] => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(first_bytes(
                count.parse().expect("a count"),
                direct.parse().expect("direct address"),
                front.parse().expect("front door address"),
            ));
        }
        _ => {
            eprintln!(
                "usage: proxy_bench backend [hand-off path] | proxy <backend> <service ip> [multi|current] [buffer] [copy|zero] | steer <backend> <service ip> <backend pid> | bind <count> | front <backend> <front ip> [hand-off path] | firstbyte <count> <direct> <front>"
            );
            std::process::exit(2);
        }
    }
}
