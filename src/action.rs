//! The typed contract between the CLI, the HTTP API and the engine.
//!
//! 1. A CLI command or an HTTP request becomes an [`Action`].
//! 2. [`crate::engine::Engine::execute`] carries it out and returns a [`Reply`] or an
//!    [`ActionError`].
//! 3. Only the HTTP layer knows routes and status codes ([`ActionError::status`] is the one
//!    mapping); only the CLI knows how a reply is printed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Something a user asks revboot to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Create a service and its source repository.
    AddService {
        /// The service name.
        name: String,
    },
    /// List services.
    ListServices,
    /// Delete a service: its source repository goes, its deployments are kept in an
    /// archive or removed, as asked.
    DeleteService {
        /// The service.
        service: String,
        /// What becomes of its deployments.
        deployments: Deployments,
    },
    /// Give a service a new name.
    RenameService {
        /// The service.
        service: String,
        /// Its new name.
        to: String,
    },
    /// Check the token and say which daemon answers (`revboot login`).
    CheckToken,
    /// Deployment history of a service.
    History {
        /// The service.
        service: String,
    },
    /// One deployment.
    Show {
        /// The service.
        service: String,
        /// The label.
        label: String,
    },
    /// What changed between two deployments.
    Diff {
        /// The service.
        service: String,
        /// The older label.
        a: String,
        /// The newer label.
        b: String,
    },
    /// Move the live pointer.
    MoveLive {
        /// The service.
        service: String,
        /// The label to make live.
        label: String,
        /// Why: `rollback` or `deploy` (recorded in the trail).
        reason: MoveReason,
        /// Boot and check the revision first when its manifest has a `[deploy] check` (or
        /// asks to be warm); a failed check leaves live where it was.
        #[serde(default = "yes")]
        check: bool,
    },
    /// Running instances.
    ListInstances,
    /// Stop or kill an instance.
    StopInstance {
        /// The service.
        service: String,
        /// The label (default: live).
        label: Option<String>,
        /// The client of a per-client instance.
        client: Option<IpAddr>,
        /// Which replica of the revision (0: the first, the only one of most revisions).
        replica: u16,
        /// Kill instead of a graceful stop.
        kill: bool,
    },
    /// The build log of a deployment.
    BuildLog {
        /// The service.
        service: String,
        /// The label (default: live).
        label: Option<String>,
    },
    /// Console records of instances that ran.
    ConsoleLogs {
        /// The service.
        service: String,
        /// Only records of this label's revision.
        label: Option<String>,
        /// Only the newest this many.
        limit: Option<usize>,
    },
    /// Builds queued, running and recently finished.
    ListBuilds {
        /// Only builds of this service.
        service: Option<String>,
    },
    /// Boot a revision (if needed) and say where it answers.
    Summon {
        /// The service.
        service: String,
        /// The label (default: live).
        label: Option<String>,
        /// The client, for per-client services.
        client: Option<IpAddr>,
    },
    /// A service's configuration variables (`revboot config list`).
    Config {
        /// The service.
        service: String,
        /// Include the values (otherwise names only).
        show: bool,
    },
    /// Sets and unsets configuration variables (`revboot config set|unset`).
    ConfigChange {
        /// The service.
        service: String,
        /// Variables to set.
        set: Values,
        /// Variables to remove.
        unset: Vec<String>,
        /// Replace the running instances, so that they get the change now.
        restart: bool,
    },
    /// The daemon itself: pid, binary, upgrades.
    Daemon,
    /// Upgrade the daemon in place: it executes its binary again (the file it was started
    /// from, which may have been replaced), handing its instances and sockets over.
    Upgrade,
    /// The nodes of the cluster the daemon belongs to (`[cluster]`), as etcd lists them.
    Nodes,
}

fn yes() -> bool {
    true
}

