//! Handing accepted connections to an instance: no relay on the data path.
//!
//! A process instance whose manifest says `[run] handoff = true` gets, besides its
//! listening socket (fd 3), one end of a Unix stream socket pair, its number in
//! `REVBOOT_HANDOFF_FD`. The daemon keeps the other end ([`Handoff`]) for as long as the
//! instance lives. The convention:
//!
//! 1. The front door reads the name a connection is for without consuming a byte
//!    (`MSG_PEEK`), so the socket it hands over is untouched.
//! 2. Once the instance is ready, it sends one message per connection: one byte (`c`) with
//!    the connection's descriptor as `SCM_RIGHTS`, and closes its own copy. The instance
//!    receives it (`recvmsg`, one descriptor per byte) and serves it as if it had accepted
//!    it: the request head is the first thing it reads.
//! 3. Sending never waits: a socket whose queue is full (an instance that does not receive),
//!    or gone (it exited), is an error ([`HandoffError`]) and the caller relays the
//!    connection instead. The queue is bounded by the daemon end's send buffer
//!    ([`SEND_BUFFER`]), so an instance that never receives holds at most a few hundred
//!    connections in flight, all closed by the kernel when the instance ends. The daemon
//!    never reads its end: what an instance writes there only fills that end's buffer.
//! 4. The daemon learns that a handed connection has closed from the kernel
//!    ([`connection_open`], a `sock_diag` query for its two ends), so idle reaping and the
//!    connection bounds see it as long as the instance keeps it open.
//!
//! 5. At an upgrade in place the daemon end goes to the next daemon with the instance (a
//!    descriptor kept across the exec, [`Handoff::try_clone_fd`]), which hands on through
//!    it; the proxy hands over the connections it watches, so they still count open there.
//!
//! Limits: connections reach the instance only through the front door's hand-off.

use std::io;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, setsockopt, socketpair,
    sockopt,
};

/// The environment variable that names the instance's end.
pub const HANDOFF_ENV: &str = "REVBOOT_HANDOFF_FD";
/// The send buffer of the daemon's end: what bounds the connections in flight to an
/// instance that does not receive them (each message takes under a kilobyte of it).
pub const SEND_BUFFER: usize = 256 * 1024;

/// The daemon's end of an instance's hand-off socket; clones share it.
#[derive(Debug, Clone)]
pub struct Handoff(Arc<OwnedFd>);

/// Why a connection was not handed over (nothing was sent; the caller still owns it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    /// The instance does not receive: its queue is full.
    #[error("The instance's hand-off queue is full")]
    Full,
    /// The instance's end is closed (it exited).
    #[error("The instance's hand-off socket is closed")]
    Closed,
    /// Any other failure of the send.
    #[error("Cannot hand the connection over")]
    Io(#[source] io::Error),
}

impl Handoff {
    /// A new socket pair: the daemon's end, and the instance's (blocking, close-on-exec
    /// until it is placed in the child).
    pub fn pair() -> io::Result<(Handoff, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        setsockopt(&ours, sockopt::SndBuf, &SEND_BUFFER)?;
        Ok((Handoff(Arc::new(ours)), theirs))
    }

    /// The daemon's end from a connected Unix stream socket (a stand-in instance's, in
    /// benchmarks and tests).
    pub fn from_fd(fd: OwnedFd) -> Handoff {
        Handoff(Arc::new(fd))
    }

    /// A second descriptor of the daemon's end (close-on-exec), to hand it to the next
    /// daemon at an upgrade in place (step 5).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }

    /// Sends `connection` to the instance (step 2), without waiting (step 3).
    pub fn send(&self, connection: BorrowedFd<'_>) -> Result<(), HandoffError> {
        let fds = [connection.as_raw_fd()];
        let control = [ControlMessage::ScmRights(&fds)];
        let byte = [IoSlice::new(b"c")];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match sendmsg::<()>(self.0.as_fd().as_raw_fd(), &byte, &control, flags, None) {
            Ok(1) => Ok(()),
            Ok(_) => Err(HandoffError::Io(io::Error::other("a short send"))),
            Err(nix::errno::Errno::EAGAIN) => Err(HandoffError::Full),
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                Err(HandoffError::Closed)
            }
            Err(errno) => Err(HandoffError::Io(errno.into())),
        }
    }
}

/// True while a TCP connection between `local` and `peer` is open on this host (step 4):
/// established, or closing with a peer still attached; false once it is gone or in
/// `TIME_WAIT`. One exact `sock_diag` lookup (no dump): a blocking netlink exchange of at
/// most a second.
pub fn connection_open(local: SocketAddr, peer: SocketAddr) -> io::Result<bool> {
    crate::conntrack::open_between(local, peer)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use nix::sys::socket::{ControlMessageOwned, recvmsg};

    use super::*;

    /// The instance's side of step 2, as `examples/hello` does it.
    #[allow(unsafe_code)] // Taking ownership of the descriptor the kernel just gave us.
    fn receive(theirs: &OwnedFd) -> TcpStream {
        use std::os::fd::FromRawFd;
        let mut byte = [0u8; 1];
        let mut slices = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let message = recvmsg::<()>(
            theirs.as_raw_fd(),
            &mut slices,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("recvmsg");
        for control in message.cmsgs().expect("cmsgs") {
            if let ControlMessageOwned::ScmRights(fds) = control {
                // SAFETY: received with SCM_RIGHTS, so a new descriptor nothing else owns.
                return unsafe { TcpStream::from_raw_fd(fds[0]) };
            }
        }
        panic!("no descriptor received");
    }

    #[test]
    fn a_connection_handed_over_is_served_by_the_receiver_and_counted_until_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let local = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(local).expect("connect");
        let (accepted, peer) = listener.accept().expect("accept");
        client.write_all(b"ping").expect("write");
        let (handoff, theirs) = Handoff::pair().expect("pair");
        handoff.send(accepted.as_fd()).expect("sent");
        drop(accepted);
        assert!(
            connection_open(local, peer).expect("sock_diag"),
            "still open"
        );
        let mut served = receive(&theirs);
        let mut ping = [0u8; 4];
        served.read_exact(&mut ping).expect("the untouched bytes");
        assert_eq!(&ping, b"ping");
        served.write_all(b"pong").expect("answer");
        drop(served);
        let mut pong = Vec::new();
        client.read_to_end(&mut pong).expect("read");
        assert_eq!(pong, b"pong");
        drop(client);
        // Both ends closed: gone from the open states once loopback has carried the FINs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while connection_open(local, peer).expect("sock_diag") {
            assert!(std::time::Instant::now() < deadline, "still open");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn an_instance_gone_or_not_receiving_is_an_error_not_a_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let local = listener.local_addr().expect("address");
        let _client = TcpStream::connect(local).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let (handoff, theirs) = Handoff::pair().expect("pair");
        let mut sent = 0;
        let full = loop {
            match handoff.send(accepted.as_fd()) {
                Ok(()) => sent += 1,
                Err(error) => break error,
            }
            assert!(sent < 100_000, "never full");
        };
        assert!(matches!(full, HandoffError::Full), "{full:?}");
        assert!(sent > 16, "{sent} in flight");
        drop(theirs);
        let closed = handoff.send(accepted.as_fd()).expect_err("closed");
        assert!(matches!(closed, HandoffError::Closed), "{closed:?}");
    }
}
