//! Upstream grants: the only way out of a process instance's empty network namespace.
//!
//! A process instance has a network namespace of its own with nothing in it, and landlock
//! forbids TCP `connect`; so a gatekeeper in front of a legacy backend could not reach it.
//! The manifest's `run.upstreams` names the backends it may reach, and the deployer grants
//! exactly those, nothing else:
//!
//! 1. Before the spawn, for every `run.upstreams[n]`, bind a unix socket
//!    `<scratch>/upstream-<n>.sock`, mode 0666 (the instance runs as an unprivileged uid;
//!    a pathname unix socket does not depend on the network namespace).
//! 2. The instance gets `REVBOOT_UPSTREAM_<n>=unix:<that path as it sees it>` in its
//!    environment: the process tender binds the scratch directory read-only at `/upstream`
//!    in the instance's root, so inside it is `/upstream/upstream-<n>.sock`. Nothing else
//!    of the host's tree is visible there, which matters: landlock does not govern
//!    `connect` on pathname unix sockets.
//! 3. Each connection accepted on the socket — at most [`Limits::connections`] at once per
//!    upstream; more are closed at once — is connected to the upstream's TCP address within
//!    [`Limits::connect`] and spliced both ways until both sides are done, or until no byte
//!    moved in either direction for [`Limits::idle`]. A refused or slow upstream closes
//!    the instance's connection, so it sees an error at once.
//! 4. Dropping the [`Grants`] (the instance ended) stops the accept loops, closes every
//!    spliced connection and removes the socket files.
//!
//! 5. At an upgrade in place, [`Grants::hand_over`] stops the accept loops and the splices
//!    where they are and gives up their sockets, open, with the bytes each splice had read
//!    and not yet written ([`GrantsState`]); the socket files stay. The next daemon takes
//!    them back ([`Grants::adopt`]): the instance's path still reaches its upstream, and a
//!    connection spliced meanwhile goes on from the byte where it stopped (its idle clock
//!    started again).
//!
//! Limits: the address is fixed by the manifest (validated to be loopback); there is no
//! protocol awareness, the bytes go through untouched.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Default cap on spliced connections per upstream of one instance.
pub const DEFAULT_CONNECTIONS: usize = 64;
/// Default time to connect to an upstream.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a spliced connection may stay silent both ways.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest path a unix socket address holds (`sun_path`, with its terminating NUL).
const SUN_PATH_MAX: usize = 107;
/// Bytes copied at once per direction.
const CHUNK: usize = 16 * 1024;

/// The socket path of upstream `n` in a scratch directory.
pub fn socket_path(scratch: &Path, n: usize) -> PathBuf {
    scratch.join(format!("upstream-{n}.sock"))
}

/// The environment entries (`KEY=value`) that tell an instance where its grants are, for
/// an instance that sees its scratch directory at `scratch` (`/upstream` in the process
/// tender).
pub fn environment(scratch: &Path, count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            format!(
                "REVBOOT_UPSTREAM_{n}=unix:{}",
                socket_path(scratch, n).display()
            )
        })
        .collect()
}

/// Bounds of the grants of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Spliced connections at once, per upstream.
    pub connections: usize,
    /// Time to connect to the upstream.
    pub connect: Duration,
    /// Time a connection may stay silent in both directions.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: DEFAULT_CONNECTIONS,
            connect: DEFAULT_CONNECT_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why the grants could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The socket path does not fit a unix socket address.
    #[error(
        "Upstream socket path {} is {len} bytes, over the {SUN_PATH_MAX} a unix socket allows: use a shorter state directory",
        path.display()
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The socket could not be bound.
    #[error("Cannot bind the upstream socket {} for {upstream}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The upstream it stands for.
        upstream: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl GrantError {
    /// The I/O error a tender reports for this failure.
    pub fn into_io(self) -> io::Error {
        match self {
            GrantError::Bind { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        }
    }
}

/// The open grants of one instance; dropping it revokes them.
#[derive(Debug)]
pub struct Grants {
    accepting: std::sync::Mutex<Vec<JoinHandle<()>>>,
    paths: Vec<PathBuf>,
    counters: Vec<Arc<Counters>>,
    limits: Limits,
    /// Set at an upgrade in place (rule 5): accept loops and splices stop and give up
    /// their sockets into `handing`.
    pause: watch::Sender<bool>,
    handing: Arc<std::sync::Mutex<Handing>>,
    /// Handed over: the socket files stay, for the next daemon.
    kept: AtomicBool,
}

/// What one grant has done so far.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// The sockets the paused accept loops and splices gave up.
#[derive(Debug, Default)]
struct Handing {
    listeners: Vec<GrantState>,
    splices: Vec<SpliceState>,
    fds: Vec<OwnedFd>,
}

/// The grants of an instance as the old daemon hands them to the next (rule 5): descriptor
/// numbers kept across the exec, and what each spliced connection had in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantsState {
    /// The listening sockets.
    pub listeners: Vec<GrantState>,
    /// The connections being spliced.
    pub splices: Vec<SpliceState>,
}

