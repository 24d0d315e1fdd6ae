//! How replies are printed: aligned tables for people, JSON with `--json`.
//!
//! Colour (bold table headers, the live marker and build statuses) only on a terminal, and
//! never when `NO_COLOR` is set to anything but the empty string (no-color.org).

use std::fmt::Write as _;
use std::io::IsTerminal;

use anstyle::{AnsiColor, Style};

use crate::action::{DeploymentView, Reply};

/// How a reply is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Text for a person, no colour.
    Plain,
    /// Text for a person at a terminal.
    Colour,
    /// JSON (`--json`).
    Json,
}

/// Whether output to `stream` may be coloured: it is a terminal and `NO_COLOR` is not set.
pub fn colour(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Renders a reply for a terminal (or as JSON).
pub fn render(reply: &Reply, format: Format) -> String {
    if format == Format::Json {
        return serde_json::to_string_pretty(reply).expect("replies are plain data") + "\n";
    }
    let paint = format == Format::Colour;
    let mut out = String::new();
    match reply {
        Reply::ServiceAdded(service) => {
            let _ = writeln!(
                out,
                "created service {} ({})",
                service.name, service.dns_name
            );
        }
        Reply::ServiceDeleted(deleted) => {
            let what = match (&deleted.archive, deleted.kept) {
                (Some(archive), _) => format!(
                    "its {} deployments are kept under {archive} in the deployment repository",
                    deleted.deployments
                ),
                (None, true) => "it had no deployment".to_owned(),
                (None, false) => format!(
                    "its {} deployments are removed (`git gc` frees their space)",
                    deleted.deployments
                ),
            };
            let _ = writeln!(
                out,
                "deleted service {}: {what}; its DNS names no longer answer",
                deleted.service
            );
            if let Some(source) = &deleted.source_archive {
                let _ = writeln!(out, "its source repository is kept at {source}");
            }
            if deleted.stopped > 0 {
                let _ = writeln!(out, "{} running instances stopped", deleted.stopped);
            }
            if deleted.variables > 0 {
                let _ = writeln!(
                    out,
                    "its {} configuration variables are removed",
                    deleted.variables
                );
            }
        }
        Reply::ServiceRenamed(renamed) => {
            let _ = writeln!(
                out,
                "renamed service {} to {}: {} deployments, the same revisions; live{} answers at {}; names under {} no longer answer",
                renamed.service,
                renamed.to,
                renamed.deployments,
                renamed
                    .live
                    .as_deref()
                    .map(|l| format!(" {}", &l[..7.min(l.len())]))
                    .unwrap_or_default(),
                renamed.dns_name,
                renamed.service,
            );
            if renamed.stopped > 0 {
                let _ = writeln!(
                    out,
                    "{} running instances stopped; they boot again under the new name on demand",
                    renamed.stopped
                );
            }
            if renamed.variables > 0 {
                let _ = writeln!(
                    out,
                    "its {} configuration variables moved with it",
                    renamed.variables
                );
            }
            let _ = writeln!(
                out,
                "push to the new name: git remote set-url <remote> <daemon>/git/{}.git",
                renamed.to
            );
        }
        Reply::Token(daemon) => {
            let _ = writeln!(
                out,
                "revboot {} serving zone {}: the token is good",
                daemon.version, daemon.zone
            );
        }
        Reply::Services(services) => {
            let rows = services
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.live
                            .as_deref()
                            .map(|l| l[..7.min(l.len())].to_owned())
                            .unwrap_or_else(|| "-".into()),
                        s.deployments.to_string(),
                        s.dns_name.clone(),
                    ]
                })
                .collect();
            table(
                &mut out,
                &["SERVICE", "LIVE", "DEPLOYMENTS", "NAME"],
                rows,
                paint.then_some(plain_cells),
            );
        }
        Reply::History(history) => {
            let rows = history.iter().map(history_row).collect();
            table(
                &mut out,
                &[
                    "", "REVISION", "SOURCE", "STATUS", "IMAGE", "TIME", "SUBJECT",
                ],
                rows,
                paint.then_some(history_cells),
            );
        }
        Reply::Show(show) => {
            let d = &show.deployment;
            let _ = writeln!(
                out,
                "revision  {}{}",
                d.revision,
                if d.live { "  (live)" } else { "" }
            );
            let _ = writeln!(out, "name      {}", d.dns_name);
            let _ = writeln!(out, "status    {}", d.status);
            let _ = writeln!(out, "source    {} {}", d.source_commit, d.subject);
            if let Some(source_ref) = &d.source_ref {
                let _ = writeln!(out, "ref       {source_ref}");
            }
            let _ = writeln!(
                out,
                "image     {}",
                match (&d.image_size, &d.image_sha256) {
                    (Some(size), Some(sha)) => format!("{} sha256:{}", bytes(*size), sha),
                    _ => "none".into(),
                }
            );
            let _ = writeln!(out, "time      {}", time(d.time));
            let _ = writeln!(out, "labels    {}", show.labels.join(", "));
            if let Some(manifest) = &show.manifest {
                let _ = writeln!(out, "\n{}", manifest.trim_end());
            }
        }
        Reply::Diff(diff) => {
            let _ = writeln!(out, "{}..{}", &diff.a[..12], &diff.b[..12]);
            let size = |s: Option<u64>| s.map(bytes).unwrap_or_else(|| "none".into());
            let _ = writeln!(
                out,
                "image: {} -> {}{}",
                size(diff.image_size.0),
                size(diff.image_size.1),
                match (diff.image_size, diff.image_changed) {
                    ((Some(a), Some(b)), true) => format!(" ({:+} bytes)", b as i64 - a as i64),
                    (_, false) => " (unchanged)".into(),
                    _ => String::new(),
                }
            );
            if diff.manifest.is_empty() {
                let _ = writeln!(out, "manifest: unchanged");
            } else {
                out.push_str(&diff.manifest);
            }
        }
        Reply::Moved(moved) => {
            let from = moved
                .from
                .as_ref()
                .map(|f| format!("{} ({})", f.short, f.subject))
                .unwrap_or_else(|| "nothing".into());
            let _ = writeln!(
                out,
                "{}: live moved from {from} to {} ({})\n{} now answers {}",
                moved.service, moved.to.short, moved.to.subject, moved.service, moved.to.revision
            );
            if let Some(check) = &moved.check {
                let _ = writeln!(out, "{check}");
            }
        }
        Reply::Instances(instances) => {
            let rows = instances
                .iter()
                .map(|i| {
                    vec![
                        i.service.clone(),
                        match i.replica {
                            0 => i.revision[..7.min(i.revision.len())].to_owned(),
                            replica => {
                                format!("{} #{replica}", &i.revision[..7.min(i.revision.len())])
                            }
                        },
                        i.client.clone().unwrap_or_else(|| "-".into()),
                        i.address.clone(),
                        i.state.clone(),
                        duration(i.uptime_ms),
                        i.connections.to_string(),
                        i.steered.map_or_else(|| "-".into(), |n| n.to_string()),
                    ]
                })
                .collect();
            table(
                &mut out,
                &[
                    "SERVICE", "REVISION", "CLIENT", "ADDRESS", "STATE", "UPTIME", "CONNS",
                    "STEERED",
                ],
                rows,
                paint.then_some(plain_cells),
            );
        }
        Reply::Stopped(instance) => {
            let _ = writeln!(
                out,
                "{} {} at {}: {}",
                instance.service,
                &instance.revision[..7.min(instance.revision.len())],
                instance.address,
                instance.state
            );
        }
        Reply::BuildLog(log) => {
            let _ = writeln!(
                out,
                "== build log of {} ({}) ==",
                &log.revision[..12],
                log.status
            );
            out.push_str(&log.log);
            if !log.log.ends_with('\n') {
                out.push('\n');
            }
        }
        Reply::Console(records) => {
            if records.is_empty() {
                out.push_str("no console records yet (they are written when an instance stops)\n");
            }
            for record in records {
                let _ = writeln!(
                    out,
                    "== {} {}started {}, {}, ran {}: {} ==",
                    &record.revision[..12],
                    record
                        .client
                        .as_deref()
                        .map(|c| format!("for {c} "))
                        .unwrap_or_default(),
                    time((record.started_at_ms / 1000) as i64),
                    record
                        .boot_ms
                        .map(|b| format!("ready after {b} ms"))
                        .unwrap_or_else(|| "never ready".into()),
                    duration(record.lifetime_ms),
                    record.outcome
                );
                out.push_str(&record.console);
                if !record.console.is_empty() && !record.console.ends_with('\n') {
                    out.push('\n');
                }
            }
        }
        Reply::Builds(builds) => {
            let rows = builds
                .iter()
                .map(|b| {
                    vec![
                        format!("#{}", b.id),
                        b.service.clone(),
                        b.source_commit[..7.min(b.source_commit.len())].to_owned(),
                        b.state.clone(),
                        b.revision
                            .as_deref()
                            .map(|r| r[..7.min(r.len())].to_owned())
                            .unwrap_or_else(|| "-".into()),
                        time((b.queued_at_ms / 1000) as i64),
                        b.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &mut out,
                &[
                    "BUILD", "SERVICE", "SOURCE", "STATE", "REVISION", "QUEUED", "MESSAGE",
                ],
                rows,
                paint.then_some(plain_cells),
            );
        }
        Reply::Summoned(summoned) => {
            let _ = writeln!(
                out,
                "{} -> {}:{} ({})",
                summoned.dns_name, summoned.address, summoned.port, summoned.revision
            );
        }
        Reply::Config(config) => {
            for var in &config.vars {
                match &var.value {
                    Some(value) => {
                        let _ = writeln!(out, "{}={value}", var.name);
                    }
                    None => {
                        let _ = writeln!(out, "{}", var.name);
                    }
                }
            }
            if config.vars.is_empty() {
                let _ = writeln!(out, "{}: no configuration variables", config.service);
            }
            if let Some(restarted) = config.restarted {
                let _ = writeln!(
                    out,
                    "{}: {restarted} instance(s) stopped; they boot again with the change",
                    config.service
                );
            }
        }
        Reply::Daemon(daemon) => {
            let _ = writeln!(
                out,
                "revboot pid {}, binary {}, upgraded in place {} time(s)",
                daemon.pid, daemon.binary, daemon.upgrades
            );
            if let Some(ms) = daemon.last_upgrade_ms {
                let _ = writeln!(
                    out,
                    "last upgrade: {ms} ms from the request to serving again, {} instance(s) handed over",
                    daemon.last_upgrade_instances.unwrap_or(0)
                );
            }
            for cert in &daemon.certificates {
                let _ = writeln!(out, "{}", certificate_line(cert));
            }
            if daemon.certificates.is_empty() {
                // As the dashboard's Certificates page says it.
                let _ = writeln!(
                    out,
                    "no certificates: the daemon serves no HTTPS ([tls]) and no service's TLS ([acme], [tls.services])"
                );
            }
        }
        Reply::Nodes(view) => {
            let Some(me) = &view.node else {
                let _ = writeln!(out, "a single host: the daemon has no [cluster]");
                return out;
            };
            if !view.connected {
                let _ = writeln!(
                    out,
                    "node {me} is cut off from etcd: this list may be stale"
                );
            }
            let _ = writeln!(out, "   NODE  HTTP  DNS  POOLS  CAPACITY");
            for node in &view.nodes {
                let mark = if node.id == *me { "*" } else { " " };
                let _ = writeln!(
                    out,
                    "{mark}  {}  {}  {}  {}  {}",
                    node.id,
                    node.http,
                    node.dns,
                    node.pools.join(","),
                    node.capacity
                );
            }
        }
    }
    out
}

