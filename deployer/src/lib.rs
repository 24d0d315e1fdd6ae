//! The revboot deployer: it owns every instance.
//!
//! It boots images from the deployment repository on demand through a [`Tender`] backend,
//! watches them, reaps them when idle, and writes their story back to the store. The DNS
//! front end and the handshake proxy reach it through the [`Instances`] trait.
#![deny(missing_docs)]

pub mod config;
pub mod console;
mod deployer;
pub mod pool;
pub mod state;
pub mod summon;
pub mod tender;
pub mod upstream;

pub use config::{BackendPort, DeployerConfig};
pub use deployer::{ControlError, Deployer, InstanceInfo, NewError};
pub use summon::{
    Activity, InstanceKey, InstanceState, Instances, ResolveError, Resolved, SummonError, Summoned,
};
pub use tender::{Tender, Tenders};