/// Values of configuration variables. `Debug` shows the names only: an action can end up
/// in a log or an error message.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Values(pub BTreeMap<String, String>);

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Action {
    /// Whether the action changes state (and so needs the token over HTTP even where reads
    /// are public).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Action::AddService { .. }
                | Action::DeleteService { .. }
                | Action::RenameService { .. }
                | Action::MoveLive { .. }
                | Action::StopInstance { .. }
                | Action::Summon { .. }
                | Action::ConfigChange { .. }
                | Action::Upgrade
                // Values are secrets: shown to the token's holder only, public reads or not.
                | Action::Config { show: true, .. }
        )
    }

    /// Whether the action needs the token even where reads are public: writes, and the
    /// token check itself.
    pub fn needs_token(&self) -> bool {
        self.is_write() || matches!(self, Action::CheckToken)
    }

    /// The service the action names, if it names one.
    pub fn service(&self) -> Option<&str> {
        match self {
            Action::AddService { name: service }
            | Action::DeleteService { service, .. }
            | Action::RenameService { service, .. }
            | Action::History { service }
            | Action::Show { service, .. }
            | Action::Diff { service, .. }
            | Action::MoveLive { service, .. }
            | Action::StopInstance { service, .. }
            | Action::BuildLog { service, .. }
            | Action::ConsoleLogs { service, .. }
            | Action::Summon { service, .. }
            | Action::Config { service, .. }
            | Action::ConfigChange { service, .. } => Some(service),
            Action::ListBuilds { service } => service.as_deref(),
            _ => None,
        }
    }
}

/// What becomes of a deleted service's deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deployments {
    /// Kept in the deployment repository, under `refs/revboot/deleted/<service>/<time>/`.
    Keep,
    /// Removed with their refs (`git gc` frees their space).
    Remove,
}

/// Why the live pointer moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    /// Back to an older revision.
    Rollback,
    /// To a chosen revision.
    Deploy,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// The name.
    pub name: String,
    /// The live revision.
    pub live: Option<String>,
    /// Number of deployments.
    pub deployments: usize,
    /// The DNS name of the live revision.
    pub dns_name: String,
}

/// A deleted service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedView {
    /// The service.
    pub service: String,
    /// How many deployments it had.
    pub deployments: usize,
    /// Whether they were kept.
    pub kept: bool,
    /// Where its refs were kept in the deployment repository (a ref prefix).
    pub archive: Option<String>,
    /// Where its source repository was kept, on the daemon's host.
    pub source_archive: Option<String>,
    /// How many of its instances were stopped.
    pub stopped: usize,
    /// How many configuration variables it had, removed with it.
    pub variables: usize,
}

/// A renamed service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenamedView {
    /// The old name.
    pub service: String,
    /// The new name.
    pub to: String,
    /// The DNS name of its live revision now.
    pub dns_name: String,
    /// Its live revision.
    pub live: Option<String>,
    /// How many deployments it has.
    pub deployments: usize,
    /// How many of its instances were stopped (they boot again under the new name).
    pub stopped: usize,
    /// How many configuration variables moved with it.
    pub variables: usize,
}

/// The daemon that accepted the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// Its version.
    pub version: String,
    /// Its DNS zone.
    pub zone: String,
}

/// A deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentView {
    /// The deployment commit.
    pub revision: String,
    /// Its short form, as DNS labels use it.
    pub short: String,
    /// Its DNS name.
    pub dns_name: String,
    /// The source commit.
    pub source_commit: String,
    /// The source commit's subject.
    pub subject: String,
    /// The source ref built.
    pub source_ref: Option<String>,
    /// `succeeded`, `failed` or `interrupted`.
    pub status: String,
    /// Boot image size in bytes.
    pub image_size: Option<u64>,
    /// Boot image sha256.
    pub image_sha256: Option<String>,
    /// Commit time, unix seconds.
    pub time: i64,
    /// Whether live names it.
    pub live: bool,
}

/// One deployment in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowView {
    /// The deployment.
    pub deployment: DeploymentView,
    /// Its `revboot.toml`.
    pub manifest: Option<String>,
    /// The labels that name it.
    pub labels: Vec<String>,
}

/// What changed between two deployments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffView {
    /// The older revision.
    pub a: String,
    /// The newer revision.
    pub b: String,
    /// Unified diff of the manifests.
    pub manifest: String,
    /// Image sizes.
    pub image_size: (Option<u64>, Option<u64>),
    /// Whether the images differ.
    pub image_changed: bool,
}

