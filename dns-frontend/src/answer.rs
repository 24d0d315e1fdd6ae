//! Working out the answer to one query (the rules are in the crate docs).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, OpCode, Query as Question, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::rdata::{NS, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use revboot_deployer::{Activity, Family, Instances, ResolveError, ServiceAddresses, SummonError};
use revboot_store::name::{self, Shape};
use tracing::{debug, warn};

use crate::cache::{Answer, Link, Rendered, Scope};
use crate::config::{Checked, DnsConfig};
use crate::limit::{PrefixLimiter, Verdict};
use crate::metrics::{Event, Metrics};
use crate::wire::{self, Query};

/// The UDP payload size this server advertises and sends at most (DNS flag day 2020).
pub const EDNS_UDP_SIZE: u16 = 1232;
/// Seconds since the epoch as a serial (RFC 1982 arithmetic wraps it in 2106).
fn unix_serial() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// TTL of the apex records (SOA, NS) and of name server addresses.
const ZONE_TTL: u32 = 300;
/// EDNS option code of Extended DNS Errors (RFC 8914).
const OPTION_EDE: u16 = 15;
/// EDE info code "Other".
const EDE_OTHER: u16 = 0;
/// EDE info code "Not Ready".
const EDE_NOT_READY: u16 = 14;
/// EDE info code "Prohibited".
const EDE_PROHIBITED: u16 = 18;

/// What answering a query needs; shared by every receive loop.
pub(crate) struct Engine {
    zone: Name,
    zone_labels: Vec<Vec<u8>>,
    /// Name servers: lowercased wire name, name, addresses.
    nameservers: Arc<Vec<crate::nameservers::Entry>>,
    /// Name servers as they change, when none is configured (used when not empty).
    shared_nameservers: Option<crate::Nameservers>,
    /// The SOA serial (low half) and the deployer generation it was taken for (its low 32
    /// bits, high half): one word, so negative answers read it without a lock.
    serial: std::sync::atomic::AtomicU64,
    hostmaster: Name,
    ttl: u32,
    negative_ttl: u32,
    delay: Option<Duration>,
    trust_ecs: bool,
    /// The front door's addresses, for services reached there only.
    front: Option<ServiceAddresses>,
    instances: Arc<dyn Instances>,
    challenges: crate::Challenges,
    boots: PrefixLimiter,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("zone", &self.zone).finish()
    }
}

/// A worked-out answer and what to do with it.
#[derive(Debug)]
pub(crate) struct Worked {
    /// The answer.
    pub answer: Arc<Answer>,
    /// Where it may be cached (`None`: not at all).
    pub cache: Option<Scope>,
    /// The name is per-client: mark the shared key.
    pub per_client: bool,
    /// Delayed mode: send only once the instance serves, waiting at most this long.
    pub wait: Option<Duration>,
}

/// A response being put together.
#[derive(Debug, Default)]
struct Reply {
    rcode: u16,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    ede: Option<(u16, String)>,
    /// Client Subnet scope prefix to echo (only when the query carried a trusted subnet).
    subnet_scope: Option<u8>,
}

impl Engine {
    pub fn new(
        config: &DnsConfig,
        checked: &Checked,
        instances: Arc<dyn Instances>,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let nameservers = Arc::new(
            checked
                .nameservers
                .iter()
                .map(|(name, addresses)| {
                    (wire::lowercase_name(name), name.clone(), addresses.clone())
                })
                .collect(),
        );
        let shared_nameservers = config
            .shared_nameservers
            .clone()
            .filter(|_| config.nameservers.is_empty());
        let hostmaster = Name::from_ascii("hostmaster")
            .and_then(|h| h.append_domain(&checked.zone))
            .unwrap_or_else(|_| checked.zone.clone());
        let l = &config.limits;
        Engine {
            zone_labels: checked.zone.iter().map(<[u8]>::to_vec).collect(),
            zone: checked.zone.clone(),
            nameservers,
            shared_nameservers,
            serial: std::sync::atomic::AtomicU64::new(
                u64::from(u32::MAX) << 32 | u64::from(unix_serial()),
            ),
            hostmaster,
            ttl: secs(config.ttl),
            negative_ttl: secs(config.negative_ttl),
            delay: config.delayed_answers.then_some(config.delay_limit),
            trust_ecs: config.trust_ecs,
            front: config.front.iter().fold(None, |front, &address| {
                Some(
                    front.map_or(ServiceAddresses::one(address), |f: ServiceAddresses| {
                        f.with(address)
                    }),
                )
            }),
            instances,
            challenges: config.challenges.clone(),
            boots: PrefixLimiter::new(
                l.limiter_slots,
                l.boots_per_second,
                l.boot_burst,
                l.v4_prefix,
                l.v6_prefix,
            ),
            metrics,
        }
    }

