//! `[tls]` and `[acme]` of `revbootd.toml`.
//!
//! ```toml
//! [tls]                      # HTTPS for git, the API, /metrics and the dashboard
//! cert = "/etc/revboot/fullchain.pem"   # a certificate chain and its key, PEM; reloaded
//! key = "/etc/revboot/key.pem"          # when they change (a bad file is reported, not served)
//! # acme = true              # instead: the daemon's certificate from [acme]
//!
//! [tls.services.hello]       # what the front door presents for a `tls = "terminate"`
//! cert = "/etc/revboot/hello.pem"       # service: files, watched as the daemon's are (such
//! key = "/etc/revboot/hello.key"        # a service gets no certificate from ACME)
//!
//! [acme]                     # certificates by ACME DNS-01, answered by revboot's own DNS
//! directory = "https://acme-v02.api.letsencrypt.org/directory"
//! contact = ["mailto:ops@example.com"]
//! name = "revboot.example.com"  # the daemon's own name, inside the zone (default: the zone)
//! services = true            # a certificate for *.<service>.<zone> and <service>.<zone>
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// A setting out of range: its dotted key and what is wrong (the daemon's configuration
/// reports it as any other, `crate::config::ConfigError::Invalid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The dotted key.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

/// `[tls]`: HTTPS on `[http] listen`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// The certificate chain (PEM, leaf first).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The daemon's certificate comes from `[acme]` (for `[acme] name`).
    pub acme: bool,
    /// How often the files are looked at for a change (and the certificates for their
    /// expiry), in milliseconds; SIGHUP looks at once.
    pub reload_ms: u64,
    /// Certificates of services from files, by service name: what the front door presents
    /// for a service whose manifest says `tls = "terminate"`.
    pub services: BTreeMap<String, Files>,
}

/// A certificate chain (PEM, leaf first) and its private key (PEM), as files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: None,
            key: None,
            acme: false,
            reload_ms: 2_000,
            services: BTreeMap::new(),
        }
    }
}

impl Tls {
    /// Whether the daemon serves HTTPS.
    pub fn is_on(&self) -> bool {
        self.cert.is_some() || self.acme
    }
}

/// `[acme]`: a certificate authority speaking ACME (RFC 8555), DNS-01 challenges answered by
/// this daemon's DNS server. Off while `directory` is empty.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Acme {
    /// The ACME directory URL (Let's Encrypt's:
    /// `https://acme-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// A root certificate (PEM) to verify the ACME server's HTTPS with, when it is not one of
    /// the system's (a test CA such as pebble); default: the system roots.
    pub ca: Option<PathBuf>,
    /// Contact URLs of the account (`mailto:…`).
    pub contact: Vec<String>,
    /// The daemon's own name, for its HTTPS certificate (`[tls] acme`): inside the zone,
    /// since the zone's DNS answers its challenge. Default: the zone itself.
    pub name: Option<String>,
    /// Get a certificate for every service: `*.<service>.<zone>` and `<service>.<zone>`
    /// (what the front door presents for `tls = "terminate"`).
    pub services: bool,
    /// How often certificates are looked at (new services, renewals due), in milliseconds.
    pub check_ms: u64,
    /// First wait after a failure, in milliseconds; doubled at each failure in a row (each
    /// wait less a random part of up to a quarter, so that daemons do not retry in step).
    pub retry_min_ms: u64,
    /// Longest wait after failures, in milliseconds.
    pub retry_max_ms: u64,
    /// How long one issuance may take (order, challenges, certificate), in milliseconds.
    pub order_timeout_ms: u64,
}

impl Default for Acme {
    fn default() -> Self {
        Acme {
            directory: String::new(),
            ca: None,
            contact: Vec::new(),
            name: None,
            services: true,
            check_ms: 60_000,
            retry_min_ms: 60_000,
            retry_max_ms: 6 * 3_600_000,
            order_timeout_ms: 300_000,
        }
    }
}

impl Acme {
    /// Whether ACME is configured.
    pub fn is_on(&self) -> bool {
        !self.directory.is_empty()
    }

