//! GRPO advantages: rewards normalised within their group, and combined across signals.

use serde::{Deserialize, Serialize};

use crate::RewardError;

/// How several reward signals of one group become one advantage per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageMode {
    /// The recipe: normalise each signal within the group separately, then take the
    /// weighted mean of the advantages; with equal weights
    /// `A = (A_length + A_quality + A_format) / 3`. Every signal moves the advantage
    /// equally however wide its raw values spread.
    #[default]
    AdvantageAverage,
    /// Sum the raw rewards with the weights, then normalise the sums; the signal whose
    /// values spread widest dominates.
    WeightedSum,
}

/// An error unless `eps` is finite and at least 0.
fn check_eps(eps: f64) -> Result<(), RewardError> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(RewardError::InvalidEpsilon { value: eps })
    }
}

/// An error unless `rewards` is a non-empty group of finite numbers.
fn check_group(rewards: &[f64]) -> Result<(), RewardError> {
    if rewards.is_empty() {
        return Err(RewardError::EmptyGroup);
    }
    match rewards.iter().position(|r| !r.is_finite()) {
        Some(index) => Err(RewardError::NonFiniteReward {
            index,
            value: rewards[index],
        }),
        None => Ok(()),
    }
}

/// The advantages of one group's rewards: `(r − mean) / (std + eps)`, with the
/// population standard deviation (divided by the group size); all zeros when all
/// rewards are equal (a group with nothing to learn from). An error for an empty group,
/// a NaN or infinite reward (naming its index), or an `eps` that is negative or not
/// finite.
///
/// Computed on the rewards divided by their largest magnitude, so that huge rewards
/// cannot overflow; the result is the same.
pub fn group_normalise(rewards: &[f64], eps: f64) -> Result<Vec<f64>, RewardError> {
    check_eps(eps)?;
    check_group(rewards)?;
    let zeros = vec![0.0; rewards.len()];
    if rewards.iter().all(|&r| r == rewards[0]) {
        return Ok(zeros);
    }
    let scale = rewards.iter().fold(0.0, |max: f64, r| max.max(r.abs()));
    let scaled: Vec<f64> = rewards.iter().map(|r| r / scale).collect();
    let n = scaled.len() as f64;
    let mean = scaled.iter().sum::<f64>() / n;
    let std = (scaled.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    if std == 0.0 {
        // Rewards a rounding step apart collapsed when scaled.
        return Ok(zeros);
    }
    let denominator = std + eps / scale;
    Ok(scaled.iter().map(|r| (r - mean) / denominator).collect())
}

/// The advantages of one group scored by several reward signals.
///
/// `per_reward[k]` holds signal `k`'s rewards for the group's samples, in the same
/// sample order for every signal; `weights[k]` is signal `k`'s weight (finite, at least
/// 0, not all 0; only their ratios matter). `mode` says how the signals combine (see
/// [`AdvantageMode`]); `eps` is [`group_normalise`]'s. An error names the problem: no
/// signals, a wrong number of weights, a bad weight, a signal whose group size differs
/// from signal 0's, or a signal with an empty group or a non-finite reward (naming the
/// signal and the index). In [`AdvantageMode::WeightedSum`] a sum that overflows is an
/// error too.
pub fn combine_advantages(
    per_reward: &[Vec<f64>],
    weights: &[f64],
    mode: AdvantageMode,
    eps: f64,
) -> Result<Vec<f64>, RewardError> {
    check_eps(eps)?;
    let first = per_reward.first().ok_or(RewardError::NoSignals)?;
    if weights.len() != per_reward.len() {
        return Err(RewardError::WeightCount {
            signals: per_reward.len(),
            weights: weights.len(),
        });
    }
    if let Some(index) = weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(RewardError::InvalidWeight {
            index,
            value: weights[index],
        });
    }
    let max_weight = weights.iter().fold(0.0, |max: f64, &w| max.max(w));
    if max_weight == 0.0 {
        return Err(RewardError::ZeroWeights);
    }
    let weights: Vec<f64> = weights.iter().map(|w| w / max_weight).collect();
    for (signal, rewards) in per_reward.iter().enumerate() {
        if rewards.len() != first.len() {
            return Err(RewardError::GroupSizeMismatch {
                signal,
                expected: first.len(),
                got: rewards.len(),
            });
        }
        check_group(rewards).map_err(|source| RewardError::InSignal {
            signal,
            source: Box::new(source),
        })?;
    }
    match mode {
        AdvantageMode::AdvantageAverage => {
            let total: f64 = weights.iter().sum();
            let mut combined = vec![0.0; first.len()];
            for (rewards, weight) in per_reward.iter().zip(&weights) {
                for (sum, advantage) in combined.iter_mut().zip(group_normalise(rewards, eps)?) {
                    *sum += weight * advantage;
                }
            }
            Ok(combined.into_iter().map(|sum| sum / total).collect())
        }
        AdvantageMode::WeightedSum => {
            let sums: Vec<f64> = (0..first.len())
                .map(|i| per_reward.iter().zip(&weights).map(|(r, w)| w * r[i]).sum())
                .collect();
            group_normalise(&sums, eps)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, StrDeserializer};
    use serde::de::IntoDeserializer;

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn normalises_with_the_population_std() {
        let a = group_normalise(&[1.0, 2.0, 3.0, 4.0], 0.0).unwrap();
        let std = 1.25f64.sqrt();
        assert_close(&a, &[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std]);
        assert_close(&group_normalise(&[0.0, 2.0], 1.0).unwrap(), &[-0.5, 0.5]);
        assert_close(
            &group_normalise(&[1e308, -1e308, 1e308], 0.0).unwrap(),
            &[2f64.sqrt() / 2.0, -(2f64.sqrt()), 2f64.sqrt() / 2.0],
        );
    }

    #[test]
    fn an_all_equal_group_has_zero_advantages() {
        assert_eq!(group_normalise(&[0.1; 3], 0.0).unwrap(), [0.0; 3]);
        assert_eq!(group_normalise(&[0.7; 5], 1e-6).unwrap(), [0.0; 5]);
        assert_eq!(group_normalise(&[-3.0], 1e-6).unwrap(), [0.0]);
    }

    #[test]
    fn rejects_bad_groups_naming_the_index() {
        let err = group_normalise(&[1.0, 0.5, f64::NAN, 2.0], 1e-6).unwrap_err();
        assert!(
            matches!(err, RewardError::NonFiniteReward { index: 2, value } if value.is_nan()),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "reward 2 of the group is NaN, not a finite number"
        );
        let err = group_normalise(&[f64::NEG_INFINITY, 1.0], 1e-6).unwrap_err();
        assert_eq!(
            err,
            RewardError::NonFiniteReward {
                index: 0,
                value: f64::NEG_INFINITY
            }
        );
        assert_eq!(group_normalise(&[], 1e-6), Err(RewardError::EmptyGroup));
        assert_eq!(
            group_normalise(&[1.0, 2.0], -1.0),
            Err(RewardError::InvalidEpsilon { value: -1.0 })
        );
        assert!(group_normalise(&[1.0, 2.0], f64::NAN).is_err());
    }

    #[test]
    fn averaging_advantages_keeps_a_wide_reward_from_dominating() {
        // Sample 0 is best on length and format; sample 1 on quality, whose raw
        // values spread a hundred times wider.
        let quality = vec![0.0, 10.0, 5.0, 5.0];
        let length = vec![0.1, 0.0, 0.05, 0.05];
        let format = vec![0.1, 0.0, 0.05, 0.05];
        let signals = [quality, length, format];
        let weights = [1.0; 3];
        let s = 2f64.sqrt();
        let average =
            combine_advantages(&signals, &weights, AdvantageMode::AdvantageAverage, 0.0).unwrap();
        assert_close(&average, &[s / 3.0, -s / 3.0, 0.0, 0.0]);
        let sum = combine_advantages(&signals, &weights, AdvantageMode::WeightedSum, 0.0).unwrap();
        assert_close(&sum, &[-s, s, 0.0, 0.0]);
        assert_eq!(AdvantageMode::default(), AdvantageMode::AdvantageAverage);
    }

    #[test]
    fn weights_are_relative() {
        let signals = [vec![0.0, 1.0], vec![1.0, 0.0]];
        let mean = |weights: &[f64], mode| combine_advantages(&signals, weights, mode, 0.0);
        let average = AdvantageMode::AdvantageAverage;
        assert_close(&mean(&[3.0, 1.0], average).unwrap(), &[-0.5, 0.5]);
        assert_close(&mean(&[300.0, 100.0], average).unwrap(), &[-0.5, 0.5]);
        assert_close(&mean(&[1.0, 0.0], average).unwrap(), &[-1.0, 1.0]);
        assert_close(&mean(&[1.0, 1.0], average).unwrap(), &[0.0, 0.0]);
        let sum = AdvantageMode::WeightedSum;
        assert_close(&mean(&[3.0, 1.0], sum).unwrap(), &[-1.0, 1.0]);
        assert_close(&mean(&[1e300, 2e300], sum).unwrap(), &[1.0, -1.0]);
    }

    #[test]
    fn rejects_bad_combinations_naming_the_problem() {
        let mode = AdvantageMode::AdvantageAverage;
        let two = [vec![0.0, 1.0], vec![1.0, 0.0]];
        assert_eq!(
            combine_advantages(&[], &[], mode, 0.0),
            Err(RewardError::NoSignals)
        );
        assert_eq!(
            combine_advantages(&two, &[1.0], mode, 0.0),
            Err(RewardError::WeightCount {
                signals: 2,
                weights: 1
            })
        );
        assert_eq!(
            combine_advantages(&two, &[1.0, -0.5], mode, 0.0),
            Err(RewardError::InvalidWeight {
                index: 1,
                value: -0.5
            })
        );
        assert_eq!(
            combine_advantages(&two, &[0.0, 0.0], mode, 0.0),
            Err(RewardError::ZeroWeights)
        );
        let uneven = [vec![0.0, 1.0], vec![1.0, 0.0, 2.0]];
        let err = combine_advantages(&uneven, &[1.0, 1.0], mode, 0.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reward signal 1 has 3 rewards, but signal 0 has 2"
        );
        assert_eq!(
            combine_advantages(&[vec![], vec![]], &[1.0, 1.0], mode, 0.0),
            Err(RewardError::InSignal {
                signal: 0,
                source: Box::new(RewardError::EmptyGroup)
            })
        );
        assert_eq!(
            combine_advantages(&two, &[1.0, 1.0], mode, f64::INFINITY),
            Err(RewardError::InvalidEpsilon {
                value: f64::INFINITY
            })
        );
    }

    #[test]
    fn a_nan_reward_is_named_by_signal_and_index() {
        let signals = [vec![0.0, 1.0, 2.0, 3.0], vec![1.0, 0.0, 1.0, f64::NAN]];
        for mode in [AdvantageMode::AdvantageAverage, AdvantageMode::WeightedSum] {
            let err = combine_advantages(&signals, &[1.0, 1.0], mode, 1e-6).unwrap_err();
            assert_eq!(
                err.to_string(),
                "reward signal 1: reward 3 of the group is NaN, not a finite number"
            );
        }
    }

    #[test]
    fn a_weighted_sum_that_overflows_is_an_error() {
        let signals = [vec![1e308, 0.0], vec![1e308, 0.0]];
        let err =
            combine_advantages(&signals, &[1.0, 1.0], AdvantageMode::WeightedSum, 0.0).unwrap_err();
        assert_eq!(
            err,
            RewardError::NonFiniteReward {
                index: 0,
                value: f64::INFINITY
            }
        );
    }

    #[test]
    fn modes_have_snake_case_names() {
        let mode = |name: &str| {
            AdvantageMode::deserialize::<StrDeserializer<'_, DeError>>(name.into_deserializer())
        };
        assert_eq!(
            mode("advantage_average"),
            Ok(AdvantageMode::AdvantageAverage)
        );
        assert_eq!(mode("weighted_sum"), Ok(AdvantageMode::WeightedSum));
        assert!(mode("sum").is_err());
    }
}
