//! The command line: every subcommand and flag, parsed by clap.
//!
//! Parsing only; [`crate::run`] turns a [`Cli`] into work.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

/// What `--help` says after the options: exit codes, JSON errors, where settings come from.
pub const AFTER_HELP: &str = "\
Exit status:
  0  success
  1  revboot or its surroundings failed (a configuration file, a file, an internal error)
  2  a bad command line or value, or a wrong token
  3  not found, ambiguous, or in conflict (a name taken, builds running, a failed check)
  4  unavailable: try again (the daemon is not running, a limit is reached, being built)
  `bisect` exits 0 when it names the first bad revision; `bisect-step` uses git bisect's codes.

With --json, errors are printed to stdout as {\"error\": kind, \"message\": text}; kind is
one of the API's (invalid, not_found, ambiguous, conflict, unauthorized, unavailable,
building, internal), `usage` (a bad command line) or `failed` (exit status 1).

The daemon to talk to: --url (REVBOOT_URL), else --remote NAME (REVBOOT_REMOTE), else the
default remote of `revboot login` ($XDG_CONFIG_HOME/revboot/config.toml), else the daemon
configuration: --config, ./revbootd.toml, /etc/revboot/revbootd.toml. The token:
REVBOOT_TOKEN, else the remote's, else the configuration's or <data>/token.
A command that names no service takes it from the git remote of the current directory
that points at that daemon's /git/<service>.git.

Colour only on a terminal, never with NO_COLOR set.";

/// revboot: git-backed unikernel deployment.
#[derive(Debug, Parser)]
#[command(name = "revboot", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    /// The daemon configuration file (`revbootd.toml`; default: ./revbootd.toml, else
    /// /etc/revboot/revbootd.toml).
    #[arg(long, global = true, env = "REVBOOT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The data directory (overrides the configuration file).
    #[arg(long, global = true, env = "REVBOOT_DATA")]
    pub data: Option<PathBuf>,
    /// The daemon's HTTP address, for commands that talk to it.
    #[arg(long, global = true, env = "REVBOOT_URL")]
    pub url: Option<String>,
    /// A CA certificate file (PEM) to verify an `https://` daemon with, instead of the
    /// system's roots (`revboot login --ca` saves it with the remote).
    #[arg(long, global = true, env = "REVBOOT_CA")]
    pub ca: Option<PathBuf>,
    /// A remote saved by `revboot login`, for commands that talk to a daemon.
    #[arg(long, global = true, env = "REVBOOT_REMOTE")]
    pub remote: Option<String>,
    /// Print listings, and errors, as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output: -v info, -vv debug, -vvv trace (instead of RUST_LOG).
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Errors only: no progress, hints or warnings.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: DNS, handshake proxy, builder, git smart HTTP and the API.
    Serve(ServeArgs),
    /// Start the daemon with defaults, push the hello example twice with stock git, and keep
    /// serving.
    Demo(DemoArgs),
    /// Save a daemon's URL and token as a remote (the default one) in the client
    /// configuration; the token is read from standard input, or asked for on a terminal.
    Login(LoginArgs),
    /// Forget a remote saved by `revboot login` (default: the default remote), and its git
    /// credential helper.
    Logout {
        /// The remote.
        name: Option<String>,
    },
    /// git's credential helper for the remotes of `revboot login`, which registers it: git
    /// runs `revboot git-credential get` and gets the token of the remote it pushes to.
    GitCredential {
        /// What git asks.
        #[arg(value_enum)]
        operation: CredentialOperation,
    },
    /// Services: add, list, rename, delete.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print the git remote URL to push a service to.
    Remote {
        /// The service (default: the current checkout's).
        service: Option<String>,
    },
    /// Deployment history of a service.
    Log {
        /// The service (default: the current checkout's).
        service: Option<String>,
    },
    /// One deployment: manifest, image, source, build status.
    Show(ServiceLabel),
    /// Manifest diff and image size change between two deployments.
    Diff(ServiceDiff),
    /// Move the live pointer back to an older deployment.
    Rollback(LiveMove),
    /// Move the live pointer to a deployment.
    Deploy(LiveMove),
    /// Configuration variables and secrets of a service: kept encrypted outside git, given
    /// to instances booted after a change.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Upgrade the daemon in place: it executes its binary file again (replace the file
    /// first to upgrade), keeping its instances and connections; waits until it serves.
    Upgrade,
    /// TLS certificates: the daemon's (HTTPS) and the services' (ACME), with their expiry
    /// and any failure to get or renew one.
    Certs,
    /// The nodes of the daemon's cluster (`[cluster]`): id, HTTP, DNS, pools, capacity.
    Nodes,
    /// Running instances.
    Ps,
    /// Stop an instance gracefully.
    Stop(InstanceArgs),
    /// Kill an instance.
    Kill(InstanceArgs),
    /// Build and console logs; with -f, running instances' consoles as they write.
    Logs(LogsArgs),
    /// Builds: queued, running and recently finished.
    Builds {
        /// Only this service's.
        service: Option<String>,
    },
    /// Find the first bad deployment (or, with --source, source commit) with `git bisect
    /// run` on the daemon the CLI talks to, booting (and building) each step on demand.
    Bisect(BisectArgs),
    /// Internal: one step of `revboot bisect`, run by `git bisect run`.
    #[command(hide = true)]
    BisectStep(BisectStepArgs),
    /// Print a shell completion script (bash: `source <(revboot completions bash)`; zsh: save
    /// it as `_revboot` in a directory of $fpath; fish: save it in
    /// ~/.config/fish/completions/revboot.fish).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `revboot man | man -l -`.
    Man,
}

