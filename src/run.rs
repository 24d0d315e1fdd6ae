//! Turns a parsed command line into work, and errors into exit codes.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::action::{Action, ActionError, Deployments, MoveReason, Reply};
use crate::cli::{Cli, Command, ServeArgs, ServiceCommand};
use crate::client::Client;
use crate::config::{self, Config};
use crate::outcome::Outcome;
use crate::output::{Format, render};
use crate::remotes::{self, ClientConfig};

/// Loads the configuration: the file named on the command line, else `revbootd.toml` in
/// the current directory if present, else [`config::SYSTEM_FILE`] if present, else the
/// defaults; then the global flags.
pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::read(path)?,
        None => match [Path::new(config::FILE_NAME), Path::new(config::SYSTEM_FILE)]
            .into_iter()
            .find(|path| path.exists())
        {
            Some(path) => Config::read(path)?,
            None => Config::default(),
        },
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

/// The client the CLI commands use: the daemon and token chosen as `--help` says (`--url`,
/// `--remote`, the default remote of `revboot login`, the daemon configuration).
pub fn client(cli: &Cli, config: &Config) -> anyhow::Result<Client> {
    let remotes = ClientConfig::load()?;
    let chosen = match (&cli.url, &cli.remote) {
        (Some(url), _) => Some(
            remotes
                .remote_for(url)
                .cloned()
                .map(|remote| remotes::Remote {
                    url: url.clone(),
                    ..remote
                })
                .unwrap_or(remotes::Remote {
                    url: url.clone(),
                    token: None,
                    ca: None,
                }),
        ),
        (None, Some(name)) => Some(remotes.remote(name)?.clone()),
        // A configuration file named on the command line says which daemon.
        (None, None) if cli.config.is_some() => None,
        (None, None) => match &remotes.default {
            Some(name) => Some(remotes.remote(name)?.clone()),
            None => None,
        },
    };
    let (url, token, ca) = match chosen {
        Some(remote) => (remote.url, remote.token, remote.ca),
        None => {
            let scheme = if config.tls.is_on() { "https" } else { "http" };
            (format!("{scheme}://{}", config.http.listen), None, None)
        }
    };
    // --ca (REVBOOT_CA) first, then the remote's.
    let tls = crate::client::tls_config(cli.ca.as_deref().or(ca.as_deref()))?;
    let token = std::env::var("REVBOOT_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or(token)
        .or_else(|| config.http.token.clone())
        .or_else(|| {
            std::fs::read_to_string(config.data.join("token"))
                .ok()
                .map(|t| t.trim().to_owned())
        });
    Ok(Client::with_tls(
        &url,
        token,
        &config.data,
        &config.zone,
        tls,
    ))
}

/// The service a command names, or the one the current directory's git remotes name on
/// the daemon `client` talks to.
fn service(named: Option<&str>, client: &Client) -> Result<String, ActionError> {
    match named {
        Some(service) => Ok(service.to_owned()),
        None => {
            let here = std::env::current_dir().map_err(|error| {
                ActionError::Invalid(format!(
                    "No service given, and the current directory is unreadable ({error}): name the service"
                ))
            })?;
            crate::remotes::infer_service(&here, client.url())
        }
    }
}

/// The log filter the flags ask for: `-q` errors only, `-v`… more; `None`: `RUST_LOG`, if
/// set, else the command's default (`info` for the daemon, `warn` for the others).
pub fn log_filter(cli: &Cli) -> Option<&'static str> {
    let daemon = matches!(cli.command, Command::Serve(_) | Command::Demo(_));
    match (cli.quiet, cli.verbose, daemon) {
        (true, _, _) => Some("error"),
        (false, 0, _) if std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty()) => None,
        (false, 0, true) => Some("info"),
        (false, 0, false) => Some("warn"),
        (false, 1, false) => Some("info"),
        (false, 1, true) | (false, 2, false) => Some("debug"),
        // ureq's trace is a hex dump of each request, its Authorization header (the token)
        // included: never past debug.
        (false, _, _) => Some("trace,ureq_proto=debug"),
    }
}

