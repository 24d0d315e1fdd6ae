//! Promotions that wait for the new revision: the builder's gate for pushes, and the check
//! of `revboot deploy` and rollbacks.
//!
//! 1. A revision whose manifest has `[deploy] check` or `[run] min_instances` is summoned
//!    through the proxy (its service address gets a listener, as for any summon) and pinned
//!    for the promotion, so that idle reaping leaves it be meanwhile; with `min_instances`
//!    above 1, its other replicas are booted and pinned beside it
//!    ([`Deployer::boot_replicas`]). Refused before anything boots when the instance caps
//!    cannot hold them beside what runs, the live revision's replicas included
//!    ([`Deployer::room_for_replicas`]).
//! 2. With a check, the deployer runs it on every replica ([`Deployer::check`]); without
//!    one, every replica must become ready within its boot timeout.
//! 3. Passed: one line for the pusher or the CLI, timed from the summon (`health check
//!    passed in 4.2 ms: GET /health answered HTTP/1.1 200 OK`), and live moves. Failed:
//!    why; live stays where it was, and the instance is stopped with the reason in its
//!    record.
//! 4. Once live moved, the keeper of warm services looks at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use revboot_builder::gate::{Gate, GateFuture};
use revboot_deployer::{Deployer, Instances};
use revboot_store::{Manifest, Revision};

/// Boots and checks revisions before live moves to them (module doc).
#[derive(Clone)]
pub struct Promotions {
    deployer: Arc<Deployer>,
    /// What summons go through: the proxy.
    front: Arc<dyn Instances>,
}

impl std::fmt::Debug for Promotions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Promotions").finish_non_exhaustive()
    }
}

impl Promotions {
    /// Promotions through `front` (the proxy in front of `deployer`).
    pub fn new(deployer: Arc<Deployer>, front: Arc<dyn Instances>) -> Promotions {
        Promotions { deployer, front }
    }

    /// Whether a promotion to a revision of `manifest` waits for it.
    pub fn gated(manifest: &Manifest) -> bool {
        revboot_builder::gate::gated(manifest)
    }

    /// Boots `revision` and checks it (rules 1 to 3): how it passed, or why not.
    pub async fn admit(
        &self,
        service: &str,
        revision: Revision,
        manifest: &Manifest,
    ) -> Result<String, String> {
        let started = Instant::now();
        let replicas = self.deployer.replicas(&manifest.run);
        if replicas > 0 {
            // Before anything boots: the live revision's replicas serve until live moves.
            self.deployer
                .room_for_replicas(service, &revision, replicas)
                .map_err(|error| error.to_string())?;
        }
        let summoned = self
            .front
            .summon(service, &revision, None)
            .map_err(|error| format!("cannot boot it: {error}"))?;
        self.deployer.pin_for_promotion(&summoned.key);
        let more = replicas > 1;
        let mut replicas = vec![summoned];
        if more {
            let others = self
                .deployer
                .boot_replicas(service, &revision)
                .map_err(|error| format!("cannot boot its replicas: {error}"))?;
            replicas.extend(others);
        }
        let ms = |since: Instant| since.elapsed().as_secs_f64() * 1000.0;
        let count = replicas.len();
        if let Some(check) = &manifest.deploy.check {
            let checks = replicas
                .iter()
                .map(|summoned| self.deployer.check(summoned, check));
            let mut detail = String::new();
            for (summoned, checked) in replicas.iter().zip(join_all(checks).await) {
                let passed = checked.map_err(|failed| match count {
                    1 => failed.0,
                    _ => format!("{} (replica {})", failed.0, summoned.key),
                })?;
                detail = passed.detail;
            }
            // From the summon: the image made ready and the boot count as much as the check.
            let on = if count > 1 {
                format!(" on {count} replicas")
            } else {
                String::new()
            };
            return Ok(format!(
                "health check passed{on} in {:.1} ms: {detail}",
                ms(started)
            ));
        }
        for summoned in &replicas {
            ready(summoned).await?;
        }
        Ok(format!(
            "booted warm in {:.1} ms (min_instances = {})",
            ms(started),
            manifest.run.min_instances
        ))
    }

    /// Live moved (rule 4).
    pub fn promoted(&self) {
        self.deployer.warm_now();
    }
}

/// Waits until `summoned` serves, within its boot timeout: why not, if it does not.
async fn ready(summoned: &revboot_deployer::Summoned) -> Result<(), String> {
    let mut state = summoned.state.clone();
    let limit = summoned.boot_timeout + Duration::from_secs(1);
    let settled = tokio::time::timeout(limit, state.wait_for(|s| s.is_serving() || s.is_final()))
        .await
        .map(|waited| waited.map(|state| state.clone()));
    let key = &summoned.key;
    match settled {
        Ok(Ok(state)) if state.is_serving() => Ok(()),
        Ok(Ok(state)) => Err(match &state {
            revboot_deployer::InstanceState::Crashed { reason } => {
                format!("{key} did not boot: {reason}")
            }
            other => format!("{key} did not boot: {other:?}"),
        }),
        _ => Err(format!("{key} not ready within {} ms", limit.as_millis())),
    }
}

impl Gate for Promotions {
    fn admit<'a>(
        &'a self,
        service: &'a str,
        revision: Revision,
        manifest: &'a Manifest,
    ) -> GateFuture<'a> {
        Box::pin(async move {
            self.admit(service, revision, manifest)
                .await
                .map(|line| vec![line])
        })
    }

    fn promoted(&self, _service: &str, _revision: Revision) {
        Promotions::promoted(self);
    }
}
