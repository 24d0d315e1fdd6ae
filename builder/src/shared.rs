//! What the [`crate::Builder`] handle shares with the HTTP handlers, the queuing of pushes and
//! the deployment repository's hooks: the configuration, the source repositories, the
//! queue, the hook token, the services closed while they are renamed or deleted, the old
//! names of renamed ones, and the
//! bound on `git http-backend` processes. They get it, not the handle, so that none of them
//! imports the crate root that imports them.

use std::sync::Arc;

use crate::config::BuilderConfig;
use crate::{queue, repos};

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: BuilderConfig,
    pub(crate) repos: repos::SourceRepos,
    pub(crate) queue: queue::Queue,
    pub(crate) hook_token: String,
    /// Bounds the `git http-backend` processes running at once.
    pub(crate) git_processes: Arc<tokio::sync::Semaphore>,
    /// The data directory's lock, held until shutdown.
    pub(crate) lock: std::sync::Mutex<Option<std::fs::File>>,
    /// Services being renamed or deleted (see `lifecycle`).
    pub(crate) closed: crate::closed::Closed,
    /// The old names of renamed services (see `renamed`).
    pub(crate) renamed: crate::renamed::Renamed,
}
