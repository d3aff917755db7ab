//! The memory model of a quill job, as `quill plan` prints it: the bytes a learner rank
//! holds (weights, gradients, optimiser state, activations, logits) under a sharding mode,
//! a precision and activation checkpointing, and what an actor's GPU holds (weights and
//! the KV cache of each sample). Pure arithmetic over a [`ModelConfig`]: parameters are
//! counted from quill's parameter table, activations from the tensors autograd keeps in
//! quill's decoder layer, logits from the chunked log-prob pass (`quill_learner`'s
//! `train::grpo`). Not counted: the CUDA context and allocator slack (the caller's
//! reserve), gradient-sync buckets, a KL reference model, and attention scores (fused
//! attention kernels keep none; the CPU math path forms `[heads, T, T]`).
//!
//! ZeRO-1 and ZeRO-2 are the learner's `grpo.sharding = "zero1" | "zero2"`
//! (`quill_learner`'s `train::shard`): each rank keeps an f32 master copy and both AdamW
//! moments of its 1/K of the parameters (12 bytes a value, in f32 too), and an f32 shard
//! of the summed gradient; the full gradients exist during the backward pass in both
//! (ZeRO-2 frees them between steps, which lowers no peak), so at the peak the two
//! stages hold the same. ZeRO-3 (weights sharded, one decoder layer or the embedding
//! gathered at a time) is a plan: the learner refuses it.
//!
//! Precision is what the learner does (`grpo.precision`, `quill_learner`'s
//! `train::precision`): `F32` trains f32 weights directly; mixed precision (`Bf16`) runs
//! the passes on a bf16 copy of the weights (bf16 activations and gradients), adds each
//! micro-batch's bf16 gradients into f32 gradients of the f32 master weights, and keeps
//! the masters with AdamW's moments as optimiser state: 20 bytes per parameter unsharded
//! (2 weights, 2 + 4 gradients, 4 + 8 optimiser), against 16 in f32.
//!
//! Tokens per pass are the micro-batch budget, or one longer sample: packed micro-batches
//! (`grpo.packing`) fill the budget with real tokens, padded ones with rows × longest
//! row, and the activations of a pass depend only on its positions.

use crate::config::ModelConfig;
use crate::params;

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// The KV cache's first capacity in an actor's engine (it doubles from there).
pub const ACTOR_INITIAL_CACHE_LEN: u64 = 512;

/// Bytes of an f32 value: master weights, AdamW moments, log-softmax and its gradients.
const F32: u64 = 4;

/// How a learner spreads its training state over its ranks (ZeRO stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sharding {
    /// Every rank holds everything.
    None,
    /// Optimiser state (f32 master weights, AdamW moments) and an f32 gradient shard.
    Zero1,
    /// As ZeRO-1 at the peak (the full gradients are freed only between steps).
    Zero2,
    /// Optimiser state, gradients and the decoder layers' weights sharded (one layer
    /// gathered at a time; activation checkpointing implied).
    Zero3,
}

impl Sharding {
    /// Every mode, weakest first.
    pub const ALL: [Sharding; 4] = [
        Sharding::None,
        Sharding::Zero1,
        Sharding::Zero2,
        Sharding::Zero3,
    ];

    /// The name `quill plan --sharding` takes.
    pub fn name(self) -> &'static str {
        match self {
            Sharding::None => "none",
            Sharding::Zero1 => "zero1",
            Sharding::Zero2 => "zero2",
            Sharding::Zero3 => "zero3",
        }
    }
}

/// The dtype of weights, gradients and activations in the passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// bf16 compute with f32 master weights and f32 gradient accumulation.
    Bf16,
}

impl Precision {
    /// Bytes per value.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    /// The name `quill plan --precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// What one GRPO step trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Samples per prompt (G).
    pub group_size: usize,
    /// Prompts per optimiser step.
    pub prompts_per_step: usize,
    /// The longest sample: prompt plus response tokens.
    pub max_tokens: usize,
}

impl Workload {
    /// Samples in one step, over all learner ranks.
    pub fn samples_per_step(&self) -> usize {
        self.group_size * self.prompts_per_step
    }
}

