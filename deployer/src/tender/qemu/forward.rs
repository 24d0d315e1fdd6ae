//! The host side of a VM's port forward (qemu's user networking `hostfwd`): where it
//! listens, and how the tender learns the port when qemu picked it.
//!
//! 1. An instance behind the proxy (`BackendPort::Ephemeral`) forwards from its IPv4
//!    service address (loopback for one on IPv6 alone: [`host`]) at port 0. qemu binds it
//!    and the kernel picks the port as it does, so no other process can take the port
//!    between a check and qemu's bind, as it could when the daemon probed a port and
//!    released it for qemu. Landlock lets qemu bind port 0 alone: the kernel's pick.
//! 2. Once qemu answers on QMP, `info usernet` names the port its forward bound
//!    ([`learn`]): for a cold boot, the supervisor asks as its session comes up; for a
//!    restore, right after `hostfwd_add` and `cont` (the guest runs meanwhile). The instance is ready only once it is known, so
//!    no connection is relayed or steered to it before.
//! 3. An instance that listens on its service address's own port (`BackendPort::Same`)
//!    forwards from the manifest port, known from the start; [`claim`] checks that it is
//!    free when the instance is prepared (the address is the instance's own: nothing of
//!    revboot binds it meanwhile).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

use super::qmp::Qmp;
use super::{QMP_REPLY_TIMEOUT, invalid};
use crate::config::BackendPort;
use crate::tender::{BootError, BootSpec};

/// The port forward of an instance, as `hostfwd` and `hostfwd_add` take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Forward {
    /// Where it listens on the host.
    pub(super) host: Ipv4Addr,
    /// Its port on the host; 0 for the kernel's pick as qemu binds it.
    pub(super) port: u16,
    /// The guest's port.
    pub(super) guest: u16,
}

impl Forward {
    /// `tcp:<host>:<port>-:<guest>`.
    pub(super) fn arg(&self) -> String {
        format!("tcp:{}:{}-:{}", self.host, self.port, self.guest)
    }

    /// Where it listens, when known before qemu binds it.
    pub(super) fn known(&self) -> Option<SocketAddr> {
        (self.port != 0).then(|| SocketAddr::new(IpAddr::V4(self.host), self.port))
    }
}

/// Where the host side of an instance's port forward listens: its IPv4 service address, or
/// for an instance on IPv6 alone, [`Ipv4Addr::LOCALHOST`] (its port the kernel's pick).
///
/// qemu 7.2's `hostfwd` takes IPv4 host addresses only (`[::1]` is "Bad host address"),
/// and the kernel hands an IPv6 connection to IPv6 sockets only (`sk_lookup` refuses an
/// `AF_INET` one). So the proxy, listening on every service address, relays a VM's IPv6
/// connections to the forward, while its IPv4 ones are steered there once it is ready.
pub(super) fn host(spec: &BootSpec) -> Result<Ipv4Addr, BootError> {
    match (spec.addresses.v4(), spec.backend_port) {
        (Some(v4), _) => Ok(v4),
        (None, BackendPort::Ephemeral) => Ok(Ipv4Addr::LOCALHOST),
        (None, BackendPort::Same) => Err(invalid(
            "port forward",
            format!(
                "qemu user networking forwards from IPv4 only, and {} has no proxy in front \
                 to bring its IPv6 connections there (`direct = false`)",
                spec.addresses
            ),
        )),
    }
}

/// Checks that `port` on `host` is free now (rule 3): a taken one is refused before
/// anything boots.
pub(super) fn claim(host: Ipv4Addr, port: u16) -> Result<(), BootError> {
    let address = SocketAddr::new(IpAddr::V4(host), port);
    TcpListener::bind(address)
        .map(drop)
        .map_err(|source| BootError::Bind { address, source })
}

/// Where the forward from `host` listens, as qemu's `info usernet` says (rule 2); within
/// [`QMP_REPLY_TIMEOUT`].
pub(super) async fn learn(qmp: &mut Qmp, host: Ipv4Addr) -> Result<SocketAddr, String> {
    let asked = qmp.call(
        "human-monitor-command",
        Some(serde_json::json!({ "command-line": "info usernet" })),
    );
    let said = tokio::time::timeout(QMP_REPLY_TIMEOUT, asked)
        .await
        .map_err(|_| "`info usernet` was not answered in time".to_owned())?
        .map_err(|error| format!("`info usernet`: {error}"))?;
    let text = said.as_str().unwrap_or("");
    bound_port(text, host)
        .map(|port| SocketAddr::new(IpAddr::V4(host), port))
        .ok_or_else(|| format!("`info usernet` lists no forward from {host}"))
}

/// The host port of the forward from `host` in `info usernet`'s table, whose rows read
/// (qemu 7.2): `TCP[HOST_FORWARD]  8  127.0.0.1 46521  10.0.2.15  8080  0  0`.
fn bound_port(usernet: &str, host: Ipv4Addr) -> Option<u16> {
    usernet.lines().find_map(|row| {
        let mut fields = row.split_whitespace();
        if fields.next() != Some("TCP[HOST_FORWARD]") {
            return None;
        }
        let (_fd, source, port) = (fields.next()?, fields.next()?, fields.next()?);
        let port: u16 = port.parse().ok()?;
        (source.parse::<Ipv4Addr>().ok()? == host && port != 0).then_some(port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_port_is_read_from_info_usernet() {
        // As qemu 7.2 answers `human-monitor-command` `info usernet` with two forwards.
        let said = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   \
                    Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]  13       127.0.0.2 \
                    33099       10.0.2.15  9090     0     0\r\n  TCP[HOST_FORWARD]   8       \
                    127.0.0.1 46521       10.0.2.15  8080     0     0\r\n";
        assert_eq!(bound_port(said, Ipv4Addr::LOCALHOST), Some(46521));
        assert_eq!(bound_port(said, Ipv4Addr::new(127, 0, 0, 2)), Some(33099));
        assert_eq!(bound_port(said, Ipv4Addr::new(127, 0, 0, 3)), None);
        assert_eq!(bound_port("", Ipv4Addr::LOCALHOST), None);
        let unbound = "  TCP[HOST_FORWARD]   8       127.0.0.1     0       10.0.2.15  8080";
        assert_eq!(bound_port(unbound, Ipv4Addr::LOCALHOST), None);
    }

    #[test]
    fn a_forward_from_port_zero_is_known_once_qemu_bound_it() {
        let picked = Forward {
            host: Ipv4Addr::new(127, 77, 0, 9),
            port: 0,
            guest: 8080,
        };
        assert_eq!(picked.arg(), "tcp:127.77.0.9:0-:8080");
        assert_eq!(picked.known(), None);
        let same = Forward { port: 80, ..picked };
        assert_eq!(same.known(), Some("127.77.0.9:80".parse().expect("addr")));
    }
}
