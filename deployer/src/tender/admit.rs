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
//! 3. The admitted sources: the service address itself (the handshake proxy and the
//!    deployer's readiness probes connect from there, see [`connect_from_own_address`]), and,
//!    where clients connect directly (no proxy in front), the client.
//!
//! Limits: IPv4 only (service addresses are IPv4); on loopback any local process can pick
//! any source address, so this separates clients that keep to their own address, which is
//! what per-client identity by source address means there.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use socket2::{SockFilter, Socket};

/// Keeps only packets whose IPv4 source is one of `sources` (at most 16).
pub fn admit_only(socket: &Socket, sources: &[Ipv4Addr]) -> io::Result<()> {
    socket.attach_filter(&program(sources)?)
}

/// The filter program: load the source address, compare, keep or drop.
fn program(sources: &[Ipv4Addr]) -> io::Result<Vec<SockFilter>> {
    if sources.is_empty() || sources.len() > 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "between 1 and 16 admitted sources",
        ));
    }
    let count = sources.len();
    // ld [SKF_NET_OFF + 12]: the source address in the IPv4 header, in host order.
    let source_offset = (libc::SKF_NET_OFF + 12) as u32;
    let mut program = vec![SockFilter::new(
        (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        0,
        0,
        source_offset,
    )];
    for (index, source) in sources.iter().enumerate() {
        // From instruction `index + 1`, the keep instruction is at `count + 2`.
        let to_keep = (count - index) as u8;
        program.push(SockFilter::new(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            to_keep,
            0,
            u32::from(*source),
        ));
    }
    program.push(SockFilter::new(
        (libc::BPF_RET | libc::BPF_K) as u16,
        0,
        0,
        0,
    ));
    program.push(SockFilter::new(
        (libc::BPF_RET | libc::BPF_K) as u16,
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

    fn listener(address: Ipv4Addr, admitted: &[Ipv4Addr]) -> (Socket, SocketAddr) {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket
            .bind(&SocketAddr::new(address.into(), 0).into())
            .expect("bind");
        admit_only(&socket, admitted).expect("filter");
        socket.listen(16).expect("listen");
        let local = socket
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("inet");
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
        let (socket, local) = listener(own, &[own, client]);
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
        let (socket, local) = listener(own, &[own]);
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
        assert!(program(&[]).is_err());
        let many = vec![Ipv4Addr::LOCALHOST; 17];
        assert!(program(&many).is_err());
        assert_eq!(program(&many[..16]).expect("16 fit").len(), 19);
    }

    #[tokio::test]
    async fn own_address_connections_are_admitted() {
        let own: Ipv4Addr = "127.79.0.3".parse().expect("ip");
        let (socket, local) = listener(own, &[own]);
        let stream = tokio::time::timeout(Duration::from_secs(10), connect_from_own_address(local))
            .await
            .expect("in time")
            .expect("connect");
        assert_eq!(stream.local_addr().expect("local").ip(), own);
        socket.accept().expect("accepted");
    }
}
