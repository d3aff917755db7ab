//! The length reward: a question's target word range, and how well an answer meets it.

mod parse;
mod zh_numerals;

use serde::{Deserialize, Serialize};

use crate::format::effective_word_count;
use crate::text::split_response;
use crate::RewardError;

pub use parse::parse_length_range;

/// The largest upper bound the recipe's range predictor may give (in words).
pub const RECIPE_MAX_WORDS: u32 = 12_000;

/// The widest range the recipe's range predictor may give (in words).
pub const RECIPE_MAX_WIDTH: u32 = 3_000;

/// Predicted bounds are multiples of this many words.
const RECIPE_STEP: u32 = 100;

/// A target word range `[lo, hi]`, both ends included, with `lo <= hi` and `hi > 0`.
///
/// Any such range is accepted, as a dataset or an explicit question may state it;
/// [`LengthRange::check_recipe_bounds`] additionally checks the bounds that the recipe
/// sets for predicted ranges. Deserializing validates like [`LengthRange::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawLengthRange")]
pub struct LengthRange {
    lo: u32,
    hi: u32,
}

/// A range as it is written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLengthRange {
    lo: u32,
    hi: u32,
}

impl TryFrom<RawLengthRange> for LengthRange {
    type Error = RewardError;

    fn try_from(raw: RawLengthRange) -> Result<Self, RewardError> {
        LengthRange::new(raw.lo, raw.hi)
    }
}

impl LengthRange {
    /// The range `[lo, hi]`; an error when `lo > hi` or `hi == 0`.
    pub fn new(lo: u32, hi: u32) -> Result<Self, RewardError> {
        let problem = if hi == 0 {
            "the upper bound is 0, so no answer can meet it"
        } else if lo > hi {
            "the lower bound is above the upper bound"
        } else {
            return Ok(LengthRange { lo, hi });
        };
        Err(RewardError::InvalidRange { lo, hi, problem })
    }

    /// The lower bound, in words.
    pub fn lo(self) -> u32 {
        self.lo
    }

    /// The upper bound, in words.
    pub fn hi(self) -> u32 {
        self.hi
    }

    /// Checks the recipe's bounds for predicted ranges: both ends multiples of 100, the
    /// upper at most [`RECIPE_MAX_WORDS`], the width at most [`RECIPE_MAX_WIDTH`].
    pub fn check_recipe_bounds(self) -> Result<(), RewardError> {
        let problem = if self.hi > RECIPE_MAX_WORDS {
            "the upper bound is above the recipe's 12000 words"
        } else if self.hi - self.lo > RECIPE_MAX_WIDTH {
            "the range is wider than the recipe's 3000 words"
        } else if self.lo % RECIPE_STEP != 0 || self.hi % RECIPE_STEP != 0 {
            "the bounds are not multiples of 100"
        } else {
            return Ok(());
        };
        Err(RewardError::InvalidRange {
            lo: self.lo,
            hi: self.hi,
            problem,
        })
    }
}

/// The length reward of an answer of `words` words for the target `range`:
///
/// - `1` when `lo <= words <= hi`;
/// - `words / lo` below the range;
/// - `(l_max − words) / (l_max − hi)` above it, clipped to `[0, 1]`, so the reward falls
///   linearly from 1 at `hi` to 0 at `l_max`; `0` above the range when `l_max <= hi`.
pub fn length_reward(words: usize, range: LengthRange, l_max: u32) -> f64 {
    let (lo, hi) = (range.lo as usize, range.hi as usize);
    if words < lo {
        words as f64 / lo as f64
    } else if words <= hi {
        1.0
    } else if l_max <= range.hi {
        0.0
    } else {
        let (l_max, hi) = (f64::from(l_max), f64::from(range.hi));
        ((l_max - words as f64) / (l_max - hi)).clamp(0.0, 1.0)
    }
}

