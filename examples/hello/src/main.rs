//! `hello`: the smallest useful revboot service.
//!
//! 1. Take the listening socket from the systemd convention (`LISTEN_FDS=1`, `LISTEN_PID` =
//!    our pid, fd 3), as revboot's process tender passes it; otherwise bind `HELLO_ADDR`
//!    (default `127.0.0.1:8080`).
//! 2. Answer every HTTP request with `hello from <revision>`, where the revision is the
//!    `REVISION` constant below (edit it to tell revisions apart) and the deployment commit
//!    from `REVBOOT_REVISION` when revboot sets it.
//!    A request body (`content-length`, at most 64 KiB) is read whole before the answer.
//!    The header `x-instance` names the instance that answered (`REVBOOT_INSTANCE`, its
//!    cgroup's name), which tells a warm service's replicas apart.
//! 3. `GET /crash` exits with status 3, to exercise crash handling.
//! 4. Each request is one console line, `hello: <method> <path>`.
//! 5. `GET /echo` answers with a head, then sends back every byte the client sends after
//!    its request until the client ends its writing: a long transfer both ways.
//! 6. With `REVBOOT_HANDOFF_FD` set (the manifest's `handoff = true`), a second thread
//!    receives the connections revboot's front door hands over on that Unix socket (one
//!    byte, one descriptor as `SCM_RIGHTS`, the request still unread) and serves them like
//!    accepted ones: no relay carries their bytes. The listener keeps serving the rest.

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
    let mut body_length = 0usize;
    while reader.read_line(&mut header)? > 2 {
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            body_length = value.trim().parse().unwrap_or(0);
        }
        header.clear();
    }
    // A request's body is read whole (at most 64 KiB) before the answer.
    let mut body = vec![0u8; body_length.min(64 * 1024)];
    std::io::Read::read_exact(&mut reader, &mut body)?;
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
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-revision: {REVISION}\r\nx-instance: {}\r\n\r\n{body}",
        body.len(),
        instance()
    )?;
    stream.flush()
}

/// This instance's id, as revboot names it (`local` outside revboot).
fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| std::env::var("REVBOOT_INSTANCE").unwrap_or_else(|_| "local".to_owned()))
}

/// `recvmsg(2)` for one descriptor, written out by hand: this image has no dependency.
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
                return Ok(Some(unsafe { std::net::TcpStream::from_raw_fd(control.fds[0]) }));
            }
            // A byte without a descriptor: nothing to serve; wait for the next one.
        }
    }
}

/// Step 5: serves the connections handed over on `fd` until the daemon closes its end.
fn receive_handed(fd: i32, deployment: String) {
    loop {
        match handoff::receive(fd) {
            Ok(Some(stream)) => {
                if let Err(error) = serve(stream, &deployment) {
                    eprintln!("hello: {error}");
                }
            }
            Ok(None) => return,
            Err(error) => {
                eprintln!("hello: receiving a handed connection: {error}; ending that loop");
                return;
            }
        }
    }
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
    if let Some(fd) = std::env::var("REVBOOT_HANDOFF_FD")
        .ok()
        .and_then(|fd| fd.parse::<i32>().ok())
    {
        let deployment = deployment.clone();
        if let Err(error) = std::thread::Builder::new()
            .name("handoff".into())
            .spawn(move || receive_handed(fd, deployment))
        {
            eprintln!("hello: cannot receive handed connections: {error}");
        }
    }
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
