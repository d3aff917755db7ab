//! The job file: one TOML file that describes a whole RL job.
//!
//! Every section and field has a default; the defaults reproduce the LongWriter-Zero
//! recipe (see `docs/ARCHITECTURE.md`), except `job.name`, which every job file must
//! set. `configs/longwriter-zero.toml` and `configs/default.toml` are commented
//! examples of every field. [`JobConfig::from_file`] parses and validates a file;
//! every error names the file and the field, as in
//! `job.toml: grpo.eps_low: must be in [0, 1), got 1.5`. Unknown keys are rejected,
//! and TOML syntax errors give the line and column.

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use quill_reward::{AdvantageMode, FormatConfig, RewardError};
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::template::{PromptTemplate, DEFAULT_STOP_STRINGS, QUESTION_SLOT};

/// The largest allowed `cluster.relay_fanout`.
pub const MAX_RELAY_FANOUT: usize = 64;
/// The smallest allowed `cluster.weight_chunk_bytes`: 1 KiB.
pub const MIN_WEIGHT_CHUNK_BYTES: usize = 1024;

/// The largest allowed `cluster.weight_chunk_bytes`: 64 MiB.
pub const MAX_WEIGHT_CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// The origin [`JobConfig::validate`] names in its errors.
const VALIDATE_ORIGIN: &str = "job config";

