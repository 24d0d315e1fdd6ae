//! `revboot serve`: one daemon that wires every part.
//!
//! 1. The data directory: `deploy.git` (the store), `src/` (source repositories, the
//!    builder's), `deployer/` (redb state, image cache, scratch), `token` (generated when
//!    the configuration names none; mode 0600).
//! 2. The deployer boots instances; its own sockets bind ephemeral ports on each service
//!    address, because the handshake proxy owns `address:port`.
//! 3. The proxy wraps the deployer (it implements the same `Instances` trait): a summon
//!    binds the listener before the address is handed out. With `[front]`, the proxy's
//!    front door listens too (bound before anything serves; an address the host does not
//!    own stops the start with an error naming it), and DNS answers its address for the
//!    services that choose it.
//! 4. The DNS server answers from the proxy, through builds on demand: a name for a source
//!    commit that has no deployment yet builds it (`crate::on_demand`).
//! 5. One HTTP server carries git smart HTTP (the builder's router), the API with its live
//!    feeds, `/metrics` and the dashboard at `/`; all of them need the token (the dashboard:
//!    a session opened with it), reads included, unless `[http] public_reads` is on. With
//!    `[tls]` it speaks HTTPS only ([`crate::tls`]), and the git hooks reach it on
//!    `<data>/http.sock`; with `[acme]`, certificates come by DNS-01 through step 4's server.
//! 6. SIGTERM or SIGINT: stop accepting HTTP and DNS, mark running builds interrupted, stop
//!    instances (their logs go back to the store), then exit.
//! 7. `revboot upgrade`: the daemon executes its binary again, handing its sockets and
//!    running instances to the new program ([`crate::handover`]); a daemon started so
//!    takes them over instead of binding and cleaning up.
//! 8. Promotions of revisions with a health check or `min_instances` wait for the new
//!    revision ([`crate::promote`]); the keeper of warm services runs through the proxy.

use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use revboot_builder::{Builder, BuilderConfig};
use revboot_deployer::{BackendPort, Deployer, DeployerConfig, InstanceKey, Instances};
use revboot_dns::{DnsConfig, DnsServer};
use revboot_proxy::{FrontConfig, Proxy, ProxyConfig};
use revboot_store::{Revision, Store};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::action::{Action, ActionError, DaemonView, DeletedView, RenamedView, Reply, SummonView};
use crate::config::Config;
use crate::engine::{Engine, Runtime, error_chain, resolve_error};
use crate::handover::{Inherited, Sockets, TakenOver};
use crate::metrics::DaemonMetrics;
use crate::promote::Promotions;
pub use crate::signals::termination;
use crate::tls::Certificates;
use crate::wiring::{
    TlsParts, build_view, cannot_serve, config_view, first_address, instance_view, tenders,
};
pub use crate::wiring::{deployer_name, token};

/// How long a stop or kill through the API waits for the instance to end.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// Where a running daemon answers.
#[derive(Clone)]
pub struct DaemonInfo {
    /// The HTTP address (git, API, metrics).
    pub http: SocketAddr,
    /// The DNS address (UDP and TCP).
    pub dns: SocketAddr,
    /// The token for pushes and API writes (and reads, unless `[http] public_reads`).
    pub token: String,
    /// The file the token is kept in, when it is not given by the configuration.
    pub token_file: Option<PathBuf>,
    /// The data directory.
    pub data: PathBuf,
    /// The zone.
    pub zone: String,
    /// Where the front door listens (ports as bound), if it is open.
    pub front: revboot_proxy::FrontAddresses,
    /// `https` when `[tls]` is on, else `http`.
    pub scheme: &'static str,
}

impl std::fmt::Debug for DaemonInfo {
    // The token stays out: a Debug rendering can end up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonInfo")
            .field("http", &self.http)
            .field("dns", &self.dns)
            .field("token_file", &self.token_file)
            .field("data", &self.data)
            .field("zone", &self.zone)
            .field("front", &self.front)
            .finish_non_exhaustive()
    }
}

