//! The set of services closed to pushes and builds while they are renamed or deleted (see
//! `lifecycle`), shared by the queue, the smart HTTP routes and the lifecycle's guard. A leaf:
//! the queue and the lifecycle both use it and neither imports the other for it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The services closed to pushes and builds, shared by the queue and the smart HTTP routes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Closed(Arc<Mutex<HashSet<String>>>);

impl Closed {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn contains(&self, service: &str) -> bool {
        self.set().contains(service)
    }

    pub(crate) fn insert(&self, service: &str) {
        self.set().insert(service.to_owned());
    }

    pub(crate) fn remove(&self, services: &[String]) {
        let mut set = self.set();
        for service in services {
            set.remove(service);
        }
    }
}
