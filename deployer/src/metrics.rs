//! Counters of instance lives, and instances by state, for the daemon's `/metrics`, which
//! they render themselves in Prometheus text format.
//!
//! Lock-free: every field is an atomic, written on the boot path and read when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::summon::InstanceState;

/// Upper bounds of the boot-time histogram, in milliseconds (summon → ready).
pub const BOOT_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// Counters of boots, readiness and ends.
#[derive(Debug, Default)]
pub struct Metrics {
    boots: AtomicU64,
    ready: AtomicU64,
    boot_failures: AtomicU64,
    crashes: AtomicU64,
    stops: AtomicU64,
    buckets: [AtomicU64; BOOT_BUCKETS_MS.len()],
    boot_micros_sum: AtomicU64,
    manifest_reads: AtomicU64,
    steered_ended: AtomicU64,
}

/// A snapshot of [`Metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Instances started (summons that booted).
    pub boots: u64,
    /// Instances that became ready.
    pub ready: u64,
    /// Instances that ended before they were ready.
    pub boot_failures: u64,
    /// Instances that crashed after they were ready.
    pub crashes: u64,
    /// Instances stopped on purpose (idle, operator, shutdown).
    pub stops: u64,
    /// Cumulative counts of boot times at most each of [`BOOT_BUCKETS_MS`].
    pub boot_buckets: [u64; BOOT_BUCKETS_MS.len()],
    /// Sum of boot times of ready instances.
    pub boot_time_sum: Duration,
    /// Deployment manifests read from the store (a revision's first resolve or summon, or
    /// the background warm-up after the repository changed).
    pub manifest_reads: u64,
    /// Connections the kernel handed straight to ready instances ([`crate::steer`]).
    pub steered_connections: u64,
    /// Instances whose connections are steered now.
    pub steered_instances: u64,
}

