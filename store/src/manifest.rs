//! The service manifest, `revboot.toml`: how a service is built and how it runs.
//!
//! The same file is the build recipe at the root of a pushed source commit and the run
//! manifest at the root of a deployment commit (the builder copies it verbatim), so a
//! deployment carries exactly the recipe that produced it.
//!
//! ```toml
//! [build]
//! command = ["cargo", "build", "--release"]   # argv, run without a shell
//! # shell = "make && strip hello"             # a shell string, only when asked for
//! artifacts = ["target/release/hello"]         # stored as image/<file name>
//! timeout_secs = 600
//! network = false          # true: the host's network, to fetch from registries
//!
//! [run]
//! tender = "process"        # or "qemu"
//! port = 8080               # the port clients connect to
//! memory_mib = 64
//! ready = { probe = "tcp" } # "socket" | "tcp" | "http" (path) | "console" (line)
//! idle_timeout_secs = 60
//! per_client = false
//! families = ["ipv4", "ipv6"] # address families to serve on; default: every family the host has a pool for
//! reach = "address"         # "front" (the shared front door) | "both"
//! tls = "passthrough"       # "terminate": the front door ends TLS with the service's certificate
//! upstreams = ["127.0.0.1:9000"]
//! proc = false              # true: a read-only /proc of its own processes
//! min_instances = 0         # N (at most 16): N replicas of the live revision stay booted
//! handoff = false           # true: front-door connections are handed to the instance
//!                           # (REVBOOT_HANDOFF_FD; process tender)
//!
//! [deploy]                  # how a new revision goes live
//! check = { http = "/health", within_ms = 5000 } # or tcp = true, or console = "line"
//!
//! [app]                     # free-form, handed to the instance untouched
//! ```
//!
//! Parsing rejects unknown keys and names the offending key and line; [`Manifest::validate`]
//! checks the values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// The file name of the manifest, at the root of source and deployment commits.
pub const FILE_NAME: &str = "revboot.toml";

/// Default wall-clock limit of a build.
pub const DEFAULT_BUILD_TIMEOUT_SECS: u64 = 600;
/// Default port an instance serves on.
pub const DEFAULT_PORT: u16 = 8080;
/// Default memory limit of an instance.
pub const DEFAULT_MEMORY_MIB: u64 = 64;
/// Default idle timeout before an instance is stopped.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default time an instance has to become ready.
pub const DEFAULT_BOOT_TIMEOUT_MS: u64 = 5_000;
/// Default cap on processes (threads included) inside a process-tender instance.
pub const DEFAULT_PIDS: u64 = 64;
/// Default time a health check has, from the boot of the new revision to its answer.
pub const DEFAULT_CHECK_WITHIN_MS: u64 = 5_000;
/// The most replicas `[run] min_instances` may keep: each is a whole instance.
pub const MAX_REPLICAS: u32 = 16;

/// A parsed `revboot.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// How to build the image.
    pub build: Build,
    /// How to run it.
    #[serde(default)]
    pub run: Run,
    /// How a new revision goes live.
    #[serde(default, skip_serializing_if = "Deploy::is_default")]
    pub deploy: Deploy,
    /// Service-specific settings, passed to the instance untouched.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub app: toml::Table,
}

/// The `[build]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// The build command as an argv, run without a shell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A shell string run with `sh -c`; only used when `command` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Paths (relative to the checkout) of the files that make up the image.
    pub artifacts: Vec<String>,
    /// Wall-clock limit of the whole build.
    #[serde(default = "default_build_timeout")]
    pub timeout_secs: u64,
    /// Extra environment variables for the build (the environment is otherwise clean).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Give the build the host's network (to fetch from registries); off by default: a
    /// build has a network namespace of its own with only loopback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
}

/// Which backend runs the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TenderKind {
    /// A static ELF run as a sandboxed process.
    #[default]
    Process,
    /// A kernel image booted in a qemu microvm.
    Qemu,
}

