//! Warm services (`[run] min_instances = 1`): the live revision stays booted.
//!
//! 1. [`Deployer::keep_warm`] starts the keeper, one task, with the front to summon through
//!    (the proxy, so that the service address has a listener as for any summon).
//! 2. Every [`TICK`], and at once after [`Deployer::warm_now`] (a live move), it reads every
//!    service's live revision and that revision's manifest (from the revision cache).
//! 3. The instance of a warm service's live revision is pinned: idle reaping passes it by
//!    (it turns `idle`, and stays). One that is not running — never booted, crashed, stopped
//!    by an operator — is summoned again; a crash loop's back-off applies as to any summon.
//! 4. Any other pinned instance (its revision is no longer live, or no longer asks to be
//!    warm) is unpinned, and reaped once idle as usual.
//! 5. A promotion pins the instance it booted for [`PROMOTION_PIN`] itself
//!    ([`Deployer::pin_for_promotion`]), before live moves, so that nothing reaps it
//!    between its check and the keeper's next look.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::debug;

use super::Deployer;
use crate::summon::{InstanceKey, Instances};

/// How often the keeper looks.
pub(super) const TICK: Duration = Duration::from_secs(1);
/// How long a promotion's own pin holds.
pub(super) const PROMOTION_PIN: Duration = Duration::from_secs(60);

impl Deployer {
    /// Starts the keeper of warm services (module doc), summoning through `front`. It ends
    /// with the deployer's shutdown.
    pub fn keep_warm(self: &Arc<Self>, front: Arc<dyn Instances>) {
        let me: Weak<Deployer> = Arc::downgrade(self);
        self.runtime.spawn(async move {
            loop {
                let Some(deployer) = me.upgrade() else { return };
                if deployer.is_shutting_down() {
                    return;
                }
                let wake = Arc::clone(&deployer.warm_wake);
                let front = Arc::clone(&front);
                let looked = tokio::task::spawn_blocking(move || deployer.warm_once(&*front));
                if looked.await.is_err() {
                    return;
                }
                let _ = tokio::time::timeout(TICK, wake.notified()).await;
            }
        });
    }

    /// Asks the keeper to look now (live moved).
    pub fn warm_now(&self) {
        self.warm_wake.notify_one();
    }

    /// Keeps the instance of `key` booted for a while (rule 5).
    pub fn pin_for_promotion(&self, key: &InstanceKey) {
        if let Some(entry) = self.entry(key) {
            let until = self.ms_since_epoch() + PROMOTION_PIN.as_millis() as u64;
            let _ = entry
                .warm_until
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                    (now != u64::MAX).then_some(now.max(until))
                });
        }
    }

    pub(super) fn is_shutting_down(&self) -> bool {
        self.table
            .lock()
            .expect("table lock is never poisoned")
            .shutting_down
    }

    /// One look (rules 2 to 4).
    fn warm_once(&self, front: &dyn Instances) {
        let Ok(services) = self.store.services() else {
            return;
        };
        let mut wanted = HashSet::new();
        for service in services {
            let Ok(Some(live)) = self.store.live(&service) else {
                continue;
            };
            let Ok(info) = self.revision_info(&service, &live) else {
                continue;
            };
            let run = &info.manifest.run;
            if run.min_instances > 0 && !run.per_client {
                wanted.insert(InstanceKey {
                    service,
                    revision: live,
                    client: None,
                });
            }
        }
        for entry in self.entries() {
            if wanted.contains(&entry.key) {
                entry.warm_until.store(u64::MAX, Ordering::Relaxed);
            } else {
                let _ = entry.warm_until.compare_exchange(
                    u64::MAX,
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        for key in wanted {
            let running = self
                .entry(&key)
                .is_some_and(|entry| !entry.state.borrow().is_final());
            if running {
                continue;
            }
            match front.summon(&key.service, &key.revision, None) {
                Ok(_) => {
                    debug!(instance = %key, "warm service: booted its live revision");
                    if let Some(entry) = self.entry(&key) {
                        entry.warm_until.store(u64::MAX, Ordering::Relaxed);
                    }
                }
                // Lasting refusals (back-off, caps) are logged by the summon itself.
                Err(error) => debug!(instance = %key, %error, "warm service: summon refused"),
            }
        }
    }
}
