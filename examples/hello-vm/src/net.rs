//! The service: smoltcp on the virtio-net device, answering HTTP like `examples/hello`.
//!
//! 1. Static address on qemu's user-mode network: 10.0.2.15/24, gateway 10.0.2.2.
//! 2. An ARP request for the gateway, sent at once, tells qemu's slirp our MAC and brings its
//!    answer into smoltcp's neighbour cache: the first forwarded SYN and our SYN-ACK need no
//!    ARP exchange of their own.
//! 3. [`SOCKETS`] TCP sockets listen on [`PORT`]; each serves one connection at a time: read
//!    the request head (up to the blank line), answer `hello from <REVISION> (<deployment>)`,
//!    close. `GET /crash` triple-faults the VM, to exercise crash handling. `GET /id`
//!    answers `random <16 hex digits> isn <n>`: a fresh random value, and the initial
//!    sequence number of this connection's SYN-ACK as it left the guest. `GET /env/NAME`
//!    answers `NAME=<value>` (at most [`VALUE_SHOWN`] bytes of it) or `NAME is not set`,
//!    read from fw_cfg then ([`crate::fwcfg::var`]): what an instance was given.
//! 4. Before every poll, the seed in fw_cfg is compared with the one read at boot: a new
//!    one means this memory was restored into another qemu process, so the interface (whose
//!    random state chooses the ISNs) is made anew from the new seed, and so is the value
//!    `GET /id` draws from. Nothing random that leaves the guest is drawn before that check.
//! 5. A connection that has not sent its request head within [`REQUEST_TIMEOUT`] is reset.
//! 6. The loop polls forever: smoltcp, then every socket; while no connection is open and
//!    nothing changed, it sleeps until the next timer tick (at most about 1 ms).

use core::fmt::Write as _;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{Device, TxToken as _};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpCidr, Ipv4Address,
};

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::clock::Clock;
use crate::fwcfg::{Seed, splitmix};
use crate::virtio::VirtioNet;
use crate::{REVISION, cpu, idle, println};

/// The guest port the service listens on.
pub const PORT: u16 = 8080;
/// Our address on qemu's user-mode network.
pub const ADDRESS: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
/// qemu's user-mode gateway.
pub const GATEWAY: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
/// Connections served at once.
pub const SOCKETS: usize = 4;
/// How long a client may take to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const RX_BUFFER: usize = 2048;
const TX_BUFFER: usize = 2048;
/// Bytes of the request kept (the request line is all we look at).
const HEAD: usize = 256;

/// One connection's progress.
struct Conn {
    head: [u8; HEAD],
    head_len: usize,
    /// The last four bytes seen, to spot the blank line that ends the head.
    tail: u32,
    opened: Option<Instant>,
    answered: bool,
}

