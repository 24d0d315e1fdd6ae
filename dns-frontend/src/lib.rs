//! revboot's authoritative DNS server: `<label>.<service>.<zone>` names that boot on demand.
//!
//! It answers for one zone (default `revboot.test`) from what the deployer's
//! [`Instances`](revboot_deployer::Instances) says, summons instances when their names are
//! asked for, and answers at once with the instance's service address (where the handshake
//! proxy holds connections until it is ready) — or, in delayed mode, once it is ready.
//!
//! # Names
//!
//! Matching is ASCII case-insensitive (RFC 4343); the response echoes the question as sent.
//!
//! 1. `<zone>` — the apex: SOA and NS (with address records for in-zone name servers).
//! 2. A configured name server's name (default `ns.<zone>`) — its A or AAAA. A cluster's
//!    nodes publish the live nodes as the name servers instead ([`Nameservers`], used when
//!    none is configured).
//! 3. `<service>.<zone>` — the service's live revision.
//! 4. `<label>.<service>.<zone>` — the revision `label` names, as the deployer resolves it
//!    (deployment- or source-commit prefix, tag, DNS-safe branch name).
//! 5. Service names and labels are letters, digits, `-` and `_`; any other name in the zone
//!    (other characters, three or more labels below the zone) does not exist. Rules 3–5 are
//!    `revboot_store::name`, the grammar the proxy's front door reads host names with too.
//! 6. `_acme-challenge.<name>` inside the zone — the ACME DNS-01 values published in
//!    [`Challenges`] (`DnsConfig::challenges`) as TXT records, never cached; NXDOMAIN when
//!    none is published. This is how revboot gets certificates for its own names.
//!
//! # Answers
//!
//! 1. Unparseable query (header readable) → FORMERR; opcode other than QUERY → NOTIMP;
//!    EDNS version above 0 → BADVERS; a response or a packet shorter than a header → nothing.
//! 2. Name outside the zone, class other than IN/ANY, or AXFR/IXFR → REFUSED (no AA).
//! 3. Every answer inside the zone has AA. Negative answers carry the SOA in the authority
//!    section with TTL = SOA minimum = `negative_ttl` (RFC 2308).
//! 4. Name that does not exist (unknown service, unknown label, rule 5 above) → NXDOMAIN.
//! 5. Name that exists, type it has not → NODATA (NOERROR, no answer, SOA). This includes
//!    `<service>.<zone>` with no live revision (it is the parent of its labels) and a revision
//!    whose build failed (with an Extended DNS Error text saying so).
//! 6. A label that names several revisions → REFUSED with an Extended DNS Error (RFC 8914)
//!    listing the candidates: never a guess.
//! 7. A/AAAA/ANY for a revision → summon (per-client services: for the client's address —
//!    the source address, or the EDNS Client Subnet when `trust_ecs` is set) and answer with
//!    the service address, TTL `ttl` (default 1 s): A for an IPv4 address, AAAA for IPv6,
//!    NODATA for the other family. Other types → NODATA without summoning. A service whose
//!    manifest says `reach = "front"` is summoned all the same (its boot starts with the
//!    query) but answered with the proxy's front door address (`DnsConfig::front`) when
//!    there is one.
//! 8. Summons beyond `boots_per_second` per client prefix → REFUSED with an EDE; a summon
//!    the deployer refuses (caps, pool, backoff) or a store failure → SERVFAIL with an EDE.
//! 9. Delayed mode: the answer to rule 7 is sent once the instance is ready; not ready in
//!    `delay_limit` (or its boot timeout), or crashed → SERVFAIL with EDE "Not Ready". So is
//!    a label the deployer says is being built (a source commit with no deployment yet,
//!    built on demand), uncached: asked again once built, the name answers as rule 7.
//! 10. Every answer with an instance counts as activity (reported at most once per
//!     `activity_interval` per cached answer).
//! 11. UDP responses larger than the requestor's payload size (512 without EDNS; this server
//!     advertises and sends at most 1232) are sent with TC and no records; TCP gets all.
//! 12. Over `rrl_per_second` UDP responses per client prefix (/24, /56), responses are
//!     dropped, every `rrl_slip`-th sent truncated so that real clients retry over TCP.
//!
//! # Limits
//!
//! Work in flight is bounded (`udp_workers` UDP worker threads, `max_delayed` delayed
//! answers, `max_tcp_connections` in all and `max_tcp_per_prefix` per client prefix, where a
//! newcomer closes the connection idle longest rather than being turned away, so idle
//! connections cannot deny TCP to anyone); caches and rate-limit tables have fixed sizes.
//! hickory-server's `Server` spawns a task per UDP packet with no bound and hands responses
//! to a `ResponseHandler` as structured messages, which rules out both the bound and the
//! cache of rendered answers, so this crate runs its own loops (blocking UDP reads on
//! worker threads, as NSD does; TCP on the tokio runtime) and uses `hickory-proto` for the
//! wire format, except on the two hot paths: queries are read straight from their bytes,
//! and the answer naming a summoned instance (rule 7) is written straight to them (after an
//! idle moment, building and encoding that message twice took some 40 µs, writing it
//! directly 2 µs); a property test holds it to hickory's encoding byte for byte. Changes behind [`Instances`](revboot_deployer::Instances) are seen within
//! `generation_poll` (1 ms). No DNSSEC, no zone transfer, no dynamic update.
//!
//! A running server uses the tokio runtime it was started on (TCP, delayed answers) and
//! `udp_workers` threads of its own.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(instances: std::sync::Arc<dyn revboot_deployer::Instances>) -> Result<(), Box<dyn std::error::Error>> {
//! use revboot_dns::{DnsConfig, DnsServer};
//!
//! let config = DnsConfig { listen: "127.0.0.1:5353".parse()?, ..DnsConfig::default() };
//! let server = DnsServer::bind(config, instances).await?.spawn();
//! // dig @127.0.0.1 -p 5353 hello.revboot.test
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod answer;
mod cache;
mod challenge;
mod config;
mod limit;
mod metrics;
mod nameservers;
mod packet;
mod server;
mod tcp;
#[cfg(test)]
mod testing;
mod udp;
mod wire;

pub use answer::EDNS_UDP_SIZE;
pub use challenge::{Challenges, PublishError};
pub use config::{
    ConfigError, DEFAULT_MAX_TCP_CONNECTIONS, DEFAULT_MAX_TCP_PER_PREFIX, DEFAULT_NEGATIVE_TTL,
    DEFAULT_TTL, DEFAULT_ZONE, DnsConfig, Limits, Nameserver,
};
pub use metrics::{Metrics, MetricsSnapshot};
pub use nameservers::{MAX_ADDRESSES, MAX_NAMESERVERS, Nameservers, SetError};
pub use server::{BindError, DnsServer, RunError, RunningServer, Shutdown};