/// A move of the live pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveView {
    /// The service.
    pub service: String,
    /// Where live pointed.
    pub from: Option<DeploymentView>,
    /// Where it points now.
    pub to: DeploymentView,
    /// How the revision passed its health check (or booted warm) before live moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

/// A service's configuration variables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigView {
    /// The service.
    pub service: String,
    /// The variables, by name.
    pub vars: Vec<VarView>,
    /// Instances stopped so that they boot again with the change (`--restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted: Option<usize>,
}

/// One configuration variable.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VarView {
    /// Its name.
    pub name: String,
    /// Its value, when asked for (`--show`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl std::fmt::Debug for VarView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VarView")
            .field("name", &self.name)
            .field("value", &self.value.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The daemon process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonView {
    /// Its pid (the same across upgrades in place).
    pub pid: u32,
    /// The binary it executes at an upgrade.
    pub binary: String,
    /// Upgrades in place since it was started.
    pub upgrades: u64,
    /// When this program started serving, unix ms.
    pub serving_since_ms: u64,
    /// The last upgrade in place, from the request to serving again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upgrade_ms: Option<u64>,
    /// Instances the last upgrade handed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upgrade_instances: Option<usize>,
    /// The TLS certificates it serves or asks for, and how each stands.
    #[serde(default)]
    pub certificates: Vec<CertView>,
}

/// How one certificate stands (`crate::tls`, rule 5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    /// Which certificate: `_daemon` (the daemon's own), or a service's name.
    pub id: String,
    /// Where it comes from: `files` or `acme`.
    pub source: String,
    /// The names it covers (asked for, until one is issued).
    pub names: Vec<String>,
    /// `valid` (served), `pending` (none yet), `failed` (none served, the last try failed).
    pub state: String,
    /// End of validity of the one served, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<i64>,
    /// Certificates issued (or loaded) since the daemon started.
    pub issued: u64,
    /// Failures in a row (0 after a success).
    pub failures: u32,
    /// The last failure, while it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next attempt is due after failures, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<i64>,
    /// Who issued the one served (its issuer's distinguished name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When the one served is renewed (ACME: a third of its lifetime before its end), Unix
    /// milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at_ms: Option<i64>,
}

/// A running (or recently ended) instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The service.
    pub service: String,
    /// The revision.
    pub revision: String,
    /// The client of a per-client instance.
    pub client: Option<String>,
    /// Which replica of its revision (`[run] min_instances`); 0, the first, is left out.
    #[serde(default, skip_serializing_if = "is_first")]
    pub replica: u16,
    /// The service address (the IPv4 one when it has one of each family).
    pub address: String,
    /// Every service address, one per family.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The state.
    pub state: String,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// Open connections through the proxy.
    pub connections: u64,
    /// Connections the kernel handed straight to it while it is ready (none: not steered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered: Option<u64>,
    /// The process the host sees (a process instance's own, a VM's qemu); absent while it
    /// is being started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

fn is_first(replica: &u16) -> bool {
    *replica == 0
}

/// A console record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleView {
    /// The revision.
    pub revision: String,
    /// The client of a per-client instance.
    pub client: Option<String>,
    /// Start, unix milliseconds.
    pub started_at_ms: u64,
    /// Boot to ready.
    pub boot_ms: Option<u64>,
    /// Start to stop.
    pub lifetime_ms: u64,
    /// How it ended.
    pub outcome: String,
    /// The console output.
    pub console: String,
}

/// Where a summoned instance answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummonView {
    /// The revision.
    pub revision: String,
    /// Its DNS name.
    pub dns_name: String,
    /// The service address (the IPv4 one when it has one of each family).
    pub address: String,
    /// Every service address, one per family.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The port.
    pub port: u16,
}