/// Runs one command line.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    // git's helper needs no daemon configuration, and must work wherever git runs it.
    if let Command::GitCredential { operation } = cli.command {
        crate::credential::helper(operation)?;
        return Ok(Outcome::Done);
    }
    let mut config = load_config(&cli)?;
    let client = || client(&cli, &config);
    let action = match &cli.command {
        Command::Serve(args) => {
            apply_serve_args(&mut config, args)?;
            runtime()?.block_on(crate::daemon::serve(config))?;
            return Ok(Outcome::Done);
        }
        Command::Demo(args) => {
            apply_serve_args(&mut config, &args.serve)?;
            runtime()?.block_on(crate::demo::demo(
                config,
                args.examples.as_deref(),
                args.once,
            ))?;
            return Ok(Outcome::Done);
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            // Into memory first: clap_complete panics on a failed write (a closed pipe).
            clap_complete::generate(*shell, &mut command, "revboot", &mut script);
            write_all_stdout(&script).context("Cannot write the completion script")?;
            return Ok(Outcome::Done);
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut page)
                .context("Cannot render the manual page")?;
            write_all_stdout(&page).context("Cannot write the manual page")?;
            return Ok(Outcome::Done);
        }
        Command::Login(args) => return crate::login::login(args, &cli, &config),
        Command::GitCredential { .. } => unreachable!("handled above"),
        Command::Logout { name } => return crate::login::logout(name.as_deref(), &cli),
        Command::Remote { service: named } => {
            let client = client()?;
            let service = match service(named.as_deref(), &client) {
                Ok(service) => service,
                Err(error) => return Ok(Outcome::Failed(error)),
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}/git/{service}.git", client.url());
            if !cli.quiet {
                let _ = writeln!(
                    out,
                    "# git gets the token from `revboot login`'s credential helper, or asks for it as a password (REVBOOT_TOKEN, the remote's in {}, or {})",
                    crate::remotes::path().map_or_else(
                        || "the client configuration".to_owned(),
                        |p| p.display().to_string()
                    ),
                    config.data.join("token").display(),
                );
            }
            return Ok(Outcome::Done);
        }
        Command::Bisect(args) => {
            let client = client()?;
            return match service(args.service.as_deref(), &client) {
                Ok(service) => crate::bisect::bisect(&client, &service, args),
                Err(error) => Ok(Outcome::Failed(error)),
            };
        }
        Command::BisectStep(args) => {
            let client = client()?;
            return crate::bisect::step(&client, args);
        }
        Command::Logs(args) => {
            let client = client()?;
            return match service(args.service.as_deref(), &client) {
                Ok(service) => logs(&client, &cli, &service, args),
                Err(error) => Ok(Outcome::Failed(error)),
            };
        }
        Command::Service(ServiceCommand::Add { name }) => Action::AddService { name: name.clone() },
        Command::Service(ServiceCommand::List) => Action::ListServices,
        Command::Service(ServiceCommand::Rename { service, to }) => Action::RenameService {
            service: service.clone(),
            to: to.clone(),
        },
        Command::Service(ServiceCommand::Delete {
            service,
            keep_deployments,
            ..
        }) => Action::DeleteService {
            service: service.clone(),
            deployments: if *keep_deployments {
                Deployments::Keep
            } else {
                Deployments::Remove
            },
        },
        Command::Config(command) => crate::upkeep::config_action(command)?,
        Command::Upgrade => {
            let client = client()?;
            return Ok(print(
                with_progress("upgrading the daemon", || crate::upkeep::upgrade(&client)),
                cli.json,
            ));
        }
        Command::Ps => Action::ListInstances,
        Command::Certs => Action::Daemon,
        Command::Nodes => Action::Nodes,
        Command::Builds { service } => Action::ListBuilds {
            service: service.clone(),
        },
        Command::Log { .. }
        | Command::Show(_)
        | Command::Diff(_)
        | Command::Rollback(_)
        | Command::Deploy(_)
        | Command::Stop(_)
        | Command::Kill(_) => {
            let client = client()?;
            return Ok(match service_action(&cli.command, &client) {
                Ok(action) => carry_out(&client, action, &cli),
                Err(error) => Outcome::Failed(error),
            });
        }
    };
    let client = client()?;
    Ok(carry_out(&client, action, &cli))
}

