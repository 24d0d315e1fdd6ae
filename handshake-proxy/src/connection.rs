//! Listeners and the connections they accept: summon, listen, admit, hold while the
//! instance boots, then splice.
//!
//! 1. A summon asks the deployer, then makes sure a listener is registered on the
//!    instance's `address:port` (unless the instance itself listens there) before it
//!    returns, so an address is never handed out before a listener exists for it. The
//!    listener's accept loop starts after the summoner's answer (`LaunchScope`).
//! 2. Accept at once. Refuse with a reset when the proxy is over `max_connections`, when no
//!    instance owns the destination address on that port, or when the instance is for one
//!    client and the source address is another's.
//! 3. Report `ConnectionOpened` (and `ConnectionClosed` when the connection ends, however it
//!    ends), so an open connection keeps its instance from being reaped.
//! 4. If the instance is cold, or stopped or crashed, summon it again (step 1).
//! 5. If it is not serving yet, hold the connection: count it against `max_held_per_instance`
//!    and `max_held` (over either, refuse with a reset), and read up to `early_bytes` of what
//!    the client sends while waiting on the instance's state — never on a sleep loop.
//! 6. If the instance becomes final or `boot_timeout` passes first, close the connection and
//!    count a boot failure. An upgrade in place (the `handover` module, rule 2) takes a held
//!    connection as it stands, to be held again by the next daemon.
//! 7. Connect to the backend (retrying refusals within `connect_timeout`), replay the early
//!    bytes, pass on an end of writing the client already made, and splice both ways.
//!    An instance that takes hand-offs (`[run] handoff = true`) gets the connection itself
//!    instead, nothing read of it (the `handoff` module): nothing is read while it is held.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use revboot_deployer::tender::admit::connect_from_own_address;
use revboot_deployer::{Activity, InstanceKey, InstanceState, SummonError, Summoned};
use revboot_store::Revision;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::bump;
use crate::relays::{Failure, HandedHeld};
use crate::shared::{ListenError, Shared};
use crate::splice::{self, Counters, Ended, Limits, Resume};

/// Size of one read while holding.
const HOLD_READ: usize = 8 * 1024;
/// Pause between connect attempts to a backend that refuses.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// Closes `stream` with a reset: the fastest refusal, and the client sees it at once.
fn reset(stream: TcpStream) {
    // Without SO_LINGER the close is an orderly FIN, still a refusal.
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Step 1: the deployer's summon, then a listener.
pub(crate) fn summon(
    shared: &Arc<Shared>,
    service: &str,
    revision: &Revision,
    client: Option<IpAddr>,
) -> Result<Summoned, SummonError> {
    if shared.cancel.is_cancelled() {
        return Err(SummonError::ShuttingDown);
    }
    let summoned = shared.inner.summon(service, revision, client)?;
    match listen(shared, &summoned) {
        Ok(()) => Ok(summoned),
        Err(ListenError::ShutDown) => Err(SummonError::ShuttingDown),
        Err(error) => {
            warn!(%error, key = %summoned.key, "cannot listen for instance");
            Err(SummonError::Start {
                key: summoned.key.to_string(),
                reason: error.to_string(),
            })
        }
    }
}

/// `summoned` as it stands, or summoned anew when its instance has ended (or not started)
/// since the summon that routed the connection: the connection is served by a live one.
pub(crate) fn renewed(
    shared: &Arc<Shared>,
    summoned: Summoned,
    client: Option<IpAddr>,
) -> Result<Summoned, SummonError> {
    let ended = {
        let state = summoned.state.borrow();
        state.is_final() || *state == InstanceState::Cold
    };
    if !ended {
        return Ok(summoned);
    }
    let key = &summoned.key;
    summon(shared, &key.service, &key.revision, client)
}

/// Step 1: makes sure a listener exists on each of `summoned`'s service addresses, and
/// starts their accept loops once the summoner has answered.
pub(crate) fn listen(shared: &Arc<Shared>, summoned: &Summoned) -> Result<(), ListenError> {
    if shared.front.is_some() && !summoned.reach.own_address() {
        // Reached through the front door only: no address of its own is served.
        return Ok(());
    }
    for address in summoned.addresses.with_port(summoned.port) {
        if summoned.backend.get() == Some(address) {
            // The instance owns the client address itself: nothing to front.
            debug!(%address, key = %summoned.key, "instance listens on its service address");
            continue;
        }
        listen_on(shared, summoned, address)?;
    }
    Ok(())
}

/// A listener on `address`, unless there is one already.
fn listen_on(
    shared: &Arc<Shared>,
    summoned: &Summoned,
    address: SocketAddr,
) -> Result<(), ListenError> {
    let Some((listener, cancel)) = shared.register(address)? else {
        return Ok(());
    };
    shared.metrics.listeners.fetch_add(1, Ordering::Relaxed);
    debug!(%address, key = %summoned.key, "listening");
    // The kernel queues handshakes from here on; the accept loop, and the listener's
    // registration with the reactor, may come after the summoner's answer (see
    // `LaunchScope`).
    let (me, runtime) = (Arc::clone(shared), shared.runtime.clone());
    revboot_deployer::summon::launch(move || {
        runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => accepting(me, listener, address, cancel).await,
                Err(error) => {
                    warn!(%error, %address, "cannot watch the listener");
                    me.metrics.listeners.fetch_sub(1, Ordering::Relaxed);
                }
            }
        });
    });
    Ok(())
}

