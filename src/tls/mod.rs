//! TLS for the daemon: HTTPS on its HTTP listener, and the certificates the front door
//! presents for services that end TLS there.
//!
//! 1. A certificate is a PEM chain (leaf first) and its key. Before it is served it is
//!    checked ([`load`]): it parses, the key is the leaf's, and now is inside its validity.
//!    A file that fails is reported ([`CertError`], in the log and the status) and never
//!    served; a certificate already served stays until a good one replaces it.
//! 2. Every certificate served lives in one [`Certificates`]: the rustls resolver of both
//!    the HTTPS listener and the front door. A connection's server name picks the
//!    certificate that covers it (exactly, or by a `*.` wildcard one label deep); a
//!    connection without a server name (an address typed as the URL) gets the daemon's.
//!    Replacing an entry takes effect at the next handshake: no restart.
//! 3. Certificates from files ([`files`]: the daemon's, and services' for the front door) are
//!    looked at every `reload_ms` and at SIGHUP: a change of either file reloads them
//!    (rule 1). A certificate never outlives its validity: the resolver passes over an
//!    expired one, and the watcher (files) or the ACME task withdraws and reports it. A
//!    client then gets no certificate for that name: over HTTPS, with the daemon's gone, the
//!    handshake fails (rustls' `access_denied` alert); at the front door, where a service's
//!    certificate is never replaced by the daemon's ([`FrontDoor`]), likewise.
//! 4. Certificates from ACME ([`acme`]) are written to `<data>/tls/` (keys mode 0600; never
//!    in the deployment repository, never logged) and installed as they are issued.
//! 5. [`Certificates::status`] is what `revboot certs`, `GET /api/v1/certificates` and the
//!    metrics show: per certificate, its names, source, expiry, the last error and the next
//!    attempt after failures.
//! 6. The HTTPS listener ([`HttpsListener`]) does handshakes off the accept loop, at most
//!    [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`].
//!
//! No OCSP stapling, by choice: Let's Encrypt ended its OCSP service in 2025 (its
//! certificates name no responder; revocation is by CRLs clients fetch), and a staple would
//! add a fetch from the CA that can fail. A Must-Staple certificate is served unstapled.

pub mod acme;
pub mod config;
pub mod files;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

pub use crate::action::CertView;

/// Handshakes of the HTTPS listener in progress at once; more wait in the kernel's queue.
pub const MAX_HANDSHAKES: usize = 256;
/// How long one handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The key under which the daemon's own certificate is kept in [`Certificates`] (no service
/// name has `_`).
pub const DAEMON: &str = "_daemon";

/// Why a certificate is not served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No certificate in the PEM text.
    #[error("No PEM certificate found")]
    NoCertificate,
    /// No usable private key in the PEM text.
    #[error("No usable PEM private key found ({0})")]
    NoKey(String),
    /// A certificate does not parse.
    #[error("The certificate does not parse: {0}")]
    Malformed(String),
    /// The key is not the certificate's.
    #[error("The private key is not the key of the certificate")]
    KeyMismatch,
    /// The certificate's validity is over.
    #[error("The certificate expired at {not_after} (Unix seconds)")]
    Expired {
        /// Its end of validity.
        not_after: i64,
    },
    /// A service's certificate covers no name of that service.
    #[error("The certificate covers no name of {domain} (that name or one under it)")]
    OutsideService {
        /// `<service>.<zone>`.
        domain: String,
    },
    /// The certificate's validity has not begun.
    #[error("The certificate is not valid before {not_before} (Unix seconds)")]
    NotYetValid {
        /// Its start of validity.
        not_before: i64,
    },
}