/// One grant's listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantState {
    /// Its index in `run.upstreams`.
    pub n: usize,
    /// The upstream.
    pub upstream: SocketAddr,
    /// The socket file.
    pub path: PathBuf,
    /// The descriptor.
    pub fd: i32,
}

/// One spliced connection: the instance's side, the upstream's side, the bytes in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpliceState {
    /// Its grant's index.
    pub n: usize,
    /// The instance's unix socket.
    pub inner: i32,
    /// The upstream's TCP socket.
    pub outer: i32,
    /// Read from the instance, not yet written to the upstream (hex).
    pub to_upstream: String,
    /// Read from the upstream, not yet written to the instance (hex).
    pub to_instance: String,
    /// The instance's direction ended.
    pub instance_done: bool,
    /// The upstream's direction ended.
    pub upstream_done: bool,
}

/// A paused splice's bytes in flight and ended directions.
#[derive(Debug, Default)]
struct Resume {
    up: Flow,
    down: Flow,
}

/// One direction's bytes read and not yet written (`buffer[written..filled]`), kept outside
/// its pump so that a pause loses none.
#[derive(Debug, Default)]
struct Flow {
    buffer: Vec<u8>,
    written: usize,
    filled: usize,
    done: bool,
}

impl Flow {
    fn resumed(pending: Vec<u8>, done: bool) -> Flow {
        Flow {
            filled: pending.len(),
            buffer: pending,
            written: 0,
            done,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buffer[self.written..self.filled]
    }
}

impl Grants {
    /// Opens one socket per upstream in `scratch` (which must exist), with default limits.
    pub fn open(scratch: &Path, upstreams: &[SocketAddr]) -> Result<Grants, GrantError> {
        Grants::open_with(scratch, upstreams, Limits::default())
    }

    fn empty(limits: Limits) -> Grants {
        Grants {
            accepting: std::sync::Mutex::new(Vec::new()),
            paths: Vec::new(),
            counters: Vec::new(),
            limits,
            pause: watch::channel(false).0,
            handing: Arc::default(),
            kept: AtomicBool::new(false),
        }
    }

    /// Starts the accept loop of grant `n` on `listener`, with `splices` going on already.
    fn start(
        &mut self,
        listener: UnixListener,
        path: PathBuf,
        upstream: SocketAddr,
        n: usize,
        splices: Vec<(UnixStream, TcpStream, Resume)>,
    ) {
        let counters = Arc::new(Counters::default());
        self.paths.push(path.clone());
        self.counters.push(Arc::clone(&counters));
        let grant = Grant {
            upstream,
            n,
            limits: self.limits,
            path,
            pause: self.pause.subscribe(),
            handing: Arc::clone(&self.handing),
        };
        let loop_ = accept_loop(listener, grant, counters, splices);
        self.accepting
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tokio::spawn(loop_));
    }

    /// Opens one socket per upstream in `scratch`, with `limits`. Must run inside a tokio
    /// runtime; the accept loops run on it.
    pub fn open_with(
        scratch: &Path,
        upstreams: &[SocketAddr],
        limits: Limits,
    ) -> Result<Grants, GrantError> {
        let mut grants = Grants::empty(limits);
        for (n, &upstream) in upstreams.iter().enumerate() {
            let path = socket_path(scratch, n);
            let len = path.as_os_str().len();
            if len > SUN_PATH_MAX {
                return Err(GrantError::PathTooLong { path, len });
            }
            // A file left from an earlier instance with the same scratch name is stale.
            let _ = std::fs::remove_file(&path);
            let bind_error = |source| GrantError::Bind {
                path: path.clone(),
                upstream,
                source,
            };
            let listener = UnixListener::bind(&path).map_err(bind_error)?;
            // Connecting takes write permission on the socket file, and the instance runs
            // as an unprivileged uid; its directory stays root's (and read-only for it).
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
                .map_err(bind_error)?;
            debug!(upstream = %upstream, socket = %path.display(), "upstream granted");
            grants.start(listener, path, upstream, n, Vec::new());
        }
        Ok(grants)
    }