/// One certificate as `revboot certs` prints it: its id, state, names, expiry, issuer,
/// renewal, and the failure that stands with the next attempt's time.
fn certificate_line(cert: &crate::action::CertView) -> String {
    let id = if cert.id == crate::tls::DAEMON {
        "daemon"
    } else {
        &cert.id
    };
    let mut line = format!(
        "certificate {id} ({}): {}, {}",
        cert.source,
        cert.state,
        cert.names.join(" ")
    );
    if let Some(ms) = cert.not_after_ms {
        let days = (ms / 1000 - crate::tls::now()) as f64 / 86_400.0;
        line.push_str(&format!(", expires in {days:.1} days"));
    }
    if let Some(issuer) = &cert.issuer {
        line.push_str(&format!(", issued by {issuer}"));
    }
    if let Some(at) = cert.renew_at_ms {
        let days = (at / 1000 - crate::tls::now()) as f64 / 86_400.0;
        line.push_str(&format!(", renewed in {days:.1} days"));
    }
    if let Some(error) = &cert.error {
        line.push_str(&format!("; {} failure(s): {error}", cert.failures));
        if let Some(at) = cert.retry_at_ms {
            let secs = (at / 1000 - crate::tls::now()).max(0);
            line.push_str(&format!(" (next try in {secs} s)"));
        }
    }
    line
}

