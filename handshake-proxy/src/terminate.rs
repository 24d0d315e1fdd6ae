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
//!    timeout ([`crate::idle`]), its total timeout passes, or the proxy shuts down.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use revboot_deployer::Summoned;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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

/// A stream whose first bytes were read already: they are read again first.
#[derive(Debug)]
struct Replayed {
    head: Vec<u8>,
    at: usize,
    stream: TcpStream,
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.at);
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

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
    let replayed = Replayed {
        head,
        at: 0,
        stream,
    };
    let accepted = tokio::select! {
        () = shared.cancel.cancelled() => return,
        accepted = tokio::time::timeout(handshake_timeout, acceptor.accept(replayed)) => accepted,
    };
    let mut client = match accepted {
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
    let mut backend = match connection::connect(
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
    let copying =
        crate::idle::copy_until_idle(&mut client, &mut backend, shared.config.idle_timeout);
    let limited = async {
        match shared.config.total_timeout {
            Some(limit) => tokio::time::timeout(limit, copying).await,
            None => Ok(copying.await),
        }
    };
    let copied = tokio::select! {
        () = shared.cancel.cancelled() => return,
        copied = limited => copied,
    };
    match copied {
        Ok(Ok((from_client, to_client))) => {
            use std::sync::atomic::Ordering;
            metrics
                .bytes_from_clients
                .fetch_add(from_client, Ordering::Relaxed);
            metrics
                .bytes_to_clients
                .fetch_add(to_client, Ordering::Relaxed);
        }
        Ok(Err(error)) if error.kind() == io::ErrorKind::TimedOut => {
            bump(&metrics.timeouts);
            debug!(%error, %peer, key = %summoned.key, "terminated connection idle");
        }
        Ok(Err(error)) => {
            debug!(%error, %peer, key = %summoned.key, "terminated connection failed")
        }
        Err(_) => {
            bump(&metrics.timeouts);
            debug!(%peer, key = %summoned.key, "terminated connection timed out");
        }
    }
}
