//! The job file's sections (`[job]`, `[model]`, ... `[parallel]`): their fields, the
//! enums they use and every field's default (the LongWriter-Zero recipe).

use std::path::PathBuf;

use quill_reward::{AdvantageMode, FormatConfig};
use serde::{Deserialize, Serialize};

use crate::template::DEFAULT_STOP_STRINGS;

/// The largest allowed `cluster.relay_fanout`.
pub const MAX_RELAY_FANOUT: usize = 64;
/// The smallest allowed `cluster.weight_chunk_bytes`: 1 KiB.
pub const MIN_WEIGHT_CHUNK_BYTES: usize = 1024;

/// The largest allowed `cluster.weight_chunk_bytes`: 64 MiB.
pub const MAX_WEIGHT_CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// `[job]`: the job's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSection {
    /// The job's name (letters, digits, `-`, `_`, `.`); required.
    pub name: String,
    /// The folder checkpoints and metrics go to; default `runs`.
    pub output_dir: PathBuf,
    /// The seed of every random choice in the job; default 0.
    pub seed: u64,
    /// A file holding the job's shared token; without it the token comes from the
    /// `QUILL_TOKEN` environment variable (never from a command-line argument).
    pub token_file: Option<PathBuf>,
}

impl Default for JobSection {
    fn default() -> Self {
        JobSection {
            name: String::new(),
            output_dir: PathBuf::from("runs"),
            seed: 0,
            token_file: None,
        }
    }
}

/// `[model]`: the policy being trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// `default` for the embedded model, otherwise a Hugging Face model folder.
    pub path: String,
    /// `cpu`, `cuda` or `cuda:N`; default `cpu`.
    pub device: String,
    /// The dtype actors generate in: `f32` (default) or `bf16`. The learner always trains an
    /// f32 master copy.
    pub dtype: String,
    /// The frozen reference model of the KL term; `path` when absent.
    pub reference_path: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: "default".to_owned(),
            device: "cpu".to_owned(),
            dtype: "f32".to_owned(),
            reference_path: None,
        }
    }
}

/// `[data]`: the training prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// `default` for the embedded prompts, otherwise a JSONL file.
    pub path: String,
    /// The field of a record holding the question, rendered with the template.
    pub question_field: String,
    /// The field of a record holding a ready-made prompt, used as it is.
    pub prompt_field: String,
    /// The field holding a target word count (an integer, as in Arena-Write).
    pub length_field: String,
    /// The field holding a target word range, a `[lo, hi]` pair.
    pub range_field: String,
    /// Whether prompts are shuffled (with `job.seed`) each epoch.
    pub shuffle: bool,
    /// How many passes over the prompts; 0 for no limit.
    pub epochs: u32,
    /// `[data.range_predictor]`: predict a range for prompts that neither give nor state
    /// one (optional; without it such prompts are an error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range_predictor: Option<RangePredictorSection>,
}

/// `[data.range_predictor]`: a model behind an OpenAI-compatible endpoint that predicts a
/// prompt's word range; its answer is checked with the recipe's rules and `[0, 0]` (no
/// sensible range) leaves the prompt out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RangePredictorSection {
    /// Base URL, `http://host:port` (`/v1/chat/completions` is added).
    pub url: String,
    /// The `model` field of each request.
    pub model: String,
    /// A text file holding the prompt, with `{question}` exactly once (empty: built-in).
    pub template: String,
    /// Seconds each request may take.
    pub timeout_s: f64,
    /// Further tries after a failed request or an invalid reply.
    pub retries: u32,
    /// An environment variable holding the API key (empty: none).
    pub api_key_env: String,
}

impl Default for RangePredictorSection {
    fn default() -> Self {
        RangePredictorSection {
            url: String::new(),
            model: "default".to_owned(),
            template: String::new(),
            timeout_s: 60.0,
            retries: 3,
            api_key_env: String::new(),
        }
    }
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            path: "default".to_owned(),
            question_field: "question".to_owned(),
            prompt_field: "prompt".to_owned(),
            length_field: "length".to_owned(),
            range_field: "length_range".to_owned(),
            shuffle: true,
            epochs: 0,
            range_predictor: None,
        }
    }
}

/// `[sampling]`: how actors sample responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingSection {
    /// Samples per prompt (GRPO's G), at least 2; the recipe's 32.
    pub group_size: usize,
    /// Sampling temperature, above 0; the recipe's 0.8.
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; the recipe's 1.0 (off).
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 (the recipe) for off.
    pub top_k: usize,
    /// The most tokens a response may have; the recipe's 14,000.
    pub max_new_tokens: usize,
    /// Strings that end a response; the recipe's by default.
    pub stop: Vec<String>,
}

