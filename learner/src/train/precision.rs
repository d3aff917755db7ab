//! Mixed precision: a bf16 compute copy of the f32 master weights.
//!
//! Under `Precision::Bf16` the trainer keeps its model (the masters, which the optimizer
//! updates, checkpoints save and publishing casts to `checkpoint.publish_dtype`) in f32 and
//! runs every forward and backward pass on a [`ComputeCopy`] in bf16: bf16 weights,
//! activations and parameter gradients; the head's logits are converted to f32 before the
//! log-softmax and the loss (`train::grpo`). After each micro-batch the copy's gradients
//! are added into the masters' f32 gradients (so accumulation over micro-batches, the
//! gradient all-reduce, clipping and AdamW all work in f32, as with PyTorch's autocast,
//! whose f32 parameters receive the gradients of their bf16 casts) and zeroed. Before each
//! step's passes the copy is refreshed from the masters, so an update, a restored
//! checkpoint or rank 0's broadcast always reach it.

use crate::error::Result;
use quill_model::Qwen2;
use tch::{Kind, Tensor};

pub use quill_config::job::Precision;

/// A bf16 copy of a model's weights that runs the passes.
pub struct ComputeCopy {
    model: Qwen2,
}

impl ComputeCopy {
    /// A bf16 copy of `master` on its device.
    pub fn new(master: &Qwen2) -> Result<Self> {
        let model = Qwen2::new(master.config().clone(), master.device(), Kind::BFloat16)?;
        let copy = ComputeCopy { model };
        copy.refresh(master)?;
        Ok(copy)
    }

    /// The bf16 model the passes run on.
    pub fn model(&self) -> &Qwen2 {
        &self.model
    }

    /// Casts the masters' current values into the copy.
    pub fn refresh(&self, master: &Qwen2) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (mut compute, master) in self.pairs(master) {
            compute.f_copy_(&master)?;
        }
        Ok(())
    }

    /// Adds the copy's gradients (bf16) into the masters' f32 gradients and zeroes the
    /// copy's. Parameters the passes did not reach are left alone.
    pub fn accumulate_grads(&self, master: &Qwen2) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let pairs: Vec<(Tensor, Tensor)> = self
            .pairs(master)
            .into_iter()
            .filter(|(compute, _)| compute.grad().defined())
            .collect();
        define_grads(pairs.iter().map(|(_, master)| master))?;
        for (mut compute, master) in pairs {
            let _ = master
                .grad()
                .f_add_(&compute.grad().f_to_kind(Kind::Float)?)?;
            compute.zero_grad();
        }
        Ok(())
    }

    /// The copy's trained variables in name order (the optimizer's order), shallow
    /// copies: under ZeRO-3 the layers' bf16 weights are gathered into them.
    pub fn params(&self) -> Vec<Tensor> {
        let mut named: Vec<(String, Tensor)> = self
            .model
            .var_store()
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.into_iter().map(|(_, t)| t).collect()
    }

    /// Zeroes the copy's gradients (a skipped micro-batch leaves them partial).
    pub fn zero_grads(&self) {
        for mut var in self.model.var_store().trainable_variables() {
            var.zero_grad();
        }
    }

    /// Each of the copy's variables with the master variable of the same name.
    fn pairs(&self, master: &Qwen2) -> Vec<(Tensor, Tensor)> {
        let masters = master.var_store().variables();
        let mut pairs: Vec<(String, Tensor, Tensor)> = self
            .model
            .var_store()
            .variables()
            .into_iter()
            .map(|(name, compute)| {
                let master = masters[&name].shallow_clone();
                (name, compute, master)
            })
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.into_iter().map(|(_, c, m)| (c, m)).collect()
    }
}

/// Gives every tensor of `params` that has no gradient yet a zero one (one backward pass
/// of `Σ 0·sum(p)`), so that gradients can be added into them in place.
fn define_grads<'a>(params: impl Iterator<Item = &'a Tensor>) -> Result<()> {
    let undefined: Vec<&Tensor> = params.filter(|p| !p.grad().defined()).collect();
    if undefined.is_empty() {
        return Ok(());
    }
    tch::with_grad(|| {
        let mut zero = Tensor::zeros([], (Kind::Float, undefined[0].device()));
        for p in &undefined {
            zero = zero.f_add(&p.f_sum(Kind::Float)?.f_mul_scalar(0.0)?)?;
        }
        zero.f_backward()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch, tiny_model};
    use crate::train::grpo::{micro_batch_backward, token_weights, GrpoConfig, MemoryConfig};
    use crate::train::sample::TrainSample;
    use quill_config::job::LossAggregation;

    fn sorted_vars(model: &Qwen2) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    #[test]
    fn the_copy_is_bf16_and_follows_the_masters() {
        let master = tiny_model(21);
        let copy = ComputeCopy::new(&master).unwrap();
        assert_eq!(copy.model().kind(), Kind::BFloat16);
        for ((name, m), (_, c)) in sorted_vars(&master).iter().zip(sorted_vars(copy.model())) {
            assert_eq!(c.kind(), Kind::BFloat16, "{name}");
            assert!(c.requires_grad(), "{name}");
            assert!(c
                .to_kind(Kind::Float)
                .equal(&m.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
        }
        tch::no_grad(|| {
            for (_, mut m) in sorted_vars(&master) {
                let _ = m.f_add_scalar_(0.5).unwrap();
            }
        });
        copy.refresh(&master).unwrap();
        for ((name, m), (_, c)) in sorted_vars(&master).iter().zip(sorted_vars(copy.model())) {
            let diff = (c.to_kind(Kind::Float) - m).abs().max().double_value(&[]);
            // bf16 keeps 8 significant bits: |x| < 4 rounds by at most 2^-7.
            assert!(diff <= 1.0 / 128.0, "{name}: {diff}");
        }
    }

    #[test]
    fn gradients_accumulate_into_the_masters_in_f32() {
        let master = tiny_model(22);
        let copy = ComputeCopy::new(&master).unwrap();
        let samples = batch();
        let weights = token_weights(&samples, LossAggregation::TokenMean);
        let refs: Vec<&TrainSample> = samples.iter().collect();
        let memory = MemoryConfig::default();
        let config = GrpoConfig::default();
        let pass = |part: &[&TrainSample], w: &[f64]| {
            micro_batch_backward(copy.model(), None, part, w, &config, &memory, None).unwrap();
            copy.accumulate_grads(&master).unwrap();
        };
        pass(&refs, &weights);
        let whole: Vec<Tensor> = sorted_vars(&master)
            .iter()
            .map(|(_, v)| v.grad().copy())
            .collect();
        assert!(whole.iter().all(|g| g.kind() == Kind::Float));
        for (name, c) in sorted_vars(copy.model()) {
            assert_eq!(c.grad().abs().max().double_value(&[]), 0.0, "{name} zeroed");
        }
        // The same batch in two micro-batches adds up to the same gradient (each part
        // rounded to bf16 on its own, then summed in f32).
        for (_, mut v) in sorted_vars(&master) {
            v.zero_grad();
        }
        pass(&refs[..2], &weights[..2]);
        pass(&refs[2..], &weights[2..]);
        for ((name, v), want) in sorted_vars(&master).iter().zip(&whole) {
            let scale = want.abs().max().double_value(&[]).max(1e-12);
            let diff = (v.grad() - want).abs().max().double_value(&[]) / scale;
            assert!(diff < 2e-2, "{name}: {diff}");
        }
    }
}
