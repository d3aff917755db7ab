//! Sharded optimiser state and gradients (ZeRO stages 1 and 2) for a data-parallel
//! learner of K ranks.
//!
//! The trained parameters, in the optimiser's name order, are flattened into one vector of
//! N values and padded with zeros to `K·S` values, `S = ⌈N / K⌉`. Rank `r` owns the
//! contiguous range `r·S .. (r+1)·S` of that vector: for it, and only for it, the rank keeps
//! an f32 master copy, both AdamW moments and the summed gradient. A step:
//!
//! 1. every rank back-propagates its own samples into full-size gradients (as unsharded);
//! 2. the gradients are reduce-scattered in buckets: bucket `b` takes elements
//!    `b·c .. (b+1)·c` of every rank's range (`c` from `parallel.bucket_mb`), so each rank
//!    receives the sum over ranks of its own range; ZeRO-2 then frees the full gradients
//!    (they are allocated again at the next step's backward), ZeRO-1 keeps them;
//! 3. the global gradient norm is the square root of the all-reduced sum of every rank's
//!    squared shard; clipping scales the shards (`clip_grad_norm_`'s coefficient); a
//!    non-finite norm skips the step on every rank alike;
//! 4. each rank applies AdamW (`train::optim`'s formula) to its master shard, and the
//!    updated shards are all-gathered, bucket by bucket, into every rank's full weights.
//!
//! Ownership depends only on N and K, not on the bucket size, so a checkpoint's shard files
//! fit any `bucket_mb`; another K is refused (see `train::checkpoint`).
//!
//! ZeRO-3 also shards the weights. The parameters are split into units, each flattened
//! and sharded as above on its own: one unit per decoder layer, and one of the rest (the
//! embedding, the final norm and an untied head). The rest stays resident on every rank
//! like ZeRO-2's weights; a layer's weights exist only as each rank's master shard and
//! are all-gathered just before the layer runs, in the forward pass and again for its
//! recomputation in the layer-by-layer backward, and freed right after; its gradients are
//! reduce-scattered into the ranks' shards as soon as its backward is done (see
//! `train::zero3`). Since a unit's ranges lie end to end, the all-gathered vector is the
//! unit's flattened parameters, and the weights become views of it, uncopied.

use crate::error::{LearnerError, Result};
use crate::parallel::collective::{Collective, ReduceOp};
use crate::train::optim::AdamWConfig;
use crate::train::state_file;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// How the learner spreads its training state over its ranks (`grpo.sharding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Every rank holds everything.
    #[default]
    None,
    /// Master weights and AdamW moments sharded.
    Zero1,
    /// Also the gradients (the full gradients are freed after the reduce-scatter).
    Zero2,
    /// Also the decoder layers' weights, gathered layer by layer as the passes need them.
    Zero3,
}

impl Sharding {
    /// Whether the optimiser state is sharded.
    pub fn shards(self) -> bool {
        self != Sharding::None
    }

    /// The name the job file uses.
    pub fn name(self) -> &'static str {
        match self {
            Sharding::None => "none",
            Sharding::Zero1 => "zero1",
            Sharding::Zero2 => "zero2",
            Sharding::Zero3 => "zero3",
        }
    }
}

/// Metadata keys of a shard file.
const WORLD_KEY: &str = "world_size";
const RANK_KEY: &str = "rank";
const TOTAL_KEY: &str = "flat_params";
const STEP_KEY: &str = "step";
const MASTER: &str = "master";
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const UNITS_KEY: &str = "units";

/// Which part of the flattened parameters a rank owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// Ranks.
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// Values in every parameter, in order.
    pub sizes: Vec<usize>,
    /// Trained values in all (N).
    pub total: usize,
    /// Values per rank (S = ⌈N / K⌉; the last ranks' ranges end in padding).
    pub shard_len: usize,
}

impl ShardLayout {
    /// The layout of parameters with `sizes` values over `world` ranks, seen from `rank`.
    pub fn new(sizes: Vec<usize>, world: usize, rank: usize) -> Self {
        let total = sizes.iter().sum::<usize>();
        ShardLayout {
            world,
            rank,
            shard_len: total.div_ceil(world.max(1)),
            sizes,
            total,
        }
    }

    /// Calls `f(param, offset_in_param, offset_in_range, len)` for every piece of the flat
    /// range `start .. end` that lies in a parameter (padding beyond N is skipped).
    fn segments(&self, start: usize, end: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut param_start = 0;
        for (i, &size) in self.sizes.iter().enumerate() {
            let param_end = param_start + size;
            let (a, b) = (start.max(param_start), end.min(param_end));
            if a < b {
                f(i, a - param_start, a - start, b - a);
            }
            if param_end >= end {
                break;
            }
            param_start = param_end;
        }
    }
}

