//! A tiny random model and batches for the unit tests.

use crate::train::grpo::{GrpoConfig, LossAggregation};
use crate::train::sample::TrainSample;
use crate::{AdamWConfig, TrainerConfig};
use quill_model::{default_model, ModelConfig, Qwen2};
use serde_json::json;
use tch::{Device, Kind};

/// Vocabulary of the tiny model.
pub const VOCAB: i64 = 48;

/// A 2-layer model with 16-wide hidden states; `seed` draws its weights.
pub fn tiny_model(seed: u64) -> Qwen2 {
    let config = ModelConfig::from_json(json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "tie_word_embeddings": true
    }))
    .expect("valid config");
    let weights = default_model::weights(&config, seed);
    let mut model = Qwen2::new(config, Device::Cpu, Kind::Float).expect("model");
    model.load_weights(&weights).expect("weights");
    model
}

/// A sample with token ids drawn from `(seed, i)` and the given behaviour log-prob.
pub fn sample(
    seed: i64,
    prompt: usize,
    response: usize,
    logprob: f32,
    advantage: f32,
) -> TrainSample {
    let token = |i: usize| (seed * 7 + i as i64 * 13) % (VOCAB - 1) + 1;
    TrainSample {
        prompt: (0..prompt).map(token).collect(),
        response: (prompt..prompt + response).map(token).collect(),
        behaviour_logprobs: vec![logprob; response],
        advantage,
    }
}

/// Four samples of different lengths with mixed advantages.
pub fn batch() -> Vec<TrainSample> {
    vec![
        sample(1, 3, 6, -3.9, 1.0),
        sample(2, 5, 2, -3.8, -0.5),
        sample(3, 2, 9, -3.7, 0.7),
        sample(4, 7, 4, -3.9, -1.2),
    ]
}

/// A trainer configuration for the tiny model: lr 1e-2, gradients clipped at `max_grad_norm`.
pub fn trainer_config(
    micro_batch_tokens: usize,
    aggregation: LossAggregation,
    max_grad_norm: f64,
) -> TrainerConfig {
    TrainerConfig {
        grpo: GrpoConfig {
            aggregation,
            ..GrpoConfig::default()
        },
        optimizer: AdamWConfig {
            lr: 1e-2,
            max_grad_norm: Some(max_grad_norm),
            ..AdamWConfig::default()
        },
        micro_batch_tokens,
        max_consecutive_bad_steps: 1,
    }
}
