//! The learner's reports as typed serde values: the status document (`Learner.Status`,
//! carried as JSON in `StatusReply.json`) and the step record (one line of the learner's
//! `metrics.jsonl` per optimiser step). The learner serialises them, and `quill status`,
//! the throughput line and the Prometheus page read their fields, so a renamed field is a
//! compile error rather than a silent `-`.
//!
//! JSON shape of the status document: the latest step's [`StepMetrics`] sit at its top
//! level (absent before the first step) next to the hub's own fields; `members` are
//! [`MemberStatus`] objects whose `role` is the proto name (`ROLE_ACTOR`, `ROLE_REWARD`)
//! and whose `metrics` hold the last heartbeat's fields (`null` before the first); `ranks`
//! are [`RankMetrics`] sorted by rank; `rejected` counts refusals by [`Rejection`] name.

use crate::metrics::{Gauge, MemberMetrics};
use crate::{ActorMetrics, RankMetrics, RewardMetrics, Role};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// Why a scored group was refused at ingest or dropped at training time. Its name
/// ([`Rejection::as_str`]) keys the `rejected` counts and labels the Prometheus `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// The group does not match its lease or the protocol's shape.
    Malformed,
    /// The lease's group was already ingested (a redelivery: a no-op, not an error).
    Duplicate,
    /// The lease is unknown or expired.
    UnknownLease,
    /// A token id outside the vocabulary.
    TokenOutOfVocab,
    /// A log-probability that is not a finite value <= 0.
    BadLogprob,
    /// A version newer than the learner's.
    FutureVersion,
    /// Sampled more than `max_staleness` versions ago (at ingest).
    TooStale,
    /// A non-finite reward or advantage.
    NanReward,
    /// Grew more than `max_staleness` versions stale while waiting for the trainer.
    TooStaleAtTrain,
    /// Every advantage is zero: no learning signal (dropped when the job asks).
    ZeroAdvantage,
    /// The group does not carry its lease's key: it does not come from the lease's
    /// holder (the lease is left as it was).
    WrongLeaseKey,
}

impl Rejection {
    /// Every reason, in counting order.
    pub const ALL: [Rejection; 11] = [
        Rejection::Malformed,
        Rejection::Duplicate,
        Rejection::UnknownLease,
        Rejection::TokenOutOfVocab,
        Rejection::BadLogprob,
        Rejection::FutureVersion,
        Rejection::TooStale,
        Rejection::NanReward,
        Rejection::TooStaleAtTrain,
        Rejection::ZeroAdvantage,
        Rejection::WrongLeaseKey,
    ];

    /// The reason's snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Duplicate => "duplicate",
            Rejection::UnknownLease => "unknown_lease",
            Rejection::TokenOutOfVocab => "token_out_of_vocab",
            Rejection::BadLogprob => "bad_logprob",
            Rejection::FutureVersion => "future_version",
            Rejection::TooStale => "too_stale",
            Rejection::NanReward => "nan_reward",
            Rejection::TooStaleAtTrain => "too_stale_at_train",
            Rejection::ZeroAdvantage => "zero_advantage",
            Rejection::WrongLeaseKey => "wrong_lease_key",
        }
    }

    /// The reason's position in [`Rejection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl Serialize for Rejection {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Rejection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Rejection::ALL
            .into_iter()
            .find(|r| r.as_str() == name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown rejection reason `{name}`")))
    }
}

/// Refusals and drops so far, by reason (reasons never counted are absent).
pub type RejectionCounts = BTreeMap<Rejection, u64>;

/// A member's role and what its latest heartbeat reported (`None` before its first).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", content = "metrics")]
pub enum RoleMetrics {
    /// An actor.
    #[serde(rename = "ROLE_ACTOR")]
    Actor(Option<ActorMetrics>),
    /// A reward worker.
    #[serde(rename = "ROLE_REWARD")]
    Reward(Option<RewardMetrics>),
}

