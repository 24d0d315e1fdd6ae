//! Certificates by ACME (RFC 8555) with DNS-01 challenges answered by this daemon's own DNS
//! server: revboot is authoritative for its zone, so it proves control of any name in it
//! with no help from anyone, wildcards included.
//!
//! One task owns issuance; every `check_ms`, or when woken (a service added):
//!
//! 1. The certificates wanted: the daemon's own name (`[tls] acme`), and, with
//!    `[acme] services`, `*.<service>.<zone>` + `<service>.<zone>` for every service
//!    whose certificate does not come from files (`[tls.services]`), so every revision's
//!    name is covered. A service gone (deleted, renamed) is forgotten, its
//!    certificate and key files removed.
//! 2. A certificate not served yet is read from `<data>/tls/<id>.pem` and `<id>.key` if a
//!    valid one is there (a restart issues nothing new).
//! 3. One is due when none is served, when it does not cover the names wanted, or when less
//!    than a third of its lifetime is left (Let's Encrypt's advice: day 60 of 90); that
//!    time is shown as its next renewal. One whose validity ended (renewals failed until
//!    then) is withdrawn and reported.
//! 4. Issuance: the account (created once, kept in `<data>/tls/acme-account.json`, mode
//!    0600); an order for the names; per authorization, the DNS-01 value published as TXT
//!    at `_acme-challenge.<name>` ([`revboot_dns::Challenges`]), the challenge set ready;
//!    the order polled until ready; a new key and CSR (rcgen), the chain fetched. Values are
//!    withdrawn however it ends, and the whole of it is bounded by `order_timeout_ms`.
//! 5. The chain is checked as any certificate is ([`super::load`]), the key written mode
//!    0600 and the chain beside it (write then rename), then served at once.
//! 6. A failure keeps what is served, is logged and reported ([`super::CertView`]), and the
//!    next attempt for that certificate waits `retry_min_ms`, doubled at every failure in a
//!    row up to `retry_max_ms`, less a random part of up to a quarter ([`jittered`]) so
//!    that daemons which failed together (a CA down) do not all try again at one instant.
//!    An account the CA no longer knows is made again.
//!
//! Keys and the account's credentials never reach a log, the API or the deployment
//! repository.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use revboot_dns::Challenges;
use revboot_sandbox::secret;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::config::Acme;
use super::{Certificates, DAEMON, now};

/// What the ACME task is given.
pub struct Settings {
    /// `[acme]`.
    pub acme: Acme,
    /// The zone.
    pub zone: String,
    /// The daemon's certificate comes from here (`[tls] acme`).
    pub daemon: bool,
    /// `<data>/tls`.
    pub dir: PathBuf,
    /// The services there are now.
    pub services: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Services whose certificate comes from files (`[tls.services]`): none asked for here.
    pub from_files: Vec<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("acme", &self.acme)
            .field("zone", &self.zone)
            .field("daemon", &self.daemon)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Why an issuance failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CA answered with an error, or could not be reached.
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    /// The order or an authorization ended in a state other than the one wanted.
    #[error("The order for {names} is {state}")]
    State {
        /// The names ordered.
        names: String,
        /// What it became.
        state: String,
    },
    /// The CA offered no DNS-01 challenge.
    #[error("The CA offers no dns-01 challenge for {0}")]
    NoDns01(String),
    /// The challenge could not be published.
    #[error("Cannot publish the challenge")]
    Publish(#[from] revboot_dns::PublishError),
    /// The certificate issued is not one to serve.
    #[error("The certificate issued is refused")]
    Refused(#[from] super::CertError),
    /// Files of the data directory.
    #[error("Cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It took longer than `order_timeout_ms`.
    #[error("The order took longer than {0:?}")]
    Timeout(Duration),
}

/// The names of a certificate `id` (rule 1).
pub fn names(id: &str, settings: &Settings) -> Vec<String> {
    let zone = settings.zone.trim_end_matches('.').to_ascii_lowercase();
    if id == DAEMON {
        vec![settings.acme.daemon_name(&zone)]
    } else {
        vec![format!("*.{id}.{zone}"), format!("{id}.{zone}")]
    }
}

/// Starts the ACME task (it ends when `stop` turns true).
pub fn spawn(
    settings: Settings,
    certificates: Arc<Certificates>,
    challenges: Challenges,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(settings, certificates, challenges, wake, stop))
}

async fn run(
    settings: Settings,
    certificates: Arc<Certificates>,
    challenges: Challenges,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    if let Err(error) = std::fs::create_dir_all(&settings.dir) {
        warn!(%error, dir = %settings.dir.display(), "cannot make the certificate directory");
    }
    let mut account: Option<Account> = None;
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        let wanted = wanted(&settings);
        for gone in known.iter().filter(|id| !wanted.contains(id)) {
            // A service deleted or renamed: its certificate and key go with it.
            certificates.forget(gone);
            let (cert, key) = paths(&settings.dir, gone);
            let _ = std::fs::remove_file(key);
            let _ = std::fs::remove_file(cert);
        }
        known = wanted.iter().cloned().collect();
        for id in &wanted {
            if *stop.borrow() {
                return;
            }
            look_after(id, &settings, &certificates, &challenges, &mut account).await;
        }
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(settings.acme.check_ms)) => {}
        }
    }
}

