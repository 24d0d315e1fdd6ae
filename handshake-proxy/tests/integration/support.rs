//! Shared helpers: the hello image built by cargo, a real store, a deployer behind a proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use revboot_deployer::{BackendPort, Deployer, DeployerConfig, InstanceState, Instances};
use revboot_proxy::{FrontConfig, Proxy, ProxyConfig};
use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for anything. A bound on waiting, not a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The `[run]` table of hello as its own `revboot.toml` has it.
pub const HELLO_RUN: &str = "port = 8080\nmemory_mib = 32\nready = { probe = \"socket\" }";

pub use revboot_testkit::{GATED_RUN, gated_image, hello_image};

/// A manifest for the hello image with the given `[run]` lines.
pub fn manifest(run: &str) -> String {
    format!("[build]\ncommand = [\"true\"]\nartifacts = [\"hello\"]\n\n[run]\n{run}\n")
}

/// Writes a successful deployment of `image` and returns its revision.
pub fn deploy(store: &Store, service: &str, image: &Path, manifest: &str) -> Revision {
    let file = std::fs::File::open(image).expect("image opens");
    store
        .write_deployment(NewDeployment {
            service,
            status: BuildStatus::Succeeded,
            manifest: Some(manifest),
            images: vec![ImageInput {
                name: "hello".to_owned(),
                reader: Box::new(file),
            }],
            build_log: b"built by the test\n",
            source_commit: &"ab".repeat(20),
            source_repo: service,
            source_ref: Some("refs/heads/main"),
            subject: "test build",
        })
        .expect("deployment written")
}

/// A test's world: a store, a deployer with ephemeral backend ports, the proxy in front.
pub struct World {
    pub _dir: tempfile::TempDir,
    pub store: Store,
    pub deployer: Arc<Deployer>,
    pub proxy: Arc<Proxy>,
    /// The test's own /24 of loopback (the deployer's pool).
    pub net: [u8; 3],
}

impl World {
    /// A world for test `index` (its own pool and cgroup name).
    pub fn new(index: u8, tweak: impl FnOnce(&mut DeployerConfig, &mut ProxyConfig)) -> World {
        World::build(index, None, tweak)
    }

    /// A world whose proxy has a front door (`front`'s listeners bound at once).
    pub fn with_front(
        index: u8,
        front: FrontConfig,
        tweak: impl FnOnce(&mut DeployerConfig, &mut ProxyConfig),
    ) -> World {
        World::build(index, Some(front), tweak)
    }

    fn build(
        index: u8,
        front: Option<FrontConfig>,
        tweak: impl FnOnce(&mut DeployerConfig, &mut ProxyConfig),
    ) -> World {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "revboot_proxy=debug,revboot_deployer=info".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::init(dir.path().join("deploy.git")).expect("store");
        let mut config = DeployerConfig::new(dir.path().join("state"));
        config.name = format!("proxy-test-{index}-{}", std::process::id());
        config.pools = vec![
            revboot_testkit::test_pool(revboot_testkit::PoolRange::Proxy, index)
                .parse()
                .expect("pool"),
        ];
        config.backend_port = BackendPort::Ephemeral;
        config.stop_grace_ms = 200;
        let mut proxy_config = ProxyConfig::default();
        tweak(&mut config, &mut proxy_config);
        let deployer = Deployer::new(config, store.clone(), tokio::runtime::Handle::current())
            .expect("deployer starts");
        let inner: Arc<dyn Instances> = deployer.clone();
        let proxy = match front {
            None => Proxy::new(proxy_config, inner),
            Some(front) => Proxy::with_front(proxy_config, front, inner).expect("front door opens"),
        };
        World {
            _dir: dir,
            store,
            deployer,
            proxy,
            net: [127, 79, index],
        }
    }

    /// A world whose instances are reaped after `idle` without activity.
    pub fn with_idle(index: u8, idle: Duration) -> World {
        World::new(index, |deployer, _| {
            deployer.idle_timeout_override_ms = Some(idle.as_millis() as u64);
        })
    }

    /// A local source address in this test's /24 that the pool does not hand out first.
    pub fn source(&self, host: u8) -> IpAddr {
        let [a, b, c] = self.net;
        IpAddr::V4(Ipv4Addr::new(a, b, c, host))
    }

    pub async fn shutdown(&self) {
        self.proxy.shutdown();
        self.deployer.shutdown().await;
    }
}

