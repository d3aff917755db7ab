//! Property tests of ingest validation: groups built from arbitrary tokens, log-probs,
//! versions, scores and advantages around a valid leased group. Checking never panics,
//! and a group that passes satisfies every rule ingest promises the trainer.

use super::ingest::MIN_LOGPROB;
use crate::testing;
use proptest::prelude::*;
use quill_proto::{LeaseRequest, Role, Sample, SampleScores, ScoredGroup};

/// A log-prob drawn to hit every edge: mostly ordinary values, sometimes out of range or
/// not finite.
fn logprob() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => MIN_LOGPROB..0.0f32,
        1 => -1e4f32..1.0,
        1 => prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(MIN_LOGPROB),
            Just(0.0),
        ],
    ]
}

/// A token id: mostly small, sometimes negative or far outside any vocabulary.
fn token() -> impl Strategy<Value = i64> {
    prop_oneof![8 => 0i64..64, 1 => -3i64..0, 1 => 64i64..1_000_000]
}

/// A reward or advantage, sometimes not finite.
fn number() -> impl Strategy<Value = f64> {
    prop_oneof![8 => -5.0f64..5.0, 1 => Just(f64::NAN), 1 => Just(f64::INFINITY)]
}

/// One sample: tokens with as many log-probs (sometimes one more), and versions.
fn sample() -> impl Strategy<Value = Sample> {
    (0usize..8)
        .prop_flat_map(|n| {
            (
                prop::collection::vec(token(), n),
                prop::collection::vec(logprob(), n),
                prop::bool::weighted(0.1),
                prop_oneof![8 => Just((0u64, 0u64)), 1 => (0u64..3, 0u64..3)],
            )
        })
        .prop_map(|(tokens, mut logprobs, extra, (first, last))| {
            if extra {
                logprobs.push(-1.0);
            }
            Sample {
                tokens,
                logprobs,
                version_first: first,
                version_last: last,
                finish_reason: "stop".into(),
                ..Sample::default()
            }
        })
}

/// How many samples, scores or advantages: mostly the group size (2).
fn count() -> impl Strategy<Value = usize> {
    prop_oneof![8 => Just(2usize), 1 => 0usize..5]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn accepted_groups_obey_every_ingest_rule(
        samples in count().prop_flat_map(|n| prop::collection::vec(sample(), n)),
        totals in count().prop_flat_map(|n| prop::collection::vec(number(), n)),
        advantages in count().prop_flat_map(|n| prop::collection::vec(number(), n)),
        keep_lease in any::<bool>(),
    ) {
        let (hub, _queue) = testing::hub(testing::hub_job());
        let actor = testing::register(&hub, Role::Actor);
        let lease = hub
            .lease(LeaseRequest { member_id: actor, max_groups: 1, version: 0 })
            .unwrap()
            .leases
            .remove(0);
        let mut group: ScoredGroup = testing::scored_group(&lease, 2);
        let rollout = group.rollout.as_mut().unwrap();
        if !keep_lease {
            rollout.lease_id += 1;
        }
        rollout.samples = samples;
        group.scores = totals
            .iter()
            .map(|&total| SampleScores { total, ..SampleScores::default() })
            .collect();
        group.advantages = advantages.iter().map(|&a| a as f32).collect();

        let verdict = hub.check_group(&group);
        if verdict.is_ok() {
            let rollout = group.rollout.as_ref().unwrap();
            let vocab = hub.info.vocab_size;
            prop_assert!(keep_lease);
            prop_assert_eq!(rollout.samples.len(), 2);
            prop_assert_eq!(group.scores.len(), 2);
            prop_assert_eq!(group.advantages.len(), 2);
            for (i, s) in rollout.samples.iter().enumerate() {
                prop_assert!(!s.tokens.is_empty());
                prop_assert_eq!(s.tokens.len(), s.logprobs.len());
                prop_assert!(s.tokens.iter().all(|&t| (0..vocab).contains(&t)));
                prop_assert!(s
                    .logprobs
                    .iter()
                    .all(|lp| lp.is_finite() && *lp >= MIN_LOGPROB && *lp <= 1e-3));
                prop_assert!(s.version_first <= s.version_last && s.version_last == 0);
                prop_assert!(group.scores[i].total.is_finite());
                prop_assert!(group.advantages[i].is_finite());
            }
        } else {
            let refusal = verdict.unwrap_err();
            prop_assert!(!refusal.message.is_empty());
        }
    }
}
