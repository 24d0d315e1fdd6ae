//! Counters the proxy keeps, read as a [`ProxyMetrics`] snapshot.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the proxy's counters. Totals only grow; gauges (`*_now`, `listeners`) go up
/// and down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyMetrics {
    /// Connections accepted and admitted (total).
    pub accepted: u64,
    /// Connections that had to wait for a boot (total).
    pub held: u64,
    /// Connections waiting for a boot right now.
    pub held_now: u64,
    /// Client connections open right now (held or spliced).
    pub open_now: u64,
    /// Connections connected to their backend and spliced (total).
    pub spliced: u64,
    /// Connections refused (total): not admitted, no instance, or over a bound.
    pub refused: u64,
    /// Of `refused`: a per-client instance refusing another client's address.
    pub refused_admission: u64,
    /// Of `refused`: over a held or open-connection bound.
    pub refused_overload: u64,
    /// Held connections closed because the instance failed or did not boot in time (total).
    pub boot_failures: u64,
    /// Ready backends that could not be connected to (total).
    pub backend_failures: u64,
    /// Spliced connections closed by the idle or total timeout (total).
    pub timeouts: u64,
    /// Bytes from clients to backends, early bytes included.
    pub bytes_from_clients: u64,
    /// Bytes from backends to clients.
    pub bytes_to_clients: u64,
    /// Of `bytes_from_clients`: early bytes read while held and replayed to the backend.
    pub replayed_bytes: u64,
    /// Listening sockets open right now.
    pub listeners: u64,
    /// Front-door connections routed to an instance by their name (total).
    pub front_routed: u64,
    /// Front-door connections whose name designates no revision served there (total).
    pub front_unknown: u64,
    /// Front-door connections whose head was too slow, too large or malformed, or whose
    /// TLS handshake at the front door failed (total).
    pub front_bad: u64,
    /// Front-door TLS connections that ended TLS there (`tls = "terminate"`, total).
    pub front_terminated: u64,
    /// Connections handed to their instance itself (`[run] handoff`): no byte of theirs
    /// passes through the proxy (total).
    pub handed_off: u64,
    /// Handed-off connections the instance's hand-off socket refused (full or closed),
    /// relayed instead (total).
    pub handoff_failures: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) accepted: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) held_now: AtomicU64,
    pub(crate) open_now: AtomicU64,
    pub(crate) spliced: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) refused_admission: AtomicU64,
    pub(crate) refused_overload: AtomicU64,
    pub(crate) boot_failures: AtomicU64,
    pub(crate) backend_failures: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) bytes_from_clients: AtomicU64,
    pub(crate) bytes_to_clients: AtomicU64,
    pub(crate) replayed_bytes: AtomicU64,
    pub(crate) listeners: AtomicU64,
    pub(crate) front_routed: AtomicU64,
    pub(crate) front_unknown: AtomicU64,
    pub(crate) front_bad: AtomicU64,
    pub(crate) front_terminated: AtomicU64,
    pub(crate) handed_off: AtomicU64,
    pub(crate) handoff_failures: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub(crate) fn snapshot(&self) -> ProxyMetrics {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProxyMetrics {
            accepted: get(&self.accepted),
            held: get(&self.held),
            held_now: get(&self.held_now),
            open_now: get(&self.open_now),
            spliced: get(&self.spliced),
            refused: get(&self.refused),
            refused_admission: get(&self.refused_admission),
            refused_overload: get(&self.refused_overload),
            boot_failures: get(&self.boot_failures),
            backend_failures: get(&self.backend_failures),
            timeouts: get(&self.timeouts),
            bytes_from_clients: get(&self.bytes_from_clients),
            bytes_to_clients: get(&self.bytes_to_clients),
            replayed_bytes: get(&self.replayed_bytes),
            listeners: get(&self.listeners),
            front_routed: get(&self.front_routed),
            front_unknown: get(&self.front_unknown),
            front_bad: get(&self.front_bad),
            front_terminated: get(&self.front_terminated),
            handed_off: get(&self.handed_off),
            handoff_failures: get(&self.handoff_failures),
        }
    }
}

impl ProxyMetrics {
    /// Writes the counters in Prometheus text format, as the daemon's `/metrics` serves them:
    /// `revboot_proxy_connections_total` by outcome, the `revboot_proxy_connections` gauge
    /// (held, open) and `revboot_proxy_bytes_total` by direction.
    pub fn write_prometheus(&self, out: &mut String) {
        family(
            out,
            "revboot_proxy_connections_total",
            "counter",
            "Proxy connections by outcome.",
        );
        for (outcome, value) in [
            ("accepted", self.accepted),
            ("held", self.held),
            ("spliced", self.spliced),
            ("refused", self.refused),
            ("refused_admission", self.refused_admission),
            ("refused_overload", self.refused_overload),
            ("boot_failure", self.boot_failures),
            ("backend_failure", self.backend_failures),
            ("timeout", self.timeouts),
            ("front_routed", self.front_routed),
            ("front_unknown_name", self.front_unknown),
            ("front_bad_head", self.front_bad),
            ("front_terminated", self.front_terminated),
            ("handed_off", self.handed_off),
            ("handoff_failure", self.handoff_failures),
        ] {
            let _ = writeln!(
                out,
                "revboot_proxy_connections_total{{outcome=\"{outcome}\"}} {value}"
            );
        }
        family(
            out,
            "revboot_proxy_connections",
            "gauge",
            "Proxy connections now.",
        );
        let _ = writeln!(
            out,
            "revboot_proxy_connections{{kind=\"held\"}} {}",
            self.held_now
        );
        let _ = writeln!(
            out,
            "revboot_proxy_connections{{kind=\"open\"}} {}",
            self.open_now
        );
        family(
            out,
            "revboot_proxy_bytes_total",
            "counter",
            "Bytes spliced by direction.",
        );
        let _ = writeln!(
            out,
            "revboot_proxy_bytes_total{{direction=\"from_clients\"}} {}",
            self.bytes_from_clients
        );
        let _ = writeln!(
            out,
            "revboot_proxy_bytes_total{{direction=\"to_clients\"}} {}",
            self.bytes_to_clients
        );
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}
