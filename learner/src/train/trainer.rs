//! One GRPO training step: micro-batches by token budget, gradient accumulation to the
//! global aggregation, clipping, and skipping of steps whose loss or gradient norm is not
//! finite. Everything here runs on the calling thread.

use crate::error::{LearnerError, Result};
use crate::train::grad_sync::GradSync;
use crate::train::grpo::{self, GrpoConfig, LossSums, MemoryConfig};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::precision::{ComputeCopy, Precision};
use crate::train::sample::{
    micro_batches, packed_micro_batches, padded_tokens, validate_batch, TrainSample,
};
use crate::train::shard::{self, ShardedState, Sharding};
use crate::train::zero3::{self, LayerPass};
use quill_model::Qwen2;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Kind, Tensor};

/// Settings of the training step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// The loss.
    pub grpo: GrpoConfig,
    /// The optimizer.
    pub optimizer: AdamWConfig,
    /// Tokens per forward/backward pass: real tokens when `memory.packing`, else padded
    /// tokens (rows × longest row).
    pub micro_batch_tokens: usize,
    /// Packing, log-prob chunking and activation checkpointing.
    pub memory: MemoryConfig,
    /// f32, or bf16 passes with f32 master weights (`train::precision`).
    #[serde(default)]
    pub precision: Precision,
    /// How many bad (skipped) steps in a row are tolerated before `step` fails.
    pub max_consecutive_bad_steps: u32,
    /// How a data-parallel group spreads the optimiser state (ZeRO stage).
    #[serde(default)]
    pub sharding: Sharding,
}

impl Default for TrainerConfig {
    /// The recipe's loss and optimizer defaults, packed 16,384-token micro-batches,
    /// log-probs in chunks of 1,024 tokens, no activation checkpointing, f32, 3 bad steps.
    fn default() -> Self {
        TrainerConfig {
            grpo: GrpoConfig::default(),
            optimizer: AdamWConfig::default(),
            micro_batch_tokens: 16_384,
            memory: MemoryConfig::default(),
            precision: Precision::F32,
            max_consecutive_bad_steps: 3,
            sharding: Sharding::None,
        }
    }
}

