//! revboot-dns integration tests: a real server on loopback, real DNS clients.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod answers;
mod delayed;
mod deployer;
mod dig;
mod robustness;
mod support;