impl DaemonInfo {
    /// The git remote URL of a service, with the token as password. Secret: for git's
    /// command line, never for a log or a printed hint (see [`DaemonInfo::remote_hint`]).
    pub fn remote(&self, service: &str) -> String {
        format!(
            "{}://git:{}@{}/git/{service}.git",
            self.scheme, self.token, self.http
        )
    }

    /// The git remote URL of a service as a shell snippet that reads the token from its
    /// file (or says where to put it), for printing.
    pub fn remote_hint(&self, service: &str) -> String {
        let password = match &self.token_file {
            Some(file) => format!("$(cat {})", file.display()),
            None => "<token>".to_owned(),
        };
        format!(
            "{}://git:{password}@{}/git/{service}.git",
            self.scheme, self.http
        )
    }
}

/// The daemon's instance-related actions, over the deployer and the proxy.
struct DaemonRuntime {
    store: Store,
    zone: String,
    builder: Builder,
    deployer: Arc<Deployer>,
    front: Arc<dyn Instances>,
    handle: tokio::runtime::Handle,
    promotions: Promotions,
    /// The daemon as `revboot upgrade` shows it.
    view: DaemonView,
    /// Starts an upgrade in place (`None`: this daemon cannot, e.g. `revboot demo`).
    upgrade: Option<watch::Sender<bool>>,
    /// The certificates served, and how each stands.
    certificates: Arc<Certificates>,
    /// Wakes the ACME task (a service added wants its certificate).
    acme_wake: Arc<tokio::sync::Notify>,
    /// The cluster this daemon is a node of (`[cluster]`), if any.
    cluster: Option<revboot_cluster::Cluster>,
}

impl DaemonRuntime {
    /// A service that exists (its source repository, or deployments), else not found.
    fn known(&self, service: &str) -> Result<(), ActionError> {
        let deployed = self.store.services().unwrap_or_default();
        let sourced = self.builder.services().unwrap_or_default();
        if deployed.iter().chain(&sourced).any(|name| name == service) {
            Ok(())
        } else {
            Err(ActionError::NotFound(format!("No service `{service}`")))
        }
    }
}

impl DaemonRuntime {
    fn parts(&self) -> crate::lifecycle::Parts<'_> {
        crate::lifecycle::Parts {
            store: &self.store,
            builder: &self.builder,
            deployer: &self.deployer,
            zone: &self.zone,
            cluster: self.cluster.as_ref(),
        }
    }
}

impl Runtime for DaemonRuntime {
    fn add_service(&self, name: &str) -> Result<(), ActionError> {
        self.handle.block_on(self.parts().add(name))?;
        self.acme_wake.notify_one();
        Ok(())
    }

    fn added_services(&self) -> Result<Vec<String>, ActionError> {
        self.builder.services().map_err(|error| {
            ActionError::Internal(format!("Cannot list the source repositories: {error}"))
        })
    }

    fn delete_service(&self, service: &str, keep: bool) -> Result<DeletedView, ActionError> {
        self.handle.block_on(self.parts().delete(service, keep))
    }

    fn rename_service(&self, from: &str, to: &str) -> Result<RenamedView, ActionError> {
        self.handle.block_on(self.parts().rename(from, to))
    }

    fn renamed_to(&self, service: &str) -> Option<String> {
        self.builder.renamed_to(service)
    }

