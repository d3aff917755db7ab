//! ZeRO-3's layer-by-layer schedule for one micro-batch: the hooks that gather a decoder
//! layer's weights before it runs and free them after, and that reduce-scatter its
//! gradients as soon as its backward is done.
//!
//! Every rank must make the same collective calls in the same order, whatever its data:
//! per micro-batch, layer `0 … L−1`'s gathers in the forward pass, then layer `L−1 … 0`'s
//! gather and reduce-scatter in the backward pass. The ranks first agree on the number of
//! micro-batches (the most any rank has, [`agree_passes`]); a rank with fewer, or whose
//! loss stopped being finite, completes the schedule with zero gradients
//! ([`LayerPass::finish`]).

use crate::error::{LearnerError, Result};
use crate::parallel::collective::Collective;
use crate::train::shard::ShardedState;
use quill_model::LayerHooks;
use tch::{Device, Kind, Tensor};

/// The micro-batches every rank runs: the most any rank has.
pub fn agree_passes(collective: &mut dyn Collective, own: usize, device: Device) -> Result<usize> {
    let k = collective.world_size();
    let input = Tensor::from_slice(&[own as f32]).to_device(device);
    let mut all = Tensor::f_zeros([k as i64], (Kind::Float, device))?;
    collective.all_gather(&input, &mut all)?;
    let counts = Vec::<f32>::try_from(all.to_device(Device::Cpu))?;
    Ok(counts.into_iter().fold(0.0f32, f32::max) as usize)
}

/// The collective schedule of one micro-batch, as hooks of the checkpointed pass.
pub struct LayerPass<'a> {
    shard: &'a mut ShardedState,
    collective: &'a mut dyn Collective,
    params: &'a [Tensor],
    /// Layers whose forward part of the schedule is done, then those whose backward part
    /// is (`0 ..= 2L`).
    done: usize,
}

impl<'a> LayerPass<'a> {
    /// A micro-batch's schedule over `shard`'s sharded layers of `params`.
    pub fn new(
        shard: &'a mut ShardedState,
        collective: &'a mut dyn Collective,
        params: &'a [Tensor],
    ) -> Self {
        LayerPass {
            shard,
            collective,
            params,
            done: 0,
        }
    }

    fn layers(&self) -> usize {
        self.shard.sharded_layers()
    }

    /// Checks that `layer`'s step is the next one of the schedule.
    fn expect(&self, layer: usize, forward: bool) -> Result<()> {
        let l = self.layers();
        let next = match forward {
            true => layer,
            false => 2 * l - 1 - layer,
        };
        if self.done != next || layer >= l {
            return Err(LearnerError::config(
                "grpo.sharding",
                format!(
                    "zero3: layer {layer}'s {} step is out of order ({} of {} done)",
                    if forward { "forward" } else { "backward" },
                    self.done,
                    2 * l
                ),
            ));
        }
        Ok(())
    }

    /// Makes the rest of the schedule's calls with no data (zero gradients), so that every
    /// rank makes the same calls: after a pass that stopped early, or for a micro-batch
    /// this rank does not have.
    pub fn finish(mut self) -> Result<()> {
        let l = self.layers();
        while self.done < 2 * l {
            if self.done < l {
                let layer = self.done;
                self.before_forward(layer)?;
                self.after_forward(layer)?;
            } else {
                let layer = 2 * l - 1 - self.done;
                self.before_backward(layer)?;
                self.after_backward(layer)?;
            }
        }
        Ok(())
    }
}

impl LayerHooks for LayerPass<'_> {
    type Error = LearnerError;

    fn before_forward(&mut self, layer: usize) -> Result<()> {
        self.expect(layer, true)?;
        self.shard.gather_layer(layer, self.collective, self.params)
    }

    fn after_forward(&mut self, layer: usize) -> Result<()> {
        self.shard.release_layer(layer, self.params)?;
        self.done += 1;
        Ok(())
    }

    fn before_backward(&mut self, layer: usize) -> Result<()> {
        self.expect(layer, false)?;
        self.shard.gather_layer(layer, self.collective, self.params)
    }

    fn after_backward(&mut self, layer: usize) -> Result<()> {
        self.shard
            .reduce_scatter_layer(layer, self.collective, self.params)?;
        self.shard.release_layer(layer, self.params)?;
        self.done += 1;
        Ok(())
    }
}
