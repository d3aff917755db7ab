//! Bradley–Terry ratings on the Elo scale from pairwise outcomes, fit by the MM
//! algorithm (Hunter 2004), with one player anchored, and bootstrap confidence intervals
//! over prompts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

/// The anchor's rating.
pub const ANCHOR_RATING: f64 = 1000.0;
/// Most MM iterations of one fit.
const MAX_ITERATIONS: usize = 100_000;
/// A fit has converged when no log-strength moves more than this in an iteration.
const TOLERANCE: f64 = 1e-12;

/// One comparison: player `a`'s score against player `b` (1 win, ½ tie, 0 loss).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Game {
    /// One player.
    pub a: usize,
    /// The other.
    pub b: usize,
    /// `a`'s score.
    pub score_a: f64,
}

/// The ratings of one fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// Each player's rating; `None` for one not connected to the anchor by games.
    pub ratings: Vec<Option<f64>>,
    /// Whether the maximum-likelihood fit does not exist (a player won or lost every
    /// game of a part of the field), so every player got one virtual tie with the anchor.
    pub regularised: bool,
}

/// Fits Bradley–Terry strengths to `games` among `players` players and returns
/// `ANCHOR_RATING + 400·log10(strength / anchor's strength)` per player: a player who
/// scores 3 of 4 against the anchor is 400·log10(3) ≈ 190.8 above it.
pub fn fit(players: usize, anchor: usize, games: &[Game]) -> Fit {
    let mut wins = vec![0.0; players];
    let mut count = vec![vec![0.0; players]; players];
    let mut beat = vec![vec![false; players]; players];
    for g in games {
        wins[g.a] += g.score_a;
        wins[g.b] += 1.0 - g.score_a;
        count[g.a][g.b] += 1.0;
        count[g.b][g.a] += 1.0;
        beat[g.a][g.b] |= g.score_a > 0.0;
        beat[g.b][g.a] |= g.score_a < 1.0;
    }
    let linked = reachable(players, anchor, |i, j| count[i][j] > 0.0);
    let forward = reachable(players, anchor, |i, j| beat[i][j]);
    let backward = reachable(players, anchor, |i, j| beat[j][i]);
    let regularised = (0..players).any(|i| linked[i] && !(forward[i] && backward[i]));
    if regularised {
        for i in (0..players).filter(|&i| linked[i] && i != anchor) {
            wins[i] += 0.5;
            wins[anchor] += 0.5;
            count[i][anchor] += 1.0;
            count[anchor][i] += 1.0;
        }
    }
    let mut strength = vec![1.0; players];
    for _ in 0..MAX_ITERATIONS {
        let mut next = strength.clone();
        for i in (0..players).filter(|&i| linked[i]) {
            let denominator: f64 = (0..players)
                .filter(|&j| j != i && count[i][j] > 0.0)
                .map(|j| count[i][j] / (strength[i] + strength[j]))
                .sum();
            next[i] = wins[i] / denominator;
        }
        let scale = next[anchor];
        let mut moved: f64 = 0.0;
        for i in (0..players).filter(|&i| linked[i]) {
            next[i] /= scale;
            moved = moved.max((next[i].ln() - strength[i].ln()).abs());
        }
        strength = next;
        if moved < TOLERANCE {
            break;
        }
    }
    let ratings = (0..players)
        .map(|i| linked[i].then(|| ANCHOR_RATING + 400.0 * strength[i].log10()))
        .collect();
    Fit {
        ratings,
        regularised,
    }
}

/// Which of `players` players `from` reaches along `edge(i, j)`.
fn reachable(players: usize, from: usize, edge: impl Fn(usize, usize) -> bool) -> Vec<bool> {
    let mut seen = vec![false; players];
    seen[from] = true;
    let mut queue = VecDeque::from([from]);
    while let Some(i) = queue.pop_front() {
        let next: Vec<usize> = (0..players).filter(|&j| !seen[j] && edge(i, j)).collect();
        for j in next {
            seen[j] = true;
            queue.push_back(j);
        }
    }
    seen
}

/// 95% percentile intervals of each player's rating over `rounds` refits on prompts drawn
/// with replacement (`groups`: the games of each prompt), seeded; `None` for a player
/// with no rating in any round (or when `rounds` is 0).
pub fn bootstrap(
    players: usize,
    anchor: usize,
    groups: &[Vec<Game>],
    rounds: usize,
    seed: u64,
) -> Vec<Option<(f64, f64)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); players];
    if groups.is_empty() {
        return vec![None; players];
    }
    for _ in 0..rounds {
        let sample: Vec<Game> = (0..groups.len())
            .flat_map(|_| groups[rng.random_range(0..groups.len())].iter().copied())
            .collect();
        for (player, rating) in fit(players, anchor, &sample)
            .ratings
            .into_iter()
            .enumerate()
        {
            if let Some(r) = rating {
                draws[player].push(r);
            }
        }
    }
    draws
        .into_iter()
        .map(|mut d| {
            if d.is_empty() {
                return None;
            }
            d.sort_by(f64::total_cmp);
            Some((percentile(&d, 0.025), percentile(&d, 0.975)))
        })
        .collect()
}