/// How clients reach a service's revisions: each at a service address of its own, through
/// the daemon's shared front door (routing by HTTP `Host` or TLS server name), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// Each revision (and each client's instance) at an address of its own: DNS answers
    /// it and any TCP protocol works. The default, and the only way without a front door.
    #[default]
    Address,
    /// Through the front door only: DNS answers the front door's address, and the proxy
    /// listens on no address of the instance's own. HTTP/1.x or TLS with a server name.
    /// On a daemon without a front door, served as `address`.
    Front,
    /// Both: DNS answers the revision's own address, and the front door routes its names
    /// too (`curl --resolve` or a name pointed at the front door by another DNS).
    Both,
}

/// Where TLS ends for connections through the front door's TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    /// At the instance: the front door reads the server name and passes the bytes on
    /// untouched. The default.
    #[default]
    Passthrough,
    /// At the front door: it presents the service's certificate (`*.<service>.<zone>`, from
    /// the daemon's ACME), selected by server name, and hands plain TCP to the instance.
    Terminate,
}

impl Tls {
    fn is_default(&self) -> bool {
        *self == Tls::default()
    }
}

impl Reach {
    /// True when the front door routes names of this service.
    pub fn front_door(self) -> bool {
        matches!(self, Reach::Front | Reach::Both)
    }

    /// True when the revision's own address serves it (the proxy listens there).
    pub fn own_address(self) -> bool {
        matches!(self, Reach::Address | Reach::Both)
    }
}

/// How the deployer decides an instance is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "probe", rename_all = "lowercase", deny_unknown_fields)]
pub enum Ready {
    /// Ready as soon as the image is running: the kernel holds connections on the
    /// inherited listening socket until it accepts them.
    #[default]
    Socket,
    /// Ready once a TCP connect to the instance succeeds.
    Tcp,
    /// Ready once `GET path` answers with a 2xx or 3xx status.
    Http {
        /// The path to request.
        path: String,
    },
    /// Ready once the console prints a line containing `line`.
    Console {
        /// The text to wait for.
        line: String,
    },
}

/// An address family a service is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressFamily {
    /// IPv4: an A record.
    Ipv4,
    /// IPv6: an AAAA record.
    Ipv6,
}

/// The `[run]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// The backend.
    #[serde(default)]
    pub tender: TenderKind,
    /// Which artifact (by file name) is the image to boot; default: the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The port clients connect to.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The port the guest listens on inside a VM (qemu); default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_port: Option<u16>,
    /// Arguments passed to the image (argv for a process, kernel command line for a VM).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment for a process instance (otherwise clean).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Memory limit.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// CPU limit in percent of one core.
    #[serde(default = "default_cpu_percent")]
    pub cpu_percent: u32,
    /// Process/thread limit (process tender).
    #[serde(default = "default_pids")]
    pub pids: u64,
    /// Readiness probe.
    #[serde(default)]
    pub ready: Ready,
    /// Time from boot to ready before the boot counts as failed.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_ms: u64,
    /// Stop the instance after this long without connections or queries.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// One instance per client address.
    #[serde(default)]
    pub per_client: bool,
    /// The address families the instance gets a service address of (one each; DNS answers
    /// A for IPv4, AAAA for IPv6). Empty: every family the host has a pool for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<AddressFamily>,
    /// How clients reach the service: its own addresses, the front door, or both.
    #[serde(default)]
    pub reach: Reach,
    /// Where TLS through the front door ends: `passthrough` (the instance) or `terminate`
    /// (the front door, which then relays plain TCP).
    #[serde(default, skip_serializing_if = "Tls::is_default")]
    pub tls: Tls,
    /// Backends the instance may connect to (everything else is forbidden).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<SocketAddr>,
    /// Move the live pointer to a successful build of this recipe.
    #[serde(default = "default_true")]
    pub deploy: bool,
    /// A read-only `/proc` of the instance's own processes (process tender). Off by
    /// default: most images need none, and each one is a file system the kernel keeps
    /// per instance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proc: bool,
    /// Instances of the live revision kept booted whatever the traffic, at most
    /// [`MAX_REPLICAS`]: a warm service, whose first byte is never a cold start. Above 1,
    /// that many replicas of the live revision share its one service address and its
    /// connections. Idle reaping still applies to every other instance.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_instances: u32,
    /// The instance takes connections handed to it (process tender): besides its listening
    /// socket it gets a Unix socket, its descriptor number in `REVBOOT_HANDOFF_FD`, over
    /// which the front door sends each connection it routes to it (one byte, the
    /// connection's descriptor as `SCM_RIGHTS`), untouched: the head it was routed by is
    /// still to be read. The instance then owns the client's socket, and no relay carries
    /// its bytes. Off by default: an image must have the receive loop.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// The `[deploy]` table: how a new revision goes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// A health check the new revision must pass, booted, before live moves to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

