//! Counters in the Prometheus text format, every name prefixed `handoff_`.
//!
//! A small registry rather than a metrics crate: counters with at most one label, incremented
//! under a short lock, rendered on demand for `/metrics` and `handoff status --json`.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A counter's name and its optional label (`key`, value).
type SeriesKey = (&'static str, Option<(&'static str, String)>);

/// A registry of counters. `inc` never blocks for long: one map update under a mutex.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<SeriesKey, u64>>,
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
}
