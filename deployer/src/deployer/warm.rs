//! Warm services (`[run] min_instances = N`): N replicas of the live revision stay booted.
//!
//! 1. [`Deployer::keep_warm`] starts the keeper, one task, with the front to summon through
//!    (the proxy, so that the service address has a listener as for any summon).
//! 2. Every [`TICK`], and at once after [`Deployer::warm_now`] (a live move), it reads every
//!    service's live revision and that revision's manifest (from the revision cache).
//! 3. The replicas 0 to N-1 of a warm service's live revision are pinned: idle reaping
//!    passes them by (they turn `idle`, and stay). When none runs, the revision is summoned
//!    through the front (which boots replica 0, on the node that owns it in a cluster);
//!    then every missing one — never booted, crashed, stopped by an operator — is booted
//!    here, next to those that run, on their address; a crash loop's back-off applies to
//!    each replica as to any summon.
//! 4. Any other pinned instance (its revision is no longer live, or no longer asks to be
//!    warm) is unpinned, and reaped once idle as usual.
//! 5. A promotion boots and pins the replicas of the revision it promotes for
//!    [`PROMOTION_PIN`] itself ([`Deployer::boot_replicas`], [`Deployer::pin_for_promotion`]),
//!    before live moves, so that nothing reaps them between their check and the keeper's
//!    next look. The live revision's replicas keep serving meanwhile, all of them, so that
//!    a check that fails costs the service nothing (blue-green, as Heroku's preboot or
//!    Fly's bluegreen strategy): the caps must hold the old and the new replicas at once,
//!    and a promotion they cannot hold is refused before anything boots, naming the cap
//!    ([`Deployer::room_for_replicas`]). Stopping old replicas as new ones pass was the
//!    other way; it leaves the live revision short of replicas when a later one fails.
//! 6. Connections to the replicas' address, and summons of their revision, are spread over
//!    the replicas that serve ([`Deployer::spread`]): to the one with the fewest open
//!    connections, and among equals to each in turn. Fewest open connections rather than
//!    round robin alone, because the proxy counts them anyway and a replica holding long
//!    connections should not get more; the turn keeps short requests (all replicas at 0
//!    open most of the time) from all going to the first.
//! 7. Replicas need the proxy in front (`BackendPort::Ephemeral`: each replica's socket is
//!    on the shared address, a port of its own). Without it every instance owns its client
//!    port, so one replica is kept. Where the kernel steers warm connections
//!    ([`crate::steer`]), each replica is a slot of its address's route (its index), and
//!    the program spreads new connections over the slots by a hash of the client's address
//!    and port; the proxy spreads only what reaches it (a replica's slot empty, steering
//!    off, the front door, a hand-off).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use revboot_store::Revision;
use revboot_store::manifest::{MAX_REPLICAS, Run};
use tracing::{debug, warn};

use super::Deployer;
use super::table::{Entry, Table};
use crate::summon::{InstanceKey, Instances, SummonError, Summoned};