impl RoleMetrics {
    /// A member of `role` that has not reported yet (`None` for an unspecified role).
    pub fn new(role: Role) -> Option<Self> {
        match role {
            Role::Actor => Some(RoleMetrics::Actor(None)),
            Role::Reward => Some(RoleMetrics::Reward(None)),
            Role::Unspecified => None,
        }
    }

    /// The member's role.
    pub fn role(&self) -> Role {
        match self {
            RoleMetrics::Actor(_) => Role::Actor,
            RoleMetrics::Reward(_) => Role::Reward,
        }
    }

    /// Keeps `metrics` when they are finite and of the member's own role; says whether.
    pub fn report(&mut self, metrics: MemberMetrics) -> bool {
        if !metrics.is_finite() {
            return false;
        }
        match (self, metrics) {
            (RoleMetrics::Actor(own), MemberMetrics::Actor(m)) => *own = Some(m),
            (RoleMetrics::Reward(own), MemberMetrics::Reward(m)) => *own = Some(m),
            _ => return false,
        }
        true
    }

    /// The actor's latest metrics, if this is an actor that reported.
    pub fn actor(&self) -> Option<&ActorMetrics> {
        match self {
            RoleMetrics::Actor(m) => m.as_ref(),
            RoleMetrics::Reward(_) => None,
        }
    }

    /// The reward worker's latest metrics, if this is a reward worker that reported.
    pub fn reward(&self) -> Option<&RewardMetrics> {
        match self {
            RoleMetrics::Reward(m) => m.as_ref(),
            RoleMetrics::Actor(_) => None,
        }
    }

    /// Every reported field as a gauge (none before the first report).
    pub fn gauges(&self) -> Vec<Gauge> {
        match self {
            RoleMetrics::Actor(m) => m.iter().flat_map(ActorMetrics::gauges).collect(),
            RoleMetrics::Reward(m) => m.iter().flat_map(RewardMetrics::gauges).collect(),
        }
    }
}

/// One live member as the status document lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Member id (`actor-1`, `reward-2` …).
    pub id: String,
    /// The name it registered with.
    pub name: String,
    /// The address it serves on (reward workers).
    pub address: String,
    /// The address of its weight relay (actors).
    pub relay_address: String,
    /// The weights version it is receiving (0: none).
    pub receiving_version: u64,
    /// Where its last weights came from (`learner` or a member id).
    pub weight_source: String,
    /// The weights version it last reported.
    pub version: u64,
    /// Seconds since its last call.
    pub seconds_since_heartbeat: f64,
    /// Its role (`role`) and latest heartbeat metrics (`metrics`).
    #[serde(flatten)]
    pub reported: RoleMetrics,
}

/// Cluster-wide totals: live members, summed rates and the ingest queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterTotals {
    /// Live actors.
    pub actors: usize,
    /// Live reward workers.
    pub reward_workers: usize,
    /// Learner ranks that reported a step.
    pub ranks: usize,
    /// Generated tokens/s summed over actors.
    pub generated_tokens_per_s: f64,
    /// Trained tokens/s summed over learner ranks.
    pub trained_tokens_per_s: f64,
    /// Scored groups per second summed over reward workers.
    pub scored_groups_per_s: f64,
    /// Accepted groups waiting for the trainer.
    pub queue_depth: usize,
    /// The ingest queue's bound.
    pub queue_capacity: usize,
}

/// Calls the learner refused for bad credentials, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedCalls {
    /// Without the job token, or with a wrong one (`UNAUTHENTICATED`).
    pub wrong_token: u64,
    /// Under a member id (or a learner rank) without that member's session secret
    /// (`UNAUTHENTICATED`).
    pub wrong_session: u64,
    /// By a member outside its role, e.g. a reward worker asking for leases
    /// (`PERMISSION_DENIED`).
    pub outside_role: u64,
}

/// What the learner serves of its weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WeightsStatus {
    /// Size of the current version's blob.
    pub blob_bytes: u64,
    /// The job's `cluster.relay_fanout`.
    pub relay_fanout: usize,
    /// Bytes the learner itself sent, by version.
    pub served_bytes_by_version: BTreeMap<u64, u64>,
}

