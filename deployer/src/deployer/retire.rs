//! The end of a service's instances when the service is renamed or deleted.
//!
//! 1. [`Deployer::retire`] marks the service retiring under the table lock: from then on no
//!    summon boots an instance of it ([`SummonError::Retiring`]), so none can start between
//!    the stop and the change of name.
//! 2. Every instance of the service is stopped gracefully (`stopped: service renamed or
//!    deleted`), and the call waits, bounded, until each one's task has ended, its runtime
//!    record written under the old name (the store then moves or removes it with the
//!    service's other refs).
//! 3. The [`Retirement`] it returns keeps the service retiring; dropping it lets summons
//!    of that name boot again (a renamed service's new name was never closed; a deleted
//!    name may be pushed and served anew).
//!
//! [`SummonError::Retiring`]: crate::SummonError::Retiring

use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{info, warn};

use super::table::{Command, Entry, StopReason};
use super::{Deployer, KILL_WAIT};

/// A service kept from booting while it is renamed or deleted; dropping it ends that.
#[derive(Debug)]
#[must_use = "the service boots again once this is dropped"]
pub struct Retirement {
    deployer: Weak<Deployer>,
    service: String,
    stopped: usize,
}

impl Retirement {
    /// How many instances of the service were stopped.
    pub fn stopped(&self) -> usize {
        self.stopped
    }
}

impl Drop for Retirement {
    fn drop(&mut self) {
        if let Some(deployer) = self.deployer.upgrade() {
            let mut table = deployer.table.lock().expect("table lock is never poisoned");
            table.retiring.remove(&self.service);
        }
    }
}

impl Deployer {
    /// Stops every instance of `service` and keeps new ones from booting until the
    /// [`Retirement`] is dropped (module docs). Waits at most the stop grace plus the time a
    /// kill may take for the instances to end.
    pub async fn retire(&self, service: &str) -> Retirement {
        let entries: Vec<Arc<Entry>> = {
            let mut table = self.table.lock().expect("table lock is never poisoned");
            table.retiring.insert(service.to_owned());
            table
                .entries()
                .filter(|entry| entry.key.service == service)
                .cloned()
                .collect()
        };
        let retirement = Retirement {
            deployer: self.me.clone(),
            service: service.to_owned(),
            stopped: entries.len(),
        };
        for entry in &entries {
            entry.order(Command::Stop(StopReason::Retired));
        }
        let limit = self.config.stop_grace() + KILL_WAIT + Duration::from_secs(5);
        let all_ended = async {
            for entry in &entries {
                let mut ended = entry.ended.subscribe();
                let _ = ended.wait_for(|ended| *ended).await;
            }
        };
        if tokio::time::timeout(limit, all_ended).await.is_err() {
            warn!(
                service,
                "instances of a retiring service still finishing; their records may come late"
            );
        }
        info!(service, stopped = entries.len(), "service retired");
        retirement
    }
}
