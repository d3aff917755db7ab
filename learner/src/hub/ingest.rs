//! Ingest: a scored group is checked against its lease and the protocol's limits (a
//! [`Refusal`] names the [`Rejection`] and why), counted by reason when refused, and
//! otherwise waits for room in the bounded queue to the trainer (backpressure) before its
//! lease is marked done.

use super::Hub;
use crate::hub::leases::LeaseError;
use quill_proto::status::{Rejection, RejectionCounts};
use quill_proto::{ScoredGroup, SubmitReply};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::Status;

/// The generated tokens of a group's samples.
pub fn group_tokens(group: &ScoredGroup) -> u64 {
    group
        .rollout
        .as_ref()
        .map_or(0, |r| r.samples.iter().map(|s| s.tokens.len() as u64).sum())
}

/// A scored group that passed every check, on its way to the trainer.
#[derive(Debug)]
pub struct Accepted {
    /// The group.
    pub group: ScoredGroup,
    /// When it was accepted.
    pub at: Instant,
}

/// The lowest behaviour log-prob a sampled token may carry. A sampled token that
/// unlikely (p < 2e-22) does not occur in practice, and `exp(logp − μ)` of the importance
/// ratio stays finite in f32 only while `μ` is above about −88.
pub const MIN_LOGPROB: f32 = -50.0;

/// Why a scored group was refused: the counted reason and a message for the sender.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The reason, as counted.
    pub reason: Rejection,
    /// What exactly was wrong.
    pub message: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: Rejection, message: String) -> Self {
        Refusal { reason, message }
    }
}

/// Counters of everything refused or dropped, by reason (lock-free).
#[derive(Debug, Default)]
pub struct Rejections {
    counts: [AtomicU64; Rejection::ALL.len()],
}