/// A whole RL job, as one TOML file describes it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// The job's identity, output folder, seed and token.
    pub job: JobSection,
    /// The policy being trained.
    pub model: ModelSection,
    /// The training prompts.
    pub data: DataSection,
    /// The prompt template (`[template]`, optional; the recipe's by default).
    pub template: PromptTemplate,
    /// How actors sample responses.
    pub sampling: SamplingSection,
    /// The reward signals and how they combine.
    pub rewards: RewardsSection,
    /// The GRPO objective and the training schedule.
    pub grpo: GrpoSection,
    /// AdamW and the learning-rate schedule.
    pub optimizer: OptimizerSection,
    /// Saved checkpoints and published weights.
    pub checkpoint: CheckpointSection,
    /// Addresses, process counts, queues and timeouts.
    pub cluster: ClusterSection,
    /// Where metrics go and how often.
    pub metrics: MetricsSection,
    /// How learner ranks train together (data parallelism).
    pub parallel: ParallelSection,
}

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
    /// The format reward's repetition penalties (`[rewards.format]`).
    pub format: FormatConfig,
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
            ingest_queue: 64,
            weight_chunk_bytes: 4 * 1024 * 1024,
            relay_fanout: 2,
            heartbeat_seconds: 2.0,
            rpc_timeout_seconds: 30.0,
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

    fn check(&self) -> Check {
        positive("parallel.timeout_seconds", self.timeout_seconds)?;
        positive("parallel.bucket_mb", self.bucket_mb)
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

/// A job file that cannot be read, parsed or used.
#[derive(Debug, thiserror::Error)]
pub enum JobConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{origin}: {message}")]
    Parse {
        /// The file (or other source) of the text.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field is unknown, of the wrong type, or out of its domain.
    #[error("{origin}: {field}: {reason}")]
    Invalid {
        /// The file (or other source) of the text.
        origin: String,
        /// The field's dotted path, such as `grpo.eps_low` or `cluster.reward_addrs[1]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl JobConfig {
    /// Reads, parses and validates the job file at `path`; errors name the path.
    pub fn from_file(path: &Path) -> Result<Self, JobConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates a job file's text; errors name `origin` (the file's name).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, JobConfigError> {
        let root = DeTable::parse(text).map_err(|e| JobConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let config: JobConfig = toml::from_str(text).map_err(|e| {
            let located = e.span().and_then(|span| {
                let mut path = String::new();
                find_in_table(root.get_ref(), &span, &mut path).then_some((path, span))
            });
            match located {
                Some((field, span)) => {
                    let (line, column) = line_and_column(text, span.start);
                    JobConfigError::Invalid {
                        origin: origin.to_owned(),
                        field,
                        reason: format!("{} (line {line}, column {column})", e.message()),
                    }
                }
                None => JobConfigError::Parse {
                    origin: origin.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                },
            }
        })?;
        config.check().map_err(|problem| problem.at(origin))?;
        Ok(config)
    }

    /// Checks every field's domain and the constraints between fields; errors name the
    /// field, with `job config` as their origin.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        self.check().map_err(|problem| problem.at(VALIDATE_ORIGIN))
    }

    fn check(&self) -> Check {
        self.job.check()?;
        self.model.check()?;
        self.data.check()?;
        check_template(&self.template)?;
        self.sampling.check()?;
        self.rewards.check()?;
        self.grpo.check()?;
        self.optimizer.check(&self.grpo)?;
        self.checkpoint.check()?;
        self.cluster.check()?;
        self.parallel.check()?;
        self.metrics.check()
    }
}

/// A field that fails validation.
struct Problem {
    field: String,
    reason: String,
}

impl Problem {
    fn at(self, origin: &str) -> JobConfigError {
        JobConfigError::Invalid {
            origin: origin.to_owned(),
            field: self.field,
            reason: self.reason,
        }
    }
}

/// The result of checking fields.
type Check = Result<(), Problem>;

/// An error for `field` unless `ok`.
fn ensure(ok: bool, field: &str, reason: impl FnOnce() -> String) -> Check {
    if ok {
        Ok(())
    } else {
        Err(Problem {
            field: field.to_owned(),
            reason: reason(),
        })
    }
}

fn non_empty(field: &str, value: &str) -> Check {
    ensure(!value.trim().is_empty(), field, || {
        "must not be empty".to_owned()
    })
}

fn non_empty_path(field: &str, value: &Path) -> Check {
    ensure(!value.as_os_str().is_empty(), field, || {
        "must not be empty".to_owned()
    })
}

fn at_least<T: PartialOrd + Display>(field: &str, value: T, min: T) -> Check {
    ensure(value >= min, field, || {
        format!("must be at least {min}, got {value}")
    })
}

fn positive(field: &str, value: f64) -> Check {
    ensure(value.is_finite() && value > 0.0, field, || {
        format!("must be a finite number above 0, got {value}")
    })
}

fn non_negative(field: &str, value: f64) -> Check {
    ensure(value.is_finite() && value >= 0.0, field, || {
        format!("must be a finite number of at least 0, got {value}")
    })
}

/// An error unless `0 <= value < 1`.
fn unit_half_open(field: &str, value: f64) -> Check {
    ensure((0.0..1.0).contains(&value), field, || {
        format!("must be in [0, 1), got {value}")
    })
}

fn dtype(field: &str, value: &str) -> Check {
    ensure(matches!(value, "f32" | "bf16"), field, || {
        format!("must be \"f32\" or \"bf16\", got {value:?}")
    })
}

fn socket_addr(field: &str, value: &str) -> Check {
    ensure(value.parse::<SocketAddr>().is_ok(), field, || {
        format!("must be an address like \"127.0.0.1:50051\" (ip:port), got {value:?}")
    })
}

fn check_template(template: &PromptTemplate) -> Check {
    template.validate().map_err(|e| Problem {
        field: format!("template.{}", e.field),
        reason: format!(
            "must contain {QUESTION_SLOT} exactly once, found {}",
            e.count
        ),
    })
}

impl JobSection {
    fn check(&self) -> Check {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        ensure(name_ok, "job.name", || {
            format!(
                "must be a non-empty name of letters, digits, '-', '_' and '.', got {:?}",
                self.name
            )
        })?;
        non_empty_path("job.output_dir", &self.output_dir)?;
        match &self.token_file {
            Some(path) => non_empty_path("job.token_file", path),
            None => Ok(()),
        }
    }
}

impl ModelSection {
    fn check(&self) -> Check {
        non_empty("model.path", &self.path)?;
        let device_ok = match self.device.as_str() {
            "cpu" | "cuda" => true,
            other => other
                .strip_prefix("cuda:")
                .is_some_and(|index| index.parse::<usize>().is_ok()),
        };
        ensure(device_ok, "model.device", || {
            format!(
                "must be \"cpu\", \"cuda\" or \"cuda:N\", got {:?}",
                self.device
            )
        })?;
        dtype("model.dtype", &self.dtype)?;
        match &self.reference_path {
            Some(path) => non_empty("model.reference_path", path),
            None => Ok(()),
        }
    }
}

impl DataSection {
    fn check(&self) -> Check {
        non_empty("data.path", &self.path)?;
        non_empty("data.question_field", &self.question_field)?;
        non_empty("data.prompt_field", &self.prompt_field)?;
        non_empty("data.length_field", &self.length_field)?;
        non_empty("data.range_field", &self.range_field)
    }
}

impl SamplingSection {
    fn check(&self) -> Check {
        at_least("sampling.group_size", self.group_size, 2)?;
        positive("sampling.temperature", self.temperature)?;
        ensure(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "sampling.top_p",
            || format!("must be in (0, 1], got {}", self.top_p),
        )?;
        at_least("sampling.max_new_tokens", self.max_new_tokens, 1)?;
        for (index, stop) in self.stop.iter().enumerate() {
            ensure(!stop.is_empty(), &format!("sampling.stop[{index}]"), || {
                "must not be empty".to_owned()
            })?;
        }
        Ok(())
    }
}

impl RewardsSection {
    fn check(&self) -> Check {
        non_negative("rewards.length_weight", self.length_weight)?;
        non_negative("rewards.format_weight", self.format_weight)?;
        non_negative("rewards.quality_weight", self.quality_weight)?;
        let quality_on = self.quality_model.is_some();
        ensure(
            self.length_weight > 0.0
                || self.format_weight > 0.0
                || (quality_on && self.quality_weight > 0.0),
            "rewards",
            || {
                let quality = if quality_on {
                    format!("quality_weight = {}", self.quality_weight)
                } else {
                    "quality off (no quality_model)".to_owned()
                };
                format!(
                    "no reward signal is on with a positive weight (length_weight = {}, \
                     format_weight = {}, {quality}); at least one must be",
                    self.length_weight, self.format_weight
                )
            },
        )?;
        at_least("rewards.l_max", self.l_max, 1)?;
        if let Some(path) = &self.quality_model {
            non_empty("rewards.quality_model", path)?;
        }
        at_least("rewards.quality_batch_size", self.quality_batch_size, 1)?;
        self.format.validate().map_err(|e| match e {
            RewardError::InvalidFormatConfig {
                field,
                value,
                problem,
            } => Problem {
                field: format!("rewards.format.{field}"),
                reason: format!("{problem}, got {value}"),
            },
            other => Problem {
                field: "rewards.format".to_owned(),
                reason: other.to_string(),
            },
        })
    }
}

impl GrpoSection {
    fn check(&self) -> Check {
        at_least("grpo.prompts_per_step", self.prompts_per_step, 1)?;
        unit_half_open("grpo.eps_low", self.eps_low)?;
        non_negative("grpo.eps_high", self.eps_high)?;
        non_negative("grpo.kl_coef", self.kl_coef)?;
        if let Some(cap) = self.tis_cap {
            ensure(cap.is_finite() && cap >= 1.0, "grpo.tis_cap", || {
                format!("must be a finite number of at least 1, got {cap}")
            })?;
        }
        at_least("grpo.steps", self.steps, 1)?;
        at_least("grpo.micro_batch_tokens", self.micro_batch_tokens, 1)
    }
}

impl OptimizerSection {
    fn check(&self, grpo: &GrpoSection) -> Check {
        positive("optimizer.lr", self.lr)?;
        unit_half_open("optimizer.betas[0]", self.betas[0])?;
        unit_half_open("optimizer.betas[1]", self.betas[1])?;
        positive("optimizer.eps", self.eps)?;
        non_negative("optimizer.weight_decay", self.weight_decay)?;
        ensure(
            self.warmup_steps <= grpo.steps,
            "optimizer.warmup_steps",
            || {
                format!(
                    "must be at most grpo.steps ({}), got {}",
                    grpo.steps, self.warmup_steps
                )
            },
        )?;
        ensure(
            self.min_lr.is_finite() && (0.0..=self.lr).contains(&self.min_lr),
            "optimizer.min_lr",
            || format!("must be in [0, lr = {}], got {}", self.lr, self.min_lr),
        )?;
        non_negative("optimizer.max_grad_norm", self.max_grad_norm)
    }
}

impl CheckpointSection {
    fn check(&self) -> Check {
        at_least("checkpoint.keep", self.keep, 1)?;
        dtype("checkpoint.publish_dtype", &self.publish_dtype)
    }
}

impl ClusterSection {
    fn check(&self) -> Check {
        socket_addr("cluster.learner_addr", &self.learner_addr)?;
        for (index, addr) in self.reward_addrs.iter().enumerate() {
            socket_addr(&format!("cluster.reward_addrs[{index}]"), addr)?;
        }
        at_least("cluster.actors", self.actors, 1)?;
        at_least("cluster.reward_workers", self.reward_workers, 1)?;
        at_least("cluster.actor_batch", self.actor_batch, 1)?;
        at_least("cluster.leases_per_actor", self.leases_per_actor, 1)?;
        at_least("cluster.lease_seconds", self.lease_seconds, 1)?;
        at_least("cluster.ingest_queue", self.ingest_queue, 1)?;
        ensure(
            (MIN_WEIGHT_CHUNK_BYTES..=MAX_WEIGHT_CHUNK_BYTES).contains(&self.weight_chunk_bytes),
            "cluster.weight_chunk_bytes",
            || {
                format!(
                    "must be in [{MIN_WEIGHT_CHUNK_BYTES}, {MAX_WEIGHT_CHUNK_BYTES}] \
                     (1 KiB to 64 MiB), got {}",
                    self.weight_chunk_bytes
                )
            },
        )?;
        ensure(
            self.relay_fanout <= MAX_RELAY_FANOUT,
            "cluster.relay_fanout",
            || {
                format!(
                    "must be at most {MAX_RELAY_FANOUT} (0 disables relaying), got {}",
                    self.relay_fanout
                )
            },
        )?;
        positive("cluster.heartbeat_seconds", self.heartbeat_seconds)?;
        positive("cluster.rpc_timeout_seconds", self.rpc_timeout_seconds)
    }
}

impl MetricsSection {
    fn check(&self) -> Check {
        non_empty_path("metrics.jsonl", &self.jsonl)?;
        positive("metrics.log_every_seconds", self.log_every_seconds)?;
        if let Some(addr) = &self.prometheus_addr {
            socket_addr("metrics.prometheus_addr", addr)?;
        }
        if let Some(addr) = &self.member_prometheus_addr {
            socket_addr("metrics.member_prometheus_addr", addr)?;
        }
        match self.peak_tflops {
            Some(peak) => ensure(
                peak.is_finite() && peak > 0.0,
                "metrics.peak_tflops",
                || format!("must be a finite number above 0, got {peak}"),
            ),
            None => Ok(()),
        }
    }
}

/// Finds the key or value at `span` under `table`, appending its dotted path to
/// `path`; the deepest match wins.
fn find_in_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut String) -> bool {
    for (key, value) in table {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if find_in_value(value, span, path) || key.span() == *span || value.span() == *span {
            return true;
        }
        path.truncate(len);
    }
    false
}

