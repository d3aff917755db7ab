//! The Hugging Face `config.json` of a Qwen2 / Qwen2.5 model, read and validated.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Which head sits on top of the transformer body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// `Qwen2ForCausalLM`: a language-model head (possibly tied to the embeddings).
    CausalLm,
    /// `Qwen2ForSequenceClassification`: `score.weight`, pooled at the last real token.
    SequenceClassification {
        /// Number of output labels (1 for a scalar reward model).
        num_labels: i64,
    },
}

/// The architecture hyper-parameters quill needs, plus the original JSON for saving.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Number of query heads.
    pub num_attention_heads: i64,
    /// Number of key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: i64,
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Context length.
    pub max_position_embeddings: i64,
    /// Padding token id, if the config names one.
    pub pad_token_id: Option<i64>,
    /// End-of-sequence token ids named by the config.
    pub eos_token_ids: Vec<i64>,
    /// LM or classification head.
    pub head: HeadKind,
    raw: Map<String, Value>,
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        Self::from_json(value)
    }

    /// Builds and validates a config from parsed JSON.
    pub fn from_json(value: Value) -> Result<Self> {
        let Value::Object(raw) = value else {
            return Err(Error::config("<root>", "config.json must be a JSON object"));
        };
        let hidden_size = required_int(&raw, "hidden_size")?;
        let num_attention_heads = required_int(&raw, "num_attention_heads")?;
        let num_key_value_heads =
            optional_int(&raw, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let rope_theta = match raw.get("rope_theta") {
            Some(_) => optional_float(&raw, "rope_theta")?,
            None => match raw.get("rope_parameters") {
                Some(Value::Object(params)) => optional_float(params, "rope_theta")?,
                _ => None,
            },
        }
        .unwrap_or(10_000.0);
        check_rope_scaling(&raw)?;
        if raw.get("use_sliding_window") == Some(&Value::Bool(true)) {
            return Err(Error::config(
                "use_sliding_window",
                "sliding-window attention is not supported",
            ));
        }
        let head = if architectures(&raw)
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"))
        {
            let num_labels = match raw.get("id2label") {
                Some(Value::Object(labels)) => labels.len() as i64,
                _ => optional_int(&raw, "num_labels")?.unwrap_or(2),
            };
            HeadKind::SequenceClassification { num_labels }
        } else {
            HeadKind::CausalLm
        };
        let config = ModelConfig {
            vocab_size: required_int(&raw, "vocab_size")?,
            hidden_size,
            intermediate_size: required_int(&raw, "intermediate_size")?,
            num_hidden_layers: required_int(&raw, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            rope_theta,
            rms_norm_eps: optional_float(&raw, "rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: match raw.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(Error::config(
                        "tie_word_embeddings",
                        "must be true or false",
                    ))
                }
            },
            max_position_embeddings: optional_int(&raw, "max_position_embeddings")?
                .unwrap_or(32_768),
            pad_token_id: optional_int(&raw, "pad_token_id")?,
            eos_token_ids: int_or_list(&raw, "eos_token_id")?,
            head,
            raw,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value <= 0 {
                return Err(Error::config(
                    field,
                    format!("must be positive, got {value}"),
                ));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(Error::config(
                "hidden_size",
                "the head dimension must be even for rotary embeddings",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config("rope_theta", "must be a positive number"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::config("rms_norm_eps", "must be a positive number"));
        }
        if let HeadKind::SequenceClassification { num_labels } = self.head {
            if num_labels <= 0 {
                return Err(Error::config("num_labels", "must be positive"));
            }
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// The config as JSON, with the dtype it is saved in recorded.
    pub fn to_json(&self, dtype: &str) -> Value {
        let mut raw = self.raw.clone();
        raw.insert("torch_dtype".into(), Value::from(dtype));
        raw.insert("dtype".into(), Value::from(dtype));
        Value::Object(raw)
    }
}

fn architectures(raw: &Map<String, Value>) -> Vec<String> {
    match raw.get("architectures") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn check_rope_scaling(raw: &Map<String, Value>) -> Result<()> {
    let rope_type = |v: &Value| {
        v.get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    for field in ["rope_scaling", "rope_parameters"] {
        if let Some(v @ Value::Object(_)) = raw.get(field) {
            match rope_type(v).as_deref() {
                None | Some("default") => {}
                Some(other) => {
                    return Err(Error::config(
                        field,
                        format!(
                        "rope type `{other}` is not supported (only the default rotary embedding)"
                    ),
                    ))
                }
            }
        }
    }
    Ok(())
}

fn required_int(raw: &Map<String, Value>, field: &str) -> Result<i64> {
    optional_int(raw, field)?.ok_or_else(|| Error::config(field, "missing (required)"))
}

fn optional_int(raw: &Map<String, Value>, field: &str) -> Result<Option<i64>> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| Error::config(field, format!("must be an integer, got {v}"))),
    }
}

fn optional_float(raw: &Map<String, Value>, field: &str) -> Result<Option<f64>> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::config(field, format!("must be a number, got {v}"))),
    }
}

fn int_or_list(raw: &Map<String, Value>, field: &str) -> Result<Vec<i64>> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| Error::config(field, format!("must hold integers, got {v}")))
            })
            .collect(),
        Some(_) => Ok(vec![required_int(raw, field)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "max_position_embeddings": 128, "eos_token_id": [5, 6]
        })
    }

    fn error_of(mutate: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut value = base();
        mutate(value.as_object_mut().unwrap());
        ModelConfig::from_json(value).unwrap_err().to_string()
    }

    #[test]
    fn reads_a_valid_config() {
        let c = ModelConfig::from_json(base()).unwrap();
        assert_eq!(c.head_dim(), 8);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert_eq!(c.head, HeadKind::CausalLm);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn reads_rope_theta_from_rope_parameters() {
        let mut value = base();
        let obj = value.as_object_mut().unwrap();
        obj.remove("rope_theta");
        obj.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 500.0, "rope_type": "default"}),
        );
        assert_eq!(ModelConfig::from_json(value).unwrap().rope_theta, 500.0);
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = error_of(|c| {
            c.remove("hidden_size");
        });
        assert_eq!(err, "model config field `hidden_size`: missing (required)");
    }

    #[test]
    fn bad_values_are_named() {
        assert!(error_of(|c| {
            c.insert("num_key_value_heads".into(), json!(3));
        })
        .contains("`num_key_value_heads`"));
        assert!(error_of(|c| {
            c.insert("vocab_size".into(), json!("many"));
        })
        .contains("`vocab_size`: must be an integer"));
        assert!(error_of(|c| {
            c.insert("num_hidden_layers".into(), json!(0));
        })
        .contains("`num_hidden_layers`: must be positive"));
        assert!(error_of(|c| {
            c.insert(
                "rope_scaling".into(),
                json!({"type": "yarn", "factor": 4.0}),
            );
        })
        .contains("`rope_scaling`"));
    }

    #[test]
    fn classification_head_is_detected() {
        let mut value = base();
        let obj = value.as_object_mut().unwrap();
        obj.insert(
            "architectures".into(),
            json!(["Qwen2ForSequenceClassification"]),
        );
        obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
        let c = ModelConfig::from_json(value).unwrap();
        assert_eq!(c.head, HeadKind::SequenceClassification { num_labels: 1 });
    }
}