/// One event of a live console feed, as `revboot logs -f` prints it: output as written,
/// the rest as marked lines of their own.
pub fn console_event(event: &crate::feeds::ConsoleEvent) -> String {
    use crate::feeds::ConsoleEvent;
    let short = |id: &str| id.chars().take(12).collect::<String>();
    match event {
        ConsoleEvent::Started {
            instance,
            revision,
            client,
            address,
            dropped,
        } => {
            let client = client
                .as_deref()
                .map(|c| format!(" for {c}"))
                .unwrap_or_default();
            let dropped = if *dropped > 0 {
                format!(", its first {} gone", bytes(*dropped))
            } else {
                String::new()
            };
            format!(
                "--- {} running {}{client} at {address}{dropped} ---\n",
                short(instance),
                &revision[..7.min(revision.len())]
            )
        }
        ConsoleEvent::Output { text, .. } => text.clone(),
        ConsoleEvent::Skipped { instance, chunks } => format!(
            "\n--- {}: {chunks} pieces of output skipped: this reader fell behind ---\n",
            short(instance)
        ),
        ConsoleEvent::Ended { instance, state } => {
            format!("--- {} ended: {state} ---\n", short(instance))
        }
    }
}

fn history_row(d: &DeploymentView) -> Vec<String> {
    vec![
        if d.live { "*".into() } else { String::new() },
        d.short.clone(),
        d.source_commit[..7.min(d.source_commit.len())].to_owned(),
        d.status.clone(),
        d.image_size.map(bytes).unwrap_or_else(|| "-".into()),
        time(d.time),
        d.subject.clone(),
    ]
}

