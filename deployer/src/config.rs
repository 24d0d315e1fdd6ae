//! The deployer's configuration: where it keeps state, its address pool, its caps.
//!
//! Every field has a named default; [`DeployerConfig::from_toml`] rejects unknown keys and
//! [`DeployerConfig::validate`] checks the values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use revboot_sandbox::uids::UidRange;
use serde::{Deserialize, Serialize};

/// Default address pool: a /16 inside the loopback network (every 127/8 address is local).
pub const DEFAULT_POOL: &str = "127.77.0.0/16";
/// Default global cap on instances.
pub const DEFAULT_MAX_INSTANCES: usize = 4096;
/// Default cap on instances of one service.
pub const DEFAULT_MAX_PER_SERVICE: usize = 2048;
/// Default cap on client instances of one per-client service.
pub const DEFAULT_MAX_CLIENTS_PER_SERVICE: usize = 256;
/// Default grace between a graceful stop and a kill.
pub const DEFAULT_STOP_GRACE_MS: u64 = 2_000;
/// Default console ring size per instance.
pub const DEFAULT_CONSOLE_BYTES: usize = 64 * 1024;

/// Where the instance's own listening socket is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendPort {
    /// On the service address and the manifest port: clients reach the instance directly
    /// (no handshake proxy in front).
    #[default]
    Same,
    /// On the service address and a port the kernel picks: the handshake proxy listens on
    /// the service address and manifest port and connects to [`crate::Summoned::backend`].
    Ephemeral,
}

/// A network, `address/len`, IPv4 or IPv6: where service addresses come from. Parsed once,
/// from the configuration text, into this form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    /// The network address (no host bits set).
    pub network: IpAddr,
    /// The prefix length: 8..=30 for IPv4, 16..=126 for IPv6.
    pub len: u8,
}

impl Prefix {
    /// Host bits of the family.
    fn bits(&self) -> u32 {
        if self.network.is_ipv4() { 32 } else { 128 }
    }

    /// The number of usable addresses: not the network address, and for IPv4 not the
    /// broadcast address either.
    pub fn size(&self) -> u128 {
        let hosts = 1u128 << (self.bits() - u32::from(self.len));
        if self.network.is_ipv4() {
            hosts - 2
        } else {
            hosts - 1
        }
    }

    /// The `index`th usable address (0-based), if inside the prefix.
    pub fn nth(&self, index: u128) -> Option<IpAddr> {
        if index >= self.size() {
            return None;
        }
        Some(match self.network {
            IpAddr::V4(network) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(network) + 1 + index as u32))
            }
            IpAddr::V6(network) => IpAddr::V6(Ipv6Addr::from(u128::from(network) + 1 + index)),
        })
    }

    /// True if the two prefixes share an address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let (wide, narrow) = if self.len <= other.len {
            (self, other)
        } else {
            (other, self)
        };
        wide.contains(narrow.network)
    }

    /// The address family.
    pub fn family(&self) -> crate::addresses::Family {
        crate::addresses::Family::of(self.network)
    }

    /// True if `address` lies inside the prefix (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, address: IpAddr) -> bool {
        let shift = self.bits() - u32::from(self.len);
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                u32::from(network) >> shift == u32::from(address) >> shift
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                u128::from(network) >> shift == u128::from(address) >> shift
            }
            _ => false,
        }
    }
}

/// Why a text is not a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Not a prefix `address/len` (IPv4 with 8 <= len <= 30, IPv6 with 16 <= len <= 126) \
     without host bits: `{0}`"
)]
pub struct ParsePoolError(String);

impl FromStr for Prefix {
    type Err = ParsePoolError;

