//! Source admission at an instance's own socket: a per-client instance only takes
//! connections from the sources that may reach it.
//!
//! Behind the handshake proxy, the proxy admits a per-client instance's client at the
//! service address and port; but the instance's own socket (an ephemeral port on the same
//! address) would take a connection from anyone who finds the port. So:
//!
//! 1. The process tender attaches a classic BPF filter to the listening socket before the
//!    instance inherits it; accepted connections inherit the filter.
//! 2. The filter reads the IP version of each incoming packet (a dual-stack IPv6 socket
//!    also gets IPv4 packets), then its source address, and keeps the packet only if the
//!    source is one of the admitted sources; any other SYN is dropped, so no handshake ever
//!    completes for it.
//! 3. The admitted sources: the instance's service addresses, on any port (the handshake
//!    proxy and the deployer's readiness probes connect from there, see
//!    [`connect_from_own_address`]); and the client's network (its address masked to the
//!    client prefix, see [`crate::ClientPrefixes`]), but only at the service port — where
//!    it reaches the socket itself with no proxy in front (the socket is bound there), or
//!    when the deployer steers its warm connections into the socket ([`crate::steer`]:
//!    the connection keeps the service port as its local port). The socket's own port
//!    (an ephemeral one behind the proxy) is closed to the client.
//! 4. At a listening socket's filter the packet's data starts at the TCP header, so the
//!    destination port is the half-word at offset 2; the IP header is at `SKF_NET_OFF`.
//!
//! Limits: on loopback any local process can pick any source address, so this separates
//! clients that keep to their own address, which is what per-client identity by source
//! address means there.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{SockFilter, Socket};

use crate::addresses::ClientNet;

/// Keeps only packets whose source is one of `sources` (1 to 16 addresses, either family),
/// or lies in `client`'s network with the destination port `client`'s port.
pub fn admit_only(
    socket: &Socket,
    sources: &[IpAddr],
    client: Option<(ClientNet, u16)>,
) -> io::Result<()> {
    socket.attach_filter(&program(sources, client)?)
}

/// A classic BPF program with forward jumps to named labels.
#[derive(Default)]
struct Program {
    /// `struct sock_filter`: code, jt, jf, k.
    insns: Vec<(u16, u8, u8, u32)>,
    /// (instruction, label if true, label if false) for conditional jumps.
    fixups: Vec<(usize, &'static str, &'static str)>,
    labels: HashMap<&'static str, usize>,
}

/// The next instruction, for a jump that falls through.
const NEXT: &str = "";

impl Program {
    fn op(code: u32) -> u16 {
        code as u16
    }
    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.insns.len());
    }
    /// `A = *(u32 *)(net + offset)`.
    fn load_net_word(&mut self, offset: i32) {
        let code = Self::op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS);
        self.insns
            .push((code, 0, 0, (libc::SKF_NET_OFF + offset) as u32));
    }
    /// `A = *(u8 *)(net + offset)`.
    fn load_net_byte(&mut self, offset: i32) {
        let code = Self::op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS);
        self.insns
            .push((code, 0, 0, (libc::SKF_NET_OFF + offset) as u32));
    }
    /// `A = *(u16 *)(data + 2)`: the TCP destination port.
    fn load_destination_port(&mut self) {
        let code = Self::op(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS);
        self.insns.push((code, 0, 0, 2));
    }
    fn and(&mut self, mask: u32) {
        let code = Self::op(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K);
        self.insns.push((code, 0, 0, mask));
    }
    /// `if A == value goto yes else goto no` (`NEXT`: fall through).
    fn jeq(&mut self, value: u32, yes: &'static str, no: &'static str) {
        self.fixups.push((self.insns.len(), yes, no));
        let code = Self::op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K);
        self.insns.push((code, 0, 0, value));
    }
    fn ret(&mut self, keep: bool) {
        let code = Self::op(libc::BPF_RET | libc::BPF_K);
        self.insns
            .push((code, 0, 0, if keep { u32::MAX } else { 0 }));
    }
    fn finish(mut self) -> io::Result<Vec<SockFilter>> {
        for (at, yes, no) in std::mem::take(&mut self.fixups) {
            let offset = |label: &'static str| -> io::Result<u8> {
                if label == NEXT {
                    return Ok(0);
                }
                u8::try_from(self.labels[label] - at - 1)
                    .map_err(|_| io::Error::other("filter program too long"))
            };
            let (jt, jf) = (offset(yes)?, offset(no)?);
            self.insns[at].1 = jt;
            self.insns[at].2 = jf;
        }
        Ok(self
            .insns
            .into_iter()
            .map(|(code, jt, jf, k)| SockFilter::new(code, jt, jf, k))
            .collect())
    }
}

