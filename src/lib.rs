//! The `revboot` binary's library: the CLI, the daemon wiring, the HTTP API, the live
//! feeds ([`feeds`]: instances' consoles and build logs as they are written) and the
//! dashboard ([`dashboard`]: server-rendered pages at `/`, templates in `templates/`, a
//! little plain JavaScript in `static/`), and TLS ([`tls`]: HTTPS, certificates from files
//! or by ACME through the daemon's own DNS, those the front door presents).
//!
//! Behaviour lives here, not in `main.rs`, so that everything the binary does can be tested
//! without spawning it. The parts themselves live in their crates: `revboot-store`,
//! `revboot-builder`, `revboot-deployer`, `revboot-dns` and `revboot-proxy`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod action;
pub mod api;
pub mod bisect;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod credential;
pub mod daemon;
pub mod dashboard;
pub mod demo;
pub mod engine;
pub mod feeds;
pub mod handover;
mod lifecycle;
pub mod login;
pub mod metrics;
pub mod on_demand;
pub mod outcome;
pub mod output;
pub mod placed;
pub mod promote;
pub mod remotes;
pub mod replicate;
pub mod run;
pub mod signals;
pub mod tls;
pub mod upkeep;
mod wiring;
