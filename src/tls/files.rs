//! Certificates from files: the daemon's (`[tls] cert`, `key`) and services'
//! (`[tls.services.<name>]`), all watched by one task.
//!
//! 1. At start each pair is loaded and checked ([`super::load`]); a service's must also cover
//!    a name of that service (`<service>.<zone>` or a name under it). The daemon's failing
//!    stops the start (no HTTPS without it); a service's failing is reported and that
//!    service's names get no certificate until a good one is written.
//! 2. Every `reload_ms`, a file whose modification time or length changed is loaded again;
//!    SIGHUP loads every pair at once, changed or not (with no files, it does nothing: it
//!    never ends the daemon). A good pair is served from the next
//!    handshake; a bad one (tampered, expired, not the key's, outside its service) is
//!    reported in the log and the status, and what was served stays.
//! 3. At every look, a certificate whose validity ended while it was served is withdrawn and
//!    reported; a look is due a second after the first end of validity of those served, if
//!    that comes before `reload_ms` (and the resolver never presents an expired one in
//!    between: [`super::Certificates`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use super::config::Files;
use super::{CertError, Certificates, Certified, DAEMON, load_files};

/// A file's modification time and length, if it can be read.
type Stamp = Option<(SystemTime, u64)>;

/// One pair of files and what was seen of them.
#[derive(Debug)]
struct Watched {
    /// [`DAEMON`] or a service's name.
    id: String,
    files: Files,
    /// `<service>.<zone>` for a service's.
    domain: Option<String>,
    seen: (Stamp, Stamp),
}

impl Watched {
    fn stamps(&self) -> (Stamp, Stamp) {
        (stamp(&self.files.cert), stamp(&self.files.key))
    }

    /// Rule 1's checks.
    fn load(&self) -> Result<Certified, CertError> {
        let certified = load_files(&self.files.cert, &self.files.key)?;
        if let Some(domain) = &self.domain {
            let suffix = format!(".{domain}");
            let inside = |name: &String| {
                let name = name.trim_start_matches("*.");
                name == domain || name.ends_with(&suffix)
            };
            if !certified.names.iter().any(inside) {
                return Err(CertError::OutsideService {
                    domain: domain.clone(),
                });
            }
        }
        Ok(certified)
    }

    /// Loads and serves, or reports (rule 2).
    fn reload(&self, certificates: &Certificates) {
        match self.load() {
            Ok(certified) => {
                info!(id = self.id, names = ?certified.names, not_after = certified.not_after, "certificate loaded from files");
                certificates.install(&self.id, certified);
            }
            Err(error) => {
                let why = crate::engine::error_chain(&error);
                warn!(id = self.id, error = why, file = %self.files.cert.display(), "certificate file refused; what was served stays");
                certificates.update(&self.id, |view| {
                    view.failures += 1;
                    view.error = Some(why);
                    if view.state != "valid" {
                        view.state = "failed".into();
                    }
                });
            }
        }
    }
}

/// A file's identity for change detection: modification time and length.
fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Loads the daemon's certificate (`daemon`) and the services' (`services`, for names under
/// `zone`) and serves them; then watches them until `stop` turns true. An error loading the
/// daemon's is returned (the daemon does not start with a certificate it cannot serve).
pub fn watch(
    certificates: Arc<Certificates>,
    daemon: Option<Files>,
    services: &BTreeMap<String, Files>,
    zone: &str,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), CertError> {
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    let mut watched: Vec<Watched> = Vec::new();
    if let Some(files) = daemon {
        watched.push(Watched {
            id: DAEMON.to_owned(),
            files,
            domain: None,
            seen: (None, None),
        });
    }
    watched.extend(services.iter().map(|(service, files)| Watched {
        id: service.clone(),
        files: files.clone(),
        domain: Some(format!("{service}.{zone}")),
        seen: (None, None),
    }));
    for one in &mut watched {
        certificates.update(&one.id, |view| view.source = "files".into());
        one.seen = one.stamps();
        if one.id == DAEMON {
            let certified = one.load()?;
            info!(names = ?certified.names, not_after = certified.not_after, "HTTPS certificate loaded");
            certificates.install(DAEMON, certified);
        } else {
            one.reload(&certificates);
        }
    }
    // SIGHUP: look at every file now. Without the signal's handler (it could not be
    // installed), polling alone.
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            warn!(%error, "cannot listen for SIGHUP; certificate files are polled only");
            None
        }
    };
    if watched.is_empty() {
        // Nothing to watch; SIGHUP (`systemctl reload`) is still taken, and does nothing,
        // rather than ending the daemon as its default action would.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => return,
                    Some(()) = async { hangup.as_mut()?.recv().await } => {
                        info!("SIGHUP: no certificate files to load");
                    }
                }
            }
        });
        return Ok(());
    }
    tokio::spawn(async move {
        loop {
            // The next look: after `every`, or just after the first end of validity.
            let first_end = watched
                .iter()
                .filter_map(|one| certificates.served(&one.id))
                .map(|served| served.remaining(super::now()))
                .min();
            let wait = first_end.map_or(every, |left| {
                every.min(Duration::from_secs(left.max(0).cast_unsigned() + 1))
            });
            let all = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(wait) => false,
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    info!("SIGHUP: certificate files loaded again");
                    true
                }
            };
            for one in &mut watched {
                let now_seen = one.stamps();
                if all || now_seen != one.seen {
                    one.seen = now_seen;
                    one.reload(&certificates);
                }
                certificates.withdraw_if_expired(&one.id, super::now());
            }
        }
    });
    Ok(())
}
