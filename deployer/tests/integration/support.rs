//! Shared helpers: real images built by cargo, a real store, a deployer per test.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use revboot_deployer::{Deployer, DeployerConfig, InstanceState};
use revboot_store::{BuildStatus, ImageInput, NewDeployment, Revision, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// How long a test waits for anything. A bound on waiting, not a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub use revboot_testkit::{build_image, hello_image, hostile_image};

/// The sandbox probe image.
pub fn probe_image() -> PathBuf {
    build_image(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/probe"),
        "probe",
    )
}

/// A manifest with the given `[run]` lines.
pub fn manifest(image: &str, run: &str) -> String {
    format!("[build]\ncommand = [\"true\"]\nartifacts = [\"{image}\"]\n\n[run]\n{run}\n")
}

/// Writes a successful deployment of `image` with `manifest` and returns its revision.
pub fn deploy(
    store: &Store,
    service: &str,
    image: &Path,
    manifest: &str,
    source: &str,
) -> Revision {
    let name = image
        .file_name()
        .expect("image has a name")
        .to_string_lossy()
        .into_owned();
    let file = std::fs::File::open(image).expect("image opens");
    store
        .write_deployment(NewDeployment {
            service,
            status: BuildStatus::Succeeded,
            manifest: Some(manifest),
            images: vec![ImageInput {
                name,
                reader: Box::new(file),
            }],
            build_log: b"built by the test\n",
            source_commit: source,
            source_repo: service,
            source_ref: Some("refs/heads/main"),
            subject: "test build",
        })
        .expect("deployment written")
}

/// A test's world: a store, a state directory, a deployer.
pub struct World {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub deployer: Arc<Deployer>,
}

/// A config for test `index` (its own /24 of the pool and its own cgroup name).
pub fn config(dir: &Path, index: u8) -> DeployerConfig {
    let mut config = DeployerConfig::new(dir.join("state"));
    config.name = format!("test-{index}-{}", std::process::id());
    config.pools = vec![
        revboot_testkit::test_pool(revboot_testkit::PoolRange::Deployer, index)
            .parse()
            .expect("pool"),
    ];
    config.stop_grace_ms = 200;
    config
}

impl World {
    pub fn new(index: u8, tweak: impl FnOnce(&mut DeployerConfig)) -> World {
        World::with_tenders(
            index,
            tweak,
            vec![revboot_deployer::tender::process::make()],
        )
    }

    /// A world whose deployer has the tenders `makers` make.
    pub fn with_tenders(
        index: u8,
        tweak: impl FnOnce(&mut DeployerConfig),
        makers: Vec<revboot_deployer::tender::MakeTender>,
    ) -> World {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "revboot_deployer=debug".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::init(dir.path().join("deploy.git")).expect("store");
        let mut config = config(dir.path(), index);
        tweak(&mut config);
        let deployer = Deployer::with_tenders(
            config,
            store.clone(),
            tokio::runtime::Handle::current(),
            makers,
        )
        .expect("deployer starts");
        World {
            dir,
            store,
            deployer,
        }
    }
}

/// Waits until the state satisfies `done`; returns it.
pub async fn wait_state(
    state: &mut watch::Receiver<InstanceState>,
    done: impl FnMut(&InstanceState) -> bool,
) -> InstanceState {
    tokio::time::timeout(PATIENCE, state.wait_for(done))
        .await
        .expect("state reached in time")
        .expect("state sender alive")
        .clone()
}

/// Where a process instance accepts connections: known from its summon on.
pub fn backend_of(summoned: &revboot_deployer::Summoned) -> SocketAddr {
    summoned
        .backend
        .get()
        .expect("a process instance's backend is known from its summon")
}

/// `GET path` over a real TCP connection; the whole response.
pub async fn http_get(address: SocketAddr, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
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

/// Waits until `check` holds, polling (for things without a watch: files, /proc).
pub async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// True if `address:port` can be bound (nothing holds it).
pub fn bindable(address: IpAddr, port: u16) -> bool {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("reuse");
    socket.bind(&SocketAddr::new(address, port).into()).is_ok()
}

/// A fake 40-hex source commit.
pub fn source(n: u8) -> String {
    format!("{n:02x}").repeat(20)
}

/// A field of `/proc/<pid>/status` (its first word), empty when absent.
pub fn proc_status(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .map(|value| value.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap_or_default()
}
