//! The GRPO loss: a PPO-clipped (asymmetric ε) policy-gradient objective on the behaviour
//! policy's importance ratios, optional truncated importance sampling, an optional KL
//! penalty against a frozen reference model, and token- or sequence-level aggregation.
//!
//! For response token `t` of a sample with advantage `A`:
//! - `logp` is the learner's `log_softmax(logits / T)[token]` from one forward pass over
//!   prompt + response (the same quantity the actor records, see `actor::sampling`), and
//!   `μ` the behaviour log-prob the actor recorded; `ratio = exp(logp − μ)`.
//! - **PPO clip** (`tis_cap = None`): `ℓ = −min(ratio·A, clip(ratio, 1 − ε_low, 1 + ε_high)·A)`.
//! - **Truncated IS** (`tis_cap = Some(C)`): each batch is used for exactly one optimizer
//!   step, so the learner's weights at the start of the step are the proximal ("old")
//!   policy and the PPO ratio against them is 1 (its clip never binds). The mismatch with
//!   the behaviour policy is corrected by the detached, truncated weight
//!   `w = min(exp(logp − μ), C)`: `ℓ = −w·A·exp(logp − sg(logp))`, whose value is `−w·A`
//!   and whose gradient is `−w·A·∇logp`. This is verl's truncated IS with one PPO update
//!   per batch.
//! - **KL** (when a reference model is given): with `d = logp − ref_logp` (both tempered
//!   the same way), `k1 = d`, `k2 = d²/2`, `k3 = exp(−d) + d − 1`; `kl_coef·k` is added to
//!   `ℓ`. With `kl_coef = 0` the KL is only reported.
//! - **Aggregation**: `TokenMean` sums `ℓ` over every response token of the whole batch and
//!   divides by the batch's token count; `SequenceMean` averages each sample's token-mean
//!   over samples. Both are computed as per-token weights fixed by the whole batch, so
//!   splitting it into micro-batches leaves the total loss and gradient unchanged.
//! - **Memory** ([`MemoryConfig`]): the head, log-softmax and loss of a micro-batch run on
//!   chunks of `logprob_chunk_tokens` response tokens, each chunk's backward pass done
//!   before the next chunk's logits are formed, so the f32 logits held at once are
//!   `chunk × vocab` (a few such tensors: logits, log-softmax and their gradients), not
//!   `tokens × vocab`; the head runs once per token, as without chunks. With
//!   `activation_checkpointing` the decoder keeps only each layer's input and recomputes
//!   the layer in the backward pass (about one more forward pass of the decoder).
//! - **Packing** (`MemoryConfig::packing`): a micro-batch's samples run end to end in one
//!   row without padding; positions restart at each sample and attention stays within it
//!   (`Qwen2::hidden_packed`), so every token gets the log-prob it gets in a padded row.
//!   The samples of a group share their prompt: it is computed once and each response
//!   attends to it, so a step's passes hold `B` prompts instead of `B·G`.
//! - **Precision**: the passes run in the dtype of the model they are given (a bf16
//!   compute copy under mixed precision, see `train::precision`); the head's logits are
//!   converted to f32 before the tempered log-softmax, and the loss is f32.

use crate::error::{LearnerError, Result};
use crate::train::sample::{Packed, TrainSample};
use quill_model::{LayerCheckpoints, LayerHooks, NoHooks, Qwen2};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use quill_config::job::{KlEstimator, LossAggregation};

/// The per-token estimate of KL(π‖π_ref) from the policy's and the reference's log-probs:
/// k1 = `logp − ref`, k2 = `(logp − ref)² / 2`, k3 = `exp(ref − logp) − (ref − logp) − 1`.
pub fn kl_estimate(estimator: KlEstimator, logp: &Tensor, ref_logp: &Tensor) -> Tensor {
    let d = logp - ref_logp;
    match estimator {
        KlEstimator::K1 => d,
        KlEstimator::K2 => d.square() * 0.5,
        KlEstimator::K3 => (-&d).exp() + d - 1.0,
    }
}

/// Hyper-parameters of the GRPO loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    /// Lower clip range: ratios below `1 − eps_low` stop pushing negative advantages.
    pub eps_low: f64,
    /// Upper clip range: ratios above `1 + eps_high` stop pushing positive advantages.
    pub eps_high: f64,
    /// How per-token losses are averaged.
    pub aggregation: LossAggregation,
    /// Weight of the KL penalty (0: no penalty, no reference model needed).
    pub kl_coef: f64,
    /// Which KL estimator is used.
    pub kl_estimator: KlEstimator,
    /// Truncated importance sampling cap `C` (replaces the PPO clip; see the module docs).
    pub tis_cap: Option<f64>,
    /// The sampling temperature the behaviour log-probs were recorded at (1 for greedy).
    pub temperature: f64,
}