/// `[SERVICE] LABEL`.
#[derive(Debug, Args)]
pub struct ServiceLabel {
    /// The service, which may be left out (default: the current checkout's), and a label:
    /// commit prefix, source commit prefix, tag or branch.
    #[arg(value_names = ["SERVICE", "LABEL"], num_args = 1..=2, required = true)]
    pub words: Vec<String>,
}

impl ServiceLabel {
    /// The service, if named, and the label.
    pub fn split(&self) -> (Option<&str>, &str) {
        match self.words.as_slice() {
            [service, label] => (Some(service), label),
            [label] => (None, label),
            _ => unreachable!("clap takes one or two words"),
        }
    }
}

/// `[SERVICE] LABEL [--no-check]`: where `rollback` and `deploy` move live.
#[derive(Debug, Args)]
pub struct LiveMove {
    /// The service and the label to make live.
    #[command(flatten)]
    pub target: ServiceLabel,
    /// Move without the health check of its manifest (`[deploy] check`).
    #[arg(long)]
    pub no_check: bool,
}

/// `[SERVICE] A B`.
#[derive(Debug, Args)]
pub struct ServiceDiff {
    /// The service, which may be left out (default: the current checkout's), the older label
    /// and the newer one.
    #[arg(value_names = ["SERVICE", "A", "B"], num_args = 2..=3, required = true)]
    pub words: Vec<String>,
}

impl ServiceDiff {
    /// The service, if named, and the two labels.
    pub fn split(&self) -> (Option<&str>, &str, &str) {
        match self.words.as_slice() {
            [service, a, b] => (Some(service), a, b),
            [a, b] => (None, a, b),
            _ => unreachable!("clap takes two or three words"),
        }
    }
}

/// `revboot login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The daemon's address, e.g. `https://revboot.example:8080` (with `--ca`, verified
    /// with that CA file, which is saved with the remote).
    pub url: String,
    /// The remote's name (default: the URL's host and port).
    #[arg(long)]
    pub name: Option<String>,
    /// Leave git's configuration alone: by default the user's global git configuration gets
    /// `revboot git-credential` as the credential helper for this URL, so that `git push`
    /// to `<url>/git/<service>.git` authenticates with the token, which stays out of URLs.
    #[arg(long)]
    pub no_git_credentials: bool,
}

/// What git asks of its credential helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CredentialOperation {
    /// Credentials for a URL: the token of the remote at that URL, if one is saved.
    Get,
    /// Credentials that worked (nothing to do: the token is the remote's).
    Store,
    /// Credentials that were refused (nothing to do: `revboot logout` forgets a remote).
    Erase,
}

/// `revboot serve`.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// DNS listen address (UDP and TCP).
    #[arg(long)]
    pub dns: Option<SocketAddr>,
    /// HTTP listen address.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// The DNS zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// A service address pool (`address/prefix`, IPv4 or IPv6); repeat for several. Replaces
    /// the configured pools.
    #[arg(long = "pool")]
    pub pools: Vec<revboot_deployer::config::Prefix>,
    /// The token for pushes and the API (reads too, unless `[http] public_reads`); default:
    /// `[http] token`, else one generated into `<data>/token`.
    // Its value never shows in `--help`, which would print it beside the variable's name.
    #[arg(long, env = "REVBOOT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `revboot demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Daemon settings.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// A folder with a `hello` service to push instead of the one built in.
    #[arg(long)]
    pub examples: Option<PathBuf>,
    /// Push the examples, print what to try, and exit instead of serving on.
    #[arg(long)]
    pub once: bool,
}