/// The certificates ACME looks after: the daemon's, the services' not served from files.
fn wanted(settings: &Settings) -> Vec<String> {
    let mut wanted: Vec<String> = Vec::new();
    if settings.daemon {
        wanted.push(DAEMON.to_owned());
    }
    if settings.acme.services {
        wanted.extend(
            (settings.services)()
                .into_iter()
                .filter(|service| !settings.from_files.contains(service)),
        );
    }
    wanted.dedup();
    wanted
}

/// Serves again, before anything listens, each certificate saved in the data directory
/// that is still wanted (the daemon's, the services' of `settings`), so that a restart or
/// an upgrade in place has them from its first handshake, not once the ACME task reaches
/// them (behind an order that may take minutes).
pub fn serve_saved_all(settings: &Settings, certificates: &Certificates) {
    let now = now();
    for id in &wanted(settings) {
        serve_saved(id, &names(id, settings), settings, certificates, now);
    }
}

/// The certificate of `id` saved in the data directory, served when none is and it names
/// all of `names` (an expired one is withdrawn first).
fn serve_saved(
    id: &str,
    names: &[String],
    settings: &Settings,
    certificates: &Certificates,
    now: i64,
) {
    let (cert_path, key_path) = paths(&settings.dir, id);
    certificates.withdraw_if_expired(id, now);
    if certificates.served(id).is_none()
        && let Ok(certified) = super::load_files(&cert_path, &key_path)
        && names.iter().all(|name| certified.names.contains(name))
    {
        info!(
            id,
            not_after = certified.not_after,
            "certificate read from the data directory"
        );
        serve(certificates, id, certified);
    }
}

/// Rules 2, 3 and 6 for one certificate.
async fn look_after(
    id: &str,
    settings: &Settings,
    certificates: &Certificates,
    challenges: &Challenges,
    account: &mut Option<Account>,
) {
    let names = names(id, settings);
    let now = now();
    certificates.update(id, |view| {
        view.source = "acme".into();
        if view.state != "valid" {
            view.names = names.clone();
        }
    });
    let (cert_path, key_path) = paths(&settings.dir, id);
    serve_saved(id, &names, settings, certificates, now);
    let due = match certificates.served(id) {
        None => true,
        Some(served) => {
            !names.iter().all(|name| served.names.contains(name)) || now >= renew_at(&served)
        }
    };
    let waiting = certificates
        .status()
        .into_iter()
        .find(|view| view.id == id)
        .and_then(|view| view.retry_at_ms)
        .is_some_and(|at| at > now.saturating_mul(1000));
    if !due || waiting {
        return;
    }
    let limit = Duration::from_millis(settings.acme.order_timeout_ms);
    let issued = tokio::time::timeout(limit, async {
        let account = match account {
            Some(account) => account.clone(),
            None => {
                let made = self::account(settings).await?;
                *account = Some(made.clone());
                made
            }
        };
        issue(&account, &names, challenges).await
    })
    .await
    .unwrap_or(Err(IssueError::Timeout(limit)));
    let result = issued.and_then(|(chain, key)| {
        let certified = super::load(chain.as_bytes(), key.as_bytes())?;
        save(&key_path, &key)?;
        save(&cert_path, &chain)?;
        Ok(certified)
    });
    match result {
        Ok(certified) => {
            info!(id, names = ?certified.names, not_after = certified.not_after, "certificate issued");
            serve(certificates, id, certified);
        }
        Err(error) => {
            let why = crate::engine::error_chain(&error);
            if why.contains("accountDoesNotExist") {
                *account = None;
                let _ = std::fs::remove_file(settings.dir.join(ACCOUNT_FILE));
            }
            let mut failures = 0;
            certificates.update(id, |view| {
                view.failures += 1;
                failures = view.failures;
                let wait = jittered(backoff(&settings.acme, view.failures), random());
                view.retry_at_ms = Some(
                    now.saturating_mul(1000)
                        .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
                );
                view.error = Some(why.clone());
                if view.state != "valid" {
                    view.state = "failed".into();
                }
            });
            warn!(
                id,
                failures,
                error = why,
                "certificate not issued; will try again"
            );
        }
    }
}

/// When a certificate is due for renewal: a third of its lifetime before its end (rule 3).
fn renew_at(certified: &super::Certified) -> i64 {
    certified.not_after - (certified.not_after - certified.not_before) / 3
}

/// Serves a certificate, its renewal shown (rule 3).
fn serve(certificates: &Certificates, id: &str, certified: super::Certified) {
    let renew_at_ms = renew_at(&certified).saturating_mul(1000);
    certificates.install(id, certified);
    certificates.update(id, |view| view.renew_at_ms = Some(renew_at_ms));
}