    fn instances(&self, action: &Action) -> Result<Reply, ActionError> {
        match action {
            Action::ListInstances => Ok(Reply::Instances(
                self.deployer.list().iter().map(instance_view).collect(),
            )),
            Action::StopInstance {
                service,
                label,
                client,
                replica,
                kill,
            } => {
                let revision = self
                    .store
                    .resolve(service, label.as_deref())
                    .map_err(resolve_error)?;
                let key = InstanceKey {
                    service: service.clone(),
                    revision,
                    client: client.map(|client| self.deployer.client_of(client)),
                    replica: *replica,
                };
                let info = self
                    .deployer
                    .list()
                    .into_iter()
                    .find(|info| info.key == key)
                    .ok_or_else(|| ActionError::NotFound(format!("No running instance {key}")))?;
                let state = if *kill {
                    self.deployer.kill(&key)
                } else {
                    self.deployer.stop(&key)
                }
                .map_err(|error| ActionError::NotFound(error.to_string()))?;
                let final_state = self.handle.block_on(wait_final(state));
                let mut view = instance_view(&info);
                view.state = final_state;
                Ok(Reply::Stopped(view))
            }
            Action::Summon {
                service,
                label,
                client,
            } => {
                let resolved = self
                    .front
                    .resolve(service, label.as_deref())
                    .map_err(|error| match error {
                        revboot_deployer::ResolveError::Ambiguous { .. } => {
                            ActionError::Ambiguous(error.to_string())
                        }
                        revboot_deployer::ResolveError::NotBootable { .. } => {
                            ActionError::Conflict(error.to_string())
                        }
                        revboot_deployer::ResolveError::Store(_) => {
                            ActionError::Internal(error.to_string())
                        }
                        revboot_deployer::ResolveError::Building(why) => ActionError::Building(why),
                        _ => ActionError::NotFound(error.to_string()),
                    })?;
                let summoned = self
                    .front
                    .summon(service, &resolved.revision, *client)
                    .map_err(|error| ActionError::Unavailable(error.to_string()))?;
                Ok(Reply::Summoned(SummonView {
                    revision: resolved.revision.to_hex(),
                    dns_name: format!("{}.{service}.{}", resolved.revision.short(7), self.zone),
                    address: first_address(&summoned.addresses),
                    addresses: summoned.addresses.iter().map(|a| a.to_string()).collect(),
                    port: summoned.port,
                }))
            }
            other => Err(ActionError::Internal(format!(
                "{other:?} is not an instance action"
            ))),
        }
    }

    fn builds(&self, service: Option<&str>) -> Result<Vec<crate::action::BuildView>, ActionError> {
        let records = self.handle.block_on(self.builder.build_records(service));
        Ok(records.iter().map(build_view).collect())
    }

    fn build_on_demand(&self, service: &str, label: &str, unknown: ActionError) -> ActionError {
        match self.front.resolve(service, Some(label)) {
            Err(revboot_deployer::ResolveError::Building(why)) => ActionError::Building(why),
            _ => unknown,
        }
    }

    fn config(&self, action: &Action) -> Result<Reply, ActionError> {
        use revboot_deployer::vars::{Change, VarsError};
        match action {
            Action::Config { service, show } => {
                self.known(service)?;
                let vars = self.deployer.vars().get(service);
                Ok(Reply::Config(config_view(service, &vars, *show, None)))
            }
            Action::ConfigChange {
                service,
                set,
                unset,
                restart,
            } => {
                self.known(service)?;
                let change = Change {
                    set: set.0.clone().into_iter().collect(),
                    unset: unset.clone(),
                };
                let vars = self
                    .deployer
                    .vars()
                    .change(service, &change)
                    .map_err(|error| match error {
                        VarsError::Io { .. } | VarsError::Sealed { .. } => {
                            ActionError::Internal(error_chain(&error))
                        }
                        other => ActionError::Invalid(other.to_string()),
                    })?;
                // Names only: values are secrets.
                info!(service, ?change, "configuration changed");
                let restarted = restart.then(|| self.deployer.restart(service));
                Ok(Reply::Config(config_view(service, &vars, false, restarted)))
            }
            other => Err(ActionError::Internal(format!(
                "{other:?} is not a configuration action"
            ))),
        }
    }

    fn promote(&self, service: &str, revision: &Revision) -> Result<Option<String>, ActionError> {
        let manifest = self
            .store
            .manifest(revision)
            .map_err(crate::engine::read_error)?;
        let Some(manifest) = manifest.filter(Promotions::gated) else {
            return Ok(None);
        };
        self.handle
            .block_on(self.promotions.admit(service, *revision, &manifest))
            .map(Some)
            .map_err(|why| {
                ActionError::Conflict(format!(
                    "{} of `{service}` failed its health check: {why}; live unchanged",
                    revision.short(12)
                ))
            })
    }

