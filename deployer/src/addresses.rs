//! The addresses of an instance and of its client.
//!
//! An instance has one service address per address family its service is given
//! ([`ServiceAddresses`]): DNS answers A with the IPv4 one and AAAA with the IPv6 one, the
//! proxy listens on both, the kernel steers both to the instance's one socket.
//!
//! A per-client instance serves one client, and a client is a network, not one address
//! ([`ClientNet`]): by default an IPv4 address (/32) or an IPv6 /64 — what one customer's
//! machine commonly takes its privacy addresses from (RFC 8981), so that a client whose
//! temporary address changes keeps its instance. Every check of a source against a client
//! (the proxy's admission, the instance socket's filter, the kernel's steering) compares
//! the source masked to the client's prefix.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

impl Family {
    /// The family of `address` (an IPv4-mapped IPv6 address is IPv4).
    pub fn of(address: IpAddr) -> Family {
        match address.to_canonical() {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

impl From<revboot_store::manifest::AddressFamily> for Family {
    fn from(family: revboot_store::manifest::AddressFamily) -> Family {
        match family {
            revboot_store::manifest::AddressFamily::Ipv4 => Family::Ipv4,
            revboot_store::manifest::AddressFamily::Ipv6 => Family::Ipv6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// An instance's service addresses: at most one per family, at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceAddresses {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl ServiceAddresses {
    /// One address.
    pub fn one(address: IpAddr) -> ServiceAddresses {
        match address.to_canonical() {
            IpAddr::V4(v4) => ServiceAddresses {
                v4: Some(v4),
                v6: None,
            },
            IpAddr::V6(v6) => ServiceAddresses {
                v4: None,
                v6: Some(v6),
            },
        }
    }

    /// Both families' addresses, or one of them; `None` when both are missing.
    pub fn new(v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> Option<ServiceAddresses> {
        (v4.is_some() || v6.is_some()).then_some(ServiceAddresses { v4, v6 })
    }

    /// These addresses with `address` added (replacing the one of its family).
    pub fn with(mut self, address: IpAddr) -> ServiceAddresses {
        match address.to_canonical() {
            IpAddr::V4(v4) => self.v4 = Some(v4),
            IpAddr::V6(v6) => self.v6 = Some(v6),
        }
        self
    }

    /// The IPv4 address, if any.
    pub fn v4(&self) -> Option<Ipv4Addr> {
        self.v4
    }

    /// The IPv6 address, if any.
    pub fn v6(&self) -> Option<Ipv6Addr> {
        self.v6
    }

    /// The address of `family`, if any.
    pub fn of(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::Ipv4 => self.v4.map(IpAddr::V4),
            Family::Ipv6 => self.v6.map(IpAddr::V6),
        }
    }

    /// The address the instance's own socket is bound on: the IPv6 one when there is one
    /// (a dual-stack socket, which the kernel may also hand IPv4 connections), else the
    /// IPv4 one.
    pub fn primary(&self) -> IpAddr {
        match (self.v6, self.v4) {
            (Some(v6), _) => IpAddr::V6(v6),
            (None, Some(v4)) => IpAddr::V4(v4),
            (None, None) => unreachable!("a ServiceAddresses holds at least one address"),
        }
    }

    /// Every address, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + use<> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }

    /// Every address with `port`, IPv4 first.
    pub fn with_port(&self, port: u16) -> impl Iterator<Item = SocketAddr> + use<> {
        self.iter().map(move |ip| SocketAddr::new(ip, port))
    }

    /// True if `address` is one of them (IPv4-mapped counts as IPv4).
    pub fn contains(&self, address: IpAddr) -> bool {
        self.iter().any(|own| own == address.to_canonical())
    }
}

impl fmt::Display for ServiceAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.v4, self.v6) {
            (Some(v4), Some(v6)) => write!(f, "{v4} {v6}"),
            (Some(v4), None) => write!(f, "{v4}"),
            (None, Some(v6)) => write!(f, "{v6}"),
            (None, None) => Ok(()),
        }
    }
}

/// How many leading bits of a source address name one client, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientPrefixes {
    /// IPv4 (1..=32; default 32: one address is one client).
    pub ipv4: u8,
    /// IPv6 (1..=128; default 64: one /64 is one client).
    pub ipv6: u8,
}

impl Default for ClientPrefixes {
    fn default() -> Self {
        ClientPrefixes { ipv4: 32, ipv6: 64 }
    }
}

impl ClientPrefixes {
    /// The client that `source` belongs to.
    pub fn client_of(&self, source: IpAddr) -> ClientNet {
        let len = match Family::of(source) {
            Family::Ipv4 => self.ipv4,
            Family::Ipv6 => self.ipv6,
        };
        ClientNet::new(source, len)
    }