/// The style of a cell (column, text), for a table in colour.
type Paint = fn(usize, &str) -> Style;

fn plain_cells(_: usize, _: &str) -> Style {
    Style::new()
}

/// The live marker in green, failed builds in red.
fn history_cells(column: usize, cell: &str) -> Style {
    match (column, cell) {
        (0, "*") => AnsiColor::Green.on_default().bold(),
        (3, "succeeded") => AnsiColor::Green.on_default(),
        (3, "failed" | "interrupted") => AnsiColor::Red.on_default(),
        _ => Style::new(),
    }
}

/// An aligned table; with `paint`, the header in bold and each cell in its style (added
/// after the padding, so that escape codes do not count as width).
fn table(out: &mut String, header: &[&str], rows: Vec<Vec<String>>, paint: Option<Paint>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>, style: &dyn Fn(usize, &str) -> Style| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            let padded = if index + 1 == cells.len() {
                (*cell).to_owned()
            } else {
                format!("{cell:<width$}  ")
            };
            let style = if paint.is_some() {
                style(index, cell)
            } else {
                Style::new()
            };
            let _ = write!(text, "{style}{padded}{style:#}");
        }
        let _ = write!(out, "{}", text.trim_end());
        out.push('\n');
    };
    let bold = Style::new().bold();
    line(out, header.to_vec(), &|_, _| bold);
    let cell_style = paint.unwrap_or(plain_cells);
    for row in &rows {
        line(out, row.iter().map(String::as_str).collect(), &cell_style);
    }
}

/// A byte count for people.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A duration for people.
pub fn duration(ms: u64) -> String {
    match ms {
        ms if ms >= 3_600_000 => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
        ms if ms >= 60_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        ms if ms >= 1000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms => format!("{ms}ms"),
    }
}

/// A unix time as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_796_083_200), "2026-12-01 00:00:00");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(duration(61_000), "1m01s");
    }

    #[test]
    fn instances_show_steered_connections_or_a_dash() {
        let view = |steered| crate::action::InstanceView {
            service: "hello".into(),
            revision: "c63dc270ca8f95713745c92238793f8ee1d6d910".into(),
            client: None,
            replica: 0,
            address: "127.77.0.1".into(),
            addresses: vec!["127.77.0.1".into()],
            state: "ready".into(),
            uptime_ms: 1000,
            connections: 0,
            steered,
            pid: None,
        };
        let text = render(
            &Reply::Instances(vec![view(Some(12)), view(None)]),
            Format::Plain,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("STEERED"), "{text}");
        assert!(lines[1].ends_with(" 12"), "{text}");
        assert!(lines[2].ends_with(" -"), "{text}");
        let json = render(&Reply::Instances(vec![view(None)]), Format::Json);
        // Colour codes come only with Format::Colour, and do not change the alignment.
        assert!(!text.contains('\x1b'), "{text}");
        let coloured = render(
            &Reply::Instances(vec![view(Some(12)), view(None)]),
            Format::Colour,
        );
        assert!(coloured.starts_with("\x1b[1m"), "{coloured:?}");
        let stripped: String = {
            let mut out = String::new();
            let mut escape = false;
            for c in coloured.chars() {
                match (escape, c) {
                    (false, '\x1b') => escape = true,
                    (true, 'm') => escape = false,
                    (true, _) => {}
                    (false, c) => out.push(c),
                }
            }
            out
        };
        assert_eq!(stripped, text);
        assert!(!json.contains("steered"), "{json}");
    }
}