/// The accept loop of one listener.
pub(crate) async fn accepting(
    shared: Arc<Shared>,
    listener: TcpListener,
    address: SocketAddr,
    cancel: CancellationToken,
) {
    loop {
        let accepted: io::Result<(TcpStream, SocketAddr)> = tokio::select! {
            () = cancel.cancelled() => {
                if shared.handing_over.load(Ordering::Acquire) {
                    // Handed to the next daemon: the socket stays open, its queue with it.
                    match listener.into_std() {
                        Ok(listener) => shared
                            .handed
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((address, listener)),
                        Err(error) => warn!(%error, %address, "cannot hand the listener over"),
                    }
                    shared.metrics.listeners.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                break;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => admit(&shared, stream, peer, address),
            Err(error) => {
                // Out of descriptors or a connection reset before accept: back off a little
                // rather than spin.
                warn!(%error, %address, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    shared.metrics.listeners.fetch_sub(1, Ordering::Relaxed);
}

/// Step 2, on the accept loop: cheap checks, then one task per admitted connection.
fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let metrics = &shared.metrics;
    let peer_ip = peer.ip().to_canonical();
    let refuse = |stream: TcpStream| {
        bump(&metrics.refused);
        reset(stream);
    };
    if metrics.open_now.load(Ordering::Relaxed) >= shared.config.max_connections as u64 {
        bump(&metrics.refused_overload);
        warn!(%peer, %local, limit = shared.config.max_connections, "connection limit reached; refused");
        return refuse(stream);
    }
    let Some(summoned) = shared
        .inner
        .by_address(local.ip())
        .filter(|summoned| summoned.port == local.port())
    else {
        debug!(%peer, %local, "no instance at this address; refused");
        return refuse(stream);
    };
    if let Some(client) = summoned.key.client
        && !client.contains(peer_ip)
    {
        bump(&metrics.refused_admission);
        debug!(%peer, %local, key = %summoned.key, "instance is for another client; refused");
        return refuse(stream);
    }
    bump(&metrics.accepted);
    metrics.open_now.fetch_add(1, Ordering::Relaxed);
    let mut open = Open::new(Arc::clone(shared));
    open.set_key(summoned.key.clone());
    // Nothing read yet: an instance that takes hand-offs gets the connection itself.
    let hand_over = shared.inner.handoff(&summoned.key).is_some();
    let arrival = Arrival {
        early: Vec::new(),
        client_done: false,
        failure: Failure::Close,
        peeked: hand_over,
    };
    tokio::spawn(serve(open, stream, peer, summoned, arrival));
}

/// An admitted connection: counted open (`open_now`, which the caller raised) until
/// dropped, and reported to the deployer as closed if it was reported open.
pub(crate) struct Open {
    shared: Arc<Shared>,
    key: Option<InstanceKey>,
    reported: bool,
}

impl Open {
    /// A connection counted in `open_now` already, for no instance yet.
    pub(crate) fn new(shared: Arc<Shared>) -> Open {
        Open {
            shared,
            key: None,
            reported: false,
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The instance the connection is for (before it is reported open).
    pub(crate) fn set_key(&mut self, key: InstanceKey) {
        self.key = Some(key);
    }

    pub(crate) fn report_opened(&mut self, key: &InstanceKey) {
        self.shared.inner.activity(key, Activity::ConnectionOpened);
        self.key = Some(key.clone());
        self.reported = true;
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.reported
            && let Some(key) = &self.key
        {
            self.shared.inner.activity(key, Activity::ConnectionClosed);
        }
        self.shared.metrics.open_now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells the client why it is not served, if it is to be told (the front door's HTTP 503
/// or TLS alert; the proxy's own listeners just close).
pub(crate) async fn fail(client: &mut TcpStream, failure: Failure, reason: &str) {
    if let Some(answer) = crate::door::failure_answer(failure, reason) {
        crate::door::write_and_close(client, &answer).await;
    }
}

/// What a connection brings to [`serve`] besides its socket.
pub(crate) struct Arrival {
    /// Bytes the client sent already (the front door's head).
    pub(crate) early: Vec<u8>,
    /// The client ended its writing.
    pub(crate) client_done: bool,
    /// What it is told when its instance cannot serve it.
    pub(crate) failure: Failure,
    /// `early` is still queued in the socket (the front door peeked at it), to hand the
    /// connection to its instance untouched once it is ready if it takes hand-offs (the
    /// `handoff` module); else it is consumed and relayed.
    pub(crate) peeked: bool,
}

/// How holding ended.
enum Held {
    Ready,
    Failed(String),
    TimedOut,
    ClientGone(Option<io::Error>),
    Cancelled,
    /// An upgrade in place takes it (the `handover` module).
    Paused,
}

/// Steps 3–7.
pub(crate) async fn serve(
    mut open: Open,
    mut client: TcpStream,
    peer: SocketAddr,
    mut summoned: Summoned,
    arrival: Arrival,
) {
    let Arrival {
        mut early,
        mut client_done,
        failure: on_failure,
        peeked,
    } = arrival;
    let shared = Arc::clone(&open.shared);
    let shared = &shared;
    let metrics = &shared.metrics;
    let _ = client.set_nodelay(true);
    let key = summoned.key.clone();
    let source = key.client.map(|_| peer.ip().to_canonical());
    summoned = match renewed(shared, summoned, source) {
        Ok(summoned) => summoned,
        Err(error) => {
            // The deployer logs lasting refusals (caps, back-off), not every one of them.
            if error.is_lasting() {
                debug!(%error, %peer, %key, "summon failed; connection closed");
            } else {
                warn!(%error, %peer, %key, "summon failed; connection closed");
            }
            bump(&metrics.boot_failures);
            return fail(&mut client, on_failure, &error.to_string()).await;
        }
    };
    // After the summon, so the deployer counts the connection on the instance that serves it.
    open.report_opened(&summoned.key);
    if !summoned.state.borrow().is_serving() {
        let Some(_held) = shared.try_hold(&summoned.key) else {
            bump(&metrics.refused);
            bump(&metrics.refused_overload);
            warn!(%peer, key = %summoned.key, "too many connections held; refused");
            return reset(client);
        };
        let deadline = Instant::now() + summoned.boot_timeout;
        let mut pause = Some(&shared.pause);
        let held = loop {
            let held = hold(
                &mut client,
                &mut summoned.state,
                deadline,
                // Peeked: nothing is read while held, the kernel's queue keeps what comes.
                if peeked { 0 } else { shared.config.early_bytes },
                &mut early,
                &mut client_done,
                (&shared.cancel, pause),
            )
            .await;
            if !matches!(held, Held::Paused) {
                break held;
            }
            let kept = keep_held(
                shared,
                client,
                peer,
                &summoned.key,
                Arrival {
                    early: std::mem::take(&mut early),
                    client_done,
                    failure: on_failure,
                    peeked,
                },
            );
            match kept {
                // Handed over: the next daemon holds it (the `handover` module).
                None => return,
                // Over a bound: held on here until this program ends.
                Some((kept, kept_early)) => (client, early, pause) = (kept, kept_early, None),
            }
        };
        match held {
            Held::Ready => {}
            Held::Failed(reason) => {
                bump(&metrics.boot_failures);
                warn!(%peer, key = %summoned.key, reason, "instance failed to boot; held connection closed");
                return fail(
                    &mut client,
                    on_failure,
                    &format!("the instance failed to boot: {reason}"),
                )
                .await;
            }
            Held::TimedOut => {
                bump(&metrics.boot_failures);
                warn!(%peer, key = %summoned.key, timeout = ?summoned.boot_timeout, "instance not ready in time; held connection closed");
                return fail(
                    &mut client,
                    on_failure,
                    "the instance was not ready in time",
                )
                .await;
            }
            Held::ClientGone(error) => {
                debug!(%peer, key = %summoned.key, ?error, "client left while held");
                return;
            }
            Held::Cancelled | Held::Paused => return,
        }
    }
    if peeked {
        let handoff = shared.inner.handoff(&summoned.key);
        let handed =
            crate::handoff::hand_over(shared, client, peer, &summoned.key, handoff, early.len());
        match handed.await {
            Ok(handed) => return crate::handoff::watch(shared, open, handed).await,
            Err(Some(kept)) => client = kept,
            Err(None) => return,
        }
    }
    let mut backend = match connect(
        summoned.backend.get(),
        shared.config.connect_timeout,
        &shared.cancel,
    )
    .await
    {
        Ok(backend) => backend,
        Err(error) => {
            bump(&metrics.backend_failures);
            warn!(%error, %peer, key = %summoned.key, backend = ?summoned.backend.get(), "cannot connect to ready instance");
            return fail(
                &mut client,
                on_failure,
                "the instance does not accept connections",
            )
            .await;
        }
    };
    let _ = backend.set_nodelay(true);
    if !early.is_empty() {
        if let Err(error) = backend.write_all(&early).await {
            bump(&metrics.backend_failures);
            warn!(%error, %peer, key = %summoned.key, "cannot replay early bytes");
            return;
        }
        let early = early.len() as u64;
        metrics
            .bytes_from_clients
            .fetch_add(early, Ordering::Relaxed);
        metrics.replayed_bytes.fetch_add(early, Ordering::Relaxed);
    }
    drop(early);
    bump(&metrics.spliced);
    let mut resume = Resume::default();
    if client_done {
        // The client ended its writing while held: so does the backend's side, at once.
        if let Err(error) = crate::pump::shutdown_write(&backend) {
            debug!(%error, %peer, key = %summoned.key, "spliced connection failed");
            return;
        }
        resume.up_done = true;
    }
    relay(shared, client, backend, resume, peer, &summoned.key).await;
}

/// Step 7's splice, from `resume`, until it ends, or until an upgrade in place pauses it and
/// it is handed to the next program (the `handover` module); a connection the hand-over
/// cannot take goes on here until the old program ends.
pub(crate) async fn relay(
    shared: &Arc<Shared>,
    client: TcpStream,
    backend: TcpStream,
    resume: Resume,
    peer: SocketAddr,
    key: &InstanceKey,
) {
    let metrics = &shared.metrics;
    let limits = Limits {
        idle: shared.config.idle_timeout,
        total: shared.config.total_timeout,
        buffer: shared.config.splice_buffer,
        pipes: shared.config.zero_copy.then_some(&shared.pipes),
    };
    let counters = Counters {
        from_client: &metrics.bytes_from_clients,
        to_client: &metrics.bytes_to_clients,
    };
    let (mut client, mut backend, mut resume) = (client, backend, resume);
    let mut pause = Some(&shared.pause);
    loop {
        let ended = splice::relay(
            client,
            backend,
            resume,
            limits,
            counters,
            &shared.cancel,
            pause,
        )
        .await;
        match ended {
            Ended::Done | Ended::Cancelled => {}
            Ended::Idle | Ended::Total => {
                bump(&metrics.timeouts);
                debug!(%peer, %key, ?ended, "spliced connection timed out");
            }
            Ended::Failed(error) => {
                debug!(%peer, %key, %error, "spliced connection failed")
            }
            Ended::Paused(paused) => {
                let kept = shared
                    .relays
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .keep(paused, peer, key);
                if let Some(paused) = kept {
                    (client, backend, resume) = (paused.client, paused.backend, paused.resume);
                    pause = None;
                    continue;
                }
            }
        }
        return;
    }
}

/// Step 6's hand-over: keeps a held connection for the next daemon, or gives it back with
/// its early bytes when the hand-over is full or the socket cannot leave the runtime.
fn keep_held(
    shared: &Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    key: &InstanceKey,
    arrival: Arrival,
) -> Option<(TcpStream, Vec<u8>)> {
    let client = match client.into_std() {
        Ok(client) => client,
        Err(error) => {
            warn!(%error, %peer, %key, "cannot hand a held connection over; closed");
            return None;
        }
    };
    let handed = HandedHeld {
        client,
        peer,
        key: key.clone(),
        early: arrival.early,
        peeked: arrival.peeked,
        client_done: arrival.client_done,
        failure: arrival.failure,
    };
    let kept = shared
        .relays
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .keep_held(handed);
    let back = kept?;
    match TcpStream::from_std(back.client) {
        Ok(client) => Some((client, back.early)),
        Err(error) => {
            warn!(%error, %peer, %key, "cannot hold a connection on; closed");
            None
        }
    }
}

/// Step 5: waits on the state while reading early bytes, until `deadline`; ends at `cancel`
/// (shutting down) and at `pause` (an upgrade in place) too.
async fn hold(
    client: &mut TcpStream,
    state: &mut watch::Receiver<InstanceState>,
    deadline: Instant,
    limit: usize,
    early: &mut Vec<u8>,
    client_done: &mut bool,
    (cancel, pause): (&CancellationToken, Option<&CancellationToken>),
) -> Held {
    let deadline = tokio::time::sleep_until(deadline);
    tokio::pin!(deadline);
    let paused = async {
        match pause {
            Some(pause) => pause.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(paused);
    let settled = state.wait_for(|state| state.is_serving() || state.is_final());
    tokio::pin!(settled);
    let mut chunk = [0u8; HOLD_READ];
    loop {
        let room = limit.saturating_sub(early.len()).min(HOLD_READ);
        let reading = !*client_done && room > 0;
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Held::Cancelled,
            settled = &mut settled => return match settled {
                Ok(state) if state.is_serving() => Held::Ready,
                Ok(state) => Held::Failed(describe(&state)),
                Err(_) => Held::Failed("the deployer dropped the instance".to_owned()),
            },
            () = &mut deadline => return Held::TimedOut,
            () = &mut paused => return Held::Paused,
            read = client.read(&mut chunk[..room]), if reading => match read {
                Ok(0) => *client_done = true,
                Ok(n) => early.extend_from_slice(&chunk[..n]),
                Err(error) => return Held::ClientGone(Some(error)),
            },
        }
    }
}

fn describe(state: &InstanceState) -> String {
    match state {
        InstanceState::Crashed { reason } => format!("crashed: {reason}"),
        other => format!("{other:?}"),
    }
}

/// Step 7: connects, retrying refusals (a backend that reports ready a moment early).
/// `backend` is known once the instance is ready (`Summoned::backend`): `None` is an error.
pub(crate) async fn connect(
    backend: Option<SocketAddr>,
    timeout: Duration,
    cancel: &CancellationToken,
) -> io::Result<TcpStream> {
    let backend = backend
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "its address is not known"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::select! {
            () = cancel.cancelled() => return Err(io::Error::other("the proxy is shutting down")),
            // From the service address: a per-client instance's socket admits only that source.
            attempt = tokio::time::timeout_at(deadline, connect_from_own_address(backend)) => attempt,
        };
        match attempt {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(error))
                if error.kind() == io::ErrorKind::ConnectionRefused
                    && Instant::now() + CONNECT_RETRY < deadline =>
            {
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(io::Error::from(io::ErrorKind::TimedOut)),
        }
    }
}
