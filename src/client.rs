//! The CLI's side of the HTTP API: an [`Action`] sent to the daemon, a [`Reply`] back.
//!
//! When the daemon does not answer, actions that only need the deployment repository
//! (history, show, diff, logs, live moves) run directly on the data directory instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::action::{Action, ActionError, Reply};
use crate::engine::Engine;

/// How long the CLI waits for the daemon to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Talks to the daemon, or to the data directory when the daemon is down.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    token: Option<String>,
    data: PathBuf,
    zone: String,
    agent: ureq::Agent,
    tls: ureq::tls::TlsConfig,
}

/// How an `https://` daemon is verified: against the system's roots, or against the
/// certificates of a `--ca` file (PEM) alone. A file that cannot be read or holds no
/// certificate is an error, never a fallback to the system's roots.
pub fn tls_config(ca: Option<&Path>) -> anyhow::Result<ureq::tls::TlsConfig> {
    use anyhow::Context as _;
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let roots = match ca {
        None => RootCerts::PlatformVerifier,
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("Cannot read the CA file {}", path.display()))?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                    _ => None,
                })
                .collect();
            anyhow::ensure!(
                !certs.is_empty(),
                "The CA file {} holds no PEM certificate",
                path.display()
            );
            RootCerts::new_with_certs(&certs)
        }
    };
    Ok(TlsConfig::builder().root_certs(roots).build())
}

/// Whether `error` is TLS refusing the daemon (its certificate, its handshake).
fn is_tls_failure(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => true,
        ureq::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => false,
    }
}

impl Client {
    /// A client for the daemon at `url` (e.g. `http://127.0.0.1:8080`); `https://` daemons
    /// are verified against the system's roots.
    pub fn new(url: &str, token: Option<String>, data: &Path, zone: &str) -> Client {
        let tls = tls_config(None).expect("the system roots need no file");
        Client::with_tls(url, token, data, zone, tls)
    }

    /// A client whose `https://` daemon is verified with `tls` (see [`tls_config`]).
    pub fn with_tls(
        url: &str,
        token: Option<String>,
        data: &Path,
        zone: &str,
        tls: ureq::tls::TlsConfig,
    ) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .tls_config(tls.clone())
            .build()
            .new_agent();
        Client {
            url: url.trim_end_matches('/').to_owned(),
            token,
            data: data.to_owned(),
            zone: zone.to_owned(),
            agent,
            tls,
        }
    }

    /// The daemon's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The token the client sends, if it has one.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Carries out an action, through the daemon when it answers.
    pub fn execute(&self, action: Action) -> Result<Reply, ActionError> {
        match self.remote(&action) {
            Err(RemoteError::Unreachable(reason)) => {
                if needs_daemon(&action) {
                    return Err(ActionError::Unavailable(format!(
                        "The daemon at {} does not answer ({reason}): start it with `revboot serve`",
                        self.url
                    )));
                }
                let store = revboot_store::Store::open(self.data.join("deploy.git")).map_err(
                    |error| {
                        ActionError::Unavailable(format!(
                            "The daemon at {} does not answer ({reason}) and {} holds no deployment repository: {error}",
                            self.url,
                            self.data.display()
                        ))
                    },
                )?;
                Engine::offline(store, &self.zone).execute(action)
            }
            Err(RemoteError::Action(error)) => Err(error),
            Ok(reply) => Ok(reply),
        }
    }

    fn remote(&self, action: &Action) -> Result<Reply, RemoteError> {
        let (method, path, body) = route(action);
        let url = format!("{}{path}", self.url);
        let bearer = self.token.as_ref().map(|token| format!("Bearer {token}"));
        tracing::debug!(method = method.name(), %url, "asking the daemon");
        let mut response = match method {
            Method::Get => {
                let mut request = self.agent.get(&url);
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request.call()
            }
            Method::Delete => {
                let mut request = self.agent.delete(&url);
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request.call()
            }
            Method::Post => {
                let mut request = self.agent.post(&url);
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request.send_json(body.unwrap_or(serde_json::Value::Null))
            }
        }
        .map_err(|error| match error {
            // A daemon that fails verification is not "down": never fall back to the data
            // directory past a certificate that does not verify.
            ref tls if is_tls_failure(tls) => {
                RemoteError::Action(ActionError::Unavailable(format!(
                    "TLS with {url} failed ({tls}): give its CA with --ca, or fix its certificate"
                )))
            }
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                RemoteError::Unreachable(error.to_string())
            }
            other => RemoteError::Action(ActionError::Unavailable(format!(
                "Request to {url} failed: {other}"
            ))),
        })?;
        let status = response.status();
        let text = response.body_mut().read_to_string().map_err(|error| {
            RemoteError::Action(ActionError::Internal(format!(
                "Unreadable answer from {url}: {error}"
            )))
        })?;
        if status.is_success() {
            let reply = parse_reply(action, &text).map_err(|error| {
                RemoteError::Action(ActionError::Internal(format!(
                    "Unexpected answer from {url}: {error}"
                )))
            })?;
            return Ok(reply);
        }
        let error: ActionError = serde_json::from_str(&text).unwrap_or_else(|_| {
            ActionError::Internal(format!("{url} answered {status}: {}", text.trim()))
        });
        Err(RemoteError::Action(self.explain(error)))
    }

    /// A refusal for want of the token says where the CLI looks for one, or that the one it
    /// sent is not the daemon's: the daemon's own message speaks of HTTP headers.
    fn explain(&self, error: ActionError) -> ActionError {
        let ActionError::Unauthorized(message) = error else {
            return error;
        };
        let hint = match self.token {
            None => format!(
                "the CLI found no token: `export REVBOOT_TOKEN=$(cat <data>/token)`, or \
                 `revboot login {}` once, or run it beside the daemon's revbootd.toml or with \
                 --data <its data directory>",
                self.url
            ),
            Some(_) => "the token the CLI sent (REVBOOT_TOKEN, else the remote's, else the \
                        configuration's) is not this daemon's"
                .to_owned(),
        };
        ActionError::Unauthorized(format!("{message}; {hint}"))
    }
}

