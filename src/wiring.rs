//! Pieces of `revboot serve` that stand apart from the start sequence of `revboot serve` (the daemon module):
//! the token, the deployer's name, the tenders, and TLS (HTTPS and ACME).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use revboot_sandbox::secret;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::action::InstanceView;
use crate::config::Config;
use crate::tls::{self, Certificates};

/// The token from `[http] token`, or from `<data>/token`, generated there once; and the
/// file it is kept in (none when the configuration gives it). The value is never logged.
pub fn token(http: &crate::config::Http, data: &Path) -> anyhow::Result<(String, Option<PathBuf>)> {
    if let Some(token) = &http.token {
        return Ok((token.clone(), None));
    }
    let path = data.join("token");
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_owned(), Some(path))),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("Cannot read {}", path.display())),
    }
    let token = secret::random_hex(16).context("Cannot read /dev/urandom for a token")?;
    secret::write_private(&path, &token)
        .with_context(|| format!("Cannot write {}", path.display()))?;
    info!(file = %path.display(), "generated the token for pushes and the API");
    Ok((token, Some(path)))
}

/// The deployer's cgroup name: stable for a data directory (a restarted daemon finds its own
/// orphans) and distinct between daemons on one host (one never cleans up another's).
pub fn deployer_name(data: &Path) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(data.as_os_str().as_encoded_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("d{hex}")
}

/// The tenders of the daemon's deployer: the process tender, and the qemu tender when
/// `qemu-system-x86_64` is installed (without it, VM services fail to boot with a clear
/// reason and process services are unaffected). A new backend is one more line here.
pub(crate) fn tenders(config: &Config) -> Vec<revboot_deployer::tender::MakeTender> {
    use revboot_deployer::tender::{process, qemu};
    let mut tenders = vec![process::make()];
    let qemu = qemu::QemuConfig {
        accel: config.instances.qemu_accel,
        restore: config.instances.qemu_restore,
        pool: config.instances.qemu_pool,
        ..qemu::QemuConfig::default()
    };
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join(&qemu.binary).is_file())
    }) || qemu.binary.is_file();
    if found {
        tenders.push(qemu::make(qemu));
    } else {
        warn!(binary = %qemu.binary.display(), "qemu not found: services with `tender = \"qemu\"` cannot boot (install qemu-system-x86)");
    }
    tenders
}

/// The address a one-address client shows: the IPv4 one when there is one.
pub(crate) fn first_address(addresses: &revboot_deployer::ServiceAddresses) -> String {
    addresses
        .iter()
        .next()
        .map(|address| address.to_string())
        .unwrap_or_default()
}

pub(crate) fn build_view(record: &revboot_builder::BuildRecord) -> crate::action::BuildView {
    crate::action::BuildView {
        id: record.id,
        service: record.service.clone(),
        source_ref: record.source_ref.clone(),
        source_commit: record.source_commit.clone(),
        state: serde_json::to_value(record.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        queued_at_ms: record.queued_at_ms,
        started_at_ms: record.started_at_ms,
        finished_at_ms: record.finished_at_ms,
        revision: record.revision.clone(),
        made_live: record.made_live,
        message: record.message.clone(),
    }
}

pub(crate) fn instance_view(info: &revboot_deployer::InstanceInfo) -> InstanceView {
    InstanceView {
        service: info.key.service.clone(),
        revision: info.key.revision.to_hex(),
        client: info.key.client.map(|c| c.to_string()),
        replica: info.key.replica,
        address: first_address(&info.addresses),
        addresses: info.addresses.iter().map(|a| a.to_string()).collect(),
        state: info.state.to_string(),
        uptime_ms: u64::try_from(info.uptime.as_millis()).unwrap_or(u64::MAX),
        connections: info.connections,
        steered: info.steered,
        pid: info.pid,
    }
}

/// HTTPS and ACME, as configured. [`TlsParts::load`] runs before anything serves: the
/// daemon's certificate and the services' files are loaded (an error here stops the start,
/// naming the file) and watched, and the certificates ACME saved in the data directory are
/// served again, so that the front door — listening at once on sockets an upgrade in place
/// handed over — never answers a handshake before its certificates are there.
/// [`TlsParts::start`] then starts the ACME task and returns the rustls configuration of the
/// HTTPS listener when `[tls]` is on.
pub(crate) struct TlsParts<'a> {
    pub config: &'a Config,
    pub data: &'a Path,
    pub certificates: &'a Arc<Certificates>,
    pub challenges: &'a revboot_dns::Challenges,
    pub stop: watch::Receiver<bool>,
}

