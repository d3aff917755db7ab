//! Metric [`Family`]s, their rendering in the OpenMetrics text format Prometheus scrapes,
//! and the gauges a member's heartbeat values become.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What a Prometheus metric family measures: a value that goes up and down, or a count
/// that only grows (its name should end in `_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A value that can go up and down.
    Gauge,
    /// A monotonically growing count.
    Counter,
}

/// One Prometheus metric family: a name, its `# HELP` text, its `# TYPE`, and its samples
/// (label pairs and a value each).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The metric name (sanitised when rendered).
    pub name: String,
    /// One line saying what it measures.
    pub help: String,
    /// Gauge or counter.
    pub kind: MetricKind,
    /// `(labels, value)` per sample.
    pub samples: Vec<(Vec<(String, String)>, f64)>,
}

impl Family {
    /// An empty gauge family.
    pub fn gauge(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricKind::Gauge)
    }

    /// An empty counter family.
    pub fn counter(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricKind::Counter)
    }

    fn new(name: &str, help: &str, kind: MetricKind) -> Self {
        Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample with `labels`.
    pub fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.push((labels, value));
    }

    /// Adds a sample with `labels` (builder style).
    pub fn with(mut self, labels: &[(&str, &str)], value: f64) -> Self {
        self.push(labels, value);
        self
    }
}

/// Renders metric families in the OpenMetrics text format (1.0.0), which Prometheus scrapes,
/// through `prometheus-client`'s encoder: per family a `# HELP` and a `# TYPE` line, then one
/// `name{label="value",…} number` line per sample, and `# EOF` at the end; families without
/// samples are left out. A counter's family is named without its `_total` suffix, which its
/// samples carry. Metric names are made to match `[a-zA-Z_:][a-zA-Z0-9_:]*` and label names
/// `[a-zA-Z_][a-zA-Z0-9_]*` (other characters become `_`, a leading digit gets a `_` in
/// front); help texts have `\\` and newlines escaped, label values also `"`.
pub fn render_prometheus(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// Metric families as a `prometheus-client` collector.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for family in self.0.iter().filter(|f| !f.samples.is_empty()) {
            let name = sanitize_name(&family.name, true);
            let (name, kind) = match family.kind {
                MetricKind::Gauge => (name.as_str(), MetricType::Gauge),
                MetricKind::Counter => (
                    name.strip_suffix("_total").unwrap_or(&name),
                    MetricType::Counter,
                ),
            };
            let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
            let mut metric = encoder.encode_descriptor(name, &help, None, kind)?;
            for (labels, value) in &family.samples {
                let labels: Vec<(String, &str)> = labels
                    .iter()
                    .map(|(k, v)| (sanitize_name(k, false), v.as_str()))
                    .collect();
                let sample = metric.encode_family(&labels)?;
                match family.kind {
                    MetricKind::Gauge => ConstGauge::new(*value).encode(sample)?,
                    MetricKind::Counter => ConstCounter::new(*value).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// One gauge family per `(name, help, value)`, named `{prefix}{name}`, all with `labels`:
/// how a member exports what its heartbeats report.
pub fn gauge_families<'a>(
    prefix: &str,
    gauges: impl IntoIterator<Item = (&'a str, &'a str, f64)>,
    labels: &[(&str, &str)],
) -> Vec<Family> {
    gauges
        .into_iter()
        .map(|(name, help, value)| {
            Family::gauge(&format!("{prefix}{name}"), help).with(labels, value)
        })
        .collect()
}

fn sanitize_name(name: &str, allow_colon: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (allow_colon && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_text_format() {
        let families = vec![
            Family::counter("quill_steps_total", "Steps done.").with(&[], 42.0),
            Family::gauge("reward.mean", "Mean reward\nper signal.")
                .with(&[("signal", "length"), ("run-id", "a\"b\\c\nd")], 0.5)
                .with(&[("signal", "format")], -1.25e-3),
            Family::gauge("9lives:rate", "Odd.").with(&[], f64::INFINITY),
            Family::gauge("empty", "Never rendered."),
            Family::gauge("loss", "Loss.")
                .with(&[("rank", "0")], f64::NAN)
                .with(&[("rank", "1")], f64::NEG_INFINITY),
        ];
        let expected = concat!(
            "# HELP quill_steps Steps done.\n",
            "# TYPE quill_steps counter\n",
            "quill_steps_total 42.0\n",
            "# HELP reward_mean Mean reward\\nper signal.\n",
            "# TYPE reward_mean gauge\n",
            "reward_mean{signal=\"length\",run_id=\"a\\\"b\\\\c\\nd\"} 0.5\n",
            "reward_mean{signal=\"format\"} -0.00125\n",
            "# HELP _9lives:rate Odd.\n",
            "# TYPE _9lives:rate gauge\n",
            "_9lives:rate inf\n",
            "# HELP loss Loss.\n",
            "# TYPE loss gauge\n",
            "loss{rank=\"0\"} NaN\n",
            "loss{rank=\"1\"} -inf\n",
            "# EOF\n",
        );
        assert_eq!(render_prometheus(families), expected);
        assert_eq!(render_prometheus(Vec::new()), "# EOF\n");
    }

    #[test]
    fn heartbeat_values_become_labelled_gauges() {
        let values = [
            ("latency_ms", "Latency.", 12.5),
            ("in_flight", "Groups in flight.", 2.0),
        ];
        let text = render_prometheus(gauge_families(
            "quill_reward_",
            values,
            &[("role", "reward"), ("member", "reward-2")],
        ));
        assert!(
            text.contains("# TYPE quill_reward_latency_ms gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("quill_reward_in_flight{role=\"reward\",member=\"reward-2\"} 2.0\n"),
            "{text}"
        );
    }
}