impl Default for SamplingSection {
    fn default() -> Self {
        SamplingSection {
            group_size: 32,
            temperature: 0.8,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 14_000,
            stop: DEFAULT_STOP_STRINGS.map(str::to_owned).to_vec(),
        }
    }
}

/// `[rewards]`: the reward signals and how they combine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardsSection {
    /// Weight of the length reward; at least 0.
    pub length_weight: f64,
    /// Weight of the format reward; at least 0.
    pub format_weight: f64,
    /// Weight of the quality reward; at least 0, ignored without `quality_model`.
    pub quality_weight: f64,
    /// How the signals combine; the recipe averages their advantages.
    pub combine: AdvantageMode,
    /// The length reward's L_max: above the target range it decays linearly to 0 at
    /// this many words.
    pub l_max: u32,
    /// A `Qwen2ForSequenceClassification` folder scoring quality; absent, the quality
    /// reward is off.
    pub quality_model: Option<String>,
    /// Responses the quality model scores in one batch.
    pub quality_batch_size: usize,
    /// An LLM judge on an OpenAI-compatible endpoint as the quality reward
    /// (`[rewards.judge]`; instead of `quality_model`).
    pub judge: Option<super::JudgeSection>,
    /// The format reward's repetition penalties (`[rewards.format]`).
    pub format: FormatConfig,
}

impl RewardsSection {
    /// Whether a quality reward exists (a reward model or a judge).
    pub fn has_quality(&self) -> bool {
        self.quality_model.is_some() || self.judge.is_some()
    }
}

impl Default for RewardsSection {
    fn default() -> Self {
        RewardsSection {
            length_weight: 1.0,
            format_weight: 1.0,
            quality_weight: 1.0,
            combine: AdvantageMode::default(),
            l_max: 12_000,
            quality_model: None,
            quality_batch_size: 8,
            judge: None,
            format: FormatConfig::default(),
        }
    }
}

/// How the per-token GRPO loss is averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Mean over all tokens of the batch: long responses weigh more.
    #[default]
    TokenMean,
    /// Mean over each response's tokens, then over responses.
    SequenceMean,
}

/// Which estimator of KL(π‖π_ref) the KL term uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `log r` with `r = π/π_ref`: unbiased, high variance.
    K1,
    /// `(log r)² / 2`.
    K2,
    /// `1/r − 1 + log r`: unbiased and never negative.
    #[default]
    K3,
}

/// The dtype of the learner's forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Weights, activations and gradients in f32.
    #[default]
    F32,
    /// Mixed precision: a bf16 copy of the weights runs the passes (bf16 activations and
    /// gradients), gradients are accumulated into f32, and AdamW updates f32 master
    /// weights; log-softmax and loss stay in f32.
    Bf16,
}

/// `[grpo]`: the objective and the training schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoSection {
    /// Prompt groups per optimiser step, at least 1.
    pub prompts_per_step: usize,
    /// The ratio's lower clip: `1 − eps_low`; in [0, 1).
    pub eps_low: f64,
    /// The ratio's upper clip: `1 + eps_high`; at least 0.
    pub eps_high: f64,
    /// How token losses are averaged.
    pub loss_aggregation: LossAggregation,
    /// The KL term's coefficient β; 0 (the recipe) for no KL term.
    pub kl_coef: f64,
    /// The KL estimator.
    pub kl_estimator: KlEstimator,
    /// Truncated importance sampling: the cap of the ratio between the trainer's and
    /// the sampler's probabilities; at least 1, absent for off.
    pub tis_cap: Option<f64>,
    /// The most policy versions a sample may lag behind the trained policy.
    pub max_staleness: u64,
    /// Whether groups whose advantages are all 0 are dropped.
    pub drop_zero_advantage_groups: bool,
    /// Optimiser steps in the job, at least 1; the recipe's 150.
    pub steps: u64,
    /// Tokens in one forward/backward micro-batch, at least 1.
    pub micro_batch_tokens: usize,
    /// Response tokens whose logits (`[tokens, vocab]`) the learner forms at once when
    /// it computes log-probs, at least 1.
    pub logprob_chunk_tokens: usize,
    /// Whether the learner recomputes each decoder layer in the backward pass instead
    /// of keeping its activations (less memory, about one more forward pass of time).
    pub activation_checkpointing: bool,
    /// How a learner of several ranks spreads its training state (ZeRO stages):
    /// `none`, `zero1` (f32 master weights and AdamW moments sharded), `zero2` (also the
    /// gradients between steps), `zero3` (also the decoder layers' weights, gathered one
    /// layer at a time; the passes run layer by layer with activation checkpointing).
    pub sharding: Sharding,
    /// `f32` (default) or `bf16` mixed precision for the learner's passes.
    pub precision: Precision,
    /// Whether micro-batches are packed: samples laid end to end in one row without
    /// padding (positions restart and attention stays within each sample; a group's
    /// samples share one copy of their prompt), filled up to
    /// `micro_batch_tokens` real tokens. Off: rows are right-padded and
    /// `micro_batch_tokens` bounds rows × longest row.
    pub packing: bool,
}

