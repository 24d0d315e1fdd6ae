//! Sleeping when there is nothing to do, so that an idle VM does not burn a host CPU.
//!
//! 1. An IDT with two gates: vector 0x20 for the local APIC timer and 0xff for spurious
//!    interrupts. Every other vector stays absent, so an exception still ends in a triple
//!    fault (the crash the tender sees).
//! 2. The local APIC (at 0xfee00000, identity mapped) is software-enabled and its timer set
//!    periodic at about 1 kHz (qemu's APIC bus runs at 1 GHz; divide by 16, count 62500).
//!    The handler only signals end-of-interrupt.
//! 3. [`sleep`] enables interrupts for exactly one `hlt`: the CPU wakes at the next tick and
//!    interrupts are off again before any Rust code runs. Rust code uses the red zone
//!    below the stack pointer, so the stack pointer is moved past it around the `hlt`.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ptr::addr_of_mut;

const LAPIC: usize = 0xfee0_0000;
const LAPIC_SVR: usize = 0x0f0;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
const TIMER_VECTOR: u8 = 0x20;
const SPURIOUS_VECTOR: u8 = 0xff;
/// 1 GHz / 16 / 62500 = 1 kHz.
const TIMER_COUNT: u32 = 62_500;
const DIVIDE_BY_16: u32 = 0x3;
const PERIODIC: u32 = 1 << 17;

global_asm!(
    r#"
    .section .text.idle, "ax", @progbits
    .global hello_vm_timer_isr
hello_vm_timer_isr:
    push rax
    mov eax, 0xfee000b0
    mov dword ptr [rax], 0
    pop rax
    iretq
    .global hello_vm_spurious_isr
hello_vm_spurious_isr:
    iretq
    "#
);

unsafe extern "C" {
    fn hello_vm_timer_isr();
    fn hello_vm_spurious_isr();
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    kind: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const ABSENT: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        kind: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: unsafe extern "C" fn()) -> Gate {
        let offset = handler as usize as u64;
        Gate {
            offset_low: offset as u16,
            selector: 0x08, // the 64-bit code segment of boot.rs's GDT
            ist: 0,
            kind: 0x8e, // present, ring 0, 64-bit interrupt gate
            offset_mid: (offset >> 16) as u16,
            offset_high: (offset >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; 256]>);

// SAFETY: written once by `init` before interrupts are ever enabled; only the CPU reads it
// afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::ABSENT; 256]));

fn lapic_write(register: usize, value: u32) {
    // SAFETY: the local APIC's registers are 32-bit, 16-byte aligned, inside the identity
    // mapped (uncached) top gigabyte.
    unsafe { ((LAPIC + register) as *mut u32).write_volatile(value) }
}

fn lapic_read(register: usize) -> u32 {
    // SAFETY: as for `lapic_write`.
    unsafe { ((LAPIC + register) as *const u32).read_volatile() }
}

/// Loads the IDT and starts the 1 kHz wake-up timer. Interrupts stay disabled.
pub fn init() {
    let idt = IDT.0.get();
    // SAFETY: interrupts are disabled and nothing else refers to the IDT yet.
    unsafe {
        (*addr_of_mut!(*idt))[usize::from(TIMER_VECTOR)] = Gate::interrupt(hello_vm_timer_isr);
        (*addr_of_mut!(*idt))[usize::from(SPURIOUS_VECTOR)] =
            Gate::interrupt(hello_vm_spurious_isr);
    }
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr {
        limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the IDT is static and complete (absent gates fault, as before).
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(nostack, readonly, preserves_flags)) };
    lapic_write(
        LAPIC_SVR,
        lapic_read(LAPIC_SVR) | 0x100 | u32::from(SPURIOUS_VECTOR),
    );
    lapic_write(LAPIC_TIMER_DIVIDE, DIVIDE_BY_16);
    lapic_write(LAPIC_LVT_TIMER, PERIODIC | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INITIAL, TIMER_COUNT);
}

/// Sleeps until the next interrupt (at most about a millisecond).
pub fn sleep() {
    // SAFETY: interrupts are enabled only for the `hlt` (the `sti` shadow covers it, so a
    // pending tick wakes it rather than being taken before it); the handler saves what it
    // touches and returns here; the stack pointer skips the 128-byte red zone meanwhile.
    unsafe { asm!("sub rsp, 128", "sti", "hlt", "cli", "add rsp, 128") };
}