impl TrainerConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.grpo.validate()?;
        self.optimizer.validate()?;
        self.memory.validate()?;
        if self.micro_batch_tokens == 0 {
            return Err(LearnerError::config(
                "micro_batch_tokens",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Where training stands: saved with every checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Batches consumed (applied and skipped steps).
    pub step: u64,
    /// Policy weight version: the number of applied updates.
    pub version: u64,
    /// Skipped steps since the last applied one.
    pub consecutive_bad_steps: u32,
    /// Skipped steps in total.
    pub skipped_steps: u64,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step counter after this step.
    pub step: u64,
    /// The weight version after this step.
    pub version: u64,
    /// Whether the update was skipped (non-finite loss or gradient norm).
    pub skipped: bool,
    /// Skipped steps in a row, this one included (0 after an applied step).
    pub consecutive_bad_steps: u32,
    /// The batch loss.
    pub loss: f64,
    /// Fraction of tokens clipped (PPO) or truncated (TIS).
    pub clip_fraction: f64,
    /// Mean importance ratio against the behaviour policy.
    pub mean_ratio: f64,
    /// Mean KL estimate against the reference model (0 without one).
    pub mean_kl: f64,
    /// Mean entropy (nats) of the policy over the trained tokens.
    pub entropy: f64,
    /// Total gradient L2 norm before clipping (NaN when the loss was not finite).
    pub grad_norm: f64,
    /// The learning rate of this update (of the next one when skipped).
    pub lr: f64,
    /// Response tokens trained on (by all ranks of a data-parallel group).
    pub tokens: usize,
    /// Response tokens of this rank's shard (`tokens` when alone).
    pub shard_tokens: usize,
    /// Samples in the batch.
    pub sequences: usize,
    /// Forward/backward passes.
    pub micro_batches: usize,
    /// Share of this rank's forward-pass positions that were padding (0 when packed).
    pub padding_share: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Seconds of forward and backward passes.
    pub forward_backward_seconds: f64,
    /// Seconds of the rest: gradient all-reduce, clipping and the optimiser update.
    pub optimizer_seconds: f64,
}

/// The policy, an optional frozen reference, their optimizer, the step counters and, in a
/// data-parallel group, the link to the other learner ranks. Under bf16 precision the
/// policy holds the f32 master weights and a bf16 [`ComputeCopy`] runs the passes.
pub struct Trainer {
    model: Qwen2,
    compute: Option<ComputeCopy>,
    reference: Option<Qwen2>,
    optimizer: AdamW,
    config: TrainerConfig,
    progress: Progress,
    sync: Option<GradSync>,
    /// This rank's optimiser shard (sharded and in a group).
    shard: Option<ShardedState>,
    /// The step of a sharded checkpoint whose optimiser shards are still to be loaded.
    pending_shards: Option<u64>,
}

impl Trainer {
    /// A trainer for `model` (f32 weights: they are the master copy) with a fresh optimizer.
    /// A `reference` model is required when `kl_coef > 0`, and otherwise only reported on.
    pub fn new(model: Qwen2, reference: Option<Qwen2>, config: TrainerConfig) -> Result<Self> {
        config.validate()?;
        if model.kind() != Kind::Float {
            return Err(LearnerError::config(
                "dtype",
                format!("the trained model must be float32, not {:?}", model.kind()),
            ));
        }
        if config.grpo.kl_coef > 0.0 && reference.is_none() {
            return Err(LearnerError::config(
                "kl_coef",
                "a KL penalty needs a reference model",
            ));
        }
        if let Some(r) = &reference {
            if r.config().vocab_size != model.config().vocab_size || r.device() != model.device() {
                return Err(LearnerError::config(
                    "reference",
                    "the reference model must share the policy's vocabulary and device",
                ));
            }
        }
        let optimizer = if config.sharding.shards() {
            AdamW::deferred(model.var_store(), config.optimizer.clone())?
        } else {
            AdamW::new(model.var_store(), config.optimizer.clone())?
        };
        let compute = match config.precision {
            Precision::F32 => None,
            Precision::Bf16 => Some(ComputeCopy::new(&model)?),
        };
        Ok(Trainer {
            model,
            compute,
            reference,
            optimizer,
            config,
            progress: Progress::default(),
            sync: None,
            shard: None,
            pending_shards: None,
        })
    }

    /// Joins a data-parallel group: rank 0's weights, optimizer state and counters are
    /// copied to every rank (all ranks call this together), and from now on every step
    /// sums the ranks' gradients. With sharding, only the weights are copied and every
    /// rank then keeps its shard of the optimizer (zero moments, or, when rank 0 resumed
    /// a sharded checkpoint, [`Self::pending_shards`] names the step whose shard files
    /// each rank loads next).
    pub fn attach(&mut self, mut sync: GradSync) -> Result<()> {
        let device = self.model.device();
        let sharded = self.config.sharding.shards();
        let mut state = if sharded {
            self.optimizer.params()
        } else {
            self.optimizer.state_tensors()
        };
        let p = self.progress;
        let counters = [
            p.step as f32,
            p.version as f32,
            p.consecutive_bad_steps as f32,
            p.skipped_steps as f32,
            self.optimizer.steps() as f32,
            self.pending_shards.map_or(-1.0, |step| step as f32),
        ];
        state.push(Tensor::from_slice(&counters).to_device(device));
        sync.broadcast_from_root(&mut state)?;
        let counters =
            Vec::<f32>::try_from(state.pop().expect("pushed").to_device(tch::Device::Cpu))?;
        self.progress = Progress {
            step: counters[0] as u64,
            version: counters[1] as u64,
            consecutive_bad_steps: counters[2] as u32,
            skipped_steps: counters[3] as u64,
        };
        self.optimizer.set_steps(counters[4] as u64);
        if sharded {
            let params = self.optimizer.params();
            let names: Vec<&str> = self.optimizer.moments().map(|(name, _, _)| name).collect();
            let units = shard::units(&names, self.config.sharding, self.model.num_layers());
            let state = ShardedState::new(
                &params,
                units,
                self.config.sharding,
                sync.world_size(),
                sync.rank(),
                sync.bucket_bytes(),
            )?;
            for layer in 0..state.sharded_layers() {
                state.release_layer(layer, &params)?;
                if let Some(compute) = &self.compute {
                    state.release_layer(layer, &compute.params())?;
                }
            }
            self.shard = Some(state);
            self.pending_shards = (counters[5] >= 0.0).then_some(counters[5] as u64);
        }
        self.sync = Some(sync);
        Ok(())
    }

    /// The step of the sharded checkpoint whose optimiser shards this rank must load
    /// ([`crate::train::checkpoint::load_shard`]) before training on.
    pub fn pending_shards(&self) -> Option<u64> {
        self.pending_shards
    }

    /// This rank's optimiser shard (sharding on, in a group).
    pub fn shard(&self) -> Option<&ShardedState> {
        self.shard.as_ref()
    }

    /// Checks that every rank holds the same weights (all ranks call it together); returns
    /// the relative spread of their checksums (0 when alone).
    pub fn check_ranks(&mut self) -> Result<f64> {
        let params = self.optimizer.params();
        let (step, device) = (self.progress.step, self.model.device());
        match &mut self.sync {
            Some(sync) => sync.check_same_weights(&params, step, device),
            None => Ok(0.0),
        }
    }

    /// The policy being trained (the f32 master weights).
    pub fn model(&self) -> &Qwen2 {
        &self.model
    }

    /// The model the passes run on: the bf16 compute copy under mixed precision (as of
    /// the last step's start), else the policy itself.
    pub fn compute_model(&self) -> &Qwen2 {
        self.compute
            .as_ref()
            .map_or(&self.model, ComputeCopy::model)
    }

    /// Whether the decoder layers' weights are sharded over the group (ZeRO-3 in a group):
    /// then [`Self::full_weights`] is a collective call.
    pub fn shards_weights(&self) -> bool {
        self.shard.as_ref().is_some_and(|s| s.sharded_layers() > 0)
    }

    /// Every weight of the policy under its Hugging Face name, copied, in `kind`. Under
    /// ZeRO-3 the decoder layers' weights are all-gathered one layer at a time and freed
    /// again, so every rank of the group must call it at the same point. The copies hold
    /// no autograd history: the publisher and checkpoint threads may keep them while the
    /// next step runs, and an edge to a ZeRO-3 parameter would keep its gradient
    /// accumulator alive with the gathered shape after the parameter is freed.
    pub fn full_weights(&mut self, kind: Kind) -> Result<Vec<(String, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let own = self.model.kind();
        let copied = |(name, t): (String, Tensor)| {
            let t = if kind == own { t.copy() } else { t };
            (name, t)
        };
        let gathers = self.shards_weights();
        let (Some(shard), Some(sync), true) = (self.shard.as_ref(), self.sync.as_mut(), gathers)
        else {
            return Ok(self
                .model
                .hf_tensors(kind)
                .into_iter()
                .map(copied)
                .collect());
        };
        let params = self.optimizer.params();
        let mut weights: Vec<(String, Tensor)> = self
            .model
            .hf_tensors_of(kind, |name| !name.starts_with("model.layers."))
            .into_iter()
            .map(copied)
            .collect();
        for layer in 0..shard.sharded_layers() {
            shard.gather_layer(layer, sync.collective(), &params)?;
            let prefix = format!("model.layers.{layer}.");
            let of_layer = self
                .model
                .hf_tensors_of(kind, |name| name.starts_with(&prefix));
            weights.extend(of_layer.into_iter().map(copied));
            shard.release_layer(layer, &params)?;
        }
        Ok(weights)
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The step counters.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// The policy, optimizer and counters, for restoring a checkpoint.
    pub(crate) fn parts_mut(&mut self) -> (&mut Qwen2, &mut AdamW, &mut Progress) {
        (&mut self.model, &mut self.optimizer, &mut self.progress)
    }

    /// The optimizer shard, the optimizer (for its update count) and the pending step,
    /// for restoring a sharded checkpoint.
    pub(crate) fn shard_parts_mut(
        &mut self,
    ) -> (Option<&mut ShardedState>, &mut AdamW, &mut Option<u64>) {
        (
            self.shard.as_mut(),
            &mut self.optimizer,
            &mut self.pending_shards,
        )
    }

    /// Trains on one batch: validates it, accumulates the gradient of the batch loss over
    /// micro-batches, clips, and applies one AdamW update, unless the loss or the gradient
    /// norm is not finite; then the weights and optimizer state stay as they were and the
    /// step is reported as skipped. More than `max_consecutive_bad_steps` skipped steps in a
    /// row is an error.
    pub fn step(&mut self, batch: &[TrainSample]) -> Result<StepStats> {
        validate_batch(batch, self.model.config())?;
        let weights = grpo::token_weights(batch, self.config.grpo.aggregation);
        self.train(batch, &weights)
    }

    /// One step on this rank's `shard` of a global batch, `weights[i]` being sample `i`'s
    /// per-token weight in the global loss ([`grpo::token_weights`] of the whole batch).
    /// In a data-parallel group every rank calls it for the same step (a shard may be
    /// empty); the ranks' gradients are summed, so all of them take the same update.
    pub fn step_shard(&mut self, shard: &[TrainSample], weights: &[f64]) -> Result<StepStats> {
        if weights.len() != shard.len() {
            return Err(LearnerError::config(
                "weights",
                format!("{} weights for {} samples", weights.len(), shard.len()),
            ));
        }
        if self.sync.is_none() || !shard.is_empty() {
            validate_batch(shard, self.model.config())?;
        }
        self.train(shard, weights)
    }

    /// The step itself on a checked `batch` with one loss weight per sample.
    fn train(&mut self, batch: &[TrainSample], weights: &[f64]) -> Result<StepStats> {
        if let Some(step) = self.pending_shards {
            return Err(LearnerError::config(
                "grpo.sharding",
                format!(
                    "the optimizer shards of the sharded checkpoint of step {step} were not \
                     loaded: a sharded checkpoint resumes on a group of the learner ranks \
                     that wrote it"
                ),
            ));
        }
        let start = Instant::now();
        let packing = self.config.memory.packing;
        let groups = match packing {
            true => packed_micro_batches(batch, self.config.micro_batch_tokens),
            false => micro_batches(batch, self.config.micro_batch_tokens),
        };
        let zero3 = self.shards_weights();
        if let Some(shard) = &mut self.shard {
            shard.restore_grads(&self.optimizer.params())?;
            shard.zero_grad()?;
        }
        self.optimizer.zero_grad();
        if self.sync.is_some() {
            self.define_zero_grads()?;
        }
        if let Some(compute) = &self.compute {
            compute.refresh(&self.model)?;
            compute.zero_grads();
        }
        let mut sums = LossSums::default();
        let mut finite = true;
        if zero3 {
            (sums, finite) = self.zero3_passes(batch, weights, &groups)?;
        } else {
            for group in &groups {
                let samples: Vec<&TrainSample> = group.iter().map(|&i| &batch[i]).collect();
                let group_weights: Vec<f64> = group.iter().map(|&i| weights[i]).collect();
                let part = grpo::micro_batch_backward(
                    self.compute_model(),
                    self.reference.as_ref(),
                    &samples,
                    &group_weights,
                    &self.config.grpo,
                    &self.config.memory,
                    None,
                )?;
                if let Some(compute) = &self.compute {
                    compute.accumulate_grads(&self.model)?;
                }
                sums.add(&part);
                if !part.loss.is_finite() {
                    finite = false;
                    break;
                }
            }
        }
        let forward_backward_seconds = start.elapsed().as_secs_f64();
        let shard_tokens = batch.iter().map(|s| s.response.len()).sum();
        sums.tokens = shard_tokens;
        let mut sequences = batch.len();
        if let Some(sync) = &mut self.sync {
            let device = self.model.device();
            (sums, sequences, finite) = sync.reduce_sums(&sums, sequences, finite, device)?;
            if finite {
                match &mut self.shard {
                    Some(shard) => {
                        shard.reduce_scatter_grads(sync.collective(), &self.optimizer.params())?
                    }
                    None => sync.all_reduce_grads(&self.optimizer.params())?,
                }
            }
        }
        let max_norm = self.config.optimizer.max_grad_norm;
        let grad_norm = match (&mut self.shard, &mut self.sync) {
            _ if !finite => f64::NAN,
            (Some(shard), Some(sync)) => shard.clip_grad_norm(sync.collective(), max_norm)?,
            _ => self.optimizer.clip_grad_norm()?,
        };
        let applied = grad_norm.is_finite();
        let lr = match (&mut self.shard, &mut self.sync) {
            _ if !applied => self.optimizer.next_lr(),
            (Some(shard), Some(sync)) => {
                let lr = self.optimizer.next_lr();
                let k = self.optimizer.steps() + 1;
                shard.step(&self.config.optimizer, k, lr)?;
                self.optimizer.set_steps(k);
                shard.all_gather_params(sync.collective(), &self.optimizer.params())?;
                lr
            }
            _ => self.optimizer.step()?,
        };
        self.optimizer.zero_grad();
        let p = &mut self.progress;
        p.step += 1;
        if applied {
            p.version += 1;
            p.consecutive_bad_steps = 0;
        } else {
            p.consecutive_bad_steps += 1;
            p.skipped_steps += 1;
            tracing::warn!(
                step = p.step,
                loss = sums.loss,
                grad_norm,
                consecutive = p.consecutive_bad_steps,
                "skipping a step with a non-finite loss or gradient norm"
            );
            if p.consecutive_bad_steps > self.config.max_consecutive_bad_steps {
                return Err(LearnerError::TooManyBadSteps {
                    count: p.consecutive_bad_steps,
                    max: self.config.max_consecutive_bad_steps,
                });
            }
        }
        let stats = sums.finish();
        let seconds = start.elapsed().as_secs_f64();
        Ok(StepStats {
            step: p.step,
            version: p.version,
            skipped: !applied,
            consecutive_bad_steps: p.consecutive_bad_steps,
            loss: stats.loss,
            clip_fraction: stats.clip_fraction,
            mean_ratio: stats.mean_ratio,
            mean_kl: stats.mean_kl,
            entropy: stats.entropy,
            grad_norm,
            lr,
            tokens: stats.tokens,
            shard_tokens,
            sequences,
            micro_batches: groups.len(),
            padding_share: padding_share(batch, &groups, packing),
            seconds,
            forward_backward_seconds,
            optimizer_seconds: seconds - forward_backward_seconds,
        })
    }

    /// ZeRO-3's micro-batches: as many on every rank as the rank with the most has, each
    /// through the checkpointed pass with [`LayerPass`] gathering, freeing and
    /// reduce-scattering layer by layer; after a non-finite loss the rest only keep the
    /// schedule. Returns the summed statistics and whether every loss was finite.
    fn zero3_passes(
        &mut self,
        batch: &[TrainSample],
        weights: &[f64],
        groups: &[Vec<usize>],
    ) -> Result<(LossSums, bool)> {
        let (Some(shard), Some(sync)) = (self.shard.as_mut(), self.sync.as_mut()) else {
            return Err(LearnerError::config(
                "grpo.sharding",
                "zero3 trains only in a data-parallel group",
            ));
        };
        // The layers are gathered into the model the passes run on.
        let (model, params) = match &self.compute {
            Some(compute) => (compute.model(), compute.params()),
            None => (&self.model, self.optimizer.params()),
        };
        let device = self.model.device();
        let passes = zero3::agree_passes(sync.collective(), groups.len(), device)?;
        let mut sums = LossSums::default();
        let mut finite = true;
        for i in 0..passes {
            let mut pass = LayerPass::new(shard, sync.collective(), &params);
            if let (true, Some(group)) = (finite, groups.get(i)) {
                let samples: Vec<&TrainSample> = group.iter().map(|&i| &batch[i]).collect();
                let group_weights: Vec<f64> = group.iter().map(|&i| weights[i]).collect();
                let part = grpo::micro_batch_backward(
                    model,
                    self.reference.as_ref(),
                    &samples,
                    &group_weights,
                    &self.config.grpo,
                    &self.config.memory,
                    Some(&mut pass),
                )?;
                if let Some(compute) = &self.compute {
                    compute.accumulate_grads(&self.model)?;
                }
                sums.add(&part);
                finite = part.loss.is_finite();
            }
            pass.finish()?;
        }
        Ok((sums, finite))
    }

    /// Gives every parameter a zero gradient, so that a rank with little or no data still
    /// takes part in every gradient all-reduce.
    fn define_zero_grads(&mut self) -> Result<()> {
        let params = self.optimizer.params();
        let Some(first) = params.first() else {
            return Ok(());
        };
        let mut zero = first.f_sum(Kind::Float)?.f_mul_scalar(0.0)?;
        for p in &params[1..] {
            zero = zero.f_add(&p.f_sum(Kind::Float)?.f_mul_scalar(0.0)?)?;
        }
        zero.f_backward()?;
        Ok(())
    }
}

/// Share of the forward-pass positions of `batch` split into `groups` that are padding
/// (none when packed).
fn padding_share(batch: &[TrainSample], groups: &[Vec<usize>], packing: bool) -> f64 {
    let padded = padded_tokens(batch, groups);
    if packing || padded == 0 {
        return 0.0;
    }
    let real: usize = batch.iter().map(TrainSample::total_tokens).sum();
    1.0 - real as f64 / padded as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch, sample, tiny_model, trainer_config};
    use crate::train::grpo::{response_logprobs, LossAggregation, MemoryConfig};

    /// A snapshot (copies: `hf_tensors` may alias the live parameters).
    fn weights(trainer: &Trainer) -> Vec<(String, Tensor)> {
        let tensors = trainer.model().hf_tensors(Kind::Float);
        tensors.into_iter().map(|(n, t)| (n, t.copy())).collect()
    }

    fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
        a.iter()
            .zip(b)
            .map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn micro_batching_does_not_change_the_update() {
        for aggregation in [LossAggregation::TokenMean, LossAggregation::SequenceMean] {
            let mut whole =
                Trainer::new(tiny_model(1), None, trainer_config(1000, aggregation, 0.05)).unwrap();
            let mut split =
                Trainer::new(tiny_model(1), None, trainer_config(12, aggregation, 0.05)).unwrap();
            let before = weights(&whole);
            let a = whole.step(&batch()).unwrap();
            let b = split.step(&batch()).unwrap();
            assert_eq!((a.micro_batches, b.micro_batches), (1, 4));
            assert!((a.loss - b.loss).abs() < 1e-6, "{a:?} vs {b:?}");
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-6 * a.grad_norm);
            let moved = max_diff(&before, &weights(&whole));
            let diff = max_diff(&weights(&whole), &weights(&split));
            // Micro-batches sum the same gradients in another order: f32 rounding, a
            // few ulps of the ~0.01 step, not a different update.
            assert!(moved > 1e-3 && diff < 1e-5, "moved {moved}, differs {diff}");
            assert_eq!((a.version, a.step, a.tokens, a.sequences), (1, 1, 21, 4));
        }
    }

    #[test]
    fn chunking_and_checkpointing_do_not_change_the_update() {
        let config = trainer_config(12, LossAggregation::TokenMean, 0.05);
        let mut saving_config = config.clone();
        saving_config.memory = MemoryConfig {
            logprob_chunk_tokens: 2,
            activation_checkpointing: true,
            packing: true,
        };
        let mut plain = Trainer::new(tiny_model(6), None, config).unwrap();
        let mut saving = Trainer::new(tiny_model(6), None, saving_config).unwrap();
        let before = weights(&plain);
        for _ in 0..2 {
            let a = plain.step(&batch()).unwrap();
            let b = saving.step(&batch()).unwrap();
            assert!((a.loss - b.loss).abs() < 1e-6, "{a:?} vs {b:?}");
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm);
            assert!((a.entropy - b.entropy).abs() < 1e-5 * a.entropy);
        }
        let moved = max_diff(&before, &weights(&plain));
        let diff = max_diff(&weights(&plain), &weights(&saving));
        // Same gradients summed in another order: f32 rounding of the ~0.01 steps.
        assert!(moved > 1e-3 && diff < 1e-5, "moved {moved}, differs {diff}");
    }

    #[test]
    fn the_memory_plan_counts_the_bytes_the_trainer_holds() {
        use quill_model::memory_plan::{self, LearnerSetup, ModelSize, Sharding};
        for (precision, planned, per_param) in [
            (Precision::F32, memory_plan::Precision::F32, 16),
            (Precision::Bf16, memory_plan::Precision::Bf16, 20),
        ] {
            let (model, _) =
                quill_model::default_model::load(tch::Device::Cpu, Kind::Float).unwrap();
            let size = ModelSize::of(model.config());
            let config = TrainerConfig {
                precision,
                ..TrainerConfig::default()
            };
            let mut trainer = Trainer::new(model, None, config).unwrap();
            // A step allocates the gradients (zeroed after the update, not freed).
            trainer.step(&batch()).unwrap();
            let bytes = |t: &Tensor| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
            let vars = |m: &Qwen2| m.var_store().variables().into_values().collect::<Vec<_>>();
            let (masters, compute) = (vars(trainer.model()), vars(trainer.compute_model()));
            let moments: u64 = trainer
                .optimizer()
                .moments()
                .map(|(_, m, v)| bytes(m) + bytes(v))
                .sum();
            let grads = |vs: &[Tensor]| vs.iter().map(|v| bytes(&v.grad())).sum::<u64>();
            let values = |vs: &[Tensor]| vs.iter().map(bytes).sum::<u64>();
            let (weights, gradients, optimizer) = match precision {
                Precision::F32 => (values(&masters), grads(&masters), moments),
                Precision::Bf16 => (
                    values(&compute),
                    grads(&compute) + grads(&masters),
                    values(&masters) + moments,
                ),
            };
            let setup = LearnerSetup {
                gpus: 1,
                sharding: Sharding::None,
                precision: planned,
                activation_checkpointing: false,
                micro_batch_tokens: 16_384,
                logprob_chunk_tokens: 1024,
            };
            let work = memory_plan::Workload {
                group_size: 4,
                prompts_per_step: 1,
                max_tokens: 11,
            };
            let plan = memory_plan::learner_memory(&size, &setup, &work);
            // The plan counts the same tensors: exact, no tolerance needed.
            assert_eq!(
                (plan.weights, plan.gradients, plan.optimizer),
                (weights, gradients, optimizer),
                "{precision:?}"
            );
            assert_eq!(weights + gradients + optimizer, per_param * size.params);
        }
    }

    /// Losses of `steps` steps on one batch whose behaviour log-probs are the starting
    /// policy's, in `precision`.
    fn losses(precision: Precision, steps: usize) -> Vec<f64> {
        let mut config = trainer_config(1000, LossAggregation::TokenMean, 1.0);
        config.precision = precision;
        let mut trainer = Trainer::new(tiny_model(8), None, config).unwrap();
        let mut batch = batch();
        let refs: Vec<&TrainSample> = batch.iter().collect();
        let current = response_logprobs(trainer.model(), &refs, 0.8).unwrap();
        for (s, lp) in batch.iter_mut().zip(current) {
            s.behaviour_logprobs = lp;
        }
        (0..steps)
            .map(|_| {
                let stats = trainer.step(&batch).unwrap();
                assert!(!stats.skipped, "{stats:?}");
                stats.loss
            })
            .collect()
    }

    #[test]
    fn a_bf16_run_lowers_the_loss_as_f32_does() {
        let (full, mixed) = (losses(Precision::F32, 6), losses(Precision::Bf16, 6));
        eprintln!("f32 losses {full:?}\nbf16 losses {mixed:?}");
        let drop = full[0] - full[5];
        assert!(
            drop > 0.0 && mixed[0] - mixed[5] > 0.5 * drop,
            "{full:?} vs {mixed:?}"
        );
        // Loosely the same course: bf16 rounding (2^-9 relative per operation) moves
        // each loss by a small fraction of the total descent.
        for (k, (a, b)) in full.iter().zip(&mixed).enumerate() {
            assert!(
                (a - b).abs() < 0.1 * drop,
                "step {k}: {full:?} vs {mixed:?}"
            );
        }
    }

    #[test]
    fn packing_does_not_change_the_update_and_leaves_no_padding() {
        let config = trainer_config(20, LossAggregation::TokenMean, 0.05);
        let mut padded_config = config.clone();
        padded_config.memory.packing = false;
        let mut packed = Trainer::new(tiny_model(9), None, config).unwrap();
        let mut padded = Trainer::new(tiny_model(9), None, padded_config).unwrap();
        let before = weights(&packed);
        for _ in 0..2 {
            let a = packed.step(&batch()).unwrap();
            let b = padded.step(&batch()).unwrap();
            // Totals 9, 7, 11, 11 tokens: packed 11 + 9, 11 + 7; padded rows by length.
            assert_eq!(a.micro_batches, 2, "{a:?}");
            assert_eq!(a.padding_share, 0.0);
            assert!(b.padding_share > 0.0, "{b:?}");
            assert!((a.loss - b.loss).abs() < 1e-6, "{a:?} vs {b:?}");
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-5 * b.grad_norm);
        }
        let moved = max_diff(&before, &weights(&packed));
        let diff = max_diff(&weights(&packed), &weights(&padded));
        assert!(moved > 1e-3 && diff < 1e-5, "moved {moved}, differs {diff}");
    }

    #[test]
    fn positive_advantages_raise_log_probs() {
        let mut trainer = Trainer::new(
            tiny_model(2),
            None,
            trainer_config(1000, LossAggregation::TokenMean, 0.05),
        )
        .unwrap();
        let mut batch = vec![sample(5, 4, 5, 0.0, 1.0), sample(6, 4, 5, 0.0, -1.0)];
        let logp = |t: &Trainer, batch: &[TrainSample]| {
            let samples: Vec<&TrainSample> = batch.iter().collect();
            response_logprobs(t.model(), &samples, 0.8).unwrap()
        };
        let current = logp(&trainer, &batch);
        for (s, lp) in batch.iter_mut().zip(&current) {
            s.behaviour_logprobs = lp.clone();
        }
        let stats = trainer.step(&batch).unwrap();
        assert!((stats.mean_ratio - 1.0).abs() < 1e-6, "{stats:?}");
        assert_eq!(stats.clip_fraction, 0.0);
        let total = |lp: &[f32]| lp.iter().sum::<f32>();
        let after = logp(&trainer, &batch);
        assert!(
            total(&after[0]) > total(&current[0]),
            "{current:?} → {after:?}"
        );
        assert!(
            total(&after[1]) < total(&current[1]),
            "{current:?} → {after:?}"
        );
    }

    #[test]
    fn non_finite_steps_are_skipped_then_fail() {
        let mut trainer = Trainer::new(
            tiny_model(3),
            None,
            trainer_config(1000, LossAggregation::TokenMean, 0.05),
        )
        .unwrap();
        let before = weights(&trainer);
        // A behaviour log-prob far below the policy's makes the ratio overflow to +inf.
        let poisoned = vec![sample(1, 3, 4, -1000.0, -1.0), sample(2, 3, 4, -3.9, 1.0)];
        let stats = trainer.step(&poisoned).unwrap();
        assert!(stats.skipped && !stats.loss.is_finite(), "{stats:?}");
        assert_eq!(
            (stats.step, stats.version, stats.consecutive_bad_steps),
            (1, 0, 1)
        );
        assert_eq!(max_diff(&before, &weights(&trainer)), 0.0);
        assert_eq!(trainer.optimizer().steps(), 0);
        for (name, m, v) in trainer.optimizer().moments() {
            let zero = |t: &Tensor| t.abs().max().double_value(&[]) == 0.0;
            assert!(zero(m) && zero(v), "{name} moments changed");
        }
        let good = trainer.step(&batch()).unwrap();
        assert!(!good.skipped && good.grad_norm.is_finite());
        assert_eq!(
            (good.step, good.version, good.consecutive_bad_steps),
            (2, 1, 0)
        );
        trainer.step(&poisoned).unwrap();
        let err = trainer.step(&poisoned).unwrap_err().to_string();
        assert!(err.contains("max_consecutive_bad_steps = 1"), "{err}");
        assert_eq!(trainer.progress().skipped_steps, 3);
    }

    #[test]
    fn malformed_samples_are_rejected_by_index() {
        let mut trainer = Trainer::new(
            tiny_model(4),
            None,
            trainer_config(1000, LossAggregation::TokenMean, 0.05),
        )
        .unwrap();
        let mut nan_advantage = batch();
        nan_advantage[2].advantage = f32::NAN;
        let err = trainer.step(&nan_advantage).unwrap_err().to_string();
        assert!(
            err.contains("sample 2") && err.contains("advantage"),
            "{err}"
        );
        let mut inf_logprob = batch();
        inf_logprob[1].behaviour_logprobs[0] = f32::INFINITY;
        let err = trainer.step(&inf_logprob).unwrap_err().to_string();
        assert!(
            err.contains("sample 1") && err.contains("log-prob 0"),
            "{err}"
        );
        let mut short = batch();
        short[0].behaviour_logprobs.pop();
        let err = trainer.step(&short).unwrap_err().to_string();
        assert!(
            err.contains("sample 0") && err.contains("5 behaviour log-probs"),
            "{err}"
        );
        let mut out_of_vocab = batch();
        out_of_vocab[3].response[1] = 48;
        let err = trainer.step(&out_of_vocab).unwrap_err().to_string();
        assert!(
            err.contains("sample 3") && err.contains("token id 48"),
            "{err}"
        );
        let mut empty = batch();
        empty[0].response.clear();
        empty[0].behaviour_logprobs.clear();
        let err = trainer.step(&empty).unwrap_err().to_string();
        assert!(err.contains("sample 0: empty response"), "{err}");
        assert!(matches!(trainer.step(&[]), Err(LearnerError::EmptyBatch)));
        assert_eq!(trainer.progress(), Progress::default());
    }

    #[test]
    fn kl_needs_a_reference() {
        let mut c = trainer_config(1000, LossAggregation::TokenMean, 0.05);
        c.grpo.kl_coef = 0.1;
        let err = Trainer::new(tiny_model(5), None, c.clone()).err().unwrap();
        assert!(err.to_string().contains("kl_coef"), "{err}");
        let mut trainer = Trainer::new(tiny_model(5), Some(tiny_model(5)), c).unwrap();
        let first = trainer.step(&batch()).unwrap();
        assert!(first.mean_kl.abs() < 1e-6, "identical models: {first:?}");
        let second = trainer.step(&batch()).unwrap();
        assert!(second.mean_kl > 0.0, "{second:?}");
    }
}
