//! Pairwise judging in both orders: the evaluated answer is shown first, then second, so a
//! judge's preference for a position cancels out; the two verdicts combine into one
//! outcome, and outcomes add up to win/tie/loss counts.

use quill_reward_worker::judge::verdict::Verdict;
use serde::{Deserialize, Serialize};

/// The evaluated model's result in one comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Its answer was preferred.
    Win,
    /// Neither was.
    Tie,
    /// The opponent's answer was preferred.
    Loss,
}

impl Outcome {
    /// Points of the evaluated model: 1, ½ or 0.
    pub fn points(self) -> f64 {
        match self {
            Outcome::Win => 1.0,
            Outcome::Tie => 0.5,
            Outcome::Loss => 0.0,
        }
    }
}

/// A verdict as a record stores it: `"A"`, `"B"` or `"tie"`.
pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::A => "A",
        Verdict::B => "B",
        Verdict::Tie => "tie",
    }
}

/// The outcome of one order's verdict; `model_first` says whether the evaluated answer
/// was shown as A.
pub fn order_outcome(verdict: Verdict, model_first: bool) -> Outcome {
    match (verdict, model_first) {
        (Verdict::Tie, _) => Outcome::Tie,
        (Verdict::A, true) | (Verdict::B, false) => Outcome::Win,
        _ => Outcome::Loss,
    }
}

/// One outcome from both orders' outcomes (`None`: that verdict was unreadable): the mean
/// of their points decides (above ½ a win, below a loss, ½ a tie), so a win in one order
/// and a loss in the other is a tie; with one readable verdict it alone decides; with
/// none there is no outcome.
pub fn combine(first: Option<Outcome>, second: Option<Outcome>) -> Option<Outcome> {
    let points: Vec<f64> = [first, second]
        .into_iter()
        .flatten()
        .map(Outcome::points)
        .collect();
    if points.is_empty() {
        return None;
    }
    let mean = points.iter().sum::<f64>() / points.len() as f64;
    Some(if mean > 0.5 {
        Outcome::Win
    } else if mean < 0.5 {
        Outcome::Loss
    } else {
        Outcome::Tie
    })
}

/// Win/tie/loss counts of a model against one opponent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Comparisons won.
    pub win: usize,
    /// Comparisons tied.
    pub tie: usize,
    /// Comparisons lost.
    pub loss: usize,
    /// Comparisons with no readable verdict in either order (no outcome).
    pub undecided: usize,
    /// Single verdicts the judge's reply gave no readable answer for (0–2 per comparison).
    pub unparsable_verdicts: usize,
}

impl Tally {
    /// Counts one comparison.
    pub fn add(&mut self, outcome: Option<Outcome>, unparsable_verdicts: usize) {
        match outcome {
            Some(Outcome::Win) => self.win += 1,
            Some(Outcome::Tie) => self.tie += 1,
            Some(Outcome::Loss) => self.loss += 1,
            None => self.undecided += 1,
        }
        self.unparsable_verdicts += unparsable_verdicts;
    }

    /// (wins + ½ ties) / decided comparisons; `None` before any decided one.
    pub fn win_rate(&self) -> Option<f64> {
        let decided = self.win + self.tie + self.loss;
        (decided > 0).then(|| (self.win as f64 + 0.5 * self.tie as f64) / decided as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_means_opposite_things_in_the_two_orders() {
        assert_eq!(order_outcome(Verdict::A, true), Outcome::Win);
        assert_eq!(order_outcome(Verdict::A, false), Outcome::Loss);
        assert_eq!(order_outcome(Verdict::B, true), Outcome::Loss);
        assert_eq!(order_outcome(Verdict::B, false), Outcome::Win);
        assert_eq!(order_outcome(Verdict::Tie, false), Outcome::Tie);
    }

    #[test]
    fn both_orders_combine_and_position_bias_cancels() {
        use Outcome::*;
        let both = |a, b| combine(Some(a), Some(b));
        assert_eq!(both(Win, Win), Some(Win));
        assert_eq!(both(Loss, Loss), Some(Loss));
        assert_eq!(both(Win, Loss), Some(Tie));
        assert_eq!(both(Loss, Win), Some(Tie));
        assert_eq!(both(Win, Tie), Some(Win));
        assert_eq!(both(Tie, Loss), Some(Loss));
        assert_eq!(both(Tie, Tie), Some(Tie));
        assert_eq!(combine(None, Some(Loss)), Some(Loss));
        assert_eq!(combine(Some(Tie), None), Some(Tie));
        assert_eq!(combine(None, None), None);
        // A judge that always answers "A" gives the model A first, then the opponent:
        // a win and a loss, so a tie.
        let first = order_outcome(Verdict::A, true);
        let second = order_outcome(Verdict::A, false);
        assert_eq!(combine(Some(first), Some(second)), Some(Tie));
    }

    #[test]
    fn tallies_count_outcomes_and_unreadable_verdicts() {
        let mut tally = Tally::default();
        assert_eq!(tally.win_rate(), None);
        tally.add(Some(Outcome::Win), 0);
        tally.add(Some(Outcome::Win), 1);
        tally.add(Some(Outcome::Tie), 0);
        tally.add(Some(Outcome::Loss), 0);
        tally.add(None, 2);
        assert_eq!(
            tally,
            Tally {
                win: 2,
                tie: 1,
                loss: 1,
                undecided: 1,
                unparsable_verdicts: 3
            }
        );
        assert_eq!(tally.win_rate(), Some(2.5 / 4.0));
    }
}
