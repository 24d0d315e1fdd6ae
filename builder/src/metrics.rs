//! Build counters for the daemon's `/metrics`, read from the build records and rendered in
//! Prometheus text format.

use std::fmt::Write as _;

use crate::queue::BuildRecord;
use crate::state::BuildState;

/// Upper bounds (seconds) of the build-duration histogram.
const BUILD_BUCKETS: [f64; 8] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Builds by result, and the wall time of those that ran to an end.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BuildMetrics {
    /// Builds that succeeded.
    pub succeeded: u64,
    /// Builds that failed.
    pub failed: u64,
    /// Builds stopped by a daemon stop.
    pub interrupted: u64,
    /// Builds replaced before they started.
    pub superseded: u64,
    /// Of the builds that started and finished, how many took at most each of the
    /// histogram's bounds (1, 5, 15, 30, 60, 120, 300 and 600 s).
    pub duration_buckets: [u64; BUILD_BUCKETS.len()],
    /// How many builds started and finished.
    pub duration_count: u64,
    /// Their wall times added up, in seconds.
    pub duration_sum: f64,
}

impl BuildMetrics {
    /// Counts `records`.
    pub fn of(records: &[BuildRecord]) -> BuildMetrics {
        let count = |state| records.iter().filter(|r| r.state == state).count() as u64;
        let durations: Vec<f64> = records
            .iter()
            .filter_map(|r| Some((r.finished_at_ms? as f64 - r.started_at_ms? as f64) / 1000.0))
            .collect();
        BuildMetrics {
            succeeded: count(BuildState::Succeeded),
            failed: count(BuildState::Failed),
            interrupted: count(BuildState::Interrupted),
            superseded: count(BuildState::Superseded),
            duration_buckets: BUILD_BUCKETS
                .map(|bound| durations.iter().filter(|d| **d <= bound).count() as u64),
            duration_count: durations.len() as u64,
            duration_sum: durations.iter().sum::<f64>(),
        }
    }

    /// Writes `revboot_builds_total` by result and the `revboot_build_duration_seconds`
    /// histogram in Prometheus text format, as the daemon's `/metrics` serves them.
    pub fn write_prometheus(&self, out: &mut String) {
        family(out, "revboot_builds_total", "counter", "Builds by result.");
        for (word, count) in [
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("interrupted", self.interrupted),
            ("superseded", self.superseded),
        ] {
            let _ = writeln!(out, "revboot_builds_total{{result=\"{word}\"}} {count}");
        }
        family(
            out,
            "revboot_build_duration_seconds",
            "histogram",
            "Build wall time.",
        );
        for (bound, count) in BUILD_BUCKETS.iter().zip(self.duration_buckets) {
            let _ = writeln!(
                out,
                "revboot_build_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "revboot_build_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            self.duration_count
        );
        let _ = writeln!(
            out,
            "revboot_build_duration_seconds_sum {}",
            self.duration_sum
        );
        let _ = writeln!(
            out,
            "revboot_build_duration_seconds_count {}",
            self.duration_count
        );
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}