    fn from_str(text: &str) -> Result<Prefix, ParsePoolError> {
        let error = || ParsePoolError(text.to_owned());
        let (network, len) = text.split_once('/').ok_or_else(error)?;
        let network: IpAddr = network.parse().map_err(|_| error())?;
        let len: u8 = len.parse().map_err(|_| error())?;
        let lens = if network.is_ipv4() { 8..=30 } else { 16..=126 };
        if !lens.contains(&len) {
            return Err(error());
        }
        let prefix = Prefix { network, len };
        // No host bits: the network address is the prefix's own first address.
        let host_bits = match network {
            IpAddr::V4(v4) => u128::from(u32::from(v4) & (u32::MAX >> len)),
            IpAddr::V6(v6) => u128::from(v6) & (u128::MAX >> len),
        };
        if host_bits != 0 {
            return Err(error());
        }
        Ok(prefix)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How a crash loop backs off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// Consecutive quick crashes before boots are held back (the first crashes reboot at once).
    pub after_crashes: u32,
    /// The first hold-back; doubled for each further crash.
    pub base_ms: u64,
    /// The longest hold-back.
    pub max_ms: u64,
    /// An instance that served this long resets the crash count.
    pub stable_after_ms: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            after_crashes: 3,
            base_ms: 500,
            max_ms: 60_000,
            stable_after_ms: 10_000,
        }
    }
}

impl BackoffConfig {
    /// The hold-back after `crashes` consecutive quick crashes, if any.
    pub fn delay(&self, crashes: u32) -> Option<Duration> {
        if crashes < self.after_crashes.max(1) {
            return None;
        }
        let doublings = (crashes - self.after_crashes.max(1)).min(20);
        let ms = self
            .base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_ms);
        Some(Duration::from_millis(ms))
    }
}

/// Resource limits and sandbox switches of the process tender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// `RLIMIT_NOFILE` of an instance.
    pub nofile: u64,
    /// `RLIMIT_FSIZE` of an instance (largest file it may write), MiB.
    pub file_size_mib: u64,
    /// Kill instances when the daemon dies (`PR_SET_PDEATHSIG`); a restarted daemon cleans
    /// up whatever survived either way.
    pub die_with_daemon: bool,
    /// Size of an instance's writable root (a tmpfs: its scratch space and its quota), MiB.
    /// It is memory: what an instance writes there counts against its memory limit too.
    pub scratch_mib: u64,
    /// Files and directories an instance's root may hold.
    pub scratch_inodes: u64,
    /// Host uids instances run as, one per instance (none of the host's accounts may use
    /// them; uid `n` runs with gid `n`).
    pub uids: UidRange,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            nofile: 1024,
            file_size_mib: 256,
            die_with_daemon: true,
            scratch_mib: 16,
            scratch_inodes: 4096,
            uids: UidRange::DEFAULT,
        }
    }
}

/// The deployer's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployerConfig {
    /// Where the deployer keeps its database, image cache and scratch directories.
    pub state_dir: PathBuf,
    /// Name of this deployer's cgroups (`<controller>/revboot/<name>/<instance>`); two
    /// deployers on one host need different names.
    #[serde(default = "default_name")]
    pub name: String,
    /// Service addresses are taken from these prefixes (IPv4, IPv6 or both; an instance
    /// gets one address per family its service asks for). Each must be routed to the host
    /// and local (a `local` route, as `127.0.0.0/8` is; see [`crate::local_routes`]).
    #[serde(
        default = "default_pools",
        alias = "pool",
        deserialize_with = "one_or_many"
    )]
    pub pools: Vec<Prefix>,
    /// How many leading bits of a source address name one client of a per-client service.
    #[serde(default)]
    pub client_prefixes: crate::addresses::ClientPrefixes,
    /// Where an instance's own socket is bound.
    #[serde(default)]
    pub backend_port: BackendPort,
    /// Hand new connections to a ready instance's service address straight to its own
    /// socket in the kernel (`sk_lookup`, see [`crate::steer`]) instead of relaying them
    /// through the proxy; without root or BPF the deployer says so once and relays.
    #[serde(default = "default_steer")]
    pub steer: bool,
    /// Global cap on instances.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// Cap on instances of one service.
    #[serde(default = "default_max_per_service")]
    pub max_per_service: usize,
    /// Cap on client instances of one per-client service. When it is reached, a new client
    /// takes the slot of the client instance quiet longest with no connection open.
    #[serde(default = "default_max_clients")]
    pub max_clients_per_service: usize,
    /// Grace between a graceful stop and a kill.
    #[serde(default = "default_stop_grace")]
    pub stop_grace_ms: u64,
    /// Replaces every manifest's idle timeout (tests, demos).
    #[serde(default)]
    pub idle_timeout_override_ms: Option<u64>,
    /// Console bytes kept per instance (the tail written back to the store).
    #[serde(default = "default_console_bytes")]
    pub console_bytes: usize,
    /// Crash-loop back-off.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Process-tender sandbox settings.
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

