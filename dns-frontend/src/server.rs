//! Sockets, receive loops and the path of one packet.
//!
//! 1. UDP: `udp_workers` threads share one socket with blocking reads (NSD's model: one
//!    read and one write system call per query, no wake-up machinery); each reads a packet,
//!    answers it and sends the answer before reading the next, so at most `udp_workers`
//!    packets are being worked on (plus at most `max_delayed` delayed answers, which wait on
//!    the tokio runtime); the rest wait in the kernel's socket buffer, which drops when full.
//!    A worker that panics stops the whole server (fail-stop: the daemon reports it).
//! 2. TCP: at most `max_tcp_connections` connections, `max_tcp_per_prefix` from one client
//!    prefix, a newcomer past a bound closing the connection idle longest (the rules are in
//!    the `tcp` module); each answered one message at a time, closed after
//!    `tcp_idle_timeout` without a complete message.
//! 3. One packet: parse (ignore / FORMERR / NOTIMP) → response-rate limit (UDP only) →
//!    BADVERS for an EDNS version above 0 → answer cache (valid for one deployer
//!    generation) → the engine (resolve, summon) → the response, truncated with TC over UDP
//!    if it exceeds the requestor's payload size (512 without EDNS, at most 1232).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use revboot_deployer::{Activity, Instances, LaunchScope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::answer::{EDNS_UDP_SIZE, Engine};
use crate::cache::{self, Answer, AnswerCache, Found, Rendered, Scope};
use crate::config::{Checked, ConfigError, DnsConfig};
use crate::limit::{PrefixLimiter, Verdict};
use crate::metrics::{Event, Metrics, MetricsSnapshot};
use crate::tcp::{Admitted, Conn, Connections};
use crate::wire::{self, HEADER_LEN, Query, Rejected};

