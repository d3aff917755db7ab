//! AdamW on tch tensors with savable state, global gradient-norm clipping and a learning-rate
//! schedule.
//!
//! The update is `torch.optim.AdamW`'s (non-amsgrad, single-tensor path), op for op: with
//! `k` the update number, `p ← p·(1 − lr·wd)`, `m ← lerp(m, g, 1 − β1)`,
//! `v ← β2·v + (1 − β2)·g²`, `denom = sqrt(v) / sqrt(1 − β2^k) + ε`,
//! `p ← p − (lr / (1 − β1^k))·m / denom`. Clipping is `torch.nn.utils.clip_grad_norm_`'s:
//! the total L2 norm of all gradients, then every gradient times
//! `min(1, max_norm / (norm + 1e-6))`.

use crate::error::{LearnerError, Result};
use crate::train::schedule::LrSchedule;
use crate::train::state_file;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::VarStore;
use tch::Tensor;

/// Prefix of first-moment tensors in the state file.
const EXP_AVG: &str = "exp_avg.";
/// Prefix of second-moment tensors in the state file.
const EXP_AVG_SQ: &str = "exp_avg_sq.";
/// Metadata key of the update count in the state file.
const STEP_KEY: &str = "step";

/// A copy of an [`AdamW`]'s state (both moments and the update count), detached from the
/// optimizer so another thread can write it.
pub struct OptimizerState {
    tensors: Vec<(String, Tensor)>,
    metadata: HashMap<String, String>,
}

impl OptimizerState {
    /// Writes the state to a safetensors file, as [`AdamW::load`] reads it.
    pub fn write(&self, path: &Path) -> Result<()> {
        state_file::write(path, &self.tensors, self.metadata.clone())
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Base learning rate (the schedule scales it).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the total gradient L2 norm to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
}

impl Default for AdamWConfig {
    /// lr 1e-6, β = (0.9, 0.999), ε = 1e-8, weight decay 0.01, clip at norm 1, constant lr.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            schedule: LrSchedule::default(),
        }
    }
}

impl AdamWConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &str, ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(LearnerError::config(field, what))
            }
        };
        check("lr", self.lr.is_finite() && self.lr >= 0.0, "must be >= 0")?;
        check(
            "beta1",
            (0.0..1.0).contains(&self.beta1),
            "must be in [0, 1)",
        )?;
        check(
            "beta2",
            (0.0..1.0).contains(&self.beta2),
            "must be in [0, 1)",
        )?;
        check("eps", self.eps.is_finite() && self.eps > 0.0, "must be > 0")?;
        check(
            "weight_decay",
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "must be >= 0",
        )?;
        if let Some(norm) = self.max_grad_norm {
            check(
                "max_grad_norm",
                norm.is_finite() && norm > 0.0,
                "must be > 0",
            )?;
        }
        self.schedule.validate(self.lr)
    }
}

/// One trained parameter and its moments.
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over every trainable variable of a [`VarStore`], in name order.
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    steps: u64,
}

impl AdamW {
    /// An optimizer with zeroed moments for every trainable variable of `vs`.
    pub fn new(vs: &VarStore, config: AdamWConfig) -> Result<Self> {
        Self::with_moments(vs, config, true)
    }

    /// An optimizer whose moments are allocated only when a full (unsharded) update or a
    /// full state needs them: a sharded learner keeps its moments in `train::shard`.
    pub fn deferred(vs: &VarStore, config: AdamWConfig) -> Result<Self> {
        Self::with_moments(vs, config, false)
    }

