//! The builder's configuration: where its data lives, who may push, and its limits.
//!
//! The defaults are named constants of [`BuilderConfig`]; [`crate::Builder::start`] checks
//! the values and says which key is out of range.

use std::path::{Path, PathBuf};

use revboot_store::Store;

use crate::log::DEFAULT_LOG_LIMIT;
use crate::sandbox::SandboxConfig;

/// How the builder is set up.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// The data directory: `src/` (source repositories), `cache/`, `builds/` and `builder/`
    /// (queue state, hook token) are made inside it.
    pub data_dir: PathBuf,
    /// The deployment repository.
    pub store: Store,
    /// The DNS zone, for the names printed to pushers.
    pub zone: String,
    /// The base URL under which [`crate::Builder::router`] is served (`http://127.0.0.1:7070`);
    /// baked into the hooks of the source and deployment repositories.
    pub base_url: String,
    /// A Unix socket on which [`crate::Builder::router`] is served too; when set, the hooks
    /// reach the daemon there rather than at `base_url` (an HTTPS address whose certificate
    /// names the host's public name, which a hook on the host itself cannot verify).
    pub hook_socket: Option<PathBuf>,
    /// Tokens accepted as the basic-auth password of a push.
    pub push_tokens: Vec<String>,
    /// Tokens accepted for the deployment repository only (`/git/-/deploy.git`: a CI's
    /// pushes of prebuilt deployments, and fetches), never for sources.
    pub deploy_tokens: Vec<String>,
    /// Whether fetch and clone work without a token (default: no).
    pub anonymous_fetch: bool,
    /// Builds running at once across services; 0 means the number of available cores.
    pub max_parallel: usize,
    /// Builds waiting at most.
    pub max_queued: usize,
    /// How long a push waits for its build's result before the hook stops following.
    pub push_wait_secs: u64,
    /// The most commits of one push built (the newest); older ones are built on demand.
    /// Bounded by `max_queued`.
    pub max_commits_per_push: usize,
    /// The cap of one build log in bytes.
    pub log_limit: usize,
    /// The largest push request body accepted, in bytes.
    pub max_push_bytes: u64,
    /// How often, in seconds, the free disk space is checked while a build that failed for
    /// lack of it waits to run again.
    pub space_check_secs: u64,
    /// Names the builds' cgroups (`revboot/<name>-builds/`): stable for a data directory
    /// (a restarted builder removes its predecessor's) and distinct between builders on one
    /// host (one never removes another's). The default is made from the data directory.
    pub name: String,
    /// The build sandbox: uid and limits.
    pub sandbox: SandboxConfig,
    /// What a promotion waits for (health checks, warm services); none: live moves at once.
    pub gate: Option<std::sync::Arc<dyn crate::gate::Gate>>,
    /// The cluster this builder is a node of ([`crate::coordinate`]); none: a single host.
    pub coordinator: Option<std::sync::Arc<dyn crate::coordinate::Coordinator>>,
}

impl BuilderConfig {
    /// The default of [`BuilderConfig::push_wait_secs`].
    pub const DEFAULT_PUSH_WAIT_SECS: u64 = 1800;
    /// The default of [`BuilderConfig::max_commits_per_push`].
    pub const DEFAULT_MAX_COMMITS_PER_PUSH: usize = 50;
    /// The default of [`BuilderConfig::space_check_secs`].
    pub const DEFAULT_SPACE_CHECK_SECS: u64 = 30;

    /// A configuration with default limits and no push tokens.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        store: Store,
        zone: impl Into<String>,
        base_url: impl Into<String>,
    ) -> BuilderConfig {
        let data_dir: PathBuf = data_dir.into();
        BuilderConfig {
            name: name_of(&data_dir),
            data_dir,
            store,
            zone: zone.into(),
            base_url: base_url.into(),
            hook_socket: None,
            push_tokens: Vec::new(),
            deploy_tokens: Vec::new(),
            anonymous_fetch: false,
            max_parallel: 0,
            max_queued: 64,
            push_wait_secs: BuilderConfig::DEFAULT_PUSH_WAIT_SECS,
            max_commits_per_push: BuilderConfig::DEFAULT_MAX_COMMITS_PER_PUSH,
            log_limit: DEFAULT_LOG_LIMIT,
            max_push_bytes: 2 * 1024 * 1024 * 1024,
            space_check_secs: BuilderConfig::DEFAULT_SPACE_CHECK_SECS,
            sandbox: SandboxConfig::default(),
            gate: None,
            coordinator: None,
        }
    }
}

/// A name for the builds of the data directory `data`: `b` and 12 hex digits of a hash of
/// its absolute path.
fn name_of(data: &Path) -> String {
    use sha2::Digest as _;
    let path = std::path::absolute(data).unwrap_or_else(|_| data.to_owned());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    format!("b{}", hex::encode(&digest[..6]))
}
