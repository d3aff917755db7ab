//! The reward worker: scores each rollout group with the length, format and (optionally)
//! quality rewards, turns them into group-normalised advantages, and forwards the scored
//! group to the learner, answering the actor only once the learner has decided. A bounded
//! number of groups is scored at a time, so a learner that is full slows actors down.
//! Scoring runs on tokio's blocking threads, never on the async runtime's workers.

use crate::quality::Quality;
use quill_config::job::JobConfig;
use quill_proto::reward_server::Reward;
use quill_proto::rpc::LearnerConn;
use quill_proto::{RewardMetrics, RolloutGroup, SampleScores, ScoreReply, ScoredGroup};
use quill_reward::{
    combine_advantages, effective_word_count, format_reward, response_length_reward,
    split_response, LengthRange,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};

/// Shared state of one reward worker.
pub struct RewardWorker {
    /// The job.
    pub job: JobConfig,
    /// This worker's member id.
    pub member: String,
    /// The learner.
    pub learner: LearnerConn,
    /// The quality reward (a reward model or a judge), when the job has one.
    pub quality: Option<Quality>,
    /// Groups being scored or forwarded.
    pub in_flight: AtomicU64,
    /// Groups waiting for a scoring slot (the worker's queue).
    pub waiting: AtomicU64,
    /// Groups scored and answered by the learner so far.
    pub scored: AtomicU64,
    /// Exponential moving average of the time from receipt to the learner's answer.
    pub latency_ms: Mutex<f64>,
    /// Groups scored per second, as the last heartbeat measured it.
    pub scored_per_s: Mutex<f64>,
    /// Bounds the groups in progress.
    pub limit: Semaphore,
}

impl RewardWorker {
    /// The worker's gauges now (`scored_per_s` as the last heartbeat measured it).
    pub fn metrics(&self) -> RewardMetrics {
        RewardMetrics {
            scored_per_s: *self.scored_per_s.lock().expect("poisoned"),
            queue_depth: self.waiting.load(Ordering::Relaxed) as u32,
            latency_ms: *self.latency_ms.lock().expect("poisoned"),
            in_flight: self.in_flight.load(Ordering::Relaxed) as u32,
        }
    }
}

/// Scores of one group and its advantages.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Per sample.
    pub scores: Vec<SampleScores>,
    /// Per sample.
    pub advantages: Vec<f32>,
}

/// Scores a group by the job's reward settings; `quality` holds the reward model's score
/// of each sample when the job uses one.
pub fn score_group(
    job: &JobConfig,
    rollout: &RolloutGroup,
    quality: Option<&[f64]>,
) -> Result<Scored, String> {
    if rollout.samples.is_empty() {
        return Err(format!(
            "lease {}: the group has no samples",
            rollout.lease_id
        ));
    }
    let range = LengthRange::new(rollout.length_lo, rollout.length_hi)
        .map_err(|e| format!("lease {}: {e}", rollout.lease_id))?;
    let rewards = &job.rewards;
    let prefix = &job.template.response_prefix;
    let mut lengths = Vec::new();
    let mut formats = Vec::new();
    let mut scores = Vec::new();
    for (i, sample) in rollout.samples.iter().enumerate() {
        let response = format!("{prefix}{}", sample.text);
        let length = response_length_reward(&response, range, rewards.l_max);
        let format = format_reward(&response, &rewards.format);
        let answer = split_response(&response).answer;
        let words = answer.map_or(0, effective_word_count);
        let quality_score = quality.map(|q| q[i]);
        lengths.push(length);
        formats.push(format);
        scores.push(SampleScores {
            length,
            format,
            quality: quality_score.unwrap_or(0.0),
            has_quality: quality_score.is_some(),
            total: 0.0,
            words: words as u32,
            in_range: answer.is_some() && (range.lo()..=range.hi()).contains(&(words as u32)),
        });
    }
    let mut signals = Vec::new();
    let mut weights = Vec::new();
    for (weight, values) in [
        (rewards.length_weight, lengths),
        (rewards.format_weight, formats),
    ] {
        if weight > 0.0 {
            signals.push(values);
            weights.push(weight);
        }
    }
    if let Some(q) = quality {
        if rewards.quality_weight > 0.0 {
            signals.push(q.to_vec());
            weights.push(rewards.quality_weight);
        }
    }
    let total_weight: f64 = weights.iter().sum();
    for (i, score) in scores.iter_mut().enumerate() {
        score.total = signals
            .iter()
            .zip(&weights)
            .map(|(s, w)| s[i] * w)
            .sum::<f64>()
            / total_weight;
    }
    let advantages = combine_advantages(&signals, &weights, rewards.combine, 1e-6)
        .map_err(|e| format!("lease {}: {e}", rollout.lease_id))?;
    Ok(Scored {
        scores,
        advantages: advantages.into_iter().map(|a| a as f32).collect(),
    })
}

/// The `Reward` service over a shared worker.
#[derive(Clone)]
pub struct RewardService(pub Arc<RewardWorker>);