/// How long shutdown waits for connections and delayed answers to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long a UDP worker blocks in a read before looking for a shutdown.
const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// Largest DNS message.
const MAX_MESSAGE: usize = 65_535;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The configuration is invalid.
    #[error("Invalid DNS configuration")]
    Config(#[from] ConfigError),
    /// A socket could not be bound.
    #[error("Cannot listen on {address} ({transport})")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// `udp` or `tcp`.
        transport: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Why the server stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A receive loop panicked.
    #[error("A DNS server task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A UDP worker thread panicked.
    #[error("A DNS UDP worker panicked")]
    WorkerPanicked,
    /// A UDP worker thread could not be started.
    #[error("Cannot start a DNS UDP worker")]
    Spawn(#[source] io::Error),
}

/// A bound, not yet running, DNS server.
#[derive(Debug)]
pub struct DnsServer {
    shared: Arc<Shared>,
    udp: Arc<std::net::UdpSocket>,
    tcp: TcpListener,
    /// The open TCP connections, by their tasks' ids.
    connections: Connections<tokio::task::Id>,
    local: SocketAddr,
    stop: Arc<watch::Sender<bool>>,
}

/// Stops a server; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Shutdown {
    /// Asks the server to stop: no new queries are read; connections and delayed answers
    /// get a short grace period.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// A server running on the current tokio runtime.
#[derive(Debug)]
pub struct RunningServer {
    local: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl RunningServer {
    /// The UDP and TCP address it answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Its counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// A handle that stops it.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Stops it and waits until it has stopped.
    pub async fn shutdown(self) -> Result<(), RunError> {
        self.shutdown.trigger();
        match self.task.await {
            Ok(result) => result,
            Err(error) => Err(RunError::Task(error)),
        }
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `config.listen` (the same port for both) and prepares to answer
    /// from `instances`.
    pub async fn bind(
        config: DnsConfig,
        instances: Arc<dyn Instances>,
    ) -> Result<DnsServer, BindError> {
        let (udp, tcp, local) = listen(config.listen).await?;
        let checked = config.check(local)?;
        let shared = Shared::new(&config, &checked, instances);
        info!(%local, zone = %checked.zone, workers = shared.workers, "DNS server bound");
        let (stop, _) = watch::channel(false);
        let connections = Connections::new(&config.limits, shared.metrics.clone());
        Ok(DnsServer {
            shared: Arc::new(shared),
            udp: Arc::new(udp),
            tcp,
            connections,
            local,
            stop: Arc::new(stop),
        })
    }

    /// The UDP and TCP address it answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Its counters (shared with the running server).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// A handle that stops [`run`](Self::run).
    pub fn shutdown_handle(&self) -> Shutdown {
        Shutdown(self.stop.clone())
    }

    /// Runs on the current tokio runtime until stopped through [`RunningServer::shutdown`].
    pub fn spawn(self) -> RunningServer {
        let local = self.local;
        let metrics = self.shared.metrics.clone();
        let shutdown = self.shutdown_handle();
        RunningServer {
            local,
            metrics,
            shutdown,
            task: tokio::spawn(self.run()),
        }
    }

    /// Answers until the [`Shutdown`] handle is triggered, then stops gracefully.
    pub async fn run(self) -> Result<(), RunError> {
        let DnsServer {
            shared,
            udp,
            tcp,
            connections,
            local,
            stop,
        } = self;
        let runtime = tokio::runtime::Handle::current();
        let halt = Arc::new(AtomicBool::new(false));
        let (exited, mut exits) = tokio::sync::mpsc::channel(shared.workers.max(1));
        let mut threads = Vec::new();
        let mut failure = None;
        for index in 0..shared.workers {
            let worker = UdpWorker {
                shared: shared.clone(),
                socket: udp.clone(),
                halt: halt.clone(),
                stop: stop.subscribe(),
                runtime: runtime.clone(),
                _exited: Exited(exited.clone()),
            };
            match std::thread::Builder::new()
                .name(format!("dns-udp-{index}"))
                .spawn(move || worker.run())
            {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    failure = Some(RunError::Spawn(error));
                    stop.send_replace(true);
                    break;
                }
            }
        }
        drop(exited);
        let mut tasks = JoinSet::new();
        tasks.spawn(tcp_loop(shared.clone(), tcp, connections, stop.subscribe()));
        let mut stopped = stop.subscribe();
        while failure.is_none() {
            tokio::select! {
                changed = stopped.wait_for(|stop| *stop) => {
                    let _ = changed;
                    break;
                }
                panicked = exits.recv() => {
                    // A worker only exits on its own if it panicked.
                    warn!(panicked = ?panicked, "DNS UDP worker exited; stopping");
                    failure = Some(RunError::WorkerPanicked);
                    stop.send_replace(true);
                }
                joined = tasks.join_next() => {
                    if let Some(Err(error)) = joined {
                        warn!(%error, "DNS server task failed");
                        failure = Some(RunError::Task(error));
                        stop.send_replace(true);
                    }
                    // The TCP loop returns only once stopped.
                    break;
                }
            }
        }
        halt.store(true, Ordering::Release);
        stop.send_replace(true);
        let grace = Instant::now() + SHUTDOWN_GRACE;
        // Workers notice within one read timeout.
        let joined = tokio::task::spawn_blocking(move || {
            let mut panicked = false;
            for thread in threads {
                panicked |= thread.join().is_err();
            }
            panicked
        });
        match tokio::time::timeout_at(grace.into(), joined).await {
            Ok(Ok(true)) => {
                failure.get_or_insert(RunError::WorkerPanicked);
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                failure.get_or_insert(RunError::Task(error));
            }
            Err(_) => warn!(%local, "DNS UDP workers still running after the grace period"),
        }
        // Connections (the TCP loop waits for them) and delayed answers get the rest of the
        // grace period; connections still open then are closed with the TCP loop.
        loop {
            match tokio::time::timeout_at(grace.into(), tasks.join_next()).await {
                Ok(Some(Err(error))) => {
                    failure.get_or_insert(RunError::Task(error));
                }
                Ok(Some(Ok(()))) => {}
                Ok(None) => break,
                Err(_) => {
                    warn!(%local, "DNS connections still open after the shutdown grace period");
                    break;
                }
            }
        }
        tasks.abort_all();
        let delayed = shared.delayed.acquire_many(permits(shared.max_delayed));
        if tokio::time::timeout_at(grace.into(), delayed)
            .await
            .is_err()
        {
            warn!(%local, "DNS delayed answers still waiting after the shutdown grace period");
        }
        info!(%local, "DNS server stopped");
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

fn permits(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Binds UDP then TCP on the same port (for port 0, retrying when TCP finds it taken).
async fn listen(
    address: SocketAddr,
) -> Result<(std::net::UdpSocket, TcpListener, SocketAddr), BindError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let udp = bind_udp(address).map_err(|source| BindError::Listen {
            address,
            transport: "udp",
            source,
        })?;
        let local = udp.local_addr().map_err(|source| BindError::Listen {
            address,
            transport: "udp",
            source,
        })?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp, local)),
            Err(error)
                if address.port() == 0
                    && error.kind() == io::ErrorKind::AddrInUse
                    && attempts < 8 => {}
            Err(source) => {
                return Err(BindError::Listen {
                    address: local,
                    transport: "tcp",
                    source,
                });
            }
        }
    }
}

