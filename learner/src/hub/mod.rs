//! Rank 0 as the job's hub: the `Learner` gRPC service. It owns membership, the prompt
//! data and its leases, checks every scored group before it may be trained on, feeds the
//! bounded ingest queue (a full queue makes `SubmitScored` wait: backpressure), and serves
//! the newest weights in chunks, and tells each actor where to fetch them: its parents in
//! the relay tree (`quill_relay::tree`), the learner last.
//!
//! One module per concern: [`members`] (registration, heartbeats, eviction), [`leases`]
//! (the ledger and handing prompts out), [`ingest`] (checks and the queue), [`weights`]
//! (the published versions), [`status`] (the status document) and [`service`] (the thin
//! tonic handlers). Each consistent piece of state has its own lock, and the locks do not
//! poison (`parking_lot`): a panic in one handler cannot make later calls fail. No lock
//! is held across tokenizer work or an `.await`.
//!
//! No tensor lives here: the trainer thread publishes weights as byte blobs.

pub mod admission;
pub mod ingest;
#[cfg(test)]
mod ingest_props;
pub mod leases;
pub mod members;
pub mod service;
pub mod status;
pub mod waste;
pub mod weights;

pub use ingest::{Accepted, Refusal, Rejections};
pub use service::LearnerService;

use crate::data::Dataset;
use crate::parallel::ranks::RankTable;
use admission::{Admission, Bound};
use leases::{Leases, Ledger};
use members::Members;
use quill_config::job::JobConfig;
use quill_model::Tokenizer;
use quill_proto::blob::WeightBlob;
use status::Reports;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use weights::Weights;

/// What registration hands every member.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// The job config as JSON.
    pub job_json: String,
    /// The model's `config.json`.
    pub model_config_json: String,
    /// The tokenizer's `tokenizer.json`.
    pub tokenizer_json: String,
    /// Vocabulary size (token ids must be below it).
    pub vocab_size: i64,
    /// Context length (prompt + response must fit).
    pub context: usize,
}

/// The hub's shared state (one per learner rank 0).
pub struct Hub {
    job: JobConfig,
    info: JobInfo,
    tokenizer: Tokenizer,
    members: Members,
    leases: Leases,
    weights: Weights,
    ingest: mpsc::Sender<Accepted>,
    /// Refusals and drops by reason.
    pub rejections: Rejections,
    /// Duplicated deliveries (accepted as no-ops).
    pub duplicates: AtomicU64,
    /// Scored groups accepted.
    pub accepted: AtomicU64,
    /// Generated and discarded work.
    pub waste: waste::Waste,
    finished: AtomicBool,
    reports: Reports,
    /// The learner ranks (data parallelism).
    pub ranks: RankTable,
    started: Instant,
    room: tokio::sync::Notify,
}

impl Hub {
    /// A hub serving `dataset` with `weights` as the current version.
    pub fn new(
        job: JobConfig,
        info: JobInfo,
        tokenizer: Tokenizer,
        dataset: Dataset,
        ledger: Ledger,
        weights: Arc<WeightBlob>,
        ingest: mpsc::Sender<Accepted>,
    ) -> Self {
        let weights = Weights::new(weights, job.cluster.weight_chunk_bytes);
        let bound = Bound {
            batch: job.grpo.prompts_per_step,
            max_staleness: job.grpo.max_staleness,
        };
        let patience = Duration::from_secs_f64(job.cluster.heartbeat_seconds * 2.0);
        let admission = Admission::new(bound, patience);
        Hub {
            job,
            info,
            tokenizer,
            members: Members::default(),
            leases: Leases::new(dataset, ledger, admission),
            weights,
            ingest,
            rejections: Rejections::default(),
            duplicates: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            waste: waste::Waste::default(),
            finished: AtomicBool::new(false),
            reports: Reports::default(),
            ranks: RankTable::new(1),
            started: Instant::now(),
            room: tokio::sync::Notify::new(),
        }
    }

    /// The same hub serving a data-parallel learner of `world` ranks.
    pub fn with_ranks(mut self, world: usize) -> Self {
        self.ranks = RankTable::new(world);
        self
    }

    /// The current weights version.
    pub fn version(&self) -> u64 {
        self.weights.version()
    }

    /// Makes `blob` the weights every member should run (readers see the old version or
    /// the new one, never a mix).
    pub fn publish(&self, blob: Arc<WeightBlob>) {
        self.weights.publish(blob);
        self.room.notify_waiters();
    }

    /// Takes `groups` ingested groups out of the pipeline once the trainer trained or
    /// dropped them, making room for new leases.
    pub fn retire(&self, groups: usize) {
        self.leases.retire(groups);
        self.room.notify_waiters();
    }

    /// Notes that the batcher took the groups of leases `claimed` off the queue, and
    /// counts the groups still to come whose last chance under `max_staleness` is the
    /// batch trained at version `at`: the slots that batch keeps for them.
    pub fn claim_and_count_due(&self, claimed: &[u64], at: u64) -> usize {
        self.leases
            .claim_and_count_due(claimed, at, self.job.grpo.max_staleness)
    }

    /// Tells every member to finish: no more leases, heartbeats answer `shutdown`.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        self.room.notify_waiters();
    }

    /// Whether the job is over.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Whether every prompt has been served, no lease is out and every ingested group
    /// has been taken off the queue.
    pub fn data_done(&self) -> bool {
        self.leases.data_done()
    }

    /// The dataset cursor, the prompts not yet trained (leased, waiting for re-issue, or
    /// ingested and untrained) and the last lease id: what a checkpoint keeps.
    pub fn data_state(&self) -> (crate::data::Cursor, Vec<u64>, u64) {
        self.leases.data_state()
    }

    /// Seconds since the hub started.
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Scored groups waiting for the trainer.
    pub fn queue_depth(&self) -> usize {
        self.ingest.max_capacity() - self.ingest.capacity()
    }

    /// Sets members silent for longer than `timeout` aside and puts their leases back in
    /// line; returns their ids. A member set aside that calls again is taken back.
    pub fn evict_silent(&self, timeout: Duration) -> Vec<String> {
        let gone = self.members.evict_silent(timeout);
        self.leases.release_members(&gone);
        if !gone.is_empty() {
            self.room.notify_waiters();
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use crate::testing;
    use quill_proto::{HeartbeatRequest, LeaseRequest, Role};
    use std::sync::Arc;

    #[test]
    fn a_panic_while_a_lock_is_held_leaves_every_later_call_working() {
        let (hub, _queue) = testing::hub(testing::hub_job());
        let hub = Arc::new(hub);
        let id = testing::register(&hub, Role::Actor);
        let holders: [fn(&super::Hub); 4] = [
            |hub| hub.members.hold_and_panic(),
            |hub| hub.leases.hold_and_panic(),
            |hub| hub.weights.hold_and_panic(),
            |hub| hub.reports.hold_and_panic(),
        ];
        for hold in holders {
            let held = Arc::clone(&hub);
            let died = std::thread::spawn(move || hold(&held)).join();
            assert!(died.is_err(), "the holder panicked");
        }
        let leased = hub
            .lease(LeaseRequest {
                member_id: id.clone(),
                max_groups: 2,
                version: 0,
            })
            .unwrap();
        assert_eq!(leased.leases.len(), 2);
        let beat = hub
            .heartbeat(HeartbeatRequest {
                member_id: id,
                ..HeartbeatRequest::default()
            })
            .unwrap();
        assert_eq!(beat.latest_version, 0);
        let doc = hub.status_document();
        assert_eq!(doc.members.len(), 1);
        assert_eq!(doc.leases_active, 2);
    }
}
