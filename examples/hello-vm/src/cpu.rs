//! The few instructions the kernel needs: port I/O (COM1, the PIT, fw_cfg), the time-stamp counter, halting.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the kernel only touches ports of devices it drives (COM1, the PIT); port
    // writes have no effect on Rust-visible memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; reads of COM1 and PIT ports have no side effect on memory.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`; the fw_cfg selector port is the only 16-bit one written.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the counter (CR4.TSD is clear, we run in ring 0).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Stops this CPU for good (interrupts are off, so `hlt` never returns).
pub fn halt() -> ! {
    loop {
        // SAFETY: `cli; hlt` stops the CPU; nothing is left to run.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Loads an empty IDT and raises an exception: no handler, no double-fault handler, so the
/// CPU shuts down (a triple fault). With `-no-reboot` qemu then exits.
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let empty = Idtr { limit: 0, base: 0 };
    // SAFETY: deliberately fatal; nothing runs after this.
    unsafe { asm!("lidt [{}]", "int3", in(reg) &empty, options(nostack)) }
    halt()
}
