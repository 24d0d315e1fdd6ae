//! Connections handed to their instance: the relay is off the data path.
//!
//! For a revision whose manifest says `[run] handoff = true` (the process tender gives the
//! instance a hand-off socket, `revboot_deployer::handoff`), the front door reads the head
//! it routes by with `MSG_PEEK`, so the connection is still untouched when it is ready to
//! go; a connection the proxy's own listener accepts (one made before the boot began, or
//! any with steering off) has nothing read of it either:
//!
//! 1. Held while the instance boots like any other connection (counted, bounded, within
//!    `boot_timeout`), but nothing is read meanwhile: the kernel's queue keeps the bytes.
//! 2. Once the instance is ready, the connection's descriptor goes to the instance's
//!    hand-off socket ([`hand_over`]), blocking as accept(2) would give it, without
//!    waiting, and the proxy closes its own copy.
//!    A socket that refuses it (full: the instance does not receive; closed: it exited)
//!    is logged and counted (`handoff_failures`), and the connection is relayed instead,
//!    a front door's head consumed then and replayed, as for other services.
//! 3. A handed connection stays counted as open (`open_now`, so `max_connections` bounds
//!    it; `ConnectionOpened` until it closes, so idle reaping waits for it): every
//!    [`CHECK`] the kernel is asked whether the connection between its two ends is still
//!    open (`sock_diag`, [`revboot_deployer::handoff::connection_open`]), and once it is
//!    not, or the kernel cannot say, it counts as closed. Asking the kernel rather than the
//!    instance keeps the convention a one-way one, and an instance cannot keep itself
//!    alive, or get reaped, by what it claims.
//!
//! What a handed connection loses is what the relay gave: the proxy's byte counters, its
//! idle and total timeouts (it is the instance's own, as a steered connection is).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use revboot_deployer::{Handoff, InstanceKey};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::metrics::bump;
use crate::relays::{HandedConnection, MAX_HANDED_CONNECTIONS};
use crate::shared::Shared;

/// How often the kernel is asked whether a handed connection is still open.
pub const CHECK: Duration = Duration::from_secs(1);

/// Step 2: hands `client` to `handoff` (the instance of `key`'s socket, if it has one).
/// Not handed, the connection comes back with its first `peeked` bytes consumed, to be
/// relayed; `Err(None)` when it could not even be kept (it is closed then).
pub(crate) async fn hand_over(
    shared: &Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    key: &InstanceKey,
    handoff: Option<Handoff>,
    peeked: usize,
) -> Result<HandedConnection, Option<TcpStream>> {
    let kept = match handoff {
        Some(handoff) => match send(shared, client, peer, key, &handoff) {
            Ok(handed) => return Ok(handed),
            Err(kept) => kept,
        },
        // A summon renewed the instance to one without a hand-off socket (one whose socket
        // could not be kept at an upgrade in place): relayed.
        None => Some(client),
    };
    let client = kept.ok_or(None)?;
    match crate::sniff::consume(client, peeked).await {
        Ok(client) => Err(Some(client)),
        Err(error) => {
            debug!(%error, %peer, %key, "connection lost before it was relayed");
            Err(None)
        }
    }
}

/// Step 2's send; the connection back (as a tokio stream again) when it was not handed.
fn send(
    shared: &Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    key: &InstanceKey,
    handoff: &Handoff,
) -> Result<HandedConnection, Option<TcpStream>> {
    let lost = |error: std::io::Error| {
        debug!(%error, %peer, %key, "connection lost before it was handed over");
        None
    };
    let local = client.local_addr().map_err(lost)?;
    let client = client.into_std().map_err(lost)?;
    // The instance gets the socket as accept(2) would give it, blocking: the descriptor it
    // receives shares the file description, and so its flags, with ours.
    client.set_nonblocking(false).map_err(lost)?;
    match handoff.send(client.as_fd()) {
        Ok(()) => {
            drop(client);
            bump(&shared.metrics.handed_off);
            debug!(%peer, %key, "connection handed to its instance");
            Ok(HandedConnection {
                local,
                peer,
                key: key.clone(),
            })
        }
        Err(error) => {
            bump(&shared.metrics.handoff_failures);
            warn!(%error, %peer, %key, "the instance took no hand-off; connection relayed");
            let client = client
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(client));
            Err(client.ok())
        }
    }
}

/// Step 3: keeps `open` (the connection's guard: counted open while held) until the kernel
/// says the handed connection has closed, or the proxy shuts down; at an upgrade in place
/// (step 4) the connection is kept for the next daemon instead.
pub(crate) async fn watch<Guard>(shared: &Shared, open: Guard, handed: HandedConnection) {
    let HandedConnection { local, peer, key } = &handed;
    let (local, peer) = (*local, *peer);
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = shared.pause.cancelled() => {
                keep(shared, handed);
                return;
            }
            () = tokio::time::sleep(CHECK) => {}
        }
        let asked = tokio::task::spawn_blocking(move || {
            revboot_deployer::handoff::connection_open(local, peer)
        })
        .await
        // A task that could not run (it panicked, the runtime is ending) is a failure too.
        .map_err(std::io::Error::other)
        .and_then(|open| open);
        match asked {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => {
                warn!(%error, %peer, %key, "cannot ask whether a handed connection is open; counted closed");
                break;
            }
        }
    }
    debug!(%peer, %key, "handed connection closed");
    drop(open);
}

/// Step 4: keeps `handed` for the next daemon, within [`MAX_HANDED_CONNECTIONS`].
fn keep(shared: &Shared, handed: HandedConnection) {
    let mut kept = shared
        .handed_connections
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if kept.len() >= MAX_HANDED_CONNECTIONS {
        warn!(peer = %handed.peer, key = %handed.key, kept = kept.len(),
            "too many handed connections to hand over; the next daemon does not count this one open");
        return;
    }
    kept.push(handed);
}
