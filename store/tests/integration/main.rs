//! Integration tests of the deployment store against stock git.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod concurrency;
mod crash;
mod full;
mod interop;
mod large;
mod props;
mod resolve;
mod support;
