//! The CLI's own configuration: named remotes (daemons) with their tokens, written by
//! `revboot login`; and the service a command means when it names none.
//!
//! 1. The file is `$XDG_CONFIG_HOME/revboot/config.toml`, or `~/.config/revboot/config.toml`
//!    when that variable is unset or empty (the XDG base directory rule):
//!
//!    ```toml
//!    default = "revboot.example:8080"
//!    [remotes."revboot.example:8080"]
//!    url = "https://revboot.example:8080"
//!    token = "…"
//!    ca = "/etc/revboot/ca.pem"   # optional: verify with this CA, not the system's roots
//!    ```
//!
//! 2. It holds tokens, so it is written readable by its owner alone (mode 0600: a temporary
//!    file of that mode, synced, renamed over the old one); tokens never reach a log or a
//!    `Debug` rendering. An unknown key is an error that names it.
//! 3. A command that names no service looks at the git remotes of the current directory
//!    (`git config --get-regexp remote.*.url`): those whose URL is
//!    `<daemon>/git/<service>.git` on the daemon the command talks to (user and password
//!    ignored) name the service. None, or several different ones, is an error that says to
//!    name it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::action::ActionError;

/// The client configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The remote used when a command names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// The remotes, by name.
    #[serde(default)]
    pub remotes: BTreeMap<String, Remote>,
}

/// A daemon the CLI talks to.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    /// Its HTTP address, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The CA file (PEM) its `https://` certificate is verified with; none: the system's
    /// roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for Remote {
    // The token stays out: a Debug rendering can end up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .finish()
    }
}

/// Where the client configuration lives (rule 1); `None` without `XDG_CONFIG_HOME` or `HOME`.
pub fn path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".config"),
    };
    Some(base.join("revboot").join("config.toml"))
}

impl ClientConfig {
    /// Reads the file at `path`; a missing file is an empty configuration.
    pub fn read(path: &Path) -> anyhow::Result<ClientConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ClientConfig::default());
            }
            Err(error) => {
                return Err(error).with_context(|| format!("Cannot read {}", path.display()));
            }
        };
        toml::from_str(&text)
            .with_context(|| format!("Invalid client configuration {}", path.display()))
    }

    /// Reads the file at [`path`], if there is one.
    pub fn load() -> anyhow::Result<ClientConfig> {
        match path() {
            Some(path) => ClientConfig::read(&path),
            None => Ok(ClientConfig::default()),
        }
    }

    /// Writes the configuration to `path`, mode 0600 (rule 2).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("Cannot create {}", dir.display()))?;
        }
        let text = toml::to_string(self).context("Cannot write the client configuration")?;
        revboot_sandbox::secret::write_private(path, &text)
            .with_context(|| format!("Cannot write {}", path.display()))
    }

    /// The remote named `name`.
    pub fn remote(&self, name: &str) -> Result<&Remote, ActionError> {
        self.remotes.get(name).ok_or_else(|| {
            ActionError::Invalid(format!(
                "No remote named `{name}`: save one with `revboot login <url> --name {name}`"
            ))
        })
    }

    /// The remote whose URL is `url`, if one is saved.
    pub fn remote_for(&self, url: &str) -> Option<&Remote> {
        let url = normalise(url);
        self.remotes
            .values()
            .find(|remote| normalise(&remote.url) == url)
    }
}

/// `url` without a trailing `/`.
pub fn normalise(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// Checks a remote name: letters, digits, `.`, `:`, `_` and `-`, at most 100.
pub fn check_name(name: &str) -> Result<(), ActionError> {
    let fine = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'_' | b'-'));
    if fine {
        Ok(())
    } else {
        Err(ActionError::Invalid(format!(
            "Invalid remote name `{name}`: use letters, digits, `.`, `:`, `_` and `-`"
        )))
    }
}

/// The host (and port) of an `http(s)://[user[:password]@]host[:port]/…` URL, and its path.
fn authority_and_path(url: &str) -> Option<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    Some((host, path))
}

/// The service a git remote URL names on the daemon at `daemon`, if it is one of its.
pub fn service_of(remote_url: &str, daemon: &str) -> Option<String> {
    let (host, path) = authority_and_path(remote_url)?;
    let (daemon_host, daemon_path) = authority_and_path(normalise(daemon))?;
    if !host.eq_ignore_ascii_case(daemon_host) {
        return None;
    }
    let name = path
        .strip_prefix(daemon_path)?
        .strip_prefix("/git/")?
        .trim_end_matches('/')
        .strip_suffix(".git")?;
    revboot_builder::validate_service_name(name)
        .ok()
        .map(|()| name.to_owned())
}

/// The service the git remotes of `dir` name on the daemon at `daemon` (rule 3).
pub fn infer_service(dir: &Path, daemon: &str) -> Result<String, ActionError> {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["config", "--get-regexp", r"^remote\..*\.url$"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| {
            ActionError::Invalid(format!(
                "No service given, and git cannot run to find one ({error}): name the service"
            ))
        })?;
    let listed = String::from_utf8_lossy(&output.stdout);
    let mut services: Vec<String> = listed
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter_map(|(_, url)| service_of(url.trim(), daemon))
        .collect();
    services.sort();
    services.dedup();
    match services.as_slice() {
        [one] => {
            tracing::debug!(service = one, dir = %dir.display(), "service from the git remote");
            Ok(one.clone())
        }
        [] => Err(ActionError::Invalid(format!(
            "No service given, and no git remote of {} points at {}/git/<service>.git: name the service",
            dir.display(),
            normalise(daemon)
        ))),
        many => Err(ActionError::Invalid(format!(
            "No service given, and the git remotes of {} name several ({}): name one",
            dir.display(),
            many.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_urls_name_services_of_their_daemon_only() {
        let daemon = "http://127.0.0.1:8080/";
        for (url, service) in [
            ("http://127.0.0.1:8080/git/hello.git", Some("hello")),
            (
                "http://git:s3cret@127.0.0.1:8080/git/hello.git",
                Some("hello"),
            ),
            (
                "http://git:p@ss@127.0.0.1:8080/git/hello.git/",
                Some("hello"),
            ),
            ("http://127.0.0.1:8081/git/hello.git", None),
            ("http://127.0.0.1:8080/git/-/deploy.git", None),
            ("http://127.0.0.1:8080/git/Hello.git", None),
            ("http://127.0.0.1:8080/other/hello.git", None),
            ("git@example.com:hello.git", None),
            ("/srv/revboot/src/hello.git", None),
        ] {
            assert_eq!(service_of(url, daemon).as_deref(), service, "{url}");
        }
        assert_eq!(
            service_of(
                "https://r.example/base/git/app.git",
                "https://r.example/base"
            )
            .as_deref(),
            Some("app")
        );
    }

    #[test]
    fn the_configuration_reads_back_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("revboot").join("config.toml");
        let mut config = ClientConfig::default();
        config.remotes.insert(
            "prod".into(),
            Remote {
                url: "https://127.0.0.1:8080".into(),
                token: Some("s3cret".into()),
                ca: Some("/etc/revboot/ca.pem".into()),
            },
        );
        config.default = Some("prod".into());
        config.write(&file).expect("write");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ClientConfig::read(&file).expect("read"), config);
        assert!(!format!("{config:?}").contains("s3cret"));
        std::fs::write(&file, "defualt = \"prod\"\n").expect("write");
        let error = format!("{:#}", ClientConfig::read(&file).expect_err("a typo"));
        assert!(error.contains("defualt"), "{error}");
        assert!(check_name("a b").is_err() && check_name("prod-1:8080").is_ok());
    }
}
