//! The console: COM1, a 16550 UART at I/O port 0x3f8, written by polling.

use core::fmt;

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;

/// The serial console.
#[derive(Debug)]
pub struct Serial(());

impl Serial {
    /// Programs COM1 for 115200 8N1 with FIFOs, no interrupts.
    pub fn init() -> Serial {
        outb(COM1 + 1, 0x00); // no interrupts
        outb(COM1 + 3, 0x80); // DLAB: set the divisor
        outb(COM1, 0x01); // 115200 baud
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8 bits, no parity, one stop bit
        outb(COM1 + 2, 0xc7); // FIFOs on, cleared
        outb(COM1 + 4, 0x03); // DTR, RTS
        Serial(())
    }

    /// A handle on the already programmed UART.
    pub fn handle() -> Serial {
        Serial(())
    }

    fn put(&mut self, byte: u8) {
        // Wait for the transmit holding register to be empty (at once under qemu).
        let mut spins = 0u32;
        while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
            spins += 1;
            core::hint::spin_loop();
        }
        outb(COM1, byte);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.put(b'\r');
            }
            self.put(byte);
        }
        Ok(())
    }
}

/// Prints a line on the console (usable anywhere, including the panic handler: the UART
/// has no state beyond its registers).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial::handle(), $($arg)*);
    }};
}
