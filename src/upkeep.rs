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
            restart,
        } => {
            let mut set = Values::default();
            for pair in pairs {
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
