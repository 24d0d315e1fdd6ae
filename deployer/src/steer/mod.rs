//! Kernel hand-off of warm connections: a connection to a ready instance's service address
//! goes straight into the instance's own listening socket, with no user-space hop.
//!
//! The handshake proxy listens on every service address it hands out, so that a connection
//! made while the instance boots is held, not refused. Once the instance is ready, relaying
//! each byte through the proxy only costs: two more wake-ups and two more copies per
//! exchange, about half the throughput on a small machine. So, while an instance is ready
//! — and from its boot on when its socket listens from the start and it accepts only what
//! it can serve (`Running::holds_handshakes`: the process tender, whose socket is bound
//! before the process starts, so a connection made during the boot waits in that socket's
//! backlog, never refused and never relayed):
//!
//! 1. [`Steering::open`] loads a `BPF_PROG_TYPE_SK_LOOKUP` program into the deployer's
//!    network namespace (a BPF link: it is detached when the deployer's descriptor closes,
//!    a kill -9 included). The program runs when the kernel looks for the listening socket
//!    of an incoming TCP SYN, before the ordinary lookup.
//! 2. [`Steering::steer`] puts a route `service address:port → instance socket` in three
//!    maps: a hash of routes (the admitted client, the slots in use), a sockhash holding
//!    the instance's listening socket under the route and its slot, and a hash of
//!    connection counters under the same key. An instance has slot 0; the replicas of a
//!    revision, which share its address, have a slot each, their replica index, with the
//!    same route (anyone admitted): the route lists the slots in use, kept dense as
//!    replicas come and go.
//! 3. For each SYN to an address and port with a route (IPv4 or IPv6; an IPv4 address is
//!    looked up in its IPv4-mapped form, so one key and one comparison serve both): a
//!    per-client route whose client network does not hold the SYN's source passes it on
//!    (to the proxy, which refuses it); otherwise the program picks a slot in use by a hash
//!    of the source address and port (so that a SYN sent again lands on the same socket
//!    while the slots stay), selects that slot's socket, and counts the connection in that
//!    slot's counter. The instance accepts it as if it were bound to the service port. An
//!    instance with an address of each family has one route per address, both to its one
//!    socket (a dual-stack IPv6 socket, which the kernel lets take IPv4 connections too).
//! 4. Everything else — no route, UDP, a socket already gone (a replica that ended, its
//!    guard not dropped yet) — passes on unchanged to the ordinary lookup: the proxy's
//!    listener.
//! 5. Dropping the [`Steered`] guard takes its slot out of the route first, then its
//!    socket and counter, and the route with its last slot (the instance stops or ended);
//!    a closed socket leaves the sockhash on its own.
//!
//! Activity stays visible: [`Steered::connections`] counts the connections steered to one
//! socket (one replica), and the deployer counts open ones on the instance's socket through
//! `sock_diag` before it reaps.
//!
//! # Why hand-assembled
//!
//! The program is about seventy instructions. Compiling it needs a BPF target (clang or
//! rustc's `bpfel`), which a stable x86_64-only toolchain does not have, and loading it needs three
//! syscalls; a loader library (aya, libbpf) would bring an ELF loader and BTF handling for
//! a program that has neither. So the instructions are written out below with a tiny label
//! assembler, and loaded with `bpf(2)` directly.
//!
//! # Limits
//!
//! Root (`CAP_BPF` and `CAP_NET_ADMIN`) and Linux ≥ 5.9. TCP only (anything else is
//! relayed by the proxy as before). The instance's socket is taken from its process with
//! `pidfd_getfd` ([`listener_at`], [`listener_of`]: the process tender's descriptor 3,
//! qemu's forwarded port), which needs ptrace rights over it. Steered connections are the
//! instance's own: the proxy's idle and total timeouts do not apply to them.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::addresses::ClientNet;

mod bpf;

use bpf::{
    Asm, Insn, MAP_TYPE_HASH, MAP_TYPE_SOCKHASH, NO_PREALLOC, R0, R1, R2, R3, R4, R6, R7, R8, R9,
    R10, link_create, map_create, map_delete, map_lookup, map_update, owned, program_load,
};

/// The route key: the address in its IPv6 (or IPv4-mapped) form, network order as the
/// program reads it, and the port (host order, as the kernel gives it to the program).
type Key = [u8; 20];

