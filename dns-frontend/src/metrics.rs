//! Counters the daemon can expose.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of a running server (relaxed atomics; read with [`Metrics::snapshot`]).
#[derive(Debug, Default)]
pub struct Metrics {
    noerror: AtomicU64,
    formerr: AtomicU64,
    servfail: AtomicU64,
    nxdomain: AtomicU64,
    notimp: AtomicU64,
    refused: AtomicU64,
    other_rcode: AtomicU64,
    truncated: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    summons: AtomicU64,
    boot_limited: AtomicU64,
    rate_limited: AtomicU64,
    overload_dropped: AtomicU64,
    tcp_refused: AtomicU64,
    tcp_evicted: AtomicU64,
    ignored: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Responses with NOERROR (answers and NODATA).
    pub noerror: u64,
    /// Responses with FORMERR.
    pub formerr: u64,
    /// Responses with SERVFAIL.
    pub servfail: u64,
    /// Responses with NXDOMAIN.
    pub nxdomain: u64,
    /// Responses with NOTIMP.
    pub notimp: u64,
    /// Responses with REFUSED.
    pub refused: u64,
    /// Responses with any other code (BADVERS).
    pub other_rcode: u64,
    /// UDP responses sent truncated (too large, or a rate-limit slip).
    pub truncated: u64,
    /// Queries answered from the answer cache.
    pub cache_hits: u64,
    /// Queries that had to be worked out.
    pub cache_misses: u64,
    /// Summons asked of the deployer.
    pub summons: u64,
    /// Queries refused by the per-client boot limit.
    pub boot_limited: u64,
    /// UDP responses dropped by response-rate limiting.
    pub rate_limited: u64,
    /// Queries dropped because too many were in flight.
    pub overload_dropped: u64,
    /// TCP connections closed at once because too many were open (in all or from their
    /// client prefix) and none of those that could make room was idle.
    pub tcp_refused: u64,
    /// Idle TCP connections closed to make room for a new one.
    pub tcp_evicted: u64,
    /// Packets ignored (not a query, or shorter than a header).
    pub ignored: u64,
}

impl MetricsSnapshot {
    /// Responses sent, all codes together.
    pub fn responses(&self) -> u64 {
        self.noerror
            + self.formerr
            + self.servfail
            + self.nxdomain
            + self.notimp
            + self.refused
            + self.other_rcode
    }

    /// Writes the counters in Prometheus text format, as the daemon's `/metrics` serves them:
    /// `revboot_dns_responses_total` by rcode and `revboot_dns_events_total` by event.
    pub fn write_prometheus(&self, out: &mut String) {
        family(
            out,
            "revboot_dns_responses_total",
            "counter",
            "DNS responses by rcode.",
        );
        for (rcode, value) in [
            ("noerror", self.noerror),
            ("formerr", self.formerr),
            ("servfail", self.servfail),
            ("nxdomain", self.nxdomain),
            ("notimp", self.notimp),
            ("refused", self.refused),
            ("other", self.other_rcode),
        ] {
            let _ = writeln!(
                out,
                "revboot_dns_responses_total{{rcode=\"{rcode}\"}} {value}"
            );
        }
        family(
            out,
            "revboot_dns_events_total",
            "counter",
            "DNS server events.",
        );
        for (event, value) in [
            ("truncated", self.truncated),
            ("cache_hit", self.cache_hits),
            ("cache_miss", self.cache_misses),
            ("summon", self.summons),
            ("boot_limited", self.boot_limited),
            ("rate_limited", self.rate_limited),
            ("overload_dropped", self.overload_dropped),
            ("tcp_refused", self.tcp_refused),
            ("tcp_evicted", self.tcp_evicted),
            ("ignored", self.ignored),
        ] {
            let _ = writeln!(out, "revboot_dns_events_total{{event=\"{event}\"}} {value}");
        }
    }
}

/// Which counter an event bumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Truncated,
    CacheHit,
    CacheMiss,
    Summon,
    BootLimited,
    RateLimited,
    OverloadDropped,
    TcpRefused,
    TcpEvicted,
    Ignored,
}

impl Metrics {
    /// Counts a response by its (4-bit or extended) rcode.
    pub(crate) fn response(&self, rcode: u16) {
        let counter = match rcode {
            0 => &self.noerror,
            1 => &self.formerr,
            2 => &self.servfail,
            3 => &self.nxdomain,
            4 => &self.notimp,
            5 => &self.refused,
            _ => &self.other_rcode,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an event.
    pub(crate) fn event(&self, event: Event) {
        let counter = match event {
            Event::Truncated => &self.truncated,
            Event::CacheHit => &self.cache_hits,
            Event::CacheMiss => &self.cache_misses,
            Event::Summon => &self.summons,
            Event::BootLimited => &self.boot_limited,
            Event::RateLimited => &self.rate_limited,
            Event::OverloadDropped => &self.overload_dropped,
            Event::TcpRefused => &self.tcp_refused,
            Event::TcpEvicted => &self.tcp_evicted,
            Event::Ignored => &self.ignored,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            noerror: get(&self.noerror),
            formerr: get(&self.formerr),
            servfail: get(&self.servfail),
            nxdomain: get(&self.nxdomain),
            notimp: get(&self.notimp),
            refused: get(&self.refused),
            other_rcode: get(&self.other_rcode),
            truncated: get(&self.truncated),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            summons: get(&self.summons),
            boot_limited: get(&self.boot_limited),
            rate_limited: get(&self.rate_limited),
            overload_dropped: get(&self.overload_dropped),
            tcp_refused: get(&self.tcp_refused),
            tcp_evicted: get(&self.tcp_evicted),
            ignored: get(&self.ignored),
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}
