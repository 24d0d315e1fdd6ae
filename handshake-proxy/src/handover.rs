//! An upgrade in place: the listeners go to the next daemon, open and with their queues.
//!
//! 1. [`Proxy::hand_over`] stops every accept loop: each gives its listening socket up
//!    (it stays open: handshakes that come meanwhile wait in its queue) instead of closing
//!    it. New summons are refused from then on.
//! 2. Connections the proxy relays (through the front door, to a VM, or not steered) pause:
//!    each gives its two sockets and the bytes it had read and not yet written, whole, to
//!    be handed over as a [`HandedRelay`](crate::HandedRelay) (at most [`MAX_RELAYS`](crate::MAX_RELAYS) of them, holding at most
//!    [`MAX_RELAY_BYTES`](crate::MAX_RELAY_BYTES) in flight in all; one over either bound is logged and goes on
//!    here until the old daemon ends, as before). Connections handed to an instance stop
//!    being watched and are kept, their two ends and instance, for the next daemon to watch
//!    again ([`Proxy::take_handed`], [`Proxy::adopt_handed`]; the `handoff` module, step 4).
//!    Those held through a boot stop waiting and are kept as a [`HandedHeld`]: the socket,
//!    the instance, the bytes read of it (the front door's head when it read it, early
//!    bytes), within the same bounds as the relays ([`Proxy::take_held`]); the boot goes
//!    on, and the deployer hands the booting instance over. Those the front door accepted
//!    and is still reading the head of are first given up to its head timeout to be routed
//!    (their summon works until the deployer hands over), then held and kept likewise.
//!    Those whose TLS the front door ended pause too, and go with their TLS session,
//!    taken out of rustls (the `tls_relay` module, rules 2 and 3). Connections still open
//!    after `drain` (a TLS one caught mid-record or mid-handshake, or over a bound) close
//!    with the old daemon. Warm
//!    connections that the kernel steers to an instance never pass through here and are
//!    not touched.
//! 3. The next daemon registers each socket again with [`Proxy::adopt`], after the
//!    deployer has adopted the instances, and accepts what waited.
//! 4. The front door's listeners likewise: [`Proxy::hand_over_front`] stops its accept
//!    loops and gives its sockets, open; the next daemon's front door listens on them
//!    ([`Proxy::with_front_inheriting`]).
//! 5. The next daemon resumes each relay ([`Proxy::adopt_relays`]) once the deployer has
//!    adopted the instances: it writes what was in flight first, then relays on with the
//!    same limits and counters, its idle and total clocks started again, and reports the
//!    connection open to its instance (which keeps it from being reaped); one with a TLS
//!    session goes on through the record layer (`tls_relay`, rule 4).
//! 6. It holds each held connection again ([`Proxy::adopt_held`]) once the deployer has
//!    adopted the instances: summoned anew (the adopted instance, booting or ready by then),
//!    waited for as any held connection (the boot timeout, started again; a 503, an alert or
//!    a close if the boot fails), then relayed with its bytes replayed, or handed to an
//!    instance that takes hand-offs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::connection::{self, Arrival, Open, accepting, relay};
use crate::metrics::bump;
use crate::proxy::Proxy;
use crate::relays::{
    HandedConnection, HandedHeld, HandedRelay, MAX_HANDED_CONNECTIONS, MAX_RELAYS,
};
use crate::shared::Shared;
use crate::splice::Resume;
use crate::tls_relay;

/// How long the accept loops are given to hand their sockets over.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Pause between two looks at what is left.
const LOOK: Duration = Duration::from_millis(10);