/// A slot's key (the socket, the counter): the route key and the slot number.
type SlotKey = [u8; 24];

/// Slots a route can hold: one socket each (replicas of one revision, `MAX_REPLICAS`).
pub const SLOTS: usize = 16;

/// The route value the program reads: the admitted client network and its mask (IPv6 or
/// IPv4-mapped form; all zero = anyone, as any source masked by zero is zero), how many
/// slots are in use and their numbers, the first `count` of `slots`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Route {
    client: [u8; 16],
    mask: [u8; 16],
    count: u32,
    slots: [u8; SLOTS],
}

/// The loaded program, its maps and its link into the network namespace.
#[derive(Debug)]
pub struct Steering {
    routes: OwnedFd,
    sockets: OwnedFd,
    counts: OwnedFd,
    _program: OwnedFd,
    _link: OwnedFd,
    capacity: usize,
    /// Routes installed and the value each has in the kernel: the slots in use, so that two
    /// guards never share a slot, and rewritten as guards come and go.
    installed: Mutex<HashMap<Key, Route>>,
}

/// Why a route could not be installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SteerError {
    /// Another route has this address and port: for another client, or in this slot.
    #[error("{0} is already steered")]
    Taken(SocketAddr),
    /// Every socket place is in use.
    #[error("All {0} steering routes are in use")]
    Full(usize),
    /// A slot number beyond [`SLOTS`].
    #[error("Slot {0} is beyond the {SLOTS} a route holds")]
    Slot(usize),
    /// The kernel refused the map update (e.g. the socket is not listening).
    #[error("The kernel refused the route for {front}")]
    Kernel {
        /// The service address and port.
        front: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A socket's slot in routes installed by [`Steering::steer`]; dropping the guard removes
/// it, and the routes with their last slot.
#[derive(Debug)]
pub struct Steered {
    steering: Arc<Steering>,
    keys: Vec<Key>,
    slot: u8,
    fronts: Vec<SocketAddr>,
}

impl Steering {
    /// Loads the program, with room for `capacity` sockets (a route's slots count one
    /// each), and attaches it to the calling thread's network namespace.
    pub fn open(capacity: usize) -> io::Result<Arc<Steering>> {
        let entries = u32::try_from(capacity.clamp(1, 1 << 20)).expect("clamped");
        // The routes are rewritten and the counters come and go while the program reads
        // them: elements no program can still be reading (`NO_PREALLOC`).
        let map = |kind, flags, key: usize, value: usize, name| {
            map_create(kind, flags, key as u32, value as u32, entries, name)
        };
        let (route, slot) = (size_of::<Key>(), size_of::<SlotKey>());
        let routes = map(
            MAP_TYPE_HASH,
            NO_PREALLOC,
            route,
            size_of::<Route>(),
            "revboot_routes",
        )?;
        let sockets = map(MAP_TYPE_SOCKHASH, 0, slot, 8, "revboot_socks")?;
        let counts = map(MAP_TYPE_HASH, NO_PREALLOC, slot, 8, "revboot_counts")?;
        let program = program_load(&program(
            routes.as_raw_fd(),
            sockets.as_raw_fd(),
            counts.as_raw_fd(),
        ))?;
        let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
        let link = link_create(program.as_fd(), netns.as_fd())?;
        Ok(Arc::new(Steering {
            routes,
            sockets,
            counts,
            _program: program,
            _link: link,
            capacity: entries as usize,
            installed: Mutex::new(HashMap::new()),
        }))
    }

    /// Routes new connections to each of `fronts` (from `client` only, if given) into
    /// `listener`, a listening TCP socket (a dual-stack IPv6 one for fronts of both
    /// families), until the returned guard drops. All of them or none.
    ///
    /// Several sockets can share fronts (replicas of one revision), each in a `slot` of its
    /// own (below [`SLOTS`]) and with the same `client`: the program spreads the fronts'
    /// connections over the slots in use by a hash of the client's address and port.
    pub fn steer(
        self: &Arc<Self>,
        fronts: &[SocketAddr],
        client: Option<ClientNet>,
        slot: usize,
        listener: BorrowedFd<'_>,
    ) -> Result<Steered, SteerError> {
        let slot = u8::try_from(slot)
            .ok()
            .filter(|slot| usize::from(*slot) < SLOTS)
            .ok_or(SteerError::Slot(slot))?;
        let mut empty = Route::default();
        if let Some(client) = client {
            (empty.client, empty.mask) = client.mapped();
        }
        let mut installed = self.lock();
        for front in fronts {
            if let Some(route) = installed.get(&key(*front))
                && (route.client != empty.client
                    || route.mask != empty.mask
                    || route.in_use().contains(&slot))
            {
                return Err(SteerError::Taken(*front));
            }
        }
        let used: usize = installed.values().map(|route| route.in_use().len()).sum();
        if used + fronts.len() > self.capacity {
            return Err(SteerError::Full(self.capacity));
        }
        // From here on the guard owns the keys it lists: dropping it on failure removes
        // what was put.
        let mut steered = Steered {
            steering: Arc::clone(self),
            keys: Vec::with_capacity(fronts.len()),
            slot,
            fronts: fronts.to_vec(),
        };
        let fd = u64::try_from(listener.as_raw_fd()).expect("a descriptor is not negative");
        let mut failed = None;
        for front in fronts {
            let key = key(*front);
            let at = slot_key(&key, slot);
            let mut route = installed.get(&key).copied().unwrap_or(empty);
            route.slots[route.count as usize] = slot;
            route.count += 1;
            // The socket and its counter before the route names the slot.
            let put = map_update(self.counts.as_fd(), &at, &0u64.to_ne_bytes())
                .and_then(|()| map_update(self.sockets.as_fd(), &at, &fd.to_ne_bytes()))
                .and_then(|()| map_update(self.routes.as_fd(), &key, as_bytes(&route)));
            steered.keys.push(key);
            if let Err(source) = put {
                failed = Some(SteerError::Kernel {
                    front: *front,
                    source,
                });
                break;
            }
            installed.insert(key, route);
        }
        drop(installed);
        match failed {
            Some(error) => Err(error),
            None => Ok(steered),
        }
    }

    /// Routes installed now (addresses and ports, whatever their slots).
    pub fn routes(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Route>> {
        self.installed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Route {
    fn in_use(&self) -> &[u8] {
        &self.slots[..self.count as usize]
    }
}

impl Steered {
    /// The service addresses and port steered.
    pub fn fronts(&self) -> &[SocketAddr] {
        &self.fronts
    }

    /// Connections steered into this socket so far, at every front.
    pub fn connections(&self) -> u64 {
        self.keys
            .iter()
            .map(|key| {
                let mut count = [0u8; 8];
                let at = slot_key(key, self.slot);
                match map_lookup(self.steering.counts.as_fd(), &at, &mut count) {
                    Ok(()) => u64::from_ne_bytes(count),
                    Err(_) => 0,
                }
            })
            .sum()
    }
}

impl Drop for Steered {
    fn drop(&mut self) {
        let steering = &self.steering;
        let mut installed = steering.lock();
        for key in &self.keys {
            // The route first: a slot it no longer names is never picked; the last slot
            // takes the route with it, and connections pass on to the proxy.
            if let Some(route) = installed.get_mut(key)
                && let Some(at) = route.in_use().iter().position(|s| *s == self.slot)
            {
                route.slots.copy_within(at + 1..route.count as usize, at);
                route.count -= 1;
                route.slots[route.count as usize] = 0;
                let _ = if route.count == 0 {
                    installed.remove(key);
                    map_delete(steering.routes.as_fd(), key)
                } else {
                    map_update(steering.routes.as_fd(), key, as_bytes(route))
                };
            }
            let at = slot_key(key, self.slot);
            let _ = map_delete(steering.sockets.as_fd(), &at);
            let _ = map_delete(steering.counts.as_fd(), &at);
        }
    }
}

/// A descriptor of the listening TCP socket bound to `local` in process `pid`, taken with
/// `pidfd_getfd(2)` (ptrace rights over `pid`: root, or the same user without Yama): how a
/// socket a tender does not create itself (qemu's forwarded port) can be steered.
pub fn listener_of(pid: u32, local: std::net::SocketAddr) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain syscall with integer arguments; a descriptor returned is ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = owned(pidfd);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|target| {
            target
                .as_os_str()
                .as_encoded_bytes()
                .starts_with(b"socket:")
        });
        let number = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok());
        if let (true, Some(number)) = (is_socket, number)
            && let Ok(fd) = listener_at(pidfd.as_fd(), number, local)
        {
            return Ok(fd);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("process {pid} has no socket listening on {local}"),
    ))
}

