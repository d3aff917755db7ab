//! Training samples: validation, grouping into micro-batches by a token budget, and laying
//! a micro-batch out for one forward pass: right-padded rows, or packed end to end in one
//! row without padding.

use crate::error::{LearnerError, Result};
use quill_model::pad_right;
use quill_model::ModelConfig;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// One scored response, as the learner trains on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSample {
    /// Prompt token ids (at least one: the first response token is predicted from it).
    pub prompt: Vec<i64>,
    /// Response token ids (at least one).
    pub response: Vec<i64>,
    /// The behaviour policy's log-probability of each response token, as the actor
    /// recorded it: `log_softmax(logits / T)[token]`.
    pub behaviour_logprobs: Vec<f32>,
    /// The sample's advantage (shared by all its tokens).
    pub advantage: f32,
}

impl TrainSample {
    /// Prompt plus response length in tokens.
    pub fn total_tokens(&self) -> usize {
        self.prompt.len() + self.response.len()
    }

    /// Checks the sample against the model it will train; the error names `index` (its
    /// position in the batch) and the problem.
    pub fn validate(&self, index: usize, config: &ModelConfig) -> Result<()> {
        let fail = |reason: String| Err(LearnerError::InvalidSample { index, reason });
        if self.prompt.is_empty() {
            return fail("empty prompt".into());
        }
        if self.response.is_empty() {
            return fail("empty response".into());
        }
        if self.behaviour_logprobs.len() != self.response.len() {
            return fail(format!(
                "{} behaviour log-probs for {} response tokens",
                self.behaviour_logprobs.len(),
                self.response.len()
            ));
        }
        if let Some(i) = self.behaviour_logprobs.iter().position(|l| !l.is_finite()) {
            return fail(format!(
                "behaviour log-prob {i} is not finite ({})",
                self.behaviour_logprobs[i]
            ));
        }
        if !self.advantage.is_finite() {
            return fail(format!("advantage is not finite ({})", self.advantage));
        }
        let vocab = config.vocab_size;
        let tokens = self.prompt.iter().chain(&self.response);
        if let Some(id) = tokens.copied().find(|&id| id < 0 || id >= vocab) {
            return fail(format!(
                "token id {id} is outside the vocabulary (size {vocab})"
            ));
        }
        let max = config.max_position_embeddings as usize;
        if self.total_tokens() > max {
            return fail(format!(
                "{} tokens exceed the model's context of {max}",
                self.total_tokens()
            ));
        }
        Ok(())
    }
}

/// Validates every sample of a non-empty batch.
pub fn validate_batch(batch: &[TrainSample], config: &ModelConfig) -> Result<()> {
    if batch.is_empty() {
        return Err(LearnerError::EmptyBatch);
    }
    batch
        .iter()
        .enumerate()
        .try_for_each(|(i, s)| s.validate(i, config))
}

/// What one forward/backward pass costs besides its tokens, in padded-token equivalents:
/// splitting a batch into more micro-batches pays off only when it saves more padding.
pub const PASS_OVERHEAD_TOKENS: usize = 64;

/// Groups sample indices into micro-batches whose padded size (rows × longest row) stays
/// within `budget` tokens, with the least padding: samples sorted longest first are cut
/// into runs that minimise the padded tokens plus [`PASS_OVERHEAD_TOKENS`] per pass (an
/// exact dynamic programme over the cut points). A sample longer than the budget forms a
/// micro-batch of its own.
pub fn micro_batches(batch: &[TrainSample], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(batch[i].total_tokens()));
    let n = order.len();
    // best[k]: the least cost of the samples order[k..]; end[k]: where its first run ends.
    let mut best = vec![0usize; n + 1];
    let mut end = vec![n; n + 1];
    for k in (0..n).rev() {
        let width = batch[order[k]].total_tokens();
        best[k] = usize::MAX;
        for stop in k + 1..=n {
            let rows = stop - k;
            if rows > 1 && rows * width > budget {
                break;
            }
            let cost = rows * width + PASS_OVERHEAD_TOKENS + best[stop];
            if cost < best[k] {
                best[k] = cost;
                end[k] = stop;
            }
        }
    }
    let mut groups = Vec::new();
    let mut k = 0;
    while k < n {
        groups.push(order[k..end[k]].to_vec());
        k = end[k];
    }
    groups
}

