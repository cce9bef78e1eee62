//! Counters and latency histograms in the Prometheus text format, every name prefixed
//! `handoff_`.
//!
//! A small registry rather than a metrics crate: counters with at most one label and unlabelled
//! histograms with fixed buckets, updated under a short lock, rendered on demand for `/metrics`
//! and `handoff status --json`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets: 1 ms to 10 s.
const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at or below each bound of [`BUCKETS`] (not cumulative).
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// A counter's name and its optional label (`key`, value).
type SeriesKey = (&'static str, Option<(&'static str, String)>);

/// A registry of counters. `inc` never blocks for long: one map update under a mutex.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<SeriesKey, u64>>,
    histograms: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one to `name`, optionally labelled `label = value`.
    pub fn inc(&self, name: &'static str, label: Option<(&'static str, &str)>) {
        self.add(name, label, 1);
    }

    pub fn add(&self, name: &'static str, label: Option<(&'static str, &str)>, n: u64) {
        let key = (name, label.map(|(k, v)| (k, v.to_string())));
        *self.lock().entry(key).or_insert(0) += n;
    }

    /// The value of one counter (0 if never incremented).
    pub fn get(&self, name: &'static str, label: Option<(&'static str, &str)>) -> u64 {
        let key = (name, label.map(|(k, v)| (k, v.to_string())));
        self.lock().get(&key).copied().unwrap_or(0)
    }

    /// Records one latency in the histogram `name` (seconds).
    pub fn observe(&self, name: &'static str, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        let h = histograms.entry(name).or_default();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.buckets[i] += 1;
        }
        h.count += 1;
        h.sum += secs;
    }

    /// How many latencies `name` has recorded.
    pub fn observations(&self, name: &'static str) -> u64 {
        let histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        histograms.get(name).map_or(0, |h| h.count)
    }

    /// Every counter as `name{label="value"}` → value.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|((name, label), v)| (series(name, label), *v))
            .collect()
    }

    /// The Prometheus text exposition of every counter, plus `extra` gauges.
    pub fn render(&self, gauges: &[(&'static str, &'static str, f64)]) -> String {
        let mut out = String::new();
        let mut last = "";
        for ((name, label), value) in self.lock().iter() {
            if *name != last {
                out.push_str(&format!("# TYPE {name} counter\n"));
                last = name;
            }
            out.push_str(&format!("{} {value}\n", series(name, label)));
        }
        let histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        for (name, h) in histograms.iter() {
            out.push_str(&format!("# TYPE {name} histogram\n"));
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                out.push_str(&format!("{name}_bucket{{le=\"{bound}\"}} {cumulative}\n"));
            }
            out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n", h.count));
            out.push_str(&format!("{name}_sum {}\n{name}_count {}\n", h.sum, h.count));
        }
        drop(histograms);
        for (name, help, value) in gauges {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SeriesKey, u64>> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn series(name: &str, label: &Option<(&'static str, String)>) -> String {
    match label {
        Some((k, v)) => format!(
            "{name}{{{k}=\"{}\"}}",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        ),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.inc("handoff_refusals_total", Some(("reason", "not_trusted")));
        m.inc("handoff_refusals_total", Some(("reason", "not_trusted")));
        m.inc("handoff_pushes_sent_total", None);
        let text = m.render(&[("handoff_connections", "connected terminals", 3.0)]);
        assert!(text.contains("# TYPE handoff_refusals_total counter\n"));
        assert!(text.contains("handoff_refusals_total{reason=\"not_trusted\"} 2\n"));
        assert!(text.contains("handoff_pushes_sent_total 1\n"));
        assert!(text.contains("handoff_connections 3\n"));
        assert_eq!(
            m.get("handoff_refusals_total", Some(("reason", "not_trusted"))),
            2
        );
    }

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::new();
        m.observe("handoff_pull_seconds", Duration::from_micros(800));
        m.observe("handoff_pull_seconds", Duration::from_millis(4));
        m.observe("handoff_pull_seconds", Duration::from_secs(60));
        let text = m.render(&[]);
        assert!(text.contains("# TYPE handoff_pull_seconds histogram\n"));
        assert!(
            text.contains("handoff_pull_seconds_bucket{le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("handoff_pull_seconds_bucket{le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("handoff_pull_seconds_bucket{le=\"10\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("handoff_pull_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("handoff_pull_seconds_count 3\n"), "{text}");
        assert_eq!(m.observations("handoff_pull_seconds"), 3);
    }
}