/// What one optimiser step measured. Trainer statistics that can be non-finite (a
/// skipped step) are written as `null` and read back as NaN.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser steps done.
    pub step: u64,
    /// Optimiser steps the job runs.
    pub steps_total: u64,
    /// Seconds since training started.
    pub elapsed_s: f64,
    /// Whether the update was skipped (non-finite loss or gradient).
    pub skipped: bool,
    /// GRPO loss.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Gradient norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Learning rate.
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Share of clipped tokens.
    #[serde(deserialize_with = "nan_if_null")]
    pub clip_fraction: f64,
    /// Mean importance ratio.
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_ratio: f64,
    /// Mean KL to the reference.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl: f64,
    /// Prompt groups trained.
    pub groups: usize,
    /// The trained groups' prompt ids.
    pub prompt_ids: Vec<u64>,
    /// Trained groups by the actor that generated them.
    pub groups_by_actor: BTreeMap<String, u64>,
    /// Samples whose scores the step saw (dropped groups included).
    pub samples_scored: usize,
    /// Mean total reward.
    pub reward_mean: f64,
    /// Mean length reward.
    pub reward_length: f64,
    /// Mean format reward.
    pub reward_format: f64,
    /// Mean quality reward (only with a quality model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_quality: Option<f64>,
    /// Mean answer length in words.
    pub response_words_mean: f64,
    /// Share of answers inside their length range.
    pub in_range_share: f64,
    /// Mean policy lag of the samples, in versions.
    pub staleness_mean: f64,
    /// Tokens trained (all ranks).
    pub trained_tokens: usize,
    /// Seconds of the step.
    pub step_seconds: f64,
    /// Share of the step's forward-pass positions that were padding (rank 0's shard).
    pub padding_share: f64,
    /// Seconds of the step's forward and backward passes.
    pub forward_backward_seconds: f64,
    /// Seconds of the step's gradient all-reduce, clipping and optimiser update.
    pub optimizer_seconds: f64,
    /// Seconds the trainer waited for this batch (the next batch is assembled while a
    /// step runs, so this is only the time the actors were behind).
    pub wait_seconds: f64,
    /// Trained tokens per second of step time.
    pub trained_tokens_per_s: f64,
    /// Generated tokens/s summed over the actors' heartbeats.
    pub generated_tokens_per_s: f64,
    /// Actors that reported metrics.
    pub actors: usize,
    /// Groups per second of wait and step time.
    pub rollout_groups_per_s: f64,
    /// Tokens the batch's samples generated.
    pub generated_tokens: usize,
    /// Mean reward-worker latency, ms.
    pub reward_latency_ms: f64,
    /// Accepted groups waiting after the batch was taken.
    pub ingest_queue: usize,
    /// The ingest queue's bound.
    pub ingest_capacity: usize,
    /// Seconds the step's critical path spent handing the new weights over (a copy; the
    /// blob is built and served by the publisher thread).
    pub publish_seconds: f64,
    /// Seconds the step's critical path spent on a checkpoint (a copy; the files are
    /// written by the checkpoint thread); 0 on steps without one.
    pub checkpoint_seconds: f64,
    /// Mean entropy (nats) of the policy's tempered next-token distribution over the
    /// trained tokens.
    pub entropy: f64,
    /// Groups that reached the learner since the previous step (accepted or refused).
    pub generated_groups: u64,
    /// Groups refused or dropped since the previous step, by reason.
    pub refused: RejectionCounts,
    /// Groups that reached the learner so far.
    pub generated_groups_total: u64,
    /// Groups trained so far.
    pub trained_groups_total: u64,
    /// Share of the tokens generated so far that were thrown away (refused at ingest or
    /// dropped at training, for any reason).
    pub discarded_token_share: f64,
    /// Share of the groups generated so far that were refused as too stale (at ingest or
    /// at training): what staleness-aware admission keeps near 0.
    pub stale_share: f64,
    /// The side that held the pipeline back over this step: `actors` when the trainer
    /// waited for data for more than 15 % of the step, else `learner`.
    pub bottleneck: String,
    /// Mean weight-sync seconds over the actors.
    pub weight_sync_seconds: f64,
    /// Mean weight-sync MB/s over the actors.
    pub weight_sync_mb_per_s: f64,
    /// Relative spread of the ranks' weight checksums (on checking steps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_weight_spread: Option<f64>,
    /// Rank 0's share of the step wall time spent waiting for data.
    pub idle_share: f64,
    /// Rank 0's model FLOPs utilisation (when the device's peak is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
}

