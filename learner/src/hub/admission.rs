//! Staleness-aware admission: how many prompt groups the hub lets into the pipeline.
//!
//! With the policy at version `v`, `B = prompts_per_step` groups per step and a staleness
//! bound `η`, the steps trained at versions `v … v+η` consume `(η+1)·B` groups: the step
//! in progress (its groups count until it is trained) and the `η` after it. A group
//! leased now is trained by one of them, so the groups leased, queued or being trained
//! never exceed `(η+1)·B`; for an actor still running version `v − d` the bound shrinks
//! to `(η+1−d)·B`, since its samples start `d` versions behind. This is the rule of
//! AReaL's rollout controller, counted in groups. Re-issued leases are new leases and
//! count the same way.
//!
//! The room is shared fairly: an actor holds at most its share `⌈(η+1)·B / actors⌉`, and
//! when room is short a free slot goes to the actor that asked and holds the fewest
//! leases (the one waiting longest among equals), so no actor starves.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The pipeline bound of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Groups per optimiser step (`B`).
    pub batch: usize,
    /// Versions a sample may lag behind the policy it trains (`η`).
    pub max_staleness: u64,
}

impl Bound {
    /// The most groups in the pipeline: `(η+1)·B`.
    pub fn capacity(self) -> usize {
        (self.max_staleness as usize + 1) * self.batch
    }

    /// The most groups in the pipeline for a lease to an actor `lag` versions behind:
    /// `(η+1−lag)·B`, 0 when `lag > η`.
    pub fn capacity_at_lag(self, lag: u64) -> usize {
        (self.max_staleness + 1).saturating_sub(lag) as usize * self.batch
    }
}

/// What the ledger says about the pipeline when a member asks for leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipeline {
    /// Groups leased, queued for the trainer or in the step being trained.
    pub outstanding: usize,
    /// Leases the asking member holds.
    pub held: usize,
    /// Live actors sharing the room (at least the asking one).
    pub actors: usize,
}

/// A member left short: since when it waits, and when it last asked.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    since: Instant,
    asked: Instant,
}

/// The admission state: the bound and the members waiting for room.
#[derive(Debug)]
pub struct Admission {
    bound: Bound,
    waiting: HashMap<String, Waiter>,
    patience: Duration,
}

impl Admission {
    /// Admission under `bound`; a member that has not asked again within `patience`
    /// stops holding a slot back.
    pub fn new(bound: Bound, patience: Duration) -> Self {
        Admission {
            bound,
            waiting: HashMap::new(),
            patience,
        }
    }

    /// The bound.
    pub fn bound(&self) -> Bound {
        self.bound
    }

    /// How many of the `want` leases `member`, `lag` versions behind, may take now;
    /// `held` returns how many leases any member holds. A member left short waits for
    /// room and has a slot held back for it before members that hold more.
    pub fn grant(
        &mut self,
        member: &str,
        want: usize,
        lag: u64,
        pipeline: Pipeline,
        held: impl Fn(&str) -> usize,
        now: Instant,
    ) -> usize {
        let patience = self.patience;
        self.waiting
            .retain(|_, w| now.duration_since(w.asked) <= patience);
        let free = self
            .bound
            .capacity_at_lag(lag)
            .saturating_sub(pipeline.outstanding);
        let share = self
            .bound
            .capacity()
            .div_ceil(pipeline.actors.max(1))
            .max(1);
        let room = want.min(share.saturating_sub(pipeline.held));
        let since = self.waiting.get(member).map_or(now, |w| w.since);
        let mut granted = 0;
        while granted < room {
            let mine = pipeline.held + granted;
            let ahead = self
                .waiting
                .iter()
                .filter(|&(other, w)| {
                    let theirs = held(other);
                    other != member && (theirs < mine || (theirs == mine && w.since < since))
                })
                .count();
            if free.saturating_sub(granted) <= ahead {
                break;
            }
            granted += 1;
        }
        if granted < want && pipeline.held + granted < share {
            self.waiting
                .insert(member.to_owned(), Waiter { since, asked: now });
        } else {
            self.waiting.remove(member);
        }
        granted
    }

    /// Forgets a member that left.
    pub fn forget(&mut self, member: &str) {
        self.waiting.remove(member);
    }

    /// Members waiting for room.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const PATIENCE: Duration = Duration::from_secs(5);

    fn admission(batch: usize, max_staleness: u64) -> Admission {
        Admission::new(
            Bound {
                batch,
                max_staleness,
            },
            PATIENCE,
        )
    }

    #[test]
    fn the_bound_is_what_the_next_steps_consume() {
        let bound = Bound {
            batch: 4,
            max_staleness: 1,
        };
        assert_eq!(bound.capacity(), 8);
        assert_eq!(bound.capacity_at_lag(1), 4);
        assert_eq!(bound.capacity_at_lag(2), 0);
        let mut a = admission(4, 1);
        let now = Instant::now();
        let pipeline = |outstanding, held| Pipeline {
            outstanding,
            held,
            actors: 1,
        };
        assert_eq!(a.grant("a", 100, 0, pipeline(0, 0), |_| 0, now), 8);
        assert_eq!(a.grant("a", 3, 0, pipeline(6, 6), |_| 6, now), 2);
        assert_eq!(a.grant("a", 3, 1, pipeline(3, 3), |_| 3, now), 1);
        assert_eq!(a.grant("a", 3, 2, pipeline(0, 0), |_| 0, now), 0);
    }