impl Rejections {
    /// Counts one event of `reason`.
    pub fn count(&self, reason: Rejection) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason counted so far, with its count.
    pub fn snapshot(&self) -> RejectionCounts {
        Rejection::ALL
            .into_iter()
            .map(|r| (r, self.counts[r.index()].load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

impl Hub {
    /// Answers a `SubmitScored` call: a redelivered group is a no-op, a refused one an
    /// `INVALID_ARGUMENT` error (counted), an accepted one waits for room in the queue.
    pub async fn submit(&self, group: ScoredGroup) -> Result<SubmitReply, Status> {
        let duplicate = SubmitReply {
            accepted: false,
            duplicate: true,
        };
        let tokens = group_tokens(&group);
        match self.check_group(&group) {
            Ok(()) => {}
            Err(refusal) if refusal.reason == Rejection::Duplicate => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(duplicate);
            }
            Err(refusal) => {
                self.waste.refused(tokens);
                self.rejections.count(refusal.reason);
                self.settle_refused_lease(&group, refusal.reason);
                tracing::warn!("rejected a scored group: {refusal}");
                return Err(if refusal.reason == Rejection::WrongLeaseKey {
                    Status::permission_denied(refusal.message)
                } else {
                    Status::invalid_argument(refusal.message)
                });
            }
        }
        let permit = self
            .ingest
            .reserve()
            .await
            .map_err(|_| Status::unavailable("the learner is shutting down"))?;
        let lease_id = group
            .rollout
            .as_ref()
            .map(|r| r.lease_id)
            .unwrap_or_default();
        match self.leases.complete(lease_id) {
            Ok(_) => {
                self.waste.generated(tokens);
                permit.send(Accepted {
                    group,
                    at: Instant::now(),
                });
                self.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(SubmitReply {
                    accepted: true,
                    duplicate: false,
                })
            }
            Err(LeaseError::Duplicate(_)) => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                Ok(duplicate)
            }
            Err(e) => {
                self.waste.refused(tokens);
                self.rejections.count(Rejection::UnknownLease);
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }

    /// What a refusal does to the group's lease: a group too stale can never be
    /// accepted, so its prompt goes back in line at once; after any other refusal the
    /// lease stays open for a corrected submission for `rpc_timeout_seconds` at most
    /// (then its prompt is re-issued), and the batcher no longer keeps a slot for it.
    fn settle_refused_lease(&self, group: &ScoredGroup, reason: Rejection) {
        let Some(rollout) = &group.rollout else {
            return;
        };
        if reason == Rejection::WrongLeaseKey {
            return;
        }
        if reason == Rejection::TooStale {
            if self.leases.abandon(rollout.lease_id) {
                self.room.notify_waiters();
            }
        } else {
            let grace = Duration::from_secs_f64(self.job.cluster.rpc_timeout_seconds);
            self.leases.unreserve(rollout.lease_id, grace);
        }
    }

    /// Counts the group of lease `lease_id` that the trainer dropped for `reason` (its
    /// `tokens` thrown away) and takes it out of the pipeline. A group dropped as too
    /// stale puts its prompt back in line; one with nothing to teach is used up.
    pub fn drop_at_training(&self, reason: Rejection, tokens: u64, lease_id: u64) {
        self.rejections.count(reason);
        self.waste.discarded(tokens);
        if reason == Rejection::TooStaleAtTrain {
            self.leases.requeue_untrained(lease_id);
        } else {
            self.leases.consumed(&[lease_id]);
        }
        self.retire(1);
    }

    /// Notes that the groups of these leases were trained: a checkpoint from now on no
    /// longer keeps their prompts to train again.
    pub fn trained(&self, lease_ids: &[u64]) {
        self.leases.consumed(lease_ids);
    }

    /// Checks a scored group against its lease and the protocol's limits.
    pub(super) fn check_group(&self, group: &ScoredGroup) -> Result<(), Refusal> {
        let malformed = |message: String| Refusal::new(Rejection::Malformed, message);
        let rollout = group
            .rollout
            .as_ref()
            .ok_or_else(|| malformed("no rollout in the group".to_owned()))?;
        let lease_id = rollout.lease_id;
        self.leases.check(rollout)?;
        let n = rollout.samples.len();
        let group_size = self.job.sampling.group_size;
        if n != group_size {
            return Err(malformed(format!(
                "lease {lease_id}: {n} samples, the group size is {group_size}"
            )));
        }
        if group.scores.len() != n || group.advantages.len() != n {
            return Err(malformed(format!(
                "lease {lease_id}: {} scores and {} advantages for {n} samples",
                group.scores.len(),
                group.advantages.len()
            )));
        }
        let current = self.version();
        let max_staleness = self.job.grpo.max_staleness;
        let vocab = self.info.vocab_size;
        for (i, sample) in rollout.samples.iter().enumerate() {
            let at = format!("lease {lease_id} sample {i}");
            if sample.tokens.is_empty() {
                return Err(malformed(format!("{at}: no tokens")));
            }
            if sample.tokens.len() != sample.logprobs.len() {
                return Err(malformed(format!(
                    "{at}: {} log-probs for {} tokens",
                    sample.logprobs.len(),
                    sample.tokens.len()
                )));
            }
            if rollout.prompt_tokens.len() + sample.tokens.len() > self.info.context {
                return Err(malformed(format!("{at}: longer than the model's context")));
            }
            if let Some(t) = sample.tokens.iter().find(|&&t| t < 0 || t >= vocab) {
                return Err(Refusal::new(
                    Rejection::TokenOutOfVocab,
                    format!("{at}: token id {t} is outside the vocabulary (size {vocab})"),
                ));
            }
            if let Some(lp) = sample
                .logprobs
                .iter()
                .find(|lp| !lp.is_finite() || **lp > 1e-3 || **lp < MIN_LOGPROB)
            {
                return Err(Refusal::new(
                    Rejection::BadLogprob,
                    format!("{at}: log-prob {lp} is not a finite value in [{MIN_LOGPROB}, 0]"),
                ));
            }
            if sample.version_first > sample.version_last || sample.version_last > current {
                return Err(Refusal::new(
                    Rejection::FutureVersion,
                    format!(
                        "{at}: versions {}..{} but the newest is {current}",
                        sample.version_first, sample.version_last
                    ),
                ));
            }
            if current - sample.version_first > max_staleness {
                return Err(Refusal::new(
                    Rejection::TooStale,
                    format!(
                        "{at}: sampled under version {}, {} behind (max_staleness {max_staleness})",
                        sample.version_first,
                        current - sample.version_first
                    ),
                ));
            }
            let score = &group.scores[i];
            if ![score.length, score.format, score.quality, score.total]
                .iter()
                .all(|v| v.is_finite())
            {
                return Err(Refusal::new(
                    Rejection::NanReward,
                    format!("{at}: non-finite reward"),
                ));
            }
            if !group.advantages[i].is_finite() {
                return Err(Refusal::new(
                    Rejection::NanReward,
                    format!("{at}: non-finite advantage"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use quill_proto::{LeaseRequest, PromptLease, Role};

    /// `max_groups` leases for a newly registered actor on version 0.
    fn lease_new_actor(hub: &Hub, max_groups: u32) -> Vec<PromptLease> {
        let actor = testing::register(hub, Role::Actor);
        hub.lease(LeaseRequest {
            member_id: actor,
            max_groups,
            version: 0,
        })
        .unwrap()
        .leases
    }

    /// A hub with two prompts leased to an actor (`max_staleness` 1, group size 2).
    fn leased() -> (Hub, tokio::sync::mpsc::Receiver<Accepted>, Vec<PromptLease>) {
        let (hub, queue) = testing::hub(testing::hub_job());
        let leases = lease_new_actor(&hub, 2);
        (hub, queue, leases)
    }

    #[test]
    fn every_rejection_is_found_and_named() {
        let (hub, _queue, leases) = leased();
        let valid = testing::scored_group(&leases[0], 2);
        hub.check_group(&valid).unwrap();
        let reason = |change: &dyn Fn(&mut ScoredGroup)| {
            let mut group = valid.clone();
            change(&mut group);
            hub.check_group(&group).unwrap_err().reason
        };
        fn sample(g: &mut ScoredGroup) -> &mut quill_proto::Sample {
            &mut g.rollout.as_mut().unwrap().samples[1]
        }
        use Rejection::*;
        assert_eq!(reason(&|g| g.rollout = None), Malformed);
        assert_eq!(
            reason(&|g| g.rollout.as_mut().unwrap().lease_id = 999),
            UnknownLease
        );
        assert_eq!(
            reason(&|g| g.rollout.as_mut().unwrap().prompt_id += 1),
            Malformed
        );
        assert_eq!(
            reason(&|g| g.rollout.as_mut().unwrap().prompt_tokens.push(1)),
            Malformed
        );
        assert_eq!(
            reason(&|g| g.rollout.as_mut().unwrap().samples.truncate(1)),
            Malformed
        );
        assert_eq!(reason(&|g| g.advantages.truncate(1)), Malformed);
        assert_eq!(reason(&|g| sample(g).tokens.clear()), Malformed);
        assert_eq!(reason(&|g| sample(g).logprobs.push(-1.0)), Malformed);
        assert_eq!(
            reason(&|g| sample(g).tokens[0] = hub.info.vocab_size),
            TokenOutOfVocab
        );
        assert_eq!(reason(&|g| sample(g).tokens[0] = -1), TokenOutOfVocab);
        assert_eq!(reason(&|g| sample(g).logprobs[0] = 0.5), BadLogprob);
        assert_eq!(reason(&|g| sample(g).logprobs[0] = f32::NAN), BadLogprob);
        assert_eq!(reason(&|g| sample(g).logprobs[0] = -1e4), BadLogprob);
        assert_eq!(
            reason(&|g| g.rollout.as_mut().unwrap().length_hi += 1),
            Malformed
        );
        assert_eq!(reason(&|g| sample(g).version_last = 1), FutureVersion);
        assert_eq!(reason(&|g| g.scores[1].quality = f64::NAN), NanReward);
        assert_eq!(reason(&|g| g.advantages[0] = f32::INFINITY), NanReward);
        hub.publish(testing::blob(1));
        hub.publish(testing::blob(2));
        assert_eq!(hub.check_group(&valid).unwrap_err().reason, TooStale);
    }

    /// A checkpoint keeps every prompt whose group was ingested but not trained; a
    /// group dropped as too stale at training puts its prompt back in line.
    #[tokio::test]
    async fn prompts_stay_owned_until_their_group_is_trained() {
        let (hub, _queue, leases) = leased();
        for lease in &leases {
            let group = testing::scored_group(lease, 2);
            assert!(hub.submit(group).await.unwrap().accepted);
        }
        let kept = |hub: &Hub| {
            let (_, mut prompts, _) = hub.data_state();
            prompts.sort_unstable();
            prompts
        };
        let mut both = vec![leases[0].prompt_id, leases[1].prompt_id];
        both.sort_unstable();
        assert_eq!(kept(&hub), both, "ingested, not trained");
        hub.trained(&[leases[0].lease_id]);
        assert_eq!(kept(&hub), vec![leases[1].prompt_id]);
        hub.drop_at_training(Rejection::TooStaleAtTrain, 10, leases[1].lease_id);
        assert_eq!(kept(&hub), vec![leases[1].prompt_id], "back in line");
        let again = lease_new_actor(&hub, 1);
        assert_eq!(again[0].prompt_id, leases[1].prompt_id, "re-issued first");
        assert!(again[0].lease_id > leases[1].lease_id);
        let zero = testing::scored_group(&again[0], 2);
        assert!(hub.submit(zero).await.unwrap().accepted);
        hub.drop_at_training(Rejection::ZeroAdvantage, 10, again[0].lease_id);
        assert!(kept(&hub).is_empty(), "nothing to teach: used up");
    }

    #[tokio::test]
    async fn accepted_groups_reach_the_queue_once_and_refusals_are_counted() {
        let (hub, mut queue, leases) = leased();
        let group = testing::scored_group(&leases[0], 2);
        let reply = hub.submit(group.clone()).await.unwrap();
        assert!(reply.accepted && !reply.duplicate);
        assert_eq!(hub.queue_depth(), 1);
        let again = hub.submit(group).await.unwrap();
        assert!(!again.accepted && again.duplicate);
        let mut bad = testing::scored_group(&leases[1], 2);
        bad.advantages[0] = f32::NAN;
        let err = hub.submit(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("non-finite advantage"), "{err:?}");
        assert_eq!(hub.accepted.load(Ordering::Relaxed), 1);
        assert_eq!(hub.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(
            hub.rejections.snapshot(),
            [(Rejection::NanReward, 1)].into()
        );
        let accepted = queue.recv().await.unwrap();
        assert_eq!(accepted.group.rollout.unwrap().lease_id, leases[0].lease_id);
    }
}