impl TlsParts<'_> {
    pub(crate) fn load(&self, store: &revboot_store::Store) -> anyhow::Result<()> {
        let config = self.config;
        let daemon = self.daemon_files();
        tls::files::watch(
            self.certificates.clone(),
            daemon.clone(),
            &config.tls.services,
            &config.zone,
            Duration::from_millis(config.tls.reload_ms),
            self.stop.clone(),
        )
        .with_context(|| match &daemon {
            Some(files) => format!(
                "Cannot serve HTTPS with {} and {}",
                files.cert.display(),
                files.key.display()
            ),
            None => "Cannot load the certificate files".to_owned(),
        })?;
        if config.acme.is_on() {
            let services = store.services().unwrap_or_default();
            let settings = self.acme_settings(Box::new(move || services.clone()));
            tls::acme::serve_saved_all(&settings, self.certificates);
        }
        Ok(())
    }

    pub(crate) fn start(
        self,
        services: Box<dyn Fn() -> Vec<String> + Send + Sync>,
        wake: Arc<Notify>,
    ) -> Option<Arc<rustls::ServerConfig>> {
        let config = self.config;
        if config.acme.is_on() {
            info!(
                directory = config.acme.directory,
                "certificates by ACME (DNS-01)"
            );
            drop(tls::acme::spawn(
                self.acme_settings(services),
                self.certificates.clone(),
                self.challenges.clone(),
                wake,
                self.stop,
            ));
        }
        config
            .tls
            .is_on()
            .then(|| tls::server_config(self.certificates.clone(), &[b"http/1.1"]))
    }

    fn daemon_files(&self) -> Option<tls::config::Files> {
        match (&self.config.tls.cert, &self.config.tls.key) {
            (Some(cert), Some(key)) => Some(tls::config::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    fn acme_settings(
        &self,
        services: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    ) -> tls::acme::Settings {
        let config = self.config;
        tls::acme::Settings {
            acme: config.acme.clone(),
            zone: config.zone.clone(),
            daemon: config.tls.acme,
            dir: self.data.join("tls"),
            services,
            from_files: config.tls.services.keys().cloned().collect(),
        }
    }
}

/// Serves `app` on the Unix socket at `path` too (mode 0600, replacing a stale one), until
/// `stop` turns true: the git hooks' way to the daemon when its HTTP is HTTPS, whose
/// certificate names the host's public name rather than an address the hook could verify.
pub(crate) fn serve_local(
    app: axum::Router,
    path: &Path,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("Cannot remove {}", path.display()));
        }
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("Cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("Cannot make {} private", path.display()))?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = served {
            warn!(%error, "the hooks' socket stopped");
        }
    });
    Ok(())
}

/// Every service's name, with a source repository or deployments (for the certificates).
pub(crate) fn services(
    builder: &revboot_builder::Builder,
    store: &revboot_store::Store,
) -> Box<dyn Fn() -> Vec<String> + Send + Sync> {
    let (builder, store) = (builder.clone(), store.clone());
    Box::new(move || {
        let mut all = builder.services().unwrap_or_default();
        all.extend(store.services().unwrap_or_default());
        all.sort();
        all.dedup();
        all
    })
}

/// Why a listener could not be bound, and how to choose another address: the port may be
/// another daemon's (one running with the defaults, say), and the user should not have to
/// look up which flag or key moves it.
pub(crate) fn cannot_serve(what: &str, listen: &dyn std::fmt::Debug, flag: &str) -> String {
    format!(
        "Cannot serve {what} on {listen:?} (another daemon there? `--{flag} ADDRESS` or \
         [{flag}] listen in revbootd.toml picks another)"
    )
}

/// What `revboot config` shows of a service's variables (values only with `show`).
pub fn config_view(
    service: &str,
    vars: &revboot_deployer::vars::ServiceVars,
    show: bool,
    restarted: Option<usize>,
) -> crate::action::ConfigView {
    crate::action::ConfigView {
        service: service.to_owned(),
        vars: vars
            .iter()
            .map(|(name, value)| crate::action::VarView {
                name: name.to_owned(),
                value: show.then(|| value.to_owned()),
            })
            .collect(),
        restarted,
    }
}
