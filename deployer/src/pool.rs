//! The address pools: service addresses for instances, handed back when they stop.
//!
//! Addresses are handed out in order first, then reused oldest-returned first, so a
//! just-freed address (and whatever clients still hold it from DNS) rests as long as possible.
//! With several pools of one family, the first with a free address gives it.

use std::collections::VecDeque;
use std::net::IpAddr;

use crate::addresses::Family;
use crate::config::Prefix;

/// Every pool of the deployer.
#[derive(Debug)]
pub struct AddressPools {
    pools: Vec<AddressPool>,
    families: Vec<Family>,
}

impl AddressPools {
    /// Pools with every address free.
    pub fn new(prefixes: &[Prefix]) -> AddressPools {
        let mut families: Vec<Family> = prefixes.iter().map(Prefix::family).collect();
        families.sort();
        families.dedup();
        AddressPools {
            pools: prefixes.iter().copied().map(AddressPool::new).collect(),
            families,
        }
    }

    /// Takes a free address of `family`.
    pub fn take(&mut self, family: Family) -> Option<IpAddr> {
        self.pools
            .iter_mut()
            .filter(|pool| Family::of(pool.pool.network) == family)
            .find_map(AddressPool::take)
    }

    /// Hands an address back to the pool it came from.
    pub fn give(&mut self, address: IpAddr) {
        if let Some(pool) = self
            .pools
            .iter_mut()
            .find(|pool| pool.pool.contains(address))
        {
            pool.give(address);
        }
    }

    /// The families there are pools for, IPv4 first.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Takes `address` itself from the pool it belongs to ([`AddressPool::claim`]).
    pub fn claim(&mut self, address: IpAddr) -> bool {
        self.pools
            .iter_mut()
            .find(|pool| pool.pool.contains(address))
            .is_some_and(|pool| pool.claim(address))
    }

    /// Addresses handed out and not returned, in all pools.
    pub fn in_use(&self) -> usize {
        self.pools.iter().map(AddressPool::in_use).sum()
    }
}

/// How far past the next in-order address [`AddressPool::claim`] looks.
pub const CLAIM_WALK: u128 = 1 << 20;

/// Free addresses of a pool.
#[derive(Debug)]
pub struct AddressPool {
    pool: Prefix,
    next: u128,
    returned: VecDeque<IpAddr>,
    in_use: usize,
}

impl AddressPool {
    /// A pool with every address free.
    pub fn new(pool: Prefix) -> AddressPool {
        AddressPool {
            pool,
            next: 0,
            returned: VecDeque::new(),
            in_use: 0,
        }
    }

    /// Takes a free address.
    pub fn take(&mut self) -> Option<IpAddr> {
        let address = match self.pool.nth(self.next) {
            Some(address) => {
                self.next += 1;
                address
            }
            None => self.returned.pop_front()?,
        };
        self.in_use += 1;
        Some(address)
    }

    /// Hands an address back (one of the pool's).
    pub fn give(&mut self, address: IpAddr) {
        if self.pool.contains(address) {
            self.in_use = self.in_use.saturating_sub(1);
            self.returned.push_back(address);
        }
    }

    /// Takes `address` itself, if it is a free address of the pool: the address of an
    /// instance handed over by the previous daemon (an upgrade in place). Addresses the
    /// in-order hand-out passes on the way go to the returned ones; an address more than
    /// [`CLAIM_WALK`] beyond the hand-out's next one is refused (the old daemon handed out
    /// addresses in the same order, so it could not have reached it).
    pub fn claim(&mut self, address: IpAddr) -> bool {
        if let Some(at) = self.returned.iter().position(|a| *a == address) {
            self.returned.remove(at);
            self.in_use += 1;
            return true;
        }
        if !self.pool.contains(address) {
            return false;
        }
        for index in self.next..self.next.saturating_add(CLAIM_WALK) {
            let Some(next) = self.pool.nth(index) else {
                return false;
            };
            if next == address {
                self.returned
                    .extend((self.next..index).filter_map(|i| self.pool.nth(i)));
                self.next = index + 1;
                self.in_use += 1;
                return true;
            }
        }
        false
    }

