//! Open connections on an instance's own socket, for instances clients reach directly.
//!
//! Behind the handshake proxy every connection is reported as activity. An instance that
//! owns its client-facing socket (`BackendPort::Same`: no proxy in front) is reached by the
//! kernel alone, so before such an instance is reaped for idleness the deployer asks the
//! kernel whether any connection to that socket is still open: one `sock_diag` netlink dump
//! of TCP sockets, filtered in the kernel by a bytecode condition on the local address and
//! port, counting every state of an accepted connection that is not yet closed (also those
//! still waiting in the accept queue). A connection handed to an instance
//! (`crate::handoff`) is looked up by its two ends instead, one exact lookup, no dump.
//!
//! Hand-written on `libc` (a request, one condition, a reply walk): the netlink crates
//! would add three dependencies for these hundred lines.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_REQ_BYTECODE`.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// `INET_DIAG_BC_S_COND`: the local address and port match a host condition.
const INET_DIAG_BC_S_COND: u8 = 7;
/// TCP states of a connection that is open, or closing with a peer still attached:
/// ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING (not LISTEN, SYN_RECV,
/// TIME_WAIT or CLOSE).
const OPEN_STATES: u32 = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
/// The most processes of one instance whose sockets [`held_sockets`] reads.
const PROCESSES: usize = 64;
/// How long the kernel may take to answer.
const TIMEOUT: libc::timeval = libc::timeval {
    tv_sec: 1,
    tv_usec: 0,
};

/// The number of open TCP connections whose local end is `local`; with `held`, only those
/// whose socket is one of these inodes or not accepted yet (its owner is not known then).
pub(crate) fn open_connections(
    local: SocketAddr,
    held: Option<&HashSet<u64>>,
) -> io::Result<usize> {
    let socket = diag_socket()?;
    send(&socket, &request(local))?;
    let mut buffer = vec![0u8; 32 * 1024];
    let mut count = 0;
    loop {
        let received = receive(&socket, &mut buffer)?;
        let mut rest = &buffer[..received];
        while rest.len() >= 16 {
            let length = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
            if length < 16 || length > rest.len() {
                return Err(io::Error::other("truncated sock_diag reply"));
            }
            match kind {
                SOCK_DIAG_BY_FAMILY => {
                    // struct inet_diag_msg: idiag_inode after 68 bytes.
                    let inode = rest
                        .get(16 + 68..16 + 72)
                        .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    if held.is_none_or(|held| inode == 0 || held.contains(&u64::from(inode))) {
                        count += 1;
                    }
                }
                k if k == libc::NLMSG_DONE as u16 => return Ok(count),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let errno = rest
                        .get(16..20)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .unwrap_or(0);
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => {}
            }
            rest = &rest[length.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// The inodes of the sockets that process `pid` and its descendants (up to [`PROCESSES`]
/// of them) hold open, from `/proc/<pid>/fd`: the connections an instance accepted.
pub(crate) fn held_sockets(pid: u32) -> HashSet<u64> {
    let mut held = HashSet::new();
    let mut pids = vec![pid];
    let mut seen = 0;
    while let Some(pid) = pids.pop()
        && seen < PROCESSES
    {
        seen += 1;
        let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"));
        for descriptor in descriptors.into_iter().flatten().flatten() {
            let target = std::fs::read_link(descriptor.path()).unwrap_or_default();
            let inode: Option<u64> = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
            held.extend(inode);
        }
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|child| child.parse::<u32>().ok()),
            );
        }
    }
    held
}

/// True while the TCP connection between `local` and `peer` is open: one exact lookup
/// (`inet_diag_find_one`, no dump), its state one of [`OPEN_STATES`]. Not found, in
/// `TIME_WAIT`, or a listener that matches instead: false.
pub(crate) fn open_between(local: SocketAddr, peer: SocketAddr) -> io::Result<bool> {
    let socket = diag_socket()?;
    send(&socket, &exact(local, peer))?;
    let mut buffer = [0u8; 1024];
    let received = receive(&socket, &mut buffer)?;
    let reply = &buffer[..received];
    if reply.len() < 18 {
        return Err(io::Error::other("truncated sock_diag reply"));
    }
    match u16::from_ne_bytes([reply[4], reply[5]]) {
        // struct inet_diag_msg: family, then state.
        SOCK_DIAG_BY_FAMILY => Ok(1u32
            .checked_shl(u32::from(reply[17]))
            .is_some_and(|state| OPEN_STATES & state != 0)),
        k if k == libc::NLMSG_ERROR as u16 => {
            let errno = i32::from_ne_bytes(reply[16..20].try_into().expect("4 bytes"));
            match -errno {
                libc::ENOENT => Ok(false),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        }
        _ => Err(io::Error::other("unexpected sock_diag reply")),
    }
}

/// One datagram of the kernel's answer into `buffer`; its length.
fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into our buffer, at most its length.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
        )
    };
    usize::try_from(received).map_err(|_| io::Error::last_os_error())
}

