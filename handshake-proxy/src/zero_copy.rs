//! The zero-copy splice: socket → pipe → socket with splice(2), bytes never enter user space.
//!
//! 1. Each direction owns a pipe. When the pipe is empty, splice from the source socket into
//!    it (as much as the socket has, up to the pipe's size); zero bytes means EOF: shut down
//!    writing on the destination and end this direction.
//! 2. Otherwise splice from the pipe into the destination socket until the pipe is empty.
//! 3. Both calls are non-blocking; readiness comes from tokio (`readable`/`writable` +
//!    `try_io`), so a direction waits on the reactor, never on a sleep.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::splice::Clock;

/// Largest amount moved by one splice call.
const CHUNK: usize = 1 << 20;
/// The pipe size asked for (the unprivileged maximum, `/proc/sys/fs/pipe-max-size`).
const PIPE_SIZE: i32 = 1 << 20;

/// A pipe for one direction.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe, or the error (typically out of descriptors).
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A bigger pipe moves more per call; the default (64 KiB) is kept when refused.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Pipe { read, write })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves `from` → `to` until EOF on `from`, then shuts down writing on `to`.
/// Shuts down writing on `stream`.
pub(crate) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    Ok(shutdown(stream.as_raw_fd(), Shutdown::Write)?)
}

pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    clock: &Clock,
    bytes: &AtomicU64,
) -> io::Result<()> {
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.write, None, CHUNK, flags()).map_err(io::Error::from)
            }) {
                Ok(filled) => break filled,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        };
        if filled == 0 {
            shutdown(to.as_raw_fd(), Shutdown::Write)?;
            return Ok(());
        }
        clock.touch();
        bytes.fetch_add(filled as u64, Ordering::Relaxed);
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, to, None, left, flags()).map_err(io::Error::from)
            }) {
                Ok(moved) => left -= moved,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }
}