/// `grpo.sharding`: which part of the learner's training state each rank keeps only a
/// 1/K share of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Every rank holds everything.
    #[default]
    None,
    /// f32 master weights and AdamW moments sharded.
    Zero1,
    /// Also the gradients.
    Zero2,
    /// Also the decoder layers' weights, gathered layer by layer as the passes need them.
    Zero3,
}

impl Default for GrpoSection {
    fn default() -> Self {
        GrpoSection {
            prompts_per_step: 32,
            eps_low: 0.2,
            eps_high: 0.2,
            loss_aggregation: LossAggregation::default(),
            kl_coef: 0.0,
            kl_estimator: KlEstimator::default(),
            tis_cap: None,
            max_staleness: 1,
            drop_zero_advantage_groups: true,
            steps: 150,
            micro_batch_tokens: 8192,
            logprob_chunk_tokens: 1024,
            activation_checkpointing: false,
            sharding: Sharding::None,
            precision: Precision::default(),
            packing: true,
        }
    }
}

/// The learning rate's course after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout.
    #[default]
    Constant,
    /// A cosine from `lr` down to `min_lr` at the last step.
    Cosine,
}

/// `[optimizer]`: AdamW and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSection {
    /// The peak learning rate, above 0.
    pub lr: f64,
    /// AdamW's β1 and β2, each in [0, 1).
    #[serde(deserialize_with = "two_numbers")]
    pub betas: [f64; 2],
    /// AdamW's ε, above 0.
    pub eps: f64,
    /// Decoupled weight decay, at least 0.
    pub weight_decay: f64,
    /// Steps of linear warm-up from 0 to `lr`; at most `grpo.steps`.
    pub warmup_steps: u64,
    /// The schedule after warm-up.
    pub schedule: LrSchedule,
    /// The cosine schedule's final learning rate; in [0, lr].
    pub min_lr: f64,
    /// The global gradient norm is clipped to this; 0 for no clipping.
    pub max_grad_norm: f64,
    /// Consecutive steps with a NaN or infinite loss or gradient (each skipped) after
    /// which the job stops.
    pub max_consecutive_bad_steps: u32,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        OptimizerSection {
            lr: 1e-6,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
            warmup_steps: 0,
            schedule: LrSchedule::default(),
            min_lr: 0.0,
            max_grad_norm: 1.0,
            max_consecutive_bad_steps: 3,
        }
    }
}

/// `[checkpoint]`: saved checkpoints and published weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSection {
    /// A checkpoint every this many steps; 0 for only one at the end.
    pub every_steps: u64,
    /// How many of the latest checkpoints are kept, at least 1.
    pub keep: usize,
    /// The dtype of weights broadcast to actors: `f32` or `bf16`. (Checkpoints always hold
    /// the learner's f32 master weights, so that a resumed job continues exactly.)
    pub publish_dtype: String,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every_steps: 50,
            keep: 3,
            publish_dtype: "bf16".to_owned(),
        }
    }
}

/// `[cluster]`: addresses, process counts, queues and timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// The learner's gRPC address, `ip:port`.
    pub learner_addr: String,
    /// The reward workers' addresses, `ip:port` each; `quill launch local` fills them.
    pub reward_addrs: Vec<String>,
    /// Actors `quill launch local` starts, at least 1.
    pub actors: usize,
    /// Reward workers `quill launch local` starts, at least 1.
    pub reward_workers: usize,
    /// Sequences an actor's engine decodes at once, at least 1.
    pub actor_batch: usize,
    /// Prompt groups each actor may hold leases on at once, at least 1.
    pub leases_per_actor: usize,
    /// Seconds before an unreturned lease is issued again, at least 1.
    pub lease_seconds: u64,
    /// Seconds a lease may last however often its holder renews it, at least
    /// `lease_seconds`: a generation must end within it.
    pub max_lease_seconds: u64,
    /// Scored groups the learner buffers, at least 1.
    pub ingest_queue: usize,
    /// Bytes per message of the weight stream, 1 KiB to 64 MiB.
    pub weight_chunk_bytes: usize,
    /// Children per node of the weight relay tree (the learner included), at most
    /// [`MAX_RELAY_FANOUT`]; 0 disables relaying (every actor fetches from the learner).
    pub relay_fanout: usize,
    /// Seconds between heartbeats, above 0.
    pub heartbeat_seconds: f64,
    /// Seconds before an RPC fails, above 0.
    pub rpc_timeout_seconds: f64,
    /// Seconds a connection to any quill server may stay silent before it is closed,
    /// above 0 (servers ping their clients every quarter of it, so only dead or idle
    /// sockets are closed).
    pub idle_connection_seconds: f64,
    /// Let processes talk in plaintext across non-loopback addresses (default false: a
    /// job whose addresses are not all loopback must set `cluster.tls`).
    pub allow_plaintext: bool,
    /// `[cluster.tls]`: mutual TLS with the job's own CA on every gRPC endpoint and the
    /// learner ring (`quill certs` makes the files); absent: plaintext.
    pub tls: Option<TlsSection>,
}

