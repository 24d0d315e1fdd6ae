//! End-to-end tests of the `revboot` binary: real daemon, stock git, dig and curl.

mod acme;
mod api;
mod beyond_loopback;
mod browser;
mod cert_files;
mod cli;
mod config;
mod daemon_log;
mod dashboard;
mod dashboard_scale;
mod delegation;
mod direct;
mod follow;
mod front_door;
mod gatekeeper;
mod history;
mod https;
mod journey;
mod lifecycle;
mod notify;
mod per_client;
mod promotion;
mod structure;
mod support;
mod upgrade;
mod vm;