/// The filter program: the IP version, then the source against each admitted address and
/// the client network, then (for the client) the destination port.
fn program(sources: &[IpAddr], client: Option<(ClientNet, u16)>) -> io::Result<Vec<SockFilter>> {
    if sources.is_empty() || sources.len() > 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "between 1 and 16 admitted sources",
        ));
    }
    let mut p = Program::default();
    // The version nibble: 4 or 6.
    p.load_net_byte(0);
    p.and(0xf0);
    p.jeq(0x60, "v6", NEXT);
    // IPv4: the source address at offset 12.
    p.load_net_word(12);
    for source in sources.iter().map(|s| s.to_canonical()) {
        if let IpAddr::V4(v4) = source {
            p.jeq(u32::from(v4), "keep", NEXT);
        }
    }
    if let Some((client, _)) = client
        && let IpAddr::V4(network) = client.network()
    {
        p.and(
            u32::MAX
                .checked_shl(32 - u32::from(client.len()))
                .unwrap_or(0),
        );
        p.jeq(u32::from(network), "port", NEXT);
    }
    p.ret(false);
    // IPv6: the source address at offsets 8..24, word by word.
    p.label("v6");
    const V6_LABELS: [&str; 16] = [
        "v6-0", "v6-1", "v6-2", "v6-3", "v6-4", "v6-5", "v6-6", "v6-7", "v6-8", "v6-9", "v6-10",
        "v6-11", "v6-12", "v6-13", "v6-14", "v6-15",
    ];
    let v6_sources: Vec<[u32; 4]> = sources
        .iter()
        .filter_map(|s| match s.to_canonical() {
            IpAddr::V6(v6) => Some(words(v6.octets())),
            IpAddr::V4(_) => None,
        })
        .collect();
    for (index, source) in v6_sources.iter().enumerate() {
        let next = V6_LABELS[index];
        for (word, value) in source.iter().enumerate() {
            p.load_net_word(8 + 4 * word as i32);
            let yes = if word == 3 { "keep" } else { NEXT };
            p.jeq(*value, yes, next);
        }
        p.label(next);
    }
    if let Some((client, _)) = client
        && client.network().is_ipv6()
    {
        let (network, mask) = client.mapped();
        for (word, (value, mask)) in words(network).iter().zip(words(mask)).enumerate() {
            p.load_net_word(8 + 4 * word as i32);
            p.and(mask);
            let yes = if word == 3 { "port" } else { NEXT };
            p.jeq(*value, yes, "drop");
        }
    }
    p.label("drop");
    p.ret(false);
    // The client, at the service port only.
    p.label("port");
    if let Some((_, port)) = client {
        p.load_destination_port();
        p.jeq(u32::from(port), "keep", NEXT);
    }
    p.ret(false);
    p.label("keep");
    p.ret(true);
    p.finish()
}

/// 16 bytes as four big-endian words, as classic BPF loads them.
fn words(bytes: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4")))
}