    fn promoted(&self, _service: &str) {
        self.promotions.promoted();
    }

    fn daemon(&self, action: &Action) -> Result<Reply, ActionError> {
        if let Action::Nodes = action {
            return crate::cluster::nodes_view(self.cluster.as_ref()).map(Reply::Nodes);
        }
        let mut view = self.view.clone();
        view.certificates = self.certificates.status();
        if let Action::Upgrade = action {
            let Some(upgrade) = &self.upgrade else {
                return Err(ActionError::Conflict(
                    "Only a daemon started with `revboot serve` upgrades in place".to_owned(),
                ));
            };
            crate::handover::check_binary(std::path::Path::new(&view.binary))
                .map_err(|why| ActionError::Conflict(format!("Cannot upgrade: {why}")))?;
            info!(binary = view.binary, "upgrade in place asked for");
            upgrade.send_replace(true);
        }
        Ok(Reply::Daemon(view))
    }
}

async fn wait_final(mut state: watch::Receiver<revboot_deployer::InstanceState>) -> String {
    let waited = tokio::time::timeout(STOP_WAIT, state.wait_for(|s| s.is_final()))
        .await
        .map(|result| result.map(|state| state.to_string()));
    match waited {
        Ok(Ok(word)) => word,
        _ => state.borrow().to_string(),
    }
}

