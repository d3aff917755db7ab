//! Machine-readable metrics: JSON-lines metric files and the OpenMetrics text format that
//! Prometheus scrapes.
//!
//! A metrics file holds one JSON object per line. Every object has a `"kind"` (what the
//! record describes: `"step"`, `"throughput"` …) and a `"time"` (unix seconds); the other
//! fields are free. [`MetricsWriter`] appends records, [`read_records`] reads them back,
//! and `quill plot` draws them.

pub mod http;
mod jsonl;
mod prometheus;

pub use jsonl::{read_records, MetricsWriter, Record, TelemetryError};
pub use prometheus::{gauge_families, render_prometheus, Family, MetricKind};