    pub fn instances(&self) -> &dyn Instances {
        &*self.instances
    }

    pub fn trust_ecs(&self) -> bool {
        self.trust_ecs
    }

    pub fn delayed(&self) -> bool {
        self.delay.is_some()
    }

    /// The client a query speaks for: the trusted Client Subnet, else the source address.
    pub fn client(&self, query: &Query<'_>, source: IpAddr) -> IpAddr {
        match query.edns.and_then(|e| e.subnet) {
            Some(subnet) if self.trust_ecs => subnet.address,
            _ => source,
        }
    }

    /// Works out the answer to `query` (`lowercase`: its lowercased name) from `source`; a
    /// query of EDNS version above 0 has had its [`bad_version`](Self::bad_version) answer.
    pub fn work(
        &self,
        query: &Query<'_>,
        lowercase: &[u8],
        source: IpAddr,
        generation: u64,
    ) -> Worked {
        let client = self.client(query, source);
        let echo_subnet = self.trust_ecs && query.edns.is_some_and(|e| e.subnet.is_some());
        let mut worked = self.decide(query, lowercase, client, generation);
        if echo_subnet {
            // An answer for a subnet is not shared across subnets; keep it out of the cache.
            worked.cache = None;
            worked.per_client = false;
        }
        worked
    }