    /// No grant: an instance that reaches nothing.
    pub fn none() -> Grants {
        Grants::empty(Limits::default())
    }

    /// The socket paths, by upstream index.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Connections spliced so far (over all upstreams).
    pub fn accepted(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.accepted.load(Ordering::Relaxed))
            .sum()
    }

    /// Connections closed at once because the bound was reached (over all upstreams).
    pub fn refused(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.refused.load(Ordering::Relaxed))
            .sum()
    }

    /// Stops the grants for an upgrade in place and gives their sockets up, open (rule 5):
    /// the state and the descriptors to keep across the exec; `None` when an accept loop
    /// did not stop in time (a splice still connecting, within [`Limits::connect`]).
    pub async fn hand_over(&self) -> Option<(GrantsState, Vec<OwnedFd>)> {
        self.pause.send_replace(true);
        let tasks = std::mem::take(
            &mut *self
                .accepting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let deadline = Instant::now() + self.limits.connect + Duration::from_secs(1);
        for task in tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                warn!("upstream grants did not stop in time: not handed over");
                return None;
            }
        }
        let handing = std::mem::take(
            &mut *self
                .handing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if handing.listeners.len() != self.paths.len() {
            return None;
        }
        self.kept.store(true, Ordering::Release);
        let state = GrantsState {
            listeners: handing.listeners,
            splices: handing.splices,
        };
        debug!(splices = state.splices.len(), "upstream grants handed over");
        Some((state, handing.fds))
    }

    /// Takes back the grants the previous daemon handed over (`state`): their sockets,
    /// accepting again, and their spliced connections, going on from the byte where they
    /// stopped. Fails, closing what it took, if a listening socket cannot be taken back.
    pub fn adopt(state: &GrantsState, limits: Limits) -> io::Result<Grants> {
        let mut grants = Grants::empty(limits);
        let mut splices: Vec<Vec<(UnixStream, TcpStream, Resume)>> = Vec::new();
        for splice in &state.splices {
            match adopt_splice(splice) {
                Ok(taken) => {
                    if splices.len() <= splice.n {
                        splices.resize_with(splice.n + 1, Vec::new);
                    }
                    splices[splice.n].push(taken);
                }
                Err(error) => warn!(%error, n = splice.n, "upstream connection lost"),
            }
        }
        for grant in &state.listeners {
            let listener = revboot_sandbox::parent::take_fd(grant.fd)
                .map(std::os::unix::net::UnixListener::from)
                .and_then(|listener| {
                    listener.set_nonblocking(true)?;
                    UnixListener::from_std(listener)
                })?;
            let taken = splices.get_mut(grant.n).map(std::mem::take);
            grants.start(
                listener,
                grant.path.clone(),
                grant.upstream,
                grant.n,
                taken.unwrap_or_default(),
            );
        }
        Ok(grants)
    }
}

/// One handed-over spliced connection, taken back.
fn adopt_splice(state: &SpliceState) -> io::Result<(UnixStream, TcpStream, Resume)> {
    let take = revboot_sandbox::parent::take_fd;
    let inner = std::os::unix::net::UnixStream::from(take(state.inner)?);
    let outer = std::net::TcpStream::from(take(state.outer)?);
    inner.set_nonblocking(true)?;
    outer.set_nonblocking(true)?;
    let bytes = |text: &str| {
        hex::decode(text).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
    };
    let resume = Resume {
        up: Flow::resumed(bytes(&state.to_upstream)?, state.instance_done),
        down: Flow::resumed(bytes(&state.to_instance)?, state.upstream_done),
    };
    Ok((
        UnixStream::from_std(inner)?,
        TcpStream::from_std(outer)?,
        resume,
    ))
}

