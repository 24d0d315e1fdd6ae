//! Turns a parsed command line into work, and errors into exit codes.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::action::{Action, ActionError, MoveReason, Reply};
use crate::cli::{Cli, Command, ServeArgs, ServiceCommand};
use crate::client::Client;
use crate::config::{self, Config};
use crate::outcome::Outcome;
use crate::output::render;

/// Loads the configuration: the file named on the command line, else `revbootd.toml` in
/// the current directory if present, else the defaults; then the global flags.
pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::read(path)?,
        None if Path::new(config::FILE_NAME).exists() => {
            Config::read(Path::new(config::FILE_NAME))?
        }
        None => Config::default(),
    };
    if let Some(data) = &cli.data {
        config.data = data.clone();
    }
    Ok(config)
}

/// Applies `serve` flags over the configuration.
pub fn apply_serve_args(config: &mut Config, args: &ServeArgs) -> anyhow::Result<()> {
    if let Some(dns) = args.dns {
        config.dns.listen = vec![dns];
    }
    if let Some(http) = args.http {
        config.http.listen = http;
    }
    if let Some(zone) = &args.zone {
        config.zone = zone.clone();
    }
    if !args.pools.is_empty() {
        config.instances.pools = args.pools.clone();
    }
    if let Some(token) = &args.token {
        config.http.token = Some(token.clone());
    }
    config.validate()?;
    Ok(())
}

/// The client the CLI commands use.
pub fn client(cli: &Cli, config: &Config) -> Client {
    let url = cli
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.http.listen));
    let token = std::env::var("REVBOOT_TOKEN")
        .ok()
        .or_else(|| config.http.token.clone())
        .or_else(|| {
            std::fs::read_to_string(config.data.join("token"))
                .ok()
                .map(|t| t.trim().to_owned())
        });
    Client::new(&url, token, &config.data, &config.zone)
}

/// Runs one command line.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let mut config = load_config(&cli)?;
    let action = match &cli.command {
        Command::Serve(args) => {
            apply_serve_args(&mut config, args)?;
            runtime()?.block_on(crate::daemon::serve(config))?;
            return Ok(Outcome::Done);
        }
        Command::Demo(args) => {
            apply_serve_args(&mut config, &args.serve)?;
            runtime()?.block_on(crate::demo::demo(config, &args.examples, args.once))?;
            return Ok(Outcome::Done);
        }
        Command::Remote { service } => {
            let client = client(&cli, &config);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}/git/{service}.git", client.url());
            let _ = writeln!(
                out,
                "# push with the token as password: git push http://git:$(cat {})@{}/git/{service}.git main",
                config.data.join("token").display(),
                client.url().trim_start_matches("http://")
            );
            return Ok(Outcome::Done);
        }
        Command::Bisect(args) => {
            let client = client(&cli, &config);
            return crate::bisect::bisect(&client, args);
        }
        Command::BisectStep(args) => {
            let client = client(&cli, &config);
            return crate::bisect::step(&client, args);
        }
        Command::Logs(args) => {
            let client = client(&cli, &config);
            return logs(&client, &cli, args);
        }
        Command::Service(ServiceCommand::Add { name }) => Action::AddService { name: name.clone() },
        Command::Service(ServiceCommand::List) => Action::ListServices,
        Command::Log { service } => Action::History {
            service: service.clone(),
        },
        Command::Show { service, label } => Action::Show {
            service: service.clone(),
            label: label.clone(),
        },
        Command::Diff { service, a, b } => Action::Diff {
            service: service.clone(),
            a: a.clone(),
            b: b.clone(),
        },
        Command::Rollback {
            service,
            label,
            no_check,
        } => Action::MoveLive {
            service: service.clone(),
            label: label.clone(),
            reason: MoveReason::Rollback,
            check: !no_check,
        },
        Command::Deploy {
            service,
            label,
            no_check,
        } => Action::MoveLive {
            service: service.clone(),
            label: label.clone(),
            reason: MoveReason::Deploy,
            check: !no_check,
        },
        Command::Config(command) => crate::upkeep::config_action(command)?,
        Command::Upgrade => {
            let client = client(&cli, &config);
            return Ok(print(
                with_progress("upgrading the daemon", || crate::upkeep::upgrade(&client)),
                cli.json,
            ));
        }
        Command::Ps => Action::ListInstances,
        Command::Builds { service } => Action::ListBuilds {
            service: service.clone(),
        },
        Command::Stop(args) | Command::Kill(args) => Action::StopInstance {
            service: args.service.clone(),
            label: args.label.clone(),
            client: args.client,
            kill: matches!(cli.command, Command::Kill(_)),
        },
    };
    let client = client(&cli, &config);
    let what = describe(&action);
    Ok(print(
        with_progress(&what, || execute_waiting(&client, action)),
        cli.json,
    ))
}

