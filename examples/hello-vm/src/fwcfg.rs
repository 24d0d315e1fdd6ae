//! qemu's firmware configuration device (fw_cfg, I/O ports 0x510/0x511): where revboot puts
//! the guest's seed.
//!
//! 1. Select an item by writing its 16-bit key to the selector port; read its bytes one by
//!    one from the data port.
//! 2. Item 0x19 is the file directory: a big-endian count, then 64-byte entries (size,
//!    key, reserved, a NUL-padded name).
//! 3. `opt/org.revboot/seed` holds 64 hex digits, fresh for every qemu process revboot
//!    starts. A guest restored from a snapshot runs in a new process: its seed differs
//!    from the one it read at boot, which is how it learns it was restored (see
//!    [`Seed::changed`]).
//! 4. `opt/org.revboot/env` holds the instance's variables (the manifest's `[run.env]` and
//!    the service's `revboot config`): `NAME=value` entries, each ended by a NUL byte. It is
//!    read when a value is needed ([`var`]), never kept: a guest restored from a snapshot
//!    finds the variables of its own qemu process, and the snapshot holds none.

use crate::cpu::{inb, outw};

const SELECTOR: u16 = 0x510;
const DATA: u16 = 0x511;
const SIGNATURE: u16 = 0x00;
const FILE_DIR: u16 = 0x19;
/// The seed's fw_cfg file.
pub const SEED_FILE: &[u8] = b"opt/org.revboot/seed";
/// Hex digits in the seed file.
const SEED_HEX: usize = 64;

fn read(buf: &mut [u8]) {
    for byte in buf {
        *byte = inb(DATA);
    }
}

/// The variables' fw_cfg file.
pub const ENV_FILE: &[u8] = b"opt/org.revboot/env";

/// The key and size of fw_cfg file `wanted`, or `None` without fw_cfg or without the file.
fn find(wanted: &[u8]) -> Option<(u16, u32)> {
    outw(SELECTOR, SIGNATURE);
    let mut signature = [0u8; 4];
    read(&mut signature);
    if &signature != b"QEMU" {
        return None;
    }
    outw(SELECTOR, FILE_DIR);
    let mut count = [0u8; 4];
    read(&mut count);
    for _ in 0..u32::from_be_bytes(count).min(1024) {
        let mut entry = [0u8; 64];
        read(&mut entry);
        let size = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let key = u16::from_be_bytes([entry[4], entry[5]]);
        let name = &entry[8..];
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if &name[..len] == wanted {
            return Some((key, size));
        }
    }
    None
}

/// The seed file's key, or `None` without fw_cfg or without the file.
fn seed_key() -> Option<u16> {
    find(SEED_FILE)
        .filter(|&(_, size)| size as usize >= SEED_HEX)
        .map(|(key, _)| key)
}

/// Copies the value of variable `name` (rule 4) into `out`, cut at its length; the length
/// copied, or `None` when the variable is not set.
pub fn var(name: &[u8], out: &mut [u8]) -> Option<usize> {
    let (key, size) = find(ENV_FILE)?;
    outw(SELECTOR, key);
    // Streamed byte by byte: where in the current entry, whether its name is still `name`,
    // and, once past `name=`, how much of the value was copied.
    let (mut at, mut matching, mut copied) = (0usize, true, None::<usize>);
    for _ in 0..size {
        let byte = inb(DATA);
        match copied {
            Some(len) if byte == 0 => return Some(len),
            Some(len) => {
                if let Some(slot) = out.get_mut(len) {
                    *slot = byte;
                    copied = Some(len + 1);
                }
            }
            None if byte == 0 => (at, matching) = (0, true),
            None => {
                if matching && at == name.len() && byte == b'=' {
                    copied = Some(0);
                } else {
                    matching &= name.get(at) == Some(&byte);
                    at += 1;
                }
            }
        }
    }
    copied
}

fn hex(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// The seed revboot gave this qemu process, and where to read it again.
#[derive(Debug, Clone, Copy)]
pub struct Seed {
    key: Option<u16>,
    /// The 32 bytes of the seed (zeros without one).
    pub bytes: [u8; 32],
}

impl Seed {
    /// Reads the seed (all zeros when qemu was started without one).
    pub fn read() -> Seed {
        let key = seed_key();
        let mut seed = Seed {
            key,
            bytes: [0; 32],
        };
        seed.bytes = seed.current();
        seed
    }

    /// The seed fw_cfg holds now.
    fn current(&self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        let Some(key) = self.key else {
            return bytes;
        };
        outw(SELECTOR, key);
        let mut digits = [0u8; SEED_HEX];
        read(&mut digits);
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = hex(pair[0]) << 4 | hex(pair[1]);
        }
        bytes
    }

    /// The first eight bytes fw_cfg holds now, compared with those read last: a different
    /// value means another qemu process runs this memory (a restore). Then the whole new
    /// seed is read and true returned. Cheap: nine port accesses.
    pub fn changed(&mut self) -> bool {
        let Some(key) = self.key else {
            return false;
        };
        outw(SELECTOR, key);
        let mut digits = [0u8; 16];
        read(&mut digits);
        let mut head = [0u8; 8];
        for (byte, pair) in head.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = hex(pair[0]) << 4 | hex(pair[1]);
        }
        if head == self.bytes[..8] {
            return false;
        }
        self.bytes = self.current();
        true
    }

    /// A 64-bit value of the seed mixed with `salt` (SplitMix64's finaliser over each word).
    pub fn mix(&self, salt: u64) -> u64 {
        let mut state = salt;
        for word in self.bytes.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            state = splitmix(state ^ u64::from_le_bytes(w));
        }
        state
    }
}

/// One step of SplitMix64.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