/// How the learner is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnerSetup {
    /// Learner ranks, one GPU each (K).
    pub gpus: usize,
    /// How the training state is spread over the ranks.
    pub sharding: Sharding,
    /// Compute precision.
    pub precision: Precision,
    /// Whether decoder layers are recomputed in the backward pass.
    pub activation_checkpointing: bool,
    /// Tokens per forward/backward pass (`grpo.micro_batch_tokens`: real tokens when
    /// packed, rows × longest row when padded).
    pub micro_batch_tokens: usize,
    /// Response tokens whose logits are formed at once (`grpo.logprob_chunk_tokens`).
    pub logprob_chunk_tokens: usize,
}

/// A bad planning input, naming the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PlanError {
    /// The input (`gpus`, `max_tokens`, …).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// The sizes of a model that its memory depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSize {
    /// Parameters in quill's layout (fused tensors counted once).
    pub params: u64,
    /// Parameters of one decoder layer.
    pub layer_params: u64,
    /// Parameters of the embedding matrix (and of an untied head).
    pub embedding_params: u64,
    /// Decoder layers.
    pub layers: u64,
    /// Width of the hidden states.
    pub hidden: u64,
    /// Width of the MLP.
    pub intermediate: u64,
    /// Query heads.
    pub heads: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// Width of one head.
    pub head_dim: u64,
    /// Vocabulary (rows of the head).
    pub vocab: u64,
    /// Context length (`max_position_embeddings`).
    pub context: u64,
}

impl ModelSize {
    /// The sizes of a model with `config`.
    pub fn of(config: &ModelConfig) -> Self {
        let table = params::params(config);
        let numel = |shape: &[i64]| shape.iter().product::<i64>() as u64;
        let params = table.iter().map(|p| numel(&p.shape)).sum();
        let layer_params = table
            .iter()
            .filter(|p| p.name.starts_with("model.layers.0."))
            .map(|p| numel(&p.shape))
            .sum();
        let u = |v: i64| v as u64;
        ModelSize {
            params,
            layer_params,
            embedding_params: u(config.vocab_size * config.hidden_size),
            layers: u(config.num_hidden_layers),
            hidden: u(config.hidden_size),
            intermediate: u(config.intermediate_size),
            heads: u(config.num_attention_heads),
            kv_heads: u(config.num_key_value_heads),
            head_dim: u(config.head_dim()),
            vocab: u(config.vocab_size),
            context: u(config.max_position_embeddings),
        }
    }

    /// Values autograd keeps per token for one decoder layer's backward pass: the two
    /// norms' inputs and outputs (4 × hidden), the qkv projection, the rotated q and k
    /// and the attention output (3 × (heads + kv_heads) × head_dim), the MLP's gate/up
    /// projection, `silu(gate)` and their product (4 × intermediate).
    pub fn layer_activation_values(&self) -> u64 {
        4 * self.hidden + 3 * (self.heads + self.kv_heads) * self.head_dim + 4 * self.intermediate
    }
}

/// Checks the inputs against each other and the model; the error names the input.
pub fn validate(size: &ModelSize, setup: &LearnerSetup, work: &Workload) -> Result<(), PlanError> {
    let positive = |field: &'static str, value: usize| {
        if value == 0 {
            Err(PlanError {
                field,
                reason: "must be at least 1".into(),
            })
        } else {
            Ok(())
        }
    };
    positive("gpus", setup.gpus)?;
    positive("micro_batch_tokens", setup.micro_batch_tokens)?;
    positive("logprob_chunk_tokens", setup.logprob_chunk_tokens)?;
    positive("group_size", work.group_size)?;
    positive("prompts_per_step", work.prompts_per_step)?;
    positive("max_tokens", work.max_tokens)?;
    if work.max_tokens as u64 > size.context {
        return Err(PlanError {
            field: "max_tokens",
            reason: format!(
                "{} exceeds the model's context of {} (max_position_embeddings)",
                work.max_tokens, size.context
            ),
        });
    }
    Ok(())
}

