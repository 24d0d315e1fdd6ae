//! Relayed connections paused at an upgrade in place and kept for the next daemon (the
//! `handover` module, rule 2), within bounds; and what the next daemon is told of the
//! connections handed to instances (the `handoff` module, step 4).

use std::net::SocketAddr;

use revboot_deployer::InstanceKey;
use tracing::warn;

use crate::splice::Paused;

/// Relayed connections handed over at most (two descriptors each).
pub const MAX_RELAYS: usize = 4096;
/// Bytes in flight handed over at most, over all relayed connections.
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
}

/// The relays paused so far, and the bytes they hold.
#[derive(Debug, Default)]
pub(crate) struct Relays {
    list: Vec<HandedRelay>,
    bytes: usize,
}

impl Relays {
    /// How many are kept.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Those kept, given up.
    pub(crate) fn take(&mut self) -> Vec<HandedRelay> {
        self.bytes = 0;
        std::mem::take(&mut self.list)
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
        if self.list.len() >= MAX_RELAYS || self.bytes + bytes > MAX_RELAY_BYTES {
            warn!(%peer, %key, relays = self.list.len(), bytes = self.bytes,
                "too many relayed connections to hand over; this one ends with this program");
            return Some(paused);
        }
        let (client, backend) = match (paused.client.into_std(), paused.backend.into_std()) {
            (Ok(client), Ok(backend)) => (client, backend),
            (client, backend) => {
                let error = client.err().or(backend.err());
                warn!(%peer, %key, ?error, "cannot hand a relayed connection over; closed");
                return None;
            }
        };
        self.bytes += bytes;
        self.list.push(HandedRelay {
            client,
            backend,
            peer,
            key: key.clone(),
            to_backend: paused.resume.up,
            to_client: paused.resume.down,
            client_done: paused.resume.up_done,
            backend_done: paused.resume.down_done,
        });
        None
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