/// A checked certificate, ready to serve.
#[derive(Debug, Clone)]
pub struct Certified {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// The DNS names it covers (subject alternative names).
    pub names: Vec<String>,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Who issued it (the issuer's distinguished name, e.g. `CN=R11, O=Let's Encrypt, C=US`).
    pub issuer: String,
}

impl Certified {
    /// Whether it covers `name` (exactly or by a one-label wildcard).
    pub fn covers(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.names.iter().any(|pattern| matches(pattern, &name))
    }

    /// Seconds of validity left at `now`.
    pub fn remaining(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

/// `pattern` (a certificate name, maybe `*.x`) covers `name` (lowercase).
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == parent),
        None => pattern == name,
    }
}

/// Now, in Unix seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Checks and loads a chain and key given as PEM text (rule 1).
pub fn load(chain_pem: &[u8], key_pem: &[u8]) -> Result<Certified, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|error| CertError::Malformed(error.to_string()))?;
    let leaf = chain.first().ok_or(CertError::NoCertificate)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|error| CertError::Malformed(error.to_string()))?;
    let not_before = parsed.validity().not_before.timestamp();
    let not_after = parsed.validity().not_after.timestamp();
    let issuer = parsed.issuer().to_string();
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|error| CertError::NoKey(error.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|error| CertError::NoKey(error.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| CertError::KeyMismatch)?;
    let now = now();
    if now >= not_after {
        return Err(CertError::Expired { not_after });
    }
    if now < not_before {
        return Err(CertError::NotYetValid { not_before });
    }
    Ok(Certified {
        key: Arc::new(certified),
        names,
        not_before,
        not_after,
        issuer,
    })
}

/// Reads and checks a chain and key from files.
pub fn load_files(cert: &Path, key: &Path) -> Result<Certified, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_owned(),
            source,
        })
    };
    load(&read(cert)?, &read(key)?)
}

/// The certificates served, and how each stands (rules 2 and 5).
#[derive(Debug, Default)]
pub struct Certificates {
    // std locks: held for a map lookup or update, never across an await; the handshake path
    // only reads.
    served: RwLock<BTreeMap<String, Arc<Certified>>>,
    status: RwLock<BTreeMap<String, CertView>>,
}

impl Certificates {
    /// None yet.
    pub fn new() -> Arc<Certificates> {
        Arc::new(Certificates::default())
    }

    /// Serves `certified` as `id` (replacing what was served under it).
    pub fn install(&self, id: &str, certified: Certified) {
        let not_after_ms = certified.not_after.saturating_mul(1000);
        let names = certified.names.clone();
        let issuer = certified.issuer.clone();
        self.served
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), Arc::new(certified));
        self.update(id, |view| {
            view.names = names;
            view.issuer = Some(issuer);
            view.state = "valid".into();
            view.not_after_ms = Some(not_after_ms);
            view.issued += 1;
            view.failures = 0;
            view.error = None;
            view.retry_at_ms = None;
        });
    }

    /// Stops serving `id`.
    pub fn withdraw(&self, id: &str) {
        self.served
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.update(id, |view| {
            view.state = "failed".into();
            view.not_after_ms = None;
            view.issuer = None;
            view.renew_at_ms = None;
        });
    }

    /// Withdraws `id` if its validity is over at `now` (Unix seconds), reporting it; whether
    /// it did (rule 3).
    pub fn withdraw_if_expired(&self, id: &str, now: i64) -> bool {
        let Some(served) = self.served(id).filter(|served| served.remaining(now) <= 0) else {
            return false;
        };
        warn!(
            id,
            not_after = served.not_after,
            "certificate expired: no longer served"
        );
        self.withdraw(id);
        self.update(id, |view| {
            view.error = Some(format!(
                "The certificate expired at {} (Unix seconds); no longer served",
                served.not_after
            ));
        });
        true
    }

    /// The certificate served as `id`.
    pub fn served(&self, id: &str) -> Option<Arc<Certified>> {
        self.served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Changes the status of `id` (made when absent).
    pub fn update(&self, id: &str, change: impl FnOnce(&mut CertView)) {
        let mut status = self.status.write().unwrap_or_else(|p| p.into_inner());
        let view = status.entry(id.to_owned()).or_insert_with(|| CertView {
            id: id.to_owned(),
            state: "pending".into(),
            ..CertView::default()
        });
        change(view);
    }

    /// Forgets `id` altogether (a service deleted).
    pub fn forget(&self, id: &str) {
        self.served
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.status
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Every certificate's status, by id.
    pub fn status(&self) -> Vec<CertView> {
        self.status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The certificate for a server name (rule 2), never an expired one (rule 3); the
    /// daemon's when none covers the name and `fallback`.
    fn pick(&self, server_name: Option<&str>, fallback: bool) -> Option<Arc<CertifiedKey>> {
        let now = now();
        let served = self.served.read().unwrap_or_else(|p| p.into_inner());
        let mut valid = served.iter().filter(|(_, c)| c.remaining(now) > 0);
        if let Some(name) = server_name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            // An exact name first, then a wildcard.
            let exact = valid.clone().find(|(_, c)| c.names.contains(&name));
            if let Some((_, found)) = exact.or_else(|| valid.clone().find(|(_, c)| c.covers(&name)))
            {
                return Some(found.key.clone());
            }
        }
        if !fallback {
            return None;
        }
        valid
            .find(|(id, _)| *id == DAEMON)
            .map(|(_, c)| c.key.clone())
    }

    fn resolve_for(&self, hello: &ClientHello<'_>, fallback: bool) -> Option<Arc<CertifiedKey>> {
        let picked = self.pick(hello.server_name(), fallback);
        if picked.is_none() {
            debug!(server_name = ?hello.server_name(), "no certificate for this name");
        }
        picked
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.resolve_for(&hello, true)
    }
}

/// The resolver of the front door: a certificate that covers the name asked for, never the
/// daemon's in place of a service's missing one (a client would see a name it did not ask
/// for; with none, it sees the handshake refused).
#[derive(Debug)]
pub struct FrontDoor(pub Arc<Certificates>);

impl ResolvesServerCert for FrontDoor {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.resolve_for(&hello, false)
    }
}

/// The rustls server configuration over `resolver` (a [`Certificates`] or a [`FrontDoor`]),
/// speaking `alpn` (e.g. `http/1.1`).
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Arc<rustls::ServerConfig> {
    // ring, not aws-lc-rs: it builds with cc alone, which CI has, where aws-lc needs its own
    // C build; rustls marks it deprecated for lacking post-quantum key exchange (X25519MLKEM768).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The front door's configuration for `tls = "terminate"` services: [`server_config`]
/// speaking HTTP/1.1, with secret extraction on, so that an upgrade in place hands its
/// connections over with their TLS session (`revboot_proxy`'s record layer carries them
/// on in the new program).
pub fn front_door_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<rustls::ServerConfig> {
    let mut config = Arc::unwrap_or_clone(server_config(resolver, &[b"http/1.1"]));
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// The HTTPS listener: TCP accepted, handshakes done by bounded tasks, finished streams
/// handed to the HTTP server (rule 6). An `axum::serve` listener.
#[derive(Debug)]
pub struct HttpsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl HttpsListener {
    /// Serves TLS with `config` on `listener`.
    pub fn new(
        listener: tokio::net::TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<HttpsListener> {
        let local = listener.local_addr()?;
        let (send, ready) = mpsc::channel(MAX_HANDSHAKES);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "HTTPS accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let send = send.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            drop(permit);
                            let _ = send.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(HttpsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for HttpsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended (it never does while the listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names`, valid from one year's start to another's.
    fn self_signed(names: &[&str], years: (i32, i32)) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("names");
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    const VALID: (i32, i32) = (2000, 2090);

    #[test]
    fn a_good_certificate_loads_and_bad_ones_are_named() {
        let (cert, key) = self_signed(&["*.hello.revboot.test", "hello.revboot.test"], VALID);
        let loaded = load(cert.as_bytes(), key.as_bytes()).expect("loads");
        assert!(loaded.covers("abc1234.hello.revboot.test"));
        assert!(loaded.covers("hello.revboot.test."));
        assert!(!loaded.covers("a.b.hello.revboot.test"));
        assert!(!loaded.covers("other.revboot.test"));

        let (expired, expired_key) = self_signed(&["x.revboot.test"], (2000, 2001));
        assert!(matches!(
            load(expired.as_bytes(), expired_key.as_bytes()),
            Err(CertError::Expired { .. })
        ));
        let (_, other_key) = self_signed(&["x.revboot.test"], VALID);
        assert!(matches!(
            load(cert.as_bytes(), other_key.as_bytes()),
            Err(CertError::KeyMismatch)
        ));
        // A byte changed inside the base64 body.
        let mut tampered = cert.clone().into_bytes();
        let at = tampered.len() / 2;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        assert!(load(&tampered, key.as_bytes()).is_err());
        assert!(matches!(
            load(b"", key.as_bytes()),
            Err(CertError::NoCertificate)
        ));
    }

    #[test]
    fn the_server_name_picks_the_certificate_and_no_name_gets_the_daemons() {
        let certificates = Certificates::new();
        let (daemon, daemon_key) = self_signed(&["revboot.test"], VALID);
        let (hello, hello_key) =
            self_signed(&["*.hello.revboot.test", "hello.revboot.test"], VALID);
        let daemon = load(daemon.as_bytes(), daemon_key.as_bytes()).expect("loads");
        let hello = load(hello.as_bytes(), hello_key.as_bytes()).expect("loads");
        let hello_key = hello.key.clone();
        let daemon_key = daemon.key.clone();
        certificates.install(DAEMON, daemon);
        certificates.install("hello", hello);
        let same = |a: Option<Arc<CertifiedKey>>, b: &Arc<CertifiedKey>| {
            a.is_some_and(|a| Arc::ptr_eq(&a, b))
        };
        assert!(same(
            certificates.pick(Some("abc1234.hello.revboot.test"), true),
            &hello_key
        ));
        assert!(same(
            certificates.pick(Some("HELLO.revboot.test"), false),
            &hello_key
        ));
        assert!(same(certificates.pick(None, true), &daemon_key));
        // The front door never answers a name with the daemon's certificate.
        assert!(certificates.pick(Some("unknown.example"), false).is_none());
        assert!(same(
            certificates.pick(Some("unknown.example"), true),
            &daemon_key
        ));
        let status = certificates.status();
        assert_eq!(status.len(), 2);
        assert!(
            status
                .iter()
                .all(|view| view.state == "valid" && view.issued == 1)
        );
    }

    #[test]
    fn an_expired_certificate_is_never_picked_and_is_withdrawn_with_a_report() {
        let certificates = Certificates::new();
        let (hello, hello_key) = self_signed(&["*.hello.revboot.test"], VALID);
        let mut hello = load(hello.as_bytes(), hello_key.as_bytes()).expect("loads");
        // As if its validity had ended since it was loaded.
        hello.not_after = now() - 1;
        certificates.install("hello", hello);
        assert!(
            certificates
                .pick(Some("abc1234.hello.revboot.test"), false)
                .is_none()
        );
        let issuer = certificates.status()[0].issuer.clone();
        assert!(issuer.is_some_and(|i| i.contains("rcgen")));
        assert!(!certificates.withdraw_if_expired("other", now()));
        assert!(certificates.withdraw_if_expired("hello", now()));
        assert!(certificates.served("hello").is_none());
        let view = &certificates.status()[0];
        assert_eq!(view.state, "failed");
        assert!(
            view.error.as_deref().is_some_and(|e| e.contains("expired")),
            "{view:?}"
        );
    }
}
