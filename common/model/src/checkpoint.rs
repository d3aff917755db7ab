//! Hugging Face safetensors checkpoints: single-file or sharded, read through mmap.

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Something tensors can be fetched from by Hugging Face name, with the shape checked.
pub trait TensorSource {
    /// The tensor called `name`, which must have shape `shape`, on the CPU in its stored dtype.
    fn fetch(&self, name: &str, shape: &[i64]) -> Result<Tensor>;
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// An open checkpoint directory (memory-mapped, validated on open).
pub struct CheckpointReader {
    dir: PathBuf,
    shards: Vec<Shard>,
    location: HashMap<String, usize>,
}

impl CheckpointReader {
    /// Opens `dir/model.safetensors` or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<String> = if index_path.exists() {
            shard_files(&index_path)?
        } else if dir.join(SINGLE_FILE).exists() {
            vec![SINGLE_FILE.to_owned()]
        } else {
            return Err(Error::Safetensors {
                path: dir.to_owned(),
                reason: format!("neither {SINGLE_FILE} nor {INDEX_FILE} is in this directory"),
            });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut location = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let shard = open_shard(&dir.join(file))?;
            for name in shard.metadata.tensors().keys() {
                location.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        Ok(CheckpointReader {
            dir: dir.to_owned(),
            shards,
            location,
        })
    }

    /// Names of every tensor in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }
}

impl TensorSource for CheckpointReader {
    fn fetch(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let shard = self
            .location
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| Error::MissingTensor {
                path: self.dir.clone(),
                name: name.to_owned(),
            })?;
        let info = shard
            .metadata
            .info(name)
            .expect("location map is built from the metadata");
        tensor_from_info(shard, name, info, shape)
    }
}

/// Named tensors held in memory (the embedded default model, tests).
impl TensorSource for HashMap<String, Tensor> {
    fn fetch(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let tensor = self.get(name).ok_or_else(|| Error::MissingTensor {
            path: PathBuf::from("<memory>"),
            name: name.to_owned(),
        })?;
        check_shape(name, shape, &tensor.size())?;
        Ok(tensor.shallow_clone())
    }
}

fn shard_files(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index_path.to_owned(),
        source,
    })?;
    let Some(Value::Object(map)) = value.get("weight_map") else {
        return Err(Error::Safetensors {
            path: index_path.to_owned(),
            reason: "no `weight_map` object in the index".into(),
        });
    };
    let mut files: Vec<String> = Vec::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(Error::Safetensors {
                path: index_path.to_owned(),
                reason: format!("weight_map entry for `{name}` is not a file name"),
            });
        };
        if file.contains('/') || file.contains("..") {
            return Err(Error::Safetensors {
                path: index_path.to_owned(),
                reason: format!("weight_map names a file outside the checkpoint: `{file}`"),
            });
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_owned());
        }
    }
    Ok(files)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the checkpoint is opened read-only and treated as immutable while loaded.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let corrupt = |e: safetensors::SafeTensorError| Error::Safetensors {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    SafeTensors::deserialize(&map).map_err(corrupt)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(corrupt)?;
    Ok(Shard {
        path: path.to_owned(),
        map,
        header_len,
        metadata,
    })
}

fn tensor_from_info(shard: &Shard, name: &str, info: &TensorInfo, shape: &[i64]) -> Result<Tensor> {
    let kind = match info.dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        other => {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                reason: format!("tensor `{name}` has unsupported dtype {other:?}"),
            })
        }
    };
    let actual: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
    check_shape(name, shape, &actual)?;
    let start = 8 + shard.header_len + info.data_offsets.0;
    let end = 8 + shard.header_len + info.data_offsets.1;
    Ok(Tensor::f_from_data_size(
        &shard.map[start..end],
        &actual,
        kind,
    )?)
}

fn check_shape(name: &str, expected: &[i64], actual: &[i64]) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            name: name.to_owned(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}

/// Writes named tensors as a Hugging Face checkpoint into `dir` (which must exist), sharding
/// into files of at most `max_shard_bytes` when they do not fit in one.
pub fn write_tensors(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: usize,
) -> Result<()> {
    let mut encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
        let dtype = match tensor.kind() {
            Kind::Float => Dtype::F32,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            other => {
                return Err(Error::Safetensors {
                    path: dir.to_owned(),
                    reason: format!("cannot save `{name}` of kind {other:?}"),
                })
            }
        };
        let numel = tensor.numel();
        let mut bytes = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.f_copy_data_u8(&mut bytes, numel)?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        encoded.push((name.clone(), dtype, shape, bytes));
    }
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0usize;
    for (i, (_, _, _, bytes)) in encoded.iter().enumerate() {
        if current > 0 && current + bytes.len() > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes.len();
        shards.last_mut().expect("never empty").push(i);
    }
    let metadata = Some(HashMap::from([("format".to_owned(), "pt".to_owned())]));
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (s, members) in shards.iter().enumerate() {
        let file = if count == 1 {
            SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, count)
        };
        let mut views = Vec::with_capacity(members.len());
        for &i in members {
            let (name, dtype, shape, bytes) = &encoded[i];
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map_err(
                |e| Error::Safetensors {
                    path: dir.join(&file),
                    reason: e.to_string(),
                },
            )?;
            views.push((name.clone(), view));
            weight_map.insert(name.clone(), Value::from(file.clone()));
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, metadata.clone(), &path).map_err(|e| {
            Error::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
    }
    if count > 1 {
        let total: usize = encoded.iter().map(|e| e.3.len()).sum();
        let index = json!({
            "metadata": {"total_size": total},
            "weight_map": Value::Object(weight_map.into_iter().collect::<Map<_, _>>()),
        });
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    Ok(())
}

/// Writes pretty JSON to `path`.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
