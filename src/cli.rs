//! The command line: every subcommand and flag, parsed by clap.
//!
//! Parsing only; [`crate::run`] turns a [`Cli`] into work.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// revboot: git-backed unikernel deployment.
#[derive(Debug, Parser)]
#[command(name = "revboot", version, about, long_about = None)]
pub struct Cli {
    /// The daemon configuration file (`revbootd.toml`).
    #[arg(long, global = true, env = "REVBOOT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The data directory (overrides the configuration file).
    #[arg(long, global = true, env = "REVBOOT_DATA")]
    pub data: Option<PathBuf>,
    /// The daemon's HTTP address, for commands that talk to it.
    #[arg(long, global = true, env = "REVBOOT_URL")]
    pub url: Option<String>,
    /// Print listings as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: DNS, handshake proxy, builder, git smart HTTP and the API.
    Serve(ServeArgs),
    /// Start the daemon with defaults, push examples/hello twice with stock git, and keep serving.
    Demo(DemoArgs),
    /// Services: add, list.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print the git remote URL to push a service to.
    Remote {
        /// The service.
        service: String,
    },
    /// Deployment history of a service.
    Log {
        /// The service.
        service: String,
    },
    /// One deployment: manifest, image, source, build status.
    Show {
        /// The service.
        service: String,
        /// A label: commit prefix, source commit prefix, tag or branch.
        label: String,
    },
    /// Manifest diff and image size change between two deployments.
    Diff {
        /// The service.
        service: String,
        /// The older label.
        a: String,
        /// The newer label.
        b: String,
    },
    /// Move the live pointer back to an older deployment.
    Rollback {
        /// The service.
        service: String,
        /// The label to make live.
        label: String,
        /// Move without the health check of its manifest (`[deploy] check`).
        #[arg(long)]
        no_check: bool,
    },
    /// Move the live pointer to a deployment.
    Deploy {
        /// The service.
        service: String,
        /// The label to make live.
        label: String,
        /// Move without the health check of its manifest (`[deploy] check`).
        #[arg(long)]
        no_check: bool,
    },
    /// Configuration variables and secrets of a service: kept encrypted outside git, given
    /// to instances booted after a change.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Upgrade the daemon in place: it executes its binary file again (replace the file
    /// first to upgrade), keeping its instances and connections; waits until it serves.
    Upgrade,
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
    /// run` on the daemon at --url, booting (and building) each step on demand.
    Bisect(BisectArgs),
    /// Internal: one step of `revboot bisect`, run by `git bisect run`.
    #[command(hide = true)]
    BisectStep(BisectStepArgs),
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
    /// The token for pushes and API writes.
    #[arg(long, env = "REVBOOT_TOKEN")]
    pub token: Option<String>,
}

/// `revboot demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Daemon settings.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Where the example sources are.
    #[arg(long, default_value = "examples")]
    pub examples: PathBuf,
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
}

/// `revboot config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Set variables (`NAME=value`…).
    Set {
        /// The service.
        service: String,
        /// `NAME=value` pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
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
    /// The service.
    pub service: String,
    /// The label (default: live).
    pub label: Option<String>,
    /// The client of a per-client instance.
    #[arg(long)]
    pub client: Option<IpAddr>,
}

/// `revboot logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The service.
    pub service: String,
    /// The label (default: live).
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
    /// The service.
    pub service: String,
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
