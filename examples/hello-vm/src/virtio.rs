//! A virtio-net driver over virtio-mmio (the modern interface, version 2), polled.
//!
//! 1. Probe the microvm's virtio-mmio slots (0xfeb00000 + n·0x200, 24 of them) for magic
//!    "virt", version 2 and device id 1 (network). A version-1 (legacy) device is refused:
//!    qemu must run with `-global virtio-mmio.force-legacy=false`.
//! 2. Reset, ACKNOWLEDGE, DRIVER; accept `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC` only;
//!    FEATURES_OK, checked back.
//! 3. Queue 0 (receive) and queue 1 (transmit): split virtqueues of [`QUEUE_SIZE`] entries
//!    with one buffer per descriptor, addresses written to the Desc/Driver/Device registers,
//!    QueueReady. Then DRIVER_OK, and every receive buffer is offered to the device.
//! 4. Receive: a used-ring entry is a frame behind a 12-byte `virtio_net_hdr`; the buffer goes
//!    back on the available ring once smoltcp has read it. Transmit: a free buffer gets a zero
//!    header and the frame, goes on the available ring, and is reclaimed from the used ring.
//! 5. No interrupts: the device is notified through QueueNotify (unless it asks not to be),
//!    and the used rings are polled.
//!
//! Guest physical = virtual (identity map), so static buffer addresses are DMA addresses.

use core::cell::UnsafeCell;
use core::fmt;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicBool, Ordering, fence};

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Base of qemu microvm's virtio-mmio window.
pub const MMIO_BASE: usize = 0xfeb0_0000;
const SLOT_SIZE: usize = 0x200;
const SLOTS: usize = 24;

const MAGIC: u32 = 0x7472_6976; // "virt"
const DEVICE_NET: u32 = 1;

const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC: usize = 0x080;
const REG_QUEUE_DRIVER: usize = 0x090;
const REG_QUEUE_DEVICE: usize = 0x0a0;
const REG_CONFIG: usize = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

const NET_F_MAC: u32 = 1 << 5;
/// `VIRTIO_F_VERSION_1` is bit 32: bit 0 of the second feature word.
const F_VERSION_1_HIGH: u32 = 1 << 0;

const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;

/// Entries per virtqueue.
pub const QUEUE_SIZE: usize = 16;
/// Bytes per buffer: a 12-byte header and a full 1514-byte Ethernet frame fit.
const BUFFER_SIZE: usize = 1536;
/// `virtio_net_hdr` with `num_buffers`, as used with `VIRTIO_F_VERSION_1`.
const NET_HDR: usize = 12;
/// The largest Ethernet frame (no FCS) we send or accept.
pub const MTU: usize = 1514;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

/// One split virtqueue: descriptor table (16-byte aligned), driver and device areas.
#[repr(C, align(4096))]
struct Rings {
    desc: [Desc; QUEUE_SIZE],
    avail: Avail,
    used: Used,
}

#[repr(C, align(4096))]
struct Buffers([[u8; BUFFER_SIZE]; QUEUE_SIZE]);

/// Memory shared with the device. Only ever reached through raw pointers, with volatile
/// accesses for what the device writes.
struct Dma<T>(UnsafeCell<T>);

// SAFETY: one CPU, no interrupts; the memory is handed out once (see `CLAIMED`) and then
// only touched by the driver and the device.
unsafe impl<T> Sync for Dma<T> {}

impl<T> Dma<T> {
    const fn zeroed() -> Dma<T> {
        // SAFETY: only instantiated with plain integer structs, for which zero is valid.
        Dma(UnsafeCell::new(unsafe { core::mem::zeroed() }))
    }
}

static RX_RINGS: Dma<Rings> = Dma::zeroed();
static TX_RINGS: Dma<Rings> = Dma::zeroed();
static RX_BUFFERS: Dma<Buffers> = Dma::zeroed();
static TX_BUFFERS: Dma<Buffers> = Dma::zeroed();
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// The registers of one virtio-mmio slot.
#[derive(Debug, Clone, Copy)]
struct Regs(usize);

impl Regs {
    fn read(self, offset: usize) -> u32 {
        // SAFETY: `self.0` is a virtio-mmio slot inside the identity-mapped device window;
        // registers are 32-bit and naturally aligned.
        unsafe { ((self.0 + offset) as *const u32).read_volatile() }
    }

    fn write(self, offset: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.0 + offset) as *mut u32).write_volatile(value) }
    }

    fn write64(self, offset: usize, value: u64) {
        self.write(offset, value as u32);
        self.write(offset + 4, (value >> 32) as u32);
    }

    fn config_byte(self, index: usize) -> u8 {
        // SAFETY: device configuration space starts at 0x100 of the slot; byte reads are
        // allowed there.
        unsafe { ((self.0 + REG_CONFIG + index) as *const u8).read_volatile() }
    }
}