impl Conn {
    const fn new() -> Conn {
        Conn {
            head: [0; HEAD],
            head_len: 0,
            tail: 0,
            opened: None,
            answered: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        for &byte in data {
            if self.head_len < HEAD {
                self.head[self.head_len] = byte;
                self.head_len += 1;
            }
            self.tail = (self.tail << 8) | u32::from(byte);
            if self.tail == u32::from_be_bytes(*b"\r\n\r\n")
                || self.tail & 0xffff == u32::from(u16::from_be_bytes(*b"\n\n"))
            {
                self.tail = u32::MAX; // marks "head complete"
                return;
            }
        }
    }

    fn head_complete(&self) -> bool {
        self.tail == u32::MAX
    }

    /// The request path, from the request line.
    fn path(&self) -> &str {
        let head = core::str::from_utf8(&self.head[..self.head_len]).unwrap_or("");
        head.lines()
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .unwrap_or("/")
    }
}

/// A `fmt::Write` over a byte slice.
struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self
            .len
            .checked_add(s.len())
            .filter(|&end| end <= self.buf.len())
            .ok_or(core::fmt::Error)?;
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Writes a response of `body` (formatted) into `out`, returning its length.
fn respond(out: &mut [u8], body: core::fmt::Arguments<'_>) -> usize {
    let mut body_buf = [0u8; 160];
    let mut cursor = Cursor {
        buf: &mut body_buf,
        len: 0,
    };
    let _ = cursor.write_fmt(body);
    let body_len = cursor.len;
    let body = core::str::from_utf8(&body_buf[..body_len]).unwrap_or("");
    let mut response = Cursor { buf: out, len: 0 };
    let _ = write!(
        response,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-revision: {REVISION}\r\n\r\n{body}",
        body.len()
    );
    response.len
}

/// Writes the answer into `out`, returning its length.
fn render(out: &mut [u8], deployment: &str) -> usize {
    respond(out, format_args!("hello from {REVISION} ({deployment})\n"))
}

/// The last SYN-ACKs sent: `remote port << 32 | initial sequence number`.
static SYN_ACKS: [AtomicU64; SOCKETS] = [const { AtomicU64::new(0) }; SOCKETS];
static NEXT_SYN_ACK: AtomicUsize = AtomicUsize::new(0);

/// Called by the driver with every frame it sends: remembers the ISN of each SYN-ACK.
pub fn note_sent(frame: &[u8]) {
    const IP: usize = 14;
    if frame.len() < IP + 20 || frame[12..14] != [0x08, 0x00] || frame[IP + 9] != 6 {
        return;
    }
    let tcp = IP + usize::from(frame[IP] & 0x0f) * 4;
    if frame.len() < tcp + 20 || frame[tcp + 13] & 0x12 != 0x12 {
        return;
    }
    let port = u16::from_be_bytes([frame[tcp + 2], frame[tcp + 3]]);
    let seq = u32::from_be_bytes([
        frame[tcp + 4],
        frame[tcp + 5],
        frame[tcp + 6],
        frame[tcp + 7],
    ]);
    let slot = NEXT_SYN_ACK.fetch_add(1, Ordering::Relaxed) % SOCKETS;
    SYN_ACKS[slot].store(u64::from(port) << 32 | u64::from(seq), Ordering::Relaxed);
}

/// The ISN of the SYN-ACK sent to `port`, if remembered.
fn isn_for(port: u16) -> Option<u32> {
    SYN_ACKS.iter().find_map(|slot| {
        let value = slot.load(Ordering::Relaxed);
        (value >> 32 == u64::from(port) && value != 0).then_some(value as u32)
    })
}

/// Writes `GET /id`'s answer into `out`, returning its length.
fn render_id(out: &mut [u8], random: u64, isn: Option<u32>) -> usize {
    match isn {
        Some(isn) => respond(out, format_args!("random {random:016x} isn {isn}\n")),
        None => respond(out, format_args!("random {random:016x} isn unknown\n")),
    }
}

/// The most bytes of a variable's value `GET /env/NAME` shows.
const VALUE_SHOWN: usize = 96;

/// Writes `GET /env/NAME`'s answer into `out`, returning its length.
fn render_var(out: &mut [u8], name: &str) -> usize {
    let mut value = [0u8; VALUE_SHOWN];
    match crate::fwcfg::var(name.as_bytes(), &mut value) {
        Some(len) => {
            // Cut at a character boundary if the value was cut.
            let value = match core::str::from_utf8(&value[..len]) {
                Ok(text) => text,
                Err(error) => core::str::from_utf8(&value[..error.valid_up_to()]).unwrap_or(""),
            };
            respond(out, format_args!("{name}={value}\n"))
        }
        None => respond(out, format_args!("{name} is not set\n")),
    }
}

/// The network interface on `device`, its random state (which picks the TCP initial
/// sequence numbers) drawn from `seed` and the clock.
fn interface(device: &mut VirtioNet, clock: &Clock, seed: &Seed) -> Interface {
    let mac = EthernetAddress(device.mac());
    let mut config = Config::new(mac.into());
    config.random_seed = seed.mix(cpu::rdtsc());
    let mut iface = Interface::new(config, device, clock.now());
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(IpAddress::Ipv4(ADDRESS), 24))
            .expect("room for one address");
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(GATEWAY)
        .expect("room for one route");
    announce(device, mac, clock.now());
    iface
}