/// Bytes one learner rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnerMemory {
    /// Weights the passes use (ZeRO-3: this rank's shard plus one gathered unit).
    pub weights: u64,
    /// Gradients at the peak: the passes' gradients plus (bf16) their f32 accumulation in
    /// the masters' gradients; ZeRO-1/2 add the f32 shard they are reduce-scattered into,
    /// ZeRO-3 holds only this rank's shard.
    pub gradients: u64,
    /// f32 master weights (bf16 or sharded; unsharded f32 trains its weights directly) and AdamW's two
    /// f32 moments (ZeRO-1 and up: this rank's shard).
    pub optimizer: u64,
    /// What the decoder keeps for the backward pass of one micro-batch.
    pub activations: u64,
    /// Logits working set of one chunk of response tokens: logits in the compute
    /// precision plus four f32 `[tokens, vocab]` tensors (the log-softmax kept for the
    /// backward pass and the gradients of that size in it). Four is the count that
    /// bounds the CPU peak `quill_learner`'s peak-memory test measures; which tensors
    /// are alive at that peak was not traced.
    pub logits: u64,
    /// The same working set with every token of a micro-batch at once (no chunks).
    pub logits_unchunked: u64,
    /// Positions of the largest pass: the micro-batch budget, or one longer sample.
    pub tokens_per_pass: u64,
}

impl LearnerMemory {
    /// Everything one rank holds at its peak (with chunked logits, as the learner runs).
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.logits
    }
}

/// The bytes a learner rank holds for `setup` and `work`.
pub fn learner_memory(size: &ModelSize, setup: &LearnerSetup, work: &Workload) -> LearnerMemory {
    let k = setup.gpus.max(1) as u64;
    let b = setup.precision.bytes();
    let shard = size.params.div_ceil(k);
    // ZeRO-3 keeps the parameters outside the decoder layers resident and gathers one
    // layer's weights (and, in the backward pass, its gradient) at a time.
    let resident = size.params - size.layers * size.layer_params + size.layer_params;
    let weights = match setup.sharding {
        Sharding::Zero3 => resident * b,
        _ => size.params * b,
    };
    let accumulation = match setup.precision {
        Precision::F32 => 0,
        Precision::Bf16 => F32,
    };
    let gradients = match setup.sharding {
        Sharding::None => size.params * (b + accumulation),
        Sharding::Zero1 | Sharding::Zero2 => size.params * (b + accumulation) + shard * F32,
        Sharding::Zero3 => resident * (b + accumulation) + shard * F32,
    };
    let master = match (setup.sharding, setup.precision) {
        (Sharding::None, Precision::F32) => 0,
        _ => F32,
    };
    let optimizer_params = match setup.sharding {
        Sharding::None => size.params,
        _ => shard,
    };
    let optimizer = optimizer_params * (master + 2 * F32);
    let tokens = setup.micro_batch_tokens.max(work.max_tokens) as u64;
    let layer = size.layer_activation_values() * tokens * b;
    // The embedding output and the final norm's output.
    let ends = 2 * size.hidden * tokens * b;
    let activations = if setup.activation_checkpointing || setup.sharding == Sharding::Zero3 {
        size.layers * size.hidden * tokens * b + layer + ends
    } else {
        size.layers * layer + ends
    };
    let logits_per_token = size.vocab * (b + 4 * F32);
    LearnerMemory {
        weights,
        gradients,
        optimizer,
        activations,
        logits: tokens.min(setup.logprob_chunk_tokens as u64) * logits_per_token,
        logits_unchunked: tokens * logits_per_token,
        tokens_per_pass: tokens,
    }
}

/// A change of the learner's settings that makes it fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    /// What to change, in words.
    pub change: String,
    /// The per-rank total it gives.
    pub total: u64,
}

/// The largest learner world size [`learner_fixes`] tries.
pub const MAX_PLANNED_GPUS: usize = 4096;