/// Descriptor `number` of the process behind `pidfd`, if it is a TCP socket listening on
/// `local` (one syscall when the tender knows where the socket is).
pub fn listener_at(
    pidfd: BorrowedFd<'_>,
    number: i32,
    local: std::net::SocketAddr,
) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; a descriptor returned is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), number, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = owned(fd);
    let socket = socket2::SockRef::from(&fd);
    if socket.local_addr()?.as_socket() == Some(local) && socket.is_listener()? {
        Ok(fd)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("descriptor {number} is not the socket listening on {local}"),
        ))
    }
}

fn key(front: SocketAddr) -> Key {
    let address = match front.ip().to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(&address.octets());
    key[16..].copy_from_slice(&u32::from(front.port()).to_ne_bytes());
    key
}

fn slot_key(key: &Key, slot: u8) -> SlotKey {
    let mut at = [0u8; 24];
    at[..20].copy_from_slice(key);
    at[20..].copy_from_slice(&u32::from(slot).to_ne_bytes());
    at
}

fn as_bytes(route: &Route) -> &[u8] {
    // SAFETY: `Route` is `repr(C)`, plain integers with no padding between or after them
    // (16 + 16 + 4 + 16 bytes, aligned at 4), so its bytes are initialised.
    unsafe { std::slice::from_raw_parts((route as *const Route).cast::<u8>(), size_of::<Route>()) }
}

