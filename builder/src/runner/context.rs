//! What a build runs with: the context every build shares and the job the queue hands over.

use std::path::PathBuf;
use std::time::Duration;

use revboot_store::Store;

use crate::repos::SourceRepos;
use crate::sandbox;

/// Everything builds share.
#[derive(Debug)]
pub(crate) struct RunContext {
    pub(crate) repos: SourceRepos,
    pub(crate) store: Store,
    pub(crate) cache_root: PathBuf,
    pub(crate) builds_root: PathBuf,
    pub(crate) zone: String,
    pub(crate) cargo_home: Option<PathBuf>,
    pub(crate) rustup_home: Option<PathBuf>,
    /// How often the queue looks for free space for builds that failed for lack of it.
    pub(crate) space_check: Duration,
    pub(crate) sandbox: sandbox::Sandbox,
    pub(crate) limits: sandbox::SandboxConfig,
    /// What a promotion waits for ([`crate::gate`]).
    pub(crate) gate: Option<std::sync::Arc<dyn crate::gate::Gate>>,
    /// The cluster this builder is a node of ([`crate::coordinate`]).
    pub(crate) coordinator: Option<std::sync::Arc<dyn crate::coordinate::Coordinator>>,
}

/// One build to run.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) service: String,
    pub(crate) refname: String,
    pub(crate) commit: String,
    pub(crate) deploy_option: Option<bool>,
    /// Whether it is the tip of the newest push of its branch (only a tip moves live).
    pub(crate) tip: bool,
    /// For a re-run of an interrupted build: when that one started (unix ms); a deployment
    /// it wrote since then is adopted.
    pub(crate) adopt_since_ms: Option<u64>,
    /// Whether the build runs again by itself should its deployment not fit on the disk.
    pub(crate) retry_when_full: bool,
    /// In a cluster, the service's build lock, held while the build runs and checked
    /// right before its deployment is written ([`crate::coordinate`] rule 3).
    pub(crate) lock: Option<std::sync::Arc<crate::coordinate::Held>>,
}

/// The commit as messages name it: its first 12 hex digits.
pub(super) fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}