    fn with_moments(vs: &VarStore, config: AdamWConfig, allocate: bool) -> Result<Self> {
        config.validate()?;
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = named
            .into_iter()
            .map(|(name, param)| {
                let moment = || {
                    if allocate {
                        param.zeros_like()
                    } else {
                        Tensor::new()
                    }
                };
                Slot {
                    exp_avg: moment(),
                    exp_avg_sq: moment(),
                    name,
                    param,
                }
            })
            .collect();
        Ok(AdamW {
            config,
            slots,
            steps: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The learning rate the next update will use.
    pub fn next_lr(&self) -> f64 {
        self.config.schedule.lr(self.config.lr, self.steps + 1)
    }

    /// Allocates zero moments where they were deferred.
    fn ensure_moments(&mut self) {
        for slot in &mut self.slots {
            if !slot.exp_avg.defined() {
                slot.exp_avg = slot.param.zeros_like();
                slot.exp_avg_sq = slot.param.zeros_like();
            }
        }
    }

    /// Each parameter's name with its first and second moments, in name order (undefined
    /// tensors while they are deferred).
    pub fn moments(&self) -> impl Iterator<Item = (&str, &Tensor, &Tensor)> {
        self.slots
            .iter()
            .map(|s| (s.name.as_str(), &s.exp_avg, &s.exp_avg_sq))
    }

    /// Every trained parameter followed by its two moments, in name order (shallow copies:
    /// writing into them changes the optimizer's state), for synchronising learner ranks.
    pub(crate) fn state_tensors(&self) -> Vec<Tensor> {
        self.slots
            .iter()
            .flat_map(|s| [&s.param, &s.exp_avg, &s.exp_avg_sq])
            .map(Tensor::shallow_clone)
            .collect()
    }

    /// Every trained parameter (shallow copies), in name order.
    pub fn params(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.param.shallow_clone()).collect()
    }

    /// Sets the number of updates applied (the schedule's position), e.g. from rank 0.
    pub(crate) fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// Zeroes every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// The total L2 norm of all gradients before clipping; when `max_grad_norm` is set the
    /// gradients are then scaled as `clip_grad_norm_` does. A non-finite norm is returned
    /// without touching the gradients.
    pub fn clip_grad_norm(&mut self) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.param.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        let norms = grads
            .iter()
            .map(Tensor::f_norm)
            .collect::<Result<Vec<_>, _>>()?;
        let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
        let norm = total.double_value(&[]);
        if let (Some(max_norm), true) = (self.config.max_grad_norm, norm.is_finite()) {
            let coef = ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
            for mut g in grads {
                let _ = g.f_mul_(&coef)?;
            }
        }
        Ok(norm)
    }

    /// Applies one update with the scheduled learning rate (parameters without a gradient
    /// are left alone, as torch does) and returns that rate.
    pub fn step(&mut self) -> Result<f64> {
        self.ensure_moments();
        let _guard = tch::no_grad_guard();
        let c = &self.config;
        let lr = self.next_lr();
        let k = (self.steps + 1) as f64;
        let step_size = lr / (1.0 - c.beta1.powf(k));
        let bias_correction2_sqrt = (1.0 - c.beta2.powf(k)).sqrt();
        for slot in &mut self.slots {
            let grad = slot.param.grad();
            if !grad.defined() {
                continue;
            }
            if c.weight_decay != 0.0 {
                let _ = slot.param.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            let _ = slot.exp_avg.f_lerp_(&grad, 1.0 - c.beta1)?;
            let _ = slot.exp_avg_sq.f_mul_scalar_(c.beta2)?;
            let _ = slot
                .exp_avg_sq
                .f_addcmul_(&grad.f_mul_scalar(1.0 - c.beta2)?, &grad)?;
            let denom = (slot.exp_avg_sq.f_sqrt()? / bias_correction2_sqrt) + c.eps;
            let _ = slot
                .param
                .f_addcdiv_(&slot.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
        }
        self.steps += 1;
        Ok(lr)
    }

    /// A copy of both moments of every parameter (`exp_avg.<name>`, `exp_avg_sq.<name>`)
    /// and the update count, to be written (possibly on another thread) as a checkpoint's
    /// optimizer file.
    pub fn state(&self) -> OptimizerState {
        let mut tensors = Vec::with_capacity(2 * self.slots.len());
        let copy = |moment: &Tensor, param: &Tensor| {
            if moment.defined() {
                moment.copy()
            } else {
                param.zeros_like()
            }
        };
        for slot in &self.slots {
            tensors.push((
                format!("{EXP_AVG}{}", slot.name),
                copy(&slot.exp_avg, &slot.param),
            ));
            tensors.push((
                format!("{EXP_AVG_SQ}{}", slot.name),
                copy(&slot.exp_avg_sq, &slot.param),
            ));
        }
        let metadata = HashMap::from([(STEP_KEY.to_owned(), self.steps.to_string())]);
        OptimizerState { tensors, metadata }
    }

    /// Restores the state written by [`OptimizerState::write`]. Every moment must be present with its
    /// parameter's shape and no other tensor may be in the file; on error nothing changes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let (mut tensors, metadata) = state_file::read(path)?;
        let steps = metadata
            .get(STEP_KEY)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| LearnerError::state(path, "no valid `step` in the metadata"))?;
        let mut take = |name: String, like: &Tensor| -> Result<Tensor> {
            let tensor = tensors
                .remove(&name)
                .ok_or_else(|| LearnerError::MissingTensor {
                    path: path.to_owned(),
                    name: name.clone(),
                })?;
            if tensor.size() != like.size() {
                return Err(LearnerError::TensorShape {
                    path: path.to_owned(),
                    name,
                    expected: like.size(),
                    actual: tensor.size(),
                });
            }
            Ok(tensor)
        };
        let mut loaded = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let m = take(format!("{EXP_AVG}{}", slot.name), &slot.param)?;
            let v = take(format!("{EXP_AVG_SQ}{}", slot.name), &slot.param)?;
            loaded.push((m, v));
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(LearnerError::state(
                path,
                format!("unexpected tensor `{extra}` (the model has no such parameter)"),
            ));
        }
        self.ensure_moments();
        let _guard = tch::no_grad_guard();
        for (slot, (m, v)) in self.slots.iter_mut().zip(loaded) {
            slot.exp_avg.f_copy_(&m)?;
            slot.exp_avg_sq.f_copy_(&v)?;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Init, VarStore};
    use tch::{Device, Kind};

    fn store(values: &[f32]) -> (VarStore, Tensor) {
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root().var("p", &[values.len() as i64], Init::Const(0.0));
        tch::no_grad(|| p.shallow_clone().copy_(&Tensor::from_slice(values)));
        (vs, p)
    }

    fn set_grad(p: &Tensor, values: &[f32]) {
        let loss = (p * Tensor::from_slice(values)).sum(Kind::Float);
        loss.backward();
    }

    fn config() -> AdamWConfig {
        AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            max_grad_norm: None,
            ..AdamWConfig::default()
        }
    }