/// One step's line of `metrics.jsonl` (besides `kind` and `time`): the step's metrics
/// and the job-wide values at that moment, which the status document keeps current.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The weights version after the step.
    pub version: u64,
    /// Learner ranks in the job.
    pub learner_ranks: usize,
    /// Refusals and drops so far.
    pub rejected: RejectionCounts,
    /// What the step measured.
    #[serde(flatten)]
    pub metrics: StepMetrics,
}

/// The learner's state as `Learner.Status` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDocument {
    /// The latest step's metrics (none before the first step).
    #[serde(flatten)]
    pub step: Option<StepMetrics>,
    /// The weights version being served.
    pub version: u64,
    /// Learner ranks in the job.
    pub learner_ranks: usize,
    /// Refusals and drops so far.
    pub rejected: RejectionCounts,
    /// Every live member, in id order.
    pub members: Vec<MemberStatus>,
    /// Every learner rank's latest step metrics, sorted by rank.
    pub ranks: Vec<RankMetrics>,
    /// Cluster-wide totals.
    pub totals: ClusterTotals,
    /// Seconds since the learner started.
    pub uptime_s: f64,
    /// Leases currently out.
    pub leases_active: usize,
    /// Leases that expired so far.
    pub leases_expired: u64,
    /// Leases their holders gave back so far (a failed generation, a stopping actor).
    #[serde(default)]
    pub leases_released: u64,
    /// The weights the learner serves.
    pub weights: WeightsStatus,
    /// Whether the job is over.
    pub finished: bool,
    /// Scored groups accepted.
    pub accepted_groups: u64,
    /// Scored groups delivered again (no-ops).
    pub duplicate_groups: u64,
    /// Calls refused for bad credentials.
    #[serde(default)]
    pub refused_calls: RefusedCalls,
}

/// Reads a number that was written as `null` because it was not finite, as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Names of the step record's fields that tools read from `metrics.jsonl` by name
/// (`quill plot`); a test checks that each is a field of the serialised record.
pub mod field {
    /// Mean total reward of the step's samples.
    pub const REWARD_MEAN: &str = "reward_mean";
    /// Mean length reward.
    pub const REWARD_LENGTH: &str = "reward_length";
    /// Mean format reward.
    pub const REWARD_FORMAT: &str = "reward_format";
    /// Mean quality reward (only with a reward model).
    pub const REWARD_QUALITY: &str = "reward_quality";
    /// Mean answer length in words.
    pub const RESPONSE_WORDS_MEAN: &str = "response_words_mean";
    /// Share of answers inside their length range.
    pub const IN_RANGE_SHARE: &str = "in_range_share";
    /// Generated tokens/s summed over actors.
    pub const GENERATED_TOKENS_PER_S: &str = "generated_tokens_per_s";
    /// Trained tokens/s.
    pub const TRAINED_TOKENS_PER_S: &str = "trained_tokens_per_s";
    /// Mean policy entropy.
    pub const ENTROPY: &str = "entropy";
    /// The trainer's share of wall time spent waiting for data.
    pub const IDLE_SHARE: &str = "idle_share";
    /// Share of generated tokens thrown away so far.
    pub const DISCARDED_TOKEN_SHARE: &str = "discarded_token_share";
    /// Share of generated groups refused as too stale so far.
    pub const STALE_SHARE: &str = "stale_share";
    /// Every name above.
    pub const ALL: &[&str] = &[
        REWARD_MEAN,
        REWARD_LENGTH,
        REWARD_FORMAT,
        REWARD_QUALITY,
        RESPONSE_WORDS_MEAN,
        IN_RANGE_SHARE,
        GENERATED_TOKENS_PER_S,
        TRAINED_TOKENS_PER_S,
        ENTROPY,
        IDLE_SHARE,
        DISCARDED_TOKEN_SHARE,
        STALE_SHARE,
    ];
}

