//! The steering program's tools: a minimal BPF assembler (instructions, forward jumps to
//! named labels) and the few `bpf(2)` commands that load the program and fill its maps.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const HELPER_MAP_LOOKUP: i32 = 1;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// A minimal assembler: instructions, and forward jumps to named labels.
#[derive(Default)]
pub(super) struct Asm {
    insns: Vec<Insn>,
    fixups: Vec<(usize, &'static str)>,
    labels: HashMap<&'static str, usize>,
}

pub(super) const R0: u8 = 0;
pub(super) const R1: u8 = 1;
pub(super) const R2: u8 = 2;
pub(super) const R3: u8 = 3;
pub(super) const R4: u8 = 4;
pub(super) const R6: u8 = 6;
pub(super) const R7: u8 = 7;
pub(super) const R8: u8 = 8;
pub(super) const R9: u8 = 9;
pub(super) const R10: u8 = 10;

impl Asm {
    pub(super) fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        });
    }
    /// `dst = src` (64 bit).
    pub(super) fn mov(&mut self, dst: u8, src: u8) {
        self.raw(0xbf, dst, src, 0, 0);
    }
    /// `dst = imm` (64 bit).
    pub(super) fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0xb7, dst, 0, 0, imm);
    }
    /// `dst += imm` (64 bit).
    pub(super) fn add_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x07, dst, 0, 0, imm);
    }
    /// `dst = *(u32 *)(src + off)`.
    pub(super) fn load32(&mut self, dst: u8, src: u8, off: i16) {
        self.raw(0x61, dst, src, off, 0);
    }
    /// `*(u32 *)(dst + off) = src`.
    pub(super) fn store32(&mut self, dst: u8, off: i16, src: u8) {
        self.raw(0x63, dst, src, off, 0);
    }
    /// `*(u32 *)(dst + off) = imm`.
    pub(super) fn store32_imm(&mut self, dst: u8, off: i16, imm: i32) {
        self.raw(0x62, dst, 0, off, imm);
    }
    /// `dst &= src` (64 bit).
    pub(super) fn and(&mut self, dst: u8, src: u8) {
        self.raw(0x5f, dst, src, 0, 0);
    }
    /// `dst += src` (64 bit).
    pub(super) fn add(&mut self, dst: u8, src: u8) {
        self.raw(0x0f, dst, src, 0, 0);
    }
    /// `dst &= imm` (64 bit).
    pub(super) fn and_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x57, dst, 0, 0, imm);
    }
    /// `dst ^= src` (32 bit).
    pub(super) fn xor32(&mut self, dst: u8, src: u8) {
        self.raw(0xac, dst, src, 0, 0);
    }
    /// `dst *= imm` (32 bit).
    pub(super) fn mul32_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x24, dst, 0, 0, imm);
    }
    /// `dst >>= imm` (32 bit, logical).
    pub(super) fn rsh32_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x74, dst, 0, 0, imm);
    }
    /// `dst %= src` (32 bit, unsigned).
    pub(super) fn mod32(&mut self, dst: u8, src: u8) {
        self.raw(0x9c, dst, src, 0, 0);
    }
    /// `dst = *(u8 *)(src + off)`.
    pub(super) fn load8(&mut self, dst: u8, src: u8, off: i16) {
        self.raw(0x71, dst, src, off, 0);
    }
    /// `goto label`.
    pub(super) fn ja(&mut self, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.raw(0x05, 0, 0, 0, 0);
    }
    /// `lock *(u64 *)(dst + off) += src`.
    pub(super) fn atomic_add64(&mut self, dst: u8, off: i16, src: u8) {
        self.raw(0xdb, dst, src, off, 0);
    }
    /// `dst = map` (the two-slot `ld_imm64` with `BPF_PSEUDO_MAP_FD`).
    pub(super) fn load_map(&mut self, dst: u8, map_fd: i32) {
        self.raw(0x18, dst, 1, 0, map_fd);
        self.raw(0, 0, 0, 0, 0);
    }
    pub(super) fn call(&mut self, helper: i32) {
        self.raw(0x85, 0, 0, 0, helper);
    }
    pub(super) fn exit(&mut self) {
        self.raw(0x95, 0, 0, 0, 0);
    }
    /// `if dst != imm goto label`.
    pub(super) fn jne_imm(&mut self, dst: u8, imm: i32, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.raw(0x55, dst, 0, 0, imm);
    }
    /// `if dst == imm goto label`.
    pub(super) fn jeq_imm(&mut self, dst: u8, imm: i32, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.raw(0x15, dst, 0, 0, imm);
    }
    /// `if dst != src goto label`.
    pub(super) fn jne(&mut self, dst: u8, src: u8, label: &'static str) {
        self.fixups.push((self.insns.len(), label));
        self.raw(0x5d, dst, src, 0, 0);
    }
    /// `r0 = map[the key at r10 + key]`, or `goto pass` when there is none.
    pub(super) fn lookup_or_pass(&mut self, map_fd: i32, key: i16) {
        self.load_map(R1, map_fd);
        self.mov(R2, R10);
        self.add_imm(R2, i32::from(key));
        self.call(HELPER_MAP_LOOKUP);
        self.jeq_imm(R0, 0, "pass");
    }
    pub(super) fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.insns.len());
    }
    pub(super) fn finish(mut self) -> Vec<Insn> {
        for (at, label) in std::mem::take(&mut self.fixups) {
            let target = self.labels[label];
            self.insns[at].off =
                i16::try_from(target as isize - at as isize - 1).expect("a short program");
        }
        self.insns
    }
}