/// Asks for the gateway's MAC, which also announces ours.
fn announce(device: &mut VirtioNet, mac: EthernetAddress, now: Instant) {
    let Some(token) = device.transmit(now) else {
        return;
    };
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: ADDRESS,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GATEWAY,
    };
    let ethernet = EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    token.consume(ethernet.buffer_len() + arp.buffer_len(), |buf| {
        let mut frame = EthernetFrame::new_unchecked(buf);
        ethernet.emit(&mut frame);
        arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    });
}

/// Serves HTTP forever.
pub fn serve(mut device: VirtioNet, clock: Clock, deployment: &str, mut seed: Seed) -> ! {
    let mut iface = interface(&mut device, &clock, &seed);
    let mut random = seed.mix(cpu::rdtsc() ^ 0x6964);

    let mut storage = [SocketStorage::EMPTY; SOCKETS];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut rx_buffers = [[0u8; RX_BUFFER]; SOCKETS];
    let mut tx_buffers = [[0u8; TX_BUFFER]; SOCKETS];
    let mut buffers = rx_buffers.iter_mut().zip(tx_buffers.iter_mut());
    let handles: [SocketHandle; SOCKETS] = core::array::from_fn(|_| {
        let (rx, tx) = buffers.next().expect("one buffer pair per socket");
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut rx[..]),
            tcp::SocketBuffer::new(&mut tx[..]),
        );
        socket.set_nagle_enabled(false);
        socket.listen(PORT).expect("a fresh socket can listen");
        sockets.add(socket)
    });
    let mut conns = [const { Conn::new() }; SOCKETS];
    let mut response = [0u8; 512];
    let response_len = render(&mut response, deployment);
    let mut id_response = [0u8; 512];

    println!(
        "hello-vm: listening on {ADDRESS}:{PORT} ({} us after kernel entry)",
        clock.micros()
    );

    loop {
        if seed.changed() {
            // Restored into a new qemu process: nothing drawn from the old state may leave.
            iface = interface(&mut device, &clock, &seed);
            random = seed.mix(cpu::rdtsc() ^ 0x6964);
            println!("hello-vm: restored with a new seed, reseeded");
        }
        let now = clock.now();
        let changed = iface.poll(now, &mut device, &mut sockets) == PollResult::SocketStateChanged;
        let mut busy = changed;
        for (conn, &handle) in conns.iter_mut().zip(&handles) {
            let socket = sockets.get_mut::<tcp::Socket<'_>>(handle);
            if !socket.is_open() {
                *conn = Conn::new();
                let _ = socket.listen(PORT);
                continue;
            }
            if !socket.is_active() {
                continue; // still listening
            }
            busy = true;
            let opened = *conn.opened.get_or_insert(now);
            if socket.can_recv() {
                let _ = socket.recv(|data| {
                    if !conn.answered {
                        conn.feed(data);
                    }
                    (data.len(), ())
                });
            }
            if conn.answered {
                continue;
            }
            if conn.head_complete() {
                if conn.path() == "/crash" {
                    println!("hello-vm: crashing on request");
                    cpu::triple_fault();
                }
                if let Some(name) = conn.path().strip_prefix("/env/") {
                    let len = render_var(&mut id_response, name);
                    let _ = socket.send_slice(&id_response[..len]);
                } else if conn.path() == "/id" {
                    random = splitmix(random);
                    let port = socket.remote_endpoint().map(|remote| remote.port);
                    let len = render_id(&mut id_response, random, port.and_then(isn_for));
                    let _ = socket.send_slice(&id_response[..len]);
                } else {
                    let _ = socket.send_slice(&response[..response_len]);
                }
                socket.close();
                conn.answered = true;
            } else if socket.state() == tcp::State::CloseWait {
                socket.close(); // the client gave up before finishing its request
                conn.answered = true;
            } else if now - opened > REQUEST_TIMEOUT {
                socket.abort();
                conn.answered = true;
            }
        }
        if busy {
            core::hint::spin_loop();
        } else {
            // No connection open and nothing happened: sleep until the next timer tick.
            idle::sleep();
        }
    }
}
