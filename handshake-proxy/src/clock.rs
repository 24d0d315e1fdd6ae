//! When a connection last moved bytes: the clock its idle timeout reads.
//!
//! Each direction's pump touches it for every burst it moves (one relaxed store); the
//! splice waits for it to fall silent for the idle timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When a connection last moved bytes.
#[derive(Debug)]
pub(crate) struct Clock {
    start: Instant,
    last_nanos: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            start: Instant::now(),
            last_nanos: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once the connection has been silent for `idle`.
    pub(crate) async fn silence(&self, idle: Duration) {
        loop {
            let silent = self.silent_for();
            if silent >= idle {
                return;
            }
            tokio::time::sleep(idle - silent).await;
        }
    }
}
