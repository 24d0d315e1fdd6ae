//! Connections whose TLS the front door ended, relayed so that an upgrade in place can hand
//! them over (the `handover` module, rule 2) with their TLS session.
//!
//! 1. The old program relays plaintext between the rustls stream and the instance; what a
//!    direction read and did not write yet lives outside the copy, so that stopping it at
//!    the pause loses no byte.
//! 2. At the pause it flushes what rustls has to send (within [`FLUSH`]), then hands the
//!    connection over only when rustls holds nothing it could not give: the handshake
//!    done, no partial record read (the stream counts record boundaries), nothing left to
//!    send, no close_notify not yet relayed, a suite the record layer follows
//!    ([`crate::records`]). Otherwise the connection goes on here (with the drain), logged
//!    at debug.
//! 3. The plaintext rustls decrypted and the relay did not read yet joins the bytes for the
//!    instance; the session's keys and sequence numbers are extracted; the bytes read from
//!    the instance and not yet sent are sealed with them, and go as the client's bytes in
//!    flight (records, ready to write). The two sockets, the bytes and the session are
//!    kept as a [`HandedRelay`](crate::HandedRelay) with `tls`, within the relays' bounds
//!    (checked before the session is taken out of rustls).
//! 4. The next program carries the relay on with the record layer: it writes what was in
//!    flight, then opens the client's records for the instance and seals the instance's
//!    bytes for the client, with the proxy's limits, idle and total clocks (started again)
//!    and counters; a close_notify ends a direction, anything the record layer refuses gets
//!    its fatal alert (within [`FLUSH`]) and the connection is closed, logged. It pauses at
//!    the next upgrade the same way, records not whole included.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use revboot_deployer::InstanceKey;
use rustls::CipherSuite;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::clock::{Clock, Limit};
use crate::metrics::bump;
use crate::records::{self, Opened, Opener, RecordError, TlsSession};
use crate::shared::Shared;
use crate::splice::{Paused, Resume};

/// How long the old program gives rustls to send what it holds at the pause, and either
/// program a fatal alert.
const FLUSH: Duration = Duration::from_secs(1);
/// Bytes read at once from either side.
const CHUNK: usize = records::MAX_PLAINTEXT;

/// The rustls stream of a connection whose TLS the front door ended.
pub(crate) type Terminated = tokio_rustls::server::TlsStream<Replayed>;

/// One direction's bytes read and not yet written, and whether it ended (rule 1).
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// The end was read and is being passed on.
    closing: bool,
    /// The end was passed on: the destination's writing is shut down.
    done: bool,
}

impl Pending {
    fn resumed(bytes: Vec<u8>, done: bool) -> Pending {
        Pending {
            bytes,
            closing: false,
            done,
        }
    }
}

/// How a relay stopped.
enum Stop {
    Done,
    Idle,
    Total,
    Cancelled,
    Paused,
    Failed(io::Error),
    Refused(RecordError),
}

impl From<io::Error> for Stop {
    fn from(error: io::Error) -> Stop {
        Stop::Failed(error)
    }
}

impl From<RecordError> for Stop {
    fn from(error: RecordError) -> Stop {
        Stop::Refused(error)
    }
}

