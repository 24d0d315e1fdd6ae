//! The server's sockets and life: bind, run the loops, stop within a grace period.
//!
//! 1. UDP and TCP are bound on the same port (for port 0, the port UDP got, retried when TCP
//!    finds it taken).
//! 2. `run` starts `udp_workers` UDP worker threads (the `udp` module) and the TCP accept
//!    loop (the `tcp` module); both hand each message to the path of one packet (the
//!    `packet` module). A worker that panics stops the whole server (fail-stop: the daemon
//!    reports it).
//! 3. On shutdown no new queries are read; workers, connections and delayed answers get
//!    `SHUTDOWN_GRACE` together, and what is still running then is closed.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use revboot_deployer::Instances;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::{ConfigError, DnsConfig};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::packet::Shared;
use crate::tcp::{Connections, tcp_loop};
use crate::udp::{Exited, UdpWorker};

/// How long shutdown waits for connections and delayed answers to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long a UDP worker blocks in a read before looking for a shutdown.
const READ_TIMEOUT: Duration = Duration::from_millis(100);

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
    /// One UDP socket and one TCP listener per address, `listen`'s first.
    udp: Vec<Arc<std::net::UdpSocket>>,
    tcp: Vec<TcpListener>,
    also: Vec<SocketAddr>,
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
        let (mut udps, mut tcps, mut also) = (vec![Arc::new(udp)], vec![tcp], Vec::new());
        for &address in &config.also_listen {
            let (udp, tcp, bound) = listen(address).await?;
            udps.push(Arc::new(udp));
            tcps.push(tcp);
            also.push(bound);
        }
        DnsServer::serve_on(config, instances, udps, tcps, also, local)
    }

    /// Prepares to answer on sockets bound already (a daemon upgraded in place hands its
    /// own to its successor): a UDP socket and a TCP listener per address, `listen`'s
    /// first, as [`DnsServer::sockets`] gave them.
    pub fn from_sockets(
        config: DnsConfig,
        instances: Arc<dyn Instances>,
        sockets: Vec<(std::net::UdpSocket, std::net::TcpListener)>,
    ) -> Result<DnsServer, BindError> {
        let listen = |transport| {
            move |source| BindError::Listen {
                address: config.listen,
                transport,
                source,
            }
        };
        let (mut udps, mut tcps, mut bound) = (Vec::new(), Vec::new(), Vec::new());
        for (udp, tcp) in sockets {
            bound.push(udp.local_addr().map_err(listen("udp"))?);
            // As `bind_udp` leaves it: workers read blocking, with a timeout.
            udp.set_nonblocking(false).map_err(listen("udp"))?;
            udp.set_read_timeout(Some(READ_TIMEOUT))
                .map_err(listen("udp"))?;
            tcp.set_nonblocking(true).map_err(listen("tcp"))?;
            udps.push(Arc::new(udp));
            tcps.push(TcpListener::from_std(tcp).map_err(listen("tcp"))?);
        }
        if bound.is_empty() {
            return Err(listen("udp")(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no socket handed over",
            )));
        }
        let local = bound.remove(0);
        DnsServer::serve_on(config, instances, udps, tcps, bound, local)
    }

    /// Second descriptors of its UDP sockets and TCP listeners, `listen`'s first: what a
    /// daemon upgraded in place hands to its successor, while this server's own close
    /// with it.
    pub fn sockets(&self) -> io::Result<Vec<(std::net::UdpSocket, std::net::TcpListener)>> {
        self.udp
            .iter()
            .zip(&self.tcp)
            .map(|(udp, tcp)| {
                let tcp = socket2::SockRef::from(tcp).try_clone()?;
                Ok((udp.try_clone()?, tcp.into()))
            })
            .collect()
    }

    fn serve_on(
        config: DnsConfig,
        instances: Arc<dyn Instances>,
        udps: Vec<Arc<std::net::UdpSocket>>,
        tcps: Vec<TcpListener>,
        also: Vec<SocketAddr>,
        local: SocketAddr,
    ) -> Result<DnsServer, BindError> {
        let checked = config.check(local)?;
        let shared = Shared::new(&config, &checked, instances);
        info!(%local, also = ?also, zone = %checked.zone, workers = shared.workers, "DNS server bound");
        let (stop, _) = watch::channel(false);
        let connections = Connections::new(&config.limits, shared.metrics.clone());
        Ok(DnsServer {
            shared: Arc::new(shared),
            udp: udps,
            tcp: tcps,
            also,
            connections,
            local,
            stop: Arc::new(stop),
        })
    }

    /// The UDP and TCP address it answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The other addresses it answers on (`also_listen`, as bound).
    pub fn also_addrs(&self) -> &[SocketAddr] {
        &self.also
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
            also: _,
            connections,
            local,
            stop,
        } = self;
        let runtime = tokio::runtime::Handle::current();
        let halt = Arc::new(AtomicBool::new(false));
        let (exited, mut exits) = tokio::sync::mpsc::channel((shared.workers * udp.len()).max(1));
        let mut threads = Vec::new();
        let mut failure = None;
        // `workers` threads per address: each reads one socket, blocking.
        let sockets = udp
            .iter()
            .flat_map(|socket| std::iter::repeat_n(socket, shared.workers));
        for (index, socket) in sockets.enumerate() {
            let worker = UdpWorker {
                shared: shared.clone(),
                socket: socket.clone(),
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