/// A netlink `sock_diag` socket that waits at most [`TIMEOUT`] for an answer.
fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = TIMEOUT;
    // SAFETY: a timeval option of the right size on our socket.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Sends `request` to the kernel on `socket`.
fn send(socket: &OwnedFd, request: &[u8]) -> io::Result<()> {
    // SAFETY: sending our buffer on our socket (the kernel is the default destination).
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exact lookup of the TCP socket whose local end is `local` and remote end `peer`.
fn exact(local: SocketAddr, peer: SocketAddr) -> Vec<u8> {
    let octets = |address: SocketAddr| -> [u8; 16] {
        let mut out = [0u8; 16];
        match address.ip() {
            IpAddr::V4(ip) => out[..4].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => out = ip.octets(),
        }
        out
    };
    let family = match local.ip() {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
    // sport, dport (big-endian), src[4], dst[4], if, cookie[2] (none: all ones).
    let mut body = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
    body.extend_from_slice(&OPEN_STATES.to_ne_bytes());
    body.extend_from_slice(&local.port().to_be_bytes());
    body.extend_from_slice(&peer.port().to_be_bytes());
    body.extend_from_slice(&octets(local));
    body.extend_from_slice(&octets(peer));
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&[0xff; 8]);
    message(libc::NLM_F_REQUEST as u16, &body)
}

/// A dump request for TCP sockets of `local`'s family in [`OPEN_STATES`] whose local end is
/// `local` (a bytecode host condition: full-length prefix, exact port).
fn request(local: SocketAddr) -> Vec<u8> {
    let (family, address): (u8, Vec<u8>) = match local.ip() {
        IpAddr::V4(ip) => (libc::AF_INET as u8, ip.octets().to_vec()),
        IpAddr::V6(ip) => (libc::AF_INET6 as u8, ip.octets().to_vec()),
    };
    // struct inet_diag_bc_op { u8 code; u8 yes; u16 no } + struct inet_diag_hostcond
    // { u8 family; u8 prefix_len; i32 port; be32 addr[] }: matched goes on to the end
    // (accept), unmatched jumps 4 bytes past it (reject).
    let op_len = 4 + 8 + address.len();
    let mut bytecode = vec![INET_DIAG_BC_S_COND, op_len as u8];
    bytecode.extend_from_slice(&((op_len + 4) as u16).to_ne_bytes());
    bytecode.push(family);
    bytecode.push((address.len() * 8) as u8);
    bytecode.extend_from_slice(&[0, 0]);
    bytecode.extend_from_slice(&i32::from(local.port()).to_ne_bytes());
    bytecode.extend_from_slice(&address);

    // struct inet_diag_req_v2 (56 bytes): family, protocol, ext, pad, states, sockid.
    let mut body = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
    body.extend_from_slice(&OPEN_STATES.to_ne_bytes());
    body.extend_from_slice(&[0u8; 48]);
    // The bytecode attribute.
    let attribute_len = 4 + bytecode.len();
    body.extend_from_slice(&(attribute_len as u16).to_ne_bytes());
    body.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    body.extend_from_slice(&bytecode);

    message((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16, &body)
}

/// A `SOCK_DIAG_BY_FAMILY` netlink message with `flags` around `body`.
fn message(flags: u16, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(16 + body.len());
    message.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    message.extend_from_slice(body);
    message
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn counts_open_connections_to_one_socket_and_no_others() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let local = listener.local_addr().expect("address");
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        assert_eq!(
            open_connections(local, None).expect("dump"),
            0,
            "a listener alone"
        );

        // One accepted, one waiting in the accept queue, one to another socket.
        let mut accepted_client = TcpStream::connect(local).expect("connect");
        let (mut accepted, _) = listener.accept().expect("accept");
        accepted
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let _queued = TcpStream::connect(local).expect("connect");
        let _elsewhere = TcpStream::connect(other.local_addr().expect("address")).expect("connect");
        assert_eq!(open_connections(local, None).expect("dump"), 2);
        // Held by this process: both; by none, the queued one alone (its owner unknown).
        let mine = held_sockets(std::process::id());
        assert_eq!(open_connections(local, Some(&mine)).expect("dump"), 2);
        let none = HashSet::new();
        assert_eq!(open_connections(local, Some(&none)).expect("dump"), 1);

        // Closed on both ends: gone (the closing side waits in TIME_WAIT, not counted).
        accepted_client.write_all(b"x").expect("write");
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).expect("read");
        drop(accepted_client);
        assert_eq!(accepted.read(&mut byte).expect("eof"), 0);
        drop(accepted);
        // The last ACK of the close crosses loopback at once; allow it a moment anyway.
        let mut left = open_connections(local, None).expect("dump");
        for _ in 0..100 {
            if left == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            left = open_connections(local, None).expect("dump");
        }
        assert_eq!(left, 1, "the queued one is left");
    }

    #[test]
    fn ipv6_sockets_are_counted_too() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            return; // no IPv6 loopback here
        };
        let local = listener.local_addr().expect("address");
        let _client = TcpStream::connect(local).expect("connect");
        assert_eq!(open_connections(local, None).expect("dump"), 1);
    }
}