/// A daemon that has started: every part is listening.
pub struct Daemon {
    info: DaemonInfo,
    pub(crate) builder: Builder,
    pub(crate) deployer: Arc<Deployer>,
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) dns: revboot_dns::RunningServer,
    pub(crate) http: tokio::task::JoinHandle<std::io::Result<()>>,
    pub(crate) stop_http: watch::Sender<bool>,
    /// Second descriptors of the HTTP and DNS sockets, for an upgrade in place.
    pub(crate) sockets: Sockets,
    /// Set by `revboot upgrade`.
    pub(crate) upgrade: watch::Receiver<bool>,
    /// The binary an upgrade executes: the file this program was started from.
    pub(crate) binary: PathBuf,
    /// Upgrades in place so far.
    pub(crate) upgrades: u64,
    /// The cluster this daemon is a node of, if any: its lease is handed over.
    cluster: Option<revboot_cluster::Cluster>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts every part on the current tokio runtime; takes over from the previous program
    /// when this one was started by an upgrade in place ([`crate::handover`]).
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        Daemon::start_with(config, false).await
    }

    /// As [`Daemon::start`]; with `upgradable`, `revboot upgrade` sets its upgrade going
    /// (whoever runs it then calls [`Daemon::upgrade`]).
    pub async fn start_with(config: Config, upgradable: bool) -> anyhow::Result<Daemon> {
        config.validate()?;
        let inherited = crate::handover::inherit()?;
        let (mut front_handed, mut taken_over) = (Vec::new(), TakenOver::default());
        let (inherited_sockets, handed, upgrades, requested_at_ms, lease) = match inherited {
            Some(Inherited {
                sockets,
                front,
                instances,
                proxy,
                upgrades,
                requested_at_ms,
                lease,
            }) => {
                (front_handed, taken_over) = (front, proxy);
                (
                    Some(sockets),
                    instances,
                    upgrades,
                    Some(requested_at_ms),
                    lease,
                )
            }
            None => (None, Vec::new(), 0, None, None),
        };
        let handed_count = handed.len();
        let binary = std::env::current_exe().context("Cannot tell which binary this is")?;
        std::fs::create_dir_all(&config.data).with_context(|| {
            format!("Cannot create the data directory {}", config.data.display())
        })?;
        let data = std::fs::canonicalize(&config.data)?;
        let (token, token_file) = token(&config.http, &data)?;
        let store = Store::init(data.join("deploy.git"))
            .context("Cannot open the deployment repository")?;

        let mut deployer_config = DeployerConfig::new(data.join("deployer"));
        deployer_config.name = deployer_name(&data);
        deployer_config.pools = config.instances.pools.clone();
        deployer_config.client_prefixes = config.instances.client_prefixes;
        // Behind the proxy, instances listen on an ephemeral port of their service address;
        // in direct mode on the service port itself (the proxy then fronts nothing).
        deployer_config.backend_port = if config.instances.direct {
            BackendPort::Same
        } else {
            BackendPort::Ephemeral
        };
        deployer_config.steer = config.instances.steer;
        deployer_config.sandbox = config.sandbox.clone();
        deployer_config.max_instances = config.instances.max_total;
        deployer_config.max_per_service = config.instances.max_per_service;
        deployer_config.max_clients_per_service = config.instances.max_clients_per_service;
        deployer_config.idle_timeout_override_ms = config.instances.idle_timeout_ms;
        let deployer = Deployer::with_handover(
            deployer_config,
            store.clone(),
            tokio::runtime::Handle::current(),
            tenders(&config),
            handed,
        )
        .context("Cannot start the deployer")?;

        let certificates = Certificates::new();
        let challenges = revboot_dns::Challenges::new();
        let (stop_http, mut stopped) = watch::channel(false);
        let tls = TlsParts {
            config: &config,
            data: &data,
            certificates: &certificates,
            challenges: &challenges,
            stop: stop_http.subscribe(),
        };
        tls.load(&store)?;
        let proxy = if config.front.is_open() {
            let front = FrontConfig {
                http: config.front.http,
                tls: config.front.tls,
                zone: config.zone.clone(),
                head_timeout: Duration::from_millis(config.front.head_timeout_ms),
                max_head: config.front.max_head_bytes,
                max_pending: config.front.max_pending,
                build_wait: Duration::from_millis(config.front.build_wait_ms),
                // `tls = "terminate"` services: the certificate for the name asked for.
                terminate: Some(revboot_proxy::Terminate(crate::tls::front_door_config(
                    Arc::new(crate::tls::FrontDoor(certificates.clone())),
                ))),
            };
            // The error names the address (one the host does not own, or one in use).
            Proxy::with_front_inheriting(
                ProxyConfig::default(),
                front,
                deployer.clone(),
                front_handed,
            )?
        } else {
            Proxy::new(ProxyConfig::default(), deployer.clone())
        };
        taken_over.adopt(&proxy);
        let front_door = proxy.front_addresses();
        let front: Arc<dyn Instances> = proxy.clone();
        let promotions = Promotions::new(deployer.clone(), front.clone());
        let warm = front.clone();

        // A second descriptor of each socket is kept for an upgrade in place.
        let (http_std, dns_sockets) = match inherited_sockets {
            Some(sockets) => (sockets.http, Some(sockets.dns)),
            None => {
                let listener = std::net::TcpListener::bind(config.http.listen)
                    .with_context(|| cannot_serve("HTTP", &config.http.listen, "http"))?;
                (listener, None)
            }
        };
        http_std.set_nonblocking(true)?;
        let http_kept = http_std.try_clone()?;
        let listener = tokio::net::TcpListener::from_std(http_std)?;
        let http_addr = listener.local_addr()?;

        let scheme = if config.tls.is_on() { "https" } else { "http" };
        let mut builder_config = BuilderConfig::new(
            &data,
            store.clone(),
            config.zone.clone(),
            format!("{scheme}://{http_addr}"),
        );
        builder_config.push_tokens = vec![token.clone()];
        // Over HTTPS, hooks reach the daemon on a private socket (crate::wiring::serve_local).
        builder_config.hook_socket = config.tls.is_on().then(|| data.join("http.sock"));
        builder_config.deploy_tokens = config.http.deploy_tokens.clone();
        builder_config.anonymous_fetch = config.http.public_reads;
        builder_config.max_parallel = config.parallel_builds();
        builder_config.max_queued = config.builds.queue;
        builder_config.max_commits_per_push = config.commits_per_push();
        builder_config.name = deployer_name(&data);
        builder_config.sandbox = config.builds.sandbox.clone();
        builder_config.gate = Some(Arc::new(promotions.clone()));
        let coordinated = crate::replicate::Coordinated::new(&config, &store, &token);
        builder_config.coordinator = coordinated.clone().map(|c| c as _);
        let builder_config_socket = builder_config.hook_socket.clone();
        let builder = Builder::start(builder_config)
            .await
            .context("Cannot start the builder")?;

        // A name for a source commit that has no deployment builds it (see on_demand).
        let front: Arc<dyn Instances> = Arc::new(crate::on_demand::OnDemand::new(
            front,
            builder.clone(),
            tokio::runtime::Handle::current(),
        ));
        // The front door too: a name for a source commit with no deployment waits for its build.
        proxy.resolve_names_through(&front);
        let (placed, dns_front, front) = crate::cluster::placement(&config, &front, &store, &token);
        deployer.keep_warm(crate::cluster::warm_front(placed.as_ref(), warm));
        let dns_config = DnsConfig {
            listen: config.dns.listen[0],
            also_listen: config.dns.listen[1..].to_vec(),
            zone: config.zone.clone(),
            ttl: Duration::from_secs(u64::from(config.dns.ttl_secs)),
            delayed_answers: config.dns.delayed_answers,
            trust_ecs: config.dns.trust_ecs,
            nameservers: config
                .dns
                .nameservers
                .iter()
                .map(|ns| revboot_dns::Nameserver {
                    name: ns.name.clone(),
                    addresses: ns.addresses.clone(),
                })
                .collect(),
            limits: revboot_dns::Limits {
                boots_per_second: config.dns.boots_per_second,
                boot_burst: config.dns.boot_burst,
                rrl_per_second: config.dns.responses_per_second,
                rrl_burst: config.dns.responses_per_second.saturating_mul(2),
                max_tcp_connections: config.dns.max_tcp_connections,
                max_tcp_per_prefix: config.dns.max_tcp_per_prefix,
                ..revboot_dns::Limits::default()
            },
            // One address per family at most: `[front]` validation keeps both listeners on
            // one address.
            front: Vec::from_iter(front_door.http.or(front_door.tls).map(|a| a.ip())),
            challenges: challenges.clone(),
            shared_nameservers: placed.as_ref().map(|placed| placed.nameservers().clone()),
            ..DnsConfig::default()
        };
        let dns = match dns_sockets {
            Some(sockets) => DnsServer::from_sockets(dns_config, dns_front, sockets),
            None => DnsServer::bind(dns_config, dns_front).await,
        }
        .with_context(|| cannot_serve("DNS", &config.dns.listen, "dns"))?;
        let dns_kept = dns.sockets().context("Cannot keep the DNS sockets")?;
        let dns_metrics = dns.metrics();
        let dns_also: Vec<String> = dns.also_addrs().iter().map(ToString::to_string).collect();
        let dns = dns.spawn();

        let (upgrade_tx, upgrade_rx) = watch::channel(false);
        let acme_wake = Arc::new(tokio::sync::Notify::new());
        let tls = tls.start(crate::wiring::services(&builder, &store), acme_wake.clone());
        let node = crate::cluster::Node {
            http: format!("{scheme}://{http_addr}"),
            dns: dns.local_addr(),
            store: &store,
            token: &token,
            placed: placed.as_ref(),
            deployer: &deployer,
            builder: (&builder, coordinated.as_ref()),
            lease,
        };
        let cluster = crate::cluster::join(&config, node, stop_http.subscribe()).await?;
        let runtime = Arc::new(DaemonRuntime {
            store: store.clone(),
            zone: config.zone.clone(),
            builder: builder.clone(),
            deployer: deployer.clone(),
            front,
            handle: tokio::runtime::Handle::current(),
            promotions,
            view: DaemonView {
                pid: std::process::id(),
                binary: binary.display().to_string(),
                upgrades,
                serving_since_ms: crate::handover::unix_ms(),
                last_upgrade_ms: requested_at_ms
                    .map(|at| crate::handover::unix_ms().saturating_sub(at)),
                last_upgrade_instances: requested_at_ms.map(|_| handed_count),
                certificates: Vec::new(),
            },
            upgrade: upgradable.then_some(upgrade_tx),
            certificates: certificates.clone(),
            acme_wake,
            cluster: cluster.clone(),
        });
        let engine = Engine::with_runtime(store.clone(), &config.zone, runtime);
        let metrics = Arc::new(DaemonMetrics::new(
            dns_metrics,
            proxy.clone(),
            deployer.clone(),
            builder.clone(),
            certificates.clone(),
        ));
        let feeds = crate::feeds::FeedState::new(
            Arc::new(crate::feeds::DaemonFeeds {
                store: store.clone(),
                deployer: deployer.clone(),
                builder: builder.clone(),
                closing: stop_http.subscribe(),
            }),
            &token,
            config.http.public_reads,
        );
        // Ends by itself when HTTP stops.
        drop(metrics.sample_boots(stop_http.subscribe()));
        let dashboard = crate::dashboard::Dashboard::new(
            engine.clone(),
            feeds.clone(),
            &token,
            config.http.public_reads,
            config.tls.is_on(),
            Some(metrics.clone()),
        );
        let app = crate::api::router(
            engine,
            &token,
            config.http.public_reads,
            Some(metrics.clone()),
        )
        .merge(crate::feeds::router(feeds.clone()))
        .merge(dashboard.router())
        .merge(builder.router());
        if let Some(socket) = &builder_config_socket {
            crate::wiring::serve_local(app.clone(), socket, stop_http.subscribe())?;
        }
        let stopping = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let http = match tls {
            Some(tls) => {
                let listener = crate::tls::HttpsListener::new(listener, tls)?;
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopping)
                        .await
                })
            }
            None => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopping)
                    .await
            }),
        };
        let info = DaemonInfo {
            http: http_addr,
            dns: dns.local_addr(),
            token,
            token_file,
            data,
            zone: config.zone.clone(),
            front: front_door,
            scheme,
        };
        if let Some(at) = requested_at_ms {
            info!(
                upgrades,
                instances = handed_count,
                took_ms = crate::handover::unix_ms().saturating_sub(at),
                "upgraded in place"
            );
        }
        let door =
            |address: Option<SocketAddr>| address.map_or("none".to_owned(), |a| a.to_string());
        info!(
            http = %info.http,
            dns = %info.dns,
            dns_also = dns_also.join(" "),
            front_http = %door(front_door.http),
            front_tls = %door(front_door.tls),
            data = %info.data.display(),
            zone = %info.zone,
            "revboot is serving"
        );
        Ok(Daemon {
            info,
            builder,
            deployer,
            proxy,
            dns,
            http,
            stop_http,
            sockets: Sockets {
                http: http_kept,
                dns: dns_kept,
            },
            upgrade: upgrade_rx,
            binary,
            upgrades,
            cluster,
        })
    }

    /// Where it answers.
    pub fn info(&self) -> &DaemonInfo {
        &self.info
    }

    /// Upgrades in place (rules 2 and 3 of [`crate::handover`]): returns only if neither
    /// program could be executed. `terminated` resolved meanwhile: the new program stops.
    pub async fn upgrade(self, terminated: impl Future<Output = ()> + Unpin) -> anyhow::Error {
        let requested_at_ms = crate::handover::unix_ms();
        info!(binary = %self.binary.display(), "upgrading in place");
        let lease = self
            .cluster
            .as_ref()
            .map(revboot_cluster::Cluster::hand_over);
        let _ = self.stop_http.send(true);
        if tokio::time::timeout(crate::handover::HTTP_GRACE, self.http)
            .await
            .is_err()
        {
            warn!("HTTP requests still open at the upgrade: they are closed");
        }
        if let Err(error) = self.dns.shutdown().await {
            warn!(%error, "DNS server did not stop cleanly");
        }
        self.builder.shutdown().await;
        let front = self.proxy.hand_over_front();
        let proxy = TakenOver::hand_over(&self.proxy).await;
        let handed = self
            .deployer
            .hand_over(crate::handover::HAND_OVER_LIMIT)
            .await;
        let (numbered, keep) = crate::handover::numbers(&self.sockets, &proxy, &front, &handed.fds);
        let state = crate::handover::State {
            http: self.sockets.http.as_raw_fd(),
            dns: self.sockets.dns_numbers(),
            listeners: numbered,
            front: front.iter().map(|listener| listener.as_raw_fd()).collect(),
            relays: proxy
                .relays
                .iter()
                .map(crate::handover::Relay::new)
                .collect(),
            held: proxy.held.iter().map(crate::handover::Held::new).collect(),
            handed: proxy
                .handed
                .iter()
                .map(crate::handover::Handed::new)
                .collect(),
            children: crate::handover::children(&handed.instances),
            instances: handed.instances,
            upgrades: self.upgrades,
            requested_at_ms,
            stop: futures::FutureExt::now_or_never(terminated).is_some(),
            lease,
        };
        crate::cluster::renew(self.cluster.as_ref()).await;
        crate::handover::exec(&self.binary, &state, &keep)
    }

    /// Stops gracefully: HTTP and DNS stop accepting, running builds are marked interrupted,
    /// instances are stopped and their logs written back.
    pub async fn shutdown(self) {
        info!("revboot shutting down");
        let _ = self.stop_http.send(true);
        if let Err(error) = self.dns.shutdown().await {
            warn!(%error, "DNS server did not stop cleanly");
        }
        self.builder.shutdown().await;
        self.proxy.shutdown();
        self.deployer.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(10), self.http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => warn!(%error, "HTTP server ended with an error"),
            Ok(Err(error)) => warn!(%error, "HTTP server task failed"),
            Err(_) => warn!("HTTP server did not stop within 10s"),
        }
        info!("revboot stopped");
    }
}