/// The length reward of a whole response: [`length_reward`] of its answer's
/// [`effective_word_count`], so that repeated paragraphs and sentences add nothing;
/// `0` when the response has no complete answer block.
pub fn response_length_reward(response: &str, range: LengthRange, l_max: u32) -> f64 {
    split_response(response).answer.map_or(0.0, |answer| {
        length_reward(effective_word_count(answer), range, l_max)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, MapDeserializer};

    pub(super) fn range(lo: u32, hi: u32) -> Option<LengthRange> {
        Some(LengthRange::new(lo, hi).unwrap())
    }

    #[test]
    fn validates_ranges_and_names_the_problem() {
        let r = LengthRange::new(1800, 2200).unwrap();
        assert_eq!((r.lo(), r.hi()), (1800, 2200));
        assert!(LengthRange::new(0, 100).is_ok());
        assert!(LengthRange::new(20_000, 30_000).is_ok());
        let err = LengthRange::new(2200, 1800).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid length range [2200, 1800]: the lower bound is above the upper bound"
        );
        assert!(LengthRange::new(0, 0)
            .unwrap_err()
            .to_string()
            .contains("upper bound is 0"));
    }

    #[test]
    fn checks_the_recipe_bounds_of_predicted_ranges() {
        assert_eq!(
            LengthRange::new(0, 100).unwrap().check_recipe_bounds(),
            Ok(())
        );
        assert_eq!(
            LengthRange::new(9000, 12_000)
                .unwrap()
                .check_recipe_bounds(),
            Ok(())
        );
        let err = |lo, hi| {
            LengthRange::new(lo, hi)
                .unwrap()
                .check_recipe_bounds()
                .unwrap_err()
        };
        assert!(err(11_000, 12_100)
            .to_string()
            .contains("above the recipe's 12000"));
        assert!(err(1000, 4100).to_string().contains("wider than"));
        assert!(err(1850, 2200).to_string().contains("multiples of 100"));
    }

    #[test]
    fn deserializing_validates() {
        let de = |pairs: Vec<(&'static str, u32)>| {
            LengthRange::deserialize(MapDeserializer::<_, DeError>::new(pairs.into_iter()))
        };
        assert_eq!(de(vec![("lo", 1800), ("hi", 2200)]).ok(), range(1800, 2200));
        let err = de(vec![("lo", 2200), ("hi", 1800)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lower bound is above the upper bound"),
            "{err}"
        );
        assert!(de(vec![("lo", 1), ("hi", 2), ("mid", 3)]).is_err());
    }

    #[test]
    fn the_length_reward_at_the_boundaries() {
        let r = LengthRange::new(1800, 2200).unwrap();
        assert_eq!(length_reward(1800, r, 3000), 1.0);
        assert_eq!(length_reward(2000, r, 3000), 1.0);
        assert_eq!(length_reward(2200, r, 3000), 1.0);
        assert_eq!(length_reward(1799, r, 3000), 1799.0 / 1800.0);
        assert_eq!(length_reward(900, r, 3000), 0.5);
        assert_eq!(length_reward(0, r, 3000), 0.0);
        assert_eq!(length_reward(2201, r, 3000), 799.0 / 800.0);
        assert_eq!(length_reward(2600, r, 3000), 0.5);
        assert_eq!(length_reward(3000, r, 3000), 0.0);
        assert_eq!(length_reward(9000, r, 3000), 0.0);
        assert_eq!(length_reward(2201, r, 2200), 0.0);
        assert_eq!(length_reward(2201, r, 100), 0.0);
        let from_zero = LengthRange::new(0, 100).unwrap();
        assert_eq!(length_reward(0, from_zero, 200), 1.0);
        assert_eq!(length_reward(150, from_zero, 200), 0.5);
    }

    #[test]
    fn the_response_length_reward_counts_the_answer_only() {
        let r = LengthRange::new(4, 6).unwrap();
        let response = "<think>a long plan with many many words in it</think><answer>one two three four five</answer>";
        assert_eq!(response_length_reward(response, r, 10), 1.0);
        let short = "<think>x</think><answer>one two</answer>";
        assert_eq!(response_length_reward(short, r, 10), 0.5);
        let truncated = "<think>x</think><answer>one two three four five";
        assert_eq!(response_length_reward(truncated, r, 10), 0.0);
    }
}
