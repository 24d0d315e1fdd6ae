//! What the proxy, its listeners and its connections share: the deployer, the
//! configuration, the counters, and the registry of listeners and held connections.
//!
//! 1. One lock guards the registry; it is taken for map updates only, never across an
//!    `.await`, and a bind happens under it so that two summons of one address bind it once.
//! 2. Every listener carries a stamp that moves whenever a summon confirms it; a sweep closes
//!    a listener only if its stamp has not moved since the sweep looked its address up.
//! 3. Held connections are counted per instance and in all; a [`HeldGuard`] gives its count
//!    back when dropped.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use revboot_deployer::{InstanceKey, Instances};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::ProxyConfig;
use crate::metrics::{Metrics, bump};

/// Why the proxy could not listen for an instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// `max_listeners` listeners are open and none could be swept.
    #[error("Proxy listener limit reached ({limit} open)")]
    Limit {
        /// The limit.
        limit: usize,
    },
    /// The address could not be bound (in use by something else, not local…).
    #[error("Cannot listen on {address}: {source}")]
    Bind {
        /// Where.
        address: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The proxy was shut down.
    #[error("The proxy is shut down")]
    ShutDown,
}

/// One open listener.
#[derive(Debug)]
struct Listening {
    cancel: CancellationToken,
    /// Moves whenever a summon confirms the listener, so a sweep that looked the address up
    /// before that summon does not close it.
    stamp: u64,
}

/// Tables sized for their bound up front hold at most this many entries before they grow.
const PRESIZE_LIMIT: usize = 16_384;

/// What the single lock guards. It is taken for map updates only, never across an `.await`.
#[derive(Debug, Default)]
struct Registry {
    listeners: HashMap<SocketAddr, Listening>,
    /// Connections held per instance (entries removed at zero).
    held: HashMap<InstanceKey, usize>,
    /// Connections held over all instances.
    held_total: usize,
    /// The last [`Listening::stamp`] given.
    stamps: u64,
}

impl Registry {
    /// Records a listener on `address`, stamped now; the token that closes it.
    fn add(&mut self, address: SocketAddr, parent: &CancellationToken) -> CancellationToken {
        self.stamps += 1;
        let cancel = parent.child_token();
        let stamp = self.stamps;
        let listening = Listening {
            cancel: cancel.clone(),
            stamp,
        };
        self.listeners.insert(address, listening);
        cancel
    }
}

