//! When a connection last moved bytes: the clock its idle timeout reads.
//!
//! Each direction's pump touches it for every burst it moves (one relaxed store); the
//! splice waits for it to fall silent for the idle timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Which of a relay's limits stopped it ([`Clock::limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// Silent for the idle timeout.
    Idle,
    /// Open until its total deadline.
    Total,
    /// The proxy shuts down.
    Cancelled,
    /// An upgrade in place pauses it.
    Paused,
}

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

    /// Resolves when the first of a relay's limits is reached: silent for `idle`, the
    /// `total` deadline, `cancel`, `pause` (`None`s never come).
    pub(crate) async fn limits(
        &self,
        idle: Option<Duration>,
        total: Option<tokio::time::Instant>,
        cancel: &CancellationToken,
        pause: Option<&CancellationToken>,
    ) -> Limit {
        let idle = async {
            match idle {
                Some(idle) => self.silence(idle).await,
                None => std::future::pending().await,
            }
        };
        let total = async {
            match total {
                Some(total) => tokio::time::sleep_until(total).await,
                None => std::future::pending().await,
            }
        };
        let paused = async {
            match pause {
                Some(pause) => pause.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = idle => Limit::Idle,
            () = total => Limit::Total,
            () = cancel.cancelled() => Limit::Cancelled,
            () = paused => Limit::Paused,
        }
    }
}