impl Deploy {
    fn is_default(&self) -> bool {
        *self == Deploy::default()
    }
}

/// A health check (`[deploy] check`): exactly one of `http`, `tcp` and `console`, which must
/// pass within `within_ms` of the boot of the revision checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// `GET` this path; passes on a 2xx or 3xx status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Passes once a TCP connection is accepted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tcp: bool,
    /// Passes once the console prints a line containing this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// Time from the boot to a passed check.
    #[serde(default = "default_check_within")]
    pub within_ms: u64,
}

/// What a [`Check`] does, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckProbe<'a> {
    /// `GET` the path.
    Http(&'a str),
    /// Connect.
    Tcp,
    /// Wait for the console line.
    Console(&'a str),
}

impl Check {
    /// The probe; `None` when not exactly one is given (validation refuses that).
    pub fn probe(&self) -> Option<CheckProbe<'_>> {
        match (&self.http, self.tcp, &self.console) {
            (Some(path), false, None) => Some(CheckProbe::Http(path)),
            (None, true, None) => Some(CheckProbe::Tcp),
            (None, false, Some(line)) => Some(CheckProbe::Console(line)),
            _ => None,
        }
    }
}

impl std::fmt::Display for CheckProbe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckProbe::Http(path) => write!(f, "http GET {path}"),
            CheckProbe::Tcp => f.write_str("tcp connect"),
            CheckProbe::Console(line) => write!(f, "console line `{line}`"),
        }
    }
}

fn default_check_within() -> u64 {
    DEFAULT_CHECK_WITHIN_MS
}

impl Default for Run {
    fn default() -> Self {
        Run {
            tender: TenderKind::default(),
            image: None,
            port: DEFAULT_PORT,
            guest_port: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpu_percent: default_cpu_percent(),
            pids: DEFAULT_PIDS,
            ready: Ready::default(),
            boot_timeout_ms: DEFAULT_BOOT_TIMEOUT_MS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            per_client: false,
            families: Vec::new(),
            reach: Reach::default(),
            tls: Tls::default(),
            upstreams: Vec::new(),
            deploy: true,
            proc: false,
            min_instances: 0,
            handoff: false,
        }
    }
}

