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

use crate::error::{LearnerError, Result};
use crate::train::sample::{Packed, TrainSample};
use quill_model::Qwen2;
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

/// `log_softmax(logits / temperature)` at every response token's predicting position of
/// `packed`, `[N, V]` in f32, from one forward pass of `model`.
fn tempered_log_softmax(model: &Qwen2, packed: &Packed, temperature: f64) -> Result<Tensor> {
    let logits = model.logits(&packed.tokens);
    let picked = logits.f_index(&[Some(&packed.rows), Some(&packed.cols)])?;
    Ok(picked
        .f_to_kind(Kind::Float)?
        .f_div_scalar(temperature)?
        .f_log_softmax(-1, Kind::Float)?)
}

/// The response tokens' entries of a `[N, V]` log-softmax, `[N]`.
fn pick_targets(log_softmax: &Tensor, packed: &Packed) -> Result<Tensor> {
    Ok(log_softmax
        .f_gather(-1, &packed.targets.unsqueeze(-1), false)?
        .squeeze_dim(-1))
}

/// `log_softmax(logits / temperature)[token]` of every response token of `packed`, `[N]`
/// in f32, from one forward pass of `model`.
pub(crate) fn token_logprobs(model: &Qwen2, packed: &Packed, temperature: f64) -> Result<Tensor> {
    pick_targets(&tempered_log_softmax(model, packed, temperature)?, packed)
}

/// The summed entropy (nats) of the tempered next-token distributions of a `[N, V]`
/// log-softmax, without gradient.
fn entropy_sum(log_softmax: &Tensor) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let lsm = log_softmax.detach();
    let plogp = lsm.f_exp()?.f_mul(&lsm)?;
    Ok(-plogp.f_sum(Kind::Double)?.double_value(&[]))
}

/// The current policy's log-probs of each sample's response tokens (no gradient).
pub fn response_logprobs(
    model: &Qwen2,
    samples: &[&TrainSample],
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    let _guard = tch::no_grad_guard();
    let packed = Packed::new(samples, model.device());
    let flat = token_logprobs(model, &packed, temperature)?.to_device(tch::Device::Cpu);
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

/// The loss of one micro-batch as a scalar tensor with gradient, already weighted by
/// `weights` (one per sample, from [`token_weights`] over the whole batch) so that the
/// micro-batches' losses sum to the batch loss; and its statistics.
pub fn micro_batch_loss(
    policy: &Qwen2,
    reference: Option<&Qwen2>,
    samples: &[&TrainSample],
    weights: &[f64],
    config: &GrpoConfig,
) -> Result<(Tensor, LossSums)> {
    let device = policy.device();
    let packed = Packed::new(samples, device);
    let ref_logp = match reference {
        Some(model) => {
            let _guard = tch::no_grad_guard();
            Some(token_logprobs(model, &packed, config.temperature)?)
        }
        None => None,
    };
    let log_softmax = tempered_log_softmax(policy, &packed, config.temperature)?;
    let logp = pick_targets(&log_softmax, &packed)?;
    let entropy = entropy_sum(&log_softmax)?;
    let behaviour: Vec<f32> = samples
        .iter()
        .flat_map(|s| s.behaviour_logprobs.iter().copied())
        .collect();
    let behaviour = Tensor::from_slice(&behaviour).to(device);
    let advantage = packed.per_token(samples.iter().map(|s| s.advantage), device);
    let weight = packed.per_token(weights.iter().map(|&w| w as f32), device);
    let terms = token_loss(&logp, &behaviour, &advantage, ref_logp.as_ref(), config);
    let loss = (&terms.loss * &weight).sum(Kind::Float);
    let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
    let sums = LossSums {
        loss: loss.double_value(&[]),
        clipped: sum(&terms.clipped),
        ratio: sum(&terms.ratio),
        kl: terms.kl.as_ref().map_or(0.0, sum),
        entropy,
        tokens: packed.len(),
    };
    Ok((loss, sums))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
