//! The revboot deployment repository.
//!
//! A bare git repository, written through gix and readable by stock `git`, that holds one
//! commit per build of each service on `refs/heads/<service>` (manifest, image, build log,
//! source link), the live pointer per service, and runtime logs on a separate ref.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod manifest;
mod revision;

pub use manifest::{Manifest, ManifestError};
pub use revision::{ParseRevisionError, Revision};