fn default_build_timeout() -> u64 {
    DEFAULT_BUILD_TIMEOUT_SECS
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_cpu_percent() -> u32 {
    100
}
fn default_pids() -> u64 {
    DEFAULT_PIDS
}
fn default_boot_timeout() -> u64 {
    DEFAULT_BOOT_TIMEOUT_MS
}
fn default_idle_timeout() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_true() -> bool {
    true
}

/// Why a manifest was rejected. The message names the key and, where known, the line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// The TOML did not parse or did not fit the schema.
    #[error("{FILE_NAME}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Syntax {
        /// 1-based line of the problem, when the parser knows it.
        line: Option<usize>,
        /// The parser's description, which names the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{FILE_NAME}{}: `{key}`: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        /// The dotted key, e.g. `run.port`.
        key: &'static str,
        /// 1-based line of the key, when it appears in the text.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

impl Manifest {
    /// Parses and validates a manifest.
    pub fn from_toml(text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|error| ManifestError::Syntax {
            line: error.span().map(|span| line_of(text, span.start)),
            message: error.message().trim().to_owned(),
        })?;
        manifest.validate(text)?;
        Ok(manifest)
    }

    /// Serialises the manifest back to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serialises: it has only TOML-safe types")
    }

    /// Checks values that the schema alone cannot; `text` is used to find line numbers.
    pub fn validate(&self, text: &str) -> Result<(), ManifestError> {
        let invalid = |key: &'static str, message: String| ManifestError::Invalid {
            key,
            line: find_key_line(text, key),
            message,
        };
        match (&self.build.command.is_empty(), &self.build.shell) {
            (true, None) => {
                return Err(invalid(
                    "build.command",
                    "missing: give an argv (or `shell` for a shell string)".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(invalid(
                    "build.shell",
                    "give either `command` or `shell`, not both".into(),
                ));
            }
            _ => {}
        }
        if self.build.artifacts.is_empty() {
            return Err(invalid(
                "build.artifacts",
                "at least one artifact is needed".into(),
            ));
        }
        for artifact in &self.build.artifacts {
            if !is_relative_inside(Path::new(artifact)) {
                return Err(invalid(
                    "build.artifacts",
                    format!("`{artifact}` must be a relative path inside the checkout"),
                ));
            }
        }
        let mut names: Vec<&str> = self
            .build
            .artifacts
            .iter()
            .map(|a| artifact_name(a))
            .collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(invalid(
                "build.artifacts",
                format!("two artifacts share the file name `{}`", pair[0]),
            ));
        }
        if self.build.timeout_secs == 0 || self.build.timeout_secs > 24 * 3600 {
            return Err(invalid(
                "build.timeout_secs",
                "must be between 1 and 86400".into(),
            ));
        }
        if let Some(image) = &self.run.image
            && !names.contains(&image.as_str())
        {
            return Err(invalid(
                "run.image",
                format!("`{image}` is not the file name of an artifact"),
            ));
        }
        if self.run.port == 0 {
            return Err(invalid("run.port", "must be between 1 and 65535".into()));
        }
        if self.run.guest_port == Some(0) {
            return Err(invalid(
                "run.guest_port",
                "must be between 1 and 65535".into(),
            ));
        }
        if !(4..=65_536).contains(&self.run.memory_mib) {
            return Err(invalid(
                "run.memory_mib",
                "must be between 4 and 65536".into(),
            ));
        }
        if !(1..=6_400).contains(&self.run.cpu_percent) {
            return Err(invalid(
                "run.cpu_percent",
                "must be between 1 and 6400".into(),
            ));
        }
        if !(1..=4_096).contains(&self.run.pids) {
            return Err(invalid("run.pids", "must be between 1 and 4096".into()));
        }
        if !(1..=600_000).contains(&self.run.boot_timeout_ms) {
            return Err(invalid(
                "run.boot_timeout_ms",
                "must be between 1 and 600000".into(),
            ));
        }
        if !(1..=7 * 24 * 3600).contains(&self.run.idle_timeout_secs) {
            return Err(invalid(
                "run.idle_timeout_secs",
                "must be between 1 and 604800".into(),
            ));
        }
        match &self.run.ready {
            Ready::Http { path } if !path.starts_with('/') => {
                return Err(invalid(
                    "run.ready",
                    format!("http path `{path}` must start with `/`"),
                ));
            }
            Ready::Console { line } if line.is_empty() => {
                return Err(invalid(
                    "run.ready",
                    "console line must not be empty".into(),
                ));
            }
            _ => {}
        }
        let mut families = self.run.families.clone();
        families.sort();
        families.dedup();
        if families.len() != self.run.families.len() {
            return Err(invalid("run.families", "names a family twice".into()));
        }
        if self.run.per_client && self.run.reach.front_door() {
            // The front door shares one address among all clients, so it cannot tell the
            // instance of one client from another's by the address they reached.
            return Err(invalid(
                "run.reach",
                "a per-client service is reached at addresses of its own only: the front \
                 door is shared by every client (use reach = \"address\")"
                    .into(),
            ));
        }
        if self.run.tls == Tls::Terminate && !self.run.reach.front_door() {
            return Err(invalid(
                "run.tls",
                "TLS ends at the front door only: \"terminate\" needs reach = \"front\" or \"both\""
                    .into(),
            ));
        }
        if self.run.handoff && self.run.tender != TenderKind::Process {
            return Err(invalid(
                "run.handoff",
                "connections are handed to process instances only (a VM's are relayed)".into(),
            ));
        }
        if self.run.min_instances > MAX_REPLICAS {
            return Err(invalid(
                "run.min_instances",
                format!("at most {MAX_REPLICAS} replicas of a revision are kept"),
            ));
        }
        if self.run.min_instances > 0 && self.run.per_client {
            return Err(invalid(
                "run.min_instances",
                "a per-client service has no instance to keep warm before its clients come".into(),
            ));
        }
        if let Some(check) = &self.deploy.check {
            match check.probe() {
                None => {
                    return Err(invalid(
                        "deploy.check",
                        "give exactly one of `http = \"/path\"`, `tcp = true`, `console = \"text\"`"
                            .into(),
                    ));
                }
                Some(CheckProbe::Http(path)) if !path.starts_with('/') => {
                    return Err(invalid(
                        "deploy.check",
                        format!("http path `{path}` must start with `/`"),
                    ));
                }
                Some(CheckProbe::Console("")) => {
                    return Err(invalid(
                        "deploy.check",
                        "console text must not be empty".into(),
                    ));
                }
                Some(_) => {}
            }
            if !(1..=600_000).contains(&check.within_ms) {
                return Err(invalid(
                    "deploy.check",
                    "within_ms must be between 1 and 600000".into(),
                ));
            }
            if self.run.per_client {
                return Err(invalid(
                    "deploy.check",
                    "a per-client service cannot be checked before a client comes".into(),
                ));
            }
        }
        if let Some(upstream) = self.run.upstreams.iter().find(|u| !u.ip().is_loopback()) {
            return Err(invalid(
                "run.upstreams",
                format!("{upstream} is not a loopback address"),
            ));
        }
        Ok(())
    }

    /// The file name (under `image/`) of the image to boot.
    pub fn boot_image(&self) -> &str {
        match &self.run.image {
            Some(image) => image,
            None => artifact_name(
                self.build
                    .artifacts
                    .first()
                    .expect("validated manifests have at least one artifact"),
            ),
        }
    }
}

