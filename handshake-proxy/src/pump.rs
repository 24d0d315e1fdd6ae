//! One direction of a spliced connection: copy small bursts, splice(2) bulk ones.
//!
//! 1. Read what the source has into a user-space buffer and write it all to the
//!    destination. Small request/response traffic costs one read and one write per burst
//!    and no extra descriptors.
//! 2. When a read fills the whole buffer (a bulk transfer) and zero-copy is on, take a pipe
//!    and move the rest of this direction with splice(2): socket → pipe → socket, the bytes
//!    never enter user space. Pipes are bounded (`max_pipes`, a semaphore): without a pipe
//!    to spare (the bound reached, or out of descriptors), keep copying. The pipe is empty
//!    between calls (each fill is drained before the next read), so it holds at most
//!    `PIPE_SIZE` bytes in flight, and it is closed with its direction.
//! 3. Zero bytes read is EOF: shut down writing on the destination and end this direction;
//!    the other direction goes on (half-close).
//! 4. Every call is non-blocking; waits are on tokio's readiness (`readable`/`writable`
//!    then `try_*`), never a sleep.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::debug;

use crate::clock::Clock;

/// Largest amount moved by one splice call: a pipe's worth.
const CHUNK: usize = PIPE_SIZE as usize;
/// The pipe size asked for: what one pipe may hold in flight. 1 MiB pipes (the unprivileged
/// maximum) moved 1 MiB bodies no faster than 256 KiB ones (`bench/proxy.sh`: the relay's
/// CPU per request is the kernel's TCP work either way) and hold four times the memory.
const PIPE_SIZE: i32 = 256 * 1024;

/// A non-blocking pipe, counted against the proxy's bound while it is open.
#[derive(Debug)]
struct Pipe<'a> {
    read: OwnedFd,
    write: OwnedFd,
    _permit: SemaphorePermit<'a>,
}

impl<'a> Pipe<'a> {
    /// A pipe, if the bound and the descriptor table allow one.
    fn new(pipes: &'a Semaphore) -> Option<Pipe<'a>> {
        let Ok(permit) = pipes.try_acquire() else {
            debug!("every pipe is in use; copying");
            return None;
        };
        let (read, write) = match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok(ends) => ends,
            Err(error) => {
                debug!(%error, "no pipe for splice(2); copying");
                return None;
            }
        };
        // A bigger pipe moves more per call; the default (64 KiB) is kept when refused.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Some(Pipe {
            read,
            write,
            _permit: permit,
        })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Shuts down writing on `stream` (the peer reads EOF).
pub(crate) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    Ok(shutdown(stream.as_raw_fd(), Shutdown::Write)?)
}

/// How one direction moves bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mode<'a> {
    /// The user-space buffer size.
    pub(crate) buffer: usize,
    /// Where pipes come from, when a bulk transfer switches to splice(2); `None` copies.
    pub(crate) pipes: Option<&'a Semaphore>,
}

/// Moves `from` → `to` until EOF on `from`, then shuts down writing on `to`. The halves'
/// `AsyncRead`/`AsyncWrite` are used for copying: a short read clears the readiness, so a
/// burst costs one read and no extra `EAGAIN` read.
pub(crate) async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mode: Mode<'_>,
    clock: &Clock,
    bytes: &AtomicU64,
) -> io::Result<()> {
    let mut buffer = vec![0u8; mode.buffer.max(1)];
    let mut pipe: Option<Pipe<'_>> = None;
    loop {
        let moved = match &pipe {
            Some(pipe) => splice_once(from.as_ref(), to.as_ref(), pipe).await?,
            None => {
                let read = from.read(&mut buffer).await?;
                to.write_all(&buffer[..read]).await?;
                if read == buffer.len()
                    && let Some(pipes) = mode.pipes
                {
                    pipe = Pipe::new(pipes);
                }
                read
            }
        };
        if moved == 0 {
            return to.shutdown().await;
        }
        clock.touch();
        bytes.fetch_add(moved as u64, Ordering::Relaxed);
    }
}

/// One splice into the (empty) pipe and out of it until it is empty again; the bytes moved
/// (0 at EOF).
async fn splice_once(from: &TcpStream, to: &TcpStream, pipe: &Pipe<'_>) -> io::Result<usize> {
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
    Ok(filled)
}
