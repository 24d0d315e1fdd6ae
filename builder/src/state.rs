//! Where a build stands and how it ended, as the queue, the runner and the build's followers
//! (the pusher's hook connection, API readers) share it.
//!
//! 1. The queue records a build's [`BuildState`] and persists it; followers watch its
//!    in-memory [`Phase`] through its tracker.
//! 2. The runner ends every build with an [`Outcome`], which the queue records and
//!    followers print; a build that failed for lack of disk space is run again by itself at
//!    most [`MAX_SPACE_RETRIES`] times in a row.

use std::sync::Arc;

use revboot_store::Revision;
use serde::{Deserialize, Serialize};

/// How often in a row a build that failed for lack of disk space is run again by itself.
pub(crate) const MAX_SPACE_RETRIES: usize = 3;

/// Where a build stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BuildState {
    /// Waiting for its turn.
    Queued,
    /// Running now.
    Running,
    /// Built, stored (and possibly made live).
    Succeeded,
    /// The recipe was invalid, the command failed or ran out of time.
    Failed,
    /// Stopped by a daemon stop; a new build of the same commit was queued.
    Interrupted,
    /// Replaced, before it started, by a newer push to the same branch.
    Superseded,
}

impl BuildState {
    /// Whether the build will not change any more.
    pub fn is_finished(self) -> bool {
        !matches!(self, BuildState::Queued | BuildState::Running)
    }
}

/// The in-memory phase of a build, for followers.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    Queued,
    Running,
    Done(Arc<Outcome>),
    Superseded { by: u64, commit: String },
}

/// How a build ended.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) state: BuildState,
    pub(crate) revision: Option<Revision>,
    pub(crate) made_live: bool,
    /// One line: what happened.
    pub(crate) summary: String,
    /// Lines for the pusher after the log: deployment, DNS name, live pointer.
    pub(crate) result_lines: Vec<String>,
    pub(crate) command_secs: Option<f64>,
    /// Set when the deployment did not fit on the disk: the bytes that must be free where the
    /// deployment repository is before the build runs again.
    pub(crate) retry_when_free_bytes: Option<u64>,
    /// Built and recorded, but refused by the promotion's gate ([`crate::gate`]): why. The
    /// push that asked for it is refused with this.
    pub(crate) refused: Option<String>,
}

impl Outcome {
    pub(crate) fn internal(message: String) -> Outcome {
        Outcome {
            state: BuildState::Failed,
            revision: None,
            made_live: false,
            result_lines: vec![format!("build failed: {message}")],
            summary: format!("failed: {message}"),
            command_secs: None,
            retry_when_free_bytes: None,
            refused: None,
        }
    }
}