/// The file name an artifact is stored under in `image/`.
pub fn artifact_name(artifact: &str) -> &str {
    artifact.rsplit('/').next().unwrap_or(artifact)
}

fn is_relative_inside(path: &Path) -> bool {
    !path.as_os_str().is_empty()
        && path
            .components()
            .all(|component| matches!(component, Component::Normal(_) | Component::CurDir))
        && path
            .components()
            .any(|component| matches!(component, Component::Normal(_)))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds the line where the last segment of a dotted key is assigned, inside its table.
fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = dotted.rsplit_once('.')?;
    let mut in_table = false;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_table = trimmed.trim_matches(|c| c == '[' || c == ']').trim() == table;
            continue;
        }
        if in_table && trimmed.split('=').next().map(str::trim) == Some(key) {
            return Some(index + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
[build]
command = ["cargo", "build", "--release"]
artifacts = ["target/release/hello"]

[run]
port = 8080
ready = { probe = "http", path = "/" }
"#;

    #[test]
    fn parses_with_defaults() {
        let manifest = Manifest::from_toml(HELLO).expect("valid");
        assert_eq!(manifest.build.timeout_secs, DEFAULT_BUILD_TIMEOUT_SECS);
        assert_eq!(manifest.run.tender, TenderKind::Process);
        assert_eq!(manifest.run.ready, Ready::Http { path: "/".into() });
        assert_eq!(manifest.boot_image(), "hello");
        assert!(manifest.run.deploy);
    }

    #[test]
    fn round_trips() {
        let manifest = Manifest::from_toml(HELLO).expect("valid");
        assert_eq!(
            Manifest::from_toml(&manifest.to_toml()).expect("valid"),
            manifest
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "[build]\ncommand = [\"true\"]\nartifacts = [\"a\"]\n\n[run]\nprot = 80\n";
        let error = Manifest::from_toml(text).expect_err("typo");
        let message = error.to_string();
        assert!(message.contains("prot"), "{message}");
        assert!(message.contains("line 6"), "{message}");
    }

    #[test]
    fn invalid_value_names_key_and_line() {
        let text = "[build]\ncommand = [\"true\"]\nartifacts = [\"a\"]\n[run]\nmemory_mib = 1\n";
        let error = Manifest::from_toml(text).expect_err("too small");
        assert_eq!(
            error,
            ManifestError::Invalid {
                key: "run.memory_mib",
                line: Some(5),
                message: "must be between 4 and 65536".into()
            }
        );
    }

    #[test]
    fn rejects_artifact_outside_checkout() {
        let text = "[build]\ncommand = [\"true\"]\nartifacts = [\"../etc/passwd\"]\n";
        let error = Manifest::from_toml(text).expect_err("escapes");
        assert!(error.to_string().contains("build.artifacts"), "{error}");
    }

    #[test]
    fn rejects_non_loopback_upstream() {
        let text = "[build]\ncommand = [\"true\"]\nartifacts = [\"a\"]\n[run]\nupstreams = [\"10.0.0.1:80\"]\n";
        let error = Manifest::from_toml(text).expect_err("not loopback");
        assert!(error.to_string().contains("run.upstreams"), "{error}");
    }

    #[test]
    fn families_are_named_once_each() {
        let head = "[build]\ncommand = [\"true\"]\nartifacts = [\"a\"]\n[run]\n";
        let both =
            Manifest::from_toml(&format!("{head}families = [\"ipv6\", \"ipv4\"]\n")).expect("both");
        assert_eq!(
            both.run.families,
            [AddressFamily::Ipv6, AddressFamily::Ipv4]
        );
        let error = Manifest::from_toml(&format!("{head}families = [\"ipv6\", \"ipv6\"]\n"))
            .expect_err("twice");
        assert!(error.to_string().contains("run.families"), "{error}");
        let error =
            Manifest::from_toml(&format!("{head}families = [\"ipx\"]\n")).expect_err("unknown");
        assert!(error.to_string().contains("ipx"), "{error}");
    }

    #[test]
    fn reach_defaults_to_own_addresses_and_a_wrong_value_names_the_choices() {
        let manifest = Manifest::from_toml(HELLO).expect("valid");
        assert_eq!(manifest.run.reach, Reach::Address);
        let front = format!("{HELLO}reach = \"front\"\n");
        let manifest = Manifest::from_toml(&front).expect("valid");
        assert_eq!(manifest.run.reach, Reach::Front);
        assert!(manifest.run.reach.front_door() && !manifest.run.reach.own_address());
        let typo =
            "[build]\ncommand = [\"true\"]\nartifacts = [\"a\"]\n[run]\nreach = \"frontdoor\"\n";
        let error = Manifest::from_toml(typo).expect_err("unknown value");
        let message = error.to_string();
        assert!(message.contains("line 5"), "{message}");
        assert!(message.contains("frontdoor"), "{message}");
        assert!(
            ["address", "front", "both"]
                .iter()
                .all(|choice| message.contains(choice)),
            "{message}"
        );
    }

    #[test]
    fn tls_ends_at_the_front_door_only_for_services_reached_there() {
        let terminate = format!("{HELLO}reach = \"front\"\ntls = \"terminate\"\n");
        let manifest = Manifest::from_toml(&terminate).expect("valid");
        assert_eq!(manifest.run.tls, Tls::Terminate);
        assert_eq!(
            Manifest::from_toml(HELLO).expect("valid").run.tls,
            Tls::Passthrough
        );
        let own = format!("{HELLO}tls = \"terminate\"\n");
        let message = Manifest::from_toml(&own)
            .expect_err("no front door")
            .to_string();
        assert!(message.contains("run.tls"), "{message}");
    }

    #[test]
    fn per_client_services_are_refused_the_front_door() {
        for reach in ["front", "both"] {
            let text = format!("{HELLO}per_client = true\nreach = \"{reach}\"\n");
            let error = Manifest::from_toml(&text).expect_err("per-client behind the front door");
            let message = error.to_string();
            assert!(message.contains("run.reach"), "{message}");
            assert!(message.contains("per-client"), "{message}");
        }
        let own = format!("{HELLO}per_client = true\nreach = \"address\"\n");
        assert!(Manifest::from_toml(&own).is_ok());
    }

    #[test]
    fn health_check_and_warm_instances() {
        let text = format!(
            "{HELLO}min_instances = 1\n[deploy]\ncheck = {{ http = \"/health\", within_ms = 2000 }}\n"
        );
        let manifest = Manifest::from_toml(&text).expect("valid");
        assert_eq!(manifest.run.min_instances, 1);
        let check = manifest.deploy.check.as_ref().expect("a check");
        assert_eq!(check.probe(), Some(CheckProbe::Http("/health")));
        assert_eq!(check.within_ms, 2000);
        assert_eq!(
            Manifest::from_toml(&manifest.to_toml()).expect("round trip"),
            manifest
        );
        let tcp = format!("{HELLO}[deploy]\ncheck = {{ tcp = true }}\n");
        let tcp = Manifest::from_toml(&tcp).expect("valid");
        let check = tcp.deploy.check.expect("a check");
        assert_eq!(
            (check.probe(), check.within_ms),
            (Some(CheckProbe::Tcp), DEFAULT_CHECK_WITHIN_MS)
        );
        for bad in [
            "[deploy]\ncheck = { http = \"/a\", tcp = true }\n",
            "[deploy]\ncheck = { within_ms = 10 }\n",
            "[deploy]\ncheck = { http = \"health\" }\n",
            "[deploy]\ncheck = { console = \"\" }\n",
            "[deploy]\ncheck = { tcp = true, within_ms = 0 }\n",
        ] {
            let error = Manifest::from_toml(&format!("{HELLO}{bad}")).expect_err(bad);
            assert!(error.to_string().contains("deploy.check"), "{bad}: {error}");
        }
        let handoff = Manifest::from_toml(&format!("{HELLO}handoff = true\n")).expect("valid");
        assert!(handoff.run.handoff);
        let error = Manifest::from_toml(&format!(
            "{HELLO}handoff = true\ntender = \"qemu\"\nguest_port = 8080\n"
        ))
        .expect_err("process only");
        assert!(error.to_string().contains("run.handoff"), "{error}");
        for n in [3, MAX_REPLICAS] {
            let manifest = Manifest::from_toml(&format!("{HELLO}min_instances = {n}\n"));
            assert_eq!(manifest.expect("valid").run.min_instances, n);
        }
        let error = Manifest::from_toml(&format!("{HELLO}min_instances = 100\n")).expect_err("100");
        assert!(error.to_string().contains("at most 16 replicas"), "{error}");
        let error = Manifest::from_toml(&format!("{HELLO}per_client = true\nmin_instances = 1\n"))
            .expect_err("per client");
        assert!(error.to_string().contains("run.min_instances"), "{error}");
    }

    #[test]
    fn command_or_shell() {
        let neither = "[build]\nartifacts = [\"a\"]\n";
        assert!(Manifest::from_toml(neither).is_err());
        let both = "[build]\ncommand = [\"x\"]\nshell = \"x\"\nartifacts = [\"a\"]\n";
        assert!(Manifest::from_toml(both).is_err());
        let shell = "[build]\nshell = \"make\"\nartifacts = [\"a\"]\n";
        assert!(Manifest::from_toml(shell).is_ok());
    }
}
