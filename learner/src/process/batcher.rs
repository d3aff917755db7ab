//! The batcher thread of rank 0: while a step runs, it takes the next step's groups off
//! the ingest queue, drops those that would be too stale when trained or that have nothing
//! to teach (zero advantage), and turns the rest into training samples, so the trainer
//! finds its next batch ready. It works exactly one batch ahead: the batch it assembles
//! is trained right after the step in progress, at the version that step produces, and
//! that is the version its staleness is checked against.

use crate::hub::ingest::group_tokens;
use crate::hub::{Accepted, Hub};
use crate::process::stop;
use crate::train::sample::TrainSample;
use quill_config::job::JobConfig;
use quill_proto::status::Rejection;
use quill_proto::ScoredGroup;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as sync_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the batcher looks at an empty queue again.
const POLL: Duration = Duration::from_millis(2);
/// How often a trainer waiting for a batch checks for a stop request.
const STOP_POLL: Duration = Duration::from_millis(100);

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
    /// The trained groups' lease ids.
    pub lease_ids: Vec<u64>,
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
                let mut assembler = Assembler {
                    job: &job,
                    hub: &hub,
                    ingest: &mut ingest,
                    stop: &stopped,
                    waiting: Vec::new(),
                };
                let mut version = version;
                while let Some(batch) = assembler.collect(version) {
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

    /// The next batch, once it is ready; `None` when the prompts ran out or a stop was
    /// requested ([`stop::requested`]), before or while waiting.
    pub fn next(&self) -> Option<Batch> {
        let batches = self.batches.as_ref()?;
        loop {
            if stop::requested() {
                return None;
            }
            match batches.recv_timeout(STOP_POLL) {
                Ok(batch) => return Some(batch),
                Err(sync_mpsc::RecvTimeoutError::Timeout) => {}
                Err(sync_mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
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

/// A group taken off the queue and not yet in a batch.
struct Waiting {
    group: ScoredGroup,
    /// The last version it may be trained at: its oldest sample's plus `max_staleness`.
    deadline: u64,
}

/// The batcher's state between batches: the queue it drains and the groups that wait
/// there for a later batch.
struct Assembler<'a> {
    job: &'a JobConfig,
    hub: &'a Hub,
    ingest: &'a mut mpsc::Receiver<Accepted>,
    stop: &'a AtomicBool,
    waiting: Vec<Waiting>,
}

impl Assembler<'_> {
    /// Fills the batch trained at `version` with `prompts_per_step` groups, earliest
    /// deadline first. Groups still to come whose last chance is this batch keep their
    /// slots: a group that could wait for a later batch does not take one of them, so
    /// a slow group is not overtaken by later, faster ones and then refused as too
    /// stale. A partial batch goes out when the data has run out; `None` when nothing
    /// is left (or the batcher is stopped).
    fn collect(&mut self, version: u64) -> Option<Batch> {
        let mut batch = Batch::default();
        let want = self.job.grpo.prompts_per_step;
        loop {
            let claimed = self.drain()?;
            let due = self.hub.claim_and_count_due(&claimed, version);
            let before = batch.groups;
            self.fill(&mut batch, version, due);
            if batch.groups >= want {
                return Some(batch);
            }
            if batch.groups == before && claimed.is_empty() {
                if self.stop.load(Ordering::SeqCst) {
                    return None;
                }
                if self.hub.data_done() && self.waiting.is_empty() {
                    return (batch.groups > 0).then_some(batch);
                }
                std::thread::sleep(POLL);
            }
        }
    }

    /// Moves every group on the queue to `waiting` and returns their lease ids; `None`
    /// once the queue is closed.
    fn drain(&mut self) -> Option<Vec<u64>> {
        let mut claimed = Vec::new();
        loop {
            match self.ingest.try_recv() {
                Ok(accepted) => {
                    let rollout = accepted.group.rollout.as_ref().expect("the hub checked it");
                    claimed.push(rollout.lease_id);
                    let oldest = rollout.samples.iter().map(|s| s.version_first).min();
                    self.waiting.push(Waiting {
                        deadline: oldest.unwrap_or(0) + self.job.grpo.max_staleness,
                        group: accepted.group,
                    });
                }
                Err(mpsc::error::TryRecvError::Empty) => return Some(claimed),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            }
        }
    }

    /// Adds waiting groups to `batch`, earliest deadline first, leaving `due` slots for
    /// groups still to come that must be trained at `version`; drops those already too
    /// stale, or with nothing to teach.
    fn fill(&mut self, batch: &mut Batch, version: u64, due: usize) {
        let want = self.job.grpo.prompts_per_step;
        self.waiting.sort_by_key(|w| w.deadline);
        let mut kept = Vec::with_capacity(self.waiting.len());
        for waiting in std::mem::take(&mut self.waiting) {
            let full = batch.groups >= want;
            let held_back = waiting.deadline > version && batch.groups + due >= want;
            if full || held_back {
                kept.push(waiting);
                continue;
            }
            let tokens = group_tokens(&waiting.group);
            if waiting.deadline < version {
                let lease_id = waiting.group.rollout.as_ref().map_or(0, |r| r.lease_id);
                self.hub
                    .drop_at_training(Rejection::TooStaleAtTrain, tokens, lease_id);
                continue;
            }
            add(self.job, self.hub, batch, waiting.group, version, tokens);
        }
        self.waiting = kept;
    }
}

/// Records `group`'s rewards in `batch` and trains it unless it has nothing to teach
/// (zero advantage, when such groups are dropped).
fn add(
    job: &JobConfig,
    hub: &Hub,
    batch: &mut Batch,
    group: ScoredGroup,
    version: u64,
    tokens: u64,
) {
    let rollout = group.rollout.expect("the hub checked it");
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
        hub.drop_at_training(Rejection::ZeroAdvantage, tokens, rollout.lease_id);
        return;
    }
    batch.prompt_ids.push(rollout.prompt_id);
    batch.lease_ids.push(rollout.lease_id);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use quill_proto::{LeaseRequest, PromptLease, Role};
    use std::time::Instant;

    /// A group answering `lease` whose samples started at `version`.
    fn group(lease: &PromptLease, version: u64) -> ScoredGroup {
        let mut group = testing::scored_group(lease, 2);
        for sample in &mut group.rollout.as_mut().unwrap().samples {
            sample.version_first = version;
            sample.version_last = version;
        }
        group
    }

    /// Stops the batcher when the test ends, so that a failing test cannot hang.
    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// The hub test job with two prompts a step, an actor holding up to four.
    fn job() -> JobConfig {
        let mut job = testing::hub_job();
        job.grpo.prompts_per_step = 2;
        job.cluster.leases_per_actor = 4;
        job
    }

    fn prompts(batch: &Batch) -> Vec<u64> {
        let mut ids = batch.prompt_ids.clone();
        ids.sort_unstable();
        ids
    }

    /// Two groups leased at version 0 and two at version 1, `max_staleness` 1 and two
    /// prompts a step: the version-0 groups' last chance is the batch trained at 1.
    #[test]
    fn a_slow_group_keeps_its_slot_against_later_faster_ones() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (hub, mut queue) = runtime.block_on(async { testing::hub(job()) });
        let actor = testing::register(&hub, Role::Actor);
        let lease = |version| {
            hub.lease(LeaseRequest {
                member_id: actor.clone(),
                max_groups: 2,
                version,
            })
            .unwrap()
            .leases
        };
        let old = lease(0);
        hub.publish(testing::blob(1));
        let new = lease(1);
        assert_eq!((old.len(), new.len()), (2, 2));
        let submit = |g| runtime.block_on(hub.submit(g)).unwrap().accepted;
        for g in [group(&old[0], 0), group(&new[0], 1), group(&new[1], 1)] {
            assert!(submit(g));
        }
        let job = job();
        let stop = AtomicBool::new(false);
        let hub = &hub;
        let (first, second) = std::thread::scope(|scope| {
            let _stops_the_assembler_on_a_failure = StopOnDrop(&stop);
            let assembling = scope.spawn(|| {
                let mut assembler = Assembler {
                    job: &job,
                    hub,
                    ingest: &mut queue,
                    stop: &stop,
                    waiting: Vec::new(),
                };
                Some((assembler.collect(1)?, assembler.collect(2)?))
            });
            let started = Instant::now();
            let waited = loop {
                if assembling.is_finished() || started.elapsed() > Duration::from_millis(300) {
                    break !assembling.is_finished();
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            assert!(waited, "the batch did not wait for the slow group");
            assert!(submit(group(&old[1], 0)));
            assembling.join().unwrap().expect("two batches")
        });
        assert_eq!(prompts(&first), {
            let mut ids = vec![old[0].prompt_id, old[1].prompt_id];
            ids.sort_unstable();
            ids
        });
        assert_eq!(first.staleness, vec![1.0; 4]);
        assert_eq!(prompts(&second), {
            let mut ids = vec![new[0].prompt_id, new[1].prompt_id];
            ids.sort_unstable();
            ids
        });
        assert!(hub.rejections.snapshot().is_empty());
    }

    /// A refused submission gives up its slot (the lease stays open for a corrected
    /// one); a group refused as too stale puts its prompt back in line at once.
    #[tokio::test]
    async fn a_refused_group_gives_up_its_slot() {
        let (hub, mut queue) = testing::hub(job());
        let actor = testing::register(&hub, Role::Actor);
        let leases = hub
            .lease(LeaseRequest {
                member_id: actor.clone(),
                max_groups: 2,
                version: 0,
            })
            .unwrap()
            .leases;
        assert_eq!(hub.claim_and_count_due(&[], 1), 2);
        let mut bad = group(&leases[1], 0);
        bad.advantages[0] = f32::NAN;
        assert!(hub.submit(bad).await.is_err());
        assert_eq!(hub.claim_and_count_due(&[], 1), 1);
        assert!(hub.submit(group(&leases[0], 0)).await.unwrap().accepted);
        let job = job();
        let stop = AtomicBool::new(false);
        let mut assembler = Assembler {
            job: &job,
            hub: &hub,
            ingest: &mut queue,
            stop: &stop,
            waiting: Vec::new(),
        };
        assembler.drain().unwrap();
        assert_eq!(hub.claim_and_count_due(&[leases[0].lease_id], 1), 0);

        hub.publish(testing::blob(1));
        hub.publish(testing::blob(2));
        assert!(hub.submit(group(&leases[1], 0)).await.is_err());
        let again = hub
            .lease(LeaseRequest {
                member_id: actor,
                max_groups: 1,
                version: 2,
            })
            .unwrap()
            .leases;
        assert_eq!(again[0].prompt_id, leases[1].prompt_id, "re-issued at once");
    }
}