// Each replica is a slot of its address's steering route (rule 7).
const _: () = assert!(MAX_REPLICAS as usize <= crate::steer::SLOTS);

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

    /// How many replicas of a revision with this manifest are kept booted while it is live
    /// (rules 3 and 7): 0 for a service that is not warm.
    pub fn replicas(&self, run: &Run) -> u16 {
        if run.min_instances == 0 || run.per_client {
            0
        } else if self.config.backend_port == crate::config::BackendPort::Same {
            1
        } else {
            run.min_instances.min(MAX_REPLICAS) as u16
        }
    }

    /// Boots the replicas of `revision` besides the first (which the caller summoned, and
    /// which must be running here) and pins them for a promotion (rule 5): each one's
    /// summon, replica 1 first. Refused at once, nothing booted, when the instance caps
    /// cannot hold them all.
    pub fn boot_replicas(
        &self,
        service: &str,
        revision: &Revision,
    ) -> Result<Vec<Summoned>, SummonError> {
        let info = self.revision_info(service, revision)?;
        let replicas = self.replicas(&info.manifest.run);
        self.room_for_replicas(service, revision, replicas)?;
        let first = InstanceKey::first(service, *revision, None);
        (1..replicas)
            .map(|replica| {
                let key = first.with_replica(replica);
                let summoned = self.start(key, Arc::clone(&info))?;
                self.pin_for_promotion(&summoned.key);
                Ok(summoned)
            })
            .collect()
    }

    /// Whether the instance caps hold `replicas` replicas of `revision`, alone and beside
    /// every other instance that runs now (rule 5; those of `revision` itself are its
    /// replicas already).
    pub fn room_for_replicas(
        &self,
        service: &str,
        revision: &Revision,
        replicas: u16,
    ) -> Result<(), SummonError> {
        let cap = self.config.max_per_service.min(self.config.max_instances);
        if usize::from(replicas) > cap {
            return Err(SummonError::Replicas {
                service: service.to_owned(),
                replicas,
                limit: cap,
            });
        }
        let table = self.table.lock().expect("table lock is never poisoned");
        let mine = table
            .by_key
            .iter()
            .filter(|(key, entry)| {
                key.service == service
                    && key.revision == *revision
                    && entry.counted.load(Ordering::Acquire)
            })
            .count();
        let of_service = table.per_service.get(service).copied().unwrap_or(0);
        let caps = [
            (of_service, self.config.max_per_service, "max_per_service"),
            (table.live, self.config.max_instances, "max_total"),
        ];
        for (counted, limit, cap) in caps {
            let running = counted.saturating_sub(mine);
            let needed = running + usize::from(replicas);
            if needed > limit {
                return Err(SummonError::PromotionRoom {
                    service: service.to_owned(),
                    replicas,
                    running,
                    needed,
                    limit,
                    cap,
                });
            }
        }
        Ok(())
    }

    /// The replica to give a connection or a summon to, of those on `holder`'s address
    /// (rule 6): `holder` itself when it has no other.
    pub(super) fn spread<'t>(&self, table: &'t Table, holder: &'t Arc<Entry>) -> &'t Arc<Entry> {
        let Some(others) = table.replicas.get(&holder.addresses.primary()) else {
            return holder;
        };
        let count = others.len() + 1;
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % count;
        (0..count)
            .map(|at| match (start + at) % count {
                0 => holder,
                other => &others[other - 1],
            })
            .filter(|entry| entry.state.borrow().is_serving())
            .min_by_key(|entry| entry.open.load(Ordering::Relaxed))
            .unwrap_or(holder)
    }

    /// True while other replicas share `entry`'s address (rule 4): its open connections
    /// are then told from theirs by the sockets its processes hold.
    pub(super) fn shares_address(&self, entry: &Entry) -> bool {
        let table = self.table.lock().expect("table lock is never poisoned");
        let address = entry.addresses.primary();
        table.replicas.get(&address).is_some_and(|others| {
            others.iter().any(|other| other.id != entry.id)
                || table
                    .by_address
                    .get(&address)
                    .is_some_and(|holder| holder.id != entry.id)
        })
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
        let mut groups = Vec::new();
        for service in services {
            let Ok(Some(live)) = self.store.live(&service) else {
                continue;
            };
            let Ok(info) = self.revision_info(&service, &live) else {
                continue;
            };
            let replicas = self.replicas(&info.manifest.run);
            let first = InstanceKey::first(&service, live, None);
            wanted.extend((0..replicas).map(|replica| first.with_replica(replica)));
            if replicas > 0 {
                groups.push((first, replicas, info));
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
        for (first, replicas, info) in groups {
            let running = |replica: u16| {
                self.entry(&first.with_replica(replica))
                    .is_some_and(|entry| !entry.state.borrow().is_final())
            };
            let missing: Vec<u16> = (0..replicas).filter(|r| !running(*r)).collect();
            if missing.is_empty() {
                continue;
            }
            if missing.len() == usize::from(replicas) {
                match front.summon(&first.service, &first.revision, None) {
                    Ok(_) => debug!(instance = %first, "warm service: booted its live revision"),
                    // Lasting refusals (back-off, caps) are logged by the summon itself.
                    Err(error) => {
                        debug!(instance = %first, %error, "warm service: summon refused");
                    }
                }
            }
            // Replicas run where their first runs: none here (placed on another node, or
            // refused), none booted here.
            if !(0..replicas).any(running) {
                continue;
            }
            for replica in (0..replicas).filter(|r| !running(*r)) {
                let key = first.with_replica(replica);
                match self.start(key.clone(), Arc::clone(&info)) {
                    Ok(_) => debug!(instance = %key, "warm service: booted a replica"),
                    Err(error) if error.is_lasting() => {
                        debug!(instance = %key, %error, "warm service: replica refused");
                    }
                    Err(error) => warn!(instance = %key, %error, "warm service: replica refused"),
                }
            }
            for replica in 0..replicas {
                if let Some(entry) = self.entry(&first.with_replica(replica)) {
                    entry.warm_until.store(u64::MAX, Ordering::Relaxed);
                }
            }
        }
    }
}
