//! Integration tests of the push path: stock git pushing over HTTP to the builder's router
//! on a loopback port, real builds, a real deployment repository.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

mod cache;
mod crash;
mod full;
mod push;
mod queue;
mod restart;
mod sandbox;
mod support;
mod transport;
