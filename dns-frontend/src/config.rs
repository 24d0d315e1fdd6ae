//! What a DNS server is told: where to listen, which zone, TTLs, limits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::rr::Name;

/// The default zone.
pub const DEFAULT_ZONE: &str = "revboot.test";
/// The default TTL of instance addresses.
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);
/// The default negative TTL (the SOA minimum, RFC 2308).
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// The default bound on open TCP connections.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 128;
/// The default bound on open TCP connections from one client prefix.
pub const DEFAULT_MAX_TCP_PER_PREFIX: usize = 16;

/// How a [`DnsServer`](crate::DnsServer) is configured.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP address to listen on (port 0: any free port, the same for both).
    pub listen: SocketAddr,
    /// More addresses to answer on, UDP and TCP each (e.g. port 53 of the host's IPv4 and
    /// IPv6 addresses), with the same zone, cache and limits as `listen`.
    pub also_listen: Vec<SocketAddr>,
    /// The zone served, e.g. `revboot.test`.
    pub zone: String,
    /// TTL of instance addresses (whole seconds; default 1 s).
    pub ttl: Duration,
    /// TTL of negative answers, and the SOA minimum (default 5 s).
    pub negative_ttl: Duration,
    /// The zone's name servers. Empty: one, `ns.<zone>`, at the listen address (127.0.0.1 when
    /// listening on an unspecified address).
    pub nameservers: Vec<Nameserver>,
    /// The zone's name servers as they change (a cluster's live nodes), used when
    /// `nameservers` is empty (see [`Nameservers`](crate::Nameservers)).
    pub shared_nameservers: Option<crate::Nameservers>,
    /// Delay an instance's answer until it is ready (bounded by `delay_limit` and the
    /// instance's boot timeout), for setups without the handshake proxy.
    pub delayed_answers: bool,
    /// The longest a delayed answer waits.
    pub delay_limit: Duration,
    /// Take the client address from EDNS Client Subnet when a query carries it (only behind
    /// resolvers you trust: anyone can write any subnet).
    pub trust_ecs: bool,
    /// How often the hot path asks the deployer whether anything changed
    /// ([`generation`](revboot_deployer::Instances::generation), which can cost tens of
    /// microseconds); a change is seen within this long (default 1 ms; zero: every query).
    pub generation_poll: Duration,
    /// The proxy's front door addresses (at most one per family). Names of a service whose
    /// manifest says `reach = "front"` are answered with these rather than the instance's
    /// own addresses (the summon still boots the instance). Empty: no front door, every
    /// service is answered with its own addresses.
    pub front: Vec<IpAddr>,
    /// ACME DNS-01 challenge values, answered as TXT records at `_acme-challenge.<name>`
    /// (see [`Challenges`](crate::Challenges)); shared with whoever publishes them.
    pub challenges: crate::Challenges,
    /// Protection limits.
    pub limits: Limits,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 53)),
            also_listen: Vec::new(),
            zone: DEFAULT_ZONE.to_owned(),
            ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            nameservers: Vec::new(),
            shared_nameservers: None,
            delayed_answers: false,
            delay_limit: Duration::from_secs(5),
            trust_ecs: false,
            generation_poll: Duration::from_millis(1),
            front: Vec::new(),
            challenges: crate::Challenges::new(),
            limits: Limits::default(),
        }
    }
}

/// A name server of the zone, published as NS at the apex, with its addresses as glue (A and
/// AAAA records) when the name is inside the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nameserver {
    /// Its name, e.g. `ns1.revboot.test`.
    pub name: String,
    /// Its addresses, IPv4 and IPv6; at least one when the name is inside the zone (the
    /// parent zone's glue and these must agree).
    pub addresses: Vec<IpAddr>,
}

