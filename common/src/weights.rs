//! Weights as one contiguous byte blob plus a manifest, for chunked transfer to actors.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Where one tensor sits in a [`WeightBlob`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Hugging Face tensor name.
    pub name: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Byte offset in the blob.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// One version of the weights, serialised.
#[derive(Debug, Clone)]
pub struct WeightBlob {
    /// The policy version these weights are.
    pub version: u64,
    /// The tensors' layout.
    pub manifest: Vec<ManifestEntry>,
    /// The raw little-endian tensor bytes, back to back.
    pub bytes: Vec<u8>,
    /// CRC32 of `bytes`.
    pub crc32: u32,
}

fn kind_name(kind: Kind) -> Result<&'static str> {
    match kind {
        Kind::Float => Ok("f32"),
        Kind::BFloat16 => Ok("bf16"),
        Kind::Half => Ok("f16"),
        other => Err(Error::Device(format!(
            "cannot ship tensors of kind {other:?}"
        ))),
    }
}

fn kind_of(name: &str) -> Result<Kind> {
    match name {
        "f32" => Ok(Kind::Float),
        "bf16" => Ok(Kind::BFloat16),
        "f16" => Ok(Kind::Half),
        other => Err(Error::Device(format!(
            "unknown weight dtype `{other}` in manifest"
        ))),
    }
}

impl WeightBlob {
    /// Serialises named tensors (any device) into a blob.
    pub fn from_tensors(version: u64, tensors: &[(String, Tensor)]) -> Result<Self> {
        let mut manifest = Vec::with_capacity(tensors.len());
        let mut bytes = Vec::new();
        for (name, tensor) in tensors {
            let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
            let numel = tensor.numel();
            let len = numel * tensor.kind().elt_size_in_bytes();
            let offset = bytes.len();
            bytes.resize(offset + len, 0);
            tensor.f_copy_data_u8(&mut bytes[offset..], numel)?;
            manifest.push(ManifestEntry {
                name: name.clone(),
                dtype: kind_name(tensor.kind())?.to_owned(),
                shape: tensor.size(),
                offset: offset as u64,
                len: len as u64,
            });
        }
        let crc32 = crc32fast::hash(&bytes);
        Ok(WeightBlob {
            version,
            manifest,
            bytes,
            crc32,
        })
    }

    /// Checks a received blob against its manifest and checksum.
    pub fn verify(&self) -> Result<()> {
        let corrupt = |reason: String| Error::Safetensors {
            path: format!("<weights v{}>", self.version).into(),
            reason,
        };
        if crc32fast::hash(&self.bytes) != self.crc32 {
            return Err(corrupt("checksum mismatch".into()));
        }
        for entry in &self.manifest {
            let kind = kind_of(&entry.dtype)?;
            let numel: i64 = entry.shape.iter().product();
            let want = numel as u64 * kind.elt_size_in_bytes() as u64;
            if entry.len != want || entry.offset + entry.len > self.bytes.len() as u64 {
                return Err(corrupt(format!(
                    "entry `{}` does not fit the blob",
                    entry.name
                )));
            }
        }
        Ok(())
    }

    /// Rebuilds the tensors (CPU, stored dtype) by name; verifies first.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.verify()?;
        self.manifest
            .iter()
            .map(|e| {
                let data = &self.bytes[e.offset as usize..(e.offset + e.len) as usize];
                let tensor = Tensor::f_from_data_size(data, &e.shape, kind_of(&e.dtype)?)?;
                Ok((e.name.clone(), tensor))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_corruption() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[0.5f32, -1.0]).to_kind(Kind::BFloat16);
        let blob = WeightBlob::from_tensors(
            3,
            &[
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
        )
        .unwrap();
        let back = blob.tensors().unwrap();
        assert!(back["a"].equal(&a));
        assert!(back["b"].equal(&b));
        let mut bad = blob.clone();
        bad.bytes[0] ^= 1;
        assert!(bad
            .tensors()
            .unwrap_err()
            .to_string()
            .contains("checksum mismatch"));
        let mut bad = blob;
        bad.manifest[1].len += 2;
        bad.crc32 = crc32fast::hash(&bad.bytes);
        assert!(bad
            .verify()
            .unwrap_err()
            .to_string()
            .contains("`b` does not fit"));
    }
}