/// Connects to an instance's own socket from the instance's service address, the source
/// that socket admits (see the module docs).
pub async fn connect_from_own_address(backend: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(backend),
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    if backend.is_ipv6() {
        // An address of a prefix routed to `lo` ("AnyIP") is not an interface address,
        // which an IPv6 bind checks for.
        socket.set_freebind_v6(true)?;
    }
    socket.bind(&SocketAddr::new(backend.ip(), 0).into())?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    socket.connect(backend).await
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use socket2::{Domain, Type};

    use std::net::Ipv4Addr;

    use super::*;

    fn listener(
        address: Ipv4Addr,
        admitted: &[Ipv4Addr],
        client: Option<(Ipv4Addr, Option<u16>)>,
    ) -> (Socket, SocketAddr) {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket
            .bind(&SocketAddr::new(address.into(), 0).into())
            .expect("bind");
        let local = socket
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("inet");
        // No port given: the client's port is the socket's own (as with no proxy in front).
        let client = client.map(|(ip, port)| {
            (
                ClientNet::new(IpAddr::V4(ip), 32),
                port.unwrap_or(local.port()),
            )
        });
        let admitted: Vec<IpAddr> = admitted.iter().copied().map(IpAddr::V4).collect();
        admit_only(&socket, &admitted, client).expect("filter");
        socket.listen(16).expect("listen");
        (socket, local)
    }

    fn connect_from(source: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source.into(), 0).into())?;
        // A dropped SYN is only ever a timeout; the bound keeps the test short.
        socket.connect_timeout(&to.into(), Duration::from_millis(700))?;
        Ok(socket.into())
    }

    #[test]
    fn only_admitted_sources_complete_a_handshake() {
        let own: Ipv4Addr = "127.79.0.1".parse().expect("ip");
        let client: Ipv4Addr = "127.79.0.21".parse().expect("ip");
        let other: Ipv4Addr = "127.79.0.22".parse().expect("ip");
        let (socket, local) = listener(own, &[own], Some((client, None)));
        socket.set_nonblocking(true).expect("nonblocking");
        connect_from(own, local).expect("the service address is admitted");
        connect_from(client, local).expect("the client is admitted");
        let refused = connect_from(other, local);
        assert!(refused.is_err(), "another source completed a handshake");
        assert!(connect_from(Ipv4Addr::LOCALHOST, local).is_err());
        let mut accepted = 0;
        while socket.accept().is_ok() {
            accepted += 1;
        }
        assert_eq!(
            accepted, 2,
            "exactly the admitted connections reached the queue"
        );
    }

    #[test]
    fn data_flows_on_admitted_connections() {
        use std::io::{Read, Write};
        let own: Ipv4Addr = "127.79.0.2".parse().expect("ip");
        let (socket, local) = listener(own, &[own], None);
        let mut client = connect_from(own, local).expect("connect");
        let (server, _) = socket.accept().expect("accept");
        let mut server: TcpStream = server.into();
        client.write_all(b"ping").expect("write");
        let mut buffer = [0u8; 4];
        server.read_exact(&mut buffer).expect("read");
        assert_eq!(&buffer, b"ping");
        server.write_all(b"pong").expect("write");
        client.read_exact(&mut buffer).expect("read");
        assert_eq!(&buffer, b"pong");
    }

    #[test]
    fn programs_are_bounded() {
        assert!(program(&[], None).is_err());
        let many = vec![IpAddr::V6(std::net::Ipv6Addr::LOCALHOST); 17];
        assert!(program(&many, None).is_err());
        let client = ClientNet::new("2001:db8::1".parse().expect("ip"), 64);
        // 16 IPv6 sources of 8 instructions each, and the client's 12, fit the 8-bit jumps.
        let longest = program(&many[..16], Some((client, 8080))).expect("16 fit");
        assert!(longest.len() > 16 * 8 + 12, "{}", longest.len());
    }

    /// Behind the proxy the client may not use the socket's own (ephemeral) port, only the
    /// service port the kernel steers to the socket.
    #[test]
    fn the_client_is_admitted_at_the_service_port_only() {
        let own: Ipv4Addr = "127.79.0.4".parse().expect("ip");
        let client: Ipv4Addr = "127.79.0.24".parse().expect("ip");
        let (socket, local) = listener(own, &[own], Some((client, Some(8080))));
        assert!(
            connect_from(client, local).is_err(),
            "the client completed a handshake on the socket's own port"
        );
        connect_from(own, local).expect("the service address is admitted on any port");
        let steering =
            crate::steer::Steering::open(4).expect("sk_lookup steering needs root and Linux 5.9");
        let front = SocketAddr::from((own, 8080));
        let client_net = ClientNet::new(IpAddr::V4(client), 32);
        let _steered = steering
            .steer(
                &[front],
                Some(client_net),
                0,
                std::os::fd::AsFd::as_fd(&socket),
            )
            .expect("steer");
        let stream = connect_from(client, front).expect("steered, admitted");
        assert_eq!(stream.peer_addr().expect("peer"), front);
        socket.accept().expect("the first (own address) connection");
        let (_, peer) = socket.accept().expect("the steered connection");
        assert_eq!(peer.as_socket().expect("inet").ip(), client);
    }

    #[tokio::test]
    async fn own_address_connections_are_admitted() {
        let own: Ipv4Addr = "127.79.0.3".parse().expect("ip");
        let (socket, local) = listener(own, &[own], None);
        let stream = tokio::time::timeout(Duration::from_secs(10), connect_from_own_address(local))
            .await
            .expect("in time")
            .expect("connect");
        assert_eq!(stream.local_addr().expect("local").ip(), own);
        socket.accept().expect("accepted");
    }
}