impl Default for GrpoConfig {
    /// The LongWriter-Zero recipe: ε = 0.2, no KL, temperature 0.8, token-level loss.
    fn default() -> Self {
        GrpoConfig {
            eps_low: 0.2,
            eps_high: 0.2,
            aggregation: LossAggregation::TokenMean,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            tis_cap: None,
            temperature: 0.8,
        }
    }
}

impl GrpoConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps_low.is_finite() && (0.0..1.0).contains(&self.eps_low)) {
            return Err(LearnerError::config("eps_low", "must be in [0, 1)"));
        }
        if !(self.eps_high.is_finite() && self.eps_high >= 0.0) {
            return Err(LearnerError::config("eps_high", "must be >= 0"));
        }
        if !(self.kl_coef.is_finite() && self.kl_coef >= 0.0) {
            return Err(LearnerError::config("kl_coef", "must be >= 0"));
        }
        if let Some(cap) = self.tis_cap {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(LearnerError::config("tis_cap", "must be > 0"));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(LearnerError::config(
                "temperature",
                "must be > 0 (use 1 for greedy samples)",
            ));
        }
        Ok(())
    }
}

/// The weight of each of a sample's tokens in the batch loss, one value per sample:
/// `1 / N` (all tokens of the batch) for `TokenMean`, `1 / (S · n_i)` for `SequenceMean`.
pub fn token_weights(batch: &[TrainSample], aggregation: LossAggregation) -> Vec<f64> {
    let tokens: usize = batch.iter().map(|s| s.response.len()).sum();
    batch
        .iter()
        .map(|s| match aggregation {
            LossAggregation::TokenMean => 1.0 / tokens as f64,
            LossAggregation::SequenceMean => 1.0 / (batch.len() * s.response.len()) as f64,
        })
        .collect()
}

/// Response tokens whose logits are formed at once unless the job says otherwise.
pub const DEFAULT_LOGPROB_CHUNK_TOKENS: usize = 1024;

/// How a micro-batch is laid out and how its forward and backward passes trade compute
/// for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Response tokens whose `[tokens, vocab]` logits are formed at once (at least 1):
    /// the head, log-softmax and loss run chunk by chunk, each chunk's backward pass
    /// before the next chunk's forward pass.
    pub logprob_chunk_tokens: usize,
    /// Recompute each decoder layer in the backward pass from its kept input instead of
    /// keeping its activations (see `quill_model::LayerCheckpoints`).
    pub activation_checkpointing: bool,
    /// Pack a micro-batch's samples end to end in one row without padding (positions
    /// restart and attention stays within each sample; consecutive samples with the same
    /// prompt share one copy of it) instead of right-padded rows.
    #[serde(default)]
    pub packing: bool,
}

impl Default for MemoryConfig {
    /// Chunks of [`DEFAULT_LOGPROB_CHUNK_TOKENS`], no activation checkpointing, packed
    /// micro-batches.
    fn default() -> Self {
        MemoryConfig {
            logprob_chunk_tokens: DEFAULT_LOGPROB_CHUNK_TOKENS,
            activation_checkpointing: false,
            packing: true,
        }
    }
}

