//! The daemon's configuration: `revbootd.toml`.
//!
//! The file is named so that it cannot be confused with a service's `revboot.toml`. Every
//! key has a named default, so an empty file (or no file) is a working local setup; CLI flags
//! override the file. A typo is an error that names the key and line.
//!
//! ```toml
//! data = "./revboot-data"
//! zone = "revboot.test"
//!
//! [dns]
//! listen = "127.0.0.1:5353"
//! ttl_secs = 1
//!
//! [http]
//! listen = "127.0.0.1:8080"
//! token = "change-me"        # pushes, the API, metrics, fetches; default: generated into the data dir
//! public_reads = false       # true: API reads, /metrics and git fetch without the token
//!
//! [instances]
//! pools = ["127.77.0.0/16"]  # IPv4 and/or IPv6 prefixes routed to this host
//! client_prefixes = { ipv4 = 32, ipv6 = 64 }  # one client of a per-client service
//! max_total = 256
//! max_per_service = 64
//!
//! [front]                    # the shared front door; none by default
//! http = "127.0.0.1:8000"    # routes by the HTTP Host header
//! tls = "127.0.0.1:8443"     # routes by the TLS server name; TLS ends at the instance, or
//!                            # here for services with `tls = "terminate"` (certificates
//!                            # from [acme] or from files, [tls.services.<name>])
//! ```
//!
//! `[tls]` (HTTPS) and `[acme]` (certificates by DNS-01) are described in
//! [`crate::tls::config`]; `[cluster]` (several hosts, one zone, on etcd) in
//! [`revboot_cluster::ClusterConfig`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default name of the daemon configuration file.
pub const FILE_NAME: &str = "revbootd.toml";

/// Where the daemon configuration is looked for when the current directory has no
/// [`FILE_NAME`] and none is named (`--config`): the place packages install it.
pub const SYSTEM_FILE: &str = "/etc/revboot/revbootd.toml";

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The data directory: repositories, state, caches.
    pub data: PathBuf,
    /// The DNS zone revboot is authoritative for.
    pub zone: String,
    /// The DNS server.
    pub dns: Dns,
    /// The HTTP server: git smart HTTP, the API, metrics.
    pub http: Http,
    /// Instances and their limits.
    pub instances: Instances,
    /// Builds.
    pub builds: Builds,
    /// The shared front door.
    pub front: Front,
    /// The process sandbox of instances: scratch quota, uids, rlimits.
    pub sandbox: revboot_deployer::SandboxConfig,
    /// HTTPS (`[tls]`, see [`crate::tls::config`]).
    pub tls: crate::tls::config::Tls,
    /// Certificates by ACME (`[acme]`, see [`crate::tls::config`]).
    pub acme: crate::tls::config::Acme,
    /// Several hosts serving one zone, coordinated through etcd (`[cluster]`, see
    /// [`revboot_cluster::ClusterConfig`]); absent: a single host.
    pub cluster: Option<revboot_cluster::ClusterConfig>,
}

/// `[dns]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dns {
    /// UDP and TCP addresses to serve on (one, or a list: port 53 of each address the
    /// zone's delegation names).
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// TTL of instance answers.
    pub ttl_secs: u32,
    /// Delay answers until the instance is ready (for setups without the proxy).
    pub delayed_answers: bool,
    /// Trust EDNS Client Subnet to pick per-client instances.
    pub trust_ecs: bool,
    /// Queries that may summon (boot) instances, per second per client prefix.
    pub boots_per_second: u32,
    /// Burst allowance of `boots_per_second`.
    pub boot_burst: u32,
    /// Responses per second per client prefix over UDP (0: no limit).
    pub responses_per_second: u32,
    /// TCP connections open at once; past it, a newcomer closes the connection idle longest.
    pub max_tcp_connections: usize,
    /// TCP connections open at once from one client prefix (/24, /56); past it, a newcomer
    /// closes its prefix's connection idle longest.
    pub max_tcp_per_prefix: usize,
    /// The zone's name servers, published as NS at the apex, with their addresses as glue.
    /// They must agree with the NS and glue records of the parent zone's delegation. Empty:
    /// one, `ns.<zone>`, at the listen address, which is only right on loopback: DNS that
    /// listens beyond loopback needs them named. In a cluster, empty means every live node,
    /// `<id>.ns.<zone>` at its listen addresses (when they are not wildcards).
    pub nameservers: Vec<Nameserver>,
}