impl Metrics {
    pub(crate) fn booted(&self) {
        self.boots.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn became_ready(&self, boot: Duration) {
        self.ready.fetch_add(1, Ordering::Relaxed);
        let ms = boot.as_secs_f64() * 1000.0;
        if let Some(index) = BOOT_BUCKETS_MS.iter().position(|bound| ms <= *bound as f64) {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(boot.as_micros()).unwrap_or(u64::MAX);
        self.boot_micros_sum.fetch_add(micros, Ordering::Relaxed);
    }

    pub(crate) fn manifest_read(&self) {
        self.manifest_reads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn unsteered(&self, connections: u64) {
        self.steered_ended.fetch_add(connections, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, crashed: bool, was_ready: bool) {
        let counter = match (crashed, was_ready) {
            (true, false) => &self.boot_failures,
            (true, true) => &self.crashes,
            (false, _) => &self.stops,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut boot_buckets = [0; BOOT_BUCKETS_MS.len()];
        let mut cumulative = 0;
        for (slot, bucket) in boot_buckets.iter_mut().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            *slot = cumulative;
        }
        MetricsSnapshot {
            boots: self.boots.load(Ordering::Relaxed),
            ready: self.ready.load(Ordering::Relaxed),
            boot_failures: self.boot_failures.load(Ordering::Relaxed),
            crashes: self.crashes.load(Ordering::Relaxed),
            stops: self.stops.load(Ordering::Relaxed),
            boot_buckets,
            boot_time_sum: Duration::from_micros(self.boot_micros_sum.load(Ordering::Relaxed)),
            manifest_reads: self.manifest_reads.load(Ordering::Relaxed),
            steered_connections: self.steered_ended.load(Ordering::Relaxed),
            steered_instances: 0,
        }
    }
}

impl MetricsSnapshot {
    /// Writes the counters in Prometheus text format, as the daemon's `/metrics` serves them:
    /// boots, steered connections and instances, ends by kind and the boot-time histogram.
    pub fn write_prometheus(&self, out: &mut String) {
        family(out, "revboot_boots_total", "counter", "Instances booted.");
        let _ = writeln!(out, "revboot_boots_total {}", self.boots);
        family(
            out,
            "revboot_steered_connections_total",
            "counter",
            "Connections the kernel handed straight to ready instances.",
        );
        let _ = writeln!(
            out,
            "revboot_steered_connections_total {}",
            self.steered_connections
        );
        family(
            out,
            "revboot_steered_instances",
            "gauge",
            "Ready instances whose connections are steered past the proxy.",
        );
        let _ = writeln!(out, "revboot_steered_instances {}", self.steered_instances);
        family(
            out,
            "revboot_instance_ends_total",
            "counter",
            "Instance ends by kind.",
        );
        for (kind, value) in [
            ("boot_failure", self.boot_failures),
            ("crash", self.crashes),
            ("stop", self.stops),
        ] {
            let _ = writeln!(
                out,
                "revboot_instance_ends_total{{kind=\"{kind}\"}} {value}"
            );
        }
        family(
            out,
            "revboot_boot_duration_seconds",
            "histogram",
            "Summon to ready.",
        );
        for (bound, count) in BOOT_BUCKETS_MS.iter().zip(self.boot_buckets) {
            let _ = writeln!(
                out,
                "revboot_boot_duration_seconds_bucket{{le=\"{}\"}} {count}",
                *bound as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "revboot_boot_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            self.ready
        );
        let _ = writeln!(
            out,
            "revboot_boot_duration_seconds_sum {}",
            self.boot_time_sum.as_secs_f64()
        );
        let _ = writeln!(out, "revboot_boot_duration_seconds_count {}", self.ready);
    }
}

/// Instances by state, for the `revboot_instances` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InstanceCounts {
    /// Known, not running.
    pub cold: u64,
    /// Started, not ready yet.
    pub booting: u64,
    /// Serving.
    pub ready: u64,
    /// Serving, quiet lately.
    pub idle: u64,
}

impl InstanceCounts {
    /// Counts `states` (stopped and crashed instances are not counted).
    pub fn of<'a>(states: impl IntoIterator<Item = &'a InstanceState>) -> InstanceCounts {
        let mut counts = InstanceCounts::default();
        for state in states {
            match state {
                InstanceState::Cold => counts.cold += 1,
                InstanceState::Booting => counts.booting += 1,
                InstanceState::Ready => counts.ready += 1,
                InstanceState::Idle => counts.idle += 1,
                _ => {}
            }
        }
        counts
    }

    /// Writes the `revboot_instances` gauge by state in Prometheus text format, as the
    /// daemon's `/metrics` serves it.
    pub fn write_prometheus(&self, out: &mut String) {
        family(out, "revboot_instances", "gauge", "Instances by state.");
        for (state, count) in [
            ("cold", self.cold),
            ("booting", self.booting),
            ("ready", self.ready),
            ("idle", self.idle),
        ] {
            let _ = writeln!(out, "revboot_instances{{state=\"{state}\"}} {count}");
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_ends_are_told_apart() {
        let metrics = Metrics::default();
        metrics.booted();
        metrics.booted();
        metrics.booted();
        metrics.became_ready(Duration::from_micros(1500));
        metrics.became_ready(Duration::from_millis(30));
        metrics.ended(true, false);
        metrics.ended(true, true);
        metrics.ended(false, true);
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.boots, 3);
        assert_eq!(snapshot.ready, 2);
        assert_eq!(
            (snapshot.boot_failures, snapshot.crashes, snapshot.stops),
            (1, 1, 1)
        );
        assert_eq!(snapshot.boot_buckets[0], 0); // ≤ 1 ms
        assert_eq!(snapshot.boot_buckets[1], 1); // ≤ 2 ms
        assert_eq!(snapshot.boot_buckets[5], 2); // ≤ 50 ms
        assert_eq!(snapshot.boot_buckets[BOOT_BUCKETS_MS.len() - 1], 2);
        assert_eq!(snapshot.boot_time_sum, Duration::from_micros(31_500));
    }
}