/// Connects to `to`, from `from` when given.
pub async fn connect(to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(from) = from {
        socket.bind(SocketAddr::new(from, 0))?;
    }
    socket.connect(to).await
}

/// `GET path` over a real TCP connection (from `from` when given); the whole response.
pub async fn http_get(to: SocketAddr, from: Option<IpAddr>, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = connect(to, from).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no answer in time")))
}

/// Waits until `check` holds, polling (for things without a watch).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never true: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raises this process's open-file limit to its hard limit.
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

/// The service address and port of `summoned`: where clients connect.
pub fn service_address(summoned: &revboot_deployer::Summoned) -> SocketAddr {
    SocketAddr::new(summoned.addresses.primary(), summoned.port)
}

/// Waits (bounded) until `summoned`'s instance serves.
pub async fn serving(summoned: &revboot_deployer::Summoned) {
    let mut state = summoned.state.clone();
    tokio::time::timeout(PATIENCE, state.wait_for(InstanceState::is_serving))
        .await
        .expect("ready in time")
        .expect("state");
}

/// A per-client service `mine` for client `.250` of `world`: bob (`.251`) is refused at the
/// service address, alice is served there. Returns alice's instance.
pub async fn bob_refused_alice_served(world: &World) -> revboot_deployer::Summoned {
    let run = format!("{HELLO_RUN}\nper_client = true");
    let revision = deploy(&world.store, "mine", &hello_image(), &manifest(&run));
    let (alice, bob) = (world.source(250), world.source(251));
    let summoned = world
        .proxy
        .summon("mine", &revision, Some(alice))
        .expect("summon for alice");
    assert_eq!(summoned.key.client.map(|c| c.network()), Some(alice));
    if world.deployer.steers() {
        serving(&summoned).await;
        let key = summoned.key.clone();
        eventually("the instance is steered", || {
            world
                .deployer
                .list()
                .iter()
                .any(|info| info.key == key && info.steered.is_some())
        })
        .await;
    }
    let address = service_address(&summoned);
    match http_get(address, Some(bob), "/bob").await {
        Ok(response) => assert!(response.is_empty(), "bob was answered: {response}"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}"),
    }
    let response = http_get(address, Some(alice), "/alice")
        .await
        .expect("alice is served");
    assert!(
        response.contains(&format!("hello from v1 ({revision})")),
        "{response}"
    );
    summoned
}

/// Deploys hello (as its own manifest has it) and summons it through the proxy.
pub fn summon_hello(world: &World) -> (Revision, revboot_deployer::Summoned) {
    let revision = deploy(&world.store, "hello", &hello_image(), &manifest(HELLO_RUN));
    let summoned = world
        .proxy
        .summon("hello", &revision, None)
        .expect("summon");
    (revision, summoned)
}

/// Deploys the gated image and summons it through the proxy: it boots, but is not ready
/// until [`open_gate`].
pub fn summon_gated(world: &World) -> (Revision, revboot_deployer::Summoned) {
    let revision = deploy(&world.store, "gated", &gated_image(), &manifest(GATED_RUN));
    let summoned = world
        .proxy
        .summon("gated", &revision, None)
        .expect("summon");
    (revision, summoned)
}

/// Ends the gated instance's boot: `GET /open` sent straight to its backend (not through
/// the proxy), then waits (bounded) until it serves.
pub async fn open_gate(summoned: &revboot_deployer::Summoned) {
    let backend = summoned
        .backend
        .get()
        .expect("a process instance's backend is known");
    let response = http_get(backend, None, "/open")
        .await
        .expect("the gated instance answers at its backend");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    serving(summoned).await;
}

/// Several idle timeouts with not a byte either way: the instance behind `state` must still
/// serve.
pub async fn still_serving_after_idle(
    state: &tokio::sync::watch::Receiver<InstanceState>,
    idle: Duration,
) {
    tokio::time::sleep(idle * 5).await;
    let current = state.borrow().clone();
    assert!(
        current.is_serving(),
        "reaped under an open connection: {current:?}"
    );
}

/// Closes `quiet`, the instance's last connection: it must then be reaped for idleness.
pub async fn reaped_once_closed(
    state: &mut tokio::sync::watch::Receiver<InstanceState>,
    quiet: TcpStream,
) {
    drop(quiet);
    let stopped = tokio::time::timeout(PATIENCE, state.wait_for(InstanceState::is_final))
        .await
        .expect("reaped once the connection closed")
        .expect("state")
        .clone();
    assert_eq!(stopped, InstanceState::Stopped);
}