/// Groups sample indices into packed micro-batches of at most `budget` real tokens (no
/// padding): first-fit decreasing, so the longest samples are placed first and the short
/// ones fill the room they leave. A sample longer than the budget forms a micro-batch of
/// its own.
pub fn packed_micro_batches(batch: &[TrainSample], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(batch[i].total_tokens()));
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let len = batch[i].total_tokens();
        match groups.iter_mut().find(|(used, _)| used + len <= budget) {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => groups.push((len, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// Forward-pass positions of a batch split into `groups`: with `packing` the samples'
/// tokens, else rows × longest row ([`padded_tokens`]).
pub fn pass_tokens(batch: &[TrainSample], groups: &[Vec<usize>], packing: bool) -> usize {
    if packing {
        groups
            .iter()
            .flatten()
            .map(|&i| batch[i].total_tokens())
            .sum()
    } else {
        padded_tokens(batch, groups)
    }
}

/// Padded tokens of a batch split into `groups` (rows × longest row, summed).
pub fn padded_tokens(batch: &[TrainSample], groups: &[Vec<usize>]) -> usize {
    groups
        .iter()
        .map(|g| {
            g.len()
                * g.iter()
                    .map(|&i| batch[i].total_tokens())
                    .max()
                    .unwrap_or(0)
        })
        .sum()
}

/// A micro-batch laid out for one forward pass: each sample's input is prompt + response
/// without its last token, either one right-padded row per sample or all of them end to
/// end in one row; the response tokens are read back as a flat list of `N` positions.
pub(crate) struct Packed {
    /// Right-padded inputs `[B, T]`, or the packed row `[1, Σ inputs]`.
    pub tokens: Tensor,
    /// Each sample's input length when packed in one row (`None`: padded rows).
    pub segments: Option<Vec<i64>>,
    /// Row of each response token's predicting position, `[N]`.
    pub rows: Tensor,
    /// Column of each response token's predicting position, `[N]`.
    pub cols: Tensor,
    /// The response tokens, `[N]`.
    pub targets: Tensor,
    /// Response length of each sample.
    pub response_lens: Vec<usize>,
}

impl Packed {
    /// Lays out `samples` on `device`: packed in one row when `packing`, else padded.
    pub fn new(samples: &[&TrainSample], device: Device, packing: bool) -> Self {
        let inputs: Vec<Vec<i64>> = samples
            .iter()
            .map(|s| {
                let mut row = s.prompt.clone();
                row.extend_from_slice(&s.response[..s.response.len() - 1]);
                row
            })
            .collect();
        let (tokens, segments) = if packing {
            let flat = inputs.concat();
            let lens = inputs.iter().map(|r| r.len() as i64).collect();
            (
                Tensor::from_slice(&flat).to(device).unsqueeze(0),
                Some(lens),
            )
        } else {
            (pad_right(&inputs, 0, device).0, None)
        };
        let (mut rows, mut cols, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for (b, s) in samples.iter().enumerate() {
            let (row, start) = match packing {
                true => (0, offset + s.prompt.len() as i64 - 1),
                false => (b as i64, s.prompt.len() as i64 - 1),
            };
            for (j, &token) in s.response.iter().enumerate() {
                rows.push(row);
                cols.push(start + j as i64);
                targets.push(token);
            }
            offset += inputs[b].len() as i64;
        }
        let on_device = |v: &[i64]| Tensor::from_slice(v).to(device);
        Packed {
            tokens,
            segments,
            rows: on_device(&rows),
            cols: on_device(&cols),
            targets: on_device(&targets),
            response_lens: samples.iter().map(|s| s.response.len()).collect(),
        }
    }

    /// Number of response tokens.
    pub fn len(&self) -> usize {
        self.response_lens.iter().sum()
    }

    /// One value per response token: each sample's `value` repeated over its tokens, `[N]`.
    pub fn per_token(&self, values: impl Iterator<Item = f32>, device: Device) -> Tensor {
        let flat: Vec<f32> = values
            .zip(&self.response_lens)
            .flat_map(|(v, &n)| std::iter::repeat_n(v, n))
            .collect();
        Tensor::from_slice(&flat).to(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prompt: usize, response: usize) -> TrainSample {
        TrainSample {
            prompt: vec![1; prompt],
            response: vec![2; response],
            behaviour_logprobs: vec![-1.0; response],
            advantage: 0.5,
        }
    }

    #[test]
    fn micro_batches_respect_the_budget() {
        let batch = [sample(2, 3), sample(5, 5), sample(1, 1), sample(20, 20)];
        let groups = micro_batches(&batch, 12);
        assert_eq!(groups, vec![vec![3], vec![1], vec![0, 2]]);
        let all = micro_batches(&batch, 1000);
        assert_eq!(
            all,
            vec![vec![3], vec![1, 0, 2]],
            "one pass would pad 2 rows by 30+"
        );
        assert_eq!(padded_tokens(&batch, &all), 40 + 3 * 10);
        let alike = [sample(30, 30), sample(29, 30), sample(30, 28), sample(2, 3)];
        assert_eq!(
            micro_batches(&alike, 1000),
            vec![vec![0, 1, 2, 3]],
            "padding is cheaper than a pass"
        );
    }

    #[test]
    fn micro_batches_pad_least_of_all_cuts() {
        let lengths = [3usize, 90, 17, 64, 60, 5, 33, 31, 120, 8];
        let batch: Vec<TrainSample> = lengths.iter().map(|&n| sample(1, n - 1)).collect();
        let chosen = micro_batches(&batch, 400);
        let cost = |groups: &[Vec<usize>]| {
            padded_tokens(&batch, groups) + PASS_OVERHEAD_TOKENS * groups.len()
        };
        let mut sorted: Vec<usize> = (0..batch.len()).collect();
        sorted.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        // Every way of cutting the sorted list (2^9) that respects the budget costs at least as much.
        for mask in 0u32..(1 << (sorted.len() - 1)) {
            let mut groups = vec![vec![sorted[0]]];
            for (k, &i) in sorted.iter().enumerate().skip(1) {
                if mask & (1 << (k - 1)) != 0 {
                    groups.push(Vec::new());
                }
                groups.last_mut().unwrap().push(i);
            }
            let fits = groups
                .iter()
                .all(|g| g.len() == 1 || padded_tokens(&batch, std::slice::from_ref(g)) <= 400);
            if fits {
                assert!(cost(&chosen) <= cost(&groups), "{chosen:?} vs {groups:?}");
            }
        }
        let mut all: Vec<usize> = chosen.concat();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..batch.len()).collect::<Vec<_>>(),
            "every sample once"
        );
    }

    #[test]
    fn packing_points_at_the_predicting_positions() {
        let a = TrainSample {
            prompt: vec![5, 6],
            response: vec![7, 8, 9],
            behaviour_logprobs: vec![-1.0; 3],
            advantage: 1.0,
        };
        let b = TrainSample {
            prompt: vec![3],
            response: vec![4],
            behaviour_logprobs: vec![-1.0],
            advantage: 1.0,
        };
        let packed = Packed::new(&[&a, &b], Device::Cpu, false);
        assert_eq!(packed.tokens.size(), [2, 4]);
        assert_eq!(packed.segments, None);
        assert_eq!(Vec::<i64>::try_from(&packed.rows).unwrap(), [0, 0, 0, 1]);
        assert_eq!(Vec::<i64>::try_from(&packed.cols).unwrap(), [1, 2, 3, 0]);
        assert_eq!(Vec::<i64>::try_from(&packed.targets).unwrap(), [7, 8, 9, 4]);
        let adv = packed.per_token([1.0f32, 2.0].into_iter(), Device::Cpu);
        assert_eq!(Vec::<f32>::try_from(&adv).unwrap(), [1.0, 1.0, 1.0, 2.0]);
        assert_eq!(packed.len(), 4);
        // Packed: inputs [5, 6, 7, 8] and [3] in one row.
        let packed = Packed::new(&[&a, &b], Device::Cpu, true);
        assert_eq!(
            Vec::<i64>::try_from(&packed.tokens.view([-1])).unwrap(),
            [5, 6, 7, 8, 3]
        );
        assert_eq!(packed.segments.as_deref(), Some(&[4i64, 1][..]));
        assert_eq!(Vec::<i64>::try_from(&packed.rows).unwrap(), [0, 0, 0, 0]);
        assert_eq!(Vec::<i64>::try_from(&packed.cols).unwrap(), [1, 2, 3, 4]);
        assert_eq!(Vec::<i64>::try_from(&packed.targets).unwrap(), [7, 8, 9, 4]);
    }

    #[test]
    fn a_long_sample_and_many_short_ones_share_one_packed_micro_batch() {
        // One 3,500-token sample and forty of 8 to 16 tokens: 3,970 tokens.
        let mut batch = vec![sample(100, 3_400)];
        batch.extend((0..40).map(|i| sample(4, 4 + i % 9)));
        let groups = packed_micro_batches(&batch, 4_096);
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert_eq!(pass_tokens(&batch, &groups, true), 3_970);
        // Padded, the short samples cannot share the long one's pass (2 × 3,500 rows
        // exceed the budget); the least padding splits them in two passes padded to 16
        // and 11 tokens.
        let padded = micro_batches(&batch, 4_096);
        assert_eq!(padded.len(), 3, "{padded:?}");
        assert_eq!(padded_tokens(&batch, &padded), 3_500 + 20 * 16 + 20 * 11);
        // A tighter budget: the long sample alone, the short ones packed together.
        let groups = packed_micro_batches(&batch, 3_500);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[0], vec![0]);
        assert_eq!(groups[1].len(), 40);
        assert_eq!(pass_tokens(&batch, &groups, false), 3_500 + 40 * 16);
    }

    #[test]
    fn packed_micro_batches_respect_the_budget_and_keep_every_sample() {
        let lengths = [3usize, 90, 17, 64, 60, 5, 33, 31, 120, 8, 250];
        let batch: Vec<TrainSample> = lengths.iter().map(|&n| sample(1, n - 1)).collect();
        let groups = packed_micro_batches(&batch, 128);
        for g in &groups {
            let tokens: usize = g.iter().map(|&i| lengths[i]).sum();
            assert!(g.len() == 1 || tokens <= 128, "{g:?}: {tokens}");
        }
        // 681 tokens: the 250-token sample alone, the rest in ⌈431 / 128⌉ = 4 passes.
        assert_eq!(groups.len(), 5, "{groups:?}");
        let mut all: Vec<usize> = groups.concat();
        all.sort_unstable();
        assert_eq!(all, (0..batch.len()).collect::<Vec<_>>());
        assert_eq!(pass_tokens(&batch, &groups, true), 681);
    }
}
