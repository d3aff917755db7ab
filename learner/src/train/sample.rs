//! Training samples: validation, grouping into micro-batches by a token budget, and laying
//! a micro-batch out for one forward pass: right-padded rows, or packed end to end in one
//! row without padding.

use crate::error::{LearnerError, Result};
use quill_model::ModelConfig;
use quill_model::{pad_right, Segment};
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
/// padding). Consecutive samples with the same prompt (a GRPO group) stay together where
/// the budget allows, so that their micro-batch computes the prompt once (a run's
/// packed length counts it once); runs too long for the budget are cut. Then first-fit decreasing: the
/// longest runs are placed first and the short ones fill the room they leave. A sample
/// longer than the budget forms a micro-batch of its own.
pub fn packed_micro_batches(batch: &[TrainSample], budget: usize) -> Vec<Vec<usize>> {
    // Runs of consecutive samples sharing a prompt, each with its packed length.
    let mut runs: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, s) in batch.iter().enumerate() {
        let more = s.response.len() - 1;
        match runs.last_mut() {
            Some((len, run)) if batch[run[0]].prompt == s.prompt && *len + more <= budget => {
                *len += more;
                run.push(i);
            }
            _ => runs.push((s.prompt.len() + more, vec![i])),
        }
    }
    runs.sort_by_key(|&(len, _)| std::cmp::Reverse(len));
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (len, run) in runs {
        match groups.iter_mut().find(|(used, _)| used + len <= budget) {
            Some((used, members)) => {
                *used += len;
                members.extend(run);
            }
            None => groups.push((len, run)),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
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
/// end in one row, where samples that follow one with the same prompt share its copy; the
/// response tokens are read back as a flat list of `N` positions.
pub(crate) struct Packed {
    /// Right-padded inputs `[B, T]`, or the packed row `[1, Σ inputs]`.
    pub tokens: Tensor,
    /// The sequences of the packed row (`None`: padded rows): each prompt, and each
    /// response continuing its prompt.
    pub segments: Option<Vec<Segment>>,
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
        if packing {
            return Packed::one_row(samples, device);
        }
        let inputs: Vec<Vec<i64>> = samples
            .iter()
            .map(|s| {
                let mut row = s.prompt.clone();
                row.extend_from_slice(&s.response[..s.response.len() - 1]);
                row
            })
            .collect();
        let (mut rows, mut cols, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (b, s) in samples.iter().enumerate() {
            let start = s.prompt.len() as i64 - 1;
            for (j, &token) in s.response.iter().enumerate() {
                rows.push(b as i64);
                cols.push(start + j as i64);
                targets.push(token);
            }
        }
        let tokens = pad_right(&inputs, 0, device).0;
        Packed::laid_out(samples, tokens, None, [rows, cols, targets])
    }

    /// The packed row: a sample whose prompt its neighbours do not share runs alone;
    /// samples that share one follow a single copy of it, each response attending to the
    /// prompt and itself.
    fn one_row(samples: &[&TrainSample], device: Device) -> Self {
        let mut flat: Vec<i64> = Vec::new();
        let mut segments = Vec::new();
        let (mut rows, mut cols, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        // Whether each sample shares the prompt of the one before it (and a last `false`).
        let shared: Vec<bool> = (0..=samples.len())
            .map(|i| i > 0 && i < samples.len() && samples[i - 1].prompt == samples[i].prompt)
            .collect();
        // The current prompt's segment, and the row position after it.
        let mut prompt = (0, 0);
        for (i, s) in samples.iter().enumerate() {
            let rest = &s.response[..s.response.len() - 1];
            let alone = !shared[i] && !shared[i + 1];
            if alone {
                segments.push(Segment::alone((s.prompt.len() + rest.len()) as i64));
            } else if !shared[i] {
                segments.push(Segment::alone(s.prompt.len() as i64));
            }
            if !shared[i] {
                flat.extend_from_slice(&s.prompt);
                prompt = (segments.len() - 1, flat.len() as i64);
            }
            // The first response token is predicted at the prompt's last position, every
            // later one at the position of the token before it.
            let start = flat.len() as i64;
            for (j, &token) in s.response.iter().enumerate() {
                rows.push(0);
                cols.push(if j == 0 {
                    prompt.1 - 1
                } else {
                    start + j as i64 - 1
                });
                targets.push(token);
            }
            if !alone && !rest.is_empty() {
                segments.push(Segment::after(prompt.0, rest.len() as i64));
            }
            flat.extend_from_slice(rest);
        }
        let tokens = Tensor::from_slice(&flat).to(device).unsqueeze(0);
        Packed::laid_out(samples, tokens, Some(segments), [rows, cols, targets])
    }

    fn laid_out(
        samples: &[&TrainSample],
        tokens: Tensor,
        segments: Option<Vec<Segment>>,
        [rows, cols, targets]: [Vec<i64>; 3],
    ) -> Self {
        let on_device = |v: &[i64]| Tensor::from_slice(v).to(tokens.device());
        Packed {
            rows: on_device(&rows),
            cols: on_device(&cols),
            targets: on_device(&targets),
            tokens,
            segments,
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

    /// Tokens of the packed row of `members` (in this order): each sample's input (prompt and
    /// response without its last token), with a prompt that a sample shares with the one
    /// before it counted once.
    fn packed_len(batch: &[TrainSample], members: &[usize]) -> usize {
        members
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let s = &batch[i];
                let shared = k > 0 && batch[members[k - 1]].prompt == s.prompt;
                s.response.len() - 1 + if shared { 0 } else { s.prompt.len() }
            })
            .sum()
    }

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
        assert_eq!(
            packed.segments.as_deref(),
            Some(&[Segment::alone(4), Segment::alone(1)][..])
        );
        assert_eq!(Vec::<i64>::try_from(&packed.rows).unwrap(), [0, 0, 0, 0]);
        assert_eq!(Vec::<i64>::try_from(&packed.cols).unwrap(), [1, 2, 3, 4]);
        assert_eq!(Vec::<i64>::try_from(&packed.targets).unwrap(), [7, 8, 9, 4]);
    }

    /// `sample(prompt, response)` with a prompt of its own (`i` tells them apart).
    fn apart(i: usize, prompt: usize, response: usize) -> TrainSample {
        let mut s = sample(prompt, response);
        s.prompt[0] = 10 + i as i64;
        s
    }

    #[test]
    fn a_long_sample_and_many_short_ones_share_one_packed_micro_batch() {
        // One 3,500-token sample and forty of 8 to 16 tokens: 3,929 input tokens (each
        // sample's input lacks its last token).
        let mut batch = vec![apart(0, 100, 3_400)];
        batch.extend((0..40).map(|i| apart(i + 1, 4, 4 + i % 9)));
        let groups = packed_micro_batches(&batch, 4_096);
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert_eq!(packed_len(&batch, &groups[0]), 3_929);
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
        assert_eq!(padded_tokens(&batch, &groups), 3_500 + 40 * 16);
    }

    #[test]
    fn packed_micro_batches_respect_the_budget_and_keep_every_sample() {
        let lengths = [3usize, 90, 17, 64, 60, 5, 33, 31, 120, 8, 250];
        let batch: Vec<TrainSample> = (0..lengths.len())
            .map(|i| apart(i, 1, lengths[i] - 1))
            .collect();
        let groups = packed_micro_batches(&batch, 128);
        for g in &groups {
            let tokens = packed_len(&batch, g);
            assert!(g.len() == 1 || tokens <= 128, "{g:?}: {tokens}");
        }
        // 670 input tokens: the 249 of the longest sample alone, the rest in 4 passes.
        assert_eq!(groups.len(), 5, "{groups:?}");
        let mut all: Vec<usize> = groups.concat();
        all.sort_unstable();
        assert_eq!(all, (0..batch.len()).collect::<Vec<_>>());
        assert_eq!(
            groups.iter().map(|g| packed_len(&batch, g)).sum::<usize>(),
            670
        );
    }

    #[test]
    fn a_group_packs_its_prompt_once_unless_the_budget_cuts_it() {
        // Group x: four responses of 6 tokens to a 10-token prompt (10 + 4 · 5 inputs);
        // group y: three of 11 tokens to a 20-token prompt (20 + 3 · 10).
        let group = |first: i64, prompt: usize, n: usize, response: usize| {
            (0..n).map(move |_| {
                let mut s = sample(prompt, response);
                s.prompt[0] = first;
                s
            })
        };
        let batch: Vec<TrainSample> = group(7, 10, 4, 6).chain(group(8, 20, 3, 11)).collect();
        let groups = packed_micro_batches(&batch, 1_000);
        assert_eq!(
            groups,
            vec![vec![4, 5, 6, 0, 1, 2, 3]],
            "the longer run first"
        );
        assert_eq!(packed_len(&batch, &groups[0]), 30 + 50);
        let refs: Vec<&TrainSample> = batch.iter().collect();
        let packed = Packed::new(&refs, Device::Cpu, true);
        assert_eq!(packed.tokens.size(), [1, 80]);
        let segments = packed.segments.unwrap();
        assert_eq!(segments.len(), 2 + 7);
        assert_eq!(segments[5], Segment::alone(20));
        assert!(segments[6..].iter().all(|s| *s == Segment::after(5, 10)));
        // Every response's first token is predicted at its prompt's last position.
        let cols = Vec::<i64>::try_from(&packed.cols).unwrap();
        assert!((0..4).all(|k| cols[6 * k] == 9), "{cols:?}");
        assert!((0..3).all(|k| cols[24 + 11 * k] == 30 + 19), "{cols:?}");
        // A budget of 40 cuts group y after two samples (20 + 2 · 10); the one left over
        // packs its prompt again.
        let groups = packed_micro_batches(&batch, 40);
        assert_eq!(groups, vec![vec![4, 5], vec![0, 1, 2, 3], vec![6]]);
        assert!(groups.iter().all(|g| packed_len(&batch, g) <= 40));
    }
}
