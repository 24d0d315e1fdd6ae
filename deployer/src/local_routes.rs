//! Making the address pools local ("AnyIP"): a `local` route per pool on `lo`.
//!
//! An instance binds an address of its pool and the proxy listens there, so the kernel must
//! take every address of a pool as its own. For `127.0.0.0/8` it already does (the `local`
//! route the kernel adds with `lo`); for a prefix routed to the host from outside
//! (`2001:db8:1::/64`, `203.0.113.16/28`) revboot adds the same kind of route itself:
//! `local <prefix> dev lo table local proto 243`, the equivalent of
//! `ip route add local <prefix> dev lo`. One route per pool makes every address of it local
//! without configuring addresses one by one (the kernel answers ARP/NDP for none of them:
//! the prefix must be routed to the host by its neighbours).
//!
//! At start each pool is one of: already local (a route revboot did not add covers it, left
//! alone), made local (revboot added the route), or adopted (a route of revboot's own
//! protocol number is there already, left by a daemon that was killed: it is taken over and
//! removed at shutdown like a new one). The deployer logs which. Routes are changed through
//! rtnetlink (the `rtnetlink` crate: the maintained netlink client of the Rust networking
//! ecosystem, the one `ip` itself speaks to the kernel), in a thread of its own with a
//! bounded wait, since the deployer starts and stops outside any particular runtime.
//!
//! Before that, [`check_host_addresses`] refuses a pool that holds an address configured on
//! an interface of the host: the instances would take that address from the host.

use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::{info, warn};

use crate::addresses::{ClientNet, Family};
use crate::config::Prefix;

/// The route protocol number revboot marks its routes with (`proto 243` in `ip route`):
/// unassigned in `/etc/iproute2/rt_protos`, so a route with it is revboot's.
pub const ROUTE_PROTOCOL: u8 = 243;

/// The kernel's `local` routing table.
const LOCAL_TABLE: u32 = 255;

/// How long one round of route changes may take.
const NETLINK_WAIT: Duration = Duration::from_secs(5);

/// How a pool came to be local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locality {
    /// A route revboot did not add covers it: left alone.
    AlreadyLocal,
    /// revboot added a `local` route for it (removed at shutdown).
    Made,
    /// A route revboot added before a crash was found and taken over (removed at shutdown).
    Adopted,
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Locality::AlreadyLocal => "already local",
            Locality::Made => "made local (route on lo added)",
            Locality::Adopted => "made local (route on lo left by an earlier run, adopted)",
        })
    }
}

/// Why the pools could not be made local.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A pool holds an address configured on an interface of the host.
    #[error("pool {pool} holds {address}, an address of interface {interface}")]
    HostAddress {
        /// The pool.
        pool: Prefix,
        /// The host's address.
        address: IpAddr,
        /// Its interface.
        interface: String,
    },
    /// The interfaces could not be listed.
    #[error("cannot list the host's addresses")]
    Interfaces(#[source] nix::Error),
    /// A netlink request failed (no permission to add routes: run as root or with
    /// `CAP_NET_ADMIN`, or route the pool to `lo` yourself).
    #[error("cannot make pool {pool} local: {message}")]
    Route {
        /// The pool.
        pool: Prefix,
        /// What the kernel or the netlink client said.
        message: String,
    },
}

/// The routes this deployer owns; [`LocalRoutes::remove`] takes them away.
#[derive(Debug, Default)]
pub struct LocalRoutes {
    owned: Vec<Prefix>,
}

/// Refuses a pool holding an address configured on an interface of the host.
pub fn check_host_addresses(pools: &[Prefix]) -> Result<(), LocalError> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(LocalError::Interfaces)?;
    for interface in addresses {
        let Some(address) = interface.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        }) else {
            continue;
        };
        if let Some(pool) = pools.iter().find(|pool| pool.contains(address)) {
            return Err(LocalError::HostAddress {
                pool: *pool,
                address,
                interface: interface.interface_name,
            });
        }
    }
    Ok(())
}

/// Makes every pool local, adding a route where none covers it; says how for each.
pub fn make_local(pools: &[Prefix]) -> Result<(LocalRoutes, Vec<(Prefix, Locality)>), LocalError> {
    let pools = pools.to_vec();
    let first = pools[0];
    on_netlink(first, move |handle| async move {
        let lo = loopback_index(&handle, first).await?;
        let mut local = Vec::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            if pools.iter().any(|pool| pool.family() == family) {
                let routes = local_table(&handle, family).await;
                local.extend(routes.map_err(|message| route_error(first, message))?);
            }
        }
        let mut routes = LocalRoutes::default();
        let mut said = Vec::with_capacity(pools.len());
        for pool in pools {
            let error = |message: String| LocalError::Route { pool, message };
            let locality = match covering_route(&local, pool) {
                Some(protocol) if protocol == RouteProtocol::Other(ROUTE_PROTOCOL) => {
                    Locality::Adopted
                }
                Some(_) => Locality::AlreadyLocal,
                None => {
                    handle
                        .route()
                        .add(local_route(pool, lo))
                        .execute()
                        .await
                        .map_err(|e| error(e.to_string()))?;
                    Locality::Made
                }
            };
            if locality != Locality::AlreadyLocal {
                routes.owned.push(pool);
            }
            info!(%pool, "pool {locality}");
            said.push((pool, locality));
        }
        Ok((routes, said))
    })
}

