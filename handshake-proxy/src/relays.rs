//! Relayed connections paused at an upgrade in place and kept for the next daemon (the
//! `handover` module, rule 2), within bounds, with the connections held while their
//! instance boots; and what the next daemon is told of the connections handed to instances
//! (the `handoff` module, step 4).

use std::net::SocketAddr;

use revboot_deployer::InstanceKey;
use tracing::warn;

use crate::records::TlsSession;
use crate::splice::Paused;

/// Relayed and held connections handed over at most (two descriptors or one each).
pub const MAX_RELAYS: usize = 4096;
/// Bytes in flight handed over at most, over all relayed and held connections.
pub const MAX_RELAY_BYTES: usize = 64 << 20;

/// A relayed connection handed to the next daemon: its sockets, its instance, the bytes
/// it had in flight.
#[derive(Debug)]
pub struct HandedRelay {
    /// The client's socket.
    pub client: std::net::TcpStream,
    /// The instance's socket.
    pub backend: std::net::TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The instance it is relayed to.
    pub key: InstanceKey,
    /// Bytes read from the client and not yet written to the instance.
    pub to_backend: Vec<u8>,
    /// Bytes read from the instance and not yet written to the client.
    pub to_client: Vec<u8>,
    /// The client ended its writing (and the instance's side was shut down).
    pub client_done: bool,
    /// The instance ended its writing (and the client's side was shut down).
    pub backend_done: bool,
    /// The TLS session the front door ended (`tls = "terminate"`), carried on by the next
    /// daemon's record layer; then `to_backend` is plaintext and `to_client` records ready
    /// to write (the `tls_relay` module, rule 3).
    pub tls: Option<TlsSession>,
}

/// What a connection is told, if anything, when its instance cannot serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Nothing: it is closed (the proxy's own listeners).
    Close,
    /// The front door's HTTP 503.
    Http,
    /// The front door's TLS alert.
    Tls,
}

/// A connection held while its instance booted, handed to the next daemon (the `handover`
/// module, rule 2): its socket, its instance, what was read of it. The next daemon holds it
/// again until the instance serves ([`Proxy::adopt_held`](crate::Proxy::adopt_held)).
#[derive(Debug)]
pub struct HandedHeld {
    /// The client's socket.
    pub client: std::net::TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The instance it waits for.
    pub key: InstanceKey,
    /// Bytes the client sent already: read from it (the front door's head, early bytes),
    /// or only peeked at when `peeked`.
    pub early: Vec<u8>,
    /// `early` is still queued in the socket (the front door peeked at it, for an instance
    /// that takes hand-offs).
    pub peeked: bool,
    /// The client ended its writing.
    pub client_done: bool,
    /// What it is told if its instance fails.
    pub failure: Failure,
}

/// The relays paused so far, the held connections, and the bytes they hold.
#[derive(Debug, Default)]
pub(crate) struct Relays {
    list: Vec<HandedRelay>,
    held: Vec<HandedHeld>,
    bytes: usize,
    /// How many of `list` carry a TLS session.
    tls: usize,
}

impl Relays {
    /// How many are kept.
    fn len(&self) -> usize {
        self.list.len() + self.held.len()
    }

    /// How many relays, of them with a TLS session, and held connections are kept.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (self.list.len(), self.tls, self.held.len())
    }

    /// The relays kept, given up (the bound on bytes stays counted: nothing is kept after).
    pub(crate) fn take(&mut self) -> Vec<HandedRelay> {
        std::mem::take(&mut self.list)
    }

    /// The held connections kept, given up (as [`Relays::take`]).
    pub(crate) fn take_held(&mut self) -> Vec<HandedHeld> {
        std::mem::take(&mut self.held)
    }

    /// Whether one more connection holding `bytes` is over a bound.
    fn full(&self, bytes: usize) -> bool {
        self.len() >= MAX_RELAYS || self.bytes + bytes > MAX_RELAY_BYTES
    }

    /// Keeps a held connection for the next daemon, or gives it back (`Some`) when over a
    /// bound.
    pub(crate) fn keep_held(&mut self, held: HandedHeld) -> Option<HandedHeld> {
        if self.full(held.early.len()) {
            warn!(peer = %held.peer, key = %held.key, kept = self.len(), bytes = self.bytes,
                "too many connections to hand over; this held one stays with this program");
            return Some(held);
        }
        self.bytes += held.early.len();
        self.held.push(held);
        None
    }

    /// Whether one more relay holding `bytes` is within the bounds.
    pub(crate) fn has_room(&self, bytes: usize) -> bool {
        !self.full(bytes)
    }

    /// Keeps a paused relay for the next daemon, or gives it back (`Some`) when over a
    /// bound.
    pub(crate) fn keep(
        &mut self,
        paused: Paused,
        peer: SocketAddr,
        key: &InstanceKey,
    ) -> Option<Paused> {
        let bytes = paused.resume.up.len() + paused.resume.down.len();
        if self.full(bytes) {
            warn!(%peer, %key, relays = self.list.len(), bytes = self.bytes,
                "too many relayed connections to hand over; this one ends with this program");
            return Some(paused);
        }
        self.push(paused, None, peer, key);
        None
    }

    /// Keeps a paused relay and its TLS session, its room checked already
    /// ([`Relays::has_room`], under the same lock).
    pub(crate) fn keep_tls(
        &mut self,
        paused: Paused,
        session: TlsSession,
        peer: SocketAddr,
        key: &InstanceKey,
    ) {
        self.push(paused, Some(session), peer, key);
    }

    /// Keeps a relay carried on with its TLS session, or gives it back (`Some`) when over a
    /// bound.
    pub(crate) fn keep_resumed(
        &mut self,
        paused: Paused,
        session: TlsSession,
        peer: SocketAddr,
        key: &InstanceKey,
    ) -> Option<(Paused, TlsSession)> {
        let bytes = paused.resume.up.len() + paused.resume.down.len();
        if self.full(bytes + session.opener.incoming.len()) {
            warn!(%peer, %key, relays = self.list.len(), bytes = self.bytes,
                "too many relayed connections to hand over; this TLS one ends with this program");
            return Some((paused, session));
        }
        self.push(paused, Some(session), peer, key);
        None
    }

    fn push(
        &mut self,
        paused: Paused,
        tls: Option<TlsSession>,
        peer: SocketAddr,
        key: &InstanceKey,
    ) {
        let (client, backend) = match (paused.client.into_std(), paused.backend.into_std()) {
            (Ok(client), Ok(backend)) => (client, backend),
            (client, backend) => {
                let error = client.err().or(backend.err());
                warn!(%peer, %key, ?error, "cannot hand a relayed connection over; closed");
                return;
            }
        };
        self.bytes += paused.resume.up.len() + paused.resume.down.len();
        self.tls += usize::from(tls.is_some());
        self.list.push(HandedRelay {
            client,
            backend,
            peer,
            key: key.clone(),
            to_backend: paused.resume.up,
            to_client: paused.resume.down,
            client_done: paused.resume.up_done,
            backend_done: paused.resume.down_done,
            tls,
        });
    }
}

/// Handed connections given to the next daemon at most (step 4): each costs a line of its
/// state file.
pub const MAX_HANDED_CONNECTIONS: usize = 16384;

/// A connection handed to its instance: its two ends, to ask the kernel about, and its
/// instance (step 4: what goes to the next daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedConnection {
    /// The connection's local end (the address the client connected to).
    pub local: SocketAddr,
    /// The client's end.
    pub peer: SocketAddr,
    /// The instance it was handed to.
    pub key: InstanceKey,
}