/// Bounds on what clients can make the server do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// UDP worker threads, each answering one packet at a time (0: one per CPU, at most 4).
    /// With `max_delayed`, this bounds UDP requests in flight; excess packets wait in (and
    /// overflow from) the kernel's socket buffer.
    pub udp_workers: usize,
    /// Delayed answers waiting for an instance at once; a query past it is dropped.
    pub max_delayed: usize,
    /// TCP connections at once. A newcomer past it closes the connection idle longest (one
    /// with no query in progress); it is closed itself only when every connection is busy.
    pub max_tcp_connections: usize,
    /// TCP connections at once from one client prefix (`v4_prefix`, `v6_prefix`; at most
    /// `max_tcp_connections`). A newcomer past it closes its prefix's connection idle
    /// longest; it is closed itself only when all of them are busy.
    pub max_tcp_per_prefix: usize,
    /// A TCP connection idle (or slow to send a message) this long is closed (RFC 7766
    /// §6.2.3 recommends an idle timeout on the order of seconds).
    pub tcp_idle_timeout: Duration,
    /// Responses per second per client prefix over UDP (0: no limit).
    pub rrl_per_second: u32,
    /// Burst allowance of the response rate limit.
    pub rrl_burst: u32,
    /// Of the responses over the limit, every `rrl_slip`-th is sent truncated (so a real
    /// client retries over TCP) instead of dropped (0: drop all).
    pub rrl_slip: u32,
    /// IPv4 prefix length that counts as one client for rate limits and TCP connections
    /// (default /24).
    pub v4_prefix: u8,
    /// IPv6 prefix length that counts as one client for rate limits and TCP connections
    /// (default /56, what one customer is commonly given, RIPE-690).
    pub v6_prefix: u8,
    /// Summons (potential boots) per second per client prefix (0: no limit).
    pub boots_per_second: u32,
    /// Burst allowance of the boot limit.
    pub boot_burst: u32,
    /// Answers held by the answer cache (per kind: instance answers and the rest).
    pub cache_entries: usize,
    /// Rate-limit state slots (prefixes hash into them; memory is fixed).
    pub limiter_slots: usize,
    /// Activity reported for one cached answer at most this often.
    pub activity_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            udp_workers: 0,
            max_delayed: 256,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            max_tcp_per_prefix: DEFAULT_MAX_TCP_PER_PREFIX,
            tcp_idle_timeout: Duration::from_secs(10),
            rrl_per_second: 1000,
            rrl_burst: 2000,
            rrl_slip: 2,
            v4_prefix: 24,
            v6_prefix: 56,
            boots_per_second: 5,
            boot_burst: 20,
            cache_entries: 16_384,
            limiter_slots: 4096,
            activity_interval: Duration::from_millis(250),
        }
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The zone is not a valid domain name (or is the root).
    #[error("Zone `{zone}` is not a valid domain name")]
    Zone {
        /// The zone as given.
        zone: String,
    },
    /// A name server name is invalid.
    #[error("Name server `{name}` is not a valid domain name")]
    Nameserver {
        /// The name as given.
        name: String,
    },
    /// A name server inside the zone has no address: resolvers could never reach it.
    #[error("Name server `{name}` is inside the zone and needs its addresses (glue)")]
    Glue {
        /// The name as given.
        name: String,
    },
    /// A value is out of range.
    #[error("`{field}` {problem}")]
    Range {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// A checked configuration, names parsed and lowercased.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub zone: Name,
    pub nameservers: Vec<(Name, Vec<IpAddr>)>,
}

impl DnsConfig {
    /// Checks the configuration; `bound` is the address actually listened on.
    pub(crate) fn check(&self, bound: SocketAddr) -> Result<Checked, ConfigError> {
        let zone = parse_name(&self.zone).ok_or_else(|| ConfigError::Zone {
            zone: self.zone.clone(),
        })?;
        if zone.is_root() {
            return Err(ConfigError::Zone {
                zone: self.zone.clone(),
            });
        }
        let mut nameservers = Vec::new();
        for ns in &self.nameservers {
            let name = parse_name(&ns.name).ok_or_else(|| ConfigError::Nameserver {
                name: ns.name.clone(),
            })?;
            if ns.addresses.is_empty() && zone.zone_of(&name) {
                return Err(ConfigError::Glue {
                    name: ns.name.clone(),
                });
            }
            nameservers.push((name, ns.addresses.clone()));
        }
        if nameservers.is_empty() {
            let address = match bound.ip() {
                ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                ip => ip,
            };
            let name = Name::from_ascii("ns")
                .and_then(|ns| ns.append_domain(&zone))
                .map_err(|_| ConfigError::Zone {
                    zone: self.zone.clone(),
                })?;
            nameservers.push((name, vec![address]));
        }
        let range = |field, problem| ConfigError::Range { field, problem };
        if self.ttl > Duration::from_secs(86_400) {
            return Err(range("ttl", "must be at most one day"));
        }
        if self.negative_ttl > Duration::from_secs(86_400) {
            return Err(range("negative_ttl", "must be at most one day"));
        }
        if self.generation_poll > Duration::from_secs(1) {
            return Err(range("generation_poll", "must be at most 1 s"));
        }
        if self.delay_limit > Duration::from_secs(60) {
            return Err(range("delay_limit", "must be at most 60 s"));
        }
        let l = &self.limits;
        if l.max_tcp_connections == 0 {
            return Err(range("limits.max_tcp_connections", "must be at least 1"));
        }
        if l.max_tcp_per_prefix == 0 {
            return Err(range("limits.max_tcp_per_prefix", "must be at least 1"));
        }
        if l.tcp_idle_timeout.is_zero() {
            return Err(range("limits.tcp_idle_timeout", "must be positive"));
        }
        if l.v4_prefix > 32 || l.v6_prefix > 128 {
            return Err(range(
                "limits.v4_prefix/v6_prefix",
                "exceed the address length",
            ));
        }
        if l.cache_entries == 0 || l.limiter_slots == 0 {
            return Err(range(
                "limits.cache_entries/limiter_slots",
                "must be at least 1",
            ));
        }
        if l.udp_workers > 64 || l.max_delayed > 65_536 || l.max_tcp_connections > 65_536 {
            return Err(range(
                "limits",
                "worker or connection counts are implausibly high",
            ));
        }
        Ok(Checked { zone, nameservers })
    }