/// Tells the service manager (systemd's `Type=notify`, or anything listening on
/// `$NOTIFY_SOCKET`) how the daemon stands; nothing without that variable.
fn notify_service_manager(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}

/// Runs the daemon until SIGTERM or SIGINT; `revboot upgrade` executes it again in place.
/// Once every part serves, it says so to the
/// service manager (`READY=1` on `$NOTIFY_SOCKET`, see `packaging/revboot.service`), and
/// `STOPPING=1` when it begins to stop.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let daemon = Daemon::start_with(config, true).await?;
    let info = daemon.info().clone();
    let status = format!("serving HTTP on {}, DNS on {}", info.http, info.dns);
    notify_service_manager(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    tracing::info!(
        "push with: git push {} main  |  dig @{} -p {} <ref>.<service>.{}",
        info.remote_hint("<service>"),
        info.dns.ip(),
        info.dns.port(),
        info.zone
    );
    let mut upgrade = daemon.upgrade.clone();
    // SIGHUP's handler is in, and now SIGTERM's and SIGINT's: those that came while an
    // upgrade in place executed this program, blocked meanwhile, are handled now.
    let mut terminated = Box::pin(termination());
    if let Err(error) = revboot_sandbox::parent::unblock_signals() {
        warn!(%error, "cannot unblock SIGHUP, SIGTERM and SIGINT");
    }
    tokio::select! {
        () = &mut terminated => {
            notify_service_manager(&[sd_notify::NotifyState::Stopping]);
            daemon.shutdown().await;
            Ok(())
        }
        _ = upgrade.wait_for(|asked| *asked) => Err(daemon.upgrade(terminated).await),
    }
}
