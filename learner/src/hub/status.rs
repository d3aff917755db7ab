//! What the hub reports: the latest step record and every learner rank's step metrics
//! (each behind its own lock), the cluster totals, and the status document `Learner.Status`
//! serialises, `quill status` renders, and the throughput line and Prometheus page read.

use super::Hub;
use parking_lot::Mutex;
use quill_proto::status::{ClusterTotals, MemberStatus, RefusedCalls, StatusDocument, StepRecord};
use quill_proto::{ActorMetrics, RankMetrics, RewardMetrics};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// The learner's own reports, as the trainer thread and the ranks deliver them.
#[derive(Default)]
pub struct Reports {
    latest_step: Mutex<Option<StepRecord>>,
    ranks: Mutex<BTreeMap<u32, RankMetrics>>,
}

impl Reports {
    /// Holds the latest step's lock and panics, as a failing handler would.
    #[cfg(test)]
    pub(super) fn hold_and_panic(&self) {
        let _held = self.latest_step.lock();
        panic!("a handler panicked while holding the latest step record");
    }
}

impl Hub {
    /// Replaces the latest step record (the status document shows its metrics).
    pub fn set_step_record(&self, record: StepRecord) {
        *self.reports.latest_step.lock() = Some(record);
    }

    /// Stores a learner rank's latest step metrics; the status document lists every
    /// rank's, sorted by rank, under `ranks`.
    pub fn set_rank_metrics(&self, metrics: RankMetrics) {
        self.reports.ranks.lock().insert(metrics.rank, metrics);
    }

    /// Every rank's latest metrics, sorted by rank.
    pub fn rank_metrics(&self) -> Vec<RankMetrics> {
        self.reports.ranks.lock().values().cloned().collect()
    }

    /// The latest heartbeat metrics of every live actor that reported, in member order.
    pub fn actor_metrics(&self) -> Vec<ActorMetrics> {
        self.members.actor_metrics()
    }

    /// The latest heartbeat metrics of every live reward worker that reported.
    pub fn reward_metrics(&self) -> Vec<RewardMetrics> {
        self.members.reward_metrics()
    }

    /// Live members, summed rates across actors, reward workers and ranks, and the queue,
    /// from the same snapshot of members and ranks the document lists.
    fn cluster_totals(&self, members: &[MemberStatus], ranks: &[RankMetrics]) -> ClusterTotals {
        let count = |role| members.iter().filter(|m| m.reported.role() == role).count();
        let actors = members.iter().filter_map(|m| m.reported.actor());
        let rewards = members.iter().filter_map(|m| m.reported.reward());
        ClusterTotals {
            actors: count(quill_proto::Role::Actor),
            reward_workers: count(quill_proto::Role::Reward),
            ranks: ranks.len(),
            generated_tokens_per_s: actors.map(|m| m.tokens_per_s).sum(),
            trained_tokens_per_s: ranks.iter().map(|r| r.tokens_per_s).sum(),
            scored_groups_per_s: rewards.map(|m| m.scored_per_s).sum(),
            queue_depth: self.queue_depth(),
            queue_capacity: self.ingest.max_capacity(),
        }
    }

    /// Calls refused for bad credentials: the job token (counted by this process's
    /// servers), a member's or rank's session secret, a member's role.
    pub fn refused_calls(&self) -> RefusedCalls {
        let (wrong_session, outside_role) = self.members.refused_calls();
        RefusedCalls {
            wrong_token: quill_proto::auth::refused_token_calls(),
            wrong_session: wrong_session + self.ranks.refused_sessions(),
            outside_role,
        }
    }

    /// The status document: the latest step's metrics, the members, ranks and totals,
    /// leases, weights and ingest counters as they are now.
    pub fn status_document(&self) -> StatusDocument {
        let (leases_active, leases_expired, leases_released) = self.leases.counts();
        let members = self.members.statuses();
        let ranks = self.rank_metrics();
        StatusDocument {
            totals: self.cluster_totals(&members, &ranks),
            step: self
                .reports
                .latest_step
                .lock()
                .as_ref()
                .map(|r| r.metrics.clone()),
            version: self.version(),
            learner_ranks: self.ranks.world_size(),
            rejected: self.rejections.snapshot(),
            members,
            ranks,
            uptime_s: self.uptime_seconds(),
            leases_active,
            leases_expired,
            leases_released,
            weights: self.weights.status(self.job.cluster.relay_fanout),
            finished: self.is_finished(),
            accepted_groups: self.accepted.load(Ordering::Relaxed),
            duplicate_groups: self.duplicates.load(Ordering::Relaxed),
            refused_calls: self.refused_calls(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing;
    use quill_proto::status::{Rejection, StepMetrics, StepRecord};
    use quill_proto::{RankMetrics, Role};

    #[test]
    fn the_document_shows_the_latest_step_and_the_current_state() {
        let (hub, _queue) = testing::hub(testing::hub_job());
        let early = hub.status_document();
        assert_eq!(early.step, None);
        assert_eq!((early.version, early.learner_ranks), (0, 1));
        assert_eq!(early.totals.queue_capacity, 64);
        testing::register(&hub, Role::Actor);
        testing::register(&hub, Role::Reward);
        hub.set_rank_metrics(RankMetrics {
            rank: 0,
            tokens_per_s: 30.0,
            ..RankMetrics::default()
        });
        hub.rejections.count(Rejection::ZeroAdvantage);
        hub.publish(testing::blob(1));
        hub.set_step_record(StepRecord {
            version: 1,
            learner_ranks: 1,
            rejected: Default::default(),
            metrics: StepMetrics {
                step: 1,
                ..StepMetrics::default()
            },
        });
        hub.finish();
        let doc = hub.status_document();
        assert_eq!(doc.step.as_ref().map(|s| s.step), Some(1));
        assert_eq!(doc.version, 1);
        assert_eq!(doc.rejected, [(Rejection::ZeroAdvantage, 1)].into());
        assert_eq!(doc.members.len(), 2);
        assert_eq!((doc.totals.actors, doc.totals.reward_workers), (1, 1));
        assert_eq!(doc.totals.trained_tokens_per_s, 30.0);
        assert_eq!(doc.weights.blob_bytes, 64);
        assert!(doc.finished);
    }
}
