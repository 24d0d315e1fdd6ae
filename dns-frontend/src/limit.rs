//! Token buckets per client prefix, in fixed memory.
//!
//! Prefixes (/24 for IPv4, /56 for IPv6 by default) hash into a fixed table of buckets, so
//! a flood from many addresses cannot grow memory; two prefixes that collide share a bucket,
//! which can only make the limit stricter for them.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// A rate limit per client prefix.
#[derive(Debug)]
pub(crate) struct PrefixLimiter {
    slots: Box<[Mutex<Bucket>]>,
    hasher: RandomState,
    per_second: f64,
    burst: f64,
    v4_prefix: u8,
    v6_prefix: u8,
    epoch: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// Seconds since the limiter's epoch at the last refill.
    at: f64,
    /// Refusals so far (for slip).
    refused: u32,
}

/// What a limiter says about one more event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the limit.
    Allow,
    /// Over the limit; the count of refusals in this bucket so far (1 for the first).
    Refuse(u32),
}

impl PrefixLimiter {
    /// A limiter; `per_second == 0` never refuses.
    pub fn new(slots: usize, per_second: u32, burst: u32, v4_prefix: u8, v6_prefix: u8) -> Self {
        let burst = f64::from(burst.max(1));
        PrefixLimiter {
            slots: (0..slots.max(1))
                .map(|_| {
                    Mutex::new(Bucket {
                        tokens: burst,
                        at: 0.0,
                        refused: 0,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            per_second: f64::from(per_second),
            burst,
            v4_prefix,
            v6_prefix,
            epoch: Instant::now(),
        }
    }

    /// The prefix `address` belongs to, as a number.
    pub fn prefix(&self, address: IpAddr) -> u128 {
        prefix_of(address, self.v4_prefix, self.v6_prefix)
    }

    /// Takes one token from the bucket of `address`'s prefix.
    pub fn check(&self, address: IpAddr) -> Verdict {
        if self.per_second == 0.0 {
            return Verdict::Allow;
        }
        let prefix = self.prefix(address);
        let index = (self.hasher.hash_one(prefix) % self.slots.len() as u64) as usize;
        let now = self.epoch.elapsed().as_secs_f64();
        // A poisoned bucket only means another thread panicked mid-update of two numbers;
        // the numbers are still usable.
        let mut bucket = self.slots[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let refill = (now - bucket.at).max(0.0) * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refused = 0;
            Verdict::Allow
        } else {
            bucket.refused = bucket.refused.saturating_add(1);
            Verdict::Refuse(bucket.refused)
        }
    }
}

/// `address` masked to its first `v4`/`v6` bits, tagged by family. An IPv4-mapped IPv6
/// address (a client of a dual-stack `[::]` listener) counts as the IPv4 address it maps:
/// taken as IPv6, every IPv4 client would be in one prefix.
pub(crate) fn prefix_of(address: IpAddr, v4: u8, v6: u8) -> u128 {
    match address.to_canonical() {
        IpAddr::V4(ip) => {
            let bits = u32::from(ip);
            let masked = if v4 == 0 {
                0
            } else {
                bits & (u32::MAX << (32 - u32::from(v4.min(32))))
            };
            (1u128 << 64) | u128::from(masked)
        }
        IpAddr::V6(ip) => {
            let bits = u128::from(ip);
            if v6 == 0 {
                0
            } else {
                // An IPv6 prefix equal to a tagged IPv4 one merely shares its bucket.
                bits & (u128::MAX << (128 - u32::from(v6.min(128))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_then_other_prefix_unaffected() {
        let limiter = PrefixLimiter::new(64, 1, 3, 24, 56);
        let a = IpAddr::from([10, 0, 0, 1]);
        let same_prefix = IpAddr::from([10, 0, 0, 200]);
        for _ in 0..3 {
            assert_eq!(limiter.check(a), Verdict::Allow);
        }
        assert_eq!(limiter.check(same_prefix), Verdict::Refuse(1));
        assert_eq!(limiter.check(a), Verdict::Refuse(2));
        // A different /24 has its own bucket (unless it hashes into the same slot, which a
        // 64-slot table makes unlikely but possible: try several).
        let allowed = (1..=8u8)
            .filter(|i| limiter.check(IpAddr::from([10, 0, *i, 1])) == Verdict::Allow)
            .count();
        assert!(allowed >= 6, "only {allowed} of 8 other prefixes allowed");
    }

    #[test]
    fn zero_rate_never_refuses() {
        let limiter = PrefixLimiter::new(1, 0, 0, 24, 56);
        for _ in 0..1000 {
            assert_eq!(limiter.check(IpAddr::from([10, 0, 0, 1])), Verdict::Allow);
        }
    }

    #[test]
    fn prefixes_mask_the_host_part() {
        let p = |ip: [u8; 4]| prefix_of(IpAddr::from(ip), 24, 56);
        assert_eq!(p([127, 0, 0, 2]), p([127, 0, 0, 3]));
        assert_ne!(p([127, 0, 1, 2]), p([127, 0, 2, 2]));
        let v6 = |s: &str| prefix_of(s.parse().expect("ipv6"), 24, 56);
        assert_eq!(v6("2001:db8:0:1::1"), v6("2001:db8:0:1:ffff::1"));
        assert_ne!(v6("2001:db8:0:100::1"), v6("2001:db8:0:200::1"));
    }

    #[test]
    fn ipv4_mapped_clients_of_a_dual_stack_listener_are_not_all_one_prefix() {
        let mapped = |s: &str| prefix_of(s.parse().expect("ipv6"), 24, 56);
        assert_ne!(mapped("::ffff:127.0.1.2"), mapped("::ffff:127.0.2.2"));
        assert_eq!(
            mapped("::ffff:127.0.0.2"),
            prefix_of(IpAddr::from([127, 0, 0, 3]), 24, 56)
        );
    }
}