/// A name server of the zone, `{ name = "ns1.example.com", addresses = ["192.0.2.1",
/// "2001:db8::1"] }` (`address`, one address, reads as a list of one).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nameserver {
    /// Its name.
    pub name: String,
    /// Its addresses (glue, when the name is inside the zone).
    #[serde(default, alias = "address", deserialize_with = "one_or_many")]
    pub addresses: Vec<IpAddr>,
}

/// `[http]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Address to serve on.
    pub listen: SocketAddr,
    /// The token for pushes and API writes (and reads, see `public_reads`); generated into
    /// the data dir when absent.
    pub token: Option<String>,
    /// Reads without the token: the API's GET routes (services, deployments, diffs, build
    /// and console logs, instances with their clients' addresses), `/metrics`, and git
    /// fetch and clone of the source repositories. Off by default: every read needs the
    /// token, as writes do (the OpenAPI document alone is public). `revboot demo` turns it
    /// on for its one user.
    pub public_reads: bool,
    /// Tokens that open the deployment repository only (`/git/-/deploy.git`: fetch, and a
    /// CI's pushes of prebuilt deployments), never sources or the API.
    pub deploy_tokens: Vec<String>,
}

impl std::fmt::Debug for Http {
    // The token stays out: a Debug rendering can end up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("public_reads", &self.public_reads)
            .field("deploy_tokens", &self.deploy_tokens.len())
            .finish()
    }
}

/// `[instances]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Instances {
    /// The pools service addresses come from, as `address/prefix`, IPv4 or IPv6 (an
    /// instance gets one address of each family its service is served on). A prefix outside
    /// `127.0.0.0/8` must be routed to this host; revboot makes it local (a `local` route on
    /// `lo`) at start unless it already is, and removes the route at shutdown. `pool`, one
    /// prefix, is read as a list of one.
    #[serde(alias = "pool", deserialize_with = "one_or_many")]
    pub pools: Vec<revboot_deployer::config::Prefix>,
    /// How many leading bits of a source address make one client of a per-client service
    /// (default: an IPv4 address, an IPv6 /64).
    pub client_prefixes: revboot_deployer::ClientPrefixes,
    /// Cap on running instances.
    pub max_total: usize,
    /// Cap on running instances of one service.
    pub max_per_service: usize,
    /// Cap on per-client instances of one service. When it is reached, a new client takes
    /// the slot of the client instance quiet longest with no connection open (it is
    /// stopped); while every one has a connection open, new clients are refused.
    pub max_clients_per_service: usize,
    /// Tender accelerator for qemu: `auto`, `kvm` or `tcg`.
    pub qemu_accel: revboot_deployer::tender::qemu::AccelChoice,
    /// VM instances start from a snapshot of a ready guest of their revision, saved after
    /// its first cold boot (images must reseed from the seed revboot gives each qemu: see
    /// the qemu tender's docs).
    pub qemu_restore: bool,
    /// qemu processes kept started and waiting for a snapshot (at most 16); 0 starts one
    /// at each restore.
    pub qemu_pool: usize,
    /// Replaces every manifest's idle timeout, in milliseconds (demos, tests).
    pub idle_timeout_ms: Option<u64>,
    /// Clients reach each instance's own socket on its service address, with no handshake
    /// proxy in front: warm traffic costs nothing extra, the kernel's accept queue holds
    /// connections during a boot, and open connections are counted through `sock_diag`
    /// for idle reaping. Per-client admission is then the instance socket's filter; the
    /// proxy's connection metrics, held-connection bounds and early-byte buffering are
    /// not there.
    pub direct: bool,
    /// Behind the proxy, hand each new connection to a ready instance's service address
    /// straight to the instance's socket in the kernel (sk_lookup; needs root), so warm
    /// traffic skips the proxy's relay while the proxy still holds connections during a
    /// boot and refuses other clients of a per-client instance.
    pub steer: bool,
}

