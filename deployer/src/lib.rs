//! The revboot deployer: it owns every instance.
//!
//! It boots images from the deployment repository on demand through a [`Tender`] backend,
//! watches them, reaps them when idle, and writes their story back to the store. The DNS
//! front end and the handshake proxy reach it through the [`Instances`] trait.
#![deny(missing_docs)]

pub mod summon;

pub use summon::{
    Activity, InstanceKey, InstanceState, Instances, ResolveError, Resolved, SummonError, Summoned,
};
