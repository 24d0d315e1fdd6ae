//! The path of one packet, shared by the UDP workers and the TCP connections.
//!
//! 1. Parse (ignore / FORMERR / NOTIMP) → response-rate limit (UDP only) → BADVERS for an
//!    EDNS version above 0 → answer cache (valid for one deployer generation) → the engine
//!    (resolve, summon) → the response, truncated with TC over UDP if it exceeds the
//!    requestor's payload size (512 without EDNS, at most 1232).
//! 2. A delayed answer (delayed mode) is handed back to the loop, which waits for the
//!    instance on the tokio runtime (bounded by `max_delayed`) and then writes it.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use revboot_deployer::{Activity, Instances};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tracing::debug;

use crate::answer::{EDNS_UDP_SIZE, Engine};
use crate::cache::{self, Answer, AnswerCache, Found, Rendered, Scope};
use crate::config::{Checked, DnsConfig};
use crate::limit::{PrefixLimiter, Verdict};
use crate::metrics::{Event, Metrics};
use crate::wire::{self, HEADER_LEN, MAX_MESSAGE, Query, Rejected};

/// Per-loop buffers, reused from packet to packet.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    lowercase: Vec<u8>,
    key: Vec<u8>,
    pub(crate) out: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What to do after handling a packet.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send `scratch.out`.
    Send,
    /// Send nothing.
    Nothing,
    /// Send once the instance is ready (delayed mode).
    Delay(Delayed),
}

#[derive(Debug)]
pub(crate) struct Delayed {
    answer: Arc<Answer>,
    wait: Duration,
    packet: Vec<u8>,
}

/// Everything the loops share.
#[derive(Debug)]
pub(crate) struct Shared {
    engine: Engine,
    cache: AnswerCache,
    rrl: PrefixLimiter,
    slip: u32,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) delayed: Arc<Semaphore>,
    pub(crate) max_delayed: usize,
    pub(crate) tcp_idle: Duration,
    pub(crate) workers: usize,
    activity_ms: u64,
    generation_poll_us: u64,
    /// The deployer's generation as last asked, and when (µs since `epoch`).
    generation: AtomicU64,
    generation_at_us: AtomicU64,
    epoch: Instant,
}

