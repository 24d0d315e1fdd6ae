//! Integration tests of the handshake proxy in front of the real deployer, running the real
//! `examples/hello` image from a real store, over real loopback TCP. Run as root (the
//! process tender's sandbox needs it).
#![allow(clippy::unwrap_used)]

mod capabilities;
mod front_door;
mod steering;
mod support;
