//! Refused summons in the log without a flood: one line per service per window.
//!
//! A refusal that lasts (a cap, the address pool, a crash loop's back-off) is met by every
//! query until instances end; a line for each would bury the log. So:
//!
//! 1. The first refusal for a service is logged at once and opens a window of
//!    [`WINDOW`].
//! 2. Refusals for that service within the window are counted, not logged.
//! 3. The first refusal after the window is logged with the count of those not logged
//!    since the previous line, and opens a new window.
//! 4. At most [`MAX_SERVICES`] services are tracked. When the table is full, closed windows
//!    are dropped; if none is closed, the table is emptied. A flood of service names then
//!    costs more lines, never memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a logged refusal covers the next ones of its service.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// Services whose windows are tracked at once.
pub(crate) const MAX_SERVICES: usize = 1024;

/// The windows, per service.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    services: Mutex<HashMap<String, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    opened: Instant,
    /// Refusals not logged since the window opened.
    suppressed: u64,
}

impl RefusalLog {
    /// Counts a refusal for `service` at `now`. `Some(n)` if it is to be logged, `n` being
    /// the refusals of that service left out of the log since the previous line.
    pub(crate) fn note(&self, service: &str, now: Instant) -> Option<u64> {
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(window) = services.get_mut(service) {
            if now.saturating_duration_since(window.opened) < WINDOW {
                window.suppressed += 1;
                return None;
            }
            let suppressed = window.suppressed;
            *window = Window {
                opened: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if services.len() >= MAX_SERVICES {
            services.retain(|_, window| now.saturating_duration_since(window.opened) < WINDOW);
            if services.len() >= MAX_SERVICES {
                services.clear();
            }
        }
        services.insert(
            service.to_owned(),
            Window {
                opened: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_service_per_window_with_the_count_left_out() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(log.note("a", at(0)), Some(0));
        for ms in 1..=31 {
            assert_eq!(log.note("a", at(ms)), None);
        }
        // Another service has its own window.
        assert_eq!(log.note("b", at(40)), Some(0));
        assert_eq!(log.note("a", at(9_999)), None);
        // The next line after the window says how many were left out.
        assert_eq!(log.note("a", at(10_000)), Some(32));
        assert_eq!(log.note("a", at(10_001)), None);
        assert_eq!(log.note("a", at(30_000)), Some(1));
        assert_eq!(log.note("b", at(30_000)), Some(0));
    }

    #[test]
    fn the_table_stays_bounded() {
        let log = RefusalLog::default();
        let start = Instant::now();
        for n in 0..MAX_SERVICES * 3 {
            assert_eq!(log.note(&format!("s{n}"), start), Some(0));
        }
        let tracked = log.services.lock().expect("not poisoned").len();
        assert!(tracked <= MAX_SERVICES, "{tracked}");
        // Closed windows make room first.
        let later = start + WINDOW;
        assert_eq!(log.note("fresh", later), Some(0));
        assert_eq!(log.services.lock().expect("not poisoned").len(), 1);
    }
}