fn bind_udp(address: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // A larger receive buffer absorbs bursts; the kernel caps it at net.core.rmem_max.
    if let Err(error) = socket.set_recv_buffer_size(4 << 20) {
        debug!(%error, "could not enlarge the UDP receive buffer");
    }
    socket.bind(&address.into())?;
    // Workers read blocking; the timeout bounds how long they take to notice a shutdown.
    socket.set_read_timeout(Some(READ_TIMEOUT))?;
    Ok(socket.into())
}

/// Per-loop buffers, reused from packet to packet.
#[derive(Debug, Default)]
struct Scratch {
    lowercase: Vec<u8>,
    key: Vec<u8>,
    out: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// What to do after handling a packet.
#[derive(Debug)]
enum Step {
    /// Send `scratch.out`.
    Send,
    /// Send nothing.
    Nothing,
    /// Send once the instance is ready (delayed mode).
    Delay(Delayed),
}

#[derive(Debug)]
struct Delayed {
    answer: Arc<Answer>,
    wait: Duration,
    packet: Vec<u8>,
}

/// Everything the loops share.
#[derive(Debug)]
struct Shared {
    engine: Engine,
    cache: AnswerCache,
    rrl: PrefixLimiter,
    slip: u32,
    metrics: Arc<Metrics>,
    delayed: Arc<Semaphore>,
    max_delayed: usize,
    tcp_idle: Duration,
    workers: usize,
    activity_ms: u64,
    generation_poll_us: u64,
    /// The deployer's generation as last asked, and when (µs since `epoch`).
    generation: AtomicU64,
    generation_at_us: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn new(config: &DnsConfig, checked: &Checked, instances: Arc<dyn Instances>) -> Shared {
        let metrics = Arc::new(Metrics::default());
        let l = &config.limits;
        let shared = Shared {
            engine: Engine::new(config, checked, instances, metrics.clone()),
            cache: AnswerCache::new(l.cache_entries),
            rrl: PrefixLimiter::new(
                l.limiter_slots,
                l.rrl_per_second,
                l.rrl_burst,
                l.v4_prefix,
                l.v6_prefix,
            ),
            slip: l.rrl_slip,
            metrics,
            delayed: Arc::new(Semaphore::new(l.max_delayed)),
            max_delayed: l.max_delayed,
            tcp_idle: l.tcp_idle_timeout,
            workers: config.udp_workers(),
            activity_ms: u64::try_from(l.activity_interval.as_millis()).unwrap_or(u64::MAX),
            generation_poll_us: u64::try_from(config.generation_poll.as_micros())
                .unwrap_or(u64::MAX),
            generation: AtomicU64::new(0),
            generation_at_us: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        shared.poll_generation();
        shared
    }

    /// Handles one message from `source`.
    fn handle(&self, packet: &[u8], source: IpAddr, transport: Transport, s: &mut Scratch) -> Step {
        let query = match wire::parse(packet, self.engine.trust_ecs()) {
            Ok(query) => query,
            Err(Rejected::Ignore) => {
                self.metrics.event(Event::Ignored);
                return Step::Nothing;
            }
            Err(Rejected::FormErr(header)) => return self.header_only(&header, 1, s),
            Err(Rejected::NotImp(header)) => return self.header_only(&header, 4, s),
        };
        if transport == Transport::Udp
            && let Verdict::Refuse(refused) = self.rrl.check(source)
        {
            if self.slip != 0 && refused % self.slip == 0 {
                slipped(&query, &mut s.out);
                self.metrics.event(Event::Truncated);
                self.metrics.response(0);
                return Step::Send;
            }
            self.metrics.event(Event::RateLimited);
            return Step::Nothing;
        }
        s.lowercase.clear();
        wire::push_lowercase(query.qname(), &mut s.lowercase);
        // Before the cache, whose keys do not hold the EDNS version.
        if let Some(rendered) = self.engine.bad_version(&query, &s.lowercase) {
            self.emit(&rendered, &query, transport, &mut s.out);
            return Step::Send;
        }
        let generation = self.generation();
        self.cache.sync(generation);
        let subnet_query =
            self.engine.trust_ecs() && query.edns.is_some_and(|e| e.subnet.is_some());
        if !subnet_query && let Some(answer) = self.cached(&query, source, s) {
            self.metrics.event(Event::CacheHit);
            self.report_activity(&answer);
            self.emit(&answer.rendered, &query, transport, &mut s.out);
            return Step::Send;
        }
        self.metrics.event(Event::CacheMiss);
        let worked = self.engine.work(&query, &s.lowercase, source, generation);
        if let Some(scope) = worked.cache {
            cache::key(&query, &s.lowercase, scope, &mut s.key);
            self.cache.put(&s.key, worked.answer.clone(), generation);
            if worked.per_client {
                cache::key(&query, &s.lowercase, Scope::Shared, &mut s.key);
                self.cache.put_per_client(&s.key, generation);
            }
        }
        if let Some(link) = &worked.answer.link {
            link.reported_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        if let Some(wait) = worked.wait {
            return Step::Delay(Delayed {
                answer: worked.answer,
                wait,
                packet: packet.to_vec(),
            });
        }
        self.emit(&worked.answer.rendered, &query, transport, &mut s.out);
        Step::Send
    }

    /// A usable cached answer for `query`, if there is one.
    fn cached(&self, query: &Query<'_>, source: IpAddr, s: &mut Scratch) -> Option<Arc<Answer>> {
        cache::key(query, &s.lowercase, Scope::Shared, &mut s.key);
        let found = match self.cache.get(&s.key) {
            Found::PerClient => {
                let client = self.engine.client(query, source);
                cache::key(query, &s.lowercase, Scope::Client(client), &mut s.key);
                self.cache.get(&s.key)
            }
            found => found,
        };
        let Found::Answer(answer) = found else {
            return None;
        };
        if let Some(link) = &answer.link {
            let state = link.state.borrow();
            // A stopped instance must be summoned again; in delayed mode a booting one
            // must be waited for: both go the long way.
            if state.is_final() || (self.engine.delayed() && !state.is_serving()) {
                return None;
            }
        }
        Some(answer)
    }

    /// The deployer's generation, asked at most once per `generation_poll`.
    fn generation(&self) -> u64 {
        if self.generation_poll_us == 0 {
            return self.engine.instances().generation();
        }
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let at = self.generation_at_us.load(Ordering::Acquire);
        if now.saturating_sub(at) < self.generation_poll_us
            || self
                .generation_at_us
                .compare_exchange(at, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return self.generation.load(Ordering::Acquire);
        }
        self.poll_generation()
    }

    fn poll_generation(&self) -> u64 {
        let generation = self.engine.instances().generation();
        self.generation.store(generation, Ordering::Release);
        generation
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reports a cached answer as activity, at most once per `activity_interval`.
    fn report_activity(&self, answer: &Answer) {
        let Some(link) = &answer.link else { return };
        let now = self.now_ms();
        let last = link.reported_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.activity_ms
            && link
                .reported_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.engine.instances().activity(&link.key, Activity::Query);
        }
    }

    fn header_only(&self, header: &wire::Header, rcode: u8, s: &mut Scratch) -> Step {
        s.out.clear();
        s.out.extend_from_slice(&header.error_response(rcode));
        self.metrics.response(u16::from(rcode));
        Step::Send
    }

    /// Writes `rendered` as the response to `query` into `out`: its id, RD and CD, the
    /// question as sent, and TC if it does not fit the transport.
    fn emit(
        &self,
        rendered: &Rendered,
        query: &Query<'_>,
        transport: Transport,
        out: &mut Vec<u8>,
    ) {
        let limit = match transport {
            Transport::Udp => {
                usize::from(query.edns.map_or(512, |e| e.udp_size.min(EDNS_UDP_SIZE)))
            }
            Transport::Tcp => MAX_MESSAGE,
        };
        let bytes = if rendered.full.len() <= limit {
            &rendered.full
        } else {
            self.metrics.event(Event::Truncated);
            &rendered.truncated
        };
        out.clear();
        out.extend_from_slice(bytes);
        if out.len() >= HEADER_LEN {
            out[..2].copy_from_slice(&query.id.to_be_bytes());
            out[2] = (out[2] & !0x01) | u8::from(query.rd);
            out[3] = (out[3] & !0x10) | (u8::from(query.cd) << 4);
            let question = query.question;
            if let Some(template) = out.get_mut(HEADER_LEN..HEADER_LEN + question.len())
                && template.eq_ignore_ascii_case(question)
            {
                template.copy_from_slice(question);
            }
        }
        self.metrics.response(rendered.rcode);
    }

    /// Waits (bounded) for a delayed answer's instance, then writes the response.
    async fn settle(&self, delayed: &Delayed, transport: Transport, out: &mut Vec<u8>) {
        let Ok(query) = wire::parse(&delayed.packet, self.engine.trust_ecs()) else {
            return;
        };
        let mut lowercase = Vec::new();
        wire::push_lowercase(query.qname(), &mut lowercase);
        let why = match &delayed.answer.link {
            None => None,
            Some(link) => {
                let mut state = link.state.clone();
                let settled = timeout(
                    delayed.wait,
                    state.wait_for(|s| s.is_serving() || s.is_final()),
                )
                .await;
                match settled {
                    Ok(Ok(state)) if state.is_serving() => None,
                    Ok(Ok(state)) => Some(format!("{} did not start: {:?}", link.key, *state)),
                    Ok(Err(_)) => Some(format!("{} is gone", link.key)),
                    Err(_) => Some(format!("{} not ready after {:?}", link.key, delayed.wait)),
                }
            }
        };
        match why {
            None => self.emit(&delayed.answer.rendered, &query, transport, out),
            Some(why) => {
                debug!(reason = %why, "delayed answer failed");
                let rendered = self.engine.not_ready(&query, &lowercase, why);
                self.emit(&rendered, &query, transport, out);
            }
        }
    }
}

/// A rate-limit "slip": header with TC and the question, nothing else.
fn slipped(query: &Query<'_>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&query.id.to_be_bytes());
    out.push(0x80 | 0x02 | u8::from(query.rd));
    out.push(u8::from(query.cd) << 4);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(query.question);
}

/// Tells `run` that a worker thread ended (on panic, while unwinding).
struct Exited(tokio::sync::mpsc::Sender<bool>);

impl Drop for Exited {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.try_send(true);
        }
    }
}

/// One UDP worker thread.
struct UdpWorker {
    shared: Arc<Shared>,
    socket: Arc<std::net::UdpSocket>,
    halt: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
    runtime: tokio::runtime::Handle,
    _exited: Exited,
}

impl UdpWorker {
    fn run(self) {
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

/// Accepts TCP connections and owns their table (the rules are in the `tcp` module).
async fn tcp_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut table: Connections<tokio::task::Id>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
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

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, MessageType};
    use proptest::prelude::*;

