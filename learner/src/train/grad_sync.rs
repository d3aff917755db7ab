//! Data parallelism inside the training step: every learner rank computes the gradient of
//! its shard (weighted by the global token count, so the sum over ranks is the gradient of
//! the global batch loss), then the ranks agree on whether every loss was finite, sum their
//! loss statistics, and sum their gradients bucket by bucket (each bucket flattened into one
//! buffer, one all-reduce per bucket). Rank 0's weights and optimizer state are copied to
//! every rank when the group forms, and weight checksums catch ranks that drift apart.

use crate::error::{LearnerError, Result};
use crate::parallel::collective::{Collective, ReduceOp};
use crate::train::grpo::LossSums;
use tch::{Device, Kind, Tensor};

/// Relative spread of the ranks' weight checksums above which they count as diverged.
const DIVERGENCE_TOLERANCE: f64 = 1e-6;

/// A trainer's link to the other learner ranks.
pub struct GradSync {
    collective: Box<dyn Collective>,
    bucket_bytes: usize,
}

impl GradSync {
    /// Syncs gradients over `collective` in buckets of about `bucket_bytes`.
    pub fn new(collective: Box<dyn Collective>, bucket_bytes: usize) -> Self {
        GradSync {
            collective,
            bucket_bytes: bucket_bytes.max(4),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// Bytes of gradient per collective call.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// The collective itself (the sharded optimizer's reduce-scatter and all-gather).
    pub(crate) fn collective(&mut self) -> &mut dyn Collective {
        self.collective.as_mut()
    }

    /// Sums the ranks' loss statistics and agrees whether every rank's loss was finite.
    pub(crate) fn reduce_sums(
        &mut self,
        sums: &LossSums,
        sequences: usize,
        finite: bool,
        device: Device,
    ) -> Result<(LossSums, usize, bool)> {
        let values = [
            f64::from(u8::from(!finite)),
            if finite { sums.loss } else { 0.0 },
            sums.clipped,
            sums.ratio,
            sums.kl,
            sums.tokens as f64,
            sequences as f64,
            sums.entropy,
        ];
        let mut t = Tensor::from_slice(&values)
            .to_kind(Kind::Float)
            .to_device(device);
        self.collective.all_reduce(&mut t, ReduceOp::Sum)?;
        let r = Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double))?;
        let all_finite = r[0] == 0.0 && finite;
        let summed = LossSums {
            loss: if r[0] == 0.0 { r[1] } else { f64::NAN },
            clipped: r[2],
            ratio: r[3],
            kl: r[4],
            entropy: r[7],
            tokens: r[5].round() as usize,
        };
        Ok((summed, r[6].round() as usize, all_finite))
    }