impl StepMetrics {
    /// The step metrics the learner exports as gauges (`quill_step_<name>`).
    pub fn gauges(&self) -> Vec<Gauge> {
        let gauge = |name, help, value| Gauge { name, help, value };
        vec![
            gauge("loss", "GRPO loss of the latest step.", self.loss),
            gauge(
                field::REWARD_MEAN,
                "Mean total reward of the latest step's samples.",
                self.reward_mean,
            ),
            gauge(
                field::IN_RANGE_SHARE,
                "Share of the latest step's answers inside their length range.",
                self.in_range_share,
            ),
            gauge(
                field::RESPONSE_WORDS_MEAN,
                "Mean answer length in words, latest step.",
                self.response_words_mean,
            ),
            gauge(
                "grad_norm",
                "Gradient norm of the latest step.",
                self.grad_norm,
            ),
            gauge("lr", "Learning rate of the latest step.", self.lr),
            gauge(
                "staleness_mean",
                "Mean policy lag (versions) of the latest step's samples.",
                self.staleness_mean,
            ),
            gauge("kl", "Mean KL to the reference, latest step.", self.kl),
            gauge(
                field::ENTROPY,
                "Mean policy entropy (nats) over the latest step's tokens.",
                self.entropy,
            ),
            gauge(
                field::IDLE_SHARE,
                "Share of the latest step's wall time the trainer waited for data.",
                self.idle_share,
            ),
            gauge(
                field::DISCARDED_TOKEN_SHARE,
                "Share of the generated tokens thrown away so far.",
                self.discarded_token_share,
            ),
            gauge(
                field::STALE_SHARE,
                "Share of the generated groups refused as too stale so far.",
                self.stale_share,
            ),
            gauge(
                "clip_fraction",
                "Share of clipped tokens, latest step.",
                self.clip_fraction,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_fields_and_gauges_are_fields_of_the_step_record() {
        let step = StepMetrics {
            reward_quality: Some(0.25),
            ..StepMetrics::default()
        };
        let json = serde_json::to_value(&step).unwrap();
        let fields = json.as_object().unwrap();
        for name in field::ALL {
            assert!(fields.contains_key(*name), "{name}");
        }
        for gauge in step.gauges() {
            assert!(fields.contains_key(gauge.name), "{}", gauge.name);
        }
    }

    fn document() -> StatusDocument {
        StatusDocument {
            step: Some(StepMetrics {
                step: 3,
                steps_total: 10,
                loss: f64::NAN,
                reward_quality: Some(0.5),
                prompt_ids: vec![4, 2],
                groups_by_actor: [("actor-1".to_owned(), 2)].into(),
                ..StepMetrics::default()
            }),
            version: 3,
            learner_ranks: 1,
            rejected: [(Rejection::TooStaleAtTrain, 2), (Rejection::NanReward, 1)].into(),
            members: vec![
                MemberStatus {
                    id: "actor-1".into(),
                    name: "gpu-7".into(),
                    address: String::new(),
                    relay_address: "127.0.0.1:9".into(),
                    receiving_version: 0,
                    weight_source: "learner".into(),
                    version: 3,
                    seconds_since_heartbeat: 0.25,
                    reported: RoleMetrics::Actor(Some(ActorMetrics {
                        tokens_per_s: 12.5,
                        ..ActorMetrics::default()
                    })),
                },
                MemberStatus {
                    id: "reward-2".into(),
                    name: "rw".into(),
                    address: "127.0.0.1:8".into(),
                    relay_address: String::new(),
                    receiving_version: 0,
                    weight_source: String::new(),
                    version: 0,
                    seconds_since_heartbeat: 1.0,
                    reported: RoleMetrics::Reward(None),
                },
            ],
            ranks: vec![RankMetrics {
                rank: 0,
                device: "cpu".into(),
                mfu: None,
                ..RankMetrics::default()
            }],
            weights: WeightsStatus {
                blob_bytes: 64,
                relay_fanout: 2,
                served_bytes_by_version: [(3, 64)].into(),
            },
            ..StatusDocument::default()
        }
    }

    #[test]
    fn the_document_keeps_its_json_shape_and_reads_back() {
        let doc = document();
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["step"], 3);
        assert_eq!(json["version"], 3);
        assert!(json["loss"].is_null(), "NaN is written as null");
        assert!(json.get("mfu").is_none(), "absent options are left out");
        assert_eq!(json["rejected"]["too_stale_at_train"], 2);
        assert_eq!(json["members"][0]["role"], "ROLE_ACTOR");
        assert_eq!(json["members"][0]["metrics"]["tokens_per_s"], 12.5);
        assert_eq!(json["members"][1]["role"], "ROLE_REWARD");
        assert!(json["members"][1]["metrics"].is_null());
        assert!(json["ranks"][0]["mfu"].is_null());
        assert_eq!(json["weights"]["served_bytes_by_version"]["3"], 64);
        let back: StatusDocument = serde_json::from_value(json).unwrap();
        let step = back.step.as_ref().expect("the step fields read back");
        assert!(step.loss.is_nan());
        let mut expected = doc.clone();
        expected.step.as_mut().unwrap().loss = 0.0;
        let mut read = back.clone();
        read.step.as_mut().unwrap().loss = 0.0;
        assert_eq!(read, expected);
    }

    #[test]
    fn an_early_document_has_no_step_fields() {
        let doc = StatusDocument::default();
        let json = serde_json::to_value(&doc).unwrap();
        assert!(json.get("step").is_none() && json.get("loss").is_none());
        let back: StatusDocument = serde_json::from_value(json).unwrap();
        assert_eq!(back.step, None);
    }

    #[test]
    fn a_step_record_is_flat_and_names_every_reason_as_the_labels_do() {
        let record = StepRecord {
            version: 2,
            learner_ranks: 2,
            rejected: Rejection::ALL.iter().map(|&r| (r, 1)).collect(),
            metrics: StepMetrics {
                step: 2,
                rank_weight_spread: Some(0.0),
                ..StepMetrics::default()
            },
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["step"], 2);
        assert_eq!(json["learner_ranks"], 2);
        assert_eq!(json["rank_weight_spread"], 0.0);
        let names: Vec<&str> = json["rejected"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected: Vec<&str> = Rejection::ALL.iter().map(|r| r.as_str()).collect();
        expected.sort_unstable();
        assert_eq!(names, expected);
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        assert_eq!(serde_json::from_value::<StepRecord>(json).unwrap(), record);
        assert!(serde_json::from_str::<Rejection>("\"bogus\"").is_err());
    }

    #[test]
    fn a_member_keeps_only_finite_metrics_of_its_own_role() {
        let mut actor = RoleMetrics::new(Role::Actor).unwrap();
        assert!(RoleMetrics::new(Role::Unspecified).is_none());
        assert!(actor.gauges().is_empty());
        assert!(!actor.report(MemberMetrics::Reward(RewardMetrics::default())));
        let nan = ActorMetrics {
            tokens_per_s: f64::NAN,
            ..ActorMetrics::default()
        };
        assert!(!actor.report(MemberMetrics::Actor(nan)));
        assert!(actor.report(MemberMetrics::Actor(ActorMetrics::default())));
        assert_eq!(actor.role(), Role::Actor);
        assert!(actor.actor().is_some() && actor.reward().is_none());
        assert_eq!(actor.gauges().len(), ActorMetrics::default().gauges().len());
    }
}
