//! Model FLOPs utilisation (MFU): the share of the device's peak FLOP/s a training step
//! achieves.
//!
//! achieved FLOP/s = 6 × trainable parameters × trained tokens / step seconds
//!
//! (2 FLOPs per parameter per token forward, 4 backward). It ignores attention's
//! sequence-length term and the GRPO step's extra no-grad forward passes, so it slightly
//! understates the work done. The peak is `metrics.peak_tflops` when the job sets it,
//! else the bf16 dense peak of a known CUDA GPU (H100, H200, A100), else unknown (CPU).

use std::process::Command;

/// bf16 dense peak TFLOP/s of known GPUs, matched by substring of the device name; more
/// specific names first.
const PEAK_TFLOPS: &[(&str, f64)] = &[
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
];

/// Achieved FLOP/s of a step: 6 × `params` × `tokens` / `seconds`.
pub fn achieved_flops(params: u64, tokens: u64, seconds: f64) -> f64 {
    6.0 * params as f64 * tokens as f64 / seconds.max(1e-9)
}

/// MFU of a step against a peak of `peak_tflops` TFLOP/s (a share: 0.4 is 40 %).
pub fn mfu(params: u64, tokens: u64, seconds: f64, peak_tflops: f64) -> f64 {
    achieved_flops(params, tokens, seconds) / (peak_tflops * 1e12)
}

/// The bf16 dense peak of a GPU named `name` (as `nvidia-smi` spells it), if quill knows it.
pub fn table_peak_tflops(name: &str) -> Option<f64> {
    PEAK_TFLOPS
        .iter()
        .find(|(key, _)| name.contains(key))
        .map(|(_, peak)| *peak)
}

/// The learner's device as shown in status, and its peak TFLOP/s when known.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePeak {
    /// `cpu`, or `cuda:N` followed by the GPU's name when it could be read.
    pub label: String,
    /// Peak TFLOP/s, `None` when unknown.
    pub peak_tflops: Option<f64>,
}

/// The peak for `device` (the job's `model.device`): `configured` wins; a CUDA device is
/// looked up by the name of the node's GPUs (read with `nvidia-smi`; used only when every
/// GPU of the node has the same name, since CUDA's device order need not match
/// `nvidia-smi`'s); anything else is unknown.
pub fn device_peak(device: &str, configured: Option<f64>) -> DevicePeak {
    let name = if device.starts_with("cuda") {
        node_gpu_name()
    } else {
        None
    };
    let label = match &name {
        Some(name) => format!("{device} ({name})"),
        None => device.to_owned(),
    };
    let peak_tflops = configured.or_else(|| name.as_deref().and_then(table_peak_tflops));
    DevicePeak { label, peak_tflops }
}

/// The GPU name shared by every GPU of this node, or `None` (no `nvidia-smi`, no GPU,
/// mixed models).
fn node_gpu_name() -> Option<String> {
    let output = Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    single_name(&String::from_utf8_lossy(&output.stdout))
}

/// The one name all non-empty lines share, if they do.
fn single_name(listing: &str) -> Option<String> {
    let mut names = listing.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = names.next()?;
    names.all(|n| n == first).then(|| first.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mfu_follows_six_n_d() {
        // 1e9 params, 1000 tokens in 0.5 s: 6e12 FLOP / 0.5 s = 12 TFLOP/s.
        assert!((achieved_flops(1_000_000_000, 1000, 0.5) - 12e12).abs() < 1.0);
        let share = mfu(1_000_000_000, 1000, 0.5, 120.0);
        assert!((share - 0.1).abs() < 1e-12, "{share}");
        assert!(achieved_flops(10, 10, 0.0).is_finite());
    }

    #[test]
    fn peaks_come_from_config_then_table() {
        assert_eq!(table_peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(table_peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(table_peak_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(table_peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(table_peak_tflops("Tesla T4"), None);
        let cpu = device_peak("cpu", None);
        assert_eq!((cpu.label.as_str(), cpu.peak_tflops), ("cpu", None));
        assert_eq!(device_peak("cpu", Some(2.5)).peak_tflops, Some(2.5));
    }

    #[test]
    fn mixed_or_missing_gpu_names_are_unknown() {
        let h100 = "NVIDIA H100 80GB HBM3\nNVIDIA H100 80GB HBM3\n";
        assert_eq!(single_name(h100).as_deref(), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(single_name("NVIDIA H100 80GB HBM3\nNVIDIA A100\n"), None);
        assert_eq!(single_name("\n"), None);
    }
}