    fn decide(
        &self,
        query: &Query<'_>,
        lowercase: &[u8],
        client: IpAddr,
        generation: u64,
    ) -> Worked {
        let plain = |reply: Reply, cache: Option<Scope>| Worked {
            answer: Arc::new(Answer {
                rendered: self.render(query, lowercase, reply),
                link: None,
            }),
            cache,
            per_client: false,
            wait: None,
        };
        let qtype = RecordType::from(query.qtype);
        match qtype {
            RecordType::OPT => return plain(rcode(ResponseCode::FormErr), None),
            RecordType::AXFR | RecordType::IXFR => {
                return plain(rcode(ResponseCode::Refused), Some(Scope::Shared));
            }
            _ => {}
        }
        if query.qclass != u16::from(DNSClass::IN) && query.qclass != u16::from(DNSClass::ANY) {
            return plain(rcode(ResponseCode::Refused), Some(Scope::Shared));
        }
        // Answers holding a shared set of name servers are not cached: it changes.
        let zone_scope = self.shared_nameservers.is_none().then_some(Scope::Shared);
        let nameservers = self.nameservers();
        if let Some((_, name, addresses)) = nameservers.iter().find(|(w, ..)| w == lowercase) {
            let records: Vec<Record> = addresses
                .iter()
                .filter_map(|address| address_record(name, *address, qtype, ZONE_TTL))
                .collect();
            let reply = if records.is_empty() {
                self.nodata(generation)
            } else {
                self.positive(records)
            };
            return plain(reply, zone_scope);
        }
        let shape = name::classify(wire::labels(lowercase), &self.zone_labels);
        if crate::challenge::is_challenge(lowercase) && !matches!(shape, Shape::Outside) {
            // ACME DNS-01 (crate::challenge): never cached, so a new value is seen at once.
            return plain(self.challenge(lowercase, qtype, generation), None);
        }
        let (service, label) = match shape {
            Shape::Outside => return plain(rcode(ResponseCode::Refused), Some(Scope::Shared)),
            Shape::Apex => return plain(self.apex(qtype, generation), zone_scope),
            Shape::Nothing => return plain(self.nxdomain(generation), Some(Scope::Shared)),
            Shape::Live { service } => (service, None),
            Shape::Label { label, service } => (service, Some(label)),
        };
        let resolved = match self.instances.resolve(service, label) {
            Ok(resolved) => resolved,
            Err(error) => {
                let (reply, cache) = self.resolve_failure(&error, label.is_none(), generation);
                return plain(reply, cache);
            }
        };
        if !matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY) {
            return plain(self.nodata(generation), Some(Scope::Shared));
        }
        if let Verdict::Refuse(_) = self.boots.check(client) {
            self.metrics.event(Event::BootLimited);
            debug!(%client, service, "boot rate limit");
            let reply = Reply {
                rcode: u16::from(ResponseCode::Refused),
                ede: Some((
                    EDE_PROHIBITED,
                    "Too many instance summons from your network; retry shortly".to_owned(),
                )),
                ..Reply::default()
            };
            return plain(reply, None);
        }
        let for_client = resolved.per_client.then_some(client);
        self.metrics.event(Event::Summon);
        let summoned = match self
            .instances
            .summon(service, &resolved.revision, for_client)
        {
            Ok(summoned) => summoned,
            Err(SummonError::Resolve(error)) => {
                let (reply, cache) = self.resolve_failure(&error, label.is_none(), generation);
                return plain(reply, cache);
            }
            Err(error) => {
                // The deployer logs lasting refusals (caps, back-off), not every one of them.
                if error.is_lasting() {
                    debug!(%error, service, revision = %resolved.revision, "summon refused");
                } else {
                    warn!(%error, service, revision = %resolved.revision, "summon refused");
                }
                let reply = Reply {
                    rcode: u16::from(ResponseCode::ServFail),
                    ede: Some((EDE_OTHER, error.to_string())),
                    ..Reply::default()
                };
                return plain(reply, None);
            }
        };
        let subnet_scope = resolved
            .per_client
            .then(|| query.edns.and_then(|e| e.subnet))
            .flatten()
            .map(|subnet| subnet.source_prefix);
        // A service reached through the front door only is answered with the front door's
        // address; without a front door, every service is answered with its own.
        let addresses = match &self.front {
            Some(front) if !resolved.reach.own_address() => front,
            _ => &summoned.addresses,
        };
        let address = match qtype {
            RecordType::A => addresses.of(Family::Ipv4),
            RecordType::AAAA => addresses.of(Family::Ipv6),
            _ => addresses.iter().next(),
        };
        let rendered = if let Some(address) = address.filter(|a| family_matches(*a, qtype)) {
            self.address_response(query, lowercase, address, subnet_scope)
        } else {
            let reply = Reply {
                subnet_scope,
                ..self.nodata(generation)
            };
            self.render(query, lowercase, reply)
        };
        self.instances.activity(&summoned.key, Activity::Query);
        let wait = match self.delay {
            Some(limit) if !summoned.state.borrow().is_serving() => {
                Some(limit.min(summoned.boot_timeout))
            }
            _ => None,
        };
        let cache = Some(match for_client {
            Some(client) => Scope::Client(client),
            None => Scope::Shared,
        });
        Worked {
            answer: Arc::new(Answer {
                rendered,
                link: Some(Link {
                    key: summoned.key,
                    state: summoned.state,
                    reported_ms: AtomicU64::new(0),
                }),
            }),
            cache,
            per_client: resolved.per_client,
            wait,
        }
    }

    /// BADVERS, with an OPT record of version 0 (RFC 6891 §6.1.3), if `query` asks for an EDNS
    /// version above 0. The server asks this before its cache and [`work`](Self::work): no
    /// answer, cached or not, goes to a version this server does not speak.
    pub fn bad_version(&self, query: &Query<'_>, lowercase: &[u8]) -> Option<Rendered> {
        query
            .edns
            .is_some_and(|e| e.version > 0)
            .then(|| self.render(query, lowercase, rcode(ResponseCode::BADVERS)))
    }

    /// The answer when a delayed instance did not become ready in time.
    pub fn not_ready(&self, query: &Query<'_>, lowercase: &[u8], why: String) -> Rendered {
        let reply = Reply {
            rcode: u16::from(ResponseCode::ServFail),
            ede: Some((EDE_NOT_READY, why)),
            ..Reply::default()
        };
        self.render(query, lowercase, reply)
    }

    fn resolve_failure(
        &self,
        error: &ResolveError,
        live: bool,
        generation: u64,
    ) -> (Reply, Option<Scope>) {
        match error {
            ResolveError::UnknownService(_) => (self.nxdomain(generation), Some(Scope::Shared)),
            // `<service>.<zone>` exists as the parent of its labels even with no live revision.
            ResolveError::UnknownLabel { .. } if live => {
                (self.nodata(generation), Some(Scope::Shared))
            }
            ResolveError::UnknownLabel { .. } => (self.nxdomain(generation), Some(Scope::Shared)),
            ResolveError::Ambiguous { .. } => {
                let reply = Reply {
                    rcode: u16::from(ResponseCode::Refused),
                    ede: Some((EDE_OTHER, error.to_string())),
                    ..Reply::default()
                };
                (reply, Some(Scope::Shared))
            }
            // Asked again once built; the answer is not cached meanwhile.
            ResolveError::Building(why) => {
                let reply = Reply {
                    rcode: u16::from(ResponseCode::ServFail),
                    ede: Some((EDE_NOT_READY, why.clone())),
                    ..Reply::default()
                };
                (reply, None)
            }
            ResolveError::NotBootable { .. } => {
                let mut reply = self.nodata(generation);
                reply.ede = Some((EDE_OTHER, error.to_string()));
                (reply, Some(Scope::Shared))
            }
            other => {
                warn!(error = %other, "resolve failed");
                let reply = Reply {
                    rcode: u16::from(ResponseCode::ServFail),
                    ede: Some((EDE_OTHER, other.to_string())),
                    ..Reply::default()
                };
                (reply, None)
            }
        }
    }

    fn apex(&self, qtype: RecordType, generation: u64) -> Reply {
        let mut reply = self.positive(Vec::new());
        if matches!(qtype, RecordType::SOA | RecordType::ANY) {
            reply.answers.push(self.soa(generation, ZONE_TTL));
        }
        if matches!(qtype, RecordType::NS | RecordType::ANY) {
            for (_, name, addresses) in self.nameservers().iter() {
                let ns =
                    Record::from_rdata(self.zone.clone(), ZONE_TTL, RData::NS(NS(name.clone())));
                reply.answers.push(ns);
                if self.zone.zone_of(name) {
                    let glue = addresses.iter().flat_map(|address| {
                        [RecordType::A, RecordType::AAAA]
                            .into_iter()
                            .filter_map(|t| address_record(name, *address, t, ZONE_TTL))
                    });
                    reply.additionals.extend(glue);
                }
            }
        }
        if reply.answers.is_empty() {
            return self.nodata(generation);
        }
        reply
    }

    /// The TXT records of an `_acme-challenge` name; NXDOMAIN when none is published.
    fn challenge(&self, lowercase: &[u8], qtype: RecordType, generation: u64) -> Reply {
        let Some(name) = name_of(lowercase) else {
            return self.nxdomain(generation);
        };
        let values = self.challenges.values(&name.to_ascii());
        if values.is_empty() {
            return self.nxdomain(generation);
        }
        if !matches!(qtype, RecordType::TXT | RecordType::ANY) {
            return self.nodata(generation);
        }
        self.positive(
            values
                .into_iter()
                .map(|value| Record::from_rdata(name.clone(), 0, RData::TXT(TXT::new(vec![value]))))
                .collect(),
        )
    }

    /// The name servers answered: the shared set when one is published, else the
    /// configured ones (or the default).
    fn nameservers(&self) -> Arc<Vec<crate::nameservers::Entry>> {
        match &self.shared_nameservers {
            Some(shared) => {
                let set = shared.current();
                if set.is_empty() {
                    self.nameservers.clone()
                } else {
                    set
                }
            }
            None => self.nameservers.clone(),
        }
    }

    fn positive(&self, answers: Vec<Record>) -> Reply {
        Reply {
            authoritative: true,
            answers,
            ..Reply::default()
        }
    }

    fn nodata(&self, generation: u64) -> Reply {
        Reply {
            authoritative: true,
            authorities: vec![self.soa(generation, self.negative_ttl)],
            ..Reply::default()
        }
    }

    fn nxdomain(&self, generation: u64) -> Reply {
        Reply {
            rcode: u16::from(ResponseCode::NXDomain),
            ..self.nodata(generation)
        }
    }

    /// The SOA serial for `generation`: it moves with every change of the deployer's
    /// generation (every deployment, live move or stock-git write to the repository), to the
    /// current time in seconds or one more than before, whichever is higher, so it never goes
    /// back, across restarts too (the generation itself starts again at each start).
    fn serial(&self, generation: u64) -> u32 {
        use std::sync::atomic::Ordering;
        let generation = generation as u32;
        let update = self
            .serial
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
                let (seen, serial) = ((packed >> 32) as u32, packed as u32);
                (seen != generation).then(|| {
                    let next = unix_serial().max(serial.wrapping_add(1));
                    u64::from(generation) << 32 | u64::from(next)
                })
            });
        // Err holds the word as it stands (this generation already seen); after a move,
        // the word as it stands now.
        let packed = update.map_or_else(|current| current, |_| self.serial.load(Ordering::Acquire));
        packed as u32
    }

    fn soa(&self, generation: u64, ttl: u32) -> Record {
        let mname = self
            .nameservers()
            .first()
            .map_or_else(|| self.zone.clone(), |(_, name, _)| name.clone());
        let soa = SOA::new(
            mname,
            self.hostmaster.clone(),
            self.serial(generation),
            3600,
            600,
            86_400,
            self.negative_ttl,
        );
        Record::from_rdata(self.zone.clone(), ttl, RData::SOA(soa))
    }

    /// The positive answer naming an instance's `address` (of the family the query asks
    /// for), written straight to the wire (see [`wire::address_response`]).
    fn address_response(
        &self,
        query: &Query<'_>,
        lowercase: &[u8],
        address: IpAddr,
        subnet_scope: Option<u8>,
    ) -> Rendered {
        let opt = query.edns.map(|edns| wire::ResponseOpt {
            udp_size: EDNS_UDP_SIZE,
            dnssec_ok: edns.dnssec_ok,
            subnet: edns
                .subnet
                .filter(|_| self.trust_ecs)
                .map(|subnet| (subnet, subnet_scope.unwrap_or(0))),
        });
        let (full, truncated) = wire::address_response(query, lowercase, address, self.ttl, opt);
        Rendered {
            full,
            truncated,
            rcode: 0,
        }
    }

    /// Renders `reply` for `query`, with the question name lowercased.
    fn render(&self, query: &Query<'_>, lowercase: &[u8], reply: Reply) -> Rendered {
        let code = <ResponseCode as From<u16>>::from(reply.rcode);
        let mut message = Message::response(query.id, OpCode::Query);
        message.metadata.authoritative = reply.authoritative;
        message.metadata.recursion_desired = query.rd;
        message.metadata.checking_disabled = query.cd;
        message.metadata.response_code = code;
        if let Some(name) = name_of(lowercase) {
            let mut question = Question::query(name, RecordType::from(query.qtype));
            question.set_query_class(DNSClass::from(query.qclass));
            message.add_query(question);
        }
        if let Some(edns) = query.edns {
            let mut opt = Edns::new();
            opt.set_max_payload(EDNS_UDP_SIZE);
            opt.set_version(0);
            opt.set_dnssec_ok(edns.dnssec_ok);
            if let Some((info, text)) = &reply.ede {
                let mut value = info.to_be_bytes().to_vec();
                value.extend_from_slice(text.as_bytes());
                opt.options_mut()
                    .insert(EdnsOption::Unknown(OPTION_EDE, value));
            }
            if let Some(subnet) = edns.subnet.filter(|_| self.trust_ecs) {
                let scope = reply.subnet_scope.unwrap_or(0);
                opt.options_mut()
                    .insert(EdnsOption::Subnet(ClientSubnet::new(
                        subnet.address,
                        subnet.source_prefix,
                        scope,
                    )));
            }
            message.set_edns(opt);
        }
        message.answers = reply.answers;
        message.authorities = reply.authorities;
        message.additionals = reply.additionals;
        let full = message.to_vec();
        message.answers.clear();
        message.authorities.clear();
        message.additionals.clear();
        message.metadata.truncation = true;
        let truncated = message.to_vec();
        match (full, truncated) {
            (Ok(full), Ok(truncated)) => Rendered {
                full,
                truncated,
                rcode: reply.rcode,
            },
            (Err(error), _) | (_, Err(error)) => {
                warn!(%error, "response did not encode");
                let header = wire::Header {
                    id: query.id,
                    opcode: 0,
                    rd: query.rd,
                };
                let bytes = header.error_response(2).to_vec();
                Rendered {
                    full: bytes.clone(),
                    truncated: bytes,
                    rcode: 2,
                }
            }
        }
    }
}