impl MemoryConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.logprob_chunk_tokens == 0 {
            return Err(LearnerError::config(
                "logprob_chunk_tokens",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The `(start, length)` of each chunk of at most `chunk` of `n` tokens.
fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (i64, i64)> {
    (0..n)
        .step_by(chunk)
        .map(move |start| (start as i64, chunk.min(n - start) as i64))
}

/// The layer hooks of a learner that shards the layers' weights (`train::zero3`).
pub type Hooks<'h> = dyn LayerHooks<Error = LearnerError> + 'h;

/// The decoder's final-norm hidden states of `packed` (packed or padded rows as it is
/// laid out), with the kept layer inputs when `checkpointing` or when there are `hooks`
/// (they run in the checkpointed pass).
fn decoder<'a>(
    model: &'a Qwen2,
    packed: &Packed,
    checkpointing: bool,
    hooks: Option<&mut Hooks<'_>>,
) -> Result<(Tensor, Option<LayerCheckpoints<'a>>)> {
    let (hidden, kept) = match (hooks, &packed.segments, checkpointing) {
        (Some(hooks), _, _) => checkpointed(model, packed, hooks)?,
        (None, _, true) => checkpointed(model, packed, &mut NoHooks)?,
        (None, None, false) => return Ok((model.hidden(&packed.tokens), None)),
        (None, Some(segments), false) => {
            return Ok((model.hidden_packed(&packed.tokens, segments), None))
        }
    };
    Ok((hidden, Some(kept)))
}

fn checkpointed<'a, H: LayerHooks + ?Sized>(
    model: &'a Qwen2,
    packed: &Packed,
    hooks: &mut H,
) -> std::result::Result<(Tensor, LayerCheckpoints<'a>), H::Error> {
    match &packed.segments {
        None => model.hidden_checkpointed(&packed.tokens, hooks),
        Some(segments) => model.hidden_packed_checkpointed(&packed.tokens, segments, hooks),
    }
}

/// The hidden states at the response tokens' predicting positions, `[N, hidden]`.
fn response_hidden(hidden: &Tensor, packed: &Packed) -> Result<Tensor> {
    Ok(hidden.f_index(&[Some(&packed.rows), Some(&packed.cols)])?)
}

/// `log_softmax(logits / temperature)` in f32 of a chunk of response hidden states
/// `[n, hidden]`: `[n, V]`.
fn tempered_log_softmax(model: &Qwen2, hidden: &Tensor, temperature: f64) -> Result<Tensor> {
    let mut logits = model.project(hidden).f_to_kind(Kind::Float)?;
    // In place: neither the head's nor the conversion's backward pass needs this tensor,
    // and a `[n, V]` copy fewer is alive at once.
    let _ = logits.f_div_scalar_(temperature)?;
    Ok(logits.f_log_softmax(-1, Kind::Float)?)
}

/// The targets' entries of a `[n, V]` log-softmax, `[n]`.
fn pick_targets(log_softmax: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(log_softmax
        .f_gather(-1, &targets.unsqueeze(-1), false)?
        .squeeze_dim(-1))
}

/// `log_softmax(logits / temperature)[token]` of every response token of `packed`, `[N]`
/// in f32, without gradient, from one forward pass of `model` with the head applied to
/// `chunk` tokens at a time.
pub(crate) fn token_logprobs(
    model: &Qwen2,
    packed: &Packed,
    temperature: f64,
    chunk: usize,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let hidden = response_hidden(&decoder(model, packed, false, None)?.0, packed)?;
    let parts = chunks(packed.len(), chunk)
        .map(|(start, len)| {
            let lsm = tempered_log_softmax(model, &hidden.narrow(0, start, len), temperature)?;
            pick_targets(&lsm, &packed.targets.narrow(0, start, len))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// The summed entropy (nats) of the tempered next-token distributions of a `[n, V]`
/// log-softmax, without gradient.
fn entropy_sum(log_softmax: &Tensor) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let lsm = log_softmax.detach();
    let mut plogp = lsm.f_exp()?;
    let _ = plogp.f_mul_(&lsm)?;
    Ok(-plogp.f_sum(Kind::Double)?.double_value(&[]))
}

/// The current policy's log-probs of each sample's response tokens (no gradient; the
/// head applied to [`DEFAULT_LOGPROB_CHUNK_TOKENS`] tokens at a time).
pub fn response_logprobs(
    model: &Qwen2,
    samples: &[&TrainSample],
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    let _guard = tch::no_grad_guard();
    let packed = Packed::new(samples, model.device(), false);
    let flat = token_logprobs(model, &packed, temperature, DEFAULT_LOGPROB_CHUNK_TOKENS)?
        .to_device(tch::Device::Cpu);
    let flat = Vec::<f32>::try_from(&flat)?;
    let mut out = Vec::with_capacity(samples.len());
    let mut rest = flat.as_slice();
    for &n in &packed.response_lens {
        let (head, tail) = rest.split_at(n);
        out.push(head.to_vec());
        rest = tail;
    }
    Ok(out)
}

/// Per-token quantities of the loss on flat `[N]` tensors.
pub struct TokenLoss {
    /// The per-token loss `ℓ` (policy-gradient term plus `kl_coef·k`), with gradient.
    pub loss: Tensor,
    /// `exp(logp − μ)`, detached.
    pub ratio: Tensor,
    /// Tokens whose gradient the clip removes (PPO), or whose weight the cap truncates
    /// (TIS), as 0/1 floats.
    pub clipped: Tensor,
    /// The KL estimate per token (detached), when a reference was given.
    pub kl: Option<Tensor>,
}

/// The GRPO loss per token, from the policy's log-probs `logp` (with gradient), the
/// behaviour log-probs, the advantages and, optionally, the reference's log-probs; all
/// `[N]` f32.
pub fn token_loss(
    logp: &Tensor,
    behaviour: &Tensor,
    advantage: &Tensor,
    ref_logp: Option<&Tensor>,
    config: &GrpoConfig,
) -> TokenLoss {
    let ratio = (logp - behaviour).exp();
    let detached = ratio.detach();
    let (pg, clipped) = match config.tis_cap {
        None => {
            let bounded = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high);
            let unclipped = -(&ratio * advantage);
            let clipped = -(bounded * advantage);
            let binding = clipped.gt_tensor(&unclipped);
            (unclipped.maximum(&clipped), binding)
        }
        Some(cap) => {
            let weight = detached.clamp_max(cap);
            let proximal = (logp - logp.detach()).exp();
            (-(weight * advantage * proximal), detached.gt(cap))
        }
    };
    let kl = ref_logp.map(|r| kl_estimate(config.kl_estimator, logp, r));
    let loss = match (&kl, config.kl_coef > 0.0) {
        (Some(k), true) => pg + k * config.kl_coef,
        _ => pg,
    };
    TokenLoss {
        loss,
        ratio: detached,
        clipped: clipped.to_kind(Kind::Float),
        kl: kl.map(|k| k.detach()),
    }
}

/// Sums of a micro-batch's loss statistics; add micro-batches up, then [`Self::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSums {
    /// The micro-batch's contribution to the batch loss.
    pub loss: f64,
    /// Number of clipped (or truncated) tokens.
    pub clipped: f64,
    /// Sum of the tokens' ratios.
    pub ratio: f64,
    /// Sum of the tokens' KL estimates.
    pub kl: f64,
    /// Sum of the policy's entropy at the tokens' positions.
    pub entropy: f64,
    /// Number of response tokens.
    pub tokens: usize,
}

impl LossSums {
    /// Adds another micro-batch's sums.
    pub fn add(&mut self, other: &LossSums) {
        self.loss += other.loss;
        self.clipped += other.clipped;
        self.ratio += other.ratio;
        self.kl += other.kl;
        self.entropy += other.entropy;
        self.tokens += other.tokens;
    }