/// Everything the listener and connection tasks share.
pub(crate) struct Shared {
    pub(crate) inner: Arc<dyn Instances>,
    pub(crate) config: ProxyConfig,
    pub(crate) metrics: Metrics,
    registry: Mutex<Registry>,
    pub(crate) cancel: CancellationToken,
    pub(crate) runtime: Handle,
    /// Pipes a spliced connection may take for splice(2): `max_pipes` permits.
    pub(crate) pipes: Semaphore,
    /// The front door, when the proxy has one (fixed at construction).
    pub(crate) front: Option<crate::door::Front>,
    /// Set while the listeners are handed to the next daemon (the `handover` module): a
    /// listener's accept loop gives its socket up instead of closing it.
    pub(crate) handing_over: std::sync::atomic::AtomicBool,
    /// The listeners given up so far, while handing over.
    pub(crate) handed: Mutex<Vec<(SocketAddr, std::net::TcpListener)>>,
    /// Cancelled while handing over: relayed connections pause to be handed over too.
    pub(crate) pause: CancellationToken,
    /// The relayed connections paused so far, while handing over.
    pub(crate) relays: Mutex<crate::relays::Relays>,
    /// The connections handed to instances whose watch stopped, while handing over.
    pub(crate) handed_connections: Mutex<Vec<crate::relays::HandedConnection>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Shared state for a proxy in front of `inner`, whose tasks run on `runtime`.
    pub(crate) fn new(
        config: ProxyConfig,
        inner: Arc<dyn Instances>,
        runtime: Handle,
        front: Option<crate::door::Front>,
    ) -> Shared {
        // Sized up front: a table that grows does so on a summon's path, under the lock.
        let registry = Registry {
            listeners: HashMap::with_capacity(config.max_listeners.min(PRESIZE_LIMIT)),
            ..Registry::default()
        };
        Shared {
            inner,
            pipes: Semaphore::new(config.max_pipes.min(Semaphore::MAX_PERMITS)),
            config,
            metrics: Metrics::default(),
            registry: Mutex::new(registry),
            cancel: CancellationToken::new(),
            runtime,
            front,
            handing_over: std::sync::atomic::AtomicBool::new(false),
            handed: Mutex::new(Vec::new()),
            pause: CancellationToken::new(),
            relays: Mutex::default(),
            handed_connections: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain counters behind; they stay usable.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes sure a listener on `address` is registered: the new listener (not yet watched
    /// by the runtime) and the token that closes it, or `None` when one was listening
    /// already (its stamp moved).
    pub(crate) fn register(
        &self,
        address: SocketAddr,
    ) -> Result<Option<(std::net::TcpListener, CancellationToken)>, ListenError> {
        if self.confirm(address) {
            return Ok(None);
        }
        if self.lock().listeners.len() >= self.config.max_listeners {
            self.sweep();
        }
        let mut registry = self.lock();
        if self.cancel.is_cancelled() {
            return Err(ListenError::ShutDown);
        }
        registry.stamps += 1;
        let stamp = registry.stamps;
        if let Some(listening) = registry.listeners.get_mut(&address) {
            listening.stamp = stamp;
            return Ok(None);
        }
        if registry.listeners.len() >= self.config.max_listeners {
            return Err(ListenError::Limit {
                limit: self.config.max_listeners,
            });
        }
        // Bound under the lock so that two summons of one address bind it once; a bind is a
        // few microseconds.
        let listener = self
            .bind(address)
            .map_err(|source| ListenError::Bind { address, source })?;
        Ok(Some((listener, registry.add(address, &self.cancel))))
    }

    /// Registers a listener bound elsewhere (handed over by the previous daemon) on
    /// `address`: the token that closes it, or `None` when one is registered already.
    pub(crate) fn register_bound(&self, address: SocketAddr) -> Option<CancellationToken> {
        let mut registry = self.lock();
        if registry.listeners.contains_key(&address) || self.cancel.is_cancelled() {
            return None;
        }
        Some(registry.add(address, &self.cancel))
    }

    /// How many listeners are registered.
    pub(crate) fn listener_count(&self) -> usize {
        self.lock().listeners.len()
    }

    /// Restamps the listener on `address`, if there is one.
    fn confirm(&self, address: SocketAddr) -> bool {
        let mut registry = self.lock();
        registry.stamps += 1;
        let stamp = registry.stamps;
        match registry.listeners.get_mut(&address) {
            Some(listening) => {
                listening.stamp = stamp;
                true
            }
            None => false,
        }
    }

    /// A non-blocking listener on `address`, not yet watched by the runtime (one syscall
    /// less on the summon path).
    fn bind(&self, address: SocketAddr) -> io::Result<std::net::TcpListener> {
        let socket = Socket::new(
            Domain::for_address(address),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        // Lets a listener be re-bound while old connections to it sit in TIME_WAIT.
        socket.set_reuse_address(true)?;
        if address.is_ipv6() {
            // One listener per address and family: IPv4 has its own.
            socket.set_only_v6(true)?;
            // An address of a prefix routed to `lo` ("AnyIP") is local to the kernel's
            // routing but not an interface address, which an IPv6 bind checks for.
            socket.set_freebind_v6(true)?;
        }
        socket.bind(&address.into())?;
        socket.listen(i32::try_from(self.config.backlog).unwrap_or(i32::MAX))?;
        Ok(socket.into())
    }

    /// Closes every listener.
    pub(crate) fn close_listeners(&self) {
        let listeners = std::mem::take(&mut self.lock().listeners);
        for listening in listeners.into_values() {
            listening.cancel.cancel();
        }
    }

    /// Closes listeners whose address no longer belongs to an instance on that port; how
    /// many were closed.
    pub(crate) fn sweep(&self) -> usize {
        let listeners: Vec<(SocketAddr, u64)> = self
            .lock()
            .listeners
            .iter()
            .map(|(address, listening)| (*address, listening.stamp))
            .collect();
        let mut closed = 0;
        for (address, stamp) in listeners {
            // A final state keeps its listener while the deployer keeps the address: the next
            // connection summons a new instance.
            let owned = self.inner.by_address(address.ip()).is_some_and(|summoned| {
                summoned.port == address.port() && summoned.backend.get() != Some(address)
            });
            if owned {
                continue;
            }
            let mut registry = self.lock();
            if registry
                .listeners
                .get(&address)
                .is_some_and(|listening| listening.stamp == stamp)
                && let Some(listening) = registry.listeners.remove(&address)
            {
                listening.cancel.cancel();
                closed += 1;
                debug!(%address, "address released; listener closed");
            }
        }
        closed
    }

    /// Counts a held connection for `key` if the bounds allow it.
    pub(crate) fn try_hold(self: &Arc<Self>, key: &InstanceKey) -> Option<HeldGuard> {
        let mut registry = self.lock();
        let per_instance = registry.held.get(key).copied().unwrap_or(0);
        if registry.held_total >= self.config.max_held
            || per_instance >= self.config.max_held_per_instance
        {
            return None;
        }
        registry.held_total += 1;
        *registry.held.entry(key.clone()).or_insert(0) += 1;
        drop(registry);
        bump(&self.metrics.held);
        self.metrics.held_now.fetch_add(1, Ordering::Relaxed);
        Some(HeldGuard {
            shared: Arc::clone(self),
            key: key.clone(),
        })
    }
}

/// A held connection, counted until dropped.
#[derive(Debug)]
pub(crate) struct HeldGuard {
    shared: Arc<Shared>,
    key: InstanceKey,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        let mut registry = self.shared.lock();
        registry.held_total = registry.held_total.saturating_sub(1);
        if let Some(count) = registry.held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                registry.held.remove(&self.key);
            }
        }
        drop(registry);
        self.shared.metrics.held_now.fetch_sub(1, Ordering::Relaxed);
    }
}