fn default_name() -> String {
    "default".to_owned()
}
fn default_pools() -> Vec<Prefix> {
    vec![DEFAULT_POOL.parse().expect("the default pool parses")]
}

/// `pools` as a list, or (as `pool`) one prefix.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Prefix>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Prefix),
        Many(Vec<Prefix>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(prefix) => vec![prefix],
        OneOrMany::Many(prefixes) => prefixes,
    })
}
fn default_steer() -> bool {
    true
}
fn default_max_instances() -> usize {
    DEFAULT_MAX_INSTANCES
}
fn default_max_per_service() -> usize {
    DEFAULT_MAX_PER_SERVICE
}
fn default_max_clients() -> usize {
    DEFAULT_MAX_CLIENTS_PER_SERVICE
}
fn default_stop_grace() -> u64 {
    DEFAULT_STOP_GRACE_MS
}
fn default_console_bytes() -> usize {
    DEFAULT_CONSOLE_BYTES
}

/// At least one pool, at most 16, none overlapping another.
fn check_pools(pools: &[Prefix]) -> Result<(), String> {
    if pools.is_empty() || pools.len() > 16 {
        return Err("between 1 and 16 prefixes".into());
    }
    for (index, pool) in pools.iter().enumerate() {
        if let Some(other) = pools[..index].iter().find(|other| other.overlaps(pool)) {
            return Err(format!("{pool} overlaps {other}"));
        }
    }
    Ok(())
}

/// Why a configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML did not parse or has an unknown key (the message names it).
    #[error("Deployer configuration: {0}")]
    Syntax(String),
    /// A value is out of range.
    #[error("Deployer configuration: `{key}`: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl DeployerConfig {
    /// A configuration with every default, keeping state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> DeployerConfig {
        DeployerConfig {
            state_dir: state_dir.into(),
            name: default_name(),
            pools: default_pools(),
            client_prefixes: crate::addresses::ClientPrefixes::default(),
            backend_port: BackendPort::default(),
            steer: true,
            max_instances: DEFAULT_MAX_INSTANCES,
            max_per_service: DEFAULT_MAX_PER_SERVICE,
            max_clients_per_service: DEFAULT_MAX_CLIENTS_PER_SERVICE,
            stop_grace_ms: DEFAULT_STOP_GRACE_MS,
            idle_timeout_override_ms: None,
            console_bytes: DEFAULT_CONSOLE_BYTES,
            backoff: BackoffConfig::default(),
            sandbox: SandboxConfig::default(),
        }
    }

    /// Parses and validates a configuration.
    pub fn from_toml(text: &str) -> Result<DeployerConfig, ConfigError> {
        let config: DeployerConfig =
            toml_from_str(text).map_err(|message| ConfigError::Syntax(message.trim().into()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return invalid("name", "1 to 64 of [A-Za-z0-9_-]");
        }
        if let Err(message) = check_pools(&self.pools) {
            return invalid("pools", &message);
        }
        let families = self.pools.iter().map(Prefix::family);
        if self.backend_port == BackendPort::Same && families.clone().min() != families.max() {
            return invalid(
                "pools",
                "an instance reached on its own socket (no proxy in front) has one address: \
                 pools of one address family only",
            );
        }
        if let Err(message) = self.client_prefixes.validate() {
            return invalid("client_prefixes", &message);
        }
        if self.max_instances == 0 || self.max_instances > 100_000 {
            return invalid("max_instances", "must be between 1 and 100000");
        }
        if self.max_per_service == 0 {
            return invalid("max_per_service", "must be at least 1");
        }
        if self.max_clients_per_service == 0 {
            return invalid("max_clients_per_service", "must be at least 1");
        }
        if self.stop_grace_ms > 600_000 {
            return invalid("stop_grace_ms", "must be at most 600000");
        }
        if self.idle_timeout_override_ms == Some(0) {
            return invalid("idle_timeout_override_ms", "must be at least 1");
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.console_bytes) {
            return invalid("console_bytes", "must be between 1024 and 16777216");
        }
        if self.backoff.base_ms == 0 || self.backoff.max_ms < self.backoff.base_ms {
            return invalid("backoff", "need 0 < base_ms <= max_ms");
        }
        if !(16..=1_048_576).contains(&self.sandbox.nofile) {
            return invalid("sandbox.nofile", "must be between 16 and 1048576");
        }
        if !(1..=64 * 1024).contains(&self.sandbox.scratch_mib) {
            return invalid("sandbox.scratch_mib", "must be between 1 and 65536");
        }
        if !(16..=1 << 24).contains(&self.sandbox.scratch_inodes) {
            return invalid("sandbox.scratch_inodes", "must be between 16 and 16777216");
        }
        if let Err(message) = self.sandbox.uids.validate() {
            return invalid("sandbox.uids", &message);
        }
        if (self.sandbox.uids.count as usize) < self.max_instances {
            return invalid(
                "sandbox.uids",
                "holds fewer uids than max_instances: every instance needs its own",
            );
        }
        Ok(())
    }

    /// The grace between a graceful stop and a kill.
    pub fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.stop_grace_ms)
    }
}

