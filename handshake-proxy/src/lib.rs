//! The revboot handshake proxy: a cold boot looks like a slow first byte, not a refused
//! connection.
//!
//! [`Proxy`] wraps the deployer and implements [`Instances`] itself. Its `summon` asks the
//! deployer and then binds a listener on the instance's service address and port before it
//! returns, so DNS, given the proxy as its `Instances`, never hands out an address with no
//! listener behind it. The deployer runs the instance's own socket elsewhere
//! (`Summoned::backend`, e.g. the service address on an ephemeral port).
//!
//! # The hold-then-splice protocol
//!
//! 1. `summon` → the deployer's summon → bind `address:port` (once; skipped when the
//!    instance itself listens there) → return the answer.
//! 2. Accept at once. Look the instance up by the connection's destination address. Refuse
//!    with a reset when no instance owns it, when a per-client instance (`key.client`) sees
//!    another source address, or when over `max_connections`.
//! 3. Report `ConnectionOpened`; `ConnectionClosed` follows when the connection ends, however
//!    it ends, so an open connection — even a quiet stream or websocket — keeps its instance
//!    from being reaped.
//! 4. Summon again if the instance is cold, stopped or crashed.
//! 5. Not serving yet: hold. Over `max_held_per_instance` or `max_held`, refuse with a reset.
//!    While waiting on the instance's state watch, read and buffer up to `early_bytes` of
//!    the client's bytes (then stop reading; TCP flow control holds the rest).
//! 6. The state turns final, or `boot_timeout` passes: close the connection, log it, count a
//!    boot failure.
//! 7. Ready: connect to `backend` (refusals retried within `connect_timeout`), replay the
//!    early bytes, shut down the backend's writing if the client already ended its own.
//! 8. Splice both ways; an EOF on one side shuts down writing on the other while the other
//!    direction goes on; the connection closes on an idle or total timeout, or at shutdown.
//! 9. A sweep every `sweep_interval` closes listeners of addresses the deployer released.
//!
//! # Choices, and why
//!
//! - **One listener per service address, bound on demand.** On loopback every `127/8`
//!   address is local, so a plain bind works and costs a few microseconds (see
//!   `bench/proxy.sh`, which measures it). One wildcard or `IP_TRANSPARENT` listener per
//!   port would also see every address, but it would take the port on every local address
//!   (including ones that are not in the pool), and transparent binds need `CAP_NET_ADMIN`
//!   and policy routing; per-address listeners are exact, need no privilege, and close when
//!   the address is released. `IP_FREEBIND` only matters for pool addresses that are not
//!   local yet, which loopback pools never are.
//! - **`tokio::io::copy_bidirectional`** with 64 KiB buffers moves the bytes; its cost
//!   against a direct connection is measured in `bench/proxy.sh`.
//!
//! # Limits
//!
//! TCP only. Held connections, open connections and listeners are bounded
//! ([`ProxyConfig`]); every wait has a timeout. The proxy does not parse protocols.
//!
//! # Example
//!
//! ```no_run
//! # async fn wire(deployer: std::sync::Arc<dyn revboot_deployer::Instances>) {
//! use revboot_proxy::{Proxy, ProxyConfig};
//! let proxy = Proxy::new(ProxyConfig::default(), deployer);
//! // Hand `proxy` (an `Instances`) to the DNS front end instead of the deployer.
//! let _metrics = proxy.metrics();
//! proxy.shutdown();
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod config;
mod connection;
mod metrics;
mod proxy;
mod pump;
mod splice;

#[cfg(test)]
mod test_support;

pub use config::{
    ConfigError, DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_EARLY_BYTES,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HELD, DEFAULT_MAX_HELD_PER_INSTANCE,
    DEFAULT_MAX_LISTENERS, DEFAULT_SPLICE_BUFFER, DEFAULT_SWEEP_INTERVAL, DEFAULT_TOTAL_TIMEOUT,
    ProxyConfig,
};
pub use metrics::ProxyMetrics;
pub use proxy::{ListenError, Proxy};
pub use revboot_deployer::Instances;
