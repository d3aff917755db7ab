//! Parsing of device and dtype names given on the command line or in configs.

use crate::error::{Error, Result};
use tch::{Device, Kind};

/// Parses `cpu`, `cuda` or `cuda:N`, checking that CUDA is really there.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    let device = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => {
                return Err(Error::Device(format!(
                    "unknown device `{name}` (expected cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    let count = tch::Cuda::device_count();
    match device {
        Device::Cuda(index) if (index as i64) < count => Ok(device),
        _ if count == 0 => Err(Error::Device(format!(
            "device `{name}` asked for, but libtorch sees no CUDA device on this machine"
        ))),
        _ => Err(Error::Device(format!(
            "device `{name}` asked for, but only {count} CUDA device(s) are visible"
        ))),
    }
}

/// Parses a floating-point dtype name: `f32`/`float32` or `bf16`/`bfloat16`.
pub fn parse_dtype(name: &str) -> Result<Kind> {
    match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => Err(Error::Device(format!(
            "unknown dtype `{other}` (expected f32 or bf16)"
        ))),
    }
}

/// The Hugging Face name of a dtype (`float32`, `bfloat16`).
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_dtype("bf16").unwrap(), Kind::BFloat16);
        assert_eq!(parse_dtype("float32").unwrap(), Kind::Float);
    }

    #[test]
    fn rejects_unknown_names() {
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("unknown device `tpu`"), "{err}");
        let err = parse_dtype("f8").unwrap_err().to_string();
        assert!(err.contains("unknown dtype `f8`"), "{err}");
    }

    #[test]
    fn cuda_without_gpu_is_a_clear_error() {
        if tch::Cuda::device_count() > 0 {
            return;
        }
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("no CUDA device"), "{err}");
    }
}