    #[test]
    fn two_updates_follow_the_adamw_formula() {
        let (vs, p) = store(&[1.0, -2.0]);
        let mut opt = AdamW::new(&vs, config()).unwrap();
        let grads = [[0.5f64, -1.0], [0.25, 3.0]];
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (k, g) in grads.iter().enumerate() {
            opt.zero_grad();
            set_grad(&p, &g.map(|x| x as f32));
            assert_eq!(opt.step().unwrap(), 0.1);
            let k = k as i32 + 1;
            for i in 0..2 {
                want[i] *= 1.0 - 0.1 * 0.5;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(k)).sqrt() + 1e-8;
                want[i] -= 0.1 / (1.0 - 0.9f64.powi(k)) * m[i] / denom;
            }
        }
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(got[i]) - want[i]).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let (vs, p) = store(&[0.0, 0.0]);
        let mut opt = AdamW::new(
            &vs,
            AdamWConfig {
                max_grad_norm: Some(1.0),
                ..config()
            },
        )
        .unwrap();
        set_grad(&p, &[3.0, 4.0]);
        assert_eq!(opt.clip_grad_norm().unwrap(), 5.0);
        let g = Vec::<f32>::try_from(&p.grad()).unwrap();
        assert!(
            (g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6,
            "{g:?}"
        );
        opt.zero_grad();
        set_grad(&p, &[0.3, 0.4]);
        assert!((opt.clip_grad_norm().unwrap() - 0.5).abs() < 1e-6);
        let g = Vec::<f32>::try_from(&p.grad()).unwrap();
        assert_eq!(g, [0.3, 0.4], "norms below the maximum are left alone");
    }

    #[test]
    fn state_round_trips_and_mismatches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let (vs, p) = store(&[1.0, 2.0, 3.0]);
        let mut opt = AdamW::new(&vs, config()).unwrap();
        set_grad(&p, &[1.0, -1.0, 0.5]);
        opt.step().unwrap();
        opt.state().write(&path).unwrap();
        let (vs2, _) = store(&[1.0, 2.0, 3.0]);
        let mut back = AdamW::new(&vs2, config()).unwrap();
        back.load(&path).unwrap();
        assert_eq!(back.steps(), 1);
        for ((_, m1, v1), (_, m2, v2)) in opt.moments().zip(back.moments()) {
            assert!(m1.equal(m2) && v1.equal(v2));
        }
        let (vs3, _) = store(&[1.0, 2.0]);
        let mut wrong = AdamW::new(&vs3, config()).unwrap();
        let err = wrong.load(&path).unwrap_err().to_string();
        assert!(err.contains("exp_avg.p") && err.contains("[3]"), "{err}");
        assert_eq!(wrong.steps(), 0);
        let vs4 = VarStore::new(Device::Cpu);
        let _ = vs4.root().var("q", &[3], Init::Const(0.0));
        let mut other = AdamW::new(&vs4, config()).unwrap();
        let err = other.load(&path).unwrap_err().to_string();
        assert!(err.contains("missing tensor `exp_avg.q`"), "{err}");
    }
}
