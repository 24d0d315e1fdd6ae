//! The front door's listeners and its part of the proxy's shared state: its configuration, the
//! addresses it bound at start ([`bind`], step 1 of [`crate::front`]), and how a refused
//! connection is answered and closed ([`write_and_close`], used by the front door and the
//! proxy's own listeners alike). A leaf: the serving path (`front`, `connection`) and the
//! shared state use it; it uses neither.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::relays::Failure;
use crate::sniff::Protocol;

/// The TLS alert `internal_error`.
pub(crate) const INTERNAL_ERROR: u8 = 80;

/// Default time a front-door connection may take to send its head.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on the head the front door reads (a request head or a ClientHello).
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
/// Default bound on front-door connections still reading their head (or waiting for their
/// revision's build on demand).
pub const DEFAULT_MAX_PENDING: usize = 1024;
/// Default time a front-door connection waits for a build on demand of the source commit
/// its name designates (the builder's own default time limit is 600 s).
pub const DEFAULT_BUILD_WAIT: Duration = Duration::from_secs(600);

/// How long writing a refusal may take.
const REFUSAL_WRITE: Duration = Duration::from_secs(2);

/// Where the front door listens, and its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontConfig {
    /// The HTTP listener (routes by `Host`), if any.
    pub http: Option<SocketAddr>,
    /// The TLS listener (routes by the ClientHello's server name), if any.
    pub tls: Option<SocketAddr>,
    /// The zone whose names it serves (`revboot.test`).
    pub zone: String,
    /// Time a connection may take to send its head.
    pub head_timeout: Duration,
    /// Most bytes of head read.
    pub max_head: usize,
    /// Connections still reading their head, or waiting for a build on demand; more are
    /// reset.
    pub max_pending: usize,
    /// How long a connection whose name designates a source commit being built on demand
    /// waits for the build (then 503 / `internal_error`).
    pub build_wait: Duration,
    /// The certificates presented to services that end TLS here (`tls = "terminate"`);
    /// without them, such services are refused on the TLS listener.
    pub terminate: Option<crate::Terminate>,
}

impl FrontConfig {
    /// A front door for `zone` with no listeners yet and the default bounds.
    pub fn new(zone: impl Into<String>) -> FrontConfig {
        FrontConfig {
            http: None,
            tls: None,
            zone: zone.into(),
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            max_head: DEFAULT_MAX_HEAD,
            max_pending: DEFAULT_MAX_PENDING,
            build_wait: DEFAULT_BUILD_WAIT,
            terminate: None,
        }
    }
}

/// Why the front door could not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrontError {
    /// The address is not one of this host's.
    #[error("Front door address {address} is not an address of this host")]
    NotLocal {
        /// The address.
        address: SocketAddr,
    },
    /// The address could not be bound for another reason (in use, no permission…).
    #[error("Cannot open the front door on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A bound is zero.
    #[error("Front door setting `{0}` must be at least 1")]
    Zero(&'static str),
}

/// Where the front door listens, ports as bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontAddresses {
    /// The HTTP listener.
    pub http: Option<SocketAddr>,
    /// The TLS listener.
    pub tls: Option<SocketAddr>,
}

/// The front door's part of the proxy's shared state.
#[derive(Debug)]
pub(crate) struct Front {
    pub(crate) config: FrontConfig,
    /// The zone's labels, lowercased.
    pub(crate) zone: Vec<Vec<u8>>,
    /// Connections still reading their head, or waiting for a build on demand.
    pub(crate) pending: Arc<Semaphore>,
    pub(crate) addresses: FrontAddresses,
    /// A second descriptor of each listener, to hand over at an upgrade in place (the accept
    /// loops' own close when they stop; the sockets stay open through these).
    pub(crate) kept: Mutex<Vec<std::net::TcpListener>>,
    /// Stops the accept loops (at shutdown, or at a hand-over).
    pub(crate) stop: CancellationToken,
    /// What names are resolved through, when not the proxy's inner instances
    /// ([`crate::Proxy::resolve_names_through`]): weak, since it wraps the proxy itself.
    pub(crate) names: std::sync::OnceLock<std::sync::Weak<dyn revboot_deployer::Instances>>,
}

