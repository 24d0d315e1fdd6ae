//! The CLI side of keeping revboot running: configuration variables (`revboot config`) and
//! upgrades in place (`revboot upgrade`).

use std::time::{Duration, Instant};

use crate::action::{Action, ActionError, Reply, Values};
use crate::cli::ConfigCommand;
use crate::client::Client;

/// How long `revboot upgrade` waits for the new program to serve.
const UPGRADE_WAIT: Duration = Duration::from_secs(120);

/// The action of a `revboot config …` command line; `NAME=value` pairs are checked here
/// (the daemon checks names and values again).
pub fn config_action(command: &ConfigCommand) -> anyhow::Result<Action> {
    Ok(match command {
        ConfigCommand::Set {
            service,
            pairs,
            stdin,
            restart,
        } => {
            let mut set = Values::default();
            if *stdin {
                let [name] = pairs.as_slice() else {
                    anyhow::bail!(
                        "with --stdin, give one NAME (its value is read from standard input)"
                    );
                };
                if name.contains('=') {
                    anyhow::bail!(
                        "with --stdin, give the NAME alone (its value is read from standard input)"
                    );
                }
                set.0
                    .insert(name.clone(), value_from(std::io::stdin().lock())?);
            }
            for pair in pairs.iter().filter(|_| !*stdin) {
                let Some((name, value)) = pair.split_once('=') else {
                    // The pair is not echoed: it may be a secret with its `=` forgotten.
                    anyhow::bail!("give each variable as NAME=value (an argument has no `=`)");
                };
                set.0.insert(name.to_owned(), value.to_owned());
            }
            Action::ConfigChange {
                service: service.clone(),
                set,
                unset: Vec::new(),
                restart: *restart,
            }
        }
        ConfigCommand::Unset {
            service,
            names,
            restart,
        } => Action::ConfigChange {
            service: service.clone(),
            set: Values::default(),
            unset: names.clone(),
            restart: *restart,
        },
        ConfigCommand::List { service, show } => Action::Config {
            service: service.clone(),
            show: *show,
        },
    })
}

/// The most `config set --stdin` reads: more than any value may be, so that the daemon's
/// answer says why a value is too long.
const STDIN_VALUE_LIMIT: u64 = 1 << 20;

/// A value given on standard input: its bytes (bounded), one trailing newline dropped.
fn value_from(input: impl std::io::Read) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    input
        .take(STDIN_VALUE_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| anyhow::anyhow!("cannot read the value from standard input: {error}"))?;
    if bytes.len() as u64 > STDIN_VALUE_LIMIT {
        anyhow::bail!("the value on standard input is over {STDIN_VALUE_LIMIT} bytes");
    }
    let mut value = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("the value on standard input is not UTF-8"))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    Ok(value)
}

/// `revboot upgrade`: asks the daemon to upgrade in place, then waits until the new
/// program serves; the daemon as it is then.
pub fn upgrade(client: &Client) -> Result<Reply, ActionError> {
    let before = match client.execute(Action::Upgrade)? {
        Reply::Daemon(before) => before,
        other => return Ok(other),
    };
    let deadline = Instant::now() + UPGRADE_WAIT;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        match client.execute(Action::Daemon) {
            Ok(Reply::Daemon(now)) if now.upgrades > before.upgrades => {
                return Ok(Reply::Daemon(now));
            }
            _ if Instant::now() > deadline => {
                return Err(ActionError::Unavailable(format!(
                    "The daemon (pid {}) did not serve again within {}s after the upgrade began",
                    before.pid,
                    UPGRADE_WAIT.as_secs()
                )));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_on_stdin_loses_one_trailing_newline_and_is_bounded() {
        assert_eq!(value_from(&b"sk-1\n"[..]).expect("value"), "sk-1");
        assert_eq!(value_from(&b"sk-1\r\n"[..]).expect("value"), "sk-1");
        assert_eq!(
            value_from(&b"two\nlines\n\n"[..]).expect("value"),
            "two\nlines\n"
        );
        assert_eq!(value_from(&b""[..]).expect("value"), "");
        let long = vec![b'x'; usize::try_from(STDIN_VALUE_LIMIT).expect("fits") + 1];
        assert!(value_from(&long[..]).is_err());
        assert!(value_from(&b"\xff\xfe"[..]).is_err());
    }
}
