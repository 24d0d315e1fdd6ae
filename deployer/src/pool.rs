//! The address pool: one service address per instance, handed back when it stops.
//!
//! Addresses are handed out in order first, then reused oldest-returned first, so a
//! just-freed address (and whatever clients still hold it from DNS) rests as long as possible.

use std::collections::VecDeque;
use std::net::IpAddr;

use crate::config::Prefix;

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
