//! `revboot git-credential`: git's credential helper for the remotes of `revboot login`, so
//! that a stock `git push <daemon>/git/<service>.git` authenticates with the saved token and
//! the token is never in a URL, a checkout's `.git/config` or the process list.
//!
//! 1. `revboot login` registers the helper in the user's global git configuration
//!    (`git config --global`, so `GIT_CONFIG_GLOBAL` and `HOME` are honoured) for the
//!    remote's URL only: `credential.<url>.helper` is set to an empty value, which drops the
//!    helpers configured before for that URL (a `store` helper must not keep the token in
//!    clear text), then to `!'<this binary>' git-credential`. A remote saved with a CA file
//!    (`--ca`) also gets `http.<url>.sslCAInfo`, so that git verifies the daemon as the CLI
//!    does. `--no-git-credentials` skips this; `revboot logout` removes these values and
//!    nothing else.
//! 2. git runs `revboot git-credential get|store|erase` and writes the request's attributes
//!    (`protocol=http`, `host=127.0.0.1:8080`, maybe `path=…` and `username=…`) one
//!    `key=value` a line, up to an empty line; at most [`MAX_REQUEST`] bytes are read.
//! 3. `get` answers `username` (the one asked for, else `revboot`: the daemon takes any user
//!    name) and `password` (the token) when `protocol://host` is the scheme and host of a
//!    saved remote with a token (and `path`, when git sends it, lies under the remote's
//!    path). Otherwise it answers nothing, and git asks its next helper or the user.
//! 4. `store` and `erase` read the request and change nothing: the token is the remote's,
//!    saved by `revboot login` and forgotten by `revboot logout`, not git's to keep or drop.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;

use crate::cli::CredentialOperation as Operation;
use crate::remotes::{ClientConfig, normalise};

/// The most a request may hold.
pub const MAX_REQUEST: u64 = 64 * 1024;

/// The request's attributes that choose a remote.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    protocol: String,
    host: String,
    path: Option<String>,
    username: Option<String>,
}

/// Parses git's `key=value` lines up to an empty line; unknown keys are ignored, as git's
/// protocol asks of helpers.
fn parse(text: &str) -> Request {
    let mut request = Request::default();
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "protocol" => request.protocol = value.to_owned(),
            "host" => request.host = value.to_owned(),
            "path" => request.path = Some(value.to_owned()),
            "username" => request.username = Some(value.to_owned()),
            _ => {}
        }
    }
    request
}