    /// Checks the lengths.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=32).contains(&self.ipv4) {
            return Err("ipv4 must be between 1 and 32".into());
        }
        if !(1..=128).contains(&self.ipv6) {
            return Err("ipv6 must be between 1 and 128".into());
        }
        Ok(())
    }
}

/// One client: a network (its address with the host bits cleared) and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientNet {
    network: IpAddr,
    len: u8,
}

impl ClientNet {
    /// The client network of `address` at `len` bits (clamped to the family's width).
    pub fn new(address: IpAddr, len: u8) -> ClientNet {
        let address = address.to_canonical();
        let len = len.min(if address.is_ipv4() { 32 } else { 128 });
        let network = match address {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask32(len))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask128(len))),
        };
        ClientNet { network, len }
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// True for a zero-length prefix (every address of the family).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if `source` belongs to this client (IPv4-mapped counts as IPv4).
    pub fn contains(&self, source: IpAddr) -> bool {
        ClientNet::new(source, self.len) == *self
    }

    /// The network and its mask as 16 bytes each, an IPv4 client in its IPv4-mapped form
    /// with the mapping prefix masked in: how the kernel programs compare a source of either
    /// family with one sequence of word comparisons.
    pub fn mapped(&self) -> ([u8; 16], [u8; 16]) {
        match self.network {
            IpAddr::V4(v4) => (
                v4.to_ipv6_mapped().octets(),
                (u128::MAX << 32 | u128::from(mask32(self.len))).to_be_bytes(),
            ),
            IpAddr::V6(v6) => (v6.octets(), mask128(self.len).to_be_bytes()),
        }
    }
}

impl fmt::Display for ClientNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.network.is_ipv4() { 32 } else { 128 };
        if self.len == full {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.len)
        }
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn a_v6_client_is_its_slash_64_and_a_v4_client_its_address() {
        let prefixes = ClientPrefixes::default();
        let alice = prefixes.client_of(ip("2001:db8:5:6:aaaa::1"));
        assert_eq!(alice.network(), ip("2001:db8:5:6::"));
        assert!(alice.contains(ip("2001:db8:5:6:bbbb::2")), "same /64");
        assert!(!alice.contains(ip("2001:db8:5:7::1")), "another /64");
        assert_eq!(alice.to_string(), "2001:db8:5:6::/64");
        let bob = prefixes.client_of(ip("::ffff:192.0.2.7"));
        assert_eq!(bob.network(), ip("192.0.2.7"), "mapped counts as IPv4");
        assert!(bob.contains(ip("192.0.2.7")));
        assert!(!bob.contains(ip("192.0.2.8")));
        assert!(!bob.contains(ip("2001:db8::c000:207")));
        assert_eq!(bob.to_string(), "192.0.2.7");
    }

    #[test]
    fn mapped_forms_mask_the_family_in() {
        let v4 = ClientNet::new(ip("198.51.100.77"), 24);
        let (network, mask) = v4.mapped();
        assert_eq!(network, ip6("::ffff:198.51.100.0"));
        assert_eq!(mask, ip6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00"));
        let v6 = ClientNet::new(ip("2001:db8::1"), 48);
        let (network, mask) = v6.mapped();
        assert_eq!(network, ip6("2001:db8::"));
        assert_eq!(mask, ip6("ffff:ffff:ffff::"));
        fn ip6(text: &str) -> [u8; 16] {
            text.parse::<Ipv6Addr>().expect("ip").octets()
        }
    }

    #[test]
    fn service_addresses_list_v4_first_and_bind_v6() {
        let both = ServiceAddresses::new(
            Some("203.0.113.17".parse().expect("v4")),
            Some("2001:db8:1::1".parse().expect("v6")),
        )
        .expect("two");
        assert_eq!(
            both.iter().collect::<Vec<_>>(),
            [ip("203.0.113.17"), ip("2001:db8:1::1")]
        );
        assert_eq!(both.primary(), ip("2001:db8:1::1"));
        assert_eq!(both.of(Family::Ipv4), Some(ip("203.0.113.17")));
        assert!(both.contains(ip("::ffff:203.0.113.17")));
        assert_eq!(ServiceAddresses::new(None, None), None);
        let one = ServiceAddresses::one(ip("127.77.0.1"));
        assert_eq!(one.primary(), ip("127.77.0.1"));
        assert_eq!(one.of(Family::Ipv6), None);
    }

    #[test]
    fn prefix_lengths_are_checked() {
        assert!(ClientPrefixes::default().validate().is_ok());
        assert!(ClientPrefixes { ipv4: 0, ipv6: 64 }.validate().is_err());
        assert!(
            ClientPrefixes {
                ipv4: 32,
                ipv6: 129
            }
            .validate()
            .is_err()
        );
    }
}