/// Why no network device could be used.
#[derive(Debug)]
pub enum ProbeError {
    /// No virtio-net device in any slot.
    NotFound,
    /// The device speaks the legacy interface only.
    Legacy {
        /// Its slot address.
        base: usize,
    },
    /// A required feature is missing or FEATURES_OK did not stick.
    Features,
    /// The device's queues are smaller than ours.
    QueueTooSmall {
        /// The queue.
        queue: u16,
        /// Its maximum size.
        max: u32,
    },
    /// The driver was already set up once.
    AlreadyClaimed,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NotFound => write!(f, "No virtio-net device on virtio-mmio"),
            ProbeError::Legacy { base } => write!(
                f,
                "Legacy virtio-mmio device at {base:#x}: run qemu with -global virtio-mmio.force-legacy=false"
            ),
            ProbeError::Features => write!(f, "virtio-net refused VIRTIO_F_VERSION_1"),
            ProbeError::QueueTooSmall { queue, max } => {
                write!(
                    f,
                    "Queue {queue} holds at most {max} entries, {QUEUE_SIZE} needed"
                )
            }
            ProbeError::AlreadyClaimed => write!(f, "The virtio-net driver is already set up"),
        }
    }
}

/// One virtqueue as the driver sees it.
struct Queue {
    index: u16,
    regs: Regs,
    rings: *mut Rings,
    buffers: *mut Buffers,
    /// Our copy of `avail.idx`.
    avail_idx: u16,
    /// How far we have read the used ring.
    last_used: u16,
}

impl Queue {
    fn setup(
        regs: Regs,
        index: u16,
        rings: &'static Dma<Rings>,
        buffers: &'static Dma<Buffers>,
    ) -> Result<Queue, ProbeError> {
        regs.write(REG_QUEUE_SEL, u32::from(index));
        let max = regs.read(REG_QUEUE_NUM_MAX);
        if (max as usize) < QUEUE_SIZE {
            return Err(ProbeError::QueueTooSmall { queue: index, max });
        }
        let rings = rings.0.get();
        regs.write(REG_QUEUE_NUM, QUEUE_SIZE as u32);
        // SAFETY: only addresses are taken, no references into device-shared memory.
        let (desc, avail, used) = unsafe {
            (
                addr_of!((*rings).desc) as u64,
                addr_of!((*rings).avail) as u64,
                addr_of!((*rings).used) as u64,
            )
        };
        regs.write64(REG_QUEUE_DESC, desc);
        regs.write64(REG_QUEUE_DRIVER, avail);
        regs.write64(REG_QUEUE_DEVICE, used);
        regs.write(REG_QUEUE_READY, 1);
        Ok(Queue {
            index,
            regs,
            rings,
            buffers: buffers.0.get(),
            avail_idx: 0,
            last_used: 0,
        })
    }

    fn buffer(&self, id: u16) -> *mut u8 {
        // SAFETY: id < QUEUE_SIZE, so the address stays inside the buffer array.
        unsafe { addr_of_mut!((*self.buffers).0[usize::from(id) % QUEUE_SIZE]).cast::<u8>() }
    }

    /// The next buffer the device has finished with: its descriptor id and written length.
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: `rings` is our claimed queue memory; the device writes `used`, hence the
        // volatile reads.
        let idx = unsafe { addr_of!((*self.rings).used.idx).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used) % QUEUE_SIZE;
        // SAFETY: as above; the device wrote this entry before advancing `used.idx`.
        let (id, len) = unsafe {
            let elem = addr_of!((*self.rings).used.ring[slot]);
            (
                addr_of!((*elem).id).read_volatile(),
                addr_of!((*elem).len).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some(((id as usize % QUEUE_SIZE) as u16, len))
    }

    /// Hands buffer `id` (its first `len` bytes) to the device.
    fn push_avail(&mut self, id: u16, len: u32, flags: u16) {
        let slot = usize::from(self.avail_idx) % QUEUE_SIZE;
        let addr = self.buffer(id) as u64;
        // SAFETY: descriptor `id` and avail slot `slot` are ours until the device sees the
        // new `avail.idx`, which is written after a fence.
        unsafe {
            addr_of_mut!((*self.rings).desc[usize::from(id)]).write_volatile(Desc {
                addr,
                len,
                flags,
                next: 0,
            });
            addr_of_mut!((*self.rings).avail.ring[slot]).write_volatile(id);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            addr_of_mut!((*self.rings).avail.idx).write_volatile(self.avail_idx);
        }
        fence(Ordering::SeqCst);
        // SAFETY: `used.flags` is written by the device; volatile read.
        let flags = unsafe { addr_of!((*self.rings).used.flags).read_volatile() };
        if flags & USED_F_NO_NOTIFY == 0 {
            self.regs.write(REG_QUEUE_NOTIFY, u32::from(self.index));
        }
    }
}

/// The transmit half: the queue and its free buffers.
struct TxSide {
    queue: Queue,
    free: [u16; QUEUE_SIZE],
    free_len: usize,
}

impl TxSide {
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.queue.pop_used() {
            if self.free_len < QUEUE_SIZE {
                self.free[self.free_len] = id;
                self.free_len += 1;
            }
        }
    }
}