impl LocalRoutes {
    /// The pools whose routes this deployer owns.
    pub fn owned(&self) -> &[Prefix] {
        &self.owned
    }

    /// Removes the routes this deployer added or adopted (at shutdown). Failures are logged:
    /// a route left behind is adopted by the next start.
    pub fn remove(&mut self) {
        let owned = std::mem::take(&mut self.owned);
        let Some(&first) = owned.first() else {
            return;
        };
        let result = on_netlink(first, move |handle| async move {
            let lo = loopback_index(&handle, first).await?;
            for pool in owned {
                match handle.route().del(local_route(pool, lo)).execute().await {
                    Ok(()) => info!(%pool, "pool route on lo removed"),
                    Err(e) => warn!(%pool, error = %e, "cannot remove the pool's route on lo"),
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            warn!(error = %e, "cannot remove the pools' routes");
        }
    }
}

/// `local <pool> dev lo table local proto 243 scope host`.
fn local_route(pool: Prefix, lo: u32) -> RouteMessage {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(pool.network, pool.len)
        .expect("a pool's network and length agree (checked when parsed)")
        .output_interface(lo)
        .table_id(LOCAL_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build()
}

/// The `local` routes of the kernel's local table for `family`: destination, prefix
/// length, protocol.
async fn local_table(
    handle: &Handle,
    family: Family,
) -> Result<Vec<(IpAddr, u8, RouteProtocol)>, String> {
    let query = match family {
        Family::Ipv4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        Family::Ipv6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    };
    let mut routes = handle.route().get(query).execute();
    let mut local = Vec::new();
    // Read to the end: a dump left half-read would stall the connection's next request.
    while let Some(route) = routes.try_next().await.map_err(|e| e.to_string())? {
        if route.header.kind != RouteType::Local || table(&route) != LOCAL_TABLE {
            continue;
        }
        let destination = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        });
        if let Some(destination) = destination {
            let len = route.header.destination_prefix_length;
            local.push((destination, len, route.header.protocol));
        }
    }
    Ok(local)
}

/// The protocol of a `local` route that covers all of `pool`, if there is one; an exact
/// route of revboot's own wins over a wider one of someone else's.
fn covering_route(local: &[(IpAddr, u8, RouteProtocol)], pool: Prefix) -> Option<RouteProtocol> {
    let ours = RouteProtocol::Other(ROUTE_PROTOCOL);
    let mut covering = local.iter().filter(|(destination, len, _)| {
        *len <= pool.len && ClientNet::new(*destination, *len).contains(pool.network)
    });
    let first = covering.next().map(|(.., protocol)| *protocol)?;
    Some(if covering.any(|(.., protocol)| *protocol == ours) {
        ours
    } else {
        first
    })
}

fn table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

async fn loopback_index(handle: &Handle, pool: Prefix) -> Result<u32, LocalError> {
    let mut links = handle.link().get().match_name("lo".to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(route_error(pool, "no interface lo".into())),
        Err(e) => Err(route_error(pool, format!("cannot find lo: {e}"))),
    }
}

fn route_error(pool: Prefix, message: String) -> LocalError {
    LocalError::Route { pool, message }
}

/// Runs `work` against a fresh rtnetlink connection on a thread of its own (a runtime of its
/// own too: the caller may be inside one), waiting [`NETLINK_WAIT`] at most.
fn on_netlink<T, F, W>(pool: Prefix, work: W) -> Result<T, LocalError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, LocalError>>,
    W: FnOnce(Handle) -> F + Send + 'static,
{
    let thread = std::thread::Builder::new()
        .name("revboot-netlink".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| route_error(pool, format!("cannot start a runtime: {e}")))?;
            runtime.block_on(async move {
                let (connection, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| route_error(pool, format!("cannot open netlink: {e}")))?;
                tokio::spawn(connection);
                tokio::time::timeout(NETLINK_WAIT, work(handle))
                    .await
                    .map_err(|_| route_error(pool, "netlink did not answer in time".into()))?
            })
        })
        .map_err(|e| route_error(pool, format!("cannot start a thread: {e}")))?;
    thread
        .join()
        .map_err(|_| route_error(pool, "the netlink thread panicked".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_holding_an_interface_address_is_refused_by_name() {
        let pool: Prefix = "127.0.0.0/24".parse().expect("a pool");
        let error = check_host_addresses(&[pool]).expect_err("lo has 127.0.0.1");
        let message = error.to_string();
        assert!(message.contains("127.0.0.0/24"), "{message}");
        assert!(message.contains("127.0.0.1"), "{message}");
        assert!(message.contains("interface lo"), "{message}");
        check_host_addresses(&["127.77.0.0/16".parse().expect("a pool")])
            .expect("no interface address inside");
    }

    #[test]
    fn a_loopback_pool_is_already_local_and_left_alone() {
        let pool: Prefix = "127.77.0.0/16".parse().expect("a pool");
        let (mut routes, said) = make_local(&[pool]).expect("local");
        assert_eq!(said, [(pool, Locality::AlreadyLocal)]);
        assert!(routes.owned().is_empty());
        routes.remove();
    }
}
