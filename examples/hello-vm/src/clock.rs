//! Time for smoltcp: the TSC, calibrated once against the PIT.
//!
//! The PIT (i8254, present in qemu's microvm) counts at a fixed 1.193182 MHz. We program
//! channel 0 as a free-running divide-by-65536 counter (mode 2, interrupts stay masked since
//! the CPU runs with IF clear), latch-read it while the TSC runs for 2 ms of PIT ticks, and
//! derive TSC ticks per second. Under TCG the guest TSC follows the host's; under KVM it is
//! constant-rate on current hardware. Cost: 2 ms of boot time, no interrupts, no kvmclock.

use crate::cpu::{inb, outb, rdtsc};

const PIT_HZ: u64 = 1_193_182;
const PIT_CH0: u16 = 0x40;
const PIT_CMD: u16 = 0x43;
/// 2 ms of PIT ticks (one tick of read error is 0.04%).
const CALIBRATION_TICKS: u64 = PIT_HZ / 500;
/// Used when the PIT does not count (then timeouts are only roughly right).
const FALLBACK_HZ: u64 = 2_000_000_000;

/// A monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: u64,
    hz: u64,
    /// False when the PIT did not count and `hz` is a guess.
    pub calibrated: bool,
}

fn pit_count() -> u16 {
    outb(PIT_CMD, 0x00); // latch channel 0
    let lo = inb(PIT_CH0);
    let hi = inb(PIT_CH0);
    u16::from_le_bytes([lo, hi])
}

impl Clock {
    /// Calibrates the TSC (takes about 2 ms); the clock counts from TSC value `start`.
    pub fn calibrate(start: u64) -> Clock {
        outb(PIT_CMD, 0x34); // channel 0, lobyte/hibyte, mode 2, binary
        outb(PIT_CH0, 0x00);
        outb(PIT_CH0, 0x00); // reload value 0 = 65536
        let mut last = pit_count();
        let tsc0 = rdtsc();
        let mut ticks = 0u64;
        let mut unchanged = 0u32;
        while ticks < CALIBRATION_TICKS {
            let now = pit_count();
            if now == last {
                unchanged += 1;
                if unchanged > 1_000_000 {
                    return Clock {
                        start,
                        hz: FALLBACK_HZ,
                        calibrated: false,
                    };
                }
                continue;
            }
            unchanged = 0;
            // The counter counts down and wraps at 65536.
            ticks += u64::from(last.wrapping_sub(now));
            last = now;
        }
        let cycles = rdtsc().wrapping_sub(tsc0);
        let hz = (u128::from(cycles) * u128::from(PIT_HZ) / u128::from(ticks)) as u64;
        Clock {
            start,
            hz: hz.max(1_000_000),
            calibrated: true,
        }
    }

    /// TSC ticks per second.
    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// Microseconds since `start`.
    pub fn micros(&self) -> u64 {
        let cycles = rdtsc().wrapping_sub(self.start);
        (u128::from(cycles) * 1_000_000 / u128::from(self.hz)) as u64
    }

    /// The current time for smoltcp.
    pub fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.micros() as i64)
    }
}