    /// The daemon's own name.
    pub fn daemon_name(&self, zone: &str) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| zone.to_owned())
            .trim_end_matches('.')
            .to_ascii_lowercase()
    }
}

/// Checks `[tls]` and `[acme]` together.
pub fn validate(tls: &Tls, acme: &Acme, zone: &str) -> Result<(), Invalid> {
    let invalid = |key, message: &str| Invalid {
        key,
        message: message.to_owned(),
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err(invalid("tls.key", "`cert` and `key` go together"));
    }
    if tls.cert.is_some() && tls.acme {
        return Err(invalid(
            "tls.acme",
            "the certificate comes from files (`cert`, `key`) or from ACME, not both",
        ));
    }
    if tls.acme && !acme.is_on() {
        return Err(invalid("tls.acme", "needs `[acme] directory`"));
    }
    if tls.reload_ms == 0 {
        return Err(invalid("tls.reload_ms", "must be at least 1"));
    }
    for service in tls.services.keys() {
        if let Err(error) = revboot_builder::validate_service_name(service) {
            return Err(Invalid {
                key: "tls.services",
                message: error.to_string(),
            });
        }
    }
    if !acme.is_on() {
        return Ok(());
    }
    if !acme.directory.starts_with("https://") {
        return Err(invalid("acme.directory", "must be an https:// URL"));
    }
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    let name = acme.daemon_name(&zone);
    if name != zone && !name.ends_with(&format!(".{zone}")) {
        return Err(invalid(
            "acme.name",
            "must be inside the zone: its challenge is answered by the zone's DNS",
        ));
    }
    // `*.` + the longest service name (40) + `.` + the zone: a DNS name of at most 253.
    if zone.len() + 2 + revboot_builder::MAX_SERVICE_NAME + 1 > 253 {
        return Err(invalid(
            "zone",
            "is too long for certificates of *.<service>.<zone>",
        ));
    }
    for (key, value) in [
        ("acme.check_ms", acme.check_ms),
        ("acme.retry_min_ms", acme.retry_min_ms),
        ("acme.order_timeout_ms", acme.order_timeout_ms),
    ] {
        if value == 0 {
            return Err(invalid(key, "must be at least 1"));
        }
    }
    if acme.retry_max_ms < acme.retry_min_ms {
        return Err(invalid(
            "acme.retry_max_ms",
            "must be at least retry_min_ms",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::Config;

    #[test]
    fn tls_and_acme_settings_are_checked_together() {
        let bad = [
            ("[tls]\ncert = \"c.pem\"\n", "tls.key"),
            (
                "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nacme = true\n[acme]\ndirectory = \"https://ca.test/dir\"\n",
                "tls.acme",
            ),
            ("[tls]\nacme = true\n", "tls.acme"),
            (
                "[acme]\ndirectory = \"http://ca.test/dir\"\n",
                "acme.directory",
            ),
            (
                "[acme]\ndirectory = \"https://ca.test/dir\"\nname = \"revboot.example.com\"\n",
                "acme.name",
            ),
            (
                "[tls.services.Bad_Name]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
                "tls.services",
            ),
            ("[tls.services.hello]\ncert = \"c.pem\"\n", "key"),
        ];
        for (text, key) in bad {
            let error = Config::from_toml(text).expect_err(text).to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
        let good = Config::from_toml(
            "[tls]\nacme = true\n[acme]\ndirectory = \"https://ca.test/dir\"\nname = \"Git.Revboot.Test\"\n",
        )
        .expect("valid");
        assert_eq!(good.acme.daemon_name(&good.zone), "git.revboot.test");
        assert!(good.tls.is_on());
        // Service certificates alone do not make the daemon's HTTP HTTPS.
        let services =
            Config::from_toml("[tls.services.hello]\ncert = \"c.pem\"\nkey = \"k.pem\"\n")
                .expect("valid");
        assert!(!services.tls.is_on());
        assert_eq!(services.tls.services["hello"].key, PathBuf::from("k.pem"));
    }
}
