//! Unprivileged identities: one host uid (and the gid of the same number) per sandbox.
//!
//! 1. A [`UidRange`] is a block of host uids that no account of the host uses; revboot
//!    takes them the way systemd's `DynamicUser=` does, without writing `/etc/passwd`.
//! 2. [`UidPool::lease`] hands out the lowest free uid after the last one handed out (so a
//!    uid just released is not reused at once); the [`Lease`] gives it back when dropped,
//!    which its owner does only once every process of the sandbox is gone.
//! 3. Distinct uids keep the kernel's per-user limits (inotify instances, message queues,
//!    keyrings) from being shared between sandboxes, on top of their separate namespaces.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// A block of host uids reserved for sandboxes: `base .. base + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UidRange {
    /// The first uid.
    pub base: u32,
    /// How many.
    pub count: u32,
}

impl UidRange {
    /// The default block: 65,536 uids from 2,100,000,000, far above any account or
    /// container range a distribution hands out, and below 2^31.
    pub const DEFAULT: UidRange = UidRange {
        base: 2_100_000_000,
        count: 65_536,
    };

    /// Checks the block: not empty, not root's or a system account's, no wrap.
    pub fn validate(&self) -> Result<(), String> {
        if self.count == 0 {
            return Err("the uid block is empty".into());
        }
        if self.base < 65_536 {
            return Err(format!(
                "uid {} is an account or system uid of the host: choose a block at 65536 or above",
                self.base
            ));
        }
        match self.base.checked_add(self.count) {
            // u32::MAX is the "no uid" value (-1) of the set*id calls.
            Some(end) if end < u32::MAX => Ok(()),
            _ => Err("the uid block runs past 4294967294".into()),
        }
    }
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange::DEFAULT
    }
}

/// Hands out the uids of a [`UidRange`], each to one sandbox at a time.
#[derive(Debug, Clone)]
pub struct UidPool {
    inner: Arc<Mutex<Bits>>,
    range: UidRange,
}

#[derive(Debug)]
struct Bits {
    used: Vec<u64>,
    next: u32,
    in_use: u32,
}

/// One uid, in use until dropped.
#[derive(Debug)]
pub struct Lease {
    uid: u32,
    pool: UidPool,
}

impl Lease {
    /// The uid (also the gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let offset = self.uid - self.pool.range.base;
        let mut bits = self.pool.inner.lock().expect("uid lock is never poisoned");
        bits.used[(offset / 64) as usize] &= !(1 << (offset % 64));
        bits.in_use -= 1;
    }
}

impl UidPool {
    /// A pool over `range` (validated by the caller).
    pub fn new(range: UidRange) -> UidPool {
        UidPool {
            inner: Arc::new(Mutex::new(Bits {
                used: vec![0; range.count.div_ceil(64) as usize],
                next: 0,
                in_use: 0,
            })),
            range,
        }
    }

    /// A free uid, or `None` when every uid of the range is leased.
    pub fn lease(&self) -> Option<Lease> {
        let mut bits = self.inner.lock().expect("uid lock is never poisoned");
        if bits.in_use >= self.range.count {
            return None;
        }
        let count = self.range.count;
        let mut offset = bits.next % count;
        // Whole words at a time: at most count/64 + 1 steps.
        loop {
            let word = (offset / 64) as usize;
            let free = !bits.used[word] & (u64::MAX << (offset % 64));
            if free != 0 {
                let found = word as u32 * 64 + free.trailing_zeros();
                if found < count {
                    bits.used[word] |= 1 << (found % 64);
                    bits.in_use += 1;
                    bits.next = found + 1;
                    return Some(Lease {
                        uid: self.range.base + found,
                        pool: self.clone(),
                    });
                }
            }
            offset = (word as u32 + 1) * 64;
            if offset >= count {
                offset = 0;
            }
        }
    }

    /// `uid` itself, if it is of the range and free: the uid of a sandbox an earlier daemon
    /// started and handed over (an upgrade in place).
    pub fn lease_exact(&self, uid: u32) -> Option<Lease> {
        let offset = uid.checked_sub(self.range.base)?;
        if offset >= self.range.count {
            return None;
        }
        let mut bits = self.inner.lock().expect("uid lock is never poisoned");
        let (word, bit) = ((offset / 64) as usize, 1u64 << (offset % 64));
        if bits.used[word] & bit != 0 {
            return None;
        }
        bits.used[word] |= bit;
        bits.in_use += 1;
        Some(Lease {
            uid,
            pool: self.clone(),
        })
    }

    /// Uids leased now.
    pub fn in_use(&self) -> u32 {
        self.inner
            .lock()
            .expect("uid lock is never poisoned")
            .in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_and_come_back() {
        let pool = UidPool::new(UidRange {
            base: 100_000,
            count: 130,
        });
        let leases: Vec<Lease> = (0..130).map(|_| pool.lease().expect("free")).collect();
        let mut uids: Vec<u32> = leases.iter().map(Lease::uid).collect();
        uids.sort_unstable();
        uids.dedup();
        assert_eq!(uids.len(), 130);
        assert_eq!(uids.first(), Some(&100_000));
        assert_eq!(uids.last(), Some(&100_129));
        assert!(pool.lease().is_none(), "all 130 are leased");
        drop(leases);
        assert_eq!(pool.in_use(), 0);
        assert!(pool.lease().is_some());
    }

    #[test]
    fn a_released_uid_is_not_handed_out_next() {
        let pool = UidPool::new(UidRange {
            base: 100_000,
            count: 4,
        });
        let first = pool.lease().expect("free");
        let uid = first.uid();
        drop(first);
        assert_ne!(pool.lease().expect("free").uid(), uid);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(UidRange::DEFAULT.validate().is_ok());
        for (base, count) in [(0, 10), (1000, 10), (100_000, 0), (u32::MAX - 5, 10)] {
            assert!(
                UidRange { base, count }.validate().is_err(),
                "{base}+{count}"
            );
        }
    }
}
