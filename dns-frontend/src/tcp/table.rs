//! Which TCP connections stay open, and which one is closed to make room.
//!
//! A connection is *idle* while it waits for a whole message and *busy* from a complete
//! message until its answer is written. RFC 7766 §6.2 lets a server limit connections per
//! client and close idle ones; the rules here make sure idle connections, however many and
//! from wherever, never keep a new client out:
//!
//! 1. At most `max_tcp_connections` connections are open in all, and at most
//!    `max_tcp_per_prefix` from one client prefix (`v4_prefix`/`v6_prefix`, /24 and /56 by
//!    default: the prefixes the rate limits count as one client).
//! 2. A newcomer whose prefix has its share closes that prefix's connection idle longest; a
//!    newcomer past the bound in all closes the connection idle longest of all. A prefix
//!    with its share makes room only at its own expense.
//! 3. A busy connection is never closed to make room: when every candidate is busy, the
//!    newcomer is closed at once.
//! 4. A connection chosen to close is closed at once (it has nothing to finish); a message
//!    that it completes in that moment goes unanswered, as with any close of an idle
//!    connection, and the client asks again on a new connection.
//! 5. Apart from this, a connection is closed after `tcp_idle_timeout` without a complete
//!    message (see the `tcp` module).
//!
//! The table has one owner, the accept loop, and is as large as its bound; finding the
//! connection idle longest is a walk through it, done only when a bound is reached. It
//! counts what it closes before the client can see it closed.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::config::Limits;
use crate::limit::prefix_of;
use crate::metrics::{Event, Metrics};

/// [`Conn::state`] of a connection with a query in progress.
const BUSY: u64 = u64::MAX;
/// [`Conn::state`] of a connection closed to make room.
const CLOSED: u64 = u64::MAX - 1;

/// What a connection's task and the table share.
#[derive(Debug)]
pub(crate) struct Conn {
    /// [`BUSY`], [`CLOSED`], or when it went idle, as a tick of `clock`. Only the table
    /// moves it to `CLOSED`, and only from idle; only the connection moves it out of `BUSY`.
    state: AtomicU64,
    closed: Notify,
    /// The table's clock: one tick each time a connection goes idle, so that ticks order
    /// idle connections and are never seen twice (a `u64` does not run out).
    clock: Arc<AtomicU64>,
}

impl Conn {
    fn new(clock: Arc<AtomicU64>) -> Conn {
        let conn = Conn {
            state: AtomicU64::new(BUSY),
            closed: Notify::new(),
            clock,
        };
        conn.end();
        conn
    }