/// [`service`] for a command whose one word is a label: a user who meant that word as the
/// service (`revboot show hello`) is told it was taken as the label.
fn service_of_label(
    named: Option<&str>,
    label: &str,
    client: &Client,
) -> Result<String, ActionError> {
    service(named, client).map_err(|error| match (named, error) {
        (None, ActionError::Invalid(message)) => ActionError::Invalid(format!(
            "{message} (`{label}` is taken as the label: give the service first, SERVICE LABEL)"
        )),
        (_, error) => error,
    })
}

/// The action of a command about one service, which it may leave to the current checkout.
fn service_action(command: &Command, client: &Client) -> Result<Action, ActionError> {
    Ok(match command {
        Command::Log { service: named } => Action::History {
            service: service(named.as_deref(), client)?,
        },
        Command::Show(words) => {
            let (named, label) = words.split();
            Action::Show {
                service: service_of_label(named, label, client)?,
                label: label.to_owned(),
            }
        }
        Command::Diff(words) => {
            let (named, a, b) = words.split();
            Action::Diff {
                service: service(named, client)?,
                a: a.to_owned(),
                b: b.to_owned(),
            }
        }
        Command::Rollback(target) | Command::Deploy(target) => {
            let (named, label) = target.target.split();
            Action::MoveLive {
                service: service_of_label(named, label, client)?,
                label: label.to_owned(),
                reason: if matches!(command, Command::Rollback(_)) {
                    MoveReason::Rollback
                } else {
                    MoveReason::Deploy
                },
                check: !target.no_check,
            }
        }
        Command::Stop(args) | Command::Kill(args) => Action::StopInstance {
            service: service(args.service.as_deref(), client)?,
            label: args.label.clone(),
            client: args.client,
            replica: args.replica,
            kill: matches!(command, Command::Kill(_)),
        },
        other => {
            return Err(ActionError::Internal(format!(
                "{other:?} is not a command about one service"
            )));
        }
    })
}

/// Carries out `action` through `client` and prints the reply.
fn carry_out(client: &Client, action: Action, cli: &Cli) -> Outcome {
    let what = describe(&action);
    let result = if cli.quiet {
        execute_waiting(client, action, true)
    } else {
        with_progress(&what, || execute_waiting(client, action, false))
    };
    print(result, cli.json)
}

/// How long a command waits for a build on demand (`revboot deploy` of a source commit
/// that has no deployment yet).
const BUILD_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Carries out an action, asking again while what it names is being built on demand
/// (saying so once, unless `quiet`).
pub fn execute_waiting(client: &Client, action: Action, quiet: bool) -> Result<Reply, ActionError> {
    let deadline = std::time::Instant::now() + BUILD_WAIT;
    let mut said = quiet;
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
        Action::RenameService { service, to } => format!("renaming {service} to {to}"),
        Action::DeleteService { service, .. } => format!("deleting {service}"),
        _ => "waiting for the daemon".to_owned(),
    }
}

/// Prints a reply (as JSON with `json`), or turns the error into the outcome.
pub fn print(result: Result<Reply, ActionError>, json: bool) -> Outcome {
    match result {
        Ok(reply) => {
            let format = if json {
                Format::Json
            } else if crate::output::colour(&std::io::stdout()) {
                Format::Colour
            } else {
                Format::Plain
            };
            let _ = std::io::stdout()
                .lock()
                .write_all(render(&reply, format).as_bytes());
            Outcome::Done
        }
        Err(error) => Outcome::Failed(error),
    }
}

fn logs(
    client: &Client,
    cli: &Cli,
    service: &str,
    args: &crate::cli::LogsArgs,
) -> anyhow::Result<Outcome> {
    let build = Action::BuildLog {
        service: service.to_owned(),
        label: args.label.clone(),
    };
    let console = Action::ConsoleLogs {
        service: service.to_owned(),
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
        match client.follow_console(service, args.label.as_deref(), args.client) {
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

/// Writes `bytes` to standard output; a reader that stopped early (`revboot man | head`)
/// is no error.
fn write_all_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
