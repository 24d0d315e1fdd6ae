//! `[cluster]` of the daemon's configuration.
//!
//! ```toml
//! [cluster]
//! etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
//! node = "n1"          # this node's id: unique in the cluster, a DNS label
//! ttl_s = 5            # the membership lease: a node silent this long is gone
//! prefix = "/revboot"  # optional: the key prefix, default /revboot/<zone>
//! # optional: fetch the others' deployments in the background only this often, in ms,
//! # instead of on every change etcd reports (default); a revision asked of this node
//! # before then is fetched first, when asked
//! replicate_every_ms = 60000
//! ```

use serde::Deserialize;

/// `[cluster]`: absent, the daemon is a single host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd's client URLs (`http://host:port`), at least one.
    pub etcd: Vec<String>,
    /// This node's id.
    pub node: String,
    /// The membership lease's time to live, in seconds.
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    /// The key prefix in etcd (default `/revboot/<zone>`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// How often, in milliseconds, the node fetches the deployments other nodes announced
    /// in the background; absent, it does so on every change etcd reports (and every
    /// second). A node asked by DNS for a revision it has not fetched yet fetches it then.
    #[serde(default)]
    pub replicate_every_ms: Option<u64>,
}

fn default_ttl() -> u64 {
    5
}

/// Why `[cluster]` is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML does not parse or names an unknown key.
    #[error("Invalid [cluster]: {0}")]
    Parse(String),
    /// No etcd endpoint.
    #[error("[cluster] etcd lists no endpoint")]
    NoEndpoint,
    /// An endpoint is not `http://host:port`.
    #[error("[cluster] etcd endpoint `{0}` is not http://host:port")]
    Endpoint(String),
    /// The node id is not a DNS label of lowercase letters, digits and hyphens.
    #[error(
        "[cluster] node `{0}` is not a node id (1 to 63 of a-z, 0-9 and -, not starting or ending with -)"
    )]
    Node(String),
    /// The TTL is out of range.
    #[error("[cluster] ttl_s = {0} is out of range (2..=300)")]
    Ttl(u64),
    /// The prefix is not an absolute key path.
    #[error("[cluster] prefix `{0}` must start with / and not end with /")]
    Prefix(String),
    /// The background replication interval is out of range.
    #[error("[cluster] replicate_every_ms = {0} is out of range (100..=86400000)")]
    ReplicateEvery(u64),
}

impl ClusterConfig {
    /// Parses a `[cluster]` table's body and validates it.
    pub fn from_toml(text: &str) -> Result<ClusterConfig, ConfigError> {
        let config: ClusterConfig =
            toml::from_str(text).map_err(|error| ConfigError::Parse(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd.is_empty() {
            return Err(ConfigError::NoEndpoint);
        }
        for endpoint in &self.etcd {
            let rest = endpoint.strip_prefix("http://").unwrap_or_default();
            let ok = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::Endpoint(endpoint.clone()));
            }
        }
        let id = &self.node;
        let ok = !id.is_empty()
            && id.len() <= 63
            && !id.starts_with('-')
            && !id.ends_with('-')
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(ConfigError::Node(id.clone()));
        }
        if !(2..=300).contains(&self.ttl_s) {
            return Err(ConfigError::Ttl(self.ttl_s));
        }
        if let Some(prefix) = &self.prefix
            && (!prefix.starts_with('/') || prefix.ends_with('/') || prefix.len() < 2)
        {
            return Err(ConfigError::Prefix(prefix.clone()));
        }
        if let Some(every) = self.replicate_every_ms
            && !(100..=86_400_000).contains(&every)
        {
            return Err(ConfigError::ReplicateEvery(every));
        }
        Ok(())
    }

    /// The key prefix for `zone`.
    pub fn prefix_for(&self, zone: &str) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| format!("/revboot/{zone}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_table_parses_with_defaults() {
        let config =
            ClusterConfig::from_toml("etcd = [\"http://127.0.0.1:2379\"]\nnode = \"n1\"\n")
                .expect("valid");
        assert_eq!(config.ttl_s, 5);
        assert_eq!(config.prefix_for("revboot.test"), "/revboot/revboot.test");
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |text: &str| ClusterConfig::from_toml(text).expect_err("invalid");
        assert_eq!(bad("etcd = []\nnode = \"n1\""), ConfigError::NoEndpoint);
        assert!(matches!(
            bad("etcd = [\"127.0.0.1:2379\"]\nnode = \"n1\""),
            ConfigError::Endpoint(_)
        ));
        assert!(matches!(
            bad("etcd = [\"http://127.0.0.1:2379\"]\nnode = \"N 1\""),
            ConfigError::Node(_)
        ));
        assert!(matches!(
            bad("etcd = [\"http://127.0.0.1:2379\"]\nnode = \"n1\"\nttl_s = 1"),
            ConfigError::Ttl(1)
        ));
        assert!(matches!(
            bad("etcd = [\"http://127.0.0.1:2379\"]\nnode = \"n1\"\nnodes = 1"),
            ConfigError::Parse(_)
        ));
        assert_eq!(
            bad("etcd = [\"http://127.0.0.1:2379\"]\nnode = \"n1\"\nreplicate_every_ms = 5"),
            ConfigError::ReplicateEvery(5)
        );
    }
}