// ---- bpf(2) -------------------------------------------------------------------------------

const CMD_MAP_CREATE: libc::c_long = 0;
const CMD_MAP_LOOKUP_ELEM: libc::c_long = 1;
const CMD_MAP_UPDATE_ELEM: libc::c_long = 2;
const CMD_MAP_DELETE_ELEM: libc::c_long = 3;
const CMD_PROG_LOAD: libc::c_long = 5;
const CMD_LINK_CREATE: libc::c_long = 28;
pub(super) const MAP_TYPE_HASH: u32 = 1;
pub(super) const MAP_TYPE_SOCKHASH: u32 = 18;
/// `BPF_F_NO_PREALLOC`: a hash element replaced or deleted is freed after the programs
/// that may be reading it are done, never reused under them.
pub(super) const NO_PREALLOC: u32 = 1;
const PROG_TYPE_SK_LOOKUP: u32 = 30;
const ATTACH_SK_LOOKUP: u32 = 36;

/// `union bpf_attr`, as plain words: each command fills the fields it reads.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 144])
    }
    fn u32(&mut self, at: usize, value: u32) -> &mut Attr {
        self.0[at..at + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, value: u64) -> &mut Attr {
        self.0[at..at + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn name(&mut self, at: usize, name: &str) -> &mut Attr {
        let bytes = &name.as_bytes()[..name.len().min(15)];
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed `bpf_attr` of the full size with the command's fields
    // set; the pointers in it outlive the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

pub(super) fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("a descriptor fits in an int")) }
}

pub(super) fn map_create(
    kind: u32,
    flags: u32,
    key: u32,
    value: u32,
    entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, entries)
        .u32(16, flags)
        .name(28, name);
    bpf(CMD_MAP_CREATE, &mut attr).map(owned)
}

pub(super) fn program_load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = CString::new("Dual MIT/GPL").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = Attr::new();
    attr.u32(0, PROG_TYPE_SK_LOOKUP)
        .u32(4, u32::try_from(insns.len()).expect("a short program"))
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .name(48, "revboot_steer")
        .u32(68, ATTACH_SK_LOOKUP);
    bpf(CMD_PROG_LOAD, &mut attr).map(owned).map_err(|error| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let last = text.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        if last.is_empty() {
            error
        } else {
            io::Error::new(error.kind(), format!("{error}; verifier: {last}"))
        }
    })
}

pub(super) fn link_create(program: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, program.as_raw_fd() as u32)
        .u32(4, netns.as_raw_fd() as u32)
        .u32(8, ATTACH_SK_LOOKUP);
    bpf(CMD_LINK_CREATE, &mut attr).map(owned)
}

fn elem(map: BorrowedFd<'_>, key: &[u8], value: u64) -> Attr {
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value);
    attr
}

pub(super) fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    bpf(
        CMD_MAP_UPDATE_ELEM,
        &mut elem(map, key, value.as_ptr() as u64),
    )
    .map(drop)
}

pub(super) fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    bpf(
        CMD_MAP_LOOKUP_ELEM,
        &mut elem(map, key, value.as_mut_ptr() as u64),
    )
    .map(drop)
}

pub(super) fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    bpf(CMD_MAP_DELETE_ELEM, &mut elem(map, key, 0)).map(drop)
}
