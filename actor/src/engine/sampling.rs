//! Sampling parameters and the per-sample sampler.
//!
//! **Which distribution the log-probabilities come from.** For a row of logits `z` and
//! temperature `T > 0`, quill samples from `softmax(z / T)` restricted to the top-k / top-p
//! candidates, and records `log_softmax(z / T)[token]`: the tempered distribution *before*
//! top-k/top-p truncation. With `top_p = 1` and `top_k = 0` (the recipe's setting) that is
//! exactly the distribution sampled from; a learner recomputes the same quantity as
//! `log_softmax(logits / T)` over the finished sequence. With `T = 0` decoding is greedy
//! (first maximum) and the recorded value is `log_softmax(z)[token]`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How one request's samples are drawn and when they stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Upper bound on generated tokens per sample (the model's context also bounds it).
    pub max_new_tokens: usize,
    /// Seed; sample `i` of a request draws from stream `i` of this seed, so results do not
    /// depend on how requests are batched.
    pub seed: u64,
    /// Token ids that end a sample (the id is kept as its last token).
    pub stop_token_ids: Vec<i64>,
    /// Strings that end a sample once the generated text contains them.
    pub stop_strings: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err("stop_strings must not contain an empty string".into());
        }
        Ok(())
    }

    /// The divisor applied to logits before the log-softmax (1 when greedy).
    pub fn logit_divisor(&self) -> f64 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
    }
}

/// Draws tokens for one sample from rows of log-probabilities.
pub struct Sampler {
    rng: ChaCha8Rng,
    greedy: bool,
    top_p: f64,
    top_k: usize,
}

impl Sampler {
    /// The sampler of sample `index` of a request with `params`.
    pub fn new(params: &SamplingParams, index: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        rng.set_stream(index);
        Sampler {
            rng,
            greedy: params.temperature == 0.0,
            top_p: params.top_p,
            top_k: params.top_k,
        }
    }

    /// Picks a token from `logprobs` (a log-softmax row) and returns it with its log-prob.
    pub fn pick(&mut self, logprobs: &[f32]) -> (i64, f32) {
        let index = if self.greedy {
            argmax(logprobs)
        } else if self.top_k == 0 && self.top_p >= 1.0 {
            self.draw(logprobs, 0..logprobs.len(), 1.0)
        } else {
            self.draw_truncated(logprobs)
        };
        (index as i64, logprobs[index])
    }

    fn draw(
        &mut self,
        logprobs: &[f32],
        candidates: impl Iterator<Item = usize>,
        mass: f64,
    ) -> usize {
        let target = self.rng.random::<f64>() * mass;
        let mut cumulative = 0.0f64;
        let mut last = None;
        for i in candidates {
            let p = f64::from(logprobs[i]).exp();
            if p > 0.0 {
                last = Some(i);
            }
            cumulative += p;
            if cumulative > target && p > 0.0 {
                return i;
            }
        }
        last.unwrap_or_else(|| argmax(logprobs))
    }

    fn draw_truncated(&mut self, logprobs: &[f32]) -> usize {
        let mut order: Vec<usize> = (0..logprobs.len()).collect();
        let by_prob = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]);
        if self.top_k > 0 && self.top_k < order.len() {
            order.select_nth_unstable_by(self.top_k - 1, by_prob);
            order.truncate(self.top_k);
        }
        order.sort_unstable_by(by_prob);
        let mut mass = 0.0f64;
        let mut keep = 0;
        for &i in &order {
            mass += f64::from(logprobs[i]).exp();
            keep += 1;
            if mass >= self.top_p {
                break;
            }
        }
        order.truncate(keep);
        self.draw(logprobs, order.into_iter(), mass)
    }
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax(logits: &[f32]) -> Vec<f32> {
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        logits.iter().map(|l| l - max - sum.ln()).collect()
    }

    fn params(temperature: f64, top_p: f64, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let row = log_softmax(&[0.1, 2.0, 2.0, -1.0]);
        let (tok, lp) = Sampler::new(&params(0.0, 1.0, 0, 1), 0).pick(&row);
        assert_eq!(tok, 1);
        assert_eq!(lp, row[1]);
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        let row = log_softmax(&[0.0, 1.0, 2.0]);
        let mut sampler = Sampler::new(&params(1.0, 1.0, 0, 7), 0);
        let mut counts = [0usize; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[sampler.pick(&row).0 as usize] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            let expected = f64::from(row[i]).exp();
            let observed = *c as f64 / n as f64;
            assert!(
                (observed - expected).abs() < 0.015,
                "token {i}: {observed} vs {expected}"
            );
        }
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let row = log_softmax(&[3.0, 2.9, 0.0, -1.0, 0.5]);
        let mut k2 = Sampler::new(&params(1.0, 1.0, 2, 3), 0);
        let mut p_small = Sampler::new(&params(1.0, 0.3, 0, 3), 0);
        for _ in 0..2000 {
            assert!(k2.pick(&row).0 <= 1);
            assert_eq!(p_small.pick(&row).0, 0);
        }
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let row = log_softmax(&[0.0; 50]);
        let draw = |index| {
            let mut s = Sampler::new(&params(1.0, 1.0, 0, 42), index);
            (0..20).map(|_| s.pick(&row).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn bad_values_are_named() {
        assert!(params(-1.0, 1.0, 0, 0)
            .validate()
            .unwrap_err()
            .contains("temperature"));
        assert!(params(1.0, 0.0, 0, 0)
            .validate()
            .unwrap_err()
            .contains("top_p"));
        assert!(params(f64::NAN, 1.0, 0, 0).validate().is_err());
        let zero = SamplingParams {
            max_new_tokens: 0,
            ..SamplingParams::default()
        };
        assert!(zero.validate().unwrap_err().contains("max_new_tokens"));
    }
}
