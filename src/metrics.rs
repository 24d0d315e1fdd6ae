//! `/metrics`: the parts' counters in Prometheus text format, each part's written by the
//! part itself, assembled here in a fixed order.

use std::sync::Arc;

use revboot_builder::{BuildMetrics, Builder};
use revboot_deployer::Deployer;
use revboot_deployer::metrics::InstanceCounts;
use revboot_proxy::{Proxy, ProxyMetrics};

use crate::api::Metrics;

/// Reads the counters of every part when scraped.
pub struct DaemonMetrics {
    dns: Arc<revboot_dns::Metrics>,
    proxy: Arc<Proxy>,
    deployer: Arc<Deployer>,
    builder: Builder,
    handle: tokio::runtime::Handle,
    boot_rate: Arc<crate::dashboard::BootRate>,
    certificates: Arc<crate::tls::Certificates>,
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
        certificates: Arc<crate::tls::Certificates>,
    ) -> DaemonMetrics {
        DaemonMetrics {
            dns,
            proxy,
            deployer,
            builder,
            certificates,
            handle: tokio::runtime::Handle::current(),
            boot_rate: Arc::default(),
        }
    }

    /// Samples the boot counter for the dashboard's boots per minute, every
    /// [`crate::dashboard::figures::SAMPLE_EVERY`], until `stop` turns true.
    pub fn sample_boots(
        self: &Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::dashboard::figures::SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.boot_rate.sample(metrics.deployer.metrics().boots),
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        })
    }
}

impl crate::dashboard::FigureSource for DaemonMetrics {
    fn figures(&self) -> crate::dashboard::Figures {
        let dns = self.dns.snapshot();
        let lives = self.deployer.metrics();
        let builds = BuildMetrics::of(&self.handle.block_on(self.builder.build_records(None)));
        let bounds = revboot_deployer::metrics::BOOT_BUCKETS_MS;
        let mut below = 0;
        let mut boot_times: Vec<(String, u64)> = bounds
            .iter()
            .zip(lives.boot_buckets)
            .map(|(bound, cumulative)| {
                let count = cumulative.saturating_sub(below);
                below = cumulative;
                (bound.to_string(), count)
            })
            .collect();
        boot_times.push((">5000".to_owned(), lives.ready.saturating_sub(below)));
        crate::dashboard::Figures {
            dns: vec![
                ("NOERROR", dns.noerror),
                ("NXDOMAIN", dns.nxdomain),
                ("REFUSED", dns.refused),
                ("SERVFAIL", dns.servfail),
                ("FORMERR", dns.formerr),
                ("NOTIMP", dns.notimp),
                ("other", dns.other_rcode),
            ],
            boot_times,
            builds: vec![
                ("succeeded", builds.succeeded),
                ("failed", builds.failed),
                ("interrupted", builds.interrupted),
                ("superseded", builds.superseded),
            ],
            boots_per_minute: self.boot_rate.per_minute(lives.boots),
            boots: lives.boots,
        }
    }
}

impl Metrics for DaemonMetrics {
    fn render(&self) -> String {
        let dns = self.dns.snapshot();
        let proxy = self.proxy.metrics();
        let lives = self.deployer.metrics();
        let instances = InstanceCounts::of(self.deployer.list().iter().map(|i| &i.state));
        let builds = BuildMetrics::of(&self.handle.block_on(self.builder.build_records(None)));
        let mut out = render(&dns, &proxy, &lives, &instances, &builds);
        write_certificates(&self.certificates.status(), &mut out);
        out
    }
}

/// The certificates (`crate::tls`): expiry of each one served, issuances, failures in a row.
fn write_certificates(certificates: &[crate::action::CertView], out: &mut String) {
    use std::fmt::Write as _;
    let series = [
        (
            "revboot_certificate_expiry_timestamp_seconds",
            "gauge",
            "End of validity of the certificate served (Unix seconds).",
        ),
        (
            "revboot_certificate_issued_total",
            "counter",
            "Certificates issued or loaded since the daemon started.",
        ),
        (
            "revboot_certificate_failures",
            "gauge",
            "Failures in a row to get or renew the certificate (0 after a success).",
        ),
    ];
    for (index, (name, kind, help)) in series.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for cert in certificates {
            let value = match index {
                0 => match cert.not_after_ms {
                    Some(ms) => ms / 1000,
                    None => continue,
                },
                1 => i64::try_from(cert.issued).unwrap_or(i64::MAX),
                _ => i64::from(cert.failures),
            };
            let _ = writeln!(
                out,
                "{name}{{certificate=\"{}\",source=\"{}\"}} {value}",
                cert.id, cert.source
            );
        }
    }
}

