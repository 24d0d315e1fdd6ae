//! The address pool: one service address per instance, handed back when it stops.
//!
//! Addresses are handed out in order first, then reused oldest-returned first, so a
//! just-freed address (and whatever clients still hold it from DNS) rests as long as possible.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};

use crate::config::Ipv4Pool;

/// Free addresses of a pool.
#[derive(Debug)]
pub struct AddressPool {
    pool: Ipv4Pool,
    next: u32,
    returned: VecDeque<Ipv4Addr>,
    in_use: usize,
}

impl AddressPool {
    /// A pool with every address free.
    pub fn new(pool: Ipv4Pool) -> AddressPool {
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
        Some(IpAddr::V4(address))
    }

    /// Hands an address back.
    pub fn give(&mut self, address: IpAddr) {
        if let IpAddr::V4(address) = address {
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
}