#[tonic::async_trait]
impl Reward for RewardService {
    async fn score(&self, request: Request<RolloutGroup>) -> Result<Response<ScoreReply>, Status> {
        let worker = &self.0;
        worker.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = worker.limit.acquire().await;
        worker.waiting.fetch_sub(1, Ordering::Relaxed);
        let _permit = permit.map_err(|_| Status::unavailable("shutting down"))?;
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = score_and_forward(Arc::clone(worker), request.into_inner()).await;
        worker.in_flight.fetch_sub(1, Ordering::Relaxed);
        if result.is_ok() {
            worker.scored.fetch_add(1, Ordering::Relaxed);
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let mut latency = worker.latency_ms.lock().expect("poisoned");
        *latency = if *latency == 0.0 {
            ms
        } else {
            0.8 * *latency + 0.2 * ms
        };
        result
    }
}

/// The quality reward's input for each sample: the question and the answer block.
fn quality_items(job: &JobConfig, rollout: &RolloutGroup) -> Vec<(String, String)> {
    rollout
        .samples
        .iter()
        .map(|s| {
            let response = format!("{}{}", job.template.response_prefix, s.text);
            let answer = split_response(&response).answer.unwrap_or_default();
            (rollout.question.clone(), answer.to_owned())
        })
        .collect()
}

/// Scores a group on a blocking thread (the reward model first, when the job has one).
async fn score_blocking(
    worker: Arc<RewardWorker>,
    rollout: RolloutGroup,
) -> Result<(RolloutGroup, Scored), Status> {
    tokio::task::spawn_blocking(move || {
        let quality = match &worker.quality {
            Some(scorer) => Some(
                scorer
                    .score(&quality_items(&worker.job, &rollout))
                    .map_err(Status::internal)?,
            ),
            None => None,
        };
        let scored = score_group(&worker.job, &rollout, quality.as_deref())
            .map_err(Status::invalid_argument)?;
        Ok((rollout, scored))
    })
    .await
    .map_err(|e| Status::internal(format!("scoring: {e}")))?
}

async fn score_and_forward(
    worker: Arc<RewardWorker>,
    rollout: RolloutGroup,
) -> Result<Response<ScoreReply>, Status> {
    let started = Instant::now();
    let (rollout, scored) = score_blocking(Arc::clone(&worker), rollout).await?;
    let group = ScoredGroup {
        rollout: Some(rollout),
        scores: scored.scores,
        advantages: scored.advantages,
        reward_seconds: started.elapsed().as_secs_f64(),
        reward_worker: worker.member.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(worker.job.cluster.rpc_timeout_seconds);
    loop {
        match worker.learner.clone().submit_scored(group.clone()).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                return Ok(Response::new(ScoreReply {
                    accepted: reply.accepted,
                    duplicate: reply.duplicate,
                }));
            }
            Err(status) if status.code() == Code::InvalidArgument || Instant::now() > deadline => {
                return Err(status)
            }
            Err(status) => {
                tracing::warn!("learner refused for now: {}; retrying", status.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quill_proto::Sample;

    fn rollout(texts: &[&str], lo: u32, hi: u32) -> RolloutGroup {
        RolloutGroup {
            lease_id: 1,
            length_lo: lo,
            length_hi: hi,
            samples: texts
                .iter()
                .map(|t| Sample {
                    text: (*t).to_owned(),
                    tokens: vec![1],
                    logprobs: vec![-1.0],
                    ..Sample::default()
                })
                .collect(),
            ..RolloutGroup::default()
        }
    }

    fn words(n: usize) -> String {
        (0..n)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn scores_follow_the_recipe() {
        let mut job = JobConfig::default();
        job.template.response_prefix = "<think> plan </think><answer>".into();
        let inside = format!("{} </answer>", words(40));
        let short = format!("{} </answer>", words(10));
        let broken = words(40);
        let scored =
            score_group(&job, &rollout(&[&inside, &short, &broken], 30, 50), None).unwrap();
        let s = &scored.scores;
        assert_eq!(
            (s[0].length, s[0].format, s[0].words, s[0].in_range),
            (1.0, 1.0, 40, true)
        );
        assert!((s[1].length - 10.0 / 30.0).abs() < 1e-9 && !s[1].in_range);
        assert_eq!(
            (s[2].length, s[2].format, s[2].in_range),
            (0.0, -1.0, false)
        );
        assert!(
            scored.advantages[0] > scored.advantages[1]
                && scored.advantages[1] > scored.advantages[2]
        );
        let total: f32 = scored.advantages.iter().sum();
        assert!(total.abs() < 1e-5, "advantages are centred: {total}");
    }

    #[test]
    fn bad_groups_are_refused() {
        let job = JobConfig::default();
        assert!(score_group(&job, &rollout(&[], 10, 20), None)
            .unwrap_err()
            .contains("no samples"));
        assert!(score_group(&job, &rollout(&["x"], 30, 10), None)
            .unwrap_err()
            .contains("lease 1"));
    }
}
