//! Named tensors plus string metadata in one safetensors file (optimizer state).

use crate::error::{LearnerError, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Writes `tensors` (moved to the CPU) and `metadata` to `path`.
pub(crate) fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut encoded = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
        let dtype = dtype_of(tensor.kind()).ok_or_else(|| {
            LearnerError::state(path, format!("`{name}` has kind {:?}", tensor.kind()))
        })?;
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        encoded.push((name.clone(), dtype, shape, bytes));
    }
    let views = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| LearnerError::state(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| LearnerError::state(path, e.to_string()))
}

/// Every tensor of the file at `path` (on the CPU) and its metadata.
pub(crate) fn read(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| LearnerError::io(path, e))?;
    let corrupt = |e: safetensors::SafeTensorError| LearnerError::state(path, e.to_string());
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let file = SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            LearnerError::state(
                path,
                format!("`{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        tensors.insert(name, tensor);
    }
    Ok((tensors, metadata.metadata().clone().unwrap_or_default()))
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    match kind {
        Kind::Float => Some(Dtype::F32),
        Kind::BFloat16 => Some(Dtype::BF16),
        Kind::Half => Some(Dtype::F16),
        Kind::Double => Some(Dtype::F64),
        _ => None,
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}