/// Bound listeners, not yet watched by a runtime.
pub(crate) type Bound = Vec<(Protocol, SocketAddr, std::net::TcpListener)>;

/// Binds the configured addresses (the front door's step 1), taking a listener of
/// `inherited` (handed over by the previous daemon) where one is on the address configured
/// (any port, for port 0); those not taken are closed.
pub(crate) fn bind(
    config: &FrontConfig,
    backlog: u32,
    mut inherited: Vec<std::net::TcpListener>,
) -> Result<(Front, Bound), FrontError> {
    for (name, value) in [
        ("max_head", config.max_head),
        ("max_pending", config.max_pending),
    ] {
        if value == 0 {
            return Err(FrontError::Zero(name));
        }
    }
    let mut bound = Vec::new();
    let mut kept = Vec::new();
    let mut addresses = FrontAddresses::default();
    for (protocol, address) in [(Protocol::Http, config.http), (Protocol::Tls, config.tls)] {
        let Some(address) = address else { continue };
        let handed = inherited.iter().position(|listener| {
            listener.local_addr().is_ok_and(|local| {
                local.ip() == address.ip()
                    && (address.port() == 0 || local.port() == address.port())
            })
        });
        let listener = match handed {
            Some(at) => inherited.swap_remove(at),
            None => listener(address, backlog).map_err(|source| {
                if source.kind() == io::ErrorKind::AddrNotAvailable {
                    FrontError::NotLocal { address }
                } else {
                    FrontError::Bind { address, source }
                }
            })?,
        };
        listener
            .set_nonblocking(true)
            .map_err(|source| FrontError::Bind { address, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| FrontError::Bind { address, source })?;
        match protocol {
            Protocol::Http => addresses.http = Some(local),
            Protocol::Tls => addresses.tls = Some(local),
        }
        let second = listener
            .try_clone()
            .map_err(|source| FrontError::Bind { address, source })?;
        kept.push(second);
        bound.push((protocol, local, listener));
    }
    let zone = config
        .zone
        .trim_end_matches('.')
        .split('.')
        .filter(|label| !label.is_empty())
        .map(|label| label.to_ascii_lowercase().into_bytes())
        .collect();
    let front = Front {
        config: config.clone(),
        zone,
        pending: Arc::new(Semaphore::new(config.max_pending)),
        addresses,
        kept: Mutex::new(kept),
        stop: CancellationToken::new(),
        names: std::sync::OnceLock::new(),
    };
    Ok((front, bound))
}

/// A non-blocking listener on `address`. No `IP_FREEBIND`: an address the host does not own
/// must fail here, at start.
fn listener(address: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM.nonblocking(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// Writes `bytes` (bounded in time) and ends the connection. What the client sent and
/// nobody read (a head only peeked at) is dropped first: closing a socket with unread
/// bytes resets it, and the reset could reach the client before the answer.
pub(crate) async fn write_and_close(stream: &mut TcpStream, bytes: &[u8]) {
    crate::sniff::discard_queued(stream);
    let _ = tokio::time::timeout(REFUSAL_WRITE, async {
        if !bytes.is_empty() {
            stream.write_all(bytes).await?;
        }
        stream.shutdown().await
    })
    .await;
}

/// A complete HTTP/1.1 answer that closes the connection.
pub(crate) fn http_answer(status: &str, reason: &str) -> Vec<u8> {
    let body = format!("revboot front door: {reason}\n");
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A fatal TLS alert record (sent before any ServerHello, so in the clear).
pub(crate) fn alert(code: u8) -> Vec<u8> {
    vec![21, 3, 3, 0, 2, 2, code]
}

/// What a connection whose instance cannot serve it is told, if anything (`reason` goes in
/// an HTTP answer).
pub(crate) fn failure_answer(failure: Failure, reason: &str) -> Option<Vec<u8>> {
    match failure {
        Failure::Close => None,
        Failure::Http => Some(http_answer("503 Service Unavailable", reason)),
        Failure::Tls => Some(alert(INTERNAL_ERROR)),
    }
}