/// `revboot service …`.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Create a service (its source repository).
    Add {
        /// The service name (a DNS label).
        name: String,
    },
    /// List services.
    List,
    /// Give a service a new name: its history, live pointer, tags and source repository
    /// move with it (the same revisions); its running instances are stopped; its old DNS
    /// names stop answering and every label answers under the new name.
    Rename {
        /// The service.
        service: String,
        /// Its new name (a DNS label).
        to: String,
    },
    /// Delete a service: its source repository, build cache and DNS names go, its running
    /// instances are stopped; its deployments are kept or removed, as asked.
    #[command(group = clap::ArgGroup::new("deployments").required(true))]
    Delete {
        /// The service (never inferred: name it).
        service: String,
        /// Keep its deployments in the deployment repository, under
        /// `refs/revboot/deleted/<service>/<unix ms>/`, and its source repository on the
        /// daemon's host; the name is free again.
        #[arg(long, group = "deployments")]
        keep_deployments: bool,
        /// Remove its deployments (`git gc` frees their space) and its source repository.
        #[arg(long, group = "deployments")]
        remove_deployments: bool,
    },
}

/// `revboot config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Set variables (`NAME=value`…).
    Set {
        /// The service.
        service: String,
        /// `NAME=value` pairs; with `--stdin`, one `NAME`.
        #[arg(required = true)]
        pairs: Vec<String>,
        /// Read the value of the one NAME given from standard input (one trailing newline
        /// dropped): the value stays out of the process list and the shell's history.
        #[arg(long)]
        stdin: bool,
        /// Replace the running instances now (otherwise the next boot gets it).
        #[arg(long)]
        restart: bool,
    },
    /// Remove variables.
    Unset {
        /// The service.
        service: String,
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Replace the running instances now (otherwise the next boot gets it).
        #[arg(long)]
        restart: bool,
    },
    /// List the variables (names; values with --show).
    List {
        /// The service.
        service: String,
        /// Print the values too.
        #[arg(long)]
        show: bool,
    },
}

/// Which instance.
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// The service (default: the current checkout's).
    pub service: Option<String>,
    /// The label (default: live).
    pub label: Option<String>,
    /// The client of a per-client instance.
    #[arg(long)]
    pub client: Option<IpAddr>,
    /// Which replica of a warm service's revision (`[run] min_instances`; `revboot ps`
    /// shows it as `#N` after the revision).
    #[arg(long, default_value_t = 0)]
    pub replica: u16,
}

/// `revboot logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The service (default: the current checkout's).
    pub service: Option<String>,
    /// One revision's label: its build log and consoles (default: the live revision's build
    /// log, and the consoles of every revision of the service).
    pub label: Option<String>,
    /// Only the build log.
    #[arg(long, conflicts_with = "console")]
    pub build: bool,
    /// Only console logs.
    #[arg(long)]
    pub console: bool,
    /// Keep printing: the consoles of running instances (and of those that start later) as
    /// they write, until interrupted.
    #[arg(long, short)]
    pub follow: bool,
    /// With --follow: only the instance of this client (per-client services).
    #[arg(long, requires = "follow")]
    pub client: Option<IpAddr>,
}

/// `revboot bisect`.
#[derive(Debug, Args)]
pub struct BisectArgs {
    /// The service (default: the current checkout's).
    pub service: Option<String>,
    /// A label known to be good (with --source: a source commit or ref).
    #[arg(long)]
    pub good: String,
    /// A label known to be bad (with --source: a source commit or ref).
    #[arg(long)]
    pub bad: String,
    /// Bisect the service's source history instead of its deployments: commits that have
    /// no deployment yet are built as the bisection visits them.
    #[arg(long)]
    pub source: bool,
    /// The check: exit 0 = good, 1–124 = bad, 125 = skip. Gets `REVBOOT_NAME` and `REVBOOT_ADDR`.
    #[arg(last = true, required = true)]
    pub check: Vec<String>,
}

/// `revboot bisect-step`.
#[derive(Debug, Args)]
pub struct BisectStepArgs {
    /// The service.
    pub service: String,
    /// The check command.
    #[arg(last = true, required = true)]
    pub check: Vec<String>,
}
