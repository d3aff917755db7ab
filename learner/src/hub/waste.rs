//! What reached the learner and what of it was thrown away: every group that arrives
//! (accepted or refused) counts as generated with its tokens, and the tokens of a refused
//! group, or of one the trainer drops, as discarded. Lock-free counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Running totals of generated and discarded work.
#[derive(Debug, Default)]
pub struct Waste {
    groups: AtomicU64,
    tokens: AtomicU64,
    discarded_tokens: AtomicU64,
}

/// A snapshot of [`Waste`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WasteTotals {
    /// Groups that reached the learner.
    pub groups: u64,
    /// Their generated tokens.
    pub tokens: u64,
    /// Tokens thrown away.
    pub discarded_tokens: u64,
}

impl WasteTotals {
    /// Share of the generated tokens that were thrown away (0 before any arrived).
    pub fn discarded_share(&self) -> f64 {
        self.discarded_tokens as f64 / self.tokens.max(1) as f64
    }
}

impl Waste {
    /// Counts a group of `tokens` generated tokens reaching the learner.
    pub fn generated(&self, tokens: u64) {
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Counts a group of `tokens` generated tokens that reached the learner and was
    /// refused there.
    pub fn refused(&self, tokens: u64) {
        self.generated(tokens);
        self.discarded(tokens);
    }

    /// Counts `tokens` generated tokens thrown away.
    pub fn discarded(&self, tokens: u64) {
        self.discarded_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// The totals so far.
    pub fn totals(&self) -> WasteTotals {
        WasteTotals {
            groups: self.groups.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            discarded_tokens: self.discarded_tokens.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_of_generated_tokens() {
        let waste = Waste::default();
        assert_eq!(waste.totals().discarded_share(), 0.0);
        waste.generated(30);
        waste.refused(10);
        let totals = waste.totals();
        assert_eq!((totals.groups, totals.tokens), (2, 40));
        assert_eq!(totals.discarded_share(), 0.25);
    }
}
