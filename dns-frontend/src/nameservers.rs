//! The zone's name servers as they change: a cluster's nodes publish every live node as an
//! NS record of the apex, with its addresses as glue.
//!
//! 1. Whoever knows the set (the daemon, from the cluster's membership) calls
//!    [`Nameservers::set`]; the server reads the newest set on every apex and name-server
//!    query it works out.
//! 2. Names written by hand (`DnsConfig::nameservers`) win: a set published here is used
//!    only when none is configured. An empty set here means the default (`ns.<zone>` at the
//!    listen address).
//! 3. Answers that hold the set (the apex's NS, a name server's address) are not kept in
//!    the server's answer cache while a set is shared, so a change shows at once.
//! 4. At most [`MAX_NAMESERVERS`] name servers and [`MAX_ADDRESSES`] addresses each; more
//!    are refused and nothing changes.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use hickory_proto::rr::Name;

use crate::config::{ConfigError, Nameserver, parse_name};

/// The most name servers a set holds (an NS set of 13 already fills a 512-byte answer).
pub const MAX_NAMESERVERS: usize = 32;
/// The most addresses of one name server.
pub const MAX_ADDRESSES: usize = 8;

/// A name server as answered: its lowercased wire name, name, addresses.
pub(crate) type Entry = (Vec<u8>, Name, Vec<IpAddr>);

/// The zone's name servers, shared by whoever publishes them and the DNS server.
#[derive(Debug, Clone, Default)]
pub struct Nameservers {
    // A std lock: held to swap or clone an Arc, never across an await.
    inner: Arc<RwLock<Arc<Vec<Entry>>>>,
}

/// Why a set was not published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetError {
    /// A name does not parse.
    #[error(transparent)]
    Name(#[from] ConfigError),
    /// Too many name servers or addresses.
    #[error(
        "Too many name servers ({count}) or addresses of one: at most {MAX_NAMESERVERS}, {MAX_ADDRESSES} each"
    )]
    TooMany {
        /// How many were given.
        count: usize,
    },
}

impl Nameservers {
    /// An empty set (rule 2: the default applies).
    pub fn new() -> Nameservers {
        Nameservers::default()
    }

    /// Publishes `set` (rule 1), in the order given; bad input changes nothing (rule 4).
    pub fn set(&self, set: &[Nameserver]) -> Result<(), SetError> {
        if set.len() > MAX_NAMESERVERS || set.iter().any(|ns| ns.addresses.len() > MAX_ADDRESSES) {
            return Err(SetError::TooMany { count: set.len() });
        }
        let mut entries = Vec::with_capacity(set.len());
        for ns in set {
            let name = parse_name(&ns.name).ok_or_else(|| ConfigError::Nameserver {
                name: ns.name.clone(),
            })?;
            entries.push((
                crate::wire::lowercase_name(&name),
                name,
                ns.addresses.clone(),
            ));
        }
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(entries);
        Ok(())
    }

    /// The names published, in order.
    pub fn names(&self) -> Vec<String> {
        self.current()
            .iter()
            .map(|(_, name, _)| name.to_ascii())
            .collect()
    }

    /// The set as it stands.
    pub(crate) fn current(&self) -> Arc<Vec<Entry>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, address: &str) -> Nameserver {
        Nameserver {
            name: name.to_owned(),
            addresses: vec![address.parse().expect("an address")],
        }
    }

    #[test]
    fn a_set_is_published_and_bad_input_changes_nothing() {
        let set = Nameservers::new();
        set.set(&[ns("n1.ns.revboot.test", "127.0.0.1")])
            .expect("published");
        assert_eq!(set.names(), ["n1.ns.revboot.test."]);
        let error = set
            .set(&[ns("bad name!.revboot.test", "127.0.0.2")])
            .expect_err("a bad name");
        assert!(error.to_string().contains("bad name!"), "{error}");
        let many: Vec<Nameserver> = (0..=MAX_NAMESERVERS)
            .map(|n| ns(&format!("n{n}.ns.revboot.test"), "127.0.0.1"))
            .collect();
        assert!(matches!(set.set(&many), Err(SetError::TooMany { .. })));
        assert_eq!(set.names(), ["n1.ns.revboot.test."]);
    }
}
