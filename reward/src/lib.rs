//! Rewards of the LongWriter-Zero recipe, and the advantages GRPO trains on.
//!
//! A reward worker scores each generated response with three signals and turns a
//! group's scores into advantages:
//!
//! - [`text`]: the think-then-answer structure of a response ([`split_response`]) and
//!   the word count ([`count_words`]: English words plus CJK characters).
//! - [`length`]: the target word range of a question ([`parse_length_range`]) and the
//!   length reward ([`length_reward`], [`response_length_reward`]), computed on the
//!   answer's effective word count so that padding by repetition earns nothing.
//! - [`format`](mod@format): the format reward ([`format_reward`]): −1 for a response that breaks
//!   the template, less than 1 for an answer padded with repeated paragraphs, sentences
//!   or n-grams ([`RepetitionStats`]).
//! - [`advantage`]: group-normalised advantages ([`group_normalise`]) and their
//!   combination across signals ([`combine_advantages`]); by default each signal is
//!   normalised separately and the advantages are averaged, so that no reward
//!   dominates just because its raw values spread wider.
//!
//! The quality signal (a reward model's score) comes from elsewhere; this crate only
//! combines it with the others.

#![warn(missing_docs)]

pub mod advantage;
pub mod format;
pub mod length;
pub mod text;

pub use advantage::{combine_advantages, group_normalise, AdvantageMode};
pub use format::{effective_word_count, format_reward, FormatConfig, RepetitionStats};
pub use length::{
    length_reward, parse_length_range, response_length_reward, LengthRange, RECIPE_MAX_WIDTH,
    RECIPE_MAX_WORDS,
};
pub use text::{count_words, split_response, words, Parsed, Words};

/// Anything a reward computation can reject.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RewardError {
    /// A target word range that cannot be used.
    #[error("invalid length range [{lo}, {hi}]: {problem}")]
    InvalidRange {
        /// The lower bound given.
        lo: u32,
        /// The upper bound given.
        hi: u32,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A format reward setting out of its domain.
    #[error("format config field `{field}` is {value}: {problem}")]
    InvalidFormatConfig {
        /// The field's name.
        field: &'static str,
        /// The value given.
        value: f64,
        /// What the field must be.
        problem: &'static str,
    },
    /// A group with no rewards in it.
    #[error("the reward group is empty")]
    EmptyGroup,
    /// A reward that is NaN or infinite.
    #[error("reward {index} of the group is {value}, not a finite number")]
    NonFiniteReward {
        /// The sample's position in its group.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// The epsilon added to the standard deviation is negative or not finite.
    #[error("advantage epsilon is {value}; it must be finite and at least 0")]
    InvalidEpsilon {
        /// The value given.
        value: f64,
    },
    /// No reward signals were given to combine.
    #[error("no reward signals to combine")]
    NoSignals,
    /// The number of weights differs from the number of reward signals.
    #[error("{weights} weights given for {signals} reward signals")]
    WeightCount {
        /// How many signals were given.
        signals: usize,
        /// How many weights were given.
        weights: usize,
    },
    /// A weight that is negative or not finite.
    #[error("weight {index} is {value}; weights must be finite and at least 0")]
    InvalidWeight {
        /// The weight's position.
        index: usize,
        /// The value given.
        value: f64,
    },
    /// All weights are zero.
    #[error("all weights are 0; at least one must be positive")]
    ZeroWeights,
    /// A signal scores a different number of samples than the first signal.
    #[error("reward signal {signal} has {got} rewards, but signal 0 has {expected}")]
    GroupSizeMismatch {
        /// The signal's position.
        signal: usize,
        /// The size of signal 0's group.
        expected: usize,
        /// The size of this signal's group.
        got: usize,
    },
    /// An error in one reward signal's group.
    #[error("reward signal {signal}: {source}")]
    InSignal {
        /// The signal's position.
        signal: usize,
        /// What is wrong with its group.
        source: Box<RewardError>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces that hostile or broken responses and questions are made of.
    const PIECES: &[&str] = &[
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<|endoftext|>",
        " ",
        "\n",
        "\n\n",
        "word",
        "Word",
        "words",
        "字",
        "春",
        "不超过",
        "至少",
        "以内",
        "2,000",
        "1.5k",
        "800",
        "-",
        "–",
        " to ",
        " and ",
        "no more than ",
        "at least ",
        "+",
        ".",
        "。",
        "!",
        "？",
        "'",
        "’",
        "3.14",
        "９",
        "万",
        "\u{20000}",
        "é",
        "\r\n",
        "k",
        ",",
        "0",
    ];

    #[test]
    fn arbitrary_text_gives_bounded_rewards_and_no_panics() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as usize
        };
        let config = FormatConfig::default();
        let range = LengthRange::new(5, 10).unwrap();
        for _ in 0..3000 {
            let len = next() % 40;
            let text: String = (0..len).map(|_| PIECES[next() % PIECES.len()]).collect();
            let reward = format_reward(&text, &config);
            assert!((-1.0..=1.0).contains(&reward), "{reward} for {text:?}");
            let stats = RepetitionStats::of(&text);
            for share in [
                stats.repeated_paragraph_share,
                stats.repeated_sentence_share,
                stats.repeated_ngram_share,
            ] {
                assert!((0.0..=1.0).contains(&share), "{stats:?} for {text:?}");
            }
            assert!(
                effective_word_count(&text) <= count_words(&text),
                "{text:?}"
            );
            let length = response_length_reward(&text, range, 20);
            assert!((0.0..=1.0).contains(&length), "{length} for {text:?}");
            if let Some(parsed) = parse_length_range(&text) {
                assert!(parsed.lo() <= parsed.hi() && parsed.hi() > 0, "{text:?}");
            }
            let parsed = split_response(&text);
            if parsed.well_formed {
                assert!(
                    parsed.think.is_some() && parsed.answer.is_some(),
                    "{text:?}"
                );
            }
        }
    }
}