/// The exposition of the parts' counters as read, each part's in its own words.
fn render(
    dns: &revboot_dns::MetricsSnapshot,
    proxy: &ProxyMetrics,
    lives: &revboot_deployer::metrics::MetricsSnapshot,
    instances: &InstanceCounts,
    builds: &BuildMetrics,
) -> String {
    let mut out = String::new();
    dns.write_prometheus(&mut out);
    proxy.write_prometheus(&mut out);
    lives.write_prometheus(&mut out);
    instances.write_prometheus(&mut out);
    builds.write_prometheus(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use revboot_builder::BuildRecord;
    use revboot_deployer::InstanceState;

    use super::*;

    /// A record of a build in `state` that ran from `started` to `finished` (unix ms).
    fn record(id: u64, state: &str, started: Option<u64>, finished: Option<u64>) -> BuildRecord {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "service": "hello",
            "source_ref": "refs/heads/main",
            "source_commit": "ab".repeat(20),
            "deploy_option": null,
            "state": state,
            "queued_at_ms": 1_000,
            "started_at_ms": started,
            "finished_at_ms": finished,
            "command_secs": null,
            "revision": null,
            "made_live": false,
            "superseded_by": null,
            "requeued_as": null,
            "message": null,
        }))
        .expect("a build record")
    }

    /// Every counter of every part, each with a value of its own, rendered as `/metrics`
    /// serves them: the text is pinned byte for byte.
    #[test]
    fn the_exposition_is_pinned_byte_for_byte() {
        let mut dns = revboot_dns::MetricsSnapshot::default();
        for (n, counter) in [
            &mut dns.noerror,
            &mut dns.formerr,
            &mut dns.servfail,
            &mut dns.nxdomain,
            &mut dns.notimp,
            &mut dns.refused,
            &mut dns.other_rcode,
            &mut dns.truncated,
            &mut dns.cache_hits,
            &mut dns.cache_misses,
            &mut dns.summons,
            &mut dns.boot_limited,
            &mut dns.rate_limited,
            &mut dns.overload_dropped,
            &mut dns.tcp_refused,
            &mut dns.tcp_evicted,
            &mut dns.ignored,
        ]
        .into_iter()
        .enumerate()
        {
            *counter = 1 + n as u64;
        }
        let mut proxy = ProxyMetrics::default();
        for (n, counter) in [
            &mut proxy.accepted,
            &mut proxy.held,
            &mut proxy.held_now,
            &mut proxy.open_now,
            &mut proxy.spliced,
            &mut proxy.refused,
            &mut proxy.refused_admission,
            &mut proxy.refused_overload,
            &mut proxy.boot_failures,
            &mut proxy.backend_failures,
            &mut proxy.timeouts,
            &mut proxy.bytes_from_clients,
            &mut proxy.bytes_to_clients,
            &mut proxy.replayed_bytes,
            &mut proxy.listeners,
            &mut proxy.front_routed,
            &mut proxy.front_unknown,
            &mut proxy.front_bad,
            &mut proxy.front_terminated,
            &mut proxy.handed_off,
            &mut proxy.handoff_failures,
        ]
        .into_iter()
        .enumerate()
        {
            *counter = 101 + n as u64;
        }
        let lives = revboot_deployer::metrics::MetricsSnapshot {
            boots: 201,
            ready: 202,
            boot_failures: 203,
            crashes: 204,
            stops: 205,
            boot_buckets: std::array::from_fn(|n| 301 + n as u64),
            boot_time_sum: Duration::from_millis(1500),
            manifest_reads: 206,
            steered_connections: 207,
            steered_instances: 208,
        };
        let instances = [
            InstanceState::Cold,
            InstanceState::Booting,
            InstanceState::Booting,
            InstanceState::Ready,
            InstanceState::Ready,
            InstanceState::Ready,
            InstanceState::Idle,
            InstanceState::Stopped,
            InstanceState::Crashed {
                reason: "exited with status 1".to_owned(),
            },
        ];
        let records = [
            record(1, "succeeded", Some(10_000), Some(10_500)),
            record(2, "succeeded", Some(20_000), Some(40_000)),
            record(3, "failed", Some(50_000), Some(450_000)),
            record(4, "interrupted", None, None),
            record(5, "superseded", None, None),
            record(6, "running", Some(60_000), None),
            record(7, "queued", None, None),
        ];
        let text = render(
            &dns,
            &proxy,
            &lives,
            &InstanceCounts::of(&instances),
            &BuildMetrics::of(&records),
        );
        assert_eq!(text, EXPECTED);
    }

    /// What the values above render as.
    const EXPECTED: &str = r#"# HELP revboot_dns_responses_total DNS responses by rcode.