    /// Sums every parameter's gradient over the ranks, in place. Every gradient must be
    /// defined (zeros where this rank had no data).
    pub(crate) fn all_reduce_grads(&mut self, params: &[Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len() && (end == start || bytes < self.bucket_bytes) {
                bytes += grads[end].numel() * 4;
                end += 1;
            }
            let bucket = &grads[start..end];
            let views: Vec<Tensor> = bucket.iter().map(|g| g.reshape([-1])).collect();
            let mut flat = Tensor::f_cat(&views, 0)?;
            self.collective.all_reduce(&mut flat, ReduceOp::Sum)?;
            let mut offset = 0;
            for g in bucket {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                g.f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(&g)?)?;
                offset += n;
            }
            start = end;
        }
        Ok(())
    }

    /// Overwrites every rank's `tensors` with rank 0's.
    pub(crate) fn broadcast_from_root(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for t in tensors {
            self.collective.broadcast(t, 0)?;
        }
        Ok(())
    }

    /// Compares a checksum of this rank's weights with every other rank's; fails when they
    /// differ by more than float noise. Returns the relative spread.
    pub(crate) fn check_same_weights(
        &mut self,
        params: &[Tensor],
        step: u64,
        device: Device,
    ) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let mut checksum = 0.0;
        for p in params {
            checksum += p
                .f_to_kind(Kind::Double)?
                .f_square()?
                .f_sum(Kind::Double)?
                .double_value(&[]);
        }
        // Each rank fills its own two slots (an f32 split of the f64): the sum over ranks
        // is exact because every other rank adds zeros there.
        let k = self.world_size();
        let hi = checksum as f32;
        let lo = (checksum - f64::from(hi)) as f32;
        let mut slots = vec![0f32; 2 * k];
        slots[2 * self.rank()] = hi;
        slots[2 * self.rank() + 1] = lo;
        let mut t = Tensor::from_slice(&slots).to_device(device);
        self.collective.all_reduce(&mut t, ReduceOp::Sum)?;
        let all = Vec::<f32>::try_from(t.to_device(Device::Cpu))?;
        let checksums: Vec<f64> = all
            .chunks_exact(2)
            .map(|c| f64::from(c[0]) + f64::from(c[1]))
            .collect();
        let lo_sum = checksums.iter().copied().fold(f64::INFINITY, f64::min);
        let hi_sum = checksums.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let spread = (hi_sum - lo_sum) / hi_sum.abs().max(f64::MIN_POSITIVE);
        if spread.is_nan() || spread > DIVERGENCE_TOLERANCE {
            return Err(LearnerError::Diverged { step, checksums });
        }
        Ok(spread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::collective::{on_loopback_ranks, RingCollective};
    use crate::testing::{batch, sample, tiny_model, trainer_config};
    use crate::train::grpo::{token_weights, LossAggregation};
    use crate::Trainer;
    use quill_config::job::ParallelSection;
    use std::time::Duration;

    /// Three global batches, the last smaller than three ranks' worth.
    fn batches() -> Vec<Vec<crate::TrainSample>> {
        let mut flipped = batch();
        flipped.iter_mut().for_each(|s| s.advantage = -s.advantage);
        flipped.push(sample(9, 4, 3, -3.6, 0.3));
        vec![
            batch(),
            flipped,
            vec![sample(5, 3, 5, -3.8, 1.0), sample(6, 2, 4, -3.9, -1.0)],
        ]
    }

    fn flat_weights(trainer: &Trainer) -> Vec<f32> {
        trainer
            .optimizer()
            .params()
            .iter()
            .flat_map(|p| Vec::<f32>::try_from(p.reshape([-1])).unwrap())
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Runs `body(rank, ring)` for `world` ranks on threads over a loopback ring.
    fn on_ranks<T: Send>(world: usize, body: impl Fn(usize, RingCollective) -> T + Sync) -> Vec<T> {
        on_loopback_ranks(world, Duration::from_secs(20), |ring| {
            body(ring.rank(), ring)
        })
    }

    /// Runs `world` ranks on threads over a loopback ring; rank r starts from a model drawn
    /// with seed `1 + r` (rank 0's is broadcast). Returns each rank's weights and loss after
    /// every step.
    fn train_ranks(world: usize, aggregation: LossAggregation) -> Vec<Vec<(Vec<f32>, f64, f64)>> {
        on_ranks(world, |rank, ring| {
            let mut trainer = Trainer::new(
                tiny_model(1 + rank as u64),
                None,
                trainer_config(16, aggregation, 0.5),
            )
            .unwrap();
            trainer.attach(GradSync::new(Box::new(ring), 600)).unwrap();
            let mut history = Vec::new();
            for global in batches() {
                let global_tokens: usize = global.iter().map(|s| s.response.len()).sum();
                let weights = token_weights(&global, aggregation);
                let (shard, w): (Vec<_>, Vec<_>) = global
                    .into_iter()
                    .zip(weights)
                    .enumerate()
                    .filter(|(i, _)| i % world == rank)
                    .map(|(_, pair)| pair)
                    .unzip();
                let shard_tokens: usize = shard.iter().map(|s| s.response.len()).sum();
                let stats = trainer.step_shard(&shard, &w).unwrap();
                assert_eq!(stats.shard_tokens, shard_tokens, "rank {rank}");
                assert_eq!(stats.tokens, global_tokens, "rank {rank}");
                assert_eq!(trainer.check_ranks().unwrap(), 0.0);
                history.push((flat_weights(&trainer), stats.loss, stats.grad_norm));
            }
            history
        })
    }

    #[test]
    fn ranks_take_the_same_steps_as_one_rank_on_the_global_batch() {
        for aggregation in [LossAggregation::TokenMean, LossAggregation::SequenceMean] {
            let mut single =
                Trainer::new(tiny_model(1), None, trainer_config(16, aggregation, 0.5)).unwrap();
            let reference: Vec<(Vec<f32>, f64, f64)> = batches()
                .iter()
                .map(|b| {
                    let stats = single.step(b).unwrap();
                    (flat_weights(&single), stats.loss, stats.grad_norm)
                })
                .collect();
            for world in [2, 3] {
                let ranks = train_ranks(world, aggregation);
                for (step, expected) in reference.iter().enumerate() {
                    for (rank, history) in ranks.iter().enumerate() {
                        let (weights, loss, norm) = &history[step];
                        assert_eq!(
                            weights, &ranks[0][step].0,
                            "{world} ranks, step {step}: rank {rank} differs from rank 0"
                        );
                        let diff = max_diff(weights, &expected.0);
                        assert!(
                            diff < 1e-5,
                            "{world} ranks, step {step}: {diff} from one rank"
                        );
                        assert!((loss - expected.1).abs() < 1e-5, "{loss} vs {}", expected.1);
                        assert!(
                            (norm - expected.2).abs() < 1e-4 * expected.2,
                            "{norm} vs {}",
                            expected.2
                        );
                    }
                }
                let moved = max_diff(
                    &ranks[0][2].0,
                    &flat_weights(
                        &Trainer::new(tiny_model(1), None, trainer_config(16, aggregation, 0.5))
                            .unwrap(),
                    ),
                );
                assert!(moved > 1e-3, "training moved the weights by {moved}");
            }
        }
    }

    #[test]
    fn diverged_ranks_are_caught() {
        let errors = on_ranks(2, |rank, ring| {
            let mut trainer = Trainer::new(
                tiny_model(1),
                None,
                trainer_config(16, LossAggregation::TokenMean, 0.5),
            )
            .unwrap();
            trainer
                .attach(GradSync::new(
                    Box::new(ring),
                    ParallelSection::default().bucket_bytes(),
                ))
                .unwrap();
            if rank == 1 {
                let _guard = tch::no_grad_guard();
                let mut p = trainer.optimizer().params()[0].shallow_clone();
                let _ = p.f_add_scalar_(1e-2).unwrap();
            }
            trainer.check_ranks().unwrap_err().to_string()
        });
        for err in errors {
            assert!(err.contains("learner ranks diverged at step 0"), "{err}");
        }
    }
}
