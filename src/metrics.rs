//! `/metrics`: the parts' counters in Prometheus text format.

use std::fmt::Write as _;
use std::sync::Arc;

use revboot_builder::{BuildState, Builder};
use revboot_deployer::metrics::BOOT_BUCKETS_MS;
use revboot_deployer::{Deployer, InstanceState};
use revboot_proxy::Proxy;

use crate::api::Metrics;

/// Upper bounds (seconds) of the build-duration histogram.
const BUILD_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Reads the counters of every part when scraped.
pub struct DaemonMetrics {
    dns: Arc<revboot_dns::Metrics>,
    proxy: Arc<Proxy>,
    deployer: Arc<Deployer>,
    builder: Builder,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for DaemonMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonMetrics").finish_non_exhaustive()
    }
}

impl DaemonMetrics {
    /// Collects from the running parts; must be called inside the daemon's runtime.
    pub fn new(
        dns: Arc<revboot_dns::Metrics>,
        proxy: Arc<Proxy>,
        deployer: Arc<Deployer>,
        builder: Builder,
    ) -> DaemonMetrics {
        DaemonMetrics {
            dns,
            proxy,
            deployer,
            builder,
            handle: tokio::runtime::Handle::current(),
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics for DaemonMetrics {
    fn render(&self) -> String {
        let mut out = String::new();

        let dns = self.dns.snapshot();
        family(
            &mut out,
            "revboot_dns_responses_total",
            "counter",
            "DNS responses by rcode.",
        );
        for (rcode, value) in [
            ("noerror", dns.noerror),
            ("formerr", dns.formerr),
            ("servfail", dns.servfail),
            ("nxdomain", dns.nxdomain),
            ("notimp", dns.notimp),
            ("refused", dns.refused),
            ("other", dns.other_rcode),
        ] {
            let _ = writeln!(
                out,
                "revboot_dns_responses_total{{rcode=\"{rcode}\"}} {value}"
            );
        }
        family(
            &mut out,
            "revboot_dns_events_total",
            "counter",
            "DNS server events.",
        );
        for (event, value) in [
            ("truncated", dns.truncated),
            ("cache_hit", dns.cache_hits),
            ("cache_miss", dns.cache_misses),
            ("summon", dns.summons),
            ("boot_limited", dns.boot_limited),
            ("rate_limited", dns.rate_limited),
            ("overload_dropped", dns.overload_dropped),
            ("tcp_refused", dns.tcp_refused),
            ("tcp_evicted", dns.tcp_evicted),
            ("ignored", dns.ignored),
        ] {
            let _ = writeln!(out, "revboot_dns_events_total{{event=\"{event}\"}} {value}");
        }

        let proxy = self.proxy.metrics();
        family(
            &mut out,
            "revboot_proxy_connections_total",
            "counter",
            "Proxy connections by outcome.",
        );
        for (outcome, value) in [
            ("accepted", proxy.accepted),
            ("held", proxy.held),
            ("spliced", proxy.spliced),
            ("refused", proxy.refused),
            ("refused_admission", proxy.refused_admission),
            ("refused_overload", proxy.refused_overload),
            ("boot_failure", proxy.boot_failures),
            ("backend_failure", proxy.backend_failures),
            ("timeout", proxy.timeouts),
        ] {
            let _ = writeln!(
                out,
                "revboot_proxy_connections_total{{outcome=\"{outcome}\"}} {value}"
            );
        }
        family(
            &mut out,
            "revboot_proxy_connections",
            "gauge",
            "Proxy connections now.",
        );
        let _ = writeln!(
            out,
            "revboot_proxy_connections{{kind=\"held\"}} {}",
            proxy.held_now
        );
        let _ = writeln!(
            out,
            "revboot_proxy_connections{{kind=\"open\"}} {}",
            proxy.open_now
        );
        family(
            &mut out,
            "revboot_proxy_bytes_total",
            "counter",
            "Bytes spliced by direction.",
        );
        let _ = writeln!(
            out,
            "revboot_proxy_bytes_total{{direction=\"from_clients\"}} {}",
            proxy.bytes_from_clients
        );
        let _ = writeln!(
            out,
            "revboot_proxy_bytes_total{{direction=\"to_clients\"}} {}",
            proxy.bytes_to_clients
        );

        let lives = self.deployer.metrics();
        family(
            &mut out,
            "revboot_boots_total",
            "counter",
            "Instances booted.",
        );
        let _ = writeln!(out, "revboot_boots_total {}", lives.boots);
        family(
            &mut out,
            "revboot_steered_connections_total",
            "counter",
            "Connections the kernel handed straight to ready instances.",
        );
        let _ = writeln!(
            out,
            "revboot_steered_connections_total {}",
            lives.steered_connections
        );
        family(
            &mut out,
            "revboot_steered_instances",
            "gauge",
            "Ready instances whose connections are steered past the proxy.",
        );
        let _ = writeln!(out, "revboot_steered_instances {}", lives.steered_instances);
        family(
            &mut out,
            "revboot_instance_ends_total",
            "counter",
            "Instance ends by kind.",
        );
        for (kind, value) in [
            ("boot_failure", lives.boot_failures),
            ("crash", lives.crashes),
            ("stop", lives.stops),
        ] {
            let _ = writeln!(
                out,
                "revboot_instance_ends_total{{kind=\"{kind}\"}} {value}"
            );
        }
        family(
            &mut out,
            "revboot_boot_duration_seconds",
            "histogram",
            "Summon to ready.",
        );
        for (bound, count) in BOOT_BUCKETS_MS.iter().zip(lives.boot_buckets) {
            let _ = writeln!(
                out,
                "revboot_boot_duration_seconds_bucket{{le=\"{}\"}} {count}",
                *bound as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "revboot_boot_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            lives.ready
        );
        let _ = writeln!(
            out,
            "revboot_boot_duration_seconds_sum {}",
            lives.boot_time_sum.as_secs_f64()
        );
        let _ = writeln!(out, "revboot_boot_duration_seconds_count {}", lives.ready);

        let instances = self.deployer.list();
        family(
            &mut out,
            "revboot_instances",
            "gauge",
            "Instances by state.",
        );
        for state in ["cold", "booting", "ready", "idle"] {
            let count = instances
                .iter()
                .filter(|i| {
                    matches!(
                        (&i.state, state),
                        (InstanceState::Cold, "cold")
                            | (InstanceState::Booting, "booting")
                            | (InstanceState::Ready, "ready")
                            | (InstanceState::Idle, "idle")
                    )
                })
                .count();
            let _ = writeln!(out, "revboot_instances{{state=\"{state}\"}} {count}");
        }

        let records = self.handle.block_on(self.builder.build_records(None));
        family(
            &mut out,
            "revboot_builds_total",
            "counter",
            "Builds by result.",
        );
        for (word, state) in [
            ("succeeded", BuildState::Succeeded),
            ("failed", BuildState::Failed),
            ("interrupted", BuildState::Interrupted),
            ("superseded", BuildState::Superseded),
        ] {
            let count = records.iter().filter(|r| r.state == state).count();
            let _ = writeln!(out, "revboot_builds_total{{result=\"{word}\"}} {count}");
        }
        family(
            &mut out,
            "revboot_build_duration_seconds",
            "histogram",
            "Build wall time.",
        );
        let durations: Vec<f64> = records
            .iter()
            .filter_map(|r| Some((r.finished_at_ms? as f64 - r.started_at_ms? as f64) / 1000.0))
            .collect();
        for bound in BUILD_BUCKETS {
            let count = durations.iter().filter(|d| **d <= *bound).count();
            let _ = writeln!(
                out,
                "revboot_build_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "revboot_build_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            durations.len()
        );
        let _ = writeln!(
            out,
            "revboot_build_duration_seconds_sum {}",
            durations.iter().sum::<f64>()
        );
        let _ = writeln!(
            out,
            "revboot_build_duration_seconds_count {}",
            durations.len()
        );
        out
    }
}