// ---- The program ------------------------------------------------------------------------

/// `struct bpf_sk_lookup` field offsets (linux/bpf.h).
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_REMOTE_IP4: i16 = 16;
const CTX_REMOTE_IP6: i16 = 20;
/// Network order in the low half; a 4-byte load is allowed for older programs' sake.
const CTX_REMOTE_PORT: i16 = 36;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_IP6: i16 = 44;
const CTX_LOCAL_PORT: i16 = 60;

/// Stack offsets (from r10) of the route key (address words, then the port; followed by the
/// slot, the slot key) and of the source address (words), each in its IPv6 or IPv4-mapped
/// form.
const KEY: i16 = -24;
const KEY_PORT: i16 = KEY + 16;
const KEY_SLOT: i16 = KEY + 20;
const SOURCE: i16 = -40;
/// Offsets in the route value: the client, its mask, the count of slots, the slots.
const ROUTE_CLIENT: i16 = 0;
const ROUTE_MASK: i16 = 16;
const ROUTE_COUNT: i16 = 32;
const ROUTE_SLOTS: i16 = 36;
const _: () = assert!(size_of::<Route>() == ROUTE_SLOTS as usize + SLOTS && SLOTS == 16);
/// Knuth's multiplicative hash constant (2^32 / the golden ratio).
const GOLDEN: i32 = 0x9e37_79b1_u32 as i32;
/// Bytes 8..12 of an IPv4-mapped address (`0, 0, 0xff, 0xff`), as a little-endian word.
const MAPPED_WORD: i32 = 0xffff_0000_u32 as i32;

const HELPER_SK_RELEASE: i32 = 86;
const HELPER_SK_ASSIGN: i32 = 124;
const SK_PASS: i32 = 1;