impl Drop for Grants {
    fn drop(&mut self) {
        // Aborting an accept loop drops its JoinSet, which aborts every splice it runs.
        for task in self
            .accepting
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            task.abort();
        }
        if self.kept.load(Ordering::Acquire) {
            return;
        }
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What an accept loop and its splices know of their grant.
#[derive(Debug, Clone)]
struct Grant {
    upstream: SocketAddr,
    n: usize,
    limits: Limits,
    path: PathBuf,
    pause: watch::Receiver<bool>,
    handing: Arc<std::sync::Mutex<Handing>>,
}

async fn accept_loop(
    listener: UnixListener,
    grant: Grant,
    counters: Arc<Counters>,
    adopted: Vec<(UnixStream, TcpStream, Resume)>,
) {
    let (upstream, limits) = (grant.upstream, grant.limits);
    let permits = Arc::new(Semaphore::new(limits.connections));
    let mut splices = JoinSet::new();
    for (inner, outer, resume) in adopted {
        // At most as many as the previous daemon allowed: the permit is there.
        let permit = Arc::clone(&permits).try_acquire_owned().ok();
        let grant = grant.clone();
        splices.spawn(async move {
            relay(inner, outer, resume, &grant).await;
            drop(permit);
        });
    }
    let mut pause = grant.pause.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = splices.join_next(), if !splices.is_empty() => continue,
            Ok(_) = pause.wait_for(|paused| *paused) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of fds and the like: pause rather than spin.
                warn!(%error, %upstream, "upstream socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            warn!(%upstream, limit = limits.connections, "upstream connection limit reached; closed");
            drop(stream);
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let grant = grant.clone();
        splices.spawn(async move {
            splice(stream, &grant).await;
            drop(permit);
        });
    }
    // Paused (rule 5): each splice gives its sockets up (one connecting connects first).
    while splices.join_next().await.is_some() {}
    match listener.into_std() {
        Ok(listener) => {
            let fd = OwnedFd::from(listener);
            let mut handing = grant
                .handing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            handing.listeners.push(GrantState {
                n: grant.n,
                upstream,
                path: grant.path.clone(),
                fd: fd.as_raw_fd(),
            });
            handing.fds.push(fd);
        }
        Err(error) => warn!(%error, %upstream, "cannot hand an upstream socket over"),
    }
}

/// Connects one instance connection to the upstream, then [`relay`]s.
async fn splice(inner: UnixStream, grant: &Grant) {
    let (upstream, n, limits) = (grant.upstream, grant.n, grant.limits);
    let outer = match tokio::time::timeout(limits.connect, TcpStream::connect(upstream)).await {
        Ok(Ok(outer)) => outer,
        Ok(Err(error)) => {
            warn!(%error, %upstream, n, "upstream refused the connection");
            return;
        }
        Err(_) => {
            warn!(%upstream, n, timeout = ?limits.connect, "upstream did not answer the connect");
            return;
        }
    };
    let _ = outer.set_nodelay(true);
    relay(inner, outer, Resume::default(), grant).await;
}

/// Copies both ways until done, idle, or paused (then the sockets and the bytes in flight
/// go to the hand-over).
async fn relay(mut inner: UnixStream, mut outer: TcpStream, resume: Resume, grant: &Grant) {
    let (upstream, n, limits) = (grant.upstream, grant.n, grant.limits);
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let Resume { mut up, mut down } = resume;
    let mut pause = grant.pause.clone();
    let paused = {
        let (mut inner_read, mut inner_write) = inner.split();
        let (mut outer_read, mut outer_write) = outer.split();
        let copies = async {
            tokio::join!(
                pump(&mut inner_read, &mut outer_write, &mut up, &last, epoch),
                pump(&mut outer_read, &mut inner_write, &mut down, &last, epoch)
            )
        };
        let watchdog = async {
            loop {
                let quiet = epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= limits.idle {
                    return;
                }
                tokio::time::sleep(limits.idle - quiet).await;
            }
        };
        tokio::select! {
            (sent, received) = copies => {
                debug!(%upstream, n, sent, received, "upstream connection done");
                false
            }
            () = watchdog => {
                debug!(%upstream, n, idle = ?limits.idle, "upstream connection idle; closed");
                false
            }
            Ok(_) = pause.wait_for(|paused| *paused) => true,
        }
    };
    if !paused {
        return;
    }
    let (inner, outer) = match (inner.into_std(), outer.into_std()) {
        (Ok(inner), Ok(outer)) => (OwnedFd::from(inner), OwnedFd::from(outer)),
        (inner, outer) => {
            let error = inner.err().or(outer.err());
            warn!(?error, %upstream, n, "cannot hand an upstream connection over; closed");
            return;
        }
    };
    let mut handing = grant
        .handing
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    handing.splices.push(SpliceState {
        n,
        inner: inner.as_raw_fd(),
        outer: outer.as_raw_fd(),
        to_upstream: hex::encode(up.pending()),
        to_instance: hex::encode(down.pending()),
        instance_done: up.done,
        upstream_done: down.done,
    });
    handing.fds.extend([inner, outer]);
}

/// Copies one direction, then shuts the writer down (a half close is passed on). What is
/// read and not yet written stays in `flow` between awaits, each of them cancel-safe.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    flow: &mut Flow,
    last: &AtomicU64,
    epoch: Instant,
) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if flow.done {
        return 0;
    }
    if flow.buffer.len() < CHUNK {
        flow.buffer.resize(CHUNK, 0);
    }
    let mut total = 0u64;
    'copying: loop {
        while flow.written < flow.filled {
            match to.write(&flow.buffer[flow.written..flow.filled]).await {
                Ok(0) | Err(_) => break 'copying,
                Ok(wrote) => flow.written += wrote,
            }
        }
        let read = match from.read(&mut flow.buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        (flow.written, flow.filled) = (0, read);
        total += read as u64;
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
    flow.done = true;
    (flow.written, flow.filled) = (0, 0);
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// An upstream that answers every connection with `echo: ` and what it read until EOF.
    async fn echo_upstream() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let _ = stream.read_to_end(&mut request).await;
                    let _ = stream.write_all(b"echo: ").await;
                    let _ = stream.write_all(&request).await;
                });
            }
        });
        (address, task)
    }

    async fn exchange(path: &Path, request: &[u8]) -> io::Result<Vec<u8>> {
        let mut stream = UnixStream::connect(path).await?;
        stream.write_all(request).await?;
        stream.shutdown().await?;
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        Ok(answer)
    }

    #[tokio::test]
    async fn splices_both_ways_with_half_close() {
        let scratch = tempfile::tempdir().expect("scratch");
        let (upstream, _server) = echo_upstream().await;
        let grants = Grants::open(scratch.path(), &[upstream]).expect("open");
        assert_eq!(grants.paths(), [scratch.path().join("upstream-0.sock")]);
        let answer = exchange(&grants.paths()[0], b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("exchange");
        assert_eq!(answer, b"echo: GET / HTTP/1.0\r\n\r\n");
        let big = vec![b'x'; 1 << 20];
        let answer = exchange(&grants.paths()[0], &big).await.expect("exchange");
        assert_eq!(answer.len(), big.len() + 6);
        assert_eq!(grants.accepted(), 2);
    }

    #[tokio::test]
    async fn grants_exactly_the_upstreams_in_order() {
        let scratch = tempfile::tempdir().expect("scratch");
        let (first, _a) = echo_upstream().await;
        let second_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let second = second_listener.local_addr().expect("address");
        let grants = Grants::open(scratch.path(), &[first, second]).expect("open");
        assert_eq!(grants.paths().len(), 2);
        let accepted = tokio::spawn(async move {
            let (mut stream, _) = second_listener.accept().await.expect("accept");
            stream.write_all(b"second").await.expect("write");
        });
        let mut stream = UnixStream::connect(&grants.paths()[1])
            .await
            .expect("connect");
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(answer, b"second");
        accepted.await.expect("second upstream was reached");
        let entries: Vec<String> = std::fs::read_dir(scratch.path())
            .expect("scratch")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(
            environment(scratch.path(), 2),
            vec![
                format!("REVBOOT_UPSTREAM_0=unix:{}", grants.paths()[0].display()),
                format!("REVBOOT_UPSTREAM_1=unix:{}", grants.paths()[1].display()),
            ]
        );
    }

    #[tokio::test]
    async fn dropping_revokes_sockets_and_open_connections() {
        let scratch = tempfile::tempdir().expect("scratch");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = listener.local_addr().expect("address");
        let grants = Grants::open(scratch.path(), &[upstream]).expect("open");
        let path = grants.paths()[0].clone();
        let mut inner = UnixStream::connect(&path).await.expect("connect");
        inner.write_all(b"hold").await.expect("write");
        let (mut outer, _) = tokio::time::timeout(PATIENCE, listener.accept())
            .await
            .expect("in time")
            .expect("accept");
        let mut held = [0u8; 4];
        outer.read_exact(&mut held).await.expect("read");
        assert_eq!(&held, b"hold");
        drop(grants);
        // The splice is gone: the upstream side sees EOF, the instance side too.
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, outer.read_to_end(&mut rest))
            .await
            .expect("upstream sees the close")
            .expect("read");
        assert!(rest.is_empty());
        let mut after = Vec::new();
        let read = tokio::time::timeout(PATIENCE, inner.read_to_end(&mut after))
            .await
            .expect("instance sees the close");
        assert!(read.is_ok_and(|n| n == 0) || after.is_empty());
        assert!(!path.exists(), "socket file removed");
        assert!(UnixStream::connect(&path).await.is_err());
    }

    #[tokio::test]
    async fn connections_over_the_bound_are_closed_at_once() {
        let scratch = tempfile::tempdir().expect("scratch");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = listener.local_addr().expect("address");
        let limits = Limits {
            connections: 2,
            ..Limits::default()
        };
        let grants = Grants::open_with(scratch.path(), &[upstream], limits).expect("open");
        let path = grants.paths()[0].clone();
        let mut held = Vec::new();
        for _ in 0..2 {
            let stream = UnixStream::connect(&path).await.expect("connect");
            let (outer, _) = tokio::time::timeout(PATIENCE, listener.accept())
                .await
                .expect("in time")
                .expect("accept");
            held.push((stream, outer));
        }
        let mut third = UnixStream::connect(&path).await.expect("connect");
        let mut buffer = Vec::new();
        let read = tokio::time::timeout(PATIENCE, third.read_to_end(&mut buffer))
            .await
            .expect("closed in time");
        assert!(read.is_err() || buffer.is_empty());
        assert_eq!(grants.refused(), 1);
        assert_eq!(grants.accepted(), 2);
        // A slot frees when a connection ends.
        let (first, first_outer) = held.remove(0);
        drop(first);
        drop(first_outer);
        let answered = async {
            loop {
                let mut next = UnixStream::connect(&path).await.expect("connect");
                if let Ok(Ok((_, _))) =
                    tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
                {
                    let _ = next.write_all(b"x").await;
                    return;
                }
            }
        };
        tokio::time::timeout(PATIENCE, answered)
            .await
            .expect("a freed slot is used again");
    }

    #[tokio::test]
    async fn a_refusing_upstream_closes_the_instance_side() {
        let scratch = tempfile::tempdir().expect("scratch");
        let unused = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = unused.local_addr().expect("address");
        drop(unused);
        let grants = Grants::open(scratch.path(), &[upstream]).expect("open");
        let answer = exchange(&grants.paths()[0], b"anyone?").await;
        assert!(answer.is_err() || answer.is_ok_and(|a| a.is_empty()));
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let scratch = tempfile::tempdir().expect("scratch");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = listener.local_addr().expect("address");
        let limits = Limits {
            idle: Duration::from_millis(100),
            ..Limits::default()
        };
        let grants = Grants::open_with(scratch.path(), &[upstream], limits).expect("open");
        let mut inner = UnixStream::connect(&grants.paths()[0])
            .await
            .expect("connect");
        let (mut outer, _) = tokio::time::timeout(PATIENCE, listener.accept())
            .await
            .expect("in time")
            .expect("accept");
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, outer.read_to_end(&mut rest))
            .await
            .expect("the idle splice is closed")
            .expect("read");
        let mut after = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, inner.read_to_end(&mut after))
            .await
            .expect("instance side closed too");
    }

    #[tokio::test]
    async fn a_path_too_long_is_a_clear_error_and_binds_nothing() {
        let scratch = tempfile::tempdir().expect("scratch");
        let deep = scratch.path().join("d".repeat(120));
        std::fs::create_dir_all(&deep).expect("deep dir");
        let upstream: SocketAddr = "127.0.0.1:9".parse().expect("address");
        let error = Grants::open(&deep, &[upstream]).expect_err("too long");
        assert!(matches!(error, GrantError::PathTooLong { .. }), "{error}");
        assert!(
            error.to_string().starts_with("Upstream socket path"),
            "{error}"
        );
        assert_eq!(std::fs::read_dir(&deep).expect("dir").count(), 0);
    }
}