    /// The batch statistics.
    pub fn finish(&self) -> LossStats {
        let n = self.tokens.max(1) as f64;
        LossStats {
            loss: self.loss,
            clip_fraction: self.clipped / n,
            mean_ratio: self.ratio / n,
            mean_kl: self.kl / n,
            entropy: self.entropy / n,
            tokens: self.tokens,
        }
    }
}

/// Statistics of the loss over a whole batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossStats {
    /// The aggregated loss (including the KL penalty).
    pub loss: f64,
    /// Fraction of tokens whose gradient the clip removed (PPO) or whose importance weight
    /// the cap truncated (TIS).
    pub clip_fraction: f64,
    /// Mean importance ratio `exp(logp − μ)` over tokens.
    pub mean_ratio: f64,
    /// Mean KL estimate over tokens (0 without a reference model).
    pub mean_kl: f64,
    /// Mean entropy (nats) of the policy's tempered next-token distribution over tokens:
    /// a falling entropy warns of a policy collapsing onto few answers.
    pub entropy: f64,
    /// Number of response tokens.
    pub tokens: usize,
}

/// One micro-batch's forward and backward pass: adds the gradient of its loss, weighted
/// by `weights` (one per sample, from [`token_weights`] over the whole batch, so that
/// the micro-batches' losses sum to the batch loss), to the policy's parameter gradients
/// and returns its statistics.
///
/// The decoder runs once over the micro-batch (with activation checkpointing when
/// `memory` asks for it). The head, the log-softmax and the loss then run on chunks of
/// `memory.logprob_chunk_tokens` response tokens, each chunk backpropagated to a detached
/// copy of the response hidden states before the next is formed, so no `[tokens, vocab]`
/// matrix larger than a chunk exists. The loss is a sum of per-token terms, so this is
/// the unchunked gradient. Last, the hidden states' accumulated gradient is carried
/// through the decoder. A non-finite loss stops the pass early (the step is skipped and
/// its gradients discarded).
pub fn micro_batch_backward(
    policy: &Qwen2,
    reference: Option<&Qwen2>,
    samples: &[&TrainSample],
    weights: &[f64],
    config: &GrpoConfig,
    memory: &MemoryConfig,
    mut hooks: Option<&mut Hooks<'_>>,
) -> Result<LossSums> {
    let device = policy.device();
    let packed = Packed::new(samples, device, memory.packing);
    let chunk = memory.logprob_chunk_tokens;
    let ref_logp = reference
        .map(|model| token_logprobs(model, &packed, config.temperature, chunk))
        .transpose()?;
    let (hidden, checkpoints) = decoder(
        policy,
        &packed,
        memory.activation_checkpointing,
        hooks.as_deref_mut(),
    )?;
    let picked = response_hidden(&hidden, &packed)?;
    let leaf = picked.detach().set_requires_grad(true);
    let behaviour: Vec<f32> = samples
        .iter()
        .flat_map(|s| s.behaviour_logprobs.iter().copied())
        .collect();
    let behaviour = Tensor::from_slice(&behaviour).to(device);
    let advantage = packed.per_token(samples.iter().map(|s| s.advantage), device);
    let weight = packed.per_token(weights.iter().map(|&w| w as f32), device);
    let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
    let mut sums = LossSums {
        tokens: packed.len(),
        ..LossSums::default()
    };
    for (start, len) in chunks(packed.len(), chunk) {
        let part = |t: &Tensor| t.narrow(0, start, len);
        let lsm = tempered_log_softmax(policy, &part(&leaf), config.temperature)?;
        let logp = pick_targets(&lsm, &part(&packed.targets))?;
        sums.entropy += entropy_sum(&lsm)?;
        let ref_part = ref_logp.as_ref().map(part);
        let terms = token_loss(
            &logp,
            &part(&behaviour),
            &part(&advantage),
            ref_part.as_ref(),
            config,
        );
        let loss = (&terms.loss * part(&weight)).sum(Kind::Float);
        sums.loss += loss.double_value(&[]);
        sums.clipped += sum(&terms.clipped);
        sums.ratio += sum(&terms.ratio);
        sums.kl += terms.kl.as_ref().map_or(0.0, sum);
        if !sums.loss.is_finite() {
            return Ok(sums);
        }
        loss.f_backward()?;
    }
    picked
        .f_mul(&leaf.grad())?
        .f_sum(Kind::Float)?
        .f_backward()?;
    match (checkpoints, hooks) {
        (Some(kept), Some(hooks)) => kept.backward(hooks)?,
        (Some(kept), None) => kept.backward(&mut NoHooks)?,
        (None, _) => {}
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch, sample as batch_sample, tiny_model};
    use quill_model::Segment;
    use tch::Device;

    fn t(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.detach()).unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn clipped_objective_matches_a_direct_computation() {
        let config = GrpoConfig {
            eps_low: 0.2,
            eps_high: 0.28,
            ..GrpoConfig::default()
        };
        let logp_v = [-1.0f32, -1.0, -1.0, -1.0, -2.0, -0.5];
        let mu_v = [-1.5f32, -1.5, -0.5, -0.5, -2.0, -0.4];
        let adv_v = [1.0f32, -1.0, 1.0, -1.0, 2.0, 0.5];
        let logp = t(&logp_v).set_requires_grad(true);
        let out = token_loss(&logp, &t(&mu_v), &t(&adv_v), None, &config);
        let mut want = Vec::new();
        let mut want_grad = Vec::new();
        let mut want_clipped = Vec::new();
        for i in 0..6 {
            let r = (logp_v[i] - mu_v[i]).exp();
            let a = adv_v[i];
            let unclipped = r * a;
            let clipped = r.clamp(0.8, 1.28) * a;
            want.push(-unclipped.min(clipped));
            // The unclipped branch is active (gradient −r·A) unless the clip binds.
            let binds = clipped < unclipped;
            want_grad.push(if binds { 0.0 } else { -r * a });
            want_clipped.push(if binds { 1.0 } else { 0.0 });
        }
        close(&values(&out.loss), &want);
        close(&values(&out.clipped), &want_clipped);
        assert_eq!(want_clipped, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        out.loss.sum(Kind::Float).backward();
        close(&values(&logp.grad()), &want_grad);
    }

    #[test]
    fn truncated_importance_sampling_scales_the_plain_gradient() {
        let config = GrpoConfig {
            tis_cap: Some(1.5),
            ..GrpoConfig::default()
        };
        let logp_v = [-1.0f32, -1.0, -3.0];
        let mu_v = [-2.0f32, -0.8, -3.1];
        let adv_v = [1.0f32, -2.0, 0.5];
        let logp = t(&logp_v).set_requires_grad(true);
        let out = token_loss(&logp, &t(&mu_v), &t(&adv_v), None, &config);
        let w: Vec<f32> = (0..3)
            .map(|i| (logp_v[i] - mu_v[i]).exp().min(1.5))
            .collect();
        let want: Vec<f32> = (0..3).map(|i| -w[i] * adv_v[i]).collect();
        close(&values(&out.loss), &want);
        close(&values(&out.clipped), &[1.0, 0.0, 0.0]);
        out.loss.sum(Kind::Float).backward();
        close(&values(&logp.grad()), &want);
    }

    #[test]
    fn kl_estimators() {
        let logp = t(&[-1.0, -2.0, -0.5]);
        let reference = t(&[-1.5, -1.0, -0.5]);
        let d = [0.5f32, -1.0, 0.0];
        let k1 = kl_estimate(KlEstimator::K1, &logp, &reference);
        let k2 = kl_estimate(KlEstimator::K2, &logp, &reference);
        let k3 = kl_estimate(KlEstimator::K3, &logp, &reference);
        close(&values(&k1), &d);
        close(&values(&k2), &d.map(|d| d * d / 2.0));
        close(&values(&k3), &d.map(|d| (-d).exp() + d - 1.0));
        assert!(values(&k3).iter().all(|&k| k >= 0.0));
        let config = GrpoConfig {
            kl_coef: 0.1,
            kl_estimator: KlEstimator::K2,
            ..GrpoConfig::default()
        };
        let behaviour = logp.shallow_clone();
        let adv = t(&[0.0, 0.0, 0.0]);
        let out = token_loss(&logp, &behaviour, &adv, Some(&reference), &config);
        close(&values(&out.loss), &d.map(|d| 0.1 * d * d / 2.0));
        let unpenalised = GrpoConfig {
            kl_coef: 0.0,
            ..config
        };
        let out = token_loss(&logp, &behaviour, &adv, Some(&reference), &unpenalised);
        close(&values(&out.loss), &[0.0, 0.0, 0.0]);
        close(&values(out.kl.as_ref().unwrap()), &d.map(|d| d * d / 2.0));
    }

    #[test]
    fn weights_aggregate_tokens_or_sequences() {
        let sample = |n: usize| TrainSample {
            prompt: vec![1],
            response: vec![2; n],
            behaviour_logprobs: vec![-1.0; n],
            advantage: 1.0,
        };
        let batch = [sample(1), sample(3)];
        assert_eq!(
            token_weights(&batch, LossAggregation::TokenMean),
            [0.25, 0.25]
        );
        let seq = token_weights(&batch, LossAggregation::SequenceMean);
        assert_eq!(seq, [0.5, 1.0 / 6.0]);
        let total: f64 = batch
            .iter()
            .zip(&seq)
            .map(|(s, w)| w * s.response.len() as f64)
            .sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn config_validation_names_the_field() {
        let bad = GrpoConfig {
            temperature: 0.0,
            ..GrpoConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let bad = GrpoConfig {
            tis_cap: Some(f64::NAN),
            ..GrpoConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("tis_cap"));
        GrpoConfig::default().validate().unwrap();
    }

    /// What the plain, unchunked pass gives: log-probs, entropy sum, loss and the
    /// parameter gradients, from the whole `[N, V]` log-softmax of `model.logits`.
    struct Plain {
        logp: Vec<f32>,
        entropy: f64,
        loss: f64,
        grads: Vec<Tensor>,
    }

    /// [`micro_batch_backward`] with a KL reference and no layer hooks.
    fn with_reference(
        policy: &Qwen2,
        reference: &Qwen2,
        samples: &[&TrainSample],
        weights: &[f64],
        config: &GrpoConfig,
        memory: &MemoryConfig,
    ) -> LossSums {
        micro_batch_backward(
            policy,
            Some(reference),
            samples,
            weights,
            config,
            memory,
            None,
        )
        .unwrap()
    }

    fn plain_pass(
        policy: &Qwen2,
        reference: Option<&Qwen2>,
        samples: &[&TrainSample],
        weights: &[f64],
        config: &GrpoConfig,
    ) -> Plain {
        let packed = Packed::new(samples, Device::Cpu, false);
        let log_softmax = |m: &Qwen2| {
            let logits = m.logits(&packed.tokens);
            (logits.index(&[Some(&packed.rows), Some(&packed.cols)]) / config.temperature)
                .log_softmax(-1, Kind::Float)
        };
        let ref_logp = reference
            .map(|m| tch::no_grad(|| pick_targets(&log_softmax(m), &packed.targets).unwrap()));
        let lsm = log_softmax(policy);
        let logp = pick_targets(&lsm, &packed.targets).unwrap();
        let behaviour: Vec<f32> = samples
            .iter()
            .flat_map(|s| s.behaviour_logprobs.clone())
            .collect();
        let advantage = packed.per_token(samples.iter().map(|s| s.advantage), Device::Cpu);
        let weight = packed.per_token(weights.iter().map(|&w| w as f32), Device::Cpu);
        let terms = token_loss(&logp, &t(&behaviour), &advantage, ref_logp.as_ref(), config);
        let loss = (&terms.loss * weight).sum(Kind::Float);
        loss.backward();
        Plain {
            logp: values(&logp),
            entropy: entropy_sum(&lsm).unwrap(),
            loss: loss.double_value(&[]),
            grads: grads(policy),
        }
    }

    fn grads(model: &Qwen2) -> Vec<Tensor> {
        let mut vars: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.iter().map(|(_, v)| v.grad().copy()).collect()
    }

    /// The largest gradient difference relative to the largest gradient entry.
    fn relative_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
        let max = |ts: &[Tensor]| {
            ts.iter()
                .map(|t| t.abs().max().double_value(&[]))
                .fold(0.0, f64::max)
        };
        let diff: Vec<Tensor> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        max(&diff) / max(a)
    }

    /// The tiny model, batch and a KL-penalised loss against a second tiny model.
    fn kl_setup() -> (Vec<TrainSample>, Vec<f64>, GrpoConfig) {
        let samples = batch();
        let weights = token_weights(&samples, LossAggregation::TokenMean);
        let config = GrpoConfig {
            kl_coef: 0.1,
            ..GrpoConfig::default()
        };
        (samples, weights, config)
    }

    #[test]
    fn chunked_log_probs_entropy_and_gradients_match_the_unchunked_pass() {
        let (samples, weights, config) = kl_setup();
        let refs: Vec<&TrainSample> = samples.iter().collect();
        let reference = tiny_model(12);
        let plain = plain_pass(&tiny_model(11), Some(&reference), &refs, &weights, &config);
        assert_eq!(plain.logp.len(), 21);
        // 21 response tokens: chunks of 1, of sizes that leave a short last chunk, of
        // exactly all tokens, and larger than the micro-batch.
        for chunk in [1, 4, 5, 21, 1024] {
            let policy = tiny_model(11);
            let memory = MemoryConfig {
                logprob_chunk_tokens: chunk,
                activation_checkpointing: false,
                packing: false,
            };
            let packed = Packed::new(&refs, Device::Cpu, false);
            let logp = token_logprobs(&policy, &packed, config.temperature, chunk).unwrap();
            close(&values(&logp), &plain.logp);
            let sums = with_reference(&policy, &reference, &refs, &weights, &config, &memory);
            assert!(
                (sums.entropy - plain.entropy).abs() < 1e-5 * plain.entropy,
                "{chunk}"
            );
            assert!((sums.loss - plain.loss).abs() < 1e-6, "{chunk}: {sums:?}");
            assert!(sums.kl > 0.0 && sums.tokens == 21, "{sums:?}");
            // The same sums of f32 products in another order: a few ulps apart.
            let diff = relative_diff(&plain.grads, &grads(&policy));
            assert!(diff < 1e-5, "chunk {chunk}: gradients differ by {diff}");
        }
    }

    #[test]
    fn activation_checkpointing_gives_the_plain_gradients() {
        let (samples, weights, config) = kl_setup();
        let refs: Vec<&TrainSample> = samples.iter().collect();
        let reference = tiny_model(14);
        let plain = plain_pass(&tiny_model(13), Some(&reference), &refs, &weights, &config);
        for chunk in [3, 1024] {
            let policy = tiny_model(13);
            let memory = MemoryConfig {
                logprob_chunk_tokens: chunk,
                activation_checkpointing: true,
                packing: false,
            };
            let sums = with_reference(&policy, &reference, &refs, &weights, &config, &memory);
            assert!((sums.loss - plain.loss).abs() < 1e-6, "{sums:?}");
            let got = grads(&policy);
            assert!(got.iter().all(|g| g.abs().max().double_value(&[]) > 0.0));
            // Recomputed layers repeat the forward pass bit for bit; only the order of
            // the gradient sums differs.
            let diff = relative_diff(&plain.grads, &got);
            assert!(diff < 1e-5, "chunk {chunk}: gradients differ by {diff}");
        }
    }

    #[test]
    fn a_zero_chunk_is_refused_by_name() {
        let bad = MemoryConfig {
            logprob_chunk_tokens: 0,
            activation_checkpointing: true,
            packing: true,
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("logprob_chunk_tokens"), "{err}");
        MemoryConfig::default().validate().unwrap();
    }

    #[test]
    fn packed_log_probs_and_gradients_equal_the_padded_and_per_sequence_passes() {
        let (samples, weights, config) = kl_setup();
        let refs: Vec<&TrainSample> = samples.iter().collect();
        let reference = tiny_model(16);
        let padded = plain_pass(&tiny_model(15), Some(&reference), &refs, &weights, &config);
        // Each sample alone (one row, no padding at all), gradients summed.
        let alone = tiny_model(15);
        let mut alone_logp = Vec::new();
        let mut alone_loss = 0.0;
        for (s, w) in refs.iter().zip(&weights) {
            let memory = MemoryConfig {
                packing: false,
                ..MemoryConfig::default()
            };
            let packed = Packed::new(&[*s], Device::Cpu, false);
            let lp = token_logprobs(&alone, &packed, config.temperature, 1024).unwrap();
            alone_logp.extend(values(&lp));
            let sums = with_reference(&alone, &reference, &[*s], &[*w], &config, &memory);
            alone_loss += sums.loss;
        }
        close(&alone_logp, &padded.logp);
        for (chunk, checkpointing) in [(1024, false), (4, false), (5, true)] {
            let policy = tiny_model(15);
            let memory = MemoryConfig {
                logprob_chunk_tokens: chunk,
                activation_checkpointing: checkpointing,
                packing: true,
            };
            let packed = Packed::new(&refs, Device::Cpu, true);
            assert_eq!(packed.tokens.size(), [1, 21 + 17 - 4]);
            let logp = token_logprobs(&policy, &packed, config.temperature, chunk).unwrap();
            close(&values(&logp), &padded.logp);
            let sums = with_reference(&policy, &reference, &refs, &weights, &config, &memory);
            assert!((sums.loss - padded.loss).abs() < 1e-6, "{sums:?}");
            assert!((sums.loss - alone_loss).abs() < 1e-6, "{sums:?}");
            assert!((sums.entropy - padded.entropy).abs() < 1e-5 * padded.entropy);
            let got = grads(&policy);
            assert!(got.iter().all(|g| g.abs().max().double_value(&[]) > 0.0));
            // The same per-token terms; only the matmul shapes and the order of the
            // gradient sums differ: f32 rounding.
            for (what, want) in [("padded", &padded.grads), ("per sequence", &grads(&alone))] {
                let diff = relative_diff(want, &got);
                assert!(
                    diff < 1e-5,
                    "{chunk}/{checkpointing}: {what} differs by {diff}"
                );
            }
        }
    }

    #[test]
    fn samples_that_share_a_prompt_pack_it_once_and_train_as_the_padded_pass() {
        // Two groups: three responses to one prompt (one of a single token), two to another.
        let group = |seed: i64, prompt: usize, responses: &[usize]| {
            let base = batch_sample(seed, prompt, 1, -3.8, 0.0);
            responses
                .iter()
                .enumerate()
                .map(|(i, &n)| TrainSample {
                    prompt: base.prompt.clone(),
                    response: batch_sample(seed + 10 * i as i64 + 10, n, n, -3.8, 0.0).response,
                    behaviour_logprobs: vec![-3.8; n],
                    advantage: [1.0, -0.6, 0.3][i % 3],
                })
                .collect::<Vec<_>>()
        };
        let samples = [group(1, 6, &[4, 1, 3]), group(2, 3, &[5, 2])].concat();
        let weights = token_weights(&samples, LossAggregation::TokenMean);
        let config = GrpoConfig {
            kl_coef: 0.1,
            ..GrpoConfig::default()
        };
        let refs: Vec<&TrainSample> = samples.iter().collect();
        let reference = tiny_model(18);
        let padded = plain_pass(&tiny_model(17), Some(&reference), &refs, &weights, &config);
        let packed = Packed::new(&refs, Device::Cpu, true);
        // Each prompt once, then each response but its last token (the one-token
        // response adds no segment: it is predicted at the prompt's last position).
        let inputs = 6 + 3 + (3 + 2) + (4 + 1);
        assert_eq!(packed.tokens.size(), [1, inputs]);
        assert_eq!(
            packed.segments.as_deref(),
            Some(
                &[
                    Segment::alone(6),
                    Segment::after(0, 3),
                    Segment::after(0, 2),
                    Segment::alone(3),
                    Segment::after(3, 4),
                    Segment::after(3, 1),
                ][..]
            )
        );
        for (chunk, checkpointing) in [(1024, false), (4, true)] {
            let policy = tiny_model(17);
            let memory = MemoryConfig {
                logprob_chunk_tokens: chunk,
                activation_checkpointing: checkpointing,
                packing: true,
            };
            let logp = token_logprobs(&policy, &packed, config.temperature, chunk).unwrap();
            close(&values(&logp), &padded.logp);
            let sums = with_reference(&policy, &reference, &refs, &weights, &config, &memory);
            assert!((sums.loss - padded.loss).abs() < 1e-6, "{sums:?}");
            let diff = relative_diff(&padded.grads, &grads(&policy));
            assert!(diff < 1e-5, "{chunk}/{checkpointing}: differs by {diff}");
        }
    }
}