    /// Marks a query in progress (a whole message is in); false if the connection was
    /// closed to make room, and must end without answering.
    pub fn begin(&self) -> bool {
        let state = self.state.load(Ordering::Acquire);
        state != CLOSED
            && self
                .state
                .compare_exchange(state, BUSY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Marks the query answered: idle from now.
    pub fn end(&self) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        self.state.store(tick, Ordering::Release);
    }

    /// Completes once the table has closed this connection to make room.
    pub async fn closed(&self) {
        self.closed.notified().await;
    }

    /// When it went idle, if it is idle.
    fn idle_since(&self) -> Option<u64> {
        let state = self.state.load(Ordering::Acquire);
        (state < CLOSED).then_some(state)
    }

    /// Marks it closed if it is still idle since `since`; its task is told by [`Self::tell`].
    fn close(&self, since: u64) -> bool {
        self.state
            .compare_exchange(since, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Tells its task that it is closed (stored if the task is not waiting yet: it sees it
    /// at its next wait).
    fn tell(&self) {
        self.closed.notify_one();
    }
}

/// What [`Connections::admit`] did with a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admitted {
    /// There was room.
    Room,
    /// An idle connection was closed to make room.
    MadeRoom,
    /// Every connection that could make room was busy: the newcomer is to be closed.
    Refused,
}

/// The open connections, by a key of the owner's choosing (its tasks' ids).
#[derive(Debug)]
pub(crate) struct Connections<K> {
    open: HashMap<K, Open>,
    /// Open connections per prefix (no zero counts).
    per_prefix: HashMap<u128, usize>,
    max_total: usize,
    max_per_prefix: usize,
    v4_prefix: u8,
    v6_prefix: u8,
    clock: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct Open {
    prefix: u128,
    conn: Arc<Conn>,
}

impl<K: Hash + Eq + Clone> Connections<K> {
    /// An empty table; a per-prefix bound above the total one is the total one. `limits`
    /// gives the bounds and prefixes.
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> Self {
        let max_total = limits.max_tcp_connections;
        Connections {
            open: HashMap::with_capacity(max_total),
            per_prefix: HashMap::with_capacity(max_total),
            max_total,
            max_per_prefix: limits.max_tcp_per_prefix.min(max_total),
            v4_prefix: limits.v4_prefix,
            v6_prefix: limits.v6_prefix,
            clock: Arc::new(AtomicU64::new(0)),
            metrics,
        }
    }

    /// Makes room for a connection from `peer` if the bounds call for it (rules 1–3) and,
    /// unless refused, starts it with `start`, which returns its key.
    pub fn admit(&mut self, peer: IpAddr, start: impl FnOnce(Arc<Conn>) -> K) -> Admitted {
        let prefix = prefix_of(peer, self.v4_prefix, self.v6_prefix);
        let full_prefix = self.per_prefix.get(&prefix).copied().unwrap_or(0) >= self.max_per_prefix;
        let admitted = if full_prefix {
            self.make_room(Some(prefix))
        } else if self.open.len() >= self.max_total {
            self.make_room(None)
        } else {
            Admitted::Room
        };
        if admitted == Admitted::Refused {
            // Counted before `start` (and with it the newcomer's stream) is dropped.
            self.metrics.event(Event::TcpRefused);
            return admitted;
        }
        let conn = Arc::new(Conn::new(self.clock.clone()));
        let key = start(conn.clone());
        *self.per_prefix.entry(prefix).or_default() += 1;
        self.open.insert(key, Open { prefix, conn });
        admitted
    }

    /// Forgets the connection `key` (it has ended); nothing if it was closed to make room.
    pub fn ended(&mut self, key: &K) {
        if let Some(open) = self.open.remove(key) {
            self.forget(open.prefix);
        }
    }

    /// Open connections (those closed to make room are no longer counted).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Closes the connection idle longest (of `prefix`, or of all).
    fn make_room(&mut self, prefix: Option<u128>) -> Admitted {
        loop {
            let oldest = self
                .open
                .iter()
                .filter(|(_, open)| prefix.is_none_or(|p| open.prefix == p))
                .filter_map(|(key, open)| Some((open.conn.idle_since()?, key, &open.conn)))
                .min_by_key(|(since, ..)| *since)
                .map(|(since, key, conn)| (since, key.clone(), conn.clone()));
            let Some((since, key, conn)) = oldest else {
                return Admitted::Refused;
            };
            // It may have turned busy since it was looked at: then look again.
            if conn.close(since) {
                self.ended(&key);
                self.metrics.event(Event::TcpEvicted);
                conn.tell();
                return Admitted::MadeRoom;
            }
        }
    }

    fn forget(&mut self, prefix: u128) {
        if let Some(count) = self.per_prefix.get_mut(&prefix) {
            *count -= 1;
            if *count == 0 {
                self.per_prefix.remove(&prefix);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Waker};

    use super::*;

    /// A table of `total`/`per_prefix` and the connections it started, by key.
    struct World {
        table: Connections<u32>,
        conns: HashMap<u32, Arc<Conn>>,
        next: u32,
        metrics: Arc<Metrics>,
    }

    impl World {
        fn new(total: usize, per_prefix: usize) -> World {
            let limits = Limits {
                max_tcp_connections: total,
                max_tcp_per_prefix: per_prefix,
                ..Limits::default()
            };
            let metrics = Arc::new(Metrics::default());
            World {
                table: Connections::new(&limits, metrics.clone()),
                conns: HashMap::new(),
                next: 0,
                metrics,
            }
        }

        /// Admits a connection from `peer`; its key if it was let in.
        fn connect(&mut self, peer: [u8; 4]) -> (Admitted, Option<u32>) {
            let key = self.next;
            self.next += 1;
            let mut started = None;
            let admitted = self.table.admit(IpAddr::from(peer), |conn| {
                started = Some(conn);
                key
            });
            let started = started.map(|conn| {
                self.conns.insert(key, conn);
                key
            });
            (admitted, started)
        }

        /// Whether the table closed `key`, and told its task.
        fn closed(&self, key: u32) -> bool {
            let conn = &self.conns[&key];
            let told = pin!(conn.closed())
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_ready();
            let closed = conn.state.load(Ordering::Acquire) == CLOSED;
            assert_eq!(told, closed, "a closed connection's task is told");
            closed
        }
    }

    #[test]
    fn a_full_prefix_makes_room_from_its_own_idle_connections() {
        let mut world = World::new(8, 2);
        let (_, first) = world.connect([10, 0, 0, 1]);
        let (_, second) = world.connect([10, 0, 0, 2]);
        let (_, other) = world.connect([10, 0, 1, 1]);
        let (admitted, third) = world.connect([10, 0, 0, 3]);
        assert_eq!(admitted, Admitted::MadeRoom);
        assert!(third.is_some());
        let [first, second, other] = [first, second, other].map(|k| k.expect("admitted"));
        assert!(world.closed(first), "the prefix's connection idle longest");
        assert!(
            !world.conns[&first].begin(),
            "a message it completes now goes unanswered"
        );
        assert!(!world.closed(second));
        assert!(!world.closed(other), "another prefix is left alone");
        assert_eq!(world.table.len(), 3);
    }

    #[test]
    fn a_full_table_makes_room_from_the_connection_idle_longest() {
        let mut world = World::new(3, 3);
        let keys: Vec<u32> = [[10, 0, 0, 1], [10, 0, 1, 1], [10, 0, 2, 1]]
            .into_iter()
            .filter_map(|peer| world.connect(peer).1)
            .collect();
        // The oldest connection asks something and goes idle again: now the second one has
        // been idle longest.
        assert!(world.conns[&keys[0]].begin());
        world.conns[&keys[0]].end();
        let (admitted, newcomer) = world.connect([10, 0, 3, 1]);
        assert_eq!(admitted, Admitted::MadeRoom);
        assert!(newcomer.is_some());
        assert!(world.closed(keys[1]));
        assert!(!world.closed(keys[0]) && !world.closed(keys[2]));
    }

    #[test]
    fn busy_connections_are_not_closed_and_then_the_newcomer_is_refused() {
        let mut world = World::new(2, 1);
        let (_, a) = world.connect([10, 0, 0, 1]);
        let a = a.expect("admitted");
        assert!(world.conns[&a].begin());
        // Its prefix is full and its only connection busy.
        assert_eq!(world.connect([10, 0, 0, 2]), (Admitted::Refused, None));
        let (_, b) = world.connect([10, 0, 1, 1]);
        assert!(world.conns[&b.expect("admitted")].begin());
        // The table is full and every connection busy.
        assert_eq!(world.connect([10, 0, 2, 1]), (Admitted::Refused, None));
        // Answered, the first one is idle again and can make room.
        world.conns[&a].end();
        assert_eq!(world.connect([10, 0, 2, 1]).0, Admitted::MadeRoom);
        assert!(world.closed(a));
        let counted = world.metrics.snapshot();
        assert_eq!((counted.tcp_refused, counted.tcp_evicted), (2, 1));
    }

    #[test]
    fn ended_connections_free_their_room() {
        let mut world = World::new(2, 2);
        let (_, a) = world.connect([10, 0, 0, 1]);
        let (_, b) = world.connect([10, 0, 0, 2]);
        for key in [a, b] {
            let key = key.expect("admitted");
            assert!(world.conns[&key].begin());
            world.table.ended(&key);
        }
        assert_eq!(world.table.len(), 0);
        assert_eq!(world.connect([10, 0, 0, 3]).0, Admitted::Room);
        assert_eq!(world.connect([10, 0, 0, 4]).0, Admitted::Room);
    }
}