/// Writes `pending` out, then moves `from` → `to` until `from` ends; `seal`/`open` turn
/// what is read into what is written. Every await is cancel-safe: what was read and not
/// written is in `pending` (rules 1, 4).
async fn forward<R, W, F>(
    from: &mut R,
    to: &mut W,
    pending: &mut Pending,
    clock: &Clock,
    bytes: &AtomicU64,
    mut turn: F,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: FnMut(Option<&[u8]>, &mut Pending) -> Result<usize, RecordError>,
{
    let mut chunk = vec![0u8; CHUNK];
    loop {
        while !pending.bytes.is_empty() {
            let wrote = to.write(&pending.bytes).await?;
            if wrote == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            pending.bytes.drain(..wrote);
        }
        to.flush().await?;
        if pending.closing {
            to.shutdown().await?;
            pending.done = true;
        }
        if pending.done {
            return Ok(());
        }
        let read = from.read(&mut chunk).await?;
        let data = (read > 0).then(|| &chunk[..read]);
        let moved = turn(data, pending)?;
        if read > 0 {
            clock.touch();
            bytes.fetch_add(moved as u64, Ordering::Relaxed);
        }
    }
}

/// The clocks of one relay: activity (the idle timeout) and its total deadline.
struct Clocks {
    activity: Clock,
    total: Option<tokio::time::Instant>,
}

impl Clocks {
    fn new(shared: &Shared) -> Clocks {
        let total = shared.config.total_timeout;
        Clocks {
            activity: Clock::new(),
            total: total.map(|total| tokio::time::Instant::now() + total),
        }
    }
}

/// Moves both ways ([`forward`], `turn` for each direction) until both end, or the proxy's
/// idle or total timeout, its shutdown or `pause` stops them.
async fn both_ways<C, U, D>(
    shared: &Shared,
    clocks: &Clocks,
    pause: Option<&tokio_util::sync::CancellationToken>,
    client: &mut C,
    backend: &mut TcpStream,
    (up, down): (&mut Pending, &mut Pending),
    (up_turn, down_turn): (U, D),
) -> Stop
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: FnMut(Option<&[u8]>, &mut Pending) -> Result<usize, RecordError>,
    D: FnMut(Option<&[u8]>, &mut Pending) -> Result<usize, RecordError>,
{
    let metrics = &shared.metrics;
    let clock = &clocks.activity;
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = backend.split();
    let (client_read, client_write) = (&mut client_read, &mut client_write);
    let (backend_read, backend_write) = (&mut backend_read, &mut backend_write);
    let copying = async {
        tokio::try_join!(
            forward(
                client_read,
                backend_write,
                up,
                clock,
                &metrics.bytes_from_clients,
                up_turn
            ),
            forward(
                backend_read,
                client_write,
                down,
                clock,
                &metrics.bytes_to_clients,
                down_turn
            ),
        )
    };
    let limits = clock.limits(
        shared.config.idle_timeout,
        clocks.total,
        &shared.cancel,
        pause,
    );
    tokio::select! {
        copied = copying => match copied {
            Ok(((), ())) => Stop::Done,
            Err(stop) => stop,
        },
        limit = limits => match limit {
            Limit::Idle => Stop::Idle,
            Limit::Total => Stop::Total,
            Limit::Cancelled => Stop::Cancelled,
            Limit::Paused => Stop::Paused,
        },
    }
}

/// Logs how a relay ended, as the plain relays do.
fn ended(shared: &Shared, stop: Stop, peer: SocketAddr, key: &InstanceKey) {
    match stop {
        Stop::Done | Stop::Cancelled | Stop::Paused => {}
        Stop::Idle | Stop::Total => {
            bump(&shared.metrics.timeouts);
            debug!(%peer, %key, "terminated connection timed out");
        }
        Stop::Failed(error) => debug!(%error, %peer, %key, "terminated connection failed"),
        Stop::Refused(error) => {
            info!(%error, %peer, %key, "TLS record not followed; connection closed")
        }
    }
}

/// Rules 1–3: the old program's relay of a terminated connection.
pub(crate) async fn relay(
    shared: &Arc<Shared>,
    mut client: Terminated,
    mut backend: TcpStream,
    peer: SocketAddr,
    key: &InstanceKey,
) {
    let clocks = Clocks::new(shared);
    let (mut up, mut down) = (Pending::default(), Pending::default());
    let mut pause = Some(&shared.pause);
    loop {
        let stop = {
            let plain = |data: Option<&[u8]>, pending: &mut Pending| {
                match data {
                    Some(data) => pending.bytes.extend_from_slice(data),
                    None => pending.closing = true,
                }
                Ok(data.map_or(0, <[u8]>::len))
            };
            both_ways(
                shared,
                &clocks,
                pause,
                &mut client,
                &mut backend,
                (&mut up, &mut down),
                (plain, plain),
            )
            .await
        };
        if !matches!(stop, Stop::Paused) {
            return ended(shared, stop, peer, key);
        }
        pause = None;
        match hand(shared, client, backend, (up, down), peer, key).await {
            Ok(()) => return,
            Err(kept) => (client, backend, (up, down)) = kept,
        }
    }
}

/// The suites the record layer follows (rule 1 of [`crate::records`]).
fn followed(suite: CipherSuite) -> bool {
    matches!(
        suite,
        CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
}

type Kept = (Terminated, TcpStream, (Pending, Pending));

/// Rules 2 and 3: hands the connection over (`Ok`: kept, or closed when the session could
/// not be taken out of rustls), or gives it back to go on here.
async fn hand(
    shared: &Arc<Shared>,
    mut client: Terminated,
    backend: TcpStream,
    (mut up, down): (Pending, Pending),
    peer: SocketAddr,
    key: &InstanceKey,
) -> Result<(), Kept> {
    let flushed = tokio::time::timeout(FLUSH, client.flush()).await;
    let (stream, connection) = client.get_mut();
    let state = connection.process_new_packets();
    let suite = connection
        .negotiated_cipher_suite()
        .map(|suite| suite.suite());
    let why = if !matches!(flushed, Ok(Ok(()))) {
        Some("what rustls has to send could not be flushed")
    } else if connection.is_handshaking() {
        Some("the handshake is not done")
    } else if connection.wants_write() {
        Some("rustls has records to send")
    } else if !stream.whole_records() {
        Some("a record is read in part")
    } else if !suite.is_some_and(followed) {
        Some("a cipher suite the record layer does not follow")
    } else {
        match &state {
            Err(_) => Some("the session failed"),
            Ok(state) if state.peer_has_closed() && !up.done => {
                Some("the client's close_notify is not relayed yet")
            }
            Ok(_) => None,
        }
    };
    if let Some(why) = why {
        debug!(%peer, %key, why, "terminated connection not handed over; it goes on here");
        return Err((client, backend, (up, down)));
    }
    // Rule 3: what rustls decrypted and the relay had not read yet.
    let mut chunk = vec![0u8; CHUNK];
    loop {
        match io::Read::read(&mut connection.reader(), &mut chunk) {
            Ok(0) => break,
            Ok(read) => up.bytes.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) => {
                debug!(%error, %peer, %key, "terminated connection failed at the hand-over");
                return Ok(());
            }
        }
    }
    let version = connection.protocol_version();
    // The bound is checked and the connection kept under one lock: once the session is out
    // of rustls, it cannot go on here.
    let mut relays = shared
        .relays
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !relays.has_room(up.bytes.len() + down.bytes.len() + CHUNK) {
        drop(relays);
        warn!(%peer, %key, "too many relayed connections to hand over; this TLS one ends with this program");
        return Err((client, backend, (up, down)));
    }
    let (stream, connection) = client.into_inner();
    let session = version.ok_or(RecordError::Unsupported).and_then(|version| {
        let secrets = connection
            .dangerous_extract_secrets()
            .map_err(|_| RecordError::Unsupported)?;
        TlsSession::from_rustls(version, secrets)
    });
    let mut session = match session {
        Ok(session) => session,
        Err(error) => {
            drop(relays);
            warn!(%error, %peer, %key, "cannot take the TLS session out of rustls; closed");
            return Ok(());
        }
    };
    let (client, unread) = stream.into_parts();
    session.opener.incoming = unread;
    let mut to_client = Vec::new();
    if let Err(error) = session.sealer.seal(&down.bytes, &mut to_client) {
        drop(relays);
        warn!(%error, %peer, %key, "cannot seal the bytes in flight; closed");
        return Ok(());
    }
    let paused = Paused {
        client,
        backend,
        resume: Resume {
            up: up.bytes,
            down: to_client,
            up_done: up.done,
            down_done: down.done,
        },
    };
    relays.keep_tls(paused, session, peer, key);
    Ok(())
}

/// Rule 4: the next program's relay of a connection handed over with its session. `resume`
/// holds plaintext for the instance and records for the client.
pub(crate) async fn relay_resumed(
    shared: &Arc<Shared>,
    mut client: TcpStream,
    mut backend: TcpStream,
    session: TlsSession,
    resume: Resume,
    peer: SocketAddr,
    key: &InstanceKey,
) {
    let clocks = Clocks::new(shared);
    let TlsSession {
        mut opener,
        mut sealer,
    } = session;
    let mut up = Pending::resumed(resume.up, resume.up_done);
    let mut down = Pending::resumed(resume.down, resume.down_done);
    let mut pause = Some(&shared.pause);
    loop {
        let stop = {
            let open =
                |data: Option<&[u8]>, pending: &mut Pending| open(&mut opener, data, pending);
            let seal = |data: Option<&[u8]>, pending: &mut Pending| match data {
                Some(data) => sealer.seal(data, &mut pending.bytes).map(|()| data.len()),
                None => {
                    pending.closing = true;
                    sealer.close_notify(&mut pending.bytes).map(|()| 0)
                }
            };
            both_ways(
                shared,
                &clocks,
                pause,
                &mut client,
                &mut backend,
                (&mut up, &mut down),
                (open, seal),
            )
            .await
        };
        match stop {
            Stop::Paused => {
                let paused = Paused {
                    client,
                    backend,
                    resume: Resume {
                        up: std::mem::take(&mut up.bytes),
                        down: std::mem::take(&mut down.bytes),
                        up_done: up.done,
                        down_done: down.done,
                    },
                };
                let session = TlsSession { opener, sealer };
                let kept = shared
                    .relays
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .keep_resumed(paused, session, peer, key);
                let Some((paused, session)) = kept else {
                    return;
                };
                (client, backend) = (paused.client, paused.backend);
                (up.bytes, down.bytes) = (paused.resume.up, paused.resume.down);
                TlsSession { opener, sealer } = session;
                pause = None;
            }
            Stop::Refused(error) => {
                if let Some(alert) = error.alert() {
                    let mut record = Vec::new();
                    if sealer.alert(alert, &mut record).is_ok() {
                        let _ = tokio::time::timeout(FLUSH, client.write_all(&record)).await;
                    }
                }
                return ended(shared, Stop::Refused(error), peer, key);
            }
            stop => return ended(shared, stop, peer, key),
        }
    }
}

/// The client's records opened into plaintext for the instance (rule 4); its end without a
/// close_notify ends its direction too.
fn open(
    opener: &mut Opener,
    data: Option<&[u8]>,
    pending: &mut Pending,
) -> Result<usize, RecordError> {
    let Some(data) = data else {
        pending.closing = true;
        return Ok(0);
    };
    opener.incoming.extend_from_slice(data);
    let before = pending.bytes.len();
    if opener.open(&mut pending.bytes)? == Opened::Closed {
        pending.closing = true;
    }
    Ok(pending.bytes.len() - before)
}

/// A stream whose first bytes were read already: they are read again first. It counts the
/// TLS records it reads, so that an upgrade in place knows whether rustls holds a record in
/// part (rule 2).
#[derive(Debug)]
pub(crate) struct Replayed {
    head: Vec<u8>,
    at: usize,
    stream: TcpStream,
    /// Bytes of the current record's header read, and of its body still to read.
    header: Vec<u8>,
    body_left: usize,
}

impl Replayed {
    pub(crate) fn new(head: Vec<u8>, stream: TcpStream) -> Replayed {
        Replayed {
            head,
            at: 0,
            stream,
            header: Vec::with_capacity(5),
            body_left: 0,
        }
    }

    /// Whether what was read ends with a whole record.
    pub(crate) fn whole_records(&self) -> bool {
        self.header.is_empty() && self.body_left == 0
    }

    /// The socket, and the bytes of the head not read yet.
    pub(crate) fn into_parts(self) -> (TcpStream, Vec<u8>) {
        let unread = self.head.get(self.at..).unwrap_or_default().to_vec();
        (self.stream, unread)
    }
}

/// Follows the record boundaries through `read`: `header` holds the bytes read of the
/// current record's header, `body_left` those of its body still to come.
fn count(header: &mut Vec<u8>, body_left: &mut usize, mut read: &[u8]) {
    while !read.is_empty() {
        if *body_left > 0 {
            let n = (*body_left).min(read.len());
            *body_left -= n;
            read = &read[n..];
            continue;
        }
        let n = (5 - header.len()).min(read.len());
        header.extend_from_slice(&read[..n]);
        read = &read[n..];
        if header.len() == 5 {
            *body_left = usize::from(u16::from_be_bytes([header[3], header[4]]));
            header.clear();
        }
    }
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = if this.at < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.at);
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut this.stream).poll_read(cx, buf)
        };
        if matches!(polled, Poll::Ready(Ok(()))) {
            count(
                &mut this.header,
                &mut this.body_left,
                &buf.filled()[before..],
            );
        }
        polled
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of 0, 1, 300 and 20,000 bytes, fed in every split: whole exactly at their
    /// boundaries.
    #[test]
    fn record_boundaries_are_followed_across_any_split() {
        let mut bytes = Vec::new();
        let mut boundaries = vec![0];
        for length in [0u16, 1, 300, 20_000] {
            bytes.extend_from_slice(&[23, 3, 3]);
            bytes.extend_from_slice(&length.to_be_bytes());
            bytes.extend(std::iter::repeat_n(7u8, usize::from(length)));
            boundaries.push(bytes.len());
        }
        for step in [1, 2, 5, 7, 4096, bytes.len()] {
            let (mut header, mut body_left) = (Vec::new(), 0);
            let mut at = 0;
            while at < bytes.len() {
                let end = (at + step).min(bytes.len());
                count(&mut header, &mut body_left, &bytes[at..end]);
                at = end;
                let whole = header.is_empty() && body_left == 0;
                assert_eq!(whole, boundaries.contains(&at), "step {step}, at {at}");
            }
        }
    }
}
