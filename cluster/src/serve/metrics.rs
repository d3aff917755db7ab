//! `/metrics` of `quill serve`, in the OpenMetrics text format (prometheus-client): requests
//! by endpoint and status, refused keys, and the engine's counters (the mean batch is
//! `decoded_rows / steps`; `peak_batch` shows requests decoded together).

use super::App;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use quill_actor::EngineStats;
use std::sync::atomic::Ordering;
use std::sync::Arc;

type Labels = Vec<(&'static str, String)>;

/// The server's own counters.
#[derive(Default)]
pub struct ServeMetrics {
    requests: Family<Labels, Counter>,
    refused: Counter,
}

impl ServeMetrics {
    /// Counts one answered request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", endpoint.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Counts one request refused for its API key.
    pub fn refused(&self) {
        self.refused.inc();
    }

    /// The exposition text with the engine's counters as they are now.
    pub fn text(&self, stats: &EngineStats) -> String {
        let mut registry = Registry::with_prefix("quill_serve");
        registry.register(
            "requests",
            "Requests answered, by endpoint and HTTP status",
            self.requests.clone(),
        );
        registry.register(
            "refused_keys",
            "Requests refused for a missing or wrong API key",
            self.refused.clone(),
        );
        let count = |c: &std::sync::atomic::AtomicU64| ConstCounter::new(c.load(Ordering::Relaxed));
        registry.register(
            "generated_tokens",
            "Tokens the engine generated",
            count(&stats.generated_tokens),
        );
        registry.register(
            "finished_samples",
            "Choices the engine finished",
            count(&stats.finished_samples),
        );
        registry.register(
            "engine_steps",
            "Decoding steps the engine took",
            count(&stats.steps),
        );
        registry.register(
            "decoded_rows",
            "Sequences decoded, summed over steps (divide by engine_steps for the mean batch)",
            count(&stats.decoded_rows),
        );
        registry.register(
            "peak_batch",
            "The most sequences decoded together in one step",
            ConstGauge::new(stats.peak_batch.load(Ordering::Relaxed) as i64),
        );
        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

/// `GET /metrics`.
pub async fn render(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.text(app.engine.stats()),
    )
        .into_response()
}
