//! Integration tests of the deployer.

mod qemu;
