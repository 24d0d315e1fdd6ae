//! UDP worker threads: NSD's model, one read and one write system call per query.
//!
//! 1. `udp_workers` threads share one socket with blocking reads (no wake-up machinery);
//!    each reads a packet, answers it and sends the answer before reading the next, so at
//!    most `udp_workers` packets are being worked on (plus at most `max_delayed` delayed
//!    answers, which wait on the tokio runtime); the rest wait in the kernel's socket
//!    buffer, which drops when full.
//! 2. A worker looks for a shutdown between reads (the socket's read timeout bounds the
//!    wait) and tells the server when it ends by panicking.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use revboot_deployer::LaunchScope;
use tokio::sync::watch;
use tracing::debug;

use crate::metrics::Event;
use crate::packet::{Delayed, Scratch, Shared, Step, Transport};
use crate::wire::MAX_MESSAGE;

/// Tells `run` that a worker thread ended (on panic, while unwinding).
pub(crate) struct Exited(pub(crate) tokio::sync::mpsc::Sender<bool>);

impl Drop for Exited {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.try_send(true);
        }
    }
}

/// One UDP worker thread.
pub(crate) struct UdpWorker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) socket: Arc<std::net::UdpSocket>,
    pub(crate) halt: Arc<AtomicBool>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) _exited: Exited,
}

impl UdpWorker {
    pub(crate) fn run(self) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut scratch = Scratch::default();
        while !self.halt.load(Ordering::Acquire) {
            let (len, from) = match self.socket.recv_from(&mut buf) {
                Ok(received) => received,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(error) => {
                    debug!(%error, "UDP receive failed");
                    continue;
                }
            };
            // A boot this query starts is launched after the answer is sent (see
            // `LaunchScope`): its wake-ups cannot delay the answer.
            let scope = LaunchScope::open();
            match self
                .shared
                .handle(&buf[..len], from.ip(), Transport::Udp, &mut scratch)
            {
                Step::Send => send_udp(&self.socket, &scratch.out, from),
                Step::Nothing => {}
                Step::Delay(delayed) => self.delay(delayed, from),
            }
            drop(scope);
        }
    }

    /// Hands a delayed answer to the runtime, if one more may wait.
    fn delay(&self, delayed: Delayed, from: SocketAddr) {
        let Ok(permit) = self.shared.delayed.clone().try_acquire_owned() else {
            self.shared.metrics.event(Event::OverloadDropped);
            return;
        };
        let (shared, socket, mut stop) =
            (self.shared.clone(), self.socket.clone(), self.stop.clone());
        self.runtime.spawn(async move {
            let _permit = permit;
            let mut out = Vec::new();
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => {}
                () = shared.settle(&delayed, Transport::Udp, &mut out) => {
                    // A UDP send does not block unless the send buffer is full, and then
                    // only for the socket's (short) drain.
                    send_udp(&socket, &out, from);
                }
            }
        });
    }
}

fn send_udp(socket: &std::net::UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(error) = socket.send_to(bytes, to) {
        debug!(%error, %to, "UDP send failed");
    }
}
