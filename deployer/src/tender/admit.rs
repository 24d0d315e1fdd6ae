//! Source admission at an instance's own socket: a per-client instance only takes
//! connections from the sources that may reach it.
//!
//! Behind the handshake proxy, the proxy admits a per-client instance's client at the
//! service address and port; but the instance's own socket (an ephemeral port on the same
//! address) would take a connection from anyone who finds the port. So:
//!
//! 1. The process tender attaches a classic BPF filter to the listening socket before the
//!    instance inherits it; accepted connections inherit the filter.
//! 2. The filter loads the IPv4 source address of each incoming packet and keeps the packet
//!    only if it is one of the admitted sources; any other SYN is dropped, so no handshake
//!    ever completes for it.
//! 3. The admitted sources: the service address itself, on any port (the handshake proxy
//!    and the deployer's readiness probes connect from there, see
//!    [`connect_from_own_address`]); and the client, but only at the service port — where
//!    it reaches the socket itself with no proxy in front (the socket is bound there), or
//!    when the deployer steers its warm connections into the socket ([`crate::steer`]:
//!    the connection keeps the service port as its local port). The socket's own port
//!    (an ephemeral one behind the proxy) is closed to the client.
//! 4. At a listening socket's filter the packet's data starts at the TCP header, so the
//!    destination port is the half-word at offset 2.
//!
//! Limits: IPv4 only (service addresses are IPv4); on loopback any local process can pick
//! any source address, so this separates clients that keep to their own address, which is
//! what per-client identity by source address means there.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use socket2::{SockFilter, Socket};

/// Keeps only packets whose IPv4 source is one of `sources` (at most 16), or is `client`'s
/// address with the destination port `client`'s port.
pub fn admit_only(
    socket: &Socket,
    sources: &[Ipv4Addr],
    client: Option<(Ipv4Addr, u16)>,
) -> io::Result<()> {
    socket.attach_filter(&program(sources, client)?)
}

/// The filter program: load the source address, compare, keep or drop; for the client,
/// also compare the destination port.
fn program(sources: &[Ipv4Addr], client: Option<(Ipv4Addr, u16)>) -> io::Result<Vec<SockFilter>> {
    if sources.is_empty() || sources.len() > 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "between 1 and 16 admitted sources",
        ));
    }
    let op = |code: u32| code as u16;
    let count = sources.len();
    // The instructions after the source comparisons: [client check: jeq, drop, ldh, jeq],
    // drop, keep.
    let tail = if client.is_some() { 4 } else { 0 };
    // ld [SKF_NET_OFF + 12]: the source address in the IPv4 header, in host order.
    let source_offset = (libc::SKF_NET_OFF + 12) as u32;
    let mut program = vec![SockFilter::new(
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS),
        0,
        0,
        source_offset,
    )];
    for (index, source) in sources.iter().enumerate() {
        // From comparison `index`, the keep instruction is this many ahead.
        let to_keep = u8::try_from(count - index + tail).expect("a short program");
        program.push(SockFilter::new(
            op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K),
            to_keep,
            0,
            u32::from(*source),
        ));
    }
    if let Some((client, port)) = client {
        // Not the client: drop (one ahead). The client: its destination port.
        program.push(SockFilter::new(
            op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K),
            1,
            0,
            u32::from(client),
        ));
        program.push(SockFilter::new(op(libc::BPF_RET | libc::BPF_K), 0, 0, 0));
        // ldh [2]: the TCP destination port.
        program.push(SockFilter::new(
            op(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS),
            0,
            0,
            2,
        ));
        program.push(SockFilter::new(
            op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K),
            1,
            0,
            u32::from(port),
        ));
    }
    program.push(SockFilter::new(op(libc::BPF_RET | libc::BPF_K), 0, 0, 0));
    program.push(SockFilter::new(
        op(libc::BPF_RET | libc::BPF_K),
        0,
        0,
        u32::MAX,
    ));
    Ok(program)
}

/// Connects to an instance's own socket from the instance's service address, the source
/// that socket admits (see the module docs).
pub async fn connect_from_own_address(backend: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let socket = match backend {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(backend.ip(), 0))?;
    socket.connect(backend).await
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use socket2::{Domain, Type};

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
        let client = client.map(|(ip, port)| (ip, port.unwrap_or(local.port())));
        admit_only(&socket, admitted, client).expect("filter");
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
        let many = vec![Ipv4Addr::LOCALHOST; 17];
        assert!(program(&many, None).is_err());
        assert_eq!(program(&many[..16], None).expect("16 fit").len(), 19);
        let client = Some((Ipv4Addr::LOCALHOST, 8080));
        assert_eq!(program(&many[..16], client).expect("16 fit").len(), 23);
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
        let front = std::net::SocketAddrV4::new(own, 8080);
        let _steered = steering
            .steer(front, Some(client), std::os::fd::AsFd::as_fd(&socket))
            .expect("steer");
        let stream = connect_from(client, SocketAddr::V4(front)).expect("steered, admitted");
        assert_eq!(stream.peer_addr().expect("peer"), SocketAddr::V4(front));
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