impl Client {
    /// Follows the consoles of `service`'s running instances (and of those that start
    /// later) through the daemon's live feed; never offline. The connection waits at most
    /// [`REQUEST_TIMEOUT`] for the daemon's answer, then reads as long as the feed lasts
    /// (the daemon sends a keep-alive comment every 15 s; the user ends it).
    pub fn follow_console(
        &self,
        service: &str,
        label: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Result<ConsoleFeed, ActionError> {
        let mut query = label_query(&label.map(str::to_owned));
        if let Some(client) = client {
            query.push(if query.is_empty() { '?' } else { '&' });
            query.push_str(&format!("client={}", encode(&client.to_string())));
        }
        let url = format!(
            "{}/api/v1/services/{}/logs/console/follow{query}",
            self.url,
            encode(service)
        );
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(REQUEST_TIMEOUT))
            .tls_config(self.tls.clone())
            .build()
            .new_agent();
        let mut request = agent.get(&url).header("accept", "text/event-stream");
        if let Some(token) = &self.token {
            request = request.header("authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().map_err(|error| {
            ActionError::Unavailable(format!(
                "The daemon at {} does not answer ({error}): following needs it running",
                self.url
            ))
        })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            return Err(
                self.explain(serde_json::from_str(&text).unwrap_or_else(|_| {
                    ActionError::Internal(format!("{url} answered {status}: {}", text.trim()))
                })),
            );
        }
        Ok(ConsoleFeed {
            lines: std::io::BufReader::new(Box::new(response.into_body().into_reader())),
        })
    }
}

/// The events of a console feed ([`Client::follow_console`]), as the daemon sends them.
pub struct ConsoleFeed {
    lines: std::io::BufReader<Box<dyn std::io::Read + Send>>,
}

impl std::fmt::Debug for ConsoleFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleFeed").finish_non_exhaustive()
    }
}

impl Iterator for ConsoleFeed {
    type Item = Result<crate::feeds::ConsoleEvent, ActionError>;

    /// The next event; `None` when the feed ends (the daemon shut down).
    fn next(&mut self) -> Option<Self::Item> {
        use std::io::BufRead as _;
        let mut line = String::new();
        loop {
            line.clear();
            match self.lines.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(error) => {
                    return Some(Err(ActionError::Unavailable(format!(
                        "The live feed broke off: {error}"
                    ))));
                }
            }
            // One JSON event per `data:` line; comments (keep-alives) and blank lines pass.
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                return Some(serde_json::from_str(data.trim_start()).map_err(|error| {
                    ActionError::Internal(format!("Unexpected event from the daemon: {error}"))
                }));
            }
        }
    }
}