/// [`find_in_table`] inside a value's tables and arrays.
fn find_in_value(value: &Spanned<DeValue<'_>>, span: &Range<usize>, path: &mut String) -> bool {
    match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, span, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(index, item)| {
            let len = path.len();
            path.push_str(&format!("[{index}]"));
            let found = find_in_value(item, span, path) || item.span() == *span;
            if !found {
                path.truncate(len);
            }
            found
        }),
        _ => false,
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/longwriter-zero.toml"
    ));
    const LOCAL: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/default.toml"
    ));

    /// The (field, reason) of an `Invalid` error, failing the test on any other result.
    fn invalid(text: &str) -> (String, String) {
        match JobConfig::from_toml_str(text, "job.toml") {
            Err(JobConfigError::Invalid {
                origin,
                field,
                reason,
            }) => {
                assert_eq!(origin, "job.toml");
                (field, reason)
            }
            other => panic!("expected an Invalid error for {text:?}, got {other:?}"),
        }
    }

    /// A minimal job file with `extra` appended.
    fn job(extra: &str) -> String {
        format!("[job]\nname = \"x\"\n{extra}")
    }

    #[test]
    fn the_recipe_example_parses_and_validates() {
        let config = JobConfig::from_toml_str(RECIPE, "longwriter-zero.toml").unwrap();
        assert_eq!(config.job.name, "longwriter-zero");
        assert_eq!(config.model.path, "/models/Qwen2.5-32B-base");
        assert_eq!(config.model.device, "cuda");
        assert_eq!(config.model.dtype, "bf16");
        assert_eq!(config.sampling.group_size, 32);
        assert_eq!(config.sampling.temperature, 0.8);
        assert_eq!(config.sampling.top_p, 1.0);
        assert_eq!(config.sampling.max_new_tokens, 14_000);
        assert_eq!(config.sampling.stop, DEFAULT_STOP_STRINGS);
        assert_eq!(config.grpo.eps_low, 0.2);
        assert_eq!(config.grpo.eps_high, 0.2);
        assert_eq!(config.grpo.kl_coef, 0.0);
        assert_eq!(config.grpo.steps, 150);
        assert_eq!(config.rewards.combine, AdvantageMode::AdvantageAverage);
        assert_eq!(config.rewards.l_max, 12_000);
        assert!(config.rewards.quality_model.is_some());
        assert_eq!(config.template, PromptTemplate::default());
        // The recipe file spells out the defaults, apart from what names the job and
        // its machines.
        let defaults = JobConfig::default();
        assert_eq!(config.sampling, defaults.sampling);
        assert_eq!(config.grpo, defaults.grpo);
        assert_eq!(config.optimizer, defaults.optimizer);
        assert_eq!(config.checkpoint, defaults.checkpoint);
        assert_eq!(config.rewards.format, defaults.rewards.format);
    }

    #[test]
    fn the_local_example_parses_and_validates() {
        let config = JobConfig::from_toml_str(LOCAL, "default.toml").unwrap();
        assert_eq!(config.job.name, "default");
        assert_eq!(config.job.output_dir, PathBuf::from("runs/default"));
        assert_eq!(config.model.path, "default");
        assert_eq!(config.model.device, "cpu");
        assert_eq!(config.data.path, "default");
        assert_eq!(config.sampling.group_size, 8);
        assert_eq!(config.sampling.max_new_tokens, 160);
        assert_eq!(config.grpo.prompts_per_step, 4);
        assert_eq!(config.grpo.steps, 60);
        assert_eq!(config.optimizer.lr, 1e-3);
        assert_eq!(config.optimizer.warmup_steps, 0);
        assert_eq!(config.rewards.l_max, 400);
        assert_eq!(config.rewards.quality_model, None);
        assert_eq!(config.cluster.actors, 1);
        assert_eq!(config.cluster.reward_workers, 1);
        assert_eq!(config.cluster.actor_batch, 16);
        assert_eq!(config.checkpoint.every_steps, 20);
        assert_eq!(config.cluster.learner_addr, "127.0.0.1:50051");
        assert_eq!(config.template.response_prefix, " <think> </think><answer>");
    }

    #[test]
    fn the_example_files_load_from_disk() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/default.toml"
        ));
        let config = JobConfig::from_file(path).unwrap();
        assert_eq!(config.sampling.group_size, 8);
        let missing = Path::new("/nonexistent/quill/job.toml");
        let err = JobConfig::from_file(missing).unwrap_err();
        assert!(matches!(err, JobConfigError::Io { ref path, .. } if path == missing));
        assert!(
            err.to_string().starts_with("/nonexistent/quill/job.toml: "),
            "{err}"
        );
    }

    #[test]
    fn a_minimal_file_gets_the_recipe_defaults() {
        let config = JobConfig::from_toml_str("[job]\nname = \"x\"", "job.toml").unwrap();
        let want = JobConfig {
            job: JobSection {
                name: "x".to_owned(),
                ..JobSection::default()
            },
            ..JobConfig::default()
        };
        assert_eq!(config, want);
        assert_eq!(config.job.output_dir, PathBuf::from("runs"));
        assert_eq!(config.job.token_file, None);
        assert_eq!(config.model.path, "default");
        assert_eq!(config.data.question_field, "question");
        assert_eq!(config.data.range_field, "length_range");
        assert!(config.data.shuffle);
        assert_eq!(config.data.epochs, 0);
        assert_eq!(config.sampling.group_size, 32);
        assert_eq!(config.sampling.temperature, 0.8);
        assert_eq!(config.sampling.top_p, 1.0);
        assert_eq!(config.sampling.top_k, 0);
        assert_eq!(config.sampling.max_new_tokens, 14_000);
        assert_eq!(
            config.sampling.stop,
            ["<|user|>", "<|endoftext|>", "</answer>"]
        );
        assert_eq!(
            (
                config.rewards.length_weight,
                config.rewards.format_weight,
                config.rewards.quality_weight
            ),
            (1.0, 1.0, 1.0)
        );
        assert_eq!(config.rewards.combine, AdvantageMode::AdvantageAverage);
        assert_eq!(config.rewards.l_max, 12_000);
        assert_eq!(config.rewards.quality_batch_size, 8);
        assert_eq!(config.rewards.format, FormatConfig::default());
        assert_eq!(config.grpo.eps_low, 0.2);
        assert_eq!(config.grpo.eps_high, 0.2);
        assert_eq!(config.grpo.loss_aggregation, LossAggregation::TokenMean);
        assert_eq!(config.grpo.kl_coef, 0.0);
        assert_eq!(config.grpo.kl_estimator, KlEstimator::K3);
        assert_eq!(config.grpo.tis_cap, None);
        assert_eq!(config.grpo.max_staleness, 1);
        assert!(config.grpo.drop_zero_advantage_groups);
        assert_eq!(config.grpo.steps, 150);
        assert_eq!(config.grpo.micro_batch_tokens, 8192);
        assert_eq!(config.optimizer.lr, 1e-6);
        assert_eq!(config.optimizer.betas, [0.9, 0.999]);
        assert_eq!(config.optimizer.eps, 1e-8);
        assert_eq!(config.optimizer.weight_decay, 0.01);
        assert_eq!(config.optimizer.schedule, LrSchedule::Constant);
        assert_eq!(config.optimizer.max_grad_norm, 1.0);
        assert_eq!(config.optimizer.max_consecutive_bad_steps, 3);
        assert_eq!(config.checkpoint.every_steps, 50);
        assert_eq!(config.checkpoint.keep, 3);
        assert_eq!(config.checkpoint.publish_dtype, "bf16");
        assert_eq!(config.cluster.learner_addr, "127.0.0.1:50051");
        assert!(config.cluster.reward_addrs.is_empty());
        assert_eq!(config.cluster.actor_batch, 32);
        assert_eq!(config.cluster.leases_per_actor, 2);
        assert_eq!(config.cluster.lease_seconds, 600);
        assert_eq!(config.cluster.ingest_queue, 64);
        assert_eq!(config.cluster.weight_chunk_bytes, 4 << 20);
        assert_eq!(config.cluster.relay_fanout, 2);
        assert_eq!(config.cluster.heartbeat_seconds, 2.0);
        assert_eq!(config.cluster.rpc_timeout_seconds, 30.0);
        assert_eq!(config.metrics.jsonl, PathBuf::from("metrics.jsonl"));
        assert_eq!(config.metrics.log_every_seconds, 5.0);
        assert_eq!(config.metrics.prometheus_addr, None);
        assert_eq!(config.metrics.member_prometheus_addr, None);
        assert_eq!(config.metrics.peak_tflops, None);
    }

    #[test]
    fn enums_and_options_are_read_by_their_toml_names() {
        let text = job(
            "[grpo]\nloss_aggregation = \"sequence_mean\"\nkl_estimator = \"k1\"\n\
             tis_cap = 2.0\n[optimizer]\nschedule = \"cosine\"\n\
             [rewards]\ncombine = \"weighted_sum\"\nquality_model = \"/models/rm\"\n\
             [rewards.format]\nngram_penalty = 0.5\n[metrics]\nprometheus_addr = \"0.0.0.0:9090\"\n\
             member_prometheus_addr = \"0.0.0.0:0\"\npeak_tflops = 989.0\n",
        );
        let config = JobConfig::from_toml_str(&text, "job.toml").unwrap();
        assert_eq!(config.grpo.loss_aggregation, LossAggregation::SequenceMean);
        assert_eq!(config.grpo.kl_estimator, KlEstimator::K1);
        assert_eq!(config.grpo.tis_cap, Some(2.0));
        assert_eq!(config.optimizer.schedule, LrSchedule::Cosine);
        assert_eq!(config.rewards.combine, AdvantageMode::WeightedSum);
        assert_eq!(config.rewards.quality_model.as_deref(), Some("/models/rm"));
        assert_eq!(config.rewards.format.ngram_penalty, 0.5);
        assert_eq!(config.rewards.format.paragraph_penalty, 2.0);
        assert_eq!(
            config.metrics.prometheus_addr.as_deref(),
            Some("0.0.0.0:9090")
        );
        assert_eq!(
            config.metrics.member_prometheus_addr.as_deref(),
            Some("0.0.0.0:0")
        );
        assert_eq!(config.metrics.peak_tflops, Some(989.0));
    }

    #[test]
    fn a_config_survives_a_round_trip_through_toml() {
        let mut config = JobConfig::from_toml_str(RECIPE, "longwriter-zero.toml").unwrap();
        config.grpo.tis_cap = Some(3.0);
        config.cluster.reward_addrs = vec!["10.0.0.2:50052".to_owned()];
        let text = toml::to_string(&config).unwrap();
        let back = JobConfig::from_toml_str(&text, "written.toml").unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_section() {
        let (field, reason) = invalid(&job("[grpo]\nepsilon_low = 0.1\n"));
        assert_eq!(field, "grpo.epsilon_low");
        assert!(
            reason.starts_with("unknown field `epsilon_low`"),
            "{reason}"
        );
        assert!(reason.ends_with("(line 4, column 1)"), "{reason}");
        let (field, _) = invalid(&job("[rewards.format]\nmax_share = 0.1\n"));
        assert_eq!(field, "rewards.format.max_share");
        let (field, reason) = invalid(&job("[grpoo]\nsteps = 3\n"));
        assert_eq!(field, "grpoo");
        assert!(reason.starts_with("unknown field `grpoo`"), "{reason}");
        let (field, _) = invalid("job = { name = \"x\", nmae = \"y\" }");
        assert_eq!(field, "job.nmae");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named() {
        let (field, reason) = invalid(&job("[sampling]\ngroup_size = \"8\"\n"));
        assert_eq!(field, "sampling.group_size");
        assert!(reason.contains("invalid type: string \"8\""), "{reason}");
        assert!(reason.ends_with("(line 4, column 14)"), "{reason}");
        let (field, reason) = invalid(&job("[grpo]\nkl_estimator = \"k4\"\n"));
        assert_eq!(field, "grpo.kl_estimator");
        assert!(reason.contains("unknown variant `k4`"), "{reason}");
        let (field, reason) = invalid(&job("[optimizer]\nbetas = [0.9, 0.99, 0.999]\n"));
        assert_eq!(field, "optimizer.betas");
        assert!(
            reason.starts_with("invalid length 3, expected an array of 2 numbers"),
            "{reason}"
        );
        let (field, _) = invalid(&job("[optimizer]\nbetas = [0.9]\n"));
        assert_eq!(field, "optimizer.betas");
        let (field, _) = invalid(&job("[sampling]\nstop = [\"a\", 3]\n"));
        assert_eq!(field, "sampling.stop[1]");
        let (field, _) = invalid(&job("[metrics]\nprometheus_addr = 9090\n"));
        assert_eq!(field, "metrics.prometheus_addr");
    }

    #[test]
    fn out_of_domain_values_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[grpo]\neps_low = 1.5",
                "grpo.eps_low",
                "must be in [0, 1), got 1.5",
            ),
            (
                "[sampling]\ngroup_size = 1",
                "sampling.group_size",
                "must be at least 2, got 1",
            ),
            (
                "[sampling]\ntop_p = 0.0",
                "sampling.top_p",
                "must be in (0, 1], got 0",
            ),
            (
                "[sampling]\ntemperature = nan",
                "sampling.temperature",
                "must be a finite number above 0, got NaN",
            ),
            (
                "[cluster]\nlearner_addr = \"localhost\"",
                "cluster.learner_addr",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"localhost\"",
            ),
            (
                "[cluster]\nreward_addrs = [\"127.0.0.1:1\", \"nowhere:x\"]",
                "cluster.reward_addrs[1]",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"nowhere:x\"",
            ),
            (
                "[metrics]\nprometheus_addr = \"localhost:9090\"",
                "metrics.prometheus_addr",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"localhost:9090\"",
            ),
            (
                "[metrics]\nmember_prometheus_addr = \"0.0.0.0\"",
                "metrics.member_prometheus_addr",
                "must be an address like \"127.0.0.1:50051\" (ip:port), got \"0.0.0.0\"",
            ),
            (
                "[metrics]\npeak_tflops = 0.0",
                "metrics.peak_tflops",
                "must be a finite number above 0, got 0",
            ),
            (
                "[cluster]\nweight_chunk_bytes = 0",
                "cluster.weight_chunk_bytes",
                "must be in [1024, 67108864] (1 KiB to 64 MiB), got 0",
            ),
            (
                "[cluster]\nrelay_fanout = 65",
                "cluster.relay_fanout",
                "must be at most 64 (0 disables relaying), got 65",
            ),
            (
                "[model]\ndtype = \"f8\"",
                "model.dtype",
                "must be \"f32\" or \"bf16\", got \"f8\"",
            ),
            (
                "[model]\ndevice = \"cuda:x\"",
                "model.device",
                "must be \"cpu\", \"cuda\" or \"cuda:N\", got \"cuda:x\"",
            ),
            (
                "[checkpoint]\npublish_dtype = \"fp16\"",
                "checkpoint.publish_dtype",
                "must be \"f32\" or \"bf16\", got \"fp16\"",
            ),
            (
                "[grpo]\ntis_cap = 0.5",
                "grpo.tis_cap",
                "must be a finite number of at least 1, got 0.5",
            ),
            (
                "[grpo]\nsteps = 10\n[optimizer]\nwarmup_steps = 11",
                "optimizer.warmup_steps",
                "must be at most grpo.steps (10), got 11",
            ),
            (
                "[optimizer]\nbetas = [0.9, 1.0]",
                "optimizer.betas[1]",
                "must be in [0, 1), got 1",
            ),
            (
                "[rewards.format]\nmax_ngram_share = 1.5",
                "rewards.format.max_ngram_share",
                "it must be a share between 0 and 1, got 1.5",
            ),
            (
                "[rewards]\nlength_weight = -1.0",
                "rewards.length_weight",
                "must be a finite number of at least 0, got -1",
            ),
            (
                "[template]\nenglish = \"no slot\"\nchinese = \"{question}\"",
                "template.english",
                "must contain {question} exactly once, found 0",
            ),
        ];
        for (extra, want_field, want_reason) in cases {
            let (field, reason) = invalid(&job(extra));
            assert_eq!(
                (field.as_str(), reason.as_str()),
                (*want_field, *want_reason)
            );
        }
    }

    #[test]
    fn the_display_names_origin_and_field() {
        let err =
            JobConfig::from_toml_str(&job("[grpo]\neps_low = 1.5\n"), "job.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "job.toml: grpo.eps_low: must be in [0, 1), got 1.5"
        );
        let mut config = JobConfig::default();
        config.job.name = "x".to_owned();
        config.validate().unwrap();
        config.cluster.actors = 0;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "job config: cluster.actors: must be at least 1, got 0"
        );
    }

    #[test]
    fn a_job_needs_a_name() {
        let (field, reason) = invalid("[grpo]\nsteps = 3\n");
        assert_eq!(field, "job.name");
        assert_eq!(
            reason,
            "must be a non-empty name of letters, digits, '-', '_' and '.', got \"\""
        );
        let (field, _) = invalid("[job]\nname = \"a b\"\n");
        assert_eq!(field, "job.name");
    }

    #[test]
    fn at_least_one_weighted_reward_must_be_on() {
        let (field, reason) = invalid(&job(
            "[rewards]\nlength_weight = 0.0\nformat_weight = 0.0\nquality_weight = 0.0\n\
             quality_model = \"/models/rm\"\n",
        ));
        assert_eq!(field, "rewards");
        assert_eq!(
            reason,
            "no reward signal is on with a positive weight (length_weight = 0, \
             format_weight = 0, quality_weight = 0); at least one must be"
        );
        // Without a quality model, a quality weight does not count.
        let (field, reason) = invalid(&job(
            "[rewards]\nlength_weight = 0.0\nformat_weight = 0.0\nquality_weight = 5.0\n",
        ));
        assert_eq!(field, "rewards");
        assert!(
            reason.contains("quality off (no quality_model)"),
            "{reason}"
        );
        let config = JobConfig::from_toml_str(
            &job("[rewards]\nlength_weight = 0.0\nformat_weight = 0.0\nquality_model = \"rm\"\n"),
            "job.toml",
        )
        .unwrap();
        assert_eq!(config.rewards.quality_weight, 1.0);
    }

    #[test]
    fn a_syntax_error_reports_line_and_column() {
        let text = "[job]\nname = \"x\"\n[grpo\nsteps = 3\n";
        match JobConfig::from_toml_str(text, "job.toml") {
            Err(err @ JobConfigError::Parse { .. }) => {
                let message = err.to_string();
                assert!(
                    message.starts_with("job.toml: TOML parse error at line 3, column 6"),
                    "{message}"
                );
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
        let err = JobConfig::from_toml_str("[job]\nname = \"x\"\nname = \"y\"\n", "job.toml")
            .unwrap_err();
        assert!(matches!(err, JobConfigError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