/// `[cluster.tls]`: the PEM files of the job CA and of this host's certificate and key
/// (members and learner ranks on other hosts give theirs with `--tls-cert`/`--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// The job CA's certificate.
    pub ca_cert: PathBuf,
    /// This host's certificate, issued by the job CA.
    pub cert: PathBuf,
    /// This host's private key.
    pub key: PathBuf,
}

impl ClusterSection {
    /// [`ClusterSection::idle_connection_seconds`] as a duration.
    pub fn idle_connection(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.idle_connection_seconds)
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            learner_addr: "127.0.0.1:50051".to_owned(),
            reward_addrs: Vec::new(),
            actors: 1,
            reward_workers: 1,
            actor_batch: 32,
            leases_per_actor: 2,
            lease_seconds: 600,
            max_lease_seconds: 3600,
            ingest_queue: 64,
            weight_chunk_bytes: 4 * 1024 * 1024,
            relay_fanout: 2,
            heartbeat_seconds: 2.0,
            rpc_timeout_seconds: 30.0,
            idle_connection_seconds: 120.0,
            allow_plaintext: false,
            tls: None,
        }
    }
}

/// Which collective backend the learner ranks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveKind {
    /// NCCL when the model trains on CUDA, else the TCP ring.
    #[default]
    Auto,
    /// Ring all-reduce over TCP (CPU tensors).
    Ring,
    /// NCCL (CUDA tensors).
    Nccl,
}

/// `[parallel]`: data parallelism over learner ranks (`quill learner --rank R --world-size K`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelSection {
    /// The collective backend; default `auto`.
    pub collective: CollectiveKind,
    /// Seconds any collective (and joining the group) may wait for another rank, above 0.
    pub timeout_seconds: f64,
    /// Compare the ranks' weight checksums every this many steps (0: never); default 10.
    pub check_every_steps: u64,
    /// Megabytes of gradient per all-reduce bucket, above 0.
    pub bucket_mb: f64,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection {
            collective: CollectiveKind::Auto,
            timeout_seconds: 300.0,
            check_every_steps: 10,
            bucket_mb: 32.0,
        }
    }
}

impl ParallelSection {
    /// `timeout_seconds` as a duration.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.timeout_seconds)
    }

    /// `bucket_mb` in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * 1024.0 * 1024.0) as usize
    }
}

/// `[metrics]`: where metrics go and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// The JSON-lines metrics file; a relative path is under `job.output_dir`.
    pub jsonl: PathBuf,
    /// Seconds between progress lines in the log, above 0.
    pub log_every_seconds: f64,
    /// Where the learner serves Prometheus `GET /metrics` (`HOST:PORT`, port 0 picks a
    /// free port); absent for none.
    pub prometheus_addr: Option<String>,
    /// Where actors and reward workers serve their own `GET /metrics`; absent for none.
    /// Use port 0 when several members share a host (each logs its bound address).
    pub member_prometheus_addr: Option<String>,
    /// Whether scrapes of every `/metrics` endpoint must carry the job token
    /// (`Authorization: Bearer <token>`); absent: only endpoints bound to an address other
    /// than loopback require it.
    pub require_token: Option<bool>,
    /// The learner device's peak FLOP/s in TFLOP/s, for MFU; absent to look the GPU up
    /// in quill's table (unknown on CPU).
    pub peak_tflops: Option<f64>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            jsonl: PathBuf::from("metrics.jsonl"),
            log_every_seconds: 5.0,
            prometheus_addr: None,
            member_prometheus_addr: None,
            require_token: None,
            peak_tflops: None,
        }
    }
}

/// Reads an array of exactly two numbers (serde's own `[f64; 2]` lets TOML add more).
fn two_numbers<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<[f64; 2], D::Error> {
    let numbers = Vec::<f64>::deserialize(deserializer)?;
    <[f64; 2]>::try_from(numbers).map_err(|numbers| {
        serde::de::Error::invalid_length(numbers.len(), &"an array of 2 numbers")
    })
}