    /// Addresses handed out and not returned.
    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_address_once_then_reuses_oldest_first() {
        let mut pool = AddressPool::new("127.77.0.0/30".parse().expect("pool"));
        let a = pool.take().expect("first");
        let b = pool.take().expect("second");
        assert_eq!(a, IpAddr::from([127, 77, 0, 1]));
        assert_eq!(b, IpAddr::from([127, 77, 0, 2]));
        assert_eq!(pool.take(), None);
        pool.give(b);
        pool.give(a);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.take(), Some(b));
        assert_eq!(pool.take(), Some(a));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn a_handed_over_address_is_claimed_once_and_the_skipped_ones_stay_free() {
        let prefixes: Vec<Prefix> = ["127.78.0.0/29", "fd00:78::/64"]
            .iter()
            .map(|p| p.parse().expect("prefix"))
            .collect();
        let mut pools = AddressPools::new(&prefixes);
        let third: IpAddr = "127.78.0.3".parse().expect("ip");
        let v6: IpAddr = "fd00:78::2".parse().expect("ip");
        assert!(pools.claim(third) && pools.claim(v6));
        assert!(!pools.claim(third), "taken already");
        assert!(
            !pools.claim("127.79.0.1".parse().expect("ip")),
            "of no pool"
        );
        let far: IpAddr = "fd00:78::1:0:0:0".parse().expect("ip");
        assert!(
            !pools.claim(far),
            "beyond what an earlier daemon could have handed out"
        );
        assert_eq!(pools.in_use(), 2);
        let next: Vec<_> = std::iter::from_fn(|| pools.take(Family::Ipv4)).collect();
        assert_eq!(
            next,
            [
                "127.78.0.4",
                "127.78.0.5",
                "127.78.0.6",
                "127.78.0.1",
                "127.78.0.2"
            ]
            .map(|a| a.parse::<IpAddr>().expect("ip"))
        );
    }

    #[test]
    fn several_pools_give_by_family_in_order() {
        let prefixes: Vec<Prefix> = ["203.0.113.16/30", "2001:db8:1::/126", "198.51.100.0/30"]
            .iter()
            .map(|p| p.parse().expect("prefix"))
            .collect();
        let mut pools = AddressPools::new(&prefixes);
        assert_eq!(pools.families(), [Family::Ipv4, Family::Ipv6]);
        let v4: Vec<_> = std::iter::from_fn(|| pools.take(Family::Ipv4)).collect();
        assert_eq!(
            v4,
            [
                "203.0.113.17",
                "203.0.113.18",
                "198.51.100.1",
                "198.51.100.2"
            ]
            .map(|a| a.parse::<IpAddr>().expect("ip"))
        );
        let v6 = pools.take(Family::Ipv6).expect("an IPv6 address");
        assert_eq!(v6, "2001:db8:1::1".parse::<IpAddr>().expect("ip"));
        assert_eq!(pools.in_use(), 5);
        pools.give(v6);
        pools.give("198.51.100.2".parse().expect("ip"));
        assert_eq!(pools.in_use(), 3);
        assert_eq!(
            pools.take(Family::Ipv4),
            Some("198.51.100.2".parse().expect("ip"))
        );
    }

    #[test]
    fn ipv6_prefixes_hand_out_addresses_too() {
        let mut pool = AddressPool::new("2001:db8:1::/126".parse().expect("pool"));
        let taken: Vec<_> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(
            taken,
            ["2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::3"]
                .map(|a| a.parse::<IpAddr>().expect("ip"))
        );
        pool.give("2001:db8:2::1".parse().expect("ip"));
        assert_eq!(
            pool.in_use(),
            3,
            "an address of another prefix is not taken back"
        );
    }
}