impl Shared {
    pub(crate) fn new(
        config: &DnsConfig,
        checked: &Checked,
        instances: Arc<dyn Instances>,
    ) -> Shared {
        let metrics = Arc::new(Metrics::default());
        let l = &config.limits;
        let shared = Shared {
            engine: Engine::new(config, checked, instances, metrics.clone()),
            cache: AnswerCache::new(l.cache_entries),
            rrl: PrefixLimiter::new(
                l.limiter_slots,
                l.rrl_per_second,
                l.rrl_burst,
                l.v4_prefix,
                l.v6_prefix,
            ),
            slip: l.rrl_slip,
            metrics,
            delayed: Arc::new(Semaphore::new(l.max_delayed)),
            max_delayed: l.max_delayed,
            tcp_idle: l.tcp_idle_timeout,
            workers: config.udp_workers(),
            activity_ms: u64::try_from(l.activity_interval.as_millis()).unwrap_or(u64::MAX),
            generation_poll_us: u64::try_from(config.generation_poll.as_micros())
                .unwrap_or(u64::MAX),
            generation: AtomicU64::new(0),
            generation_at_us: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        shared.poll_generation();
        shared
    }

    /// Handles one message from `source`.
    pub(crate) fn handle(
        &self,
        packet: &[u8],
        source: IpAddr,
        transport: Transport,
        s: &mut Scratch,
    ) -> Step {
        let query = match wire::parse(packet, self.engine.trust_ecs()) {
            Ok(query) => query,
            Err(Rejected::Ignore) => {
                self.metrics.event(Event::Ignored);
                return Step::Nothing;
            }
            Err(Rejected::FormErr(header)) => return self.header_only(&header, 1, s),
            Err(Rejected::NotImp(header)) => return self.header_only(&header, 4, s),
        };
        if transport == Transport::Udp
            && let Verdict::Refuse(refused) = self.rrl.check(source)
        {
            if self.slip != 0 && refused % self.slip == 0 {
                slipped(&query, &mut s.out);
                self.metrics.event(Event::Truncated);
                self.metrics.response(0);
                return Step::Send;
            }
            self.metrics.event(Event::RateLimited);
            return Step::Nothing;
        }
        s.lowercase.clear();
        wire::push_lowercase(query.qname(), &mut s.lowercase);
        // Before the cache, whose keys do not hold the EDNS version.
        if let Some(rendered) = self.engine.bad_version(&query, &s.lowercase) {
            self.emit(&rendered, &query, transport, &mut s.out);
            return Step::Send;
        }
        let generation = self.generation();
        self.cache.sync(generation);
        let subnet_query =
            self.engine.trust_ecs() && query.edns.is_some_and(|e| e.subnet.is_some());
        if !subnet_query && let Some(answer) = self.cached(&query, source, s) {
            self.metrics.event(Event::CacheHit);
            self.report_activity(&answer);
            self.emit(&answer.rendered, &query, transport, &mut s.out);
            return Step::Send;
        }
        self.metrics.event(Event::CacheMiss);
        let worked = self.engine.work(&query, &s.lowercase, source, generation);
        if let Some(scope) = worked.cache {
            cache::key(&query, &s.lowercase, scope, &mut s.key);
            self.cache.put(&s.key, worked.answer.clone(), generation);
            if worked.per_client {
                cache::key(&query, &s.lowercase, Scope::Shared, &mut s.key);
                self.cache.put_per_client(&s.key, generation);
            }
        }
        if let Some(link) = &worked.answer.link {
            link.reported_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        if let Some(wait) = worked.wait {
            return Step::Delay(Delayed {
                answer: worked.answer,
                wait,
                packet: packet.to_vec(),
            });
        }
        self.emit(&worked.answer.rendered, &query, transport, &mut s.out);
        Step::Send
    }

    /// A usable cached answer for `query`, if there is one.
    fn cached(&self, query: &Query<'_>, source: IpAddr, s: &mut Scratch) -> Option<Arc<Answer>> {
        cache::key(query, &s.lowercase, Scope::Shared, &mut s.key);
        let found = match self.cache.get(&s.key) {
            Found::PerClient => {
                let client = self.engine.client(query, source);
                cache::key(query, &s.lowercase, Scope::Client(client), &mut s.key);
                self.cache.get(&s.key)
            }
            found => found,
        };
        let Found::Answer(answer) = found else {
            return None;
        };
        if let Some(link) = &answer.link {
            let state = link.state.borrow();
            // A stopped instance must be summoned again; in delayed mode a booting one
            // must be waited for: both go the long way.
            if state.is_final() || (self.engine.delayed() && !state.is_serving()) {
                return None;
            }
        }
        Some(answer)
    }

    /// The deployer's generation, asked at most once per `generation_poll`.
    fn generation(&self) -> u64 {
        if self.generation_poll_us == 0 {
            return self.engine.instances().generation();
        }
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let at = self.generation_at_us.load(Ordering::Acquire);
        if now.saturating_sub(at) < self.generation_poll_us
            || self
                .generation_at_us
                .compare_exchange(at, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return self.generation.load(Ordering::Acquire);
        }
        self.poll_generation()
    }

    fn poll_generation(&self) -> u64 {
        let generation = self.engine.instances().generation();
        self.generation.store(generation, Ordering::Release);
        generation
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reports a cached answer as activity, at most once per `activity_interval`.
    fn report_activity(&self, answer: &Answer) {
        let Some(link) = &answer.link else { return };
        let now = self.now_ms();
        let last = link.reported_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.activity_ms
            && link
                .reported_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.engine.instances().activity(&link.key, Activity::Query);
        }
    }

    fn header_only(&self, header: &wire::Header, rcode: u8, s: &mut Scratch) -> Step {
        s.out.clear();
        s.out.extend_from_slice(&header.error_response(rcode));
        self.metrics.response(u16::from(rcode));
        Step::Send
    }

    /// Writes `rendered` as the response to `query` into `out`: its id, RD and CD, the
    /// question as sent, and TC if it does not fit the transport.
    fn emit(
        &self,
        rendered: &Rendered,
        query: &Query<'_>,
        transport: Transport,
        out: &mut Vec<u8>,
    ) {
        let limit = match transport {
            Transport::Udp => {
                usize::from(query.edns.map_or(512, |e| e.udp_size.min(EDNS_UDP_SIZE)))
            }
            Transport::Tcp => MAX_MESSAGE,
        };
        let bytes = if rendered.full.len() <= limit {
            &rendered.full
        } else {
            self.metrics.event(Event::Truncated);
            &rendered.truncated
        };
        out.clear();
        out.extend_from_slice(bytes);
        if out.len() >= HEADER_LEN {
            out[..2].copy_from_slice(&query.id.to_be_bytes());
            out[2] = (out[2] & !0x01) | u8::from(query.rd);
            out[3] = (out[3] & !0x10) | (u8::from(query.cd) << 4);
            let question = query.question;
            if let Some(template) = out.get_mut(HEADER_LEN..HEADER_LEN + question.len())
                && template.eq_ignore_ascii_case(question)
            {
                template.copy_from_slice(question);
            }
        }
        self.metrics.response(rendered.rcode);
    }

    /// Waits (bounded) for a delayed answer's instance, then writes the response.
    pub(crate) async fn settle(&self, delayed: &Delayed, transport: Transport, out: &mut Vec<u8>) {
        let Ok(query) = wire::parse(&delayed.packet, self.engine.trust_ecs()) else {
            return;
        };
        let mut lowercase = Vec::new();
        wire::push_lowercase(query.qname(), &mut lowercase);
        let why = match &delayed.answer.link {
            None => None,
            Some(link) => {
                let mut state = link.state.clone();
                let settled = timeout(
                    delayed.wait,
                    state.wait_for(|s| s.is_serving() || s.is_final()),
                )
                .await;
                match settled {
                    Ok(Ok(state)) if state.is_serving() => None,
                    Ok(Ok(state)) => Some(format!("{} did not start: {:?}", link.key, *state)),
                    Ok(Err(_)) => Some(format!("{} is gone", link.key)),
                    Err(_) => Some(format!("{} not ready after {:?}", link.key, delayed.wait)),
                }
            }
        };
        match why {
            None => self.emit(&delayed.answer.rendered, &query, transport, out),
            Some(why) => {
                debug!(reason = %why, "delayed answer failed");
                let rendered = self.engine.not_ready(&query, &lowercase, why);
                self.emit(&rendered, &query, transport, out);
            }
        }
    }
}

/// A rate-limit "slip": header with TC and the question, nothing else.
fn slipped(query: &Query<'_>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&query.id.to_be_bytes());
    out.push(0x80 | 0x02 | u8::from(query.rd));
    out.push(u8::from(query.cd) << 4);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(query.question);
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, MessageType};
    use proptest::prelude::*;

    use super::*;

    fn shared(trust_ecs: bool) -> Shared {
        let (config, checked) = crate::testing::config(trust_ecs);
        Shared::new(&config, &checked, crate::testing::hello())
    }

    fn valid_queries() -> impl Strategy<Value = Vec<u8>> {
        let labels = prop_oneof![
            Just(vec!["hello", "revboot", "test"]),
            Just(vec!["abcdef1", "HELLO", "revboot", "test"]),
            Just(vec!["revboot", "test"]),
            Just(vec!["nope", "revboot", "test"]),
            Just(vec!["example", "com"]),
        ];
        (labels, any::<u16>(), any::<u16>(), any::<bool>()).prop_map(|(labels, id, qtype, opt)| {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(opt)]);
            for label in labels {
                p.push(label.len() as u8);
                p.extend_from_slice(label.as_bytes());
            }
            p.push(0);
            p.extend_from_slice(&(qtype % 300).to_be_bytes());
            p.extend_from_slice(&[0, 1]);
            if opt {
                p.extend_from_slice(&[0, 0, 41, 2, 0, 0, 0, 0, 0, 0, 0]);
            }
            p
        })
    }

    fn packets() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            valid_queries(),
            (
                valid_queries(),
                proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)
            )
                .prop_map(|(mut p, edits)| {
                    for (at, byte) in edits {
                        let len = p.len();
                        p[at % len] = byte;
                    }
                    p
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever comes in: no panic, and any reply is a well-formed response with the
        /// query's id that fits the transport.
        #[test]
        fn any_packet_gets_a_well_formed_reply_or_none(packet in packets(), trust in any::<bool>()) {
            let shared = shared(trust);
            let mut scratch = Scratch::default();
            for transport in [Transport::Udp, Transport::Tcp, Transport::Udp] {
                match shared.handle(&packet, IpAddr::from([127, 0, 0, 1]), transport, &mut scratch) {
                    Step::Nothing => {}
                    Step::Delay(_) => prop_assert!(false, "no delayed answers configured"),
                    Step::Send => {
                        let reply = Message::from_vec(&scratch.out);
                        prop_assert!(reply.is_ok(), "unparseable reply {:?}", scratch.out);
                        let reply = reply.expect("checked");
                        prop_assert_eq!(reply.metadata.message_type, MessageType::Response);
                        prop_assert_eq!(&scratch.out[..2], &packet[..2]);
                        if transport == Transport::Udp {
                            prop_assert!(scratch.out.len() <= usize::from(EDNS_UDP_SIZE));
                            if reply.edns.is_none() {
                                prop_assert!(scratch.out.len() <= 512);
                            }
                        }
                    }
                }
            }
        }
    }
}
