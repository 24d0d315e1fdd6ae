//! The hot-path answer cache.
//!
//! 1. Key: the query's EDNS presence and DO bit, type, class and lowercased name, plus the
//!    client scope: none for shared answers, the client address for per-client instances.
//!    Not the EDNS version: a query of a version above 0 gets BADVERS before any lookup.
//! 2. Value: the rendered response (question lowercased; the question as sent is patched in
//!    on the way out) and, for instance answers, the instance and a watch of its state.
//! 3. Valid while [`Instances::generation`](revboot_deployer::Instances::generation) does not
//!    move (the first lookup under a new generation empties the cache) and, for an instance
//!    answer, while the instance is not final: boots and stops of other instances keep it.
//! 4. Bounded: instance answers and all other answers live in two maps of at most
//!    `cache_entries` each; a full map is emptied before the next insert, so a flood of
//!    random names (other answers) cannot evict the answers of running instances.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use revboot_deployer::{InstanceKey, InstanceState};
use tokio::sync::watch;

use crate::wire::Query;

/// A response rendered once, sent many times.
#[derive(Debug)]
pub(crate) struct Rendered {
    /// The whole response, its question lowercased.
    pub full: Vec<u8>,
    /// Header with TC, the question, and OPT if the query had one: what UDP gets when
    /// `full` does not fit.
    pub truncated: Vec<u8>,
    /// The (extended) response code, for metrics.
    pub rcode: u16,
}

/// The instance an answer is about.
#[derive(Debug)]
pub(crate) struct Link {
    /// Which instance.
    pub key: InstanceKey,
    /// Its state.
    pub state: watch::Receiver<InstanceState>,
    /// When activity was last reported (ms since the server's epoch).
    pub reported_ms: AtomicU64,
}

/// A cached (or freshly worked-out) answer.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The response.
    pub rendered: Rendered,
    /// The instance, for address answers.
    pub link: Option<Link>,
}

#[derive(Debug, Clone)]
enum Entry {
    Answer(Arc<Answer>),
    /// The name belongs to a per-client service: look again with the client's address.
    PerClient,
}

/// Where an answer may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The same for every client.
    Shared,
    /// Only for this client address.
    Client(IpAddr),
}

/// The cache.
#[derive(Debug)]
pub(crate) struct AnswerCache {
    generation: AtomicU64,
    instances: RwLock<HashMap<Box<[u8]>, Entry>>,
    others: RwLock<HashMap<Box<[u8]>, Entry>>,
    capacity: usize,
}

/// Writes the cache key of `query` (with `lowercase` its lowercased name) into `key`.
pub(crate) fn key(query: &Query<'_>, lowercase: &[u8], scope: Scope, key: &mut Vec<u8>) {
    key.clear();
    let edns = match query.edns {
        None => 0u8,
        Some(e) => 1 | (u8::from(e.dnssec_ok) << 1),
    };
    key.push(edns);
    key.extend_from_slice(&query.qtype.to_be_bytes());
    key.extend_from_slice(&query.qclass.to_be_bytes());
    key.extend_from_slice(lowercase);
    match scope {
        Scope::Shared => {}
        Scope::Client(IpAddr::V4(ip)) => {
            key.push(4);
            key.extend_from_slice(&ip.octets());
        }
        Scope::Client(IpAddr::V6(ip)) => {
            key.push(6);
            key.extend_from_slice(&ip.octets());
        }
    }
}

/// What a lookup found.
#[derive(Debug)]
pub(crate) enum Found {
    /// An answer.
    Answer(Arc<Answer>),
    /// The name is per-client; look up with [`Scope::Client`].
    PerClient,
    /// Nothing.
    Miss,
}

impl AnswerCache {
    /// An empty cache of `capacity` entries per map.
    pub fn new(capacity: usize) -> Self {
        AnswerCache {
            generation: AtomicU64::new(u64::MAX),
            instances: RwLock::new(HashMap::new()),
            others: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// Empties the cache if `generation` differs from the one its entries were made under.
    pub fn sync(&self, generation: u64) {
        if self.generation.load(Ordering::Acquire) == generation {
            return;
        }
        let mut instances = write(&self.instances);
        let mut others = write(&self.others);
        if self.generation.load(Ordering::Acquire) != generation {
            instances.clear();
            others.clear();
            self.generation.store(generation, Ordering::Release);
        }
    }

    /// Looks `key` up (call [`sync`](Self::sync) first).
    pub fn get(&self, key: &[u8]) -> Found {
        for map in [&self.instances, &self.others] {
            match read(map).get(key) {
                Some(Entry::Answer(answer)) => return Found::Answer(answer.clone()),
                Some(Entry::PerClient) => return Found::PerClient,
                None => {}
            }
        }
        Found::Miss
    }

    /// Stores an answer worked out under `generation` (dropped if the cache moved on).
    pub fn put(&self, key: &[u8], answer: Arc<Answer>, generation: u64) {
        let map = if answer.link.is_some() {
            &self.instances
        } else {
            &self.others
        };
        self.insert(map, key, Entry::Answer(answer), generation);
    }

    /// Marks the shared `key` as per-client.
    pub fn put_per_client(&self, key: &[u8], generation: u64) {
        self.insert(&self.instances, key, Entry::PerClient, generation);
    }

    fn insert(
        &self,
        map: &RwLock<HashMap<Box<[u8]>, Entry>>,
        key: &[u8],
        entry: Entry,
        generation: u64,
    ) {
        let mut map = write(map);
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() >= self.capacity && !map.contains_key(key) {
            map.clear();
        }
        map.insert(key.into(), entry);
    }

    /// Entries held (both maps).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        read(&self.instances).len() + read(&self.others).len()
    }
}

// The maps hold plain data; a panic elsewhere cannot leave one half-updated in a way that
// matters, so a poisoned lock is used as is.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Arc<Answer> {
        Arc::new(Answer {
            rendered: Rendered {
                full: vec![1, 2, 3],
                truncated: vec![1],
                rcode: 0,
            },
            link: None,
        })
    }

    #[test]
    fn generation_change_empties() {
        let cache = AnswerCache::new(8);
        cache.sync(1);
        cache.put(b"a", answer(), 1);
        assert!(matches!(cache.get(b"a"), Found::Answer(_)));
        cache.sync(2);
        assert!(matches!(cache.get(b"a"), Found::Miss));
        // An answer worked out under the old generation is not stored.
        cache.put(b"a", answer(), 1);
        assert!(matches!(cache.get(b"a"), Found::Miss));
    }

    #[test]
    fn stays_within_capacity() {
        let cache = AnswerCache::new(4);
        cache.sync(0);
        for i in 0..100u8 {
            cache.put(&[i], answer(), 0);
            assert!(cache.len() <= 4);
        }
        assert!(matches!(cache.get(&[99]), Found::Answer(_)));
    }
}
