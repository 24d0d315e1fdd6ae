//! TLS that ends at the front door, for services whose manifest says `tls = "terminate"`.
//!
//! 1. The ClientHello was read already (the front door's head, step 3 of [`crate::front`]);
//!    the handshake replays it, then goes on on the connection, within the head timeout.
//!    The certificate is the one the daemon's resolver picks for the server name (a
//!    service's `*.<service>.<zone>`); a name it has none for fails the handshake.
//! 2. Then as for any connection: reported open, held (bounded as the proxy's own
//!    connections are) until the instance serves or its boot timeout passes, the backend
//!    connected.
//! 3. Plain bytes both ways between the decrypted stream and the instance (copied: no
//!    splice(2) through TLS), until both sides end, neither moved a byte for the proxy's idle
//!    timeout, its total timeout passes, or the proxy shuts down; an upgrade in place hands
//!    it over with its TLS session ([`crate::tls_relay`]).

use std::net::SocketAddr;
use std::sync::Arc;

use revboot_deployer::Summoned;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::connection::{self, Open};
use crate::metrics::bump;

/// The certificates the front door presents, as a rustls server configuration (its
/// resolver picks one by server name). Compared by identity.
#[derive(Debug, Clone)]
pub struct Terminate(pub Arc<rustls::ServerConfig>);

impl PartialEq for Terminate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Terminate {}

/// Rules 1–3.
pub(crate) async fn serve(
    mut open: Open,
    stream: TcpStream,
    peer: SocketAddr,
    mut summoned: Summoned,
    head: Vec<u8>,
    terminate: Terminate,
    handshake_timeout: std::time::Duration,
) {
    let shared = Arc::clone(open.shared());
    let metrics = &shared.metrics;
    let acceptor = tokio_rustls::TlsAcceptor::from(terminate.0);
    let replayed = crate::tls_relay::Replayed::new(head, stream);
    let accepted = tokio::select! {
        () = shared.cancel.cancelled() => return,
        accepted = tokio::time::timeout(handshake_timeout, acceptor.accept(replayed)) => accepted,
    };
    let client = match accepted {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            bump(&metrics.front_bad);
            debug!(%error, %peer, key = %summoned.key, "front door TLS handshake failed");
            return;
        }
        Err(_) => {
            bump(&metrics.front_bad);
            debug!(%peer, key = %summoned.key, "front door TLS handshake timed out");
            return;
        }
    };
    bump(&metrics.front_terminated);
    let key = summoned.key.clone();
    summoned = match connection::renewed(&shared, summoned, None) {
        Ok(summoned) => summoned,
        Err(error) => {
            bump(&metrics.boot_failures);
            debug!(%error, %peer, %key, "summon failed; connection closed");
            return;
        }
    };
    open.report_opened(&summoned.key);
    if !summoned.state.borrow().is_serving() {
        let Some(_held) = shared.try_hold(&summoned.key) else {
            bump(&metrics.refused);
            bump(&metrics.refused_overload);
            warn!(%peer, key = %summoned.key, "too many connections held; refused");
            return;
        };
        let settled = tokio::select! {
            () = shared.cancel.cancelled() => return,
            settled = tokio::time::timeout(
                summoned.boot_timeout,
                summoned.state.wait_for(|state| state.is_serving() || state.is_final()),
            ) => settled,
        };
        if !matches!(settled, Ok(Ok(ref state)) if state.is_serving()) {
            bump(&metrics.boot_failures);
            warn!(%peer, key = %summoned.key, "instance not ready; TLS connection closed");
            return;
        }
    }
    let backend = match connection::connect(
        summoned.backend.get(),
        shared.config.connect_timeout,
        &shared.cancel,
    )
    .await
    {
        Ok(backend) => backend,
        Err(error) => {
            bump(&metrics.backend_failures);
            warn!(%error, %peer, key = %summoned.key, "cannot connect to ready instance");
            return;
        }
    };
    let _ = backend.set_nodelay(true);
    bump(&metrics.spliced);
    let key = summoned.key.clone();
    crate::tls_relay::relay(&shared, client, backend, peer, &key).await;
}
