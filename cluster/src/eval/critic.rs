//! Critic-style scoring: the judge rates one answer from 1 to 10 against a criteria
//! template (WritingBench-style), its reply read as `Score: N`.

use quill_reward_worker::judge::verdict::rating_from_text;
use serde::{Deserialize, Serialize};

/// The slots of a critic template, in fill order.
pub const SLOTS: &[&str] = &["{question}", "{answer}"];
/// The lowest score.
pub const MIN_SCORE: f64 = 1.0;
/// The highest score.
pub const MAX_SCORE: f64 = 10.0;

/// A critic's result for one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriticResult {
    /// The score from 1 to 10; `None` when the reply had none.
    pub score: Option<f64>,
    /// Why the reply could not be read, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unparsable: Option<String>,
}

/// The score in a critic's reply: the number after its last `Score`, from 1 to 10.
pub fn parse_score(reply: &str) -> Result<f64, String> {
    rating_from_text(reply, MIN_SCORE, MAX_SCORE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_read_from_the_last_score_line() {
        assert_eq!(parse_score("Clear and vivid.\nScore: 8"), Ok(8.0));
        assert_eq!(parse_score("Score: 3 at first; **Score**: 7.5"), Ok(7.5));
        assert!(parse_score("Score: 0").is_err());
        assert!(parse_score("great essay").is_err());
    }
}