/// The answer to `request` from `config` (rule 3): `username=…` and `password=…` lines, or
/// nothing.
fn answer(config: &ClientConfig, request: &Request) -> Option<String> {
    if request.protocol.is_empty() || request.host.is_empty() {
        return None;
    }
    let remote = config.remotes.values().find(|remote| {
        let Some((scheme, rest)) = normalise(&remote.url).split_once("://") else {
            return false;
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        let path_fits = match &request.path {
            None => true,
            Some(asked) => format!("/{}", asked.trim_start_matches('/'))
                .strip_prefix(path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        };
        scheme.eq_ignore_ascii_case(&request.protocol)
            && host.eq_ignore_ascii_case(&request.host)
            && path_fits
    })?;
    let token = remote.token.as_deref()?;
    // A value with a line break would end the answer early or add an attribute.
    if token.contains(['\n', '\0']) {
        return None;
    }
    let username = request
        .username
        .as_deref()
        .filter(|name| !name.contains(['\n', '\0']))
        .unwrap_or("revboot");
    Some(format!("username={username}\npassword={token}\n"))
}

/// `revboot git-credential <operation>`: reads git's request from standard input and
/// answers on standard output (rules 2 to 4).
pub fn helper(operation: Operation) -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::stdin()
        .lock()
        .take(MAX_REQUEST)
        .read_to_string(&mut text)
        .context("Cannot read git's credential request")?;
    let request = parse(&text);
    if operation != Operation::Get {
        tracing::debug!(?operation, host = request.host, "nothing to do");
        return Ok(());
    }
    let config = ClientConfig::load()?;
    match answer(&config, &request) {
        Some(answer) => {
            tracing::debug!(host = request.host, "answering with a remote's token");
            std::io::stdout()
                .write_all(answer.as_bytes())
                .context("Cannot answer git")?;
        }
        None => tracing::debug!(host = request.host, "no remote of revboot login there"),
    }
    Ok(())
}

/// The git configuration key of the helper for `url`.
fn key(url: &str) -> String {
    format!("credential.{}.helper", normalise(url))
}

/// The helper's command line as git runs it: a shell command (`!`) naming this binary.
fn command_line(binary: &Path) -> String {
    let path = binary.to_string_lossy().replace('\'', r"'\''");
    format!("!'{path}' git-credential")
}

/// `git config --global …`, its error output in the error.
fn git_config(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let output = Command::new("git")
        .args(["config", "--global"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("Cannot run git to set up its credentials")?;
    Ok(output)
}

/// The git configuration key of the CA file for `url`.
fn ca_key(url: &str) -> String {
    format!("http.{}.sslCAInfo", normalise(url))
}

/// Registers the helper for `url` in the global git configuration, and the CA file `ca`
/// (rule 1).
pub fn register(url: &str, ca: Option<&Path>) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("Cannot tell where revboot is installed")?;
    let key = key(url);
    forget(url, ca)?;
    let ca = ca.map(|ca| ca.to_string_lossy().into_owned());
    let helper = command_line(&binary);
    let mut settings = vec![
        ["--add", key.as_str(), ""],
        ["--add", key.as_str(), &helper],
    ];
    let ca_key = ca_key(url);
    if let Some(ca) = &ca {
        settings.push(["--replace-all", &ca_key, ca]);
    }
    for args in settings {
        let output = git_config(&args)?;
        if !output.status.success() {
            let _ = forget(url, ca.as_deref().map(Path::new));
            anyhow::bail!(
                "git config --global {} {} failed: {} (skip this with --no-git-credentials)",
                args[0],
                args[1],
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Removes the helper's values for `url` from the global git configuration, and the CA
/// file `ca` if it is the one set there, and nothing else (rule 1).
pub fn forget(url: &str, ca: Option<&Path>) -> anyhow::Result<()> {
    let key = key(url);
    unset(&["--unset-all", &key, "^$|^!.* git-credential$"])?;
    if let Some(ca) = ca {
        let ca = ca.to_string_lossy();
        unset(&["--fixed-value", "--unset-all", &ca_key(url), &ca])?;
    }
    Ok(())
}

/// `git config --global --unset…`: no such value is fine (git's exit status 5).
fn unset(args: &[&str]) -> anyhow::Result<()> {
    let output = git_config(args)?;
    if output.status.success() || output.status.code() == Some(5) {
        Ok(())
    } else {
        anyhow::bail!(
            "git config --global {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remotes::Remote;

    fn config() -> ClientConfig {
        let mut config = ClientConfig::default();
        for (name, url) in [
            ("local", "http://127.0.0.1:8080/"),
            ("sub", "https://r.example/base"),
        ] {
            config.remotes.insert(
                name.into(),
                Remote {
                    url: url.into(),
                    token: Some(format!("token-of-{name}")),
                    ca: None,
                },
            );
        }
        config
    }

    #[test]
    fn answers_only_for_a_saved_remote() {
        let config = config();
        let ask = |text: &str| answer(&config, &parse(text));
        assert_eq!(
            ask("protocol=http\nhost=127.0.0.1:8080\n\n").as_deref(),
            Some("username=revboot\npassword=token-of-local\n")
        );
        assert_eq!(
            ask("protocol=http\nhost=127.0.0.1:8080\nusername=git\nwwwauth[]=Basic\n\n").as_deref(),
            Some("username=git\npassword=token-of-local\n")
        );
        assert_eq!(
            ask("protocol=https\nhost=r.example\npath=base/git/app.git\n").as_deref(),
            Some("username=revboot\npassword=token-of-sub\n")
        );
        for other in [
            "protocol=https\nhost=127.0.0.1:8080\n",
            "protocol=http\nhost=127.0.0.1:8081\n",
            "protocol=http\nhost=127.0.0.1\n",
            "protocol=https\nhost=r.example\npath=other/git/app.git\n",
            "protocol=https\nhost=r.example\npath=basement/git/app.git\n",
            "host=127.0.0.1:8080\n",
            "",
        ] {
            assert_eq!(ask(other), None, "{other:?}");
        }
        // The request ends at its empty line.
        assert_eq!(ask("\nprotocol=http\nhost=127.0.0.1:8080\n"), None);
    }

    #[test]
    fn the_helper_command_line_quotes_the_binary() {
        assert_eq!(
            command_line(Path::new("/usr/bin/revboot")),
            "!'/usr/bin/revboot' git-credential"
        );
        assert_eq!(
            command_line(Path::new("/home/o'k/revboot")),
            r"!'/home/o'\''k/revboot' git-credential"
        );
    }
}
