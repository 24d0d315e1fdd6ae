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
//! 5. What a direction has read and not yet written lives in its [`Flow`], outside the
//!    pump's future, and every await is cancel-safe: a pump dropped at an upgrade in place
//!    leaves those bytes (the pipe emptied into them) to hand over, and a pump started on a
//!    resumed flow writes them first.

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

/// One direction's bytes in flight and whether it ended, kept outside its [`pump`] so that
/// a pump dropped at an upgrade in place (rule 5) leaves them here.
#[derive(Debug, Default)]
pub(crate) struct Flow<'a> {
    /// `buffer[written..filled]` was read from the source and not yet written.
    buffer: Vec<u8>,
    written: usize,
    filled: usize,
    /// The pipe of a bulk transfer, and how many bytes it holds.
    pipe: Option<Pipe<'a>>,
    in_pipe: usize,
    /// EOF was read and writing on the destination shut down.
    pub(crate) done: bool,
}

impl Flow<'_> {
    /// A direction that goes on: `pending` is written before anything is read.
    pub(crate) fn resumed(pending: Vec<u8>, done: bool) -> Flow<'static> {
        Flow {
            filled: pending.len(),
            buffer: pending,
            done,
            ..Flow::default()
        }
    }

    /// The bytes read and not yet written (the pipe emptied into them); the pipe is given
    /// back.
    pub(crate) fn take_pending(&mut self) -> io::Result<Vec<u8>> {
        let mut pending = self.buffer[self.written..self.filled].to_vec();
        self.written = self.filled;
        if let Some(pipe) = self.pipe.take() {
            let start = pending.len();
            pending.resize(start + self.in_pipe, 0);
            let mut at = start;
            // The pipe holds them already: each read returns at once.
            while at < pending.len() {
                match nix::unistd::read(&pipe.read, &mut pending[at..]) {
                    Ok(0) => break,
                    Ok(read) => at += read,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            pending.truncate(at);
            self.in_pipe = 0;
        }
        Ok(pending)
    }
}

/// Moves `from` → `to` until EOF on `from`, then shuts down writing on `to`. The halves'
/// `AsyncRead`/`AsyncWrite` are used for copying: a short read clears the readiness, so a
/// burst costs one read and no extra `EAGAIN` read. What is in flight lives in `flow`
/// between awaits (rule 5): every await here is cancel-safe, so dropping the pump loses no
/// byte.
pub(crate) async fn pump<'a>(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mode: Mode<'a>,
    clock: &Clock,
    bytes: &AtomicU64,
    flow: &mut Flow<'a>,
) -> io::Result<()> {
    if flow.done {
        return Ok(());
    }
    let size = mode.buffer.max(1);
    if flow.buffer.len() < size {
        flow.buffer.resize(size, 0);
    }
    loop {
        while flow.written < flow.filled {
            let wrote = to.write(&flow.buffer[flow.written..flow.filled]).await?;
            if wrote == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            flow.written += wrote;
        }
        if let Some(pipe) = &flow.pipe {
            drain(to.as_ref(), pipe, &mut flow.in_pipe).await?;
        }
        let moved = match &flow.pipe {
            Some(pipe) => {
                flow.in_pipe = fill(from.as_ref(), pipe).await?;
                flow.in_pipe
            }
            None => {
                let read = from.read(&mut flow.buffer).await?;
                (flow.written, flow.filled) = (0, read);
                if read == flow.buffer.len()
                    && let Some(pipes) = mode.pipes
                {
                    flow.pipe = Pipe::new(pipes);
                }
                read
            }
        };
        if moved == 0 {
            to.shutdown().await?;
            flow.done = true;
            return Ok(());
        }
        clock.touch();
        bytes.fetch_add(moved as u64, Ordering::Relaxed);
    }
}

/// One splice from `from` into the (empty) pipe; the bytes moved (0 at EOF). Cancel-safe:
/// the splice and the answer happen in one poll.
async fn fill(from: &TcpStream, pipe: &Pipe<'_>) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || {
            splice(from, None, &pipe.write, None, CHUNK, flags()).map_err(io::Error::from)
        }) {
            Ok(filled) => return Ok(filled),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Splices the pipe's `left` bytes out to `to`, counting them down as they go.
async fn drain(to: &TcpStream, pipe: &Pipe<'_>, left: &mut usize) -> io::Result<()> {
    while *left > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice(&pipe.read, None, to, None, *left, flags()).map_err(io::Error::from)
        }) {
            Ok(moved) => *left -= moved,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
