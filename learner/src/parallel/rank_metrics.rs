//! What a learner rank reports about its step: step time, its own trained tokens/s, the
//! share of wall time spent waiting for data, and MFU where the device's peak is known.

use crate::train::mfu;
use crate::train::trainer::Trainer;
use quill_config::job::JobConfig;
use serde_json::{json, Map, Value};

/// A rank's model size and device peak, the basis of its MFU.
pub struct RankMeter {
    params: u64,
    device: mfu::DevicePeak,
}

impl RankMeter {
    /// The meter of a rank training `trainer` on the job's (or the rank's) device.
    pub fn new(job: &JobConfig, trainer: &Trainer) -> Self {
        let meter = RankMeter {
            params: trainer
                .model()
                .var_store()
                .trainable_variables()
                .iter()
                .map(|t| t.numel() as u64)
                .sum(),
            device: mfu::device_peak(&job.model.device, job.metrics.peak_tflops),
        };
        tracing::info!(device = %meter.device.label, peak_tflops = ?meter.device.peak_tflops, params = meter.params, "MFU basis");
        meter
    }

    /// The device's label (`cpu`, `cuda:0 (NVIDIA H100 …)`).
    pub fn device(&self) -> &str {
        &self.device.label
    }

    /// The rank's entry of the status document's `ranks`: step time, the rank's trained
    /// tokens/s (`tokens` it trained itself), idle share (waiting for data / wall time) and
    /// MFU (null when the peak is unknown).
    pub fn metrics(
        &self,
        step_seconds: f64,
        tokens: usize,
        wait_seconds: f64,
        other_seconds: f64,
    ) -> Map<String, Value> {
        let wall = wait_seconds + step_seconds + other_seconds;
        let mfu = self
            .device
            .peak_tflops
            .map(|peak| mfu::mfu(self.params, tokens as u64, step_seconds, peak));
        let mut map = Map::new();
        map.insert("device".into(), json!(self.device.label));
        map.insert("step_seconds".into(), json!(step_seconds));
        map.insert(
            "tokens_per_s".into(),
            json!(tokens as f64 / step_seconds.max(1e-9)),
        );
        map.insert("idle_share".into(), json!(wait_seconds / wall.max(1e-9)));
        map.insert("mfu".into(), json!(mfu));
        map.insert("peak_tflops".into(), json!(self.device.peak_tflops));
        map.insert("params".into(), json!(self.params));
        map
    }
}