fn rcode(code: ResponseCode) -> Reply {
    Reply {
        rcode: u16::from(code),
        ..Reply::default()
    }
}

/// Whether `address` is of the family `qtype` asks for.
fn family_matches(address: IpAddr, qtype: RecordType) -> bool {
    match address {
        IpAddr::V4(_) => matches!(qtype, RecordType::A | RecordType::ANY),
        IpAddr::V6(_) => matches!(qtype, RecordType::AAAA | RecordType::ANY),
    }
}

/// An A or AAAA record for `address` if it is of the family `qtype` asks for.
fn address_record(owner: &Name, address: IpAddr, qtype: RecordType, ttl: u32) -> Option<Record> {
    family_matches(address, qtype)
        .then(|| Record::from_rdata(owner.clone(), ttl, RData::from(address)))
}

/// Parses a (validated, uncompressed) wire name.
fn name_of(wire_name: &[u8]) -> Option<Name> {
    Name::read(&mut BinDecoder::new(wire_name)).ok()
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::wire::Subnet;

    fn engine(trust_ecs: bool) -> Engine {
        let (config, checked) = crate::testing::config(trust_ecs);
        Engine::new(
            &config,
            &checked,
            crate::testing::hello(),
            Arc::new(Metrics::default()),
        )
    }

    /// The NS names and glue addresses of the apex's answer.
    fn ns_of(engine: &Engine) -> (Vec<String>, Vec<IpAddr>) {
        let reply = engine.apex(RecordType::NS, 0);
        let names = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::NS(ns) => Some(ns.0.to_ascii()),
                _ => None,
            })
            .collect();
        let glue = reply
            .additionals
            .iter()
            .filter_map(|r| r.data.ip_addr())
            .collect();
        (names, glue)
    }

    #[test]
    fn a_shared_set_of_name_servers_is_answered_unless_some_are_configured() {
        let shared = crate::Nameservers::new();
        let (mut config, checked) = crate::testing::config(false);
        config.shared_nameservers = Some(shared.clone());
        let engine = Engine::new(
            &config,
            &checked,
            crate::testing::hello(),
            Arc::new(Metrics::default()),
        );
        // Nothing published yet: the default.
        assert_eq!(ns_of(&engine).0, ["ns.revboot.test."]);
        let set = [("n1", "192.0.2.1"), ("n2", "2001:db8::2")].map(|(id, ip)| crate::Nameserver {
            name: format!("{id}.ns.revboot.test"),
            addresses: vec![ip.parse().expect("an address")],
        });
        shared.set(&set).expect("published");
        let (names, glue) = ns_of(&engine);
        assert_eq!(names, ["n1.ns.revboot.test.", "n2.ns.revboot.test."]);
        assert_eq!(
            glue,
            set.iter().map(|ns| ns.addresses[0]).collect::<Vec<_>>()
        );
        // Named by hand: those win.
        config.nameservers = vec![crate::Nameserver {
            name: "ns1.example.com".to_owned(),
            addresses: Vec::new(),
        }];
        let checked = config
            .check(std::net::SocketAddr::from(([127, 0, 0, 1], 53)))
            .expect("valid");
        let engine = Engine::new(
            &config,
            &checked,
            crate::testing::hello(),
            Arc::new(Metrics::default()),
        );
        assert_eq!(ns_of(&engine).0, ["ns1.example.com."]);
    }

    /// A query for `<label>.hello.revboot.test` as a client might send it.
    fn packet(
        id: u16,
        flags: (bool, bool),
        label: &str,
        qtype: u16,
        qclass: u16,
        edns: Option<(bool, Option<Subnet>)>,
    ) -> Vec<u8> {
        let (rd, cd) = flags;
        let mut p = id.to_be_bytes().to_vec();
        p.push(u8::from(rd));
        p.push(u8::from(cd) << 4);
        p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for part in [label, "Hello", "REVBOOT", "test"] {
            p.push(part.len() as u8);
            p.extend_from_slice(part.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&qclass.to_be_bytes());
        if let Some((dnssec_ok, subnet)) = edns {
            p.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
            let mut options = Vec::new();
            if let Some(subnet) = subnet {
                let (family, octets) = match subnet.address {
                    IpAddr::V4(ip) => (1u16, ip.octets().to_vec()),
                    IpAddr::V6(ip) => (2u16, ip.octets().to_vec()),
                };
                let given = &octets[..usize::from(subnet.source_prefix).div_ceil(8)];
                options.extend_from_slice(&8u16.to_be_bytes());
                options.extend_from_slice(&(4 + given.len() as u16).to_be_bytes());
                options.extend_from_slice(&family.to_be_bytes());
                options.extend_from_slice(&[subnet.source_prefix, 0]);
                options.extend_from_slice(given);
            }
            p.extend_from_slice(&(options.len() as u16).to_be_bytes());
            p.extend_from_slice(&options);
        }
        p
    }

    /// An address with the bits past `prefix` cleared, as a well-formed Client Subnet has.
    fn subnet(address: IpAddr, prefix: u8) -> Subnet {
        let address = match address {
            IpAddr::V4(ip) => {
                let prefix = prefix % 33;
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                let ip = Ipv4Addr::from(u32::from(ip) & mask);
                return Subnet {
                    address: IpAddr::V4(ip),
                    source_prefix: prefix,
                };
            }
            IpAddr::V6(ip) => ip,
        };
        let prefix = prefix % 129;
        let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
        Subnet {
            address: IpAddr::V6(Ipv6Addr::from(u128::from(address) & mask)),
            source_prefix: prefix,
        }
    }

    fn addresses() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

        /// The answer naming an instance is written straight to the wire; it must be what
        /// the general encoder (hickory's) writes for the same reply, byte for byte, in its
        /// full and its truncated form.
        #[test]
        fn the_direct_address_answer_is_what_the_encoder_writes(
            id in any::<u16>(),
            flags in any::<(bool, bool)>(),
            label in "[a-fA-F0-9]{7,12}",
            ask_any in any::<bool>(),
            qclass in prop_oneof![Just(1u16), Just(255u16)],
            edns in proptest::option::of((any::<bool>(), proptest::option::of((addresses(), any::<u8>())))),
            address in addresses(),
            trust_ecs in any::<bool>(),
            per_client in any::<bool>(),
        ) {
            let edns = edns.map(|(dnssec_ok, given)| {
                (dnssec_ok, given.map(|(address, prefix)| subnet(address, prefix)))
            });
            // A, AAAA or ANY, of the address's family (another type is not this answer).
            let qtype = match (ask_any, address) {
                (true, _) => 255,
                (false, IpAddr::V4(_)) => 1,
                (false, IpAddr::V6(_)) => 28,
            };
            let packet = packet(id, flags, &label, qtype, qclass, edns);
            let query = wire::parse(&packet, trust_ecs).expect("a well-formed query");
            let mut lowercase = Vec::new();
            wire::push_lowercase(query.qname(), &mut lowercase);
            let engine = engine(trust_ecs);
            let record_type = RecordType::from(qtype);
            let subnet_scope = per_client
                .then(|| query.edns.and_then(|e| e.subnet))
                .flatten()
                .map(|subnet| subnet.source_prefix);
            let owner = name_of(&lowercase).expect("a name");
            let record = address_record(&owner, address, record_type, engine.ttl).expect("a record");
            let reply = Reply {
                subnet_scope,
                ..engine.positive(vec![record])
            };
            let general = engine.render(&query, &lowercase, reply);
            let direct = engine.address_response(&query, &lowercase, address, subnet_scope);
            prop_assert_eq!(&direct.full, &general.full);
            prop_assert_eq!(&direct.truncated, &general.truncated);
            prop_assert_eq!(direct.rcode, general.rcode);
        }
    }
}
