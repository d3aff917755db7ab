//! The Prometheus text exposition format: metric [`Family`]s, their rendering, and the
//! gauges a member's heartbeat values become.

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

/// Renders metric families in the Prometheus text exposition format (0.0.4): per family a
/// `# HELP` and a `# TYPE` line, then one `name{label="value",…} number` line per sample;
/// families without samples are left out. Metric names are made to match
/// `[a-zA-Z_:][a-zA-Z0-9_:]*` and label names `[a-zA-Z_][a-zA-Z0-9_]*` (other characters
/// become `_`, a leading digit gets a `_` in front); label values have `\`, `"` and
/// newlines escaped, help texts `\` and newlines.
pub fn render_prometheus(families: &[Family]) -> String {
    let mut out = String::new();
    for family in families.iter().filter(|f| !f.samples.is_empty()) {
        let name = sanitize_name(&family.name, true);
        let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
        let kind = match family.kind {
            MetricKind::Gauge => "gauge",
            MetricKind::Counter => "counter",
        };
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in &family.samples {
            out.push_str(&name);
            if !labels.is_empty() {
                let labels: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{}=\"{}\"", sanitize_name(k, false), escape_label(v)))
                    .collect();
                out.push('{');
                out.push_str(&labels.join(","));
                out.push('}');
            }
            out.push(' ');
            out.push_str(&format_value(*value));
            out.push('\n');
        }
    }
    out
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

fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_format() {
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
            "# HELP quill_steps_total Steps done.\n",
            "# TYPE quill_steps_total counter\n",
            "quill_steps_total 42\n",
            "# HELP reward_mean Mean reward\\nper signal.\n",
            "# TYPE reward_mean gauge\n",
            "reward_mean{signal=\"length\",run_id=\"a\\\"b\\\\c\\nd\"} 0.5\n",
            "reward_mean{signal=\"format\"} -0.00125\n",
            "# HELP _9lives:rate Odd.\n",
            "# TYPE _9lives:rate gauge\n",
            "_9lives:rate +Inf\n",
            "# HELP loss Loss.\n",
            "# TYPE loss gauge\n",
            "loss{rank=\"0\"} NaN\n",
            "loss{rank=\"1\"} -Inf\n",
        );
        assert_eq!(render_prometheus(&families), expected);
        assert_eq!(render_prometheus(&[]), "");
    }

    #[test]
    fn heartbeat_values_become_labelled_gauges() {
        let values = [
            ("latency_ms", "Latency.", 12.5),
            ("in_flight", "Groups in flight.", 2.0),
        ];
        let text = render_prometheus(&gauge_families(
            "quill_reward_",
            values,
            &[("role", "reward"), ("member", "reward-2")],
        ));
        assert!(
            text.contains("# TYPE quill_reward_latency_ms gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("quill_reward_in_flight{role=\"reward\",member=\"reward-2\"} 2\n"),
            "{text}"
        );
    }
}