/// Parameters sharded as one flat vector: all of them (ZeRO-1/2), or one decoder layer's,
/// or the rest (ZeRO-3).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unit {
    /// Indices into the parameter list, in order.
    params: Vec<usize>,
    /// How the unit's values are split over the ranks.
    layout: ShardLayout,
    /// Where the unit's range starts in this rank's shard tensors.
    offset: usize,
    /// The parameters' shapes (ZeRO-3 frees a layer's weights between its uses).
    shapes: Vec<Vec<i64>>,
}

/// The units of `names` (the trained parameters, in order): one of all for ZeRO-1/2; for
/// ZeRO-3 first the parameters outside the decoder layers, then each of `layers` layers'
/// (`model.layers.{l}.…`).
pub fn units(names: &[&str], sharding: Sharding, layers: usize) -> Vec<Vec<usize>> {
    if sharding != Sharding::Zero3 {
        return vec![(0..names.len()).collect()];
    }
    let mut units = vec![Vec::new(); layers + 1];
    for (i, name) in names.iter().enumerate() {
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(l, _)| l.parse::<usize>().ok())
            .filter(|&l| l < layers);
        units[layer.map_or(0, |l| l + 1)].push(i);
    }
    units
}

/// One rank's share of the optimiser: f32 master weights, AdamW moments and the summed
/// gradient for its range of each unit of the flattened parameters.
pub struct ShardedState {
    sharding: Sharding,
    world: usize,
    rank: usize,
    units: Vec<Unit>,
    bucket_values: usize,
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor,
}

/// A copy of a rank's shard, detached so another thread can write it.
pub struct ShardState {
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
}

impl ShardState {
    /// Writes the shard to a safetensors file, as [`ShardedState::load`] reads it.
    pub fn write(&self, path: &Path) -> Result<()> {
        state_file::write(path, &self.tensors, self.metadata.clone())
    }
}

impl ShardedState {
    /// This rank's shard of `params` (equal on every rank), grouped into `units`
    /// ([`units`]): the master copy taken from them, zero moments and gradient;
    /// collectives move `bucket_bytes` of f32 per rank at a time.
    pub fn new(
        params: &[Tensor],
        units: Vec<Vec<usize>>,
        sharding: Sharding,
        world: usize,
        rank: usize,
        bucket_bytes: usize,
    ) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let mut offset = 0;
        let units: Vec<Unit> = units
            .into_iter()
            .map(|indices| {
                let sizes = indices.iter().map(|&i| params[i].numel()).collect();
                let layout = ShardLayout::new(sizes, world, rank);
                let unit = Unit {
                    shapes: indices.iter().map(|&i| params[i].size()).collect(),
                    params: indices,
                    offset,
                    layout,
                };
                offset += unit.layout.shard_len;
                unit
            })
            .collect();
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let zeros = || Tensor::f_zeros([offset as i64], (Kind::Float, device));
        let master = zeros()?;
        for unit in &units {
            let start = rank * unit.layout.shard_len;
            let mut failed = None;
            unit.layout
                .segments(start, start + unit.layout.shard_len, |p, from, to, len| {
                    let copied = params[unit.params[p]]
                        .f_reshape([-1])
                        .and_then(|flat| flat.f_narrow(0, from as i64, len as i64))
                        .and_then(|src| {
                            master
                                .f_narrow(0, (unit.offset + to) as i64, len as i64)?
                                .f_copy_(&src.f_to_kind(Kind::Float)?)
                        });
                    if let Err(e) = copied {
                        failed.get_or_insert(e);
                    }
                });
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
        Ok(ShardedState {
            sharding,
            world,
            rank,
            bucket_values: (bucket_bytes / 4).max(1),
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            grad: zeros()?,
            master,
            units,
        })
    }

    /// The ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Trained values in all (N, over every unit).
    pub fn total(&self) -> usize {
        self.units.iter().map(|u| u.layout.total).sum()
    }

    /// The decoder layers whose weights are sharded (ZeRO-3; else 0).
    pub fn sharded_layers(&self) -> usize {
        match self.sharding {
            Sharding::Zero3 => self.units.len() - 1,
            _ => 0,
        }
    }

    /// The f32 master copy of this rank's range.
    pub fn master(&self) -> &Tensor {
        &self.master
    }

    /// The first and second AdamW moments of this rank's range.
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// The summed gradient of this rank's range (after the reduce-scatter).
    pub fn grad(&self) -> &Tensor {
        &self.grad
    }

    /// The buckets of unit `u`: (first value in a rank's range, values) of each.
    fn buckets(&self, u: usize) -> Vec<(usize, usize)> {
        let s = self.units[u].layout.shard_len;
        let c = self.bucket_values.min(s.max(1));
        (0..s.div_ceil(c))
            .map(move |b| (b * c, c.min(s - b * c)))
            .collect()
    }

