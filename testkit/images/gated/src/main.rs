//! `gated`: a test image that becomes ready when the test says so, not when it has started.
//!
//! It answers HTTP on the listening socket it inherits (fd 3, the `LISTEN_FDS` convention)
//! from the start. `GET /open` prints `gated open` on its console, the line its manifest
//! names as its readiness (`ready = { probe = "console", line = "gated open" }`), so a test
//! that sends it straight to the instance's backend address decides the moment of the
//! boot's end: whatever the machine's speed, what the test did before is done while the
//! instance is still booting. Every other request is answered `gated <path> (<revision>)`.
//! Connections are served on threads of their own (a bounded number), so one that sends
//! nothing keeps no other waiting.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

fn serve(stream: TcpStream, deployment: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    if path == "/open" {
        println!("gated open");
    }
    let body = format!("gated {path} ({deployment})\n");
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn main() {
    let deployment = std::env::var("REVBOOT_REVISION").unwrap_or_else(|_| "local".to_owned());
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    if !ours || std::env::var("LISTEN_FDS").as_deref() != Ok("1") {
        eprintln!("gated: no listening socket handed over (LISTEN_FDS)");
        std::process::exit(1);
    }
    // SAFETY: by the LISTEN_FDS convention fd 3 is a listening socket handed to us and owned
    // by nothing else in this process.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    let deployment: &'static str = Box::leak(deployment.into_boxed_str());
    // A connection that sends nothing must not keep `/open` waiting: each is served on a
    // thread of its own, up to THREADS at once, then in turn.
    const THREADS: usize = 16;
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("gated: accept: {error}");
                continue;
            }
        };
        let answer = move || {
            if let Err(error) = serve(stream, deployment) {
                eprintln!("gated: {error}");
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
