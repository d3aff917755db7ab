//! Tensors to and from [`WeightBlob`], the wire form of one weight version.

use crate::error::{Error, Result};
use quill_proto::blob::{ManifestEntry, WeightBlob};
use std::collections::HashMap;
use tch::{Kind, Tensor};

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

/// Serialises named tensors (any device) into a blob.
pub fn to_blob(version: u64, tensors: &[(String, Tensor)]) -> Result<WeightBlob> {
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

/// Rebuilds a blob's tensors (CPU, stored dtype) by name; verifies it first.
pub fn from_blob(blob: &WeightBlob) -> Result<HashMap<String, Tensor>> {
    blob.verify().map_err(|e| Error::Safetensors {
        path: format!("<weights v{}>", blob.version).into(),
        reason: e.to_string(),
    })?;
    blob.manifest
        .iter()
        .map(|e| {
            let data = &blob.bytes[e.offset as usize..(e.offset + e.len) as usize];
            let tensor = Tensor::f_from_data_size(data, &e.shape, kind_of(&e.dtype)?)?;
            Ok((e.name.clone(), tensor))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_corruption() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[0.5f32, -1.0]).to_kind(Kind::BFloat16);
        let blob = to_blob(
            3,
            &[
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
        )
        .unwrap();
        let back = from_blob(&blob).unwrap();
        assert!(back["a"].equal(&a));
        assert!(back["b"].equal(&b));
        let mut bad = blob.clone();
        bad.bytes[0] ^= 1;
        assert!(from_blob(&bad)
            .unwrap_err()
            .to_string()
            .contains("checksum mismatch"));
        let mut bad = blob;
        bad.manifest[1].len += 2;
        bad.crc32 = crc32fast::hash(&bad.bytes);
        assert!(from_blob(&bad)
            .unwrap_err()
            .to_string()
            .contains("`b` does not fit"));
    }
}
