//! The model to train: an existing reward model (one label), or a causal LM whose
//! language-model head is replaced by a fresh `score` head.

use super::{Result, RmError};
use quill_model::{default_model, load_pretrained, HeadKind, ModelConfig, Qwen2, Tokenizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The tokenizer files of the model being trained, copied into every checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// The embedded default model's tokenizer.
    Default,
    /// Tokenizer files read from a Hugging Face folder: (file name, contents).
    Files(Vec<(String, Vec<u8>)>),
}

impl ModelSource {
    /// Reads the tokenizer files of `spec` (a folder or `default`).
    pub fn read(spec: &str) -> Result<Self> {
        if spec == default_model::NAME {
            return Ok(ModelSource::Default);
        }
        let mut files = Vec::new();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let path = Path::new(spec).join(name);
            if path.exists() {
                let bytes = std::fs::read(&path)
                    .map_err(|e| RmError::config("--model", format!("{}: {e}", path.display())))?;
                files.push((name.to_owned(), bytes));
            }
        }
        Ok(ModelSource::Files(files))
    }

    /// Writes the tokenizer files into `dir`.
    pub fn write_tokenizer(&self, dir: &Path) -> Result<()> {
        match self {
            ModelSource::Default => Ok(default_model::write_tokenizer(dir)?),
            ModelSource::Files(files) => {
                for (name, bytes) in files {
                    let path = dir.join(name);
                    std::fs::write(&path, bytes).map_err(|e| RmError::Checkpoint {
                        path: dir.to_owned(),
                        reason: format!("writing {name}: {e}"),
                    })?;
                }
                Ok(())
            }
        }
    }
}

/// Loads `spec` (a folder or `default`) in f32 on `device` as a one-label reward model:
/// a sequence-classification model is used as it is; a causal LM keeps its body and gets a
/// `score` head drawn from N(0, initializer_range) with `seed` (its LM head is dropped).
/// Returns the model, its tokenizer, and whether the head is new.
pub fn load_reward_model(
    spec: &str,
    device: Device,
    seed: u64,
) -> Result<(Qwen2, Tokenizer, bool)> {
    let (model, tokenizer) = load_pretrained(spec, device, Kind::Float)?;
    match model.config().head {
        HeadKind::SequenceClassification { num_labels: 1 } => Ok((model, tokenizer, false)),
        HeadKind::SequenceClassification { num_labels } => Err(RmError::config(
            "--model",
            format!("a Bradley–Terry reward model has one label; this model has {num_labels}"),
        )),
        HeadKind::CausalLm => Ok((add_score_head(&model, seed)?, tokenizer, true)),
    }
}

/// A sequence-classification copy of the causal LM `lm` with a new score head.
fn add_score_head(lm: &Qwen2, seed: u64) -> Result<Qwen2> {
    let mut raw = lm.config().to_json("float32");
    let object = raw.as_object_mut().expect("configs are JSON objects");
    object.insert(
        "architectures".into(),
        json!(["Qwen2ForSequenceClassification"]),
    );
    object.insert("id2label".into(), json!({"0": "LABEL_0"}));
    object.insert("label2id".into(), json!({"LABEL_0": 0}));
    if object.get("pad_token_id").is_none_or(Value::is_null) {
        if let Some(&eos) = lm.config().eos_token_ids.first() {
            object.insert("pad_token_id".into(), json!(eos));
        }
    }
    let std = object
        .get("initializer_range")
        .and_then(Value::as_f64)
        .unwrap_or(0.02);
    let config = ModelConfig::from_json(raw)?;
    let hidden = config.hidden_size;
    let mut tensors: HashMap<String, Tensor> = lm
        .hf_tensors(Kind::Float)
        .into_iter()
        .filter(|(name, _)| name != "lm_head.weight")
        .collect();
    let normal = Normal::new(0.0f32, std as f32)
        .map_err(|e| RmError::config("initializer_range", e.to_string()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..hidden).map(|_| normal.sample(&mut rng)).collect();
    tensors.insert(
        "score.weight".into(),
        Tensor::from_slice(&values).view([1, hidden]),
    );
    let mut rm = Qwen2::new(config, lm.device(), Kind::Float)?;
    rm.load_weights(&tensors)?;
    Ok(rm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_causal_lm_gets_a_score_head_and_keeps_its_body() {
        let (rm, _, added) = load_reward_model("default", Device::Cpu, 1).unwrap();
        assert!(added);
        assert_eq!(
            rm.config().head,
            HeadKind::SequenceClassification { num_labels: 1 }
        );
        let (lm, _) = load_pretrained("default", Device::Cpu, Kind::Float).unwrap();
        let body = |m: &Qwen2| {
            m.hf_tensors(Kind::Float)
                .into_iter()
                .find(|(n, _)| n == "model.layers.0.mlp.down_proj.weight")
                .unwrap()
                .1
        };
        assert!(body(&rm).equal(&body(&lm)));
        let scores = tch::no_grad(|| rm.classify(&[vec![5, 6, 7]])).unwrap();
        assert_eq!(scores.size(), [1, 1]);
        let dir = tempfile::tempdir().unwrap();
        rm.save(dir.path(), Kind::Float).unwrap();
        let again = Qwen2::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
        let rescored = tch::no_grad(|| again.classify(&[vec![5, 6, 7]])).unwrap();
        assert!(scores.equal(&rescored));
    }
}