    #[test]
    fn on_policy_admits_one_step() {
        let mut a = admission(2, 0);
        let one = Pipeline {
            outstanding: 0,
            held: 0,
            actors: 1,
        };
        assert_eq!(a.grant("a", 5, 0, one, |_| 0, Instant::now()), 2);
    }

    #[test]
    fn a_short_actor_gets_the_next_free_slot() {
        // Room for 4 groups, a share of 2 for each of two actors.
        let mut a = admission(2, 1);
        let now = Instant::now();
        let mut held: HashMap<&str, usize> = HashMap::from([("a", 1), ("b", 0)]);
        let asking = |who: &str, outstanding: usize, held: &HashMap<&str, usize>| Pipeline {
            outstanding,
            held: held[who],
            actors: 2,
        };
        // "a" holds one lease and three groups are queued: the pipeline is full.
        assert_eq!(
            a.grant("b", 1, 0, asking("b", 4, &held), |m| held[m], now),
            0
        );
        assert_eq!(a.waiting(), 1);
        // One slot frees; "a" asks first, but "b" holds fewer and waits for it.
        assert_eq!(
            a.grant("a", 1, 0, asking("a", 3, &held), |m| held[m], now),
            0
        );
        assert_eq!(a.waiting(), 2);
        assert_eq!(
            a.grant("b", 1, 0, asking("b", 3, &held), |m| held[m], now),
            1
        );
        held.insert("b", 1);
        assert_eq!(a.waiting(), 1, "\"a\" still waits");
        // At its share an actor takes nothing more and does not wait.
        held.insert("b", 2);
        assert_eq!(
            a.grant("b", 1, 0, asking("b", 2, &held), |m| held[m], now),
            0
        );
        assert_eq!(a.waiting(), 1);
    }

    #[test]
    fn equal_holders_take_turns_by_waiting_time_and_absent_ones_lapse() {
        let mut a = admission(1, 0);
        let t0 = Instant::now();
        let full = Pipeline {
            outstanding: 1,
            held: 0,
            actors: 3,
        };
        let free = Pipeline {
            outstanding: 0,
            ..full
        };
        let none = |_: &str| 0;
        assert_eq!(a.grant("a", 1, 0, full, none, t0), 0);
        assert_eq!(a.grant("b", 1, 0, full, none, t0 + PATIENCE / 4), 0);
        assert_eq!(a.grant("b", 1, 0, free, none, t0 + PATIENCE / 2), 0);
        assert_eq!(a.grant("a", 1, 0, free, none, t0 + PATIENCE / 2), 1);
        assert_eq!(a.grant("c", 1, 0, full, none, t0 + PATIENCE), 0);
        // "c" never asks again: once its patience has run out it holds nothing back.
        assert_eq!(a.grant("b", 1, 0, free, none, t0 + PATIENCE * 3), 1);
    }

    /// A simulated pipeline: actors ask at random, groups finish at random and steps
    /// consume `B` queued groups; no grant ever exceeds the bound, and every actor that
    /// keeps asking is served.
    #[test]
    fn no_mix_of_actors_lags_and_bounds_exceeds_the_bound_or_starves_anyone() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let batch = rng.random_range(1..=6usize);
            let eta = rng.random_range(0..=3u64);
            let actors = rng.random_range(1..=9usize);
            let mut a = admission(batch, eta);
            let bound = a.bound();
            let names: Vec<String> = (0..actors).map(|i| format!("actor-{i}")).collect();
            let mut held = vec![0usize; actors];
            let mut served = vec![0usize; actors];
            let mut queued = 0usize;
            let mut now = Instant::now();
            for _ in 0..4000 {
                now += Duration::from_millis(10);
                let i = rng.random_range(0..actors);
                match rng.random_range(0..3) {
                    0 => {
                        let lag = if rng.random_bool(0.8) {
                            0
                        } else {
                            rng.random_range(0..=eta + 1)
                        };
                        let outstanding = held.iter().sum::<usize>() + queued;
                        let pipeline = Pipeline {
                            outstanding,
                            held: held[i],
                            actors,
                        };
                        let by_name = |m: &str| held[names.iter().position(|n| n == m).unwrap()];
                        let want = rng.random_range(1..=4);
                        let got = a.grant(&names[i], want, lag, pipeline, by_name, now);
                        assert!(got <= want, "case {case}");
                        assert!(
                            outstanding + got <= bound.capacity_at_lag(lag).max(outstanding),
                            "case {case}: {outstanding} + {got} over the bound at lag {lag}"
                        );
                        held[i] += got;
                        served[i] += got;
                    }
                    1 if held[i] > 0 => {
                        held[i] -= 1;
                        queued += 1;
                    }
                    _ if queued >= batch => queued -= batch,
                    _ => {}
                }
                assert!(
                    held.iter().sum::<usize>() + queued <= bound.capacity(),
                    "case {case}"
                );
            }
            for (i, n) in served.iter().enumerate() {
                assert!(
                    *n > 0,
                    "case {case}: actor {i} of {actors} starved (B {batch}, η {eta})"
                );
            }
        }
    }
}