/// How long a command waits for a build on demand (`revboot deploy` of a source commit
/// that has no deployment yet).
const BUILD_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Carries out an action, asking again while what it names is being built on demand.
pub fn execute_waiting(client: &Client, action: Action) -> Result<Reply, ActionError> {
    let deadline = std::time::Instant::now() + BUILD_WAIT;
    let mut said = false;
    loop {
        match client.execute(action.clone()) {
            Err(ActionError::Building(why)) if std::time::Instant::now() < deadline => {
                if !said {
                    let _ = writeln!(std::io::stderr(), "revboot: {why}");
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Runs `work`, showing a spinner on a terminal once it has taken more than a second.
pub fn with_progress<T>(message: &str, work: impl FnOnce() -> T) -> T {
    let progress =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
    progress.set_style(indicatif::ProgressStyle::default_spinner());
    progress.set_message(message.to_owned());
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let shown = progress.clone();
    let waiter = std::thread::spawn(move || {
        if finished
            .recv_timeout(std::time::Duration::from_secs(1))
            .is_err()
        {
            shown.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            shown.enable_steady_tick(std::time::Duration::from_millis(120));
        }
    });
    let result = work();
    let _ = done.send(());
    let _ = waiter.join();
    progress.finish_and_clear();
    result
}

fn describe(action: &Action) -> String {
    match action {
        Action::StopInstance {
            service,
            kill: true,
            ..
        } => format!("killing {service}"),
        Action::StopInstance { service, .. } => format!("stopping {service}"),
        Action::Summon { service, .. } => format!("booting {service}"),
        Action::MoveLive { service, .. } => format!("moving live of {service}"),
        Action::AddService { name } => format!("creating {name}"),
        _ => "waiting for the daemon".to_owned(),
    }
}

/// Prints a reply (as JSON with `json`), or turns the error into the outcome.
pub fn print(result: Result<Reply, ActionError>, json: bool) -> Outcome {
    match result {
        Ok(reply) => {
            let _ = std::io::stdout()
                .lock()
                .write_all(render(&reply, json).as_bytes());
            Outcome::Done
        }
        Err(error) => Outcome::Failed(error),
    }
}

fn logs(client: &Client, cli: &Cli, args: &crate::cli::LogsArgs) -> anyhow::Result<Outcome> {
    let build = Action::BuildLog {
        service: args.service.clone(),
        label: args.label.clone(),
    };
    let console = Action::ConsoleLogs {
        service: args.service.clone(),
        label: args.label.clone(),
        limit: None,
    };
    if !args.console {
        if let Outcome::Failed(error) = print(client.execute(build), cli.json) {
            return Ok(Outcome::Failed(error));
        }
        if args.build {
            return Ok(Outcome::Done);
        }
    }
    // With --follow the feed opens first, so that no output falls between the records of
    // stopped instances and the live consoles.
    let feed = if args.follow {
        match client.follow_console(&args.service, args.label.as_deref(), args.client) {
            Ok(feed) => Some(feed),
            Err(error) => return Ok(Outcome::Failed(error)),
        }
    } else {
        None
    };
    match client.execute(console) {
        Ok(Reply::Console(mut records)) => {
            records.reverse();
            print(Ok(Reply::Console(records)), cli.json);
        }
        Ok(other) => return Ok(print(Ok(other), cli.json)),
        Err(error) => return Ok(Outcome::Failed(error)),
    }
    let Some(feed) = feed else {
        return Ok(Outcome::Done);
    };
    for event in feed {
        let event = match event {
            Ok(event) => event,
            Err(error) => return Ok(Outcome::Failed(error)),
        };
        let mut out = std::io::stdout().lock();
        let written = if cli.json {
            serde_json::to_string(&event)
                .map_err(std::io::Error::other)
                .and_then(|line| writeln!(out, "{line}"))
        } else {
            write!(out, "{}", crate::output::console_event(&event))
        };
        // A closed stdout (`revboot logs -f | head`) ends following.
        if written.and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(Outcome::Done)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("revboot")
        .build()
        .context("Cannot start the async runtime")
}