impl Proxy {
    /// Stops accepting and returns every listener, open (module doc); relayed and held
    /// connections are kept for the next daemon, and those that cannot be are given `drain`
    /// to end.
    pub async fn hand_over(&self, drain: Duration) -> Vec<(SocketAddr, std::net::TcpListener)> {
        let shared = self.shared();
        shared.handing_over.store(true, Ordering::Release);
        let count = shared.listener_count();
        shared.close_listeners();
        let start = Instant::now();
        while shared.metrics.listeners.load(Ordering::Relaxed) > 0 && start.elapsed() < GIVE_UP {
            tokio::time::sleep(LOOK).await;
        }
        let handed = std::mem::take(
            &mut *shared
                .handed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if handed.len() != count {
            warn!(
                listeners = count,
                handed = handed.len(),
                "not every listener could be handed over"
            );
        }
        // Connections the front door accepted before it stopped and is still reading the
        // head of: they summon as soon as it is read, which works until the deployer hands
        // its instances over, after this. At most the head timeout.
        if let Some(front) = &shared.front {
            let reading = || front.pending.available_permits() < front.config.max_pending;
            while reading() && start.elapsed() < front.config.head_timeout {
                tokio::time::sleep(LOOK).await;
            }
        }
        // Relayed connections pause and are kept (rule 2): their tasks end, and `open_now`
        // with them.
        shared.pause.cancel();
        let draining = Instant::now();
        while shared.metrics.open_now.load(Ordering::Relaxed) > 0 && draining.elapsed() < drain {
            tokio::time::sleep(LOOK).await;
        }
        let open = shared.metrics.open_now.load(Ordering::Relaxed);
        let (relays, tls, held) = shared
            .relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counts();
        let handed_off = shared
            .handed_connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        info!(
            listeners = handed.len(),
            relays,
            tls,
            held,
            handed_off,
            left = open,
            "proxy handed over"
        );
        handed
    }

    /// The relayed connections [`Proxy::hand_over`] paused, for the next daemon (rule 2).
    pub fn take_relays(&self) -> Vec<HandedRelay> {
        self.shared()
            .relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The connections held through a boot that [`Proxy::hand_over`] kept, for the next
    /// daemon (rule 2).
    pub fn take_held(&self) -> Vec<HandedHeld> {
        self.shared()
            .relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take_held()
    }

    /// Holds again the connections the previous daemon held through a boot (rule 6).
    pub fn adopt_held(&self, held: Vec<HandedHeld>) {
        for handed in held.into_iter().take(MAX_RELAYS) {
            let shared = Arc::clone(self.shared());
            let runtime = shared.runtime.clone();
            runtime.spawn(hold_again(shared, handed));
        }
    }

    /// The handed connections whose watch [`Proxy::hand_over`] stopped, for the next daemon
    /// (step 4).
    pub fn take_handed(&self) -> Vec<HandedConnection> {
        std::mem::take(
            &mut *self
                .shared()
                .handed_connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Watches again the connections the previous daemon had handed to its instances (step
    /// 4), once the deployer has adopted them: each counts open, and reports
    /// `ConnectionOpened` to its instance, until the kernel says it has closed.
    pub fn adopt_handed(&self, handed: Vec<HandedConnection>) {
        for connection in handed.into_iter().take(MAX_HANDED_CONNECTIONS) {
            let shared = Arc::clone(self.shared());
            debug!(peer = %connection.peer, key = %connection.key, "handed connection watched again");
            shared.metrics.open_now.fetch_add(1, Ordering::Relaxed);
            let mut open = Open::new(Arc::clone(&shared));
            open.report_opened(&connection.key);
            let runtime = shared.runtime.clone();
            runtime.spawn(async move { crate::handoff::watch(&shared, open, connection).await });
        }
    }

    /// Relays on the connections handed over by the previous daemon (rule 5).
    pub fn adopt_relays(&self, relays: Vec<HandedRelay>) {
        for handed in relays {
            self.adopt_relay(handed);
        }
    }

    fn adopt_relay(&self, handed: HandedRelay) {
        let shared = Arc::clone(self.shared());
        let streams = handed
            .client
            .set_nonblocking(true)
            .and_then(|()| handed.backend.set_nonblocking(true))
            .and_then(|()| {
                Ok((
                    TcpStream::from_std(handed.client)?,
                    TcpStream::from_std(handed.backend)?,
                ))
            });
        let (client, backend) = match streams {
            Ok(streams) => streams,
            Err(error) => {
                warn!(%error, peer = %handed.peer, key = %handed.key, "cannot take a relayed connection back; closed");
                return;
            }
        };
        let resume = Resume {
            up: handed.to_backend,
            down: handed.to_client,
            up_done: handed.client_done,
            down_done: handed.backend_done,
        };
        let (peer, key, tls) = (handed.peer, handed.key, handed.tls);
        debug!(%peer, %key, tls = tls.is_some(), "relayed connection taken back");
        shared.metrics.open_now.fetch_add(1, Ordering::Relaxed);
        let mut open = Open::new(Arc::clone(&shared));
        open.report_opened(&key);
        let runtime = shared.runtime.clone();
        runtime.spawn(async move {
            match tls {
                Some(session) => {
                    tls_relay::relay_resumed(&shared, client, backend, session, resume, peer, &key)
                        .await
                }
                None => relay(&shared, client, backend, resume, peer, &key).await,
            }
            drop(open);
        });
    }

    /// Stops the front door's accept loops and returns its listening sockets, open (module
    /// doc, rule 4); none without a front door, or when given already.
    pub fn hand_over_front(&self) -> Vec<std::net::TcpListener> {
        let Some(front) = &self.shared().front else {
            return Vec::new();
        };
        front.stop.cancel();
        let kept = std::mem::take(
            &mut *front
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        info!(listeners = kept.len(), "front door handed over");
        kept
    }

    /// Listens again on a socket handed over by the previous daemon (module doc, rule 3).
    /// A socket for an address already registered is closed.
    pub fn adopt(&self, address: SocketAddr, listener: std::net::TcpListener) {
        let shared = self.shared();
        let Some(cancel) = shared.register_bound(address) else {
            return;
        };
        if let Err(error) = listener.set_nonblocking(true) {
            warn!(%error, %address, "cannot adopt the listener");
            return;
        }
        match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => {
                shared.metrics.listeners.fetch_add(1, Ordering::Relaxed);
                shared
                    .runtime
                    .spawn(accepting(Arc::clone(shared), listener, address, cancel));
            }
            Err(error) => warn!(%error, %address, "cannot adopt the listener"),
        }
    }
}

/// Rule 6 for one connection.
async fn hold_again(shared: Arc<Shared>, handed: HandedHeld) {
    let HandedHeld {
        client,
        peer,
        key,
        early,
        peeked,
        client_done,
        failure,
    } = handed;
    let client = client
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(client));
    let mut client = match client {
        Ok(client) => client,
        Err(error) => {
            warn!(%error, %peer, %key, "cannot take a held connection back; closed");
            return;
        }
    };
    shared.metrics.open_now.fetch_add(1, Ordering::Relaxed);
    let mut open = Open::new(Arc::clone(&shared));
    open.set_key(key.clone());
    let source = key.client.map(|_| peer.ip().to_canonical());
    let summoned = match connection::summon(&shared, &key.service, &key.revision, source) {
        Ok(summoned) => summoned,
        Err(error) => {
            bump(&shared.metrics.boot_failures);
            warn!(%error, %peer, %key, "held connection handed over, its instance gone; closed");
            return connection::fail(&mut client, failure, &error.to_string()).await;
        }
    };
    debug!(%peer, %key, "held connection taken back");
    let arrival = Arrival {
        early,
        client_done,
        failure,
        peeked,
    };
    connection::serve(open, client, peer, summoned, arrival).await;
}