/// A virtio-net device, ready to move frames.
pub struct VirtioNet {
    base: usize,
    mac: [u8; 6],
    rx: Queue,
    tx: TxSide,
}

impl fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioNet")
            .field("base", &self.base)
            .field("mac", &self.mac)
            .finish()
    }
}

impl VirtioNet {
    /// Finds and initialises the first virtio-net device.
    pub fn probe() -> Result<VirtioNet, ProbeError> {
        let mut legacy = None;
        for slot in 0..SLOTS {
            let regs = Regs(MMIO_BASE + slot * SLOT_SIZE);
            if regs.read(REG_MAGIC) != MAGIC || regs.read(REG_DEVICE_ID) != DEVICE_NET {
                continue;
            }
            if regs.read(REG_VERSION) != 2 {
                legacy = Some(regs.0);
                continue;
            }
            return VirtioNet::init(regs);
        }
        Err(match legacy {
            Some(base) => ProbeError::Legacy { base },
            None => ProbeError::NotFound,
        })
    }

    fn init(regs: Regs) -> Result<VirtioNet, ProbeError> {
        if CLAIMED.swap(true, Ordering::AcqRel) {
            return Err(ProbeError::AlreadyClaimed);
        }
        regs.write(REG_STATUS, 0);
        regs.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        regs.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

        regs.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = regs.read(REG_DEVICE_FEATURES);
        regs.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = regs.read(REG_DEVICE_FEATURES);
        if high & F_VERSION_1_HIGH == 0 {
            regs.write(REG_STATUS, STATUS_FAILED);
            return Err(ProbeError::Features);
        }
        regs.write(REG_DRIVER_FEATURES_SEL, 0);
        regs.write(REG_DRIVER_FEATURES, low & NET_F_MAC);
        regs.write(REG_DRIVER_FEATURES_SEL, 1);
        regs.write(REG_DRIVER_FEATURES, F_VERSION_1_HIGH);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        regs.write(REG_STATUS, status);
        if regs.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            regs.write(REG_STATUS, STATUS_FAILED);
            return Err(ProbeError::Features);
        }

        let mac = if low & NET_F_MAC != 0 {
            core::array::from_fn(|i| regs.config_byte(i))
        } else {
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        };

        let rx = Queue::setup(regs, 0, &RX_RINGS, &RX_BUFFERS)?;
        let tx = Queue::setup(regs, 1, &TX_RINGS, &TX_BUFFERS)?;
        regs.write(REG_STATUS, status | STATUS_DRIVER_OK);

        let mut net = VirtioNet {
            base: regs.0,
            mac,
            rx,
            tx: TxSide {
                queue: tx,
                free: core::array::from_fn(|i| i as u16),
                free_len: QUEUE_SIZE,
            },
        };
        for id in 0..QUEUE_SIZE as u16 {
            net.rx.push_avail(id, BUFFER_SIZE as u32, DESC_F_WRITE);
        }
        Ok(net)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The slot address of the device.
    pub fn base(&self) -> usize {
        self.base
    }
}

/// A received frame; its buffer returns to the device when the token is dropped.
pub struct RxToken<'a> {
    queue: &'a mut Queue,
    id: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let frame_len = self.len.clamp(NET_HDR, BUFFER_SIZE) - NET_HDR;
        // SAFETY: the device has finished with this buffer (it was on the used ring) and
        // wrote `len` bytes; it gets it back only in `drop`, after `f` returns.
        let frame = unsafe {
            core::slice::from_raw_parts(self.queue.buffer(self.id).add(NET_HDR), frame_len)
        };
        f(frame)
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.queue
            .push_avail(self.id, BUFFER_SIZE as u32, DESC_F_WRITE);
    }
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    tx: &'a mut TxSide,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        while self.tx.free_len == 0 {
            // Only reachable if the device stopped consuming; wait for it.
            self.tx.reclaim();
            core::hint::spin_loop();
        }
        self.tx.free_len -= 1;
        let id = self.tx.free[self.tx.free_len];
        let len = len.min(BUFFER_SIZE - NET_HDR);
        let buffer = self.tx.queue.buffer(id);
        // SAFETY: buffer `id` was on our free list, so the device does not own it; the
        // slice covers the header and `len` bytes inside one buffer.
        let bytes = unsafe { core::slice::from_raw_parts_mut(buffer, NET_HDR + len) };
        bytes[..NET_HDR].fill(0);
        let result = f(&mut bytes[NET_HDR..]);
        crate::net::note_sent(&bytes[NET_HDR..]);
        self.tx.queue.push_avail(id, (NET_HDR + len) as u32, 0);
        result
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.tx.reclaim();
        if self.tx.free_len == 0 {
            return None;
        }
        let (id, len) = self.rx.pop_used()?;
        Some((
            RxToken {
                queue: &mut self.rx,
                id,
                len: len as usize,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        (self.tx.free_len > 0).then_some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}
