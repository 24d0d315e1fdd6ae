//! `revboot login` and `revboot logout`: remotes in the client configuration.
//!
//! 1. `login <url>` reads the token from standard input when it is not a terminal (`revboot
//!    login http://… < token-file`), otherwise asks for it without echo.
//! 2. The daemon checks it (`GET /api/v1/token`, which needs the token even where reads
//!    are public): a wrong token or an unreachable daemon is an error, and nothing is saved.
//! 3. The remote is saved under its name (default: the URL's host and port) and becomes the
//!    default one; the file is written mode 0600 ([`crate::remotes`]).
//! 4. Unless `--no-git-credentials`, the user's global git configuration gets
//!    `revboot git-credential` as the credential helper for the remote's URL
//!    ([`crate::credential`]), so that a stock `git push <url>/git/<service>.git` sends the
//!    token, which stays out of the URL and the checkout. A failure there saves nothing.
//! 5. `logout [name]` forgets a remote (default: the default one) and removes its helper.

use std::io::{IsTerminal as _, Read as _, Write as _};

use anyhow::Context as _;

use crate::action::{Action, ActionError, Reply};
use crate::cli::{Cli, LoginArgs};
use crate::client::Client;
use crate::config::Config;
use crate::outcome::Outcome;
use crate::remotes::{self, ClientConfig, Remote};

/// The longest token read.
const MAX_TOKEN: u64 = 4096;

/// Saves a remote after the daemon accepted its token.
pub fn login(args: &LoginArgs, cli: &Cli, config: &Config) -> anyhow::Result<Outcome> {
    let url = remotes::normalise(&args.url).to_owned();
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Ok(Outcome::Failed(ActionError::Invalid(format!(
            "`{url}` is not an http:// URL of a revboot daemon"
        ))));
    }
    let name = args.name.clone().unwrap_or_else(|| {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        let host = rest.split('/').next().unwrap_or(rest);
        host.rsplit_once('@')
            .map_or(host, |(_, host)| host)
            .to_owned()
    });
    if let Err(error) = remotes::check_name(&name) {
        return Ok(Outcome::Failed(error));
    }
    let Some(path) = remotes::path() else {
        return Ok(Outcome::Failed(ActionError::Invalid(
            "Neither XDG_CONFIG_HOME nor HOME is set: there is nowhere to keep the remote".into(),
        )));
    };
    let token = read_token(&url)?;
    if token.is_empty() {
        return Ok(Outcome::Failed(ActionError::Invalid(
            "The token is empty".into(),
        )));
    }
    // An absolute path is saved, so that the remote works from any directory.
    let ca = match &cli.ca {
        Some(ca) => Some(
            std::fs::canonicalize(ca)
                .with_context(|| format!("Cannot read the CA file {}", ca.display()))?,
        ),
        None => None,
    };
    let tls = crate::client::tls_config(ca.as_deref())?;
    let client = Client::with_tls(&url, Some(token.clone()), &config.data, &config.zone, tls);
    let daemon = match client.execute(Action::CheckToken) {
        Ok(Reply::Token(daemon)) => daemon,
        Ok(other) => {
            return Ok(Outcome::Failed(ActionError::Internal(format!(
                "{url} answered something else than a revboot daemon: {other:?}"
            ))));
        }
        Err(error) => return Ok(Outcome::Failed(error)),
    };
    let mut saved = ClientConfig::read(&path)?;
    if !args.no_git_credentials {
        crate::credential::register(&url, ca.as_deref())?;
    }
    saved.remotes.insert(
        name.clone(),
        Remote {
            url: url.clone(),
            token: Some(token),
            ca,
        },
    );
    saved.default = Some(name.clone());
    saved.write(&path)?;
    if cli.json {
        let value = serde_json::json!({
            "remote": name, "url": url, "version": daemon.version, "zone": daemon.zone,
            "config": path.display().to_string(), "git_credentials": !args.no_git_credentials,
        });
        let _ = writeln!(std::io::stdout(), "{value:#}");
    } else if !cli.quiet {
        let _ = writeln!(
            std::io::stdout(),
            "logged in to {name} ({url}): revboot {}, zone {}; it is the default remote now ({})",
            daemon.version,
            daemon.zone,
            path.display()
        );
        if !args.no_git_credentials {
            let _ = writeln!(
                std::io::stdout(),
                "git pushes to {url}/git/<service>.git get the token from `revboot git-credential` \
                 (credential.{url}.helper in your global git configuration; --no-git-credentials leaves it alone)"
            );
        }
    }
    Ok(Outcome::Done)
}

/// Forgets a remote.
pub fn logout(name: Option<&str>, cli: &Cli) -> anyhow::Result<Outcome> {
    let Some(path) = remotes::path() else {
        return Ok(Outcome::Failed(ActionError::NotFound(
            "No client configuration".into(),
        )));
    };
    let mut saved = ClientConfig::read(&path)?;
    let Some(name) = name.map(str::to_owned).or_else(|| saved.default.clone()) else {
        return Ok(Outcome::Failed(ActionError::NotFound(
            "No default remote to log out of".into(),
        )));
    };
    if !saved.remotes.contains_key(&name) {
        return Ok(Outcome::Failed(ActionError::NotFound(format!(
            "No remote named `{name}`"
        ))));
    }
    if saved.default.as_deref() == Some(name.as_str()) {
        saved.default = None;
    }
    let forgotten = saved.remotes.remove(&name);
    // The helper goes unless another remote still has the URL.
    // A failure (no git here) leaves nothing of revboot's to remove worth refusing for.
    if let Some(remote) = forgotten.filter(|remote| saved.remote_for(&remote.url).is_none())
        && let Err(error) =
            crate::credential::forget(remotes::normalise(&remote.url), remote.ca.as_deref())
    {
        tracing::warn!("{error:#}");
    }
    saved.write(&path)?;
    if !cli.quiet && !cli.json {
        let _ = writeln!(std::io::stdout(), "forgot remote {name}");
    }
    Ok(Outcome::Done)
}

/// The token: standard input when it is not a terminal, else asked for without echo.
fn read_token(url: &str) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        // rpassword turns terminal echo off and on again (termios), which this crate's
        // forbidden unsafe code could not.
        let token = rpassword::prompt_password(format!("Token for {url}: "))
            .context("Cannot read the token from the terminal")?;
        return Ok(token.trim().to_owned());
    }
    let mut token = String::new();
    stdin
        .lock()
        .take(MAX_TOKEN)
        .read_to_string(&mut token)
        .context("Cannot read the token from standard input")?;
    Ok(token.trim().to_owned())
}