/// Changes that make a learner that holds more than `usable` bytes per rank fit: each
/// single change that suffices (activation checkpointing, one sample per micro-batch, a
/// stronger sharding, bf16); when none does, all of them together; when that does not
/// either, the fewest GPUs (up to [`MAX_PLANNED_GPUS`]) that fit with the settings as
/// they are but sharded (ZeRO-3 unless a sharding is chosen), else with all the changes.
/// Empty when it fits already or nothing does.
pub fn learner_fixes(
    size: &ModelSize,
    setup: &LearnerSetup,
    work: &Workload,
    usable: u64,
) -> Vec<Fix> {
    let total = |s: &LearnerSetup| learner_memory(size, s, work).total();
    if total(setup) <= usable {
        return Vec::new();
    }
    let mut changes: Vec<(String, LearnerSetup)> = Vec::new();
    if !setup.activation_checkpointing {
        let s = LearnerSetup {
            activation_checkpointing: true,
            ..*setup
        };
        changes.push(("activation checkpointing on".into(), s));
    }
    if setup.micro_batch_tokens > work.max_tokens {
        let s = LearnerSetup {
            micro_batch_tokens: work.max_tokens,
            ..*setup
        };
        changes.push((format!("micro-batch tokens {}", work.max_tokens), s));
    }
    for sharding in Sharding::ALL.into_iter().filter(|&m| m > setup.sharding) {
        let s = LearnerSetup { sharding, ..*setup };
        changes.push((format!("sharding {}", sharding.name()), s));
    }
    if setup.precision == Precision::F32 {
        let s = LearnerSetup {
            precision: Precision::Bf16,
            ..*setup
        };
        changes.push(("precision bf16".into(), s));
    }
    let fix = |change: String, s: &LearnerSetup| Fix {
        change,
        total: total(s),
    };
    let mut fixes: Vec<Fix> = changes
        .iter()
        .filter(|(_, s)| total(s) <= usable)
        .map(|(change, s)| fix(change.clone(), s))
        .collect();
    if !fixes.is_empty() {
        return fixes;
    }
    let strongest = LearnerSetup {
        activation_checkpointing: true,
        micro_batch_tokens: setup.micro_batch_tokens.min(work.max_tokens),
        sharding: Sharding::Zero3,
        precision: Precision::Bf16,
        ..*setup
    };
    let all = changes
        .iter()
        .map(|(c, _)| c.as_str())
        .filter(|c| !c.starts_with("sharding") || c.ends_with("zero3"))
        .collect::<Vec<_>>()
        .join(", ");
    if total(&strongest) <= usable {
        fixes.push(fix(all, &strongest));
        return fixes;
    }
    let sharded = LearnerSetup {
        sharding: match setup.sharding {
            Sharding::None => Sharding::Zero3,
            chosen => chosen,
        },
        ..*setup
    };
    let others: String = changes
        .iter()
        .filter(|(c, _)| !c.starts_with("sharding"))
        .map(|(c, _)| format!(", {c}"))
        .collect();
    for (base, and) in [(sharded, String::new()), (strongest, others)] {
        let fits = |gpus: &usize| {
            total(&LearnerSetup {
                gpus: *gpus,
                ..base
            }) <= usable
        };
        if let Some(gpus) = (setup.gpus + 1..=MAX_PLANNED_GPUS).find(fits) {
            let mode = base.sharding.name();
            let change = format!("{gpus} learner GPUs with sharding {mode}{and}");
            fixes.push(fix(change, &LearnerSetup { gpus, ..base }));
            break;
        }
    }
    fixes
}

/// What an actor's GPU holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorMemory {
    /// The model's weights in the actor's dtype.
    pub weights: u64,
    /// Positions the KV cache grows to for the longest sample: from
    /// [`ACTOR_INITIAL_CACHE_LEN`], doubling, at most the context.
    pub cache_tokens: u64,
    /// KV cache of one sample (every slot has the same capacity).
    pub kv_per_sample: u64,
    /// One decoding step's logits for a sample (model dtype and an f32 copy).
    pub logits_per_sample: u64,
    /// Samples (engine slots, `cluster.actor_batch`) that fit beside the weights.
    pub samples_that_fit: u64,
}

