//! How the proxy is tuned: bounds and timeouts, each with a named default.

use std::time::Duration;

/// Default bound on early client bytes buffered per held connection (64 KiB).
pub const DEFAULT_EARLY_BYTES: usize = 64 * 1024;
/// Default bound on connections held (waiting for a boot) per instance.
pub const DEFAULT_MAX_HELD_PER_INSTANCE: usize = 1024;
/// Default bound on connections held over all instances.
pub const DEFAULT_MAX_HELD: usize = 4096;
/// Default bound on open client connections (held or spliced) over all instances.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
/// Default bound on listening sockets (one per service address and port).
pub const DEFAULT_MAX_LISTENERS: usize = 4096;
/// Default listen backlog of each listener: a burst of this many simultaneous connects is
/// queued by the kernel until the accept loop takes it.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Default time a connect to a ready backend may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a spliced connection may stay silent in both directions.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default total lifetime of a spliced connection.
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Default size of each of the two copy buffers of a spliced connection.
pub const DEFAULT_SPLICE_BUFFER: usize = 64 * 1024;
/// Default choice of splice(2) over copying (see `bench/proxy.sh`).
pub const DEFAULT_ZERO_COPY: bool = false;
/// Default bound on pipes held for splice(2) at once (two descriptors each).
pub const DEFAULT_MAX_PIPES: usize = 1024;
/// Default period of the sweep that closes listeners whose address was released.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The proxy's bounds and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Early client bytes buffered per held connection; past it the proxy stops reading and
    /// the kernel's receive window holds the rest.
    pub early_bytes: usize,
    /// Connections held per instance while it boots; more are refused with a reset.
    pub max_held_per_instance: usize,
    /// Connections held over all instances; more are refused with a reset.
    pub max_held: usize,
    /// Open client connections over all instances; more are refused with a reset.
    pub max_connections: usize,
    /// Listening sockets; a summon that would need more fails.
    pub max_listeners: usize,
    /// Listen backlog of each listener.
    pub backlog: u32,
    /// Time a connect to a ready backend may take (connection refusals are retried within
    /// it, for a backend that reports ready a moment before it accepts).
    pub connect_timeout: Duration,
    /// A spliced connection silent in both directions for this long is closed; `None` never.
    pub idle_timeout: Option<Duration>,
    /// A spliced connection is closed after this long, busy or not; `None` never.
    pub total_timeout: Option<Duration>,
    /// Size of each of the two copy buffers of a spliced connection (when not zero-copy).
    pub splice_buffer: usize,
    /// Move bulk transfers with splice(2) through a pipe per direction instead of copying
    /// them through user space (two descriptors per pipe, at most `max_pipes` pipes; a
    /// direction that cannot have one keeps copying).
    pub zero_copy: bool,
    /// Pipes held for splice(2) at once, over all connections (one per direction moving a
    /// bulk transfer); a direction that finds none left keeps copying.
    pub max_pipes: usize,
    /// Period of the sweep that closes listeners of released addresses.
    pub sweep_interval: Duration,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            early_bytes: DEFAULT_EARLY_BYTES,
            max_held_per_instance: DEFAULT_MAX_HELD_PER_INSTANCE,
            max_held: DEFAULT_MAX_HELD,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_listeners: DEFAULT_MAX_LISTENERS,
            backlog: DEFAULT_BACKLOG,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            total_timeout: Some(DEFAULT_TOTAL_TIMEOUT),
            splice_buffer: DEFAULT_SPLICE_BUFFER,
            zero_copy: DEFAULT_ZERO_COPY,
            max_pipes: DEFAULT_MAX_PIPES,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }
}

/// Why a [`ProxyConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A bound is zero, so the proxy could never serve.
    #[error("Proxy setting `{0}` must be at least 1")]
    Zero(&'static str),
    /// A duration is zero.
    #[error("Proxy setting `{0}` must be longer than zero")]
    ZeroDuration(&'static str),
    /// The held bound exceeds the open-connection bound, which also counts held connections.
    #[error("Proxy setting `max_held` ({held}) exceeds `max_connections` ({connections})")]
    HeldOverConnections {
        /// `max_held`.
        held: usize,
        /// `max_connections`.
        connections: usize,
    },
}

impl ProxyConfig {
    /// Checks that every bound can be met.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("max_held_per_instance", self.max_held_per_instance),
            ("max_held", self.max_held),
            ("max_connections", self.max_connections),
            ("max_listeners", self.max_listeners),
            ("backlog", self.backlog as usize),
            ("splice_buffer", self.splice_buffer),
            ("max_pipes", self.max_pipes),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Zero(name));
        }
        let durations = [
            ("connect_timeout", Some(self.connect_timeout)),
            ("idle_timeout", self.idle_timeout),
            ("total_timeout", self.total_timeout),
            ("sweep_interval", Some(self.sweep_interval)),
        ];
        if let Some((name, _)) = durations
            .iter()
            .find(|(_, value)| *value == Some(Duration::ZERO))
        {
            return Err(ConfigError::ZeroDuration(name));
        }
        if self.max_held > self.max_connections {
            return Err(ConfigError::HeldOverConnections {
                held: self.max_held,
                connections: self.max_connections,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert_eq!(ProxyConfig::default().validate(), Ok(()));
    }

    #[test]
    fn zero_bound_is_named() {
        let config = ProxyConfig {
            max_held: 0,
            ..ProxyConfig::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::Zero("max_held")));
    }

    #[test]
    fn zero_idle_timeout_is_refused_but_none_is_allowed() {
        let zero = ProxyConfig {
            idle_timeout: Some(Duration::ZERO),
            ..ProxyConfig::default()
        };
        assert_eq!(
            zero.validate(),
            Err(ConfigError::ZeroDuration("idle_timeout"))
        );
        let never = ProxyConfig {
            idle_timeout: None,
            ..ProxyConfig::default()
        };
        assert_eq!(never.validate(), Ok(()));
    }

    #[test]
    fn held_over_connections_is_refused() {
        let config = ProxyConfig {
            max_held: 10,
            max_connections: 5,
            ..ProxyConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::HeldOverConnections { .. })
        ));
    }
}