/// The answer to an [`Action`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// A service was created.
    ServiceAdded(ServiceView),
    /// Services.
    Services(Vec<ServiceView>),
    /// A service was deleted.
    ServiceDeleted(DeletedView),
    /// A service was renamed.
    ServiceRenamed(RenamedView),
    /// The daemon that accepted the token.
    Token(TokenView),
    /// History, newest first.
    History(Vec<DeploymentView>),
    /// One deployment.
    Show(Box<ShowView>),
    /// A diff.
    Diff(DiffView),
    /// Live moved.
    Moved(Box<MoveView>),
    /// Instances.
    Instances(Vec<InstanceView>),
    /// An instance was stopped.
    Stopped(InstanceView),
    /// A build log.
    BuildLog(BuildLogView),
    /// Console records, newest first.
    Console(Vec<ConsoleView>),
    /// A summoned instance.
    Summoned(SummonView),
    /// Configuration variables.
    Config(ConfigView),
    /// The daemon (for an upgrade: as it was when the upgrade began).
    Daemon(DaemonView),
    /// Builds, newest first.
    Builds(Vec<BuildView>),
    /// The cluster's nodes.
    Nodes(NodesView),
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesView {
    /// The node that answers (`None`: a single host, no `[cluster]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// True while its membership lease is renewed (false: cut off from etcd, its list may
    /// be stale).
    pub connected: bool,
    /// The live nodes, by id.
    pub nodes: Vec<NodeView>,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its id.
    pub id: String,
    /// Its HTTP base URL (git, API).
    pub http: String,
    /// Its DNS address.
    pub dns: String,
    /// Its service address pools.
    pub pools: Vec<String>,
    /// The instances it holds at most.
    pub capacity: u64,
    /// When it registered (Unix milliseconds).
    pub since_ms: u64,
}

/// A build, queued, running or finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildView {
    /// Its number.
    pub id: u64,
    /// The service.
    pub service: String,
    /// The pushed ref (empty for a build on demand).
    pub source_ref: String,
    /// The source commit.
    pub source_commit: String,
    /// `queued`, `running`, `succeeded`, `failed`, `interrupted` or `superseded`.
    pub state: String,
    /// Queued at, unix milliseconds.
    pub queued_at_ms: u64,
    /// Started at, unix milliseconds.
    pub started_at_ms: Option<u64>,
    /// Finished at, unix milliseconds.
    pub finished_at_ms: Option<u64>,
    /// The deployment commit recording it.
    pub revision: Option<String>,
    /// Whether live moved to it.
    pub made_live: bool,
    /// One line: what happened.
    pub message: Option<String>,
}

/// A build log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogView {
    /// The revision.
    pub revision: String,
    /// `succeeded`, `failed` or `interrupted`.
    pub status: String,
    /// The log text (lossy UTF-8).
    pub log: String,
}

/// Why an action failed. Each kind maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "message", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ActionError {
    /// The request is malformed or a value is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The service, label or instance does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The label is ambiguous.
    #[error("{0}")]
    Ambiguous(String),
    /// The request conflicts with the current state (e.g. the service exists).
    #[error("{0}")]
    Conflict(String),
    /// A request without the right token.
    #[error("{0}")]
    Unauthorized(String),
    /// A limit was reached or the part is not running; try later.
    #[error("{0}")]
    Unavailable(String),
    /// The revision asked for is being built (on demand); ask again shortly.
    #[error("{0}")]
    Building(String),
    /// Something broke inside revboot.
    #[error("{0}")]
    Internal(String),
}

impl ActionError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ActionError::Invalid(_) => 400,
            ActionError::Unauthorized(_) => 401,
            ActionError::NotFound(_) => 404,
            ActionError::Ambiguous(_) | ActionError::Conflict(_) => 409,
            ActionError::Unavailable(_) | ActionError::Building(_) => 503,
            ActionError::Internal(_) => 500,
        }
    }

    /// The process exit code the CLI uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ActionError::Invalid(_) | ActionError::Unauthorized(_) => 2,
            ActionError::NotFound(_) | ActionError::Ambiguous(_) | ActionError::Conflict(_) => 3,
            ActionError::Unavailable(_) | ActionError::Building(_) => 4,
            ActionError::Internal(_) => 1,
        }
    }
}
