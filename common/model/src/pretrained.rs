//! Loading a model and its tokenizer from a directory or the embedded default.

use crate::default_model;
use crate::error::Result;
use crate::tokenizer::Tokenizer;
use crate::Qwen2;
use std::path::Path;
use tch::{Device, Kind};

/// Loads `spec`: either [`default_model::NAME`] or a Hugging Face model directory holding
/// `config.json`, safetensors weights and `tokenizer.json`.
pub fn load_pretrained(spec: &str, device: Device, kind: Kind) -> Result<(Qwen2, Tokenizer)> {
    if spec == default_model::NAME {
        return default_model::load(device, kind);
    }
    let dir = Path::new(spec);
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let model = Qwen2::load(dir, device, kind)?;
    Ok((model, tokenizer))
}
