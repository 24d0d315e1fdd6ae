//! `hello-vm`: a Rust unikernel for revboot's qemu tender.
//!
//! Booted by `qemu-system-x86_64 -M microvm` straight from this ELF through its PVH note
//! (see [`boot`]), it prints on COM1, drives a virtio-net device over virtio-mmio
//! ([`virtio`]), and serves HTTP with smoltcp ([`net`]) on 10.0.2.15:8080 of qemu's
//! user-mode network: `hello from <REVISION> (<deployment>)`, the deployment taken from
//! `revboot.revision=<sha>` on the kernel command line.
//!
//! Restored from a snapshot (revboot's qemu tender can save a ready guest and start later
//! instances from it), it notices the new seed fw_cfg holds ([`fwcfg`]) before it polls the
//! network again, and reseeds: the TCP initial sequence numbers and `GET /id`'s random value
//! of two instances restored from one snapshot differ.
//!
//! Limits: one CPU; devices are polled, the only interrupt is a 1 kHz timer that wakes the
//! CPU from `hlt` when no connection is open (see [`idle`]); no allocator, IPv4 only, a
//! static address.
//!
//! Bad images for the tender's tests are cargo features: `never-ready` boots and prints but
//! never listens, `triple-fault` prints a line and triple-faults, `spin` loops forever
//! before printing anything.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

mod boot;
mod clock;
mod cpu;
mod fwcfg;
mod idle;
mod mem;
mod net;
mod serial;
mod virtio;

use core::panic::PanicInfo;

/// Change this line to make a new revision.
pub const REVISION: &str = "v1";

/// The deployment named by `revboot.revision=` on the command line, if it is a plain token.
fn deployment(cmdline: &str) -> &str {
    cmdline
        .split_ascii_whitespace()
        .find_map(|arg| arg.strip_prefix("revboot.revision="))
        .filter(|value| {
            (1..=64).contains(&value.len())
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        })
        .unwrap_or("local")
}

/// Called by the boot code in long mode with the PVH start-info address.
#[unsafe(no_mangle)]
pub extern "C" fn kernel_main(start_info: u32) -> ! {
    let entered = cpu::rdtsc();
    if cfg!(feature = "spin") {
        loop {
            core::hint::spin_loop();
        }
    }
    serial::Serial::init();
    println!("hello-vm {REVISION}: booting");
    // SAFETY: `start_info` is what the PVH loader put in ebx; low memory is identity mapped
    // and the command line is never written.
    let cmdline = unsafe { boot::cmdline(start_info) };
    let deployment = deployment(cmdline);
    println!("hello-vm: command line `{cmdline}`, deployment {deployment}");
    if cfg!(feature = "triple-fault") {
        println!("hello-vm: triple-faulting on purpose");
        cpu::triple_fault();
    }
    let clock = clock::Clock::calibrate(entered);
    println!(
        "hello-vm: TSC at {} MHz{}",
        clock.hz() / 1_000_000,
        if clock.calibrated {
            ""
        } else {
            " (PIT silent: a guess)"
        }
    );
    idle::init();
    let device = match virtio::VirtioNet::probe() {
        Ok(device) => device,
        Err(error) => panic!("{error}"),
    };
    let mac = device.mac();
    println!(
        "hello-vm: virtio-net at {:#x}, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        device.base(),
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5]
    );
    if cfg!(feature = "never-ready") {
        println!("hello-vm: never listening, on purpose");
        cpu::halt();
    }
    net::serve(device, clock, deployment, fwcfg::Seed::read())
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("hello-vm: panic: {}", info.message());
    if let Some(location) = info.location() {
        println!("hello-vm: at {}:{}", location.file(), location.line());
    }
    // Take the VM down so that the tender sees the crash (qemu runs with -no-reboot).
    cpu::triple_fault()
}