    /// Gives back the full gradients of the resident parameters that ZeRO-2 and ZeRO-3
    /// freed after the last step (zeros, the parameters' shapes), so the next backward
    /// pass can accumulate into them.
    pub fn restore_grads(&self, params: &[Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for &i in &self.units[0].params {
            let p = &params[i];
            let mut g = p.grad();
            if g.defined() && g.numel() != p.numel() {
                g.f_set_data(&p.f_zeros_like()?)?;
            }
        }
        Ok(())
    }

    /// Zeroes this rank's summed gradient: ZeRO-3 adds each layer's gradient into it
    /// micro-batch by micro-batch.
    pub fn zero_grad(&mut self) -> Result<()> {
        let _ = self.grad.f_zero_()?;
        Ok(())
    }

    /// Sums every rank's full gradients of the resident parameters (all of them, but for
    /// ZeRO-3's layers) into the ranks' shards, bucket by bucket; ZeRO-2 and ZeRO-3 then
    /// free the full gradients. Every gradient must be defined.
    pub fn reduce_scatter_grads(
        &mut self,
        collective: &mut dyn Collective,
        params: &[Tensor],
    ) -> Result<()> {
        self.reduce_scatter_unit(0, collective, params, false)
    }

    /// Sums unit `u`'s gradients over the ranks into this rank's shard (added to what
    /// it holds when `accumulate`, else replacing it), then frees them unless ZeRO-1.
    /// An undefined gradient counts as zeros.
    fn reduce_scatter_unit(
        &mut self,
        u: usize,
        collective: &mut dyn Collective,
        params: &[Tensor],
        accumulate: bool,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let unit = &self.units[u];
        let grads: Vec<Option<Tensor>> = unit
            .params
            .iter()
            .map(|&i| {
                let g = params[i].grad();
                (g.defined() && g.numel() > 0)
                    .then(|| g.f_reshape([-1]))
                    .transpose()
            })
            .collect::<std::result::Result<_, _>>()?;
        let (k, s) = (self.world, unit.layout.shard_len);
        let device = self.grad.device();
        for (first, len) in self.buckets(u) {
            let input = Tensor::f_zeros([(k * len) as i64], (Kind::Float, device))?;
            for r in 0..k {
                let start = r * s + first;
                let mut failed = None;
                unit.layout.segments(start, start + len, |p, from, to, n| {
                    let Some(grad) = &grads[p] else { return };
                    let copied =
                        input
                            .f_narrow(0, (r * len + to) as i64, n as i64)
                            .and_then(|mut dst| {
                                dst.f_copy_(&grad.f_narrow(0, from as i64, n as i64)?)
                            });
                    if let Err(e) = copied {
                        failed.get_or_insert(e);
                    }
                });
                if let Some(e) = failed {
                    return Err(e.into());
                }
            }
            let mut slice = self
                .grad
                .f_narrow(0, (unit.offset + first) as i64, len as i64)?;
            if accumulate {
                let mut summed = Tensor::f_zeros([len as i64], (Kind::Float, device))?;
                collective.reduce_scatter(&input, &mut summed, ReduceOp::Sum)?;
                let _ = slice.f_add_(&summed)?;
            } else {
                collective.reduce_scatter(&input, &mut slice, ReduceOp::Sum)?;
            }
        }
        if self.sharding != Sharding::Zero1 {
            for &i in &unit.params {
                free(&params[i].grad())?;
            }
        }
        Ok(())
    }

    /// ZeRO-3: all-gathers decoder layer `layer`'s weights from every rank's master shard
    /// (in one piece) into `params`, f32 parameters becoming views of the gathered vector
    /// and others (a bf16 compute copy's) casts of it, and gives any gradient they keep
    /// their shape again, zeroed.
    pub fn gather_layer(
        &self,
        layer: usize,
        collective: &mut dyn Collective,
        params: &[Tensor],
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let unit = &self.units[layer + 1];
        let s = unit.layout.shard_len;
        let input = self.master.f_narrow(0, unit.offset as i64, s as i64)?;
        let mut gathered = Tensor::f_zeros(
            [(self.world * s) as i64],
            (Kind::Float, self.master.device()),
        )?;
        collective.all_gather(&input, &mut gathered)?;
        let mut start = 0;
        for ((&i, &n), shape) in unit.params.iter().zip(&unit.layout.sizes).zip(&unit.shapes) {
            let mut p = params[i].shallow_clone();
            let view = gathered
                .f_narrow(0, start as i64, n as i64)?
                .f_view(shape.as_slice())?
                .f_to_kind(p.kind())?;
            p.f_set_data(&view)?;
            let mut g = p.grad();
            if g.defined() {
                g.f_set_data(&p.f_zeros_like()?)?;
            }
            start += n;
        }
        Ok(())
    }

    /// ZeRO-3: frees decoder layer `layer`'s gathered weights (and gradients).
    pub fn release_layer(&self, layer: usize, params: &[Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for &i in &self.units[layer + 1].params {
            free(&params[i])?;
            free(&params[i].grad())?;
        }
        Ok(())
    }

    /// ZeRO-3: adds decoder layer `layer`'s gradients, summed over the ranks, to this
    /// rank's shard, and frees them.
    pub fn reduce_scatter_layer(
        &mut self,
        layer: usize,
        collective: &mut dyn Collective,
        params: &[Tensor],
    ) -> Result<()> {
        self.reduce_scatter_unit(layer + 1, collective, params, true)
    }

    /// The global L2 norm of the summed gradient (from every rank's shard); when
    /// `max_norm` is set and the norm is finite, the shard is scaled as
    /// `clip_grad_norm_` does.
    pub fn clip_grad_norm(
        &mut self,
        collective: &mut dyn Collective,
        max_norm: Option<f64>,
    ) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let squares = self.grad.f_square()?.f_sum(Kind::Float)?.f_reshape([1])?;
        let mut total = squares;
        collective.all_reduce(&mut total, ReduceOp::Sum)?;
        let total = total.f_sqrt()?;
        let norm = total.double_value(&[0]);
        if let (Some(max_norm), true) = (max_norm, norm.is_finite()) {
            let coef = ((total + 1e-6).f_reciprocal()? * max_norm).f_clamp_max(1.0)?;
            let _ = self.grad.f_mul_(&coef)?;
        }
        Ok(norm)
    }

    /// AdamW's update number `k` at learning rate `lr` on this rank's master shard
    /// (`train::optim::AdamW::step`'s formula, op for op).
    pub fn step(&mut self, config: &AdamWConfig, k: u64, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let k = k as f64;
        let step_size = lr / (1.0 - config.beta1.powf(k));
        let bias_correction2_sqrt = (1.0 - config.beta2.powf(k)).sqrt();
        if config.weight_decay != 0.0 {
            let _ = self.master.f_mul_scalar_(1.0 - lr * config.weight_decay)?;
        }
        let _ = self.exp_avg.f_lerp_(&self.grad, 1.0 - config.beta1)?;
        let _ = self.exp_avg_sq.f_mul_scalar_(config.beta2)?;
        let _ = self
            .exp_avg_sq
            .f_addcmul_(&self.grad.f_mul_scalar(1.0 - config.beta2)?, &self.grad)?;
        let denom = (self.exp_avg_sq.f_sqrt()? / bias_correction2_sqrt) + config.eps;
        let _ = self
            .master
            .f_addcdiv_(&self.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
        Ok(())
    }

    /// Copies every rank's master shard into every rank's resident parameters (all of
    /// them, but for ZeRO-3's layers), bucket by bucket.
    pub fn all_gather_params(
        &mut self,
        collective: &mut dyn Collective,
        params: &[Tensor],
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let unit = &self.units[0];
        let flats: Vec<Tensor> = unit
            .params
            .iter()
            .map(|&i| params[i].f_view([-1]))
            .collect::<std::result::Result<_, _>>()?;
        let (k, s) = (self.world, unit.layout.shard_len);
        for (first, len) in self.buckets(0) {
            let input = self
                .master
                .f_narrow(0, (unit.offset + first) as i64, len as i64)?;
            let mut output =
                Tensor::f_zeros([(k * len) as i64], (Kind::Float, self.master.device()))?;
            collective.all_gather(&input, &mut output)?;
            for r in 0..k {
                let start = r * s + first;
                let mut failed = None;
                unit.layout.segments(start, start + len, |p, from, to, n| {
                    let copied = flats[p]
                        .f_narrow(0, from as i64, n as i64)
                        .and_then(|mut dst| {
                            dst.f_copy_(&output.f_narrow(0, (r * len + to) as i64, n as i64)?)
                        });
                    if let Err(e) = copied {
                        failed.get_or_insert(e);
                    }
                });
                if let Some(e) = failed {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Bytes of the master shard and both moment shards.
    pub fn optimizer_bytes(&self) -> u64 {
        [&self.master, &self.exp_avg, &self.exp_avg_sq]
            .iter()
            .map(|t| bytes(t))
            .sum()
    }

    /// A copy of the master and moment shards with the update count `steps`, to be
    /// written as this rank's shard file.
    pub fn state(&self, steps: u64) -> ShardState {
        let metadata = HashMap::from([
            (WORLD_KEY.to_owned(), self.world.to_string()),
            (RANK_KEY.to_owned(), self.rank.to_string()),
            (TOTAL_KEY.to_owned(), self.total().to_string()),
            (UNITS_KEY.to_owned(), self.units.len().to_string()),
            (STEP_KEY.to_owned(), steps.to_string()),
        ]);
        ShardState {
            tensors: vec![
                (MASTER.to_owned(), self.master.copy()),
                (EXP_AVG.to_owned(), self.exp_avg.copy()),
                (EXP_AVG_SQ.to_owned(), self.exp_avg_sq.copy()),
            ],
            metadata,
        }
    }

    /// Restores a shard file written by [`ShardState::write`] for this rank of this
    /// world over the same parameters and returns its update count; on error nothing
    /// changes.
    pub fn load(&mut self, path: &Path) -> Result<u64> {
        let (mut tensors, metadata) = state_file::read(path)?;
        let number = |key: &str| -> Result<usize> {
            metadata
                .get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    LearnerError::state(path, format!("no valid `{key}` in the metadata"))
                })
        };
        let (world, rank, total) = (number(WORLD_KEY)?, number(RANK_KEY)?, number(TOTAL_KEY)?);
        let steps = number(STEP_KEY)? as u64;
        let units = match metadata.get(UNITS_KEY) {
            None => 1,
            Some(_) => number(UNITS_KEY)?,
        };
        if (world, rank) != (self.world, self.rank) {
            return Err(LearnerError::state(
                path,
                format!(
                    "it is the shard of rank {rank} of {world}, this is rank {} of {}",
                    self.rank, self.world
                ),
            ));
        }
        if total != self.total() {
            return Err(LearnerError::state(
                path,
                format!(
                    "it shards {total} parameter values, the model has {}",
                    self.total()
                ),
            ));
        }
        if units != self.units.len() {
            return Err(LearnerError::state(
                path,
                format!(
                    "it shards the parameters in {units} unit(s), this learner in {} \
                     (`grpo.sharding` zero1/zero2 use one, zero3 one per decoder layer and \
                     one for the rest): resume with the sharding that wrote it",
                    self.units.len()
                ),
            ));
        }
        let shard_len = self.master.numel() as i64;
        let mut take = |name: &str| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| LearnerError::MissingTensor {
                    path: path.to_owned(),
                    name: name.to_owned(),
                })?;
            if t.size() != [shard_len] {
                return Err(LearnerError::TensorShape {
                    path: path.to_owned(),
                    name: name.to_owned(),
                    expected: vec![shard_len],
                    actual: t.size(),
                });
            }
            Ok(t)
        };
        let (master, m, v) = (take(MASTER)?, take(EXP_AVG)?, take(EXP_AVG_SQ)?);
        let _guard = tch::no_grad_guard();
        self.master.f_copy_(&master)?;
        self.exp_avg.f_copy_(&m)?;
        self.exp_avg_sq.f_copy_(&v)?;
        Ok(steps)
    }
}

/// Frees a defined tensor's values, keeping its kind, device and autograd identity: its
/// data becomes an empty tensor (`set_data`), which every shallow copy sees.
fn free(t: &Tensor) -> Result<()> {
    if t.defined() {
        t.shallow_clone()
            .f_set_data(&t.f_new_empty([0], (t.kind(), t.device()))?)?;
    }
    Ok(())
}

/// Bytes of a tensor's values.
pub fn bytes(t: &Tensor) -> u64 {
    if !t.defined() {
        return 0;
    }
    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
}

/// The shard file of `rank` of `world` ranks.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::collective::{nccl_unique_id, on_loopback_ranks, NcclCollective};
    use crate::testing::{batch, sample, tiny_model, tiny_model_on, trainer_config};
    use crate::train::grad_sync::GradSync;
    use crate::train::grpo::{token_weights, LossAggregation};
    use crate::train::sample::TrainSample;
    use crate::train::trainer::{StepStats, Trainer, TrainerConfig};
    use std::time::Duration;
    use tch::Device;

    /// Whether the multi-rank test runs over NCCL: `QUILL_TEST_COLLECTIVE` = `ring` (the
    /// default: the loopback TCP ring, CPU tensors) or `nccl` (rank `r` on `cuda:r`), so
    /// that `scripts/gpu-check.sh` can run it on GPUs.
    fn over_nccl() -> bool {
        match std::env::var("QUILL_TEST_COLLECTIVE").as_deref() {
            Err(_) | Ok("ring") => false,
            Ok("nccl") => true,
            Ok(other) => panic!("QUILL_TEST_COLLECTIVE must be ring or nccl, got {other:?}"),
        }
    }

    /// The modes the multi-rank test checks: `QUILL_TEST_SHARDING` (`none`, `zero1`,
    /// `zero2`, `zero3`, space-separated), by default all of them.
    fn test_modes() -> Vec<Sharding> {
        let names = std::env::var("QUILL_TEST_SHARDING")
            .unwrap_or_else(|_| "none zero1 zero2 zero3".to_owned());
        names
            .split_whitespace()
            .map(|name| {
                serde_json::from_value(serde_json::json!(name))
                    .unwrap_or_else(|_| panic!("QUILL_TEST_SHARDING: no mode {name:?}"))
            })
            .collect()
    }

    /// The device of rank `rank` of the multi-rank test.
    fn test_device(rank: usize) -> Device {
        if over_nccl() {
            Device::Cuda(rank)
        } else {
            Device::Cpu
        }
    }

    /// Runs `body` on `world` ranks, each with its collective and device: the loopback
    /// ring on CPU, or NCCL with rank `r` on `cuda:r` ([`over_nccl`]).
    fn on_test_ranks<T: Send>(
        world: usize,
        body: impl Fn(Box<dyn Collective>, Device) -> T + Sync,
    ) -> Vec<T> {
        let timeout = Duration::from_secs(20);
        if !over_nccl() {
            return on_loopback_ranks(world, timeout, |ring| body(Box::new(ring), Device::Cpu));
        }
        let found = tch::Cuda::device_count() as usize;
        assert!(
            found >= world,
            "QUILL_TEST_COLLECTIVE=nccl puts rank r on cuda:r: {world} ranks need {world} CUDA \
             devices, this machine has {found}"
        );
        let id = nccl_unique_id().unwrap();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (id, body) = (&id, &body);
                    scope.spawn(move || {
                        let nccl = NcclCollective::new(rank, world, id, rank, timeout).unwrap();
                        body(Box::new(nccl), Device::Cuda(rank))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Four global batches: clipping is active in every applied step (max norm 0.5), and
    /// the second holds a sample whose ratio overflows, so that step is skipped.
    fn batches() -> Vec<Vec<TrainSample>> {
        let mut poisoned = batch();
        poisoned.push(sample(1, 3, 4, -1000.0, -1.0));
        let mut flipped = batch();
        flipped.iter_mut().for_each(|s| s.advantage = -s.advantage);
        flipped.push(sample(9, 4, 3, -3.6, 0.3));
        vec![
            batch(),
            poisoned,
            flipped,
            vec![sample(5, 3, 5, -3.8, 1.0), sample(6, 2, 4, -3.9, -1.0)],
        ]
    }

    fn config(sharding: Sharding) -> TrainerConfig {
        TrainerConfig {
            sharding,
            ..trainer_config(16, LossAggregation::TokenMean, 0.5)
        }
    }

    /// Every weight, in name order (gathered under ZeRO-3: all ranks call it together).
    fn flat_weights(trainer: &mut Trainer) -> Vec<f32> {
        let mut weights = trainer.full_weights(Kind::Float).unwrap();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        weights
            .iter()
            .flat_map(|(_, t)| {
                Vec::<f32>::try_from(t.reshape([-1]).to_device(Device::Cpu)).unwrap()
            })
            .collect()
    }

    /// Rank `rank`'s shard (every `world`-th sample) of a global batch, with weights.
    fn shard_of(global: &[TrainSample], rank: usize, world: usize) -> (Vec<TrainSample>, Vec<f64>) {
        let weights = token_weights(global, LossAggregation::TokenMean);
        global
            .iter()
            .cloned()
            .zip(weights)
            .enumerate()
            .filter(|(i, _)| i % world == rank)
            .map(|(_, pair)| pair)
            .unzip()
    }

    /// A rank's weights and stats after each step.
    type History = Vec<(Vec<f32>, StepStats)>;

    /// Every rank's weights and stats after each step, and its trainer's shard bytes.
    fn train_ranks(world: usize, sharding: Sharding) -> Vec<(History, u64)> {
        train_ranks_with(world, config(sharding))
    }

    /// [`train_ranks`] with any trainer settings.
    fn train_ranks_with(world: usize, config: TrainerConfig) -> Vec<(History, u64)> {
        on_test_ranks(world, |collective, device| {
            let rank = collective.rank();
            let model = tiny_model_on(1 + rank as u64, device);
            let mut trainer = Trainer::new(model, None, config.clone()).unwrap();
            trainer.attach(GradSync::new(collective, 700)).unwrap();
            let history = batches()
                .iter()
                .map(|global| {
                    let (shard, weights) = shard_of(global, rank, world);
                    let stats = trainer.step_shard(&shard, &weights).unwrap();
                    assert_eq!(trainer.check_ranks().unwrap(), 0.0);
                    (flat_weights(&mut trainer), stats)
                })
                .collect();
            (
                history,
                trainer.shard().map_or(0, ShardedState::optimizer_bytes),
            )
        })
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn sharded_ranks_take_the_same_steps_as_one_rank() {
        let worlds = match over_nccl() {
            true => {
                let found = tch::Cuda::device_count() as usize;
                assert!(
                    found >= 2,
                    "QUILL_TEST_COLLECTIVE=nccl puts rank r on cuda:r and needs at least 2 \
                     CUDA devices, this machine has {found}"
                );
                (2..=found.min(3)).collect()
            }
            false => vec![2, 3],
        };
        let model = tiny_model_on(1, test_device(0));
        let mut single = Trainer::new(model, None, config(Sharding::None)).unwrap();
        let initial = flat_weights(&mut single);
        let reference: Vec<(Vec<f32>, StepStats)> = batches()
            .iter()
            .map(|b| {
                let stats = single.step(b).unwrap();
                (flat_weights(&mut single), stats)
            })
            .collect();
        assert!(reference[1].1.skipped, "the poisoned step is skipped");
        for (_, stats) in reference.iter().filter(|(_, s)| !s.skipped) {
            assert!(stats.grad_norm > 0.5, "clipping is active: {stats:?}");
        }
        for sharding in test_modes() {
            for &world in &worlds {
                let ranks = train_ranks(world, sharding);
                for (step, (want, want_stats)) in reference.iter().enumerate() {
                    for (rank, (history, _)) in ranks.iter().enumerate() {
                        let (weights, stats) = &history[step];
                        let at = format!("{sharding:?}, {world} ranks, step {step}, rank {rank}");
                        assert_eq!(weights, &ranks[0].0[step].0, "{at}: differs from rank 0");
                        assert_eq!(stats.skipped, want_stats.skipped, "{at}");
                        // The ranks sum the same gradients in another order than one
                        // backward pass does (and the norm from squared shards): f32
                        // rounding, a few ulps of the ~0.01 steps of lr 1e-2 AdamW.
                        let diff = max_diff(weights, want);
                        assert!(diff < 1e-5, "{at}: {diff} from one rank");
                        if !stats.skipped {
                            let norm = (stats.grad_norm - want_stats.grad_norm).abs();
                            assert!(norm < 1e-4 * want_stats.grad_norm, "{at}: {stats:?}");
                        }
                    }
                }
                let skipped = &ranks[0].0;
                assert_eq!(skipped[1].0, skipped[0].0, "a skipped step changes nothing");
                assert_eq!(skipped[3].1.version, 3);
                let passes: Vec<Vec<usize>> = ranks
                    .iter()
                    .map(|(h, _)| h.iter().map(|(_, s)| s.micro_batches).collect())
                    .collect();
                // With 3 ranks the last batch's 2 samples leave one rank none: its
                // ZeRO-3 schedule runs without data.
                if world == 3 {
                    assert_eq!(passes[2][3], 0, "{passes:?}");
                }
                assert!(
                    max_diff(&skipped[3].0, &initial) > 1e-3,
                    "training moved the weights"
                );
            }
        }
    }

    /// Per-rank bytes after a step: (optimizer shards, gradient shard, full gradients,
    /// full moments, weights held in the parameters).
    fn bytes_of(world: usize, sharding: Sharding) -> Vec<(u64, u64, u64, u64, u64)> {
        on_loopback_ranks(world, Duration::from_secs(20), |ring| {
            let rank = ring.rank();
            let mut trainer = Trainer::new(tiny_model(1), None, config(sharding)).unwrap();
            trainer.attach(GradSync::new(Box::new(ring), 700)).unwrap();
            let (shard, weights) = shard_of(&batch(), rank, world);
            trainer.step_shard(&shard, &weights).unwrap();
            let params = trainer.optimizer().params();
            let full_grads: u64 = params.iter().map(|p| bytes(&p.grad())).sum();
            let held: u64 = params.iter().map(bytes).sum();
            let moments: u64 = trainer
                .optimizer()
                .moments()
                .map(|(_, m, v)| bytes(m) + bytes(v))
                .sum();
            let state = trainer.shard().unwrap();
            (
                state.optimizer_bytes(),
                bytes(state.grad()),
                full_grads,
                moments,
                held,
            )
        })
    }

    fn plan_sharding(sharding: Sharding) -> quill_model::memory_plan::Sharding {
        match sharding {
            Sharding::None => quill_model::memory_plan::Sharding::None,
            Sharding::Zero1 => quill_model::memory_plan::Sharding::Zero1,
            Sharding::Zero2 => quill_model::memory_plan::Sharding::Zero2,
            Sharding::Zero3 => quill_model::memory_plan::Sharding::Zero3,
        }
    }

    #[test]
    fn each_rank_holds_a_kth_of_the_optimizer_and_zero2_frees_the_gradients() {
        let model = tiny_model(1);
        let named = model.var_store().variables();
        let params: u64 = named.values().map(|t| t.numel() as u64).sum();
        let in_layers: u64 = named
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers."))
            .map(|(_, t)| t.numel() as u64)
            .sum();
        let layer = in_layers / model.num_layers() as u64;
        let one = bytes_of(1, Sharding::Zero2)[0];
        // One rank: master and both moments, 12 bytes a parameter, none padded.
        assert_eq!(one.0, 12 * params);
        for sharding in [Sharding::Zero1, Sharding::Zero2, Sharding::Zero3] {
            for world in [2u64, 3] {
                // ⌈N / K⌉ values of each unit (one, or the rest and each layer).
                let shard = match sharding {
                    Sharding::Zero3 => {
                        (params - in_layers).div_ceil(world) + 2 * layer.div_ceil(world)
                    }
                    _ => params.div_ceil(world),
                };
                for (rank, (optimizer, grad, full_grads, moments, held)) in
                    bytes_of(world as usize, sharding).into_iter().enumerate()
                {
                    let at = format!("{sharding:?}, {world} ranks, rank {rank}");
                    assert_eq!(optimizer, 12 * shard, "{at}");
                    assert!(optimizer * world - one.0 < 12 * 3 * world, "{at}");
                    assert_eq!(grad, 4 * shard, "{at}");
                    assert_eq!(moments, 0, "{at}: no full moments are allocated");
                    let expected_full = match sharding {
                        Sharding::Zero1 => 4 * params,
                        _ => 0,
                    };
                    assert_eq!(full_grads, expected_full, "{at}: full gradients");
                    let expected_held = match sharding {
                        Sharding::Zero3 => 4 * (params - in_layers),
                        _ => 4 * params,
                    };
                    assert_eq!(held, expected_held, "{at}: weights held between steps");
                    // `quill plan` counts ZeRO-3's weights at a pass's peak (one layer
                    // gathered) and its shard without the per-unit padding.
                    let plan = quill_model::memory_plan::learner_memory(
                        &quill_model::memory_plan::ModelSize::of(model.config()),
                        &quill_model::memory_plan::LearnerSetup {
                            gpus: world as usize,
                            sharding: plan_sharding(sharding),
                            precision: quill_model::memory_plan::Precision::F32,
                            activation_checkpointing: false,
                            micro_batch_tokens: 16,
                            logprob_chunk_tokens: 1024,
                        },
                        &quill_model::memory_plan::Workload {
                            group_size: 1,
                            prompts_per_step: 1,
                            max_tokens: 16,
                        },
                    );
                    let peak_weights = match sharding {
                        Sharding::Zero3 => held + 4 * layer,
                        _ => held,
                    };
                    assert_eq!(plan.weights, peak_weights, "{at}: planned weights");
                    assert!(
                        plan.optimizer <= optimizer && optimizer - plan.optimizer < 12 * 3,
                        "{at}: planned {} against {optimizer}",
                        plan.optimizer
                    );
                }
            }
        }
    }

    #[test]
    fn layout_segments_cover_every_value_once() {
        let layout = ShardLayout::new(vec![5, 1, 7], 3, 1);
        assert_eq!((layout.total, layout.shard_len), (13, 5));
        let mut pieces = Vec::new();
        for r in 0..3 {
            layout.segments(r * 5, r * 5 + 5, |p, from, to, n| {
                pieces.push((r, p, from, to, n))
            });
        }
        assert_eq!(
            pieces,
            [
                (0, 0, 0, 0, 5),
                (1, 1, 0, 0, 1),
                (1, 2, 0, 1, 4),
                (2, 2, 4, 0, 3)
            ]
        );
    }

    #[test]
    fn zero3_in_bf16_takes_the_steps_of_zero2_in_bf16() {
        let bf16 = |sharding| TrainerConfig {
            precision: crate::train::precision::Precision::Bf16,
            ..config(sharding)
        };
        let zero2 = train_ranks_with(2, bf16(Sharding::Zero2));
        let zero3 = train_ranks_with(2, bf16(Sharding::Zero3));
        for (rank, (a, b)) in zero2.iter().zip(&zero3).enumerate() {
            for (step, ((want, want_stats), (got, stats))) in a.0.iter().zip(&b.0).enumerate() {
                let at = format!("rank {rank}, step {step}");
                assert_eq!(stats.skipped, want_stats.skipped, "{at}");
                // The same bf16 passes on the same micro-batches; only the order in which
                // the f32 gradients are summed differs (per layer and micro-batch), and
                // Adam's normalised step magnifies a last-bit difference in a gradient
                // entry near zero up to a few 1e-5 here (the weights move by > 1e-3).
                let diff = max_diff(got, want);
                assert!(diff < 1e-4, "{at}: {diff}");
            }
            assert!(
                max_diff(&b.0[3].0, &b.0[0].0) > 1e-3,
                "training moved the weights"
            );
        }
    }

    #[test]
    fn published_weights_hold_no_graph_and_outlive_the_next_zero3_step() {
        // The learner hands each step's weights to its publisher and checkpoint threads,
        // which may still hold them while the next step runs. A copy that kept an autograd
        // edge to a ZeRO-3 parameter kept that parameter's gradient accumulator alive with
        // its gathered shape, and the next step's zero gradient of the released (empty)
        // parameter then failed in backward ("got [0] but expected [128, 128]").
        on_test_ranks(2, |collective, device| {
            let rank = collective.rank();
            let mut trainer =
                Trainer::new(tiny_model_on(1, device), None, config(Sharding::Zero3)).unwrap();
            trainer.attach(GradSync::new(collective, 700)).unwrap();
            let mut held = Vec::new();
            for global in batches() {
                let (shard, weights) = shard_of(&global, rank, 2);
                trainer.step_shard(&shard, &weights).unwrap();
                let kind = trainer.model().kind();
                let published = trainer.full_weights(kind).unwrap();
                for (name, t) in &published {
                    assert!(!t.requires_grad(), "{name} carries autograd history");
                }
                held.push(published);
            }
        });
    }
}