/// The sk_lookup program (see the module docs for what it does).
fn program(routes: i32, sockets: i32, counts: i32) -> Vec<Insn> {
    let mut asm = Asm::default();
    asm.mov(R6, R1); // r6 = ctx
    asm.load32(R2, R6, CTX_PROTOCOL);
    asm.jne_imm(R2, libc::IPPROTO_TCP, "pass");
    asm.load32(R2, R6, CTX_FAMILY);
    asm.jeq_imm(R2, libc::AF_INET6, "v6");
    asm.jne_imm(R2, libc::AF_INET, "pass");
    // IPv4: the key's address and the source in their IPv4-mapped forms.
    for base in [KEY, SOURCE] {
        asm.store32_imm(R10, base, 0);
        asm.store32_imm(R10, base + 4, 0);
        asm.store32_imm(R10, base + 8, MAPPED_WORD);
    }
    asm.load32(R2, R6, CTX_LOCAL_IP4);
    asm.store32(R10, KEY + 12, R2);
    asm.load32(R2, R6, CTX_REMOTE_IP4);
    asm.store32(R10, SOURCE + 12, R2);
    asm.ja("port");
    asm.label("v6");
    for word in 0..4 {
        asm.load32(R2, R6, CTX_LOCAL_IP6 + 4 * word);
        asm.store32(R10, KEY + 4 * word, R2);
        asm.load32(R2, R6, CTX_REMOTE_IP6 + 4 * word);
        asm.store32(R10, SOURCE + 4 * word, R2);
    }
    asm.label("port");
    asm.load32(R2, R6, CTX_LOCAL_PORT);
    asm.store32(R10, KEY_PORT, R2);
    // r7 = routes[key], or pass.
    asm.lookup_or_pass(routes, KEY);
    asm.mov(R7, R0);
    // A per-client route takes only its client network: source & mask == client, word by
    // word (a route for anyone has both zero).
    for word in 0..4 {
        asm.load32(R2, R10, SOURCE + 4 * word);
        asm.load32(R3, R7, ROUTE_MASK + 4 * word);
        asm.and(R2, R3);
        asm.load32(R3, R7, ROUTE_CLIENT + 4 * word);
        asm.jne(R2, R3, "pass");
    }
    // The slot: a hash of the source address and port (a SYN sent again lands on the same
    // socket while the slots stay), modulo the count, bounded for the verifier.
    asm.load32(R4, R6, CTX_REMOTE_PORT);
    for word in 0..4 {
        asm.load32(R2, R10, SOURCE + 4 * word);
        asm.xor32(R4, R2);
    }
    asm.mul32_imm(R4, GOLDEN);
    asm.rsh32_imm(R4, 16);
    asm.load32(R3, R7, ROUTE_COUNT);
    asm.jeq_imm(R3, 0, "pass");
    asm.mod32(R4, R3);
    asm.and_imm(R4, SLOTS as i32 - 1);
    asm.mov(R3, R7);
    asm.add(R3, R4);
    asm.load8(R3, R3, ROUTE_SLOTS);
    asm.store32(R10, KEY_SLOT, R3);
    // r8 = sockets[slot key] (a reference), or pass: a slot whose socket closed.
    asm.lookup_or_pass(sockets, KEY);
    asm.mov(R8, R0);
    asm.mov(R1, R6);
    asm.mov(R2, R8);
    asm.mov_imm(R3, 0);
    asm.call(HELPER_SK_ASSIGN);
    asm.mov(R9, R0);
    asm.mov(R1, R8);
    asm.call(HELPER_SK_RELEASE);
    asm.jne_imm(R9, 0, "pass");
    // counts[slot key] += 1.
    asm.lookup_or_pass(counts, KEY);
    asm.mov_imm(R1, 1);
    asm.atomic_add64(R0, 0, R1);
    asm.label("pass");
    asm.mov_imm(R0, SK_PASS);
    asm.exit();
    asm.finish()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    use socket2::{Domain, Socket, Type};

    use super::*;

    fn client_net(client: Ipv4Addr) -> ClientNet {
        ClientNet::new(IpAddr::V4(client), 32)
    }

    fn connect_from(source: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source.into(), 0).into())?;
        socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
        Ok(socket.into())
    }

    /// Steering, an instance socket on `127.71.0.<host>` (an ephemeral port), and a stand-in
    /// for the proxy listening on the front, `127.71.0.<host>:8080`.
    fn behind_a_proxy(host: u8) -> (Arc<Steering>, TcpListener, TcpListener, SocketAddr) {
        let steering = Steering::open(16).expect("sk_lookup steering needs root and Linux 5.9");
        let ip = Ipv4Addr::new(127, 71, 0, host);
        let instance = TcpListener::bind((ip, 0)).expect("bind the instance socket");
        let front = SocketAddrV4::new(ip, 8080);
        let proxy = TcpListener::bind(front).expect("bind the proxy socket");
        (steering, instance, proxy, SocketAddr::V4(front))
    }

    /// A connection to a steered address reaches the instance's socket, bound elsewhere;
    /// it is counted; after the guard drops, the address is refused again.
    #[test]
    fn a_steered_address_reaches_the_instance_socket_until_the_route_goes() {
        let steering = Steering::open(16).expect("sk_lookup steering needs root and Linux 5.9");
        let instance = TcpListener::bind("127.71.0.1:0").expect("bind the instance socket");
        let front: SocketAddr = "127.71.0.1:8080".parse().expect("an address");
        assert!(
            connect_from(Ipv4Addr::LOCALHOST, front).is_err(),
            "nothing listens on the front before the route"
        );

        let steered = steering
            .steer(&[front], None, 0, instance.as_fd())
            .expect("steer");
        let mut client = connect_from(Ipv4Addr::LOCALHOST, front).expect("steered connect");
        let (mut accepted, peer) = instance.accept().expect("the instance accepts it");
        assert_eq!(accepted.local_addr().expect("local"), front);
        assert_eq!(peer, client.local_addr().expect("client address"));
        client.write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
        assert_eq!(steered.connections(), 1);
        assert_eq!(steering.routes(), 1);
        assert!(matches!(
            steering.steer(&[front], None, 0, instance.as_fd()),
            Err(SteerError::Taken(_))
        ));

        drop(steered);
        assert_eq!(steering.routes(), 0);
        assert!(
            connect_from(Ipv4Addr::LOCALHOST, front).is_err(),
            "the route is gone with its guard"
        );
    }

    /// A per-client route takes only its client; another source passes on to whatever
    /// listens on the front (here: a stand-in for the proxy).
    #[test]
    fn a_per_client_route_takes_only_its_client() {
        let (steering, instance, proxy, front) = behind_a_proxy(2);
        let client_a = Ipv4Addr::new(127, 71, 1, 1);
        let client_b = Ipv4Addr::new(127, 71, 1, 2);
        let steered = steering
            .steer(&[front], Some(client_net(client_a)), 0, instance.as_fd())
            .expect("steer");

        let _a = connect_from(client_a, front).expect("client A connects");
        let (_, peer) = instance.accept().expect("the instance accepts A");
        assert_eq!(peer.ip(), client_a);
        let _b = connect_from(client_b, front).expect("client B connects");
        let (_, peer) = proxy.accept().expect("the proxy sees B");
        assert_eq!(peer.ip(), client_b);
        assert_eq!(steered.connections(), 1);
    }

    /// A client network route takes every source of the network, and none other.
    #[test]
    fn a_client_network_route_takes_its_whole_network() {
        let (steering, instance, proxy, front) = behind_a_proxy(5);
        let network = ClientNet::new(IpAddr::V4(Ipv4Addr::new(127, 71, 2, 0)), 24);
        let steered = steering
            .steer(&[front], Some(network), 0, instance.as_fd())
            .expect("steer");
        for host in [1, 200] {
            let _a = connect_from(Ipv4Addr::new(127, 71, 2, host), front).expect("connects");
            let (_, peer) = instance.accept().expect("the instance accepts it");
            assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 71, 2, host)));
        }
        let _b = connect_from(Ipv4Addr::new(127, 71, 3, 1), front).expect("connects");
        let (_, peer) = proxy.accept().expect("the proxy sees the other network");
        assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 71, 3, 1)));
        assert_eq!(steered.connections(), 2);
    }

    /// A socket that closes leaves the sockhash: its route passes connections on.
    #[test]
    fn a_closed_instance_socket_passes_connections_on() {
        let (steering, instance, proxy, front) = behind_a_proxy(3);
        let steered = steering
            .steer(&[front], None, 0, instance.as_fd())
            .expect("steer");
        drop(instance);
        let _c = connect_from(Ipv4Addr::LOCALHOST, front).expect("connects");
        proxy.accept().expect("the proxy gets it");
        assert_eq!(steered.connections(), 0);
    }

    /// A socket that is not listening is refused by the kernel, and nothing is left behind.
    #[test]
    fn a_socket_that_does_not_listen_is_refused() {
        let steering = Steering::open(16).expect("sk_lookup steering needs root and Linux 5.9");
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let front: SocketAddr = "127.71.0.4:8080".parse().expect("an address");
        let error = steering
            .steer(&[front], None, 0, socket.as_fd())
            .expect_err("a socket that neither listens nor is connected is refused");
        assert!(matches!(error, SteerError::Kernel { .. }), "{error}");
        assert_eq!(steering.routes(), 0);
        let full = Steering::open(1).expect("open");
        let listener = TcpListener::bind("127.71.0.4:0").expect("bind");
        let _one = full
            .steer(&[front], None, 0, listener.as_fd())
            .expect("first");
        let other: SocketAddr = "127.71.0.4:8081".parse().expect("an address");
        assert!(matches!(
            full.steer(&[other], None, 0, listener.as_fd()),
            Err(SteerError::Full(1))
        ));
    }

    /// Which of `listeners` accepts `client`'s connection (each is non-blocking; a bounded
    /// wait for the handshake to reach one).
    fn accepted_by(listeners: &[&TcpListener], client: &TcpStream) -> usize {
        let me = client.local_addr().expect("client address");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (at, listener) in listeners.iter().enumerate() {
                if let Ok((_, peer)) = listener.accept() {
                    assert_eq!(peer, me, "one connection at a time");
                    return at;
                }
            }
            assert!(Instant::now() < deadline, "no listener accepted {me}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn listener(address: &str) -> TcpListener {
        let listener = TcpListener::bind(address).expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        listener
    }

    /// How many of `count` connections to `front` each of `listeners` accepts.
    fn spread(front: SocketAddr, listeners: &[&TcpListener], count: usize) -> Vec<usize> {
        let mut taken = vec![0; listeners.len()];
        for _ in 0..count {
            let client = TcpStream::connect_timeout(&front, Duration::from_secs(5))
                .expect("every connection is taken");
            taken[accepted_by(listeners, &client)] += 1;
        }
        taken
    }

    /// Three sockets in three slots of one front: connections spread over them, none to
    /// the proxy; a slot whose guard drops is no longer picked, one whose socket closes
    /// passes its connections to the proxy, and the last guard takes the route with it.
    #[test]
    fn replicas_in_slots_of_one_front_share_its_connections() {
        let steering = Steering::open(16).expect("sk_lookup steering needs root and Linux 5.9");
        let front: SocketAddr = "127.71.0.6:8080".parse().expect("an address");
        let proxy = listener("127.71.0.6:8080");
        let replicas: Vec<TcpListener> = (0..3).map(|_| listener("127.71.0.6:0")).collect();
        let mut guards: Vec<Option<Steered>> = replicas
            .iter()
            .enumerate()
            .map(|(slot, socket)| {
                let steered = steering.steer(&[front], None, slot, socket.as_fd());
                Some(steered.expect("steer a slot"))
            })
            .collect();
        assert_eq!(steering.routes(), 1);
        let all = [&proxy, &replicas[0], &replicas[1], &replicas[2]];

        let taken = spread(front, &all, 60);
        assert_eq!(taken[0], 0, "the proxy took some: {taken:?}");
        assert!(
            taken[1..].iter().filter(|n| **n > 0).count() > 1,
            "{taken:?}"
        );
        for (guard, taken) in guards.iter().zip(&taken[1..]) {
            let steered = guard.as_ref().expect("installed");
            assert_eq!(steered.connections(), *taken as u64);
        }

        // A slot in use, or the front for another client, is refused; a slot beyond the
        // bound too.
        let other = listener("127.71.0.6:0");
        for (client, slot) in [
            (None, 1),
            (Some(ClientNet::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 32)), 3),
        ] {
            let refused = steering.steer(&[front], client, slot, other.as_fd());
            assert!(matches!(refused, Err(SteerError::Taken(_))), "{refused:?}");
        }
        let refused = steering.steer(&[front], None, SLOTS, other.as_fd());
        assert!(
            matches!(refused, Err(SteerError::Slot(SLOTS))),
            "{refused:?}"
        );

        // Slot 1 goes: the others take everything.
        guards[1] = None;
        let taken = spread(front, &all, 30);
        assert_eq!((taken[0], taken[2]), (0, 0), "{taken:?}");
        // Slot 2's socket closes: its share passes on to the proxy, none is lost.
        let [first, _, third] = <[TcpListener; 3]>::try_from(replicas).expect("three");
        drop(third);
        let taken = spread(front, &[&proxy, &first], 30);
        assert!(taken[0] > 0 && taken[1] > 0, "{taken:?}");
        // A new socket in slot 1 is picked again.
        guards[1] = Some(
            steering
                .steer(&[front], None, 1, other.as_fd())
                .expect("slot 1 again"),
        );
        let taken = spread(front, &[&proxy, &first, &other], 60);
        assert!(taken[2] > 0, "{taken:?}");

        guards.clear();
        assert_eq!(steering.routes(), 0);
        assert_eq!(spread(front, &[&proxy], 3), [3]);
    }
}