    use super::*;

    fn shared(trust_ecs: bool) -> Shared {
        let (config, checked) = crate::testing::config(trust_ecs);
        Shared::new(&config, &checked, Arc::new(crate::testing::One::ready()))
    }

    fn valid_queries() -> impl Strategy<Value = Vec<u8>> {
        let labels = prop_oneof![
            Just(vec!["hello", "revboot", "test"]),
            Just(vec!["abcdef1", "HELLO", "revboot", "test"]),
            Just(vec!["revboot", "test"]),
            Just(vec!["nope", "revboot", "test"]),
            Just(vec!["example", "com"]),
        ];
        (labels, any::<u16>(), any::<u16>(), any::<bool>()).prop_map(|(labels, id, qtype, opt)| {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(opt)]);
            for label in labels {
                p.push(label.len() as u8);
                p.extend_from_slice(label.as_bytes());
            }
            p.push(0);
            p.extend_from_slice(&(qtype % 300).to_be_bytes());
            p.extend_from_slice(&[0, 1]);
            if opt {
                p.extend_from_slice(&[0, 0, 41, 2, 0, 0, 0, 0, 0, 0, 0]);
            }
            p
        })
    }

    fn packets() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            valid_queries(),
            (
                valid_queries(),
                proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)
            )
                .prop_map(|(mut p, edits)| {
                    for (at, byte) in edits {
                        let len = p.len();
                        p[at % len] = byte;
                    }
                    p
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever comes in: no panic, and any reply is a well-formed response with the
        /// query's id that fits the transport.
        #[test]
        fn any_packet_gets_a_well_formed_reply_or_none(packet in packets(), trust in any::<bool>()) {
            let shared = shared(trust);
            let mut scratch = Scratch::default();
            for transport in [Transport::Udp, Transport::Tcp, Transport::Udp] {
                match shared.handle(&packet, IpAddr::from([127, 0, 0, 1]), transport, &mut scratch) {
                    Step::Nothing => {}
                    Step::Delay(_) => prop_assert!(false, "no delayed answers configured"),
                    Step::Send => {
                        let reply = Message::from_vec(&scratch.out);
                        prop_assert!(reply.is_ok(), "unparseable reply {:?}", scratch.out);
                        let reply = reply.expect("checked");
                        prop_assert_eq!(reply.metadata.message_type, MessageType::Response);
                        prop_assert_eq!(&scratch.out[..2], &packet[..2]);
                        if transport == Transport::Udp {
                            prop_assert!(scratch.out.len() <= usize::from(EDNS_UDP_SIZE));
                            if reply.edns.is_none() {
                                prop_assert!(scratch.out.len() <= 512);
                            }
                        }
                    }
                }
            }
        }
    }
}
