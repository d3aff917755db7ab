//! What a learner rank reports about its step: step time, its own trained tokens/s, the
//! share of wall time spent waiting for data, and MFU where the device's peak is known.

use crate::train::mfu;
use crate::train::trainer::Trainer;
use quill_config::job::JobConfig;
use quill_proto::RankMetrics;

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

    /// Rank `rank`'s entry of the status document's `ranks`: step time, the rank's
    /// trained tokens/s (`tokens` it trained itself), idle share (waiting for data / wall
    /// time) and MFU (absent when the peak is unknown).
    pub fn metrics(
        &self,
        rank: u32,
        step_seconds: f64,
        tokens: usize,
        wait_seconds: f64,
        other_seconds: f64,
    ) -> RankMetrics {
        let wall = wait_seconds + step_seconds + other_seconds;
        RankMetrics {
            rank,
            device: self.device.label.clone(),
            step_seconds,
            tokens_per_s: tokens as f64 / step_seconds.max(1e-9),
            idle_share: wait_seconds / wall.max(1e-9),
            mfu: self
                .device
                .peak_tflops
                .map(|peak| mfu::mfu(self.params, tokens as u64, step_seconds, peak)),
        }
    }
}