/// The wait after `failures` failures in a row (rule 6).
pub fn backoff(acme: &Acme, failures: u32) -> Duration {
    let doubled = acme
        .retry_min_ms
        .saturating_mul(1u64 << failures.saturating_sub(1).min(32));
    Duration::from_millis(doubled.min(acme.retry_max_ms))
}

/// `wait` less up to a quarter of it, by `random` (uniform over `u64`): between three
/// quarters of `wait` and all of it (rule 6).
pub fn jittered(wait: Duration, random: u64) -> Duration {
    let quarter = wait / 4;
    // random / 2^64 of a quarter, in nanoseconds (u128: no overflow).
    let less = (quarter.as_nanos() * u128::from(random)) >> 64;
    wait - Duration::from_nanos(u64::try_from(less).unwrap_or(u64::MAX))
}

/// A random number for [`jittered`]: std's per-process random hash keys (SipHash keyed from
/// the OS), new ones at each call; no dependency for a jitter that needs no secrecy.
fn random() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    std::hash::RandomState::new().build_hasher().finish()
}

const ACCOUNT_FILE: &str = "acme-account.json";

fn paths(dir: &Path, id: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{id}.pem")), dir.join(format!("{id}.key")))
}

/// Writes a file mode 0600 (write then rename).
fn save(path: &Path, text: &str) -> Result<(), IssueError> {
    secret::write_private(path, text).map_err(|source| IssueError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The account: from its file, else created and saved (rule 4).
async fn account(settings: &Settings) -> Result<Account, IssueError> {
    let builder = || match &settings.acme.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let file = settings.dir.join(ACCOUNT_FILE);
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&text)
    {
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = settings.acme.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.acme.directory.clone(),
            None,
        )
        .await?;
    let text = serde_json::to_string(&credentials).map_err(instant_acme::Error::from)?;
    save(&file, &text)?;
    info!(directory = settings.acme.directory, "ACME account created");
    Ok(account)
}

/// Rule 4: one order, its challenges published while it is checked.
async fn issue(
    account: &Account,
    names: &[String],
    challenges: &Challenges,
) -> Result<(String, String), IssueError> {
    let identifiers: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut published: Vec<(String, String)> = Vec::new();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(IssueError::State {
                        names: names.join(", "),
                        state: format!("{other:?}").to_lowercase(),
                    });
                }
            }
            let identifier = authorization.identifier().to_string();
            let mut challenge = authorization
                .challenge(ChallengeType::Dns01)
                .ok_or_else(|| IssueError::NoDns01(identifier.clone()))?;
            let record = format!("_acme-challenge.{}", identifier.trim_start_matches("*."));
            let value = challenge.key_authorization().dns_value();
            challenges.publish(&record, &value)?;
            published.push((record, value));
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new().timeout(Duration::from_secs(120));
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            let detail = order
                .state()
                .error
                .as_ref()
                .and_then(|problem| problem.detail.clone())
                .unwrap_or_default();
            return Err(IssueError::State {
                names: names.join(", "),
                state: format!("{status:?} {detail}").to_lowercase(),
            });
        }
        let key = order.finalize().await?;
        let chain = order.poll_certificate(&retries).await?;
        Ok((chain, key))
    }
    .await;
    for (record, value) in published {
        challenges.withdraw(&record, &value);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_double_the_wait_up_to_the_longest() {
        let acme = Acme {
            retry_min_ms: 1_000,
            retry_max_ms: 10_000,
            ..Acme::default()
        };
        let waits: Vec<u64> = (1..=6)
            .map(|n| backoff(&acme, n).as_millis() as u64)
            .collect();
        assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
        assert_eq!(backoff(&acme, 200).as_millis(), 10_000);
    }

    #[test]
    fn the_jitter_takes_at_most_a_quarter_off_the_wait() {
        let wait = Duration::from_millis(8_000);
        assert_eq!(jittered(wait, 0), wait);
        assert_eq!(
            jittered(wait, u64::MAX / 2 + 1),
            Duration::from_millis(7_000)
        );
        let least = jittered(wait, u64::MAX);
        assert!(least >= Duration::from_millis(6_000) && least < Duration::from_millis(6_001));
        // Random draws stay within the bounds, and are not all one value.
        let draws: Vec<Duration> = (0..64).map(|_| jittered(wait, random())).collect();
        assert!(
            draws
                .iter()
                .all(|d| *d > Duration::from_millis(6_000) - Duration::from_nanos(1) && *d <= wait)
        );
        assert!(draws.iter().any(|d| *d != draws[0]));
        assert_eq!(jittered(Duration::ZERO, u64::MAX), Duration::ZERO);
    }

    #[test]
    fn a_service_certificate_covers_every_revision_name() {
        let settings = Settings {
            acme: Acme::default(),
            zone: "Revboot.Test.".into(),
            daemon: true,
            dir: PathBuf::new(),
            services: Box::new(Vec::new),
            from_files: Vec::new(),
        };
        assert_eq!(
            names("hello", &settings),
            ["*.hello.revboot.test", "hello.revboot.test"]
        );
        assert_eq!(names(DAEMON, &settings), ["revboot.test"]);
    }
}
