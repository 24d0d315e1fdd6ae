//! `hello`: the smallest useful revboot service.
//!
//! 1. Take the listening socket from the systemd convention (`LISTEN_FDS=1`, `LISTEN_PID` =
//!    our pid, fd 3), as revboot's process tender passes it; otherwise bind `HELLO_ADDR`
//!    (default `127.0.0.1:8080`).
//! 2. Answer every HTTP request with `hello from <revision>`, where the revision is the
//!    `REVISION` constant below (edit it to tell revisions apart) and the deployment commit
//!    from `REVBOOT_REVISION` when revboot sets it.
//! 3. `GET /crash` exits with status 3, to exercise crash handling.
//! 4. Each request is one console line, `hello: <method> <path>`.
//! 5. `GET /echo` answers with a head, then sends back every byte the client sends after
//!    its request until the client ends its writing: a long transfer both ways.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;

/// Change this line to make a new revision.
const REVISION: &str = "v1";

/// Linux errno values (this image has no dependency, libc's crate included).
mod libc_errno {
    pub const EBADF: i32 = 9;
    pub const EINVAL: i32 = 22;
    pub const ENOTSOCK: i32 = 88;
}

fn listener() -> std::io::Result<TcpListener> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    if ours && std::env::var("LISTEN_FDS").as_deref() == Ok("1") {
        // SAFETY: by the LISTEN_FDS convention fd 3 is a listening socket handed to us and
        // owned by nothing else in this process.
        return Ok(unsafe { TcpListener::from_raw_fd(3) });
    }
    let addr = std::env::var("HELLO_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    TcpListener::bind(addr)
}

fn serve(stream: TcpStream, deployment: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("-");
    let path = words.next().unwrap_or("/");
    // Never println!: a console nobody reads any more (a closed stdout) must not stop the
    // answer.
    let _ = writeln!(std::io::stdout(), "hello: {method} {path}");
    if path == "/crash" {
        eprintln!("hello: crashing on request");
        std::process::exit(3);
    }
    if path == "/echo" {
        let mut stream = stream;
        stream.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")?;
        // What the reader took past the head first, then the rest as it comes (a plain
        // loop: std's copy may use splice(2), which the sandbox need not allow).
        stream.write_all(reader.buffer())?;
        let mut source = reader.into_inner();
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = source.read(&mut buffer)?;
            if read == 0 {
                return Ok(());
            }
            stream.write_all(&buffer[..read])?;
        }
    }
    let body = format!("hello from {REVISION} ({deployment})\n");
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-revision: {REVISION}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn main() {
    let deployment = std::env::var("REVBOOT_REVISION").unwrap_or_else(|_| "local".to_owned());
    let listener = match listener() {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("hello: cannot listen: {error}");
            std::process::exit(1);
        }
    };
    println!("hello {REVISION} ready");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(error) = serve(stream, &deployment) {
                    eprintln!("hello: {error}");
                }
            }
            // A listener that is gone or not one will never accept: say so once and end,
            // rather than spin writing the same line.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc_errno::EBADF | libc_errno::ENOTSOCK | libc_errno::EINVAL)
                ) =>
            {
                eprintln!("hello: accept: {error}; ending");
                std::process::exit(1);
            }
            Err(error) => eprintln!("hello: accept: {error}"),
        }
    }
}
