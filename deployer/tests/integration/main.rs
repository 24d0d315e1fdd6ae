//! Integration tests of the deployer: real images, a real store, real sockets, run as root.
#![allow(clippy::unwrap_used)]

mod hello;
mod qemu;
mod replicas;
mod restart;
mod restore;
mod sandbox;
mod support;
mod upstream;