# TYPE revboot_dns_responses_total counter
revboot_dns_responses_total{rcode="noerror"} 1
revboot_dns_responses_total{rcode="formerr"} 2
revboot_dns_responses_total{rcode="servfail"} 3
revboot_dns_responses_total{rcode="nxdomain"} 4
revboot_dns_responses_total{rcode="notimp"} 5
revboot_dns_responses_total{rcode="refused"} 6
revboot_dns_responses_total{rcode="other"} 7
# HELP revboot_dns_events_total DNS server events.
# TYPE revboot_dns_events_total counter
revboot_dns_events_total{event="truncated"} 8
revboot_dns_events_total{event="cache_hit"} 9
revboot_dns_events_total{event="cache_miss"} 10
revboot_dns_events_total{event="summon"} 11
revboot_dns_events_total{event="boot_limited"} 12
revboot_dns_events_total{event="rate_limited"} 13
revboot_dns_events_total{event="overload_dropped"} 14
revboot_dns_events_total{event="tcp_refused"} 15
revboot_dns_events_total{event="tcp_evicted"} 16
revboot_dns_events_total{event="ignored"} 17
# HELP revboot_proxy_connections_total Proxy connections by outcome.
# TYPE revboot_proxy_connections_total counter
revboot_proxy_connections_total{outcome="accepted"} 101
revboot_proxy_connections_total{outcome="held"} 102
revboot_proxy_connections_total{outcome="spliced"} 105
revboot_proxy_connections_total{outcome="refused"} 106
revboot_proxy_connections_total{outcome="refused_admission"} 107
revboot_proxy_connections_total{outcome="refused_overload"} 108
revboot_proxy_connections_total{outcome="boot_failure"} 109
revboot_proxy_connections_total{outcome="backend_failure"} 110
revboot_proxy_connections_total{outcome="timeout"} 111
revboot_proxy_connections_total{outcome="front_routed"} 116
revboot_proxy_connections_total{outcome="front_unknown_name"} 117
revboot_proxy_connections_total{outcome="front_bad_head"} 118
revboot_proxy_connections_total{outcome="front_terminated"} 119
revboot_proxy_connections_total{outcome="handed_off"} 120
revboot_proxy_connections_total{outcome="handoff_failure"} 121
# HELP revboot_proxy_connections Proxy connections now.
# TYPE revboot_proxy_connections gauge
revboot_proxy_connections{kind="held"} 103
revboot_proxy_connections{kind="open"} 104
# HELP revboot_proxy_bytes_total Bytes spliced by direction.
# TYPE revboot_proxy_bytes_total counter
revboot_proxy_bytes_total{direction="from_clients"} 112
revboot_proxy_bytes_total{direction="to_clients"} 113
# HELP revboot_boots_total Instances booted.
# TYPE revboot_boots_total counter
revboot_boots_total 201
# HELP revboot_steered_connections_total Connections the kernel handed straight to ready instances.
# TYPE revboot_steered_connections_total counter
revboot_steered_connections_total 207
# HELP revboot_steered_instances Ready instances whose connections are steered past the proxy.
# TYPE revboot_steered_instances gauge
revboot_steered_instances 208
# HELP revboot_instance_ends_total Instance ends by kind.
# TYPE revboot_instance_ends_total counter
revboot_instance_ends_total{kind="boot_failure"} 203
revboot_instance_ends_total{kind="crash"} 204
revboot_instance_ends_total{kind="stop"} 205
# HELP revboot_boot_duration_seconds Summon to ready.
# TYPE revboot_boot_duration_seconds histogram
revboot_boot_duration_seconds_bucket{le="0.001"} 301
revboot_boot_duration_seconds_bucket{le="0.002"} 302
revboot_boot_duration_seconds_bucket{le="0.005"} 303
revboot_boot_duration_seconds_bucket{le="0.01"} 304
revboot_boot_duration_seconds_bucket{le="0.02"} 305
revboot_boot_duration_seconds_bucket{le="0.05"} 306
revboot_boot_duration_seconds_bucket{le="0.1"} 307
revboot_boot_duration_seconds_bucket{le="0.2"} 308
revboot_boot_duration_seconds_bucket{le="0.5"} 309
revboot_boot_duration_seconds_bucket{le="1"} 310
revboot_boot_duration_seconds_bucket{le="2"} 311
revboot_boot_duration_seconds_bucket{le="5"} 312
revboot_boot_duration_seconds_bucket{le="+Inf"} 202
revboot_boot_duration_seconds_sum 1.5
revboot_boot_duration_seconds_count 202
# HELP revboot_instances Instances by state.
# TYPE revboot_instances gauge
revboot_instances{state="cold"} 1
revboot_instances{state="booting"} 2
revboot_instances{state="ready"} 3
revboot_instances{state="idle"} 1
# HELP revboot_builds_total Builds by result.
# TYPE revboot_builds_total counter
revboot_builds_total{result="succeeded"} 2
revboot_builds_total{result="failed"} 1
revboot_builds_total{result="interrupted"} 1
revboot_builds_total{result="superseded"} 1
# HELP revboot_build_duration_seconds Build wall time.
# TYPE revboot_build_duration_seconds histogram
revboot_build_duration_seconds_bucket{le="1"} 1
revboot_build_duration_seconds_bucket{le="5"} 1
revboot_build_duration_seconds_bucket{le="15"} 1
revboot_build_duration_seconds_bucket{le="30"} 2
revboot_build_duration_seconds_bucket{le="60"} 2
revboot_build_duration_seconds_bucket{le="120"} 2
revboot_build_duration_seconds_bucket{le="300"} 2
revboot_build_duration_seconds_bucket{le="600"} 3
revboot_build_duration_seconds_bucket{le="+Inf"} 3
revboot_build_duration_seconds_sum 420.5
revboot_build_duration_seconds_count 3
"#;
}