/// `[front]`: one shared address that routes connections by name to the services whose
/// manifest says `reach = "front"` or `"both"` (the proxy's front door). No listener is
/// configured by default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Front {
    /// The HTTP listener: routes by the `Host` header of a connection's first request.
    pub http: Option<SocketAddr>,
    /// The TLS listener: routes by the ClientHello's server name and passes the bytes on
    /// untouched (the instance terminates TLS). On the same address as `http`, when both
    /// are set: DNS answers one front door address per family.
    pub tls: Option<SocketAddr>,
    /// Time a connection may take to send its request head or ClientHello, in milliseconds.
    pub head_timeout_ms: u64,
    /// Most bytes of request head or ClientHello read.
    pub max_head_bytes: usize,
    /// Connections still sending their head; more are refused.
    pub max_pending: usize,
    /// How long a connection to a source commit with no deployment yet waits for its build
    /// on demand before it is answered 503, in milliseconds.
    pub build_wait_ms: u64,
}

impl Default for Front {
    fn default() -> Self {
        Front {
            http: None,
            tls: None,
            head_timeout_ms: u64::try_from(revboot_proxy::front::DEFAULT_HEAD_TIMEOUT.as_millis())
                .unwrap_or(u64::MAX),
            max_head_bytes: revboot_proxy::front::DEFAULT_MAX_HEAD,
            max_pending: revboot_proxy::front::DEFAULT_MAX_PENDING,
            build_wait_ms: u64::try_from(revboot_proxy::front::DEFAULT_BUILD_WAIT.as_millis())
                .unwrap_or(u64::MAX),
        }
    }
}

impl Front {
    /// True when a listener is configured.
    pub fn is_open(&self) -> bool {
        self.http.is_some() || self.tls.is_some()
    }
}

/// `[builds]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Builds {
    /// Builds of different services that may run at once; 0 = number of cores.
    pub parallel: usize,
    /// Cap on queued builds.
    pub queue: usize,
    /// The most commits of one push that are built (the newest); older ones are built on
    /// demand. A queue shorter than it bounds it too.
    pub max_commits_per_push: usize,
    /// The build sandbox (`[builds.sandbox]`): uid, memory, pids, disk, read-only paths.
    pub sandbox: revboot_builder::SandboxConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: PathBuf::from("revboot-data"),
            zone: "revboot.test".to_owned(),
            dns: Dns::default(),
            http: Http::default(),
            instances: Instances::default(),
            builds: Builds::default(),
            front: Front::default(),
            sandbox: revboot_deployer::SandboxConfig::default(),
            tls: crate::tls::config::Tls::default(),
            acme: crate::tls::config::Acme::default(),
            cluster: None,
        }
    }
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            listen: vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5353)],
            ttl_secs: 1,
            delayed_answers: false,
            trust_ecs: false,
            boots_per_second: 5,
            boot_burst: 20,
            responses_per_second: 1000,
            max_tcp_connections: revboot_dns::DEFAULT_MAX_TCP_CONNECTIONS,
            max_tcp_per_prefix: revboot_dns::DEFAULT_MAX_TCP_PER_PREFIX,
            nameservers: Vec::new(),
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            token: None,
            public_reads: false,
            deploy_tokens: Vec::new(),
        }
    }
}