/// What one actor GPU with `usable` bytes holds when it generates samples of up to
/// `max_tokens` tokens in `dtype`.
pub fn actor_memory(
    size: &ModelSize,
    dtype: Precision,
    max_tokens: u64,
    usable: u64,
) -> ActorMemory {
    let b = dtype.bytes();
    let weights = size.params * b;
    let mut cache_tokens = ACTOR_INITIAL_CACHE_LEN;
    while cache_tokens < max_tokens {
        cache_tokens *= 2;
    }
    let cache_tokens = cache_tokens.min(size.context).max(max_tokens);
    let kv_per_sample = 2 * size.layers * size.kv_heads * size.head_dim * cache_tokens * b;
    let logits_per_sample = size.vocab * (b + F32);
    let per_sample = kv_per_sample + logits_per_sample;
    ActorMemory {
        weights,
        cache_tokens,
        kv_per_sample,
        logits_per_sample,
        samples_that_fit: usable.saturating_sub(weights) / per_sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Qwen2.5-7B's shape.
    fn qwen7b() -> ModelSize {
        ModelSize::of(
            &ModelConfig::from_json(json!({
                "architectures": ["Qwen2ForCausalLM"],
                "vocab_size": 152064,
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": false
            }))
            .unwrap(),
        )
    }

    fn setup(gpus: usize, sharding: Sharding, precision: Precision) -> LearnerSetup {
        LearnerSetup {
            gpus,
            sharding,
            precision,
            activation_checkpointing: false,
            micro_batch_tokens: 8192,
            logprob_chunk_tokens: 1024,
        }
    }

    const WORK: Workload = Workload {
        group_size: 32,
        prompts_per_step: 32,
        max_tokens: 16384,
    };

    #[test]
    fn parameters_are_counted_from_the_table() {
        let size = qwen7b();
        // Qwen2.5-7B has 7,615,616,512 parameters (transformers' num_parameters()).
        assert_eq!(size.params, 7_615_616_512);
        let layer =
            3584 * (3584 + 2 * 512) + (3584 + 2 * 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584;
        assert_eq!(size.layer_params, layer);
        assert_eq!(size.head_dim, 128);
    }

    #[test]
    fn unsharded_f32_is_sixteen_bytes_per_parameter() {
        let size = qwen7b();
        let m = learner_memory(&size, &setup(8, Sharding::None, Precision::F32), &WORK);
        assert_eq!(m.weights + m.gradients + m.optimizer, 16 * size.params);
        assert_eq!(
            m.tokens_per_pass, 16384,
            "one sample longer than the budget"
        );
    }

    #[test]
    fn each_zero_stage_shards_one_more_part() {
        let size = qwen7b();
        let at = |sharding| learner_memory(&size, &setup(4, sharding, Precision::Bf16), &WORK);
        let (none, z1, z2, z3) = (
            at(Sharding::None),
            at(Sharding::Zero1),
            at(Sharding::Zero2),
            at(Sharding::Zero3),
        );
        let shard = size.params.div_ceil(4);
        assert_eq!(none.optimizer, size.params * 12, "f32 master + two moments");
        assert_eq!(z1.optimizer, shard * 12);
        assert_eq!(
            z1.gradients,
            size.params * 6 + shard * 4,
            "bf16 gradients, their f32 accumulation and the reduce-scattered shard"
        );
        assert_eq!(z2, z1, "ZeRO-2 frees the full gradients only between steps");
        // ZeRO-3 keeps the embedding (tied here), the final norm and one gathered layer.
        let resident = size.params - 27 * size.layer_params;
        assert_eq!(z3.gradients, resident * 6 + shard * 4);
        assert_eq!(
            none.weights + none.gradients + none.optimizer,
            20 * size.params
        );
        assert_eq!(z2.weights, size.params * 2);
        assert_eq!(z3.weights, resident * 2);
        assert!(none.total() > z1.total() && z2.total() > z3.total());
        assert_eq!(none.activations, z2.activations);
        let checkpointed = LearnerSetup {
            activation_checkpointing: true,
            ..setup(4, Sharding::None, Precision::Bf16)
        };
        assert_eq!(
            z3.activations,
            learner_memory(&size, &checkpointed, &WORK).activations,
            "ZeRO-3 runs the layer-by-layer (checkpointed) pass"
        );
    }

    #[test]
    fn checkpointing_and_chunks_shrink_activations_and_logits() {
        let size = qwen7b();
        let plain = setup(1, Sharding::None, Precision::Bf16);
        let ckpt = LearnerSetup {
            activation_checkpointing: true,
            ..plain
        };
        let (a, b) = (
            learner_memory(&size, &plain, &WORK),
            learner_memory(&size, &ckpt, &WORK),
        );
        let per_layer = size.layer_activation_values() * 16384 * 2;
        let ends = 2 * 3584 * 16384 * 2;
        assert_eq!(a.activations, 28 * per_layer + ends);
        assert_eq!(b.activations, 28 * 3584 * 16384 * 2 + per_layer + ends);
        assert_eq!(a.logits_unchunked, 16384 * 152064 * (2 + 16));
        assert_eq!(a.logits, 1024 * 152064 * (2 + 16));
    }

    #[test]
    fn fixes_name_changes_that_fit() {
        let size = qwen7b();
        let usable = (78.0 * GIB) as u64;
        let base = setup(8, Sharding::None, Precision::F32);
        // f32 activations of a 16k-token pass without checkpointing outgrow 78 GiB, so
        // of the single changes only ZeRO-3 (whose passes run layer by layer) helps.
        assert!(learner_memory(&size, &base, &WORK).activations > usable);
        let fixes = learner_fixes(&size, &base, &WORK, usable);
        assert_eq!(
            fixes.iter().map(|f| f.change.as_str()).collect::<Vec<_>>(),
            ["sharding zero3"]
        );
        assert!(fixes[0].total <= usable);

        // With checkpointing on, ZeRO-3 alone is enough (ZeRO-1/2 keep full gradients
        // at the peak).
        let ckpt = LearnerSetup {
            activation_checkpointing: true,
            ..base
        };
        let fixes = learner_fixes(&size, &ckpt, &WORK, usable);
        let names: Vec<&str> = fixes.iter().map(|f| f.change.as_str()).collect();
        assert_eq!(names, ["sharding zero3"]);
        assert!(learner_memory(&size, &ckpt, &WORK).total() > usable);
        // One 24 GiB GPU is too small for anything: the fewest GPUs with every change.
        let small = (24.0 * GIB) as u64;
        let one = LearnerSetup { gpus: 1, ..base };
        let fixes = learner_fixes(&size, &one, &WORK, small);
        assert_eq!(fixes.len(), 1, "{fixes:?}");
        let gpus: usize = fixes[0].change.split(' ').next().unwrap().parse().unwrap();
        assert!(
            fixes[0].change.ends_with(
                " learner GPUs with sharding zero3, activation checkpointing on, precision bf16"
            ),
            "{fixes:?}"
        );
        let strongest = |gpus| LearnerSetup {
            gpus,
            sharding: Sharding::Zero3,
            precision: Precision::Bf16,
            activation_checkpointing: true,
            ..base
        };
        assert!(learner_memory(&size, &strongest(gpus), &WORK).total() <= small);
        assert!(learner_memory(&size, &strongest(gpus - 1), &WORK).total() > small);
        assert!(learner_fixes(&size, &strongest(8), &WORK, usable).is_empty());
        assert!(
            learner_fixes(&size, &one, &WORK, 1 << 30).is_empty(),
            "nothing fits 1 GiB"
        );
    }

    #[test]
    fn actors_count_samples_beside_the_weights() {
        let size = qwen7b();
        let usable = 78 * (1u64 << 30);
        let a = actor_memory(&size, Precision::Bf16, 14_500, usable);
        assert_eq!(a.cache_tokens, 16384);
        assert_eq!(a.kv_per_sample, 2 * 28 * 4 * 128 * 16384 * 2);
        assert_eq!(a.weights, size.params * 2);
        let per = a.kv_per_sample + a.logits_per_sample;
        assert_eq!(a.samples_that_fit, (usable - a.weights) / per);
        assert!(a.samples_that_fit > 0 && (a.samples_that_fit + 1) * per > usable - a.weights);
        let capped = actor_memory(&size, Precision::Bf16, 30_000, usable);
        assert_eq!(capped.cache_tokens, 32768);
        assert_eq!(
            actor_memory(&size, Precision::F32, 100, 1 << 30).samples_that_fit,
            0
        );
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let size = qwen7b();
        let err = validate(&size, &setup(0, Sharding::None, Precision::F32), &WORK).unwrap_err();
        assert_eq!(err.field, "gpus");
        let long = Workload {
            max_tokens: 40_000,
            ..WORK
        };
        let err = validate(&size, &setup(1, Sharding::None, Precision::F32), &long).unwrap_err();
        assert_eq!(err.field, "max_tokens");
        assert!(err.to_string().contains("32768"), "{err}");
        validate(&size, &setup(1, Sharding::None, Precision::F32), &WORK).unwrap();
    }
}