/// The `q` quantile of sorted values, linearly interpolated.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn games(a: usize, b: usize, wins: usize, ties: usize, losses: usize) -> Vec<Game> {
        let mut out = Vec::new();
        for (n, score_a) in [(wins, 1.0), (ties, 0.5), (losses, 0.0)] {
            out.extend((0..n).map(|_| Game { a, b, score_a }));
        }
        out
    }

    fn rating(fit: &Fit, player: usize) -> f64 {
        fit.ratings[player].expect("rated")
    }

    #[test]
    fn equal_records_give_equal_ratings() {
        let fit2 = fit(2, 0, &games(1, 0, 5, 2, 5));
        assert!((rating(&fit2, 1) - ANCHOR_RATING).abs() < 1e-6);
        assert!(!fit2.regularised);
        // A three-player cycle: everyone beats one and loses to the other.
        let mut cycle = games(0, 1, 3, 0, 1);
        cycle.extend(games(1, 2, 3, 0, 1));
        cycle.extend(games(2, 0, 3, 0, 1));
        let fit3 = fit(3, 0, &cycle);
        for p in 0..3 {
            assert!((rating(&fit3, p) - ANCHOR_RATING).abs() < 1e-6, "{fit3:?}");
        }
    }

    #[test]
    fn three_to_one_is_400_log10_3_above_the_anchor() {
        let expected = ANCHOR_RATING + 400.0 * 3f64.log10();
        assert!((expected - 1190.85).abs() < 0.01);
        let fit = fit(2, 0, &games(1, 0, 3, 0, 1));
        assert!((rating(&fit, 1) - expected).abs() < 1e-6, "{fit:?}");
        // Ties count half: 2 wins and 2 ties of 4 is also a 3:1 score.
        let with_ties = super::fit(2, 0, &games(1, 0, 2, 2, 0));
        assert!((rating(&with_ties, 1) - expected).abs() < 1e-6);
        // Two models against the anchor only: each is placed by its own record.
        let mut both = games(1, 0, 3, 0, 1);
        both.extend(games(2, 0, 1, 0, 3));
        let fit = super::fit(3, 0, &both);
        assert!((rating(&fit, 1) - expected).abs() < 1e-6);
        assert!((rating(&fit, 2) - (2.0 * ANCHOR_RATING - expected)).abs() < 1e-6);
    }

    #[test]
    fn a_clean_sweep_is_regularised_and_an_unconnected_player_is_unrated() {
        let fit = fit(3, 0, &games(1, 0, 4, 0, 0));
        assert!(fit.regularised);
        // 4 wins plus a virtual tie: 4.5 of 5, a 9:1 score.
        let expected = ANCHOR_RATING + 400.0 * 9f64.log10();
        assert!((rating(&fit, 1) - expected).abs() < 1e-6, "{fit:?}");
        assert_eq!(fit.ratings[2], None);
    }

    #[test]
    fn bootstrap_intervals_are_seeded_and_hold_the_estimate() {
        let groups: Vec<Vec<Game>> = [1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
            .iter()
            .map(|&s| {
                vec![
                    Game {
                        a: 1,
                        b: 0,
                        score_a: s,
                    },
                    Game {
                        a: 2,
                        b: 0,
                        score_a: 1.0 - s,
                    },
                ]
            })
            .collect();
        let all: Vec<Game> = groups.iter().flatten().copied().collect();
        let point = fit(3, 0, &all);
        let ci = bootstrap(3, 0, &groups, 500, 7);
        assert_eq!(ci, bootstrap(3, 0, &groups, 500, 7));
        assert_ne!(ci, bootstrap(3, 0, &groups, 500, 8));
        for (p, interval) in ci.iter().enumerate().skip(1) {
            let (lo, hi) = interval.unwrap();
            let r = rating(&point, p);
            assert!(lo < r && r < hi, "player {p}: {r} not in [{lo}, {hi}]");
        }
        let (lo, hi) = ci[0].unwrap();
        assert_eq!((lo, hi), (ANCHOR_RATING, ANCHOR_RATING));
        assert_eq!(bootstrap(3, 0, &groups, 0, 7), vec![None; 3]);
    }
}
