//! The typed metrics that members report with each heartbeat and learner ranks with each
//! step, and their one naming as gauges: every page, table and sum that shows a metric
//! reads these fields, so a renamed field is a compile error, not a silent `-`.

use crate::{heartbeat_request, ActorMetrics, RankMetrics, RewardMetrics};

/// A member's heartbeat metrics, by role.
pub use heartbeat_request::Metrics as MemberMetrics;

/// One metric as a gauge: its name (a Prometheus suffix and the JSON field), what it
/// means, and its value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauge {
    /// The field's name, e.g. `tokens_per_s`.
    pub name: &'static str,
    /// One line on what it measures.
    pub help: &'static str,
    /// Its value.
    pub value: f64,
}

const fn gauge(name: &'static str, help: &'static str, value: f64) -> Gauge {
    Gauge { name, help, value }
}

impl ActorMetrics {
    /// Every field as a gauge.
    pub fn gauges(&self) -> Vec<Gauge> {
        vec![
            gauge(
                "tokens_per_s",
                "Tokens generated per second since the previous heartbeat.",
                self.tokens_per_s,
            ),
            gauge(
                "groups_in_flight",
                "Prompt groups leased and not yet answered.",
                f64::from(self.groups_in_flight),
            ),
            gauge(
                "weight_sync_seconds",
                "Seconds the last weight sync took.",
                self.weight_sync_seconds,
            ),
            gauge(
                "weight_sync_mb_per_s",
                "Megabytes per second of the last weight sync.",
                self.weight_sync_mb_per_s,
            ),
            gauge(
                "relay_bytes_served",
                "Bytes this actor's relay served to other actors.",
                self.relay_bytes_served as f64,
            ),
            gauge(
                "weight_bytes_from_learner",
                "Weight bytes received from the learner.",
                self.weight_bytes_from_learner as f64,
            ),
            gauge(
                "weight_bytes_from_relays",
                "Weight bytes received from other actors' relays.",
                self.weight_bytes_from_relays as f64,
            ),
            gauge(
                "weight_corrupt_chunks",
                "Weight chunks refused for a bad CRC32.",
                self.weight_corrupt_chunks as f64,
            ),
        ]
    }
}

impl RewardMetrics {
    /// Every field as a gauge.
    pub fn gauges(&self) -> Vec<Gauge> {
        vec![
            gauge(
                "scored_per_s",
                "Groups scored per second over the last ten seconds.",
                self.scored_per_s,
            ),
            gauge(
                "queue_depth",
                "Groups waiting for a scoring slot.",
                f64::from(self.queue_depth),
            ),
            gauge(
                "latency_ms",
                "Moving average of receipt-to-verdict time per group, ms.",
                self.latency_ms,
            ),
            gauge(
                "in_flight",
                "Groups being scored or forwarded.",
                f64::from(self.in_flight),
            ),
        ]
    }
}

impl RankMetrics {
    /// Every numeric field as a gauge (`mfu` only when the device's peak is known).
    pub fn gauges(&self) -> Vec<Gauge> {
        let mut gauges = vec![
            gauge(
                "step_seconds",
                "Seconds of the rank's latest optimiser step.",
                self.step_seconds,
            ),
            gauge(
                "tokens_per_s",
                "Tokens/s the rank trained in its latest step.",
                self.tokens_per_s,
            ),
            gauge(
                "idle_share",
                "Share of the rank's step wall time spent waiting for data.",
                self.idle_share,
            ),
        ];
        if let Some(mfu) = self.mfu {
            gauges.push(gauge(
                "mfu",
                "Model FLOPs utilisation of the rank's latest step (6 N D / peak).",
                mfu,
            ));
        }
        gauges
    }
}

impl MemberMetrics {
    /// Every field of the member's metrics as a gauge.
    pub fn gauges(&self) -> Vec<Gauge> {
        match self {
            MemberMetrics::Actor(m) => m.gauges(),
            MemberMetrics::Reward(m) => m.gauges(),
        }
    }

    /// The actor's metrics, if these are an actor's.
    pub fn actor(&self) -> Option<&ActorMetrics> {
        match self {
            MemberMetrics::Actor(m) => Some(m),
            MemberMetrics::Reward(_) => None,
        }
    }

    /// The reward worker's metrics, if these are a reward worker's.
    pub fn reward(&self) -> Option<&RewardMetrics> {
        match self {
            MemberMetrics::Reward(m) => Some(m),
            MemberMetrics::Actor(_) => None,
        }
    }

    /// Whether every number is finite (a member reporting NaN or infinity is ignored).
    pub fn is_finite(&self) -> bool {
        self.gauges().iter().all(|g| g.value.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_name_every_field_once_and_json_uses_the_same_names() {
        let actor = ActorMetrics {
            tokens_per_s: 12.5,
            groups_in_flight: 3,
            ..ActorMetrics::default()
        };
        let gauges = actor.gauges();
        let json = serde_json::to_value(actor).unwrap();
        let fields = json.as_object().unwrap();
        assert_eq!(gauges.len(), fields.len());
        for g in &gauges {
            assert_eq!(fields[g.name].as_f64(), Some(g.value), "{}", g.name);
        }
        let reward = RewardMetrics {
            latency_ms: 4.0,
            ..RewardMetrics::default()
        };
        let json = serde_json::to_value(reward).unwrap();
        assert_eq!(reward.gauges().len(), json.as_object().unwrap().len());
        let back: RewardMetrics = serde_json::from_str(r#"{"latency_ms": 4.0}"#).unwrap();
        assert_eq!(back, reward);
    }

    #[test]
    fn rank_mfu_is_a_gauge_only_when_known_and_non_finite_values_are_caught() {
        let mut rank = RankMetrics {
            step_seconds: 1.0,
            ..RankMetrics::default()
        };
        assert!(!rank.gauges().iter().any(|g| g.name == "mfu"));
        rank.mfu = Some(0.25);
        assert!(rank
            .gauges()
            .iter()
            .any(|g| g.name == "mfu" && g.value == 0.25));
        let member = MemberMetrics::Reward(RewardMetrics {
            latency_ms: f64::NAN,
            ..RewardMetrics::default()
        });
        assert!(!member.is_finite());
        assert!(member.actor().is_none() && member.reward().is_some());
    }
}