impl Default for Instances {
    fn default() -> Self {
        Instances {
            pools: vec![
                revboot_deployer::config::DEFAULT_POOL
                    .parse()
                    .expect("the default pool parses"),
            ],
            client_prefixes: revboot_deployer::ClientPrefixes::default(),
            max_total: 256,
            max_per_service: 64,
            max_clients_per_service: 32,
            qemu_accel: revboot_deployer::tender::qemu::AccelChoice::Auto,
            qemu_restore: true,
            qemu_pool: revboot_deployer::tender::qemu::DEFAULT_POOL,
            idle_timeout_ms: None,
            direct: false,
            steer: true,
        }
    }
}

impl Default for Builds {
    fn default() -> Self {
        Builds {
            parallel: 0,
            queue: 64,
            max_commits_per_push: revboot_builder::BuilderConfig::DEFAULT_MAX_COMMITS_PER_PUSH,
            sandbox: revboot_builder::SandboxConfig::default(),
        }
    }
}

/// A list, or (under the singular key: `pool`, `address`) one value.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
    T::Err: std::fmt::Display,
{
    // A visitor rather than an untagged enum: an untagged enum's error names no variant's
    // reason, and a bad value must be named in the message.
    struct OneOrMany<T>(std::marker::PhantomData<T>);
    impl<'de, T> serde::de::Visitor<'de> for OneOrMany<T>
    where
        T: std::str::FromStr + Deserialize<'de>,
        T::Err: std::fmt::Display,
    {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a value like \"2001:db8:1::/64\" or a list of them")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(vec![text.parse().map_err(E::custom)?])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut values = Vec::new();
            while let Some(value) = seq.next_element()? {
                values.push(value);
            }
            Ok(values)
        }
    }
    deserializer.deserialize_any(OneOrMany(std::marker::PhantomData))
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or has an unknown key.
    #[error("{FILE_NAME}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Syntax {
        /// 1-based line, when known.
        line: Option<usize>,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("{FILE_NAME}: `{key}`: {message}")]
    Invalid {
        /// The dotted key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates configuration text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            line: error
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
            message: error.message().trim().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values the schema cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            key,
            message: message.to_owned(),
        };
        if !is_dns_name(&self.zone) {
            return Err(invalid("zone", "must be a DNS name like `revboot.test`"));
        }
        if let Some(cluster) = &self.cluster {
            cluster
                .validate()
                .map_err(|error| invalid("cluster", &error.to_string()))?;
        }
        let mut deployer = revboot_deployer::DeployerConfig::new(&self.data);
        deployer.pools = self.instances.pools.clone();
        deployer.client_prefixes = self.instances.client_prefixes;
        deployer.backend_port = if self.instances.direct {
            revboot_deployer::BackendPort::Same
        } else {
            revboot_deployer::BackendPort::Ephemeral
        };
        if let Err(revboot_deployer::config::ConfigError::Invalid { key, message }) =
            deployer.validate()
        {
            let key = match key {
                "pools" => "instances.pools",
                "client_prefixes" => "instances.client_prefixes",
                other => other,
            };
            return Err(invalid(key, &message));
        }
        if self.instances.max_total == 0 || self.instances.max_per_service == 0 {
            return Err(invalid("instances.max_total", "caps must be at least 1"));
        }
        if self.instances.max_per_service > self.instances.max_total {
            return Err(invalid(
                "instances.max_per_service",
                "cannot exceed instances.max_total",
            ));
        }
        if self.instances.qemu_pool > revboot_deployer::tender::qemu::MAX_POOL {
            return Err(invalid(
                "instances.qemu_pool",
                &format!(
                    "must be at most {}",
                    revboot_deployer::tender::qemu::MAX_POOL
                ),
            ));
        }
        if self.builds.queue == 0 {
            return Err(invalid("builds.queue", "must be at least 1"));
        }
        if self.builds.max_commits_per_push == 0 {
            return Err(invalid("builds.max_commits_per_push", "must be at least 1"));
        }
        if self.dns.ttl_secs > 86_400 {
            return Err(invalid("dns.ttl_secs", "must be at most 86400"));
        }
        if self.dns.max_tcp_connections == 0 {
            return Err(invalid("dns.max_tcp_connections", "must be at least 1"));
        }
        if self.dns.max_tcp_per_prefix == 0 {
            return Err(invalid("dns.max_tcp_per_prefix", "must be at least 1"));
        }
        if self.dns.listen.is_empty() || self.dns.listen.len() > 16 {
            return Err(invalid("dns.listen", "names 1 to 16 addresses"));
        }
        let beyond = self
            .dns
            .listen
            .iter()
            .any(|listen| !listen.ip().is_loopback());
        // A cluster's nodes publish themselves as the name servers, at their listen
        // addresses (crate::placed::publish_nameservers), when those are their own.
        let published = self.cluster.is_some()
            && (self.dns.listen.iter()).all(|listen| !listen.ip().is_unspecified());
        if beyond && self.dns.nameservers.is_empty() && !published {
            return Err(invalid(
                "dns.nameservers",
                "DNS listens beyond loopback: name the zone's name servers and their \
                 addresses (the NS and glue records of the parent zone's delegation)",
            ));
        }
        let zone = format!(".{}", self.zone.trim_end_matches('.').to_ascii_lowercase());
        if let Some(ns) = self.dns.nameservers.iter().find(|ns| {
            ns.addresses.is_empty()
                && format!(".{}", ns.name.trim_end_matches('.').to_ascii_lowercase())
                    .ends_with(&zone)
        }) {
            return Err(ConfigError::Invalid {
                key: "dns.nameservers",
                message: format!(
                    "{} is inside the zone and needs its addresses (glue)",
                    ns.name
                ),
            });
        }
        self.validate_front()?;
        crate::tls::config::validate(&self.tls, &self.acme, &self.zone).map_err(|invalid| {
            ConfigError::Invalid {
                key: invalid.key,
                message: invalid.message,
            }
        })
    }

    /// `[front]`: one address, outside the pools, with usable bounds.
    fn validate_front(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid { key, message };
        let front = &self.front;
        if let (Some(http), Some(tls)) = (front.http, front.tls)
            && http.ip() != tls.ip()
        {
            return Err(invalid(
                "front.tls",
                format!(
                    "{tls} is not on the front door's address {} (front.http)",
                    http.ip()
                ),
            ));
        }
        for (key, value) in [
            ("front.head_timeout_ms", front.head_timeout_ms as usize),
            ("front.max_head_bytes", front.max_head_bytes),
            ("front.max_pending", front.max_pending),
            ("front.build_wait_ms", front.build_wait_ms as usize),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".to_owned()));
            }
        }
        for (key, address) in [("front.http", front.http), ("front.tls", front.tls)] {
            let Some(address) = address else { continue };
            let pools = &self.instances.pools;
            if let Some(pool) = pools.iter().find(|pool| pool.contains(address.ip())) {
                return Err(invalid(
                    key,
                    format!("{address} is inside the instance pool {pool}"),
                ));
            }
        }
        Ok(())
    }

    /// The most commits of one push that are built: `max_commits_per_push`, bounded by the
    /// queue's length.
    pub fn commits_per_push(&self) -> usize {
        self.builds.max_commits_per_push.min(self.builds.queue)
    }

    /// The number of builds that may run at once.
    pub fn parallel_builds(&self) -> usize {
        match self.builds.parallel {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 200
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file the Debian package installs in /etc/revboot is valid, and differs from the
    /// defaults only in where the data lives.
    #[test]
    fn the_packaged_configuration_is_valid() {
        let config = Config::from_toml(include_str!("../packaging/revbootd.toml"))
            .expect("the packaged configuration parses");
        config.validate().expect("and is valid");
        assert_eq!(config.data, Path::new("/var/lib/revboot"));
        assert_eq!(
            Config {
                data: Config::default().data,
                ..config
            },
            Config::default()
        );
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let config = Config::from_toml("").expect("defaults are valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.dns.listen[0].port(), 5353);
        assert_eq!(config.http.listen.port(), 8080);
        assert_eq!(config.zone, "revboot.test");
    }

    #[test]
    fn typo_names_key_and_line() {
        let error = Config::from_toml("zone = \"a.test\"\n[dns]\nlisen = \"127.0.0.1:53\"\n")
            .expect_err("typo");
        let message = error.to_string();
        assert!(message.contains("lisen"), "{message}");
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn reads_need_the_token_unless_configured() {
        assert!(!Config::default().http.public_reads);
        let open = Config::from_toml("[http]\npublic_reads = true\n").expect("valid");
        assert!(open.http.public_reads);
        // The switch it replaced is an unknown key now, named as such.
        let error = Config::from_toml("[http]\nanonymous_fetch = true\n").expect_err("gone");
        assert!(error.to_string().contains("anonymous_fetch"), "{error}");
    }

    #[test]
    fn typed_settings_are_parsed_once_and_bad_ones_named() {
        let config =
            Config::from_toml("[instances]\npool = \"127.5.0.0/24\"\nqemu_accel = \"tcg\"\n")
                .expect("valid");
        assert_eq!(config.instances.pools[0].to_string(), "127.5.0.0/24");
        assert_eq!(
            config.instances.qemu_accel,
            revboot_deployer::tender::qemu::AccelChoice::Tcg
        );
        let error = Config::from_toml("[instances]\nqemu_accel = \"hvf\"\n").expect_err("accel");
        assert!(error.to_string().contains("hvf"), "{error}");
        let config =
            Config::from_toml("[instances]\nqemu_restore = false\nqemu_pool = 0\n").expect("valid");
        assert!(!config.instances.qemu_restore);
        let error = Config::from_toml("[instances]\nqemu_pool = 17\n").expect_err("pool");
        assert!(error.to_string().contains("instances.qemu_pool"), "{error}");
        let error = Config::from_toml("[instances]\npool = \"127.5.0.1/24\"\n").expect_err("bits");
        assert!(error.to_string().contains("127.5.0.1/24"), "{error}");
    }

    #[test]
    fn a_zone_served_beyond_loopback_names_its_name_servers_with_glue() {
        let config = Config::from_toml(
            "zone = \"example.com\"\n[dns]\nlisten = \"[2001:db8:ff::1]:53\"\n\
             nameservers = [{ name = \"ns1.example.com\", addresses = [\"2001:db8:ff::1\", \"192.0.2.1\"] },\
             { name = \"ns2.example.net\" }, { name = \"ns3.example.com\", address = \"192.0.2.3\" }]\n",
        )
        .expect("valid");
        assert_eq!(config.dns.nameservers[0].addresses.len(), 2);
        assert_eq!(config.dns.nameservers[2].addresses.len(), 1);
        let error = Config::from_toml("[dns]\nlisten = \"192.0.2.1:53\"\n").expect_err("no NS");
        assert!(error.to_string().contains("dns.nameservers"), "{error}");
        let error = Config::from_toml(
            "zone = \"example.com\"\n[dns]\nnameservers = [{ name = \"NS1.Example.com.\" }]\n",
        )
        .expect_err("no glue");
        assert!(error.to_string().contains("NS1.Example.com."), "{error}");
        assert!(error.to_string().contains("glue"), "{error}");
    }

    #[test]
    fn a_cluster_s_nodes_are_its_name_servers_unless_dns_listens_on_a_wildcard() {
        let cluster = "[cluster]\netcd = [\"http://192.0.2.21:2379\"]\nnode = \"n1\"\n";
        Config::from_toml(&format!("[dns]\nlisten = \"192.0.2.11:53\"\n{cluster}"))
            .expect("the node publishes itself");
        let error = Config::from_toml(&format!("[dns]\nlisten = \"0.0.0.0:53\"\n{cluster}"))
            .expect_err("a wildcard names no address");
        assert!(error.to_string().contains("dns.nameservers"), "{error}");
    }

    #[test]
    fn pools_of_both_families_are_read_and_overlaps_refused() {
        let config = Config::from_toml(
            "[instances]\npools = [\"2001:db8:1::/64\", \"203.0.113.16/28\"]\n\
             client_prefixes = { ipv6 = 56 }\n",
        )
        .expect("valid");
        assert_eq!(config.instances.pools.len(), 2);
        assert_eq!(config.instances.client_prefixes.ipv6, 56);
        assert_eq!(config.instances.client_prefixes.ipv4, 32);
        let error =
            Config::from_toml("[instances]\npools = [\"203.0.113.0/24\", \"203.0.113.16/28\"]\n")
                .expect_err("overlap");
        assert!(error.to_string().contains("instances.pools"), "{error}");
        assert!(error.to_string().contains("overlaps"), "{error}");
        let error = Config::from_toml(
            "[instances]\ndirect = true\npools = [\"2001:db8:1::/64\", \"203.0.113.16/28\"]\n",
        )
        .expect_err("direct with two families");
        assert!(error.to_string().contains("one address family"), "{error}");
    }

    #[test]
    fn tcp_connection_bounds_are_read_and_checked() {
        let config = Config::from_toml("[dns]\nmax_tcp_connections = 64\nmax_tcp_per_prefix = 4\n")
            .expect("valid");
        assert_eq!(config.dns.max_tcp_connections, 64);
        assert_eq!(config.dns.max_tcp_per_prefix, 4);
        let error = Config::from_toml("[dns]\nmax_tcp_per_prefix = 0\n").expect_err("zero");
        assert!(
            error.to_string().contains("dns.max_tcp_per_prefix"),
            "{error}"
        );
    }

    #[test]
    fn commits_per_push_fit_the_queue() {
        assert_eq!(Config::default().builds.max_commits_per_push, 50);
        let config = Config::from_toml("[builds]\nmax_commits_per_push = 8\n").expect("valid");
        assert_eq!(config.builds.max_commits_per_push, 8);
        let short = Config::from_toml("[builds]\nqueue = 4\n").expect("valid");
        assert_eq!(short.commits_per_push(), 4);
        let error = Config::from_toml("[builds]\nmax_commits_per_push = 0\n").expect_err("zero");
        assert!(
            error.to_string().contains("builds.max_commits_per_push"),
            "{error}"
        );
    }

    #[test]
    fn the_front_door_is_one_address_outside_the_pools() {
        assert!(!Config::default().front.is_open());
        let config = Config::from_toml(
            "[front]\nhttp = \"127.0.0.1:8000\"\ntls = \"127.0.0.1:8443\"\nhead_timeout_ms = 500\nbuild_wait_ms = 9000\n",
        )
        .expect("valid");
        assert!(config.front.is_open());
        assert_eq!(config.front.head_timeout_ms, 500);
        assert_eq!(config.front.build_wait_ms, 9000);
        let error =
            Config::from_toml("[front]\nhttp = \"127.0.0.1:80\"\ntls = \"127.0.0.2:443\"\n")
                .expect_err("two addresses");
        assert!(error.to_string().contains("front.tls"), "{error}");
        let error = Config::from_toml(
            "[instances]\npool = \"127.77.0.0/16\"\n[front]\nhttp = \"127.77.0.1:80\"\n",
        )
        .expect_err("in the pool");
        assert!(error.to_string().contains("127.77.0.1:80"), "{error}");
        let error = Config::from_toml("[front]\nhtp = \"127.0.0.1:80\"\n").expect_err("typo");
        assert!(error.to_string().contains("htp"), "{error}");
    }

    #[test]
    fn bad_zone_is_refused() {
        assert!(Config::from_toml("zone = \"not a zone\"").is_err());
        assert!(Config::from_toml("zone = \"ok.example\"").is_ok());
    }
}
