//! The figures the dashboard charts, from the daemon's own counters (those of `/metrics`).
//!
//! 1. [`Figures`] is read when a page is drawn: DNS answers by rcode, the boot-time
//!    histogram, builds by outcome, and boots per minute.
//! 2. Boots per minute come from [`BootRate`]: a task samples the deployer's boot counter
//!    every [`SAMPLE_EVERY`] into a ring of [`SAMPLES`] values; each bar is the boots of one
//!    interval scaled to a minute.
//! 3. Charts are small inline SVGs made of numbers and fixed labels only (no text a user
//!    controls goes into them).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// How often the boot counter is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept (the chart spans `SAMPLES - 1` intervals).
pub const SAMPLES: usize = 31;

/// The figures of one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// DNS answers by rcode, in a fixed order.
    pub dns: Vec<(&'static str, u64)>,
    /// Boots by how long they took: (upper bound, count in that bucket alone).
    pub boot_times: Vec<(String, u64)>,
    /// Builds by outcome, in a fixed order.
    pub builds: Vec<(&'static str, u64)>,
    /// Boots per minute, oldest interval first.
    pub boots_per_minute: Vec<u64>,
    /// Boots since the daemon started.
    pub boots: u64,
}

/// The sampled boot counter ([`SAMPLE_EVERY`], [`SAMPLES`]).
#[derive(Debug, Default)]
pub struct BootRate {
    samples: Mutex<VecDeque<u64>>,
}

impl BootRate {
    /// Records the boot counter now.
    pub fn sample(&self, boots: u64) {
        let mut samples = self.samples.lock().expect("samples lock is never poisoned");
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(boots);
    }

    /// Boots per minute of each sampled interval, oldest first, the interval still under
    /// way (up to `now`) last.
    pub fn per_minute(&self, now: u64) -> Vec<u64> {
        let samples = self.samples.lock().expect("samples lock is never poisoned");
        let scale = 60 / SAMPLE_EVERY.as_secs().max(1);
        samples
            .iter()
            .chain(std::iter::once(&now))
            .collect::<Vec<_>>()
            .windows(2)
            .map(|pair| pair[1].saturating_sub(*pair[0]) * scale)
            .collect()
    }
}

/// A bar chart of labelled values as an inline SVG (`title` names it for screen readers).
pub fn bars(title: &str, values: &[(String, u64)]) -> String {
    const WIDTH: u64 = 320;
    const HEIGHT: u64 = 120;
    const AXIS: u64 = 16;
    let max = values.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let n = values.len().max(1) as u64;
    let slot = WIDTH / n;
    let bar = slot.saturating_sub(2).max(1);
    let mut svg = format!(
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        HEIGHT + AXIS,
        escape(title)
    );
    for (i, (label, value)) in values.iter().enumerate() {
        let h = value * (HEIGHT - 12) / max;
        let x = i as u64 * slot + 1;
        let _ = write!(
            svg,
            r#"<g><title>{}: {value}</title><rect x="{x}" y="{}" width="{bar}" height="{h}" fill="currentColor"></rect>"#,
            escape(label),
            HEIGHT - h
        );
        if *value > 0 && n <= 16 {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" font-size="9" text-anchor="middle">{value}</text>"#,
                x + bar / 2,
                (HEIGHT - h).saturating_sub(2).max(9)
            );
        }
        if n <= 16 {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" font-size="8" text-anchor="middle">{}</text>"#,
                x + bar / 2,
                HEIGHT + 11,
                escape(label)
            );
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_per_minute_are_differences_scaled_to_a_minute() {
        let rate = BootRate::default();
        assert!(rate.per_minute(4).is_empty());
        rate.sample(0);
        rate.sample(2);
        assert_eq!(rate.per_minute(3), vec![12, 6]);
        for n in 0..100 {
            rate.sample(n);
        }
        assert_eq!(rate.per_minute(99).len(), SAMPLES);
    }

    #[test]
    fn charts_hold_numbers_and_escaped_labels() {
        let svg = bars("a<b", &[("<1 ms".to_owned(), 3), ("x".to_owned(), 0)]);
        assert!(svg.contains("aria-label=\"a&lt;b\""), "{svg}");
        assert!(svg.contains("&lt;1 ms: 3"), "{svg}");
        assert!(!svg.contains("<1"), "{svg}");
    }
}