    /// UDP receive loops to run.
    pub(crate) fn udp_workers(&self) -> usize {
        match self.limits.udp_workers {
            0 => std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
                .min(4),
            n => n,
        }
    }
}

pub(crate) fn parse_name(text: &str) -> Option<Name> {
    let mut name = Name::from_ascii(text.trim_end_matches('.')).ok()?;
    name.set_fqdn(true);
    let name = name.to_lowercase();
    let ldh = name.iter().all(|label| {
        !label.is_empty()
            && label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    });
    ldh.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5300))
    }

    #[test]
    fn default_gets_a_nameserver_at_the_listen_address() {
        let checked = DnsConfig::default().check(bound()).expect("valid");
        assert_eq!(checked.zone.to_string(), "revboot.test.");
        assert_eq!(checked.nameservers.len(), 1);
        assert_eq!(checked.nameservers[0].0.to_string(), "ns.revboot.test.");
        assert_eq!(checked.nameservers[0].1, [IpAddr::from([127, 0, 0, 1])]);
    }

    #[test]
    fn a_nameserver_inside_the_zone_needs_glue() {
        let config = |addresses: Vec<IpAddr>, name: &str| DnsConfig {
            nameservers: vec![Nameserver {
                name: name.to_owned(),
                addresses,
            }],
            ..DnsConfig::default()
        };
        let error = config(Vec::new(), "ns1.revboot.test")
            .check(bound())
            .expect_err("no glue");
        assert!(error.to_string().contains("ns1.revboot.test"), "{error}");
        assert!(error.to_string().contains("glue"), "{error}");
        // Outside the zone its addresses are the other zone's business.
        config(Vec::new(), "ns.elsewhere.example")
            .check(bound())
            .expect("no glue needed");
        let both = vec![
            IpAddr::from([192, 0, 2, 1]),
            "2001:db8::1".parse().expect("v6"),
        ];
        let checked = config(both.clone(), "ns1.revboot.test")
            .check(bound())
            .expect("glue of both families");
        assert_eq!(checked.nameservers[0].1, both);
    }

    #[test]
    fn bad_zones_are_refused_by_name() {
        for zone in ["", ".", "bad zone", "a..b"] {
            let config = DnsConfig {
                zone: zone.to_owned(),
                ..DnsConfig::default()
            };
            let error = config.check(bound()).expect_err(zone);
            assert!(error.to_string().starts_with("Zone"), "{error}");
        }
    }

    #[test]
    fn zone_is_lowercased() {
        let config = DnsConfig {
            zone: "Dev.Example.".to_owned(),
            ..DnsConfig::default()
        };
        let checked = config.check(bound()).expect("valid");
        assert_eq!(checked.zone.to_string(), "dev.example.");
    }

    #[test]
    fn out_of_range_limits_name_the_field() {
        let mut config = DnsConfig::default();
        config.limits.max_tcp_connections = 0;
        let error = config.check(bound()).expect_err("zero connections");
        assert!(error.to_string().contains("max_tcp_connections"), "{error}");
        let mut config = DnsConfig::default();
        config.limits.max_tcp_per_prefix = 0;
        let error = config
            .check(bound())
            .expect_err("zero connections per prefix");
        assert!(error.to_string().contains("max_tcp_per_prefix"), "{error}");
    }
}