enum RemoteError {
    Unreachable(String),
    Action(ActionError),
}

enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    fn name(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

fn needs_daemon(action: &Action) -> bool {
    matches!(
        action,
        Action::AddService { .. }
            | Action::DeleteService { .. }
            | Action::RenameService { .. }
            | Action::CheckToken
            | Action::ListInstances
            | Action::StopInstance { .. }
            | Action::Summon { .. }
            | Action::Config { .. }
            | Action::ConfigChange { .. }
            | Action::Daemon
            | Action::Upgrade
            | Action::Nodes
            | Action::ListBuilds { .. }
    )
}

fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn label_query(label: &Option<String>) -> String {
    match label {
        Some(label) => format!("?label={}", encode(label)),
        None => String::new(),
    }
}

fn json<T: Serialize>(value: T) -> Option<serde_json::Value> {
    Some(serde_json::to_value(value).expect("request bodies are plain data"))
}

fn route(action: &Action) -> (Method, String, Option<serde_json::Value>) {
    use serde_json::json as j;
    match action {
        Action::AddService { name } => (
            Method::Post,
            "/api/v1/services".into(),
            json(j!({ "name": name })),
        ),
        Action::ListServices => (Method::Get, "/api/v1/services".into(), None),
        Action::DeleteService {
            service,
            deployments,
        } => (
            Method::Delete,
            format!(
                "/api/v1/services/{}?deployments={}",
                encode(service),
                match deployments {
                    crate::action::Deployments::Keep => "keep",
                    crate::action::Deployments::Remove => "remove",
                }
            ),
            None,
        ),
        Action::RenameService { service, to } => (
            Method::Post,
            format!("/api/v1/services/{}/rename", encode(service)),
            json(j!({ "to": to })),
        ),
        Action::CheckToken => (Method::Get, "/api/v1/token".into(), None),
        Action::History { service } => (
            Method::Get,
            format!("/api/v1/services/{}/deployments", encode(service)),
            None,
        ),
        Action::Show { service, label } => (
            Method::Get,
            format!(
                "/api/v1/services/{}/deployments/{}",
                encode(service),
                encode(label)
            ),
            None,
        ),
        Action::Diff { service, a, b } => (
            Method::Get,
            format!(
                "/api/v1/services/{}/diff?a={}&b={}",
                encode(service),
                encode(a),
                encode(b)
            ),
            None,
        ),
        Action::MoveLive {
            service,
            label,
            reason,
            check,
        } => (
            Method::Post,
            format!("/api/v1/services/{}/live", encode(service)),
            json(j!({ "label": label, "reason": reason, "check": check })),
        ),
        Action::Config { service, show } => (
            Method::Get,
            format!(
                "/api/v1/services/{}/config{}",
                encode(service),
                if *show { "?show=true" } else { "" }
            ),
            None,
        ),
        Action::ConfigChange {
            service,
            set,
            unset,
            restart,
        } => (
            Method::Post,
            format!("/api/v1/services/{}/config", encode(service)),
            json(j!({ "set": set, "unset": unset, "restart": restart })),
        ),
        Action::Daemon => (Method::Get, "/api/v1/daemon".into(), None),
        Action::Nodes => (Method::Get, "/api/v1/nodes".into(), None),
        Action::Upgrade => (Method::Post, "/api/v1/daemon/upgrade".into(), None),
        Action::ListInstances => (Method::Get, "/api/v1/instances".into(), None),
        Action::StopInstance {
            service,
            label,
            client,
            replica,
            kill,
        } => (
            Method::Post,
            "/api/v1/instances/stop".into(),
            json(
                j!({ "service": service, "label": label, "client": client, "replica": replica, "kill": kill }),
            ),
        ),
        Action::BuildLog { service, label } => (
            Method::Get,
            format!(
                "/api/v1/services/{}/logs/build{}",
                encode(service),
                label_query(label)
            ),
            None,
        ),
        Action::ConsoleLogs {
            service,
            label,
            limit,
        } => {
            let mut query = label_query(label);
            if let Some(limit) = limit {
                query.push(if query.is_empty() { '?' } else { '&' });
                query.push_str(&format!("limit={limit}"));
            }
            (
                Method::Get,
                format!("/api/v1/services/{}/logs/console{query}", encode(service)),
                None,
            )
        }
        Action::ListBuilds { service } => (
            Method::Get,
            match service {
                Some(service) => format!("/api/v1/builds?service={}", encode(service)),
                None => "/api/v1/builds".to_owned(),
            },
            None,
        ),
        Action::Summon {
            service,
            label,
            client,
        } => (
            Method::Post,
            format!("/api/v1/services/{}/summon", encode(service)),
            json(j!({ "label": label, "client": client })),
        ),
    }
}

/// Parses a successful answer as the reply kind the action produces.
fn parse_reply(action: &Action, text: &str) -> Result<Reply, serde_json::Error> {
    Ok(match action {
        Action::AddService { .. } => Reply::ServiceAdded(serde_json::from_str(text)?),
        Action::ListServices => Reply::Services(serde_json::from_str(text)?),
        Action::DeleteService { .. } => Reply::ServiceDeleted(serde_json::from_str(text)?),
        Action::RenameService { .. } => Reply::ServiceRenamed(serde_json::from_str(text)?),
        Action::CheckToken => Reply::Token(serde_json::from_str(text)?),
        Action::History { .. } => Reply::History(serde_json::from_str(text)?),
        Action::Show { .. } => Reply::Show(serde_json::from_str(text)?),
        Action::Diff { .. } => Reply::Diff(serde_json::from_str(text)?),
        Action::MoveLive { .. } => Reply::Moved(serde_json::from_str(text)?),
        Action::ListInstances => Reply::Instances(serde_json::from_str(text)?),
        Action::StopInstance { .. } => Reply::Stopped(serde_json::from_str(text)?),
        Action::BuildLog { .. } => Reply::BuildLog(serde_json::from_str(text)?),
        Action::ConsoleLogs { .. } => Reply::Console(serde_json::from_str(text)?),
        Action::Summon { .. } => Reply::Summoned(serde_json::from_str(text)?),
        Action::Config { .. } | Action::ConfigChange { .. } => {
            Reply::Config(serde_json::from_str(text)?)
        }
        Action::Daemon | Action::Upgrade => Reply::Daemon(serde_json::from_str(text)?),
        Action::Nodes => Reply::Nodes(serde_json::from_str(text)?),
        Action::ListBuilds { .. } => Reply::Builds(serde_json::from_str(text)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_routed_path_is_an_api_route() {
        let actions = [
            Action::AddService { name: "a".into() },
            Action::ListServices,
            Action::DeleteService {
                service: "a".into(),
                deployments: crate::action::Deployments::Keep,
            },
            Action::RenameService {
                service: "a".into(),
                to: "b".into(),
            },
            Action::CheckToken,
            Action::History {
                service: "a".into(),
            },
            Action::Show {
                service: "a".into(),
                label: "b".into(),
            },
            Action::Diff {
                service: "a".into(),
                a: "b".into(),
                b: "c".into(),
            },
            Action::MoveLive {
                service: "a".into(),
                label: "b".into(),
                reason: crate::action::MoveReason::Rollback,
                check: true,
            },
            Action::Config {
                service: "a".into(),
                show: true,
            },
            Action::ConfigChange {
                service: "a".into(),
                set: crate::action::Values::default(),
                unset: Vec::new(),
                restart: false,
            },
            Action::Daemon,
            Action::Upgrade,
            Action::Nodes,
            Action::ListInstances,
            Action::StopInstance {
                service: "a".into(),
                label: None,
                client: None,
                replica: 0,
                kill: false,
            },
            Action::BuildLog {
                service: "a".into(),
                label: Some("x/y".into()),
            },
            Action::ConsoleLogs {
                service: "a".into(),
                label: None,
                limit: Some(3),
            },
            Action::ListBuilds {
                service: Some("a".into()),
            },
            Action::Summon {
                service: "a".into(),
                label: None,
                client: None,
            },
        ];
        for action in &actions {
            let (method, path, _) = route(action);
            let method = method.name().to_ascii_lowercase();
            let path = path.split('?').next().expect("a path");
            let matched = crate::api::ROUTES.iter().any(|(m, pattern)| {
                *m == method.as_str() && {
                    let a: Vec<&str> = pattern.split('/').collect();
                    let b: Vec<&str> = path.split('/').collect();
                    a.len() == b.len()
                        && a.iter().zip(&b).all(|(p, s)| p.starts_with('{') || p == s)
                }
            });
            assert!(matched, "{method} {path} is not a route");
        }
        assert_eq!(encode("x/y z"), "x%2Fy%20z");
    }
}