fn toml_from_str(text: &str) -> Result<DeployerConfig, String> {
    toml::from_str(text).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_parses_and_counts() {
        let pool: Prefix = "127.77.0.0/16".parse().expect("valid");
        assert_eq!(pool.size(), 65_534);
        assert_eq!(pool.nth(0), Some(IpAddr::from([127, 77, 0, 1])));
        assert_eq!(pool.nth(65_533), Some(IpAddr::from([127, 77, 255, 254])));
        assert_eq!(pool.nth(65_534), None);
        assert!(pool.contains(IpAddr::from([127, 77, 3, 4])));
        assert!(!pool.contains(IpAddr::from([127, 78, 0, 1])));
        assert_eq!(pool.to_string(), "127.77.0.0/16");
        for bad in [
            "127.77.0.1/16",
            "127.77.0.0/31",
            "127.77.0.0",
            "2001:db8::1/64",
            "::/8",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        let v6: Prefix = "2001:db8:1::/64".parse().expect("an IPv6 prefix");
        assert_eq!(v6.size(), (1u128 << 64) - 1);
        assert_eq!(v6.nth(0), Some("2001:db8:1::1".parse().expect("ip")));
        assert!(v6.contains("2001:db8:1::ffff".parse().expect("ip")));
        let mut config = DeployerConfig::new("/x");
        config.pools = vec![v6, "203.0.113.16/28".parse().expect("v4")];
        let error = config
            .validate()
            .expect_err("two families, no proxy in front");
        assert!(error.to_string().contains("one address family"), "{error}");
        config.backend_port = BackendPort::Ephemeral;
        config
            .validate()
            .expect("an IPv6 and an IPv4 pool behind the proxy");
        config
            .pools
            .push("2001:db8:1:0:8000::/80".parse().expect("inside the /64"));
        let error = config.validate().expect_err("overlap");
        assert!(
            error.to_string().contains("overlaps 2001:db8:1::/64"),
            "{error}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let error =
            DeployerConfig::from_toml("state_dir = \"/x\"\nmax_instancs = 3\n").expect_err("typo");
        assert!(error.to_string().contains("max_instancs"), "{error}");
    }

    #[test]
    fn defaults_validate_and_bad_values_do_not() {
        let config = DeployerConfig::from_toml("state_dir = \"/x\"\n").expect("valid");
        assert_eq!(config, DeployerConfig::new("/x"));
        // `pool`, one prefix, is read as `pools`.
        let config = DeployerConfig::from_toml("state_dir = \"/x\"\npool = \"192.0.2.0/24\"\n")
            .expect("one pool");
        assert_eq!(config.pools, ["192.0.2.0/24".parse().expect("prefix")]);
        let error =
            DeployerConfig::from_toml("state_dir = \"/x\"\npools = []\n").expect_err("no pool");
        assert!(error.to_string().contains("pools"), "{error}");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let backoff = BackoffConfig {
            after_crashes: 2,
            base_ms: 100,
            max_ms: 350,
            stable_after_ms: 1,
        };
        assert_eq!(backoff.delay(1), None);
        assert_eq!(backoff.delay(2), Some(Duration::from_millis(100)));
        assert_eq!(backoff.delay(3), Some(Duration::from_millis(200)));
        assert_eq!(backoff.delay(4), Some(Duration::from_millis(350)));
        assert_eq!(backoff.delay(40), Some(Duration::from_millis(350)));
    }
}
