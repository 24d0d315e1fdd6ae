//! TCP: the accept loop and one task per connection.
//!
//! 1. At most `max_tcp_connections` connections, `max_tcp_per_prefix` from one client
//!    prefix, a newcomer past a bound closing the connection idle longest (the rules are in
//!    the `table` module).
//! 2. Each connection is answered one message at a time and closed after
//!    `tcp_idle_timeout` without a complete message.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use revboot_deployer::LaunchScope;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::packet::{Scratch, Shared, Step, Transport};
use crate::wire::MAX_MESSAGE;

mod table;

pub(crate) use table::Connections;
use table::{Admitted, Conn};

/// Accepts TCP connections on every listener and owns their one table (the rules are in the
/// `table` module).
pub(crate) async fn tcp_loop(
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    mut table: Connections<tokio::task::Id>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepts = listeners.iter().map(|listener| Box::pin(listener.accept()));
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            (accepted, _, _) = futures::future::select_all(accepts) => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                warn!(%error, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Connections that have ended leave the table before it decides.
        while let Some(ended) = connections.try_join_next_with_id() {
            table.ended(&connection_ended(ended));
        }
        // Refused, the stream is dropped with the closure: closed at once.
        let admitted = table.admit(peer.ip(), |conn| {
            let (shared, stop) = (shared.clone(), stop.clone());
            connections
                .spawn(async move { tcp_connection(&shared, stream, peer, &conn, stop).await })
                .id()
        });
        match admitted {
            Admitted::Room => {}
            Admitted::MadeRoom => {
                debug!(%peer, "closed the TCP connection idle longest to make room");
            }
            Admitted::Refused => debug!(%peer, "too many TCP connections and none idle; closed"),
        }
    }
    // Connections see the stop themselves; the server's grace period bounds this wait.
    while let Some(ended) = connections.join_next_with_id().await {
        connection_ended(ended);
    }
}

/// The id of a connection task that ended, its failure logged.
fn connection_ended(
    ended: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
) -> tokio::task::Id {
    match ended {
        Ok((id, ())) => id,
        Err(error) => {
            warn!(%error, "DNS TCP connection task failed");
            error.id()
        }
    }
}

async fn tcp_connection(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    conn: &Conn,
    mut stop: watch::Receiver<bool>,
) {
    let idle = shared.tcp_idle;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut scratch = Scratch::default();
    loop {
        // Idle until a whole message is in.
        let length = tokio::select! {
            _ = stop.changed() => return,
            () = conn.closed() => {
                debug!(%peer, "idle TCP connection closed to make room");
                return;
            }
            length = timeout(idle, read_message(&mut stream, &mut buf)) => match length {
                Ok(Ok(length)) => length,
                _ => return,
            },
        };
        if !conn.begin() {
            // Closed to make room as the message came in.
            return;
        }
        let scope = LaunchScope::open();
        let step = shared.handle(&buf[..length], peer.ip(), Transport::Tcp, &mut scratch);
        // Closed before any await (the task may move threads); still holds this query's boot.
        let mut scope = Some(scope.close());
        match step {
            Step::Nothing => {
                conn.end();
                continue;
            }
            Step::Send => {}
            Step::Delay(delayed) => {
                scope = None;
                tokio::select! {
                    _ = stop.changed() => return,
                    () = shared.settle(&delayed, Transport::Tcp, &mut scratch.out) => {}
                }
            }
        }
        let Ok(length) = u16::try_from(scratch.out.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(scratch.out.len() + 2);
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(&scratch.out);
        // The answer first if the socket takes it at once; a slow reader never holds a boot
        // back.
        let written = stream.try_write(&framed).unwrap_or(0);
        drop(scope);
        if !matches!(
            timeout(idle, stream.write_all(&framed[written..])).await,
            Ok(Ok(()))
        ) {
            debug!(%peer, "TCP write failed or timed out");
            return;
        }
        conn.end();
    }
}

/// Reads one length-prefixed message into `buf` (of [`MAX_MESSAGE`] bytes); its length.
async fn read_message(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let length = usize::from(stream.read_u16().await?);
    stream.read_exact(&mut buf[..length]).await?;
    Ok(length)
}
