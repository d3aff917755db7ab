//! The batcher thread of rank 0: while a step runs, it takes the next step's groups off
//! the ingest queue, drops those that would be too stale when trained or that have nothing
//! to teach (zero advantage), and turns the rest into training samples, so the trainer
//! finds its next batch ready. It works exactly one batch ahead: the batch it assembles
//! is trained right after the step in progress, at the version that step produces, and
//! that is the version its staleness is checked against.

use crate::hub::ingest::group_tokens;
use crate::hub::{Accepted, Hub};
use crate::train::sample::TrainSample;
use quill_config::job::JobConfig;
use quill_proto::status::Rejection;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as sync_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the batcher looks at an empty queue again.
const POLL: Duration = Duration::from_millis(2);

/// One optimiser step's worth of groups and what they said about the rollouts.
#[derive(Debug, Default)]
pub struct Batch {
    /// The samples to train on.
    pub samples: Vec<TrainSample>,
    /// Groups in the batch.
    pub groups: usize,
    /// `[total, length, format, quality]` of every sample seen (dropped groups included).
    pub rewards: Vec<[f64; 4]>,
    /// Answer words of every sample seen.
    pub words: Vec<f64>,
    /// Whether each sample seen was in its length range.
    pub in_range: Vec<bool>,
    /// Versions each sample seen lags behind the version it is trained at.
    pub staleness: Vec<f64>,
    /// Tokens the samples seen generated.
    pub generated_tokens: usize,
    /// The trained groups' prompt ids.
    pub prompt_ids: Vec<u64>,
    /// Trained groups by actor.
    pub groups_by_actor: BTreeMap<String, u64>,
}

/// The batcher thread and the batches it hands over.
pub struct Batcher {
    batches: Option<sync_mpsc::Receiver<Batch>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Batcher {
    /// Starts assembling batches from `ingest`, the first to be trained at `version`.
    pub fn spawn(
        job: &JobConfig,
        hub: Arc<Hub>,
        mut ingest: mpsc::Receiver<Accepted>,
        version: u64,
    ) -> Self {
        let (tx, rx) = sync_mpsc::sync_channel(0);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let job = job.clone();
        let thread = std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || {
                let mut version = version;
                while let Some(batch) = collect(&job, &hub, &mut ingest, version, &stopped) {
                    if tx.send(batch).is_err() {
                        break;
                    }
                    version += 1;
                }
            })
            .expect("spawning the batcher thread");
        Batcher {
            batches: Some(rx),
            stop,
            thread: Some(thread),
        }
    }

    /// The next batch, once it is ready; `None` when the prompts ran out.
    pub fn next(&self) -> Option<Batch> {
        self.batches.as_ref()?.recv().ok()
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.batches = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Takes groups off `ingest` until a batch of `prompts_per_step` groups, to be trained at
/// `version`, is full; `None` when the data ran out (or the batcher is stopped) first.
fn collect(
    job: &JobConfig,
    hub: &Hub,
    ingest: &mut mpsc::Receiver<Accepted>,
    version: u64,
    stop: &AtomicBool,
) -> Option<Batch> {
    let mut batch = Batch::default();
    while batch.groups < job.grpo.prompts_per_step {
        let accepted = match ingest.try_recv() {
            Ok(accepted) => accepted,
            Err(mpsc::error::TryRecvError::Empty) => {
                if stop.load(Ordering::SeqCst) || (hub.data_done() && batch.groups == 0) {
                    return None;
                }
                std::thread::sleep(POLL);
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
        };
        let group = accepted.group;
        let tokens = group_tokens(&group);
        let rollout = group.rollout.expect("the hub checked it");
        let oldest = rollout
            .samples
            .iter()
            .map(|s| s.version_first)
            .min()
            .unwrap_or(version);
        if version.saturating_sub(oldest) > job.grpo.max_staleness {
            hub.drop_at_training(Rejection::TooStaleAtTrain, tokens);
            continue;
        }
        for (score, sample) in group.scores.iter().zip(&rollout.samples) {
            batch
                .rewards
                .push([score.total, score.length, score.format, score.quality]);
            batch.words.push(f64::from(score.words));
            batch.in_range.push(score.in_range);
            batch
                .staleness
                .push(version.saturating_sub(sample.version_first) as f64);
        }
        batch.generated_tokens += tokens as usize;
        if job.grpo.drop_zero_advantage_groups && group.advantages.iter().all(|a| a.abs() < 1e-8) {
            hub.drop_at_training(Rejection::ZeroAdvantage, tokens);
            continue;
        }
        batch.prompt_ids.push(rollout.prompt_id);
        *batch
            .groups_by_actor
            .entry(rollout.actor_id.clone())
            .or_default() += 1;
        for (sample, advantage) in rollout.samples.into_iter().zip(&group.advantages) {
            batch.samples.push(TrainSample {
                prompt: rollout.prompt_tokens.clone(),
                response: sample.tokens,
                behaviour_logprobs: sample.logprobs,
                advantage: *advantage,
            });
        }
        batch.groups += 1;
    }
    Some(batch)
}
