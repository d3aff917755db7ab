//! Builders for the unit tests: a tiny random model and batches, and a hub over the
//! default prompts with members, weight blobs and scored groups.

use crate::data::{default_prompts, Dataset};
use crate::hub::leases::Ledger;
use crate::hub::{Accepted, Hub, JobInfo};
use crate::train::grpo::{GrpoConfig, LossAggregation, MemoryConfig};
use crate::train::precision::Precision;
use crate::train::sample::TrainSample;
use crate::{AdamWConfig, TrainerConfig};
use quill_config::job::JobConfig;
use quill_model::{default_model, ModelConfig, Qwen2, Tokenizer};
use quill_proto::blob::{ManifestEntry, WeightBlob};
use quill_proto::{
    PromptLease, RegisterRequest, Role, RolloutGroup, Sample, SampleScores, ScoredGroup,
};
use serde_json::json;
use std::sync::Arc;
use tch::{Device, Kind};
use tokio::sync::mpsc;

/// Vocabulary of the tiny model.
pub const VOCAB: i64 = 48;

/// A 2-layer model with 16-wide hidden states; `seed` draws its weights.
pub fn tiny_model(seed: u64) -> Qwen2 {
    tiny_model_on(seed, Device::Cpu)
}

/// [`tiny_model`] on `device`.
pub fn tiny_model_on(seed: u64, device: Device) -> Qwen2 {
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
    let mut model = Qwen2::new(config, device, Kind::Float).expect("model");
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
        memory: MemoryConfig::default(),
        precision: Precision::F32,
        max_consecutive_bad_steps: 1,
        sharding: crate::Sharding::None,
    }
}

/// A job for hub tests: groups of two, the default prompts, 1 KiB weight chunks.
pub fn hub_job() -> JobConfig {
    let mut job = JobConfig::default();
    job.sampling.group_size = 2;
    job.cluster.weight_chunk_bytes = 1024;
    job
}

/// A hub over the default prompts and tokenizer (the default model's vocabulary and
/// context), serving [`blob`] version 0, with the receiving end of its ingest queue.
pub fn hub(job: JobConfig) -> (Hub, mpsc::Receiver<Accepted>) {
    let tokenizer_json = default_model::tokenizer_json();
    let tokenizer = Tokenizer::from_json(&tokenizer_json).expect("the default tokenizer");
    let config = default_model::config_json();
    let info = JobInfo {
        job_json: "{}".into(),
        model_config_json: config.to_string(),
        tokenizer_json,
        vocab_size: config["vocab_size"].as_i64().expect("vocab_size"),
        context: config["max_position_embeddings"]
            .as_u64()
            .expect("max_position_embeddings") as usize,
    };
    let dataset = Dataset::new(default_prompts(), job.job.seed, false, 1);
    let (tx, rx) = mpsc::channel(job.cluster.ingest_queue);
    let hub = Hub::new(
        job,
        info,
        tokenizer,
        dataset,
        Ledger::default(),
        blob(0),
        tx,
    );
    (hub, rx)
}

/// Registers a member of `role` (reward workers at a loopback address) and returns its id.
pub fn register(hub: &Hub, role: Role) -> String {
    hub.register(RegisterRequest {
        role: role as i32,
        name: "test".into(),
        address: "127.0.0.1:1".into(),
        relay_address: String::new(),
    })
    .expect("registered")
    .member_id
}

/// A 64-byte weight blob of `version` (one 16-float tensor; serving does not re-check
/// the whole-blob CRC, receivers do).
pub fn blob(version: u64) -> Arc<WeightBlob> {
    Arc::new(WeightBlob {
        version,
        manifest: vec![ManifestEntry {
            name: "w".into(),
            dtype: "f32".into(),
            shape: vec![16],
            offset: 0,
            len: 64,
        }],
        crc32: 0,
        bytes: vec![version as u8; 64],
    })
}

/// A scored group of `n` samples answering `lease` that passes every ingest check.
pub fn scored_group(lease: &PromptLease, n: usize) -> ScoredGroup {
    let samples = (0..n)
        .map(|i| Sample {
            tokens: vec![5 + i as i64, 6],
            logprobs: vec![-0.5, -1.0],
            finish_reason: "stop".into(),
            ..Sample::default()
        })
        .collect();
    ScoredGroup {
        rollout: Some(RolloutGroup {
            lease_id: lease.lease_id,
            prompt_id: lease.prompt_id,
            question: lease.question.clone(),
            prompt_tokens: lease.prompt_tokens.clone(),
            length_lo: lease.length_lo,
            length_hi: lease.length_hi,
            samples,
            actor_id: "actor-1".into(),
            lease_key: lease.key,
            ..RolloutGroup::default()
        }),
        scores: vec![SampleScores::default(); n],
        advantages: (0..n).map(|i| i as f32 - 0.5).collect(),
        ..ScoredGroup::default()
    }
}
