//! Rank 0 as the job's hub: the `Learner` gRPC service. It owns membership, the prompt
//! data and its leases, checks every scored group before it may be trained on, feeds the
//! bounded ingest queue (a full queue makes `SubmitScored` wait: backpressure), and serves
//! the newest weights in chunks, and tells each actor where to fetch them: its parents in
//! the relay tree (`quill_relay::tree`), the learner last.
//!
//! No tensor lives here: the trainer thread publishes weights as byte blobs.

pub mod leases;

use crate::data::{Dataset, Prompt, PromptText};
use crate::parallel::ranks::{RankTable, ShardAnswer};
use leases::{LeaseError, Ledger};

use quill_config::job::JobConfig;
use quill_model::Tokenizer;
use quill_proto::blob::WeightBlob;
use quill_proto::learner_server::Learner;
use quill_proto::metrics::MemberMetrics;
use quill_proto::{
    ActorMetrics, HeartbeatReply, HeartbeatRequest, JoinRankReply, JoinRankRequest, LeaseReply,
    LeaseRequest, PromptLease, RankMetrics, RegisterReply, RegisterRequest, RewardMetrics, Role,
    ScoredGroup, ShardReply, ShardRequest, StatusReply, StatusRequest, SubmitReply, WeightsRequest,
};
use quill_relay::{ChunkStream, Transfer};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// Most prompt groups one lease call hands out.
const MAX_LEASE_BATCH: u32 = 64;

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

/// A scored group that passed every check, on its way to the trainer.
#[derive(Debug)]
pub struct Accepted {
    /// The group.
    pub group: ScoredGroup,
    /// When it was accepted.
    pub at: Instant,
}

struct Member {
    role: Role,
    name: String,
    address: String,
    relay_address: String,
    joined: u64,
    receiving: u64,
    weight_source: String,
    last_seen: Instant,
    version: u64,
    metrics: Option<MemberMetrics>,
}

struct State {
    dataset: Dataset,
    ledger: Ledger,
    members: BTreeMap<String, Member>,
    departed: BTreeMap<String, Member>,
    next_member: u64,
    prompt_tokens: HashMap<u64, Vec<i64>>,
    data_exhausted: bool,
}

/// Counters of everything refused or dropped, by reason.
#[derive(Debug, Default)]
pub struct Rejections {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Rejections {
    /// Counts one event of `kind`.
    pub fn count(&self, kind: &'static str) {
        *self
            .counts
            .lock()
            .expect("poisoned")
            .entry(kind)
            .or_default() += 1;
    }

    /// Every count so far.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.counts.lock().expect("poisoned").clone()
    }
}

/// The hub's shared state (one per learner rank 0).
pub struct Hub {
    job: JobConfig,
    info: JobInfo,
    tokenizer: Tokenizer,
    state: Mutex<State>,
    ingest: mpsc::Sender<Accepted>,
    weights: RwLock<Arc<WeightBlob>>,
    /// The current blob as checksummed chunks, served by `GetWeights`.
    root: RwLock<Arc<Transfer>>,
    /// The version before it, still served to transfers that asked for it (so an actor
    /// whose transfer outlasts a training step can finish it instead of starting over).
    previous: RwLock<Option<Arc<Transfer>>>,
    /// Bytes `GetWeights` sent, by version.
    served: Mutex<BTreeMap<u64, Arc<AtomicU64>>>,
    /// Refusals and drops by reason.
    pub rejections: Rejections,
    /// Duplicated deliveries (accepted as no-ops).
    pub duplicates: AtomicU64,
    /// Scored groups accepted.
    pub accepted: AtomicU64,
    finished: AtomicBool,
    status: Mutex<Map<String, Value>>,
    /// The learner ranks (data parallelism).
    pub ranks: RankTable,
    rank_metrics: Mutex<BTreeMap<u32, RankMetrics>>,
    started: Instant,
}

/// One live member as `quill status` and the Prometheus endpoint show it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    /// Member id (`actor-1`, `reward-2` …).
    pub id: String,
    /// Actor or reward worker.
    pub role: Role,
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
    /// What its last heartbeat reported (none before its first).
    pub metrics: Option<MemberMetrics>,
}

impl MemberView {
    /// The member as an entry of the status document's `members`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "role": self.role.as_str_name(),
            "name": self.name,
            "address": self.address,
            "relay_address": self.relay_address,
            "receiving_version": self.receiving_version,
            "weight_source": self.weight_source,
            "version": self.version,
            "seconds_since_heartbeat": self.seconds_since_heartbeat,
            "metrics": match &self.metrics {
                Some(MemberMetrics::Actor(m)) => json!(m),
                Some(MemberMetrics::Reward(m)) => json!(m),
                None => json!({}),
            },
        })
    }
}

/// Cluster-wide totals: live members, summed rates and the ingest queue.
#[derive(Debug, Clone, Copy, PartialEq)]
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

impl ClusterTotals {
    /// The totals as a JSON object (the status document's `totals`).
    pub fn to_json(&self) -> Value {
        json!({
            "actors": self.actors,
            "reward_workers": self.reward_workers,
            "ranks": self.ranks,
            "generated_tokens_per_s": self.generated_tokens_per_s,
            "trained_tokens_per_s": self.trained_tokens_per_s,
            "scored_groups_per_s": self.scored_groups_per_s,
            "queue_depth": self.queue_depth,
            "queue_capacity": self.queue_capacity,
        })
    }
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
        let root = Transfer::complete(Arc::clone(&weights), job.cluster.weight_chunk_bytes);
        Hub {
            job,
            info,
            tokenizer,
            state: Mutex::new(State {
                dataset,
                ledger,
                members: BTreeMap::new(),
                departed: BTreeMap::new(),
                next_member: 0,
                prompt_tokens: HashMap::new(),
                data_exhausted: false,
            }),
            ingest,
            root: RwLock::new(root),
            previous: RwLock::new(None),
            served: Mutex::new(BTreeMap::new()),
            weights: RwLock::new(weights),
            rejections: Rejections::default(),
            duplicates: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            status: Mutex::new(Map::new()),
            ranks: RankTable::new(1),
            rank_metrics: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
        }
    }

    /// The same hub serving a data-parallel learner of `world` ranks.
    pub fn with_ranks(mut self, world: usize) -> Self {
        self.ranks = RankTable::new(world);
        self
    }

    /// The current weights version.
    pub fn version(&self) -> u64 {
        self.weights.read().expect("poisoned").version
    }

    /// Makes `blob` the weights every member should run.
    pub fn publish(&self, blob: Arc<WeightBlob>) {
        let root = Transfer::complete(Arc::clone(&blob), self.job.cluster.weight_chunk_bytes);
        let old = std::mem::replace(&mut *self.root.write().expect("poisoned"), root);
        *self.previous.write().expect("poisoned") = Some(old);
        *self.weights.write().expect("poisoned") = blob;
    }

    /// Bytes of weights the learner itself sent, by version.
    pub fn weights_served(&self) -> BTreeMap<u64, u64> {
        self.served
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(v, n)| (*v, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Tells every member to finish: no more leases, heartbeats answer `shutdown`.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
    }

    /// Whether the job is over.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Whether every prompt has been served and no lease is out.
    pub fn data_done(&self) -> bool {
        let state = self.state.lock().expect("poisoned");
        state.data_exhausted && state.ledger.outstanding_prompts().is_empty()
    }

    /// The dataset cursor and the prompts that are leased or waiting, for checkpoints.
    pub fn data_state(&self) -> (crate::data::Cursor, Vec<u64>, u64) {
        let state = self.state.lock().expect("poisoned");
        (
            state.dataset.cursor(),
            state.ledger.outstanding_prompts(),
            state.ledger.last_id(),
        )
    }

    /// Replaces the status document `quill status` and the periodic log line read.
    pub fn set_status(&self, status: Map<String, Value>) {
        *self.status.lock().expect("poisoned") = status;
    }

    /// The latest status document.
    pub fn status_snapshot(&self) -> Map<String, Value> {
        self.status.lock().expect("poisoned").clone()
    }

    /// Stores a learner rank's latest step metrics; the status document lists every
    /// rank's, sorted by rank, under `ranks`.
    pub fn set_rank_metrics(&self, metrics: RankMetrics) {
        self.rank_metrics
            .lock()
            .expect("poisoned")
            .insert(metrics.rank, metrics);
    }

    /// Every rank's latest metrics, sorted by rank.
    pub fn rank_metrics(&self) -> Vec<RankMetrics> {
        self.rank_metrics
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Seconds since the hub started.
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Every live member, in id order.
    pub fn members(&self) -> Vec<MemberView> {
        let state = self.state.lock().expect("poisoned");
        state
            .members
            .iter()
            .map(|(id, m)| MemberView {
                id: id.clone(),
                role: m.role,
                name: m.name.clone(),
                address: m.address.clone(),
                relay_address: m.relay_address.clone(),
                receiving_version: m.receiving,
                weight_source: m.weight_source.clone(),
                version: m.version,
                seconds_since_heartbeat: m.last_seen.elapsed().as_secs_f64(),
                metrics: m.metrics,
            })
            .collect()
    }

    /// Live members, summed rates across actors, reward workers and ranks, and the queue.
    pub fn cluster_totals(&self) -> ClusterTotals {
        let members = self.members();
        let count = |role| members.iter().filter(|m| m.role == role).count();
        let actors = self.actor_metrics();
        let rewards = self.reward_metrics();
        let ranks = self.rank_metrics();
        ClusterTotals {
            actors: count(Role::Actor),
            reward_workers: count(Role::Reward),
            ranks: ranks.len(),
            generated_tokens_per_s: actors.iter().map(|m| m.tokens_per_s).sum(),
            trained_tokens_per_s: ranks.iter().map(|r| r.tokens_per_s).sum(),
            scored_groups_per_s: rewards.iter().map(|m| m.scored_per_s).sum(),
            queue_depth: self.queue_depth(),
            queue_capacity: self.ingest.max_capacity(),
        }
    }

    /// Scored groups waiting for the trainer.
    pub fn queue_depth(&self) -> usize {
        self.ingest.max_capacity() - self.ingest.capacity()
    }

    /// The latest heartbeat metrics of every live actor that reported, in member order.
    pub fn actor_metrics(&self) -> Vec<ActorMetrics> {
        let state = self.state.lock().expect("poisoned");
        state
            .members
            .values()
            .filter_map(|m| m.metrics.as_ref()?.actor().copied())
            .collect()
    }

    /// The latest heartbeat metrics of every live reward worker that reported.
    pub fn reward_metrics(&self) -> Vec<RewardMetrics> {
        let state = self.state.lock().expect("poisoned");
        state
            .members
            .values()
            .filter_map(|m| m.metrics.as_ref()?.reward().copied())
            .collect()
    }

    /// Members by role, with their versions (for status and staleness).
    pub fn member_versions(&self, role: Role) -> Vec<u64> {
        let state = self.state.lock().expect("poisoned");
        state
            .members
            .values()
            .filter(|m| m.role == role)
            .map(|m| m.version)
            .collect()
    }

    /// Sets members silent for longer than `timeout` aside; their leases go back in line.
    /// A member set aside that calls again (it was only slow) is taken back.
    pub fn evict_silent(&self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("poisoned");
        let gone: Vec<String> = state
            .members
            .iter()
            .filter(|(_, m)| now.duration_since(m.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            let member = state.members.remove(id).expect("listed above");
            state.departed.insert(id.clone(), member);
            state.ledger.release_member(id);
        }
        gone
    }

    fn prompt_text(&self, prompt: &Prompt) -> String {
        match &prompt.text {
            PromptText::Question(q) => self.job.template.render(q),
            PromptText::Raw(p) => p.clone(),
        }
    }

    /// Checks that `id` registered; a member that was set aside for silence is taken back.
    fn check_member(state: &mut State, id: &str) -> Result<(), Status> {
        if let Some(mut member) = state.departed.remove(id) {
            tracing::warn!(member = %id, "a member set aside for silence is back");
            member.last_seen = Instant::now();
            state.members.insert(id.to_owned(), member);
        }
        if state.members.contains_key(id) {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "unknown member `{id}`: register first"
            )))
        }
    }

    /// Checks a scored group against its lease and the protocol's limits.
    fn check_group(&self, group: &ScoredGroup) -> Result<(), (&'static str, String)> {
        let rollout = group
            .rollout
            .as_ref()
            .ok_or(("malformed", "no rollout in the group".to_owned()))?;
        let lease_id = rollout.lease_id;
        let state = self.state.lock().expect("poisoned");
        let lease = state.ledger.get(lease_id).map_err(|e| match e {
            LeaseError::Duplicate(_) => ("duplicate", e.to_string()),
            LeaseError::Unknown(_) => ("unknown_lease", e.to_string()),
        })?;
        if lease.prompt_id != rollout.prompt_id {
            return Err((
                "malformed",
                format!(
                    "lease {lease_id} is for prompt {}, not {}",
                    lease.prompt_id, rollout.prompt_id
                ),
            ));
        }
        if state.prompt_tokens.get(&rollout.prompt_id) != Some(&rollout.prompt_tokens) {
            return Err((
                "malformed",
                format!("lease {lease_id}: the prompt tokens differ from the leased prompt"),
            ));
        }
        drop(state);
        let n = rollout.samples.len();
        if n != self.job.sampling.group_size {
            return Err((
                "malformed",
                format!(
                    "lease {lease_id}: {n} samples, the group size is {}",
                    self.job.sampling.group_size
                ),
            ));
        }
        if group.scores.len() != n || group.advantages.len() != n {
            return Err((
                "malformed",
                format!(
                    "lease {lease_id}: {} scores and {} advantages for {n} samples",
                    group.scores.len(),
                    group.advantages.len()
                ),
            ));
        }
        let current = self.version();
        let max_staleness = self.job.grpo.max_staleness;
        let vocab = self.info.vocab_size;
        for (i, sample) in rollout.samples.iter().enumerate() {
            if sample.tokens.is_empty() {
                return Err((
                    "malformed",
                    format!("lease {lease_id} sample {i}: no tokens"),
                ));
            }
            if sample.tokens.len() != sample.logprobs.len() {
                return Err((
                    "malformed",
                    format!(
                        "lease {lease_id} sample {i}: {} log-probs for {} tokens",
                        sample.logprobs.len(),
                        sample.tokens.len()
                    ),
                ));
            }
            if rollout.prompt_tokens.len() + sample.tokens.len() > self.info.context {
                return Err((
                    "malformed",
                    format!("lease {lease_id} sample {i}: longer than the model's context"),
                ));
            }
            if let Some(t) = sample.tokens.iter().find(|&&t| t < 0 || t >= vocab) {
                return Err(("token_out_of_vocab", format!("lease {lease_id} sample {i}: token id {t} is outside the vocabulary (size {vocab})")));
            }
            if let Some(lp) = sample
                .logprobs
                .iter()
                .find(|lp| !lp.is_finite() || **lp > 1e-3)
            {
                return Err((
                    "bad_logprob",
                    format!(
                        "lease {lease_id} sample {i}: log-prob {lp} is not a finite value <= 0"
                    ),
                ));
            }
            if sample.version_first > sample.version_last || sample.version_last > current {
                return Err((
                    "future_version",
                    format!(
                        "lease {lease_id} sample {i}: versions {}..{} but the newest is {current}",
                        sample.version_first, sample.version_last
                    ),
                ));
            }
            if current - sample.version_first > max_staleness {
                return Err(("too_stale", format!("lease {lease_id} sample {i}: sampled under version {}, {} behind (max_staleness {max_staleness})", sample.version_first, current - sample.version_first)));
            }
            let score = &group.scores[i];
            if ![score.length, score.format, score.quality, score.total]
                .iter()
                .all(|v| v.is_finite())
            {
                return Err((
                    "nan_reward",
                    format!("lease {lease_id} sample {i}: non-finite reward"),
                ));
            }
            if !group.advantages[i].is_finite() {
                return Err((
                    "nan_reward",
                    format!("lease {lease_id} sample {i}: non-finite advantage"),
                ));
            }
        }
        Ok(())
    }
}

/// The `Learner` service over a shared [`Hub`].
#[derive(Clone)]
pub struct LearnerService(pub Arc<Hub>);

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let hub = &self.0;
        let req = request.into_inner();
        let role = Role::try_from(req.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            return Err(Status::invalid_argument(
                "register: role must be actor or reward",
            ));
        }
        if !req.relay_address.is_empty()
            && req.relay_address.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(Status::invalid_argument(format!(
                "register: relay_address `{}` is not HOST:PORT",
                req.relay_address
            )));
        }
        if role == Role::Reward && req.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "register: reward address `{}` is not HOST:PORT",
                req.address
            )));
        }
        let mut state = hub.state.lock().expect("poisoned");
        state.next_member += 1;
        let prefix = if role == Role::Actor {
            "actor"
        } else {
            "reward"
        };
        let joined = state.next_member;
        let id = format!("{prefix}-{joined}");
        state.members.insert(
            id.clone(),
            Member {
                role,
                name: req.name,
                address: req.address,
                relay_address: req.relay_address,
                joined,
                receiving: 0,
                weight_source: String::new(),
                last_seen: Instant::now(),
                version: 0,
                metrics: None,
            },
        );
        drop(state);
        tracing::info!(member = %id, "registered");
        Ok(Response::new(RegisterReply {
            member_id: id,
            job_json: hub.info.job_json.clone(),
            model_config_json: hub.info.model_config_json.clone(),
            tokenizer_json: hub.info.tokenizer_json.clone(),
            version: hub.version(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let hub = &self.0;
        let req = request.into_inner();
        let live = Duration::from_secs_f64(hub.job.cluster.heartbeat_seconds * 3.0);
        let mut state = hub.state.lock().expect("poisoned");
        Hub::check_member(&mut state, &req.member_id)?;
        let member = state.members.get_mut(&req.member_id).expect("checked");
        member.last_seen = Instant::now();
        member.version = req.version;
        member.receiving = req.receiving_version;
        member.weight_source = req.weight_source;
        let own_role = |m: &MemberMetrics| match m {
            MemberMetrics::Actor(_) => member.role == Role::Actor,
            MemberMetrics::Reward(_) => member.role == Role::Reward,
        };
        if let Some(metrics) = req.metrics.filter(|m| m.is_finite() && own_role(m)) {
            member.metrics = Some(metrics);
        }
        let now = Instant::now();
        let reward_addresses = state
            .members
            .values()
            .filter(|m| m.role == Role::Reward && now.duration_since(m.last_seen) <= live)
            .map(|m| m.address.clone())
            .collect();
        let latest = hub.version();
        let mut actors: Vec<(u64, quill_relay::tree::Node)> = state
            .members
            .iter()
            .filter(|(_, m)| m.role == Role::Actor && now.duration_since(m.last_seen) <= live)
            .map(|(id, m)| {
                let node = quill_relay::tree::Node {
                    id: id.clone(),
                    address: m.relay_address.clone(),
                    holds: m.version >= latest && !m.weight_source.is_empty(),
                    receiving: m.receiving == latest,
                };
                (m.joined, node)
            })
            .collect();
        drop(state);
        actors.sort_by_key(|(joined, _)| *joined);
        let nodes: Vec<quill_relay::tree::Node> = actors.into_iter().map(|(_, n)| n).collect();
        let weight_sources =
            quill_relay::tree::sources(&nodes, &req.member_id, hub.job.cluster.relay_fanout);
        Ok(Response::new(HeartbeatReply {
            latest_version: latest,
            reward_addresses,
            shutdown: hub.is_finished(),
            weight_sources,
        }))
    }

    async fn lease(&self, request: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let hub = &self.0;
        let req = request.into_inner();
        let current = hub.version();
        let mut state = hub.state.lock().expect("poisoned");
        Hub::check_member(&mut state, &req.member_id)?;
        if hub.is_finished() {
            return Ok(Response::new(LeaseReply {
                finished: true,
                ..LeaseReply::default()
            }));
        }
        if req.version + hub.job.grpo.max_staleness < current {
            return Ok(Response::new(LeaseReply {
                wait_for_weights: true,
                ..LeaseReply::default()
            }));
        }
        let now = Instant::now();
        state.ledger.expire(now);
        let ttl = Duration::from_secs(hub.job.cluster.lease_seconds);
        let deadline = unix_ms(SystemTime::now() + ttl);
        let mut leases = Vec::new();
        for _ in 0..req.max_groups.min(MAX_LEASE_BATCH) {
            let prompt = match state.ledger.take_reissue() {
                Some(id) => state.dataset.get(id).cloned(),
                None => state.dataset.next_prompt(),
            };
            let Some(prompt) = prompt else {
                state.data_exhausted = true;
                break;
            };
            let tokens = match state.prompt_tokens.get(&prompt.id) {
                Some(tokens) => tokens.clone(),
                None => {
                    let tokens = hub
                        .tokenizer
                        .encode(&hub.prompt_text(&prompt))
                        .map_err(|e| Status::internal(e.to_string()))?;
                    state.prompt_tokens.insert(prompt.id, tokens.clone());
                    tokens
                }
            };
            let lease_id = state.ledger.issue(prompt.id, &req.member_id, ttl, now);
            leases.push(PromptLease {
                lease_id,
                prompt_id: prompt.id,
                question: prompt.as_str().to_owned(),
                prompt_tokens: tokens,
                length_lo: prompt.range.lo(),
                length_hi: prompt.range.hi(),
                group_size: hub.job.sampling.group_size as u32,
                deadline_unix_ms: deadline,
                seed: hub.job.job.seed ^ lease_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            });
        }
        Ok(Response::new(LeaseReply {
            leases,
            ..LeaseReply::default()
        }))
    }

    async fn submit_scored(
        &self,
        request: Request<ScoredGroup>,
    ) -> Result<Response<SubmitReply>, Status> {
        let hub = &self.0;
        let group = request.into_inner();
        if let Err((kind, reason)) = hub.check_group(&group) {
            if kind == "duplicate" {
                hub.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(Response::new(SubmitReply {
                    accepted: false,
                    duplicate: true,
                }));
            }
            hub.rejections.count(kind);
            tracing::warn!("rejected a scored group: {reason}");
            return Err(Status::invalid_argument(reason));
        }
        let permit = hub
            .ingest
            .reserve()
            .await
            .map_err(|_| Status::unavailable("the learner is shutting down"))?;
        let lease_id = group
            .rollout
            .as_ref()
            .map(|r| r.lease_id)
            .unwrap_or_default();
        let completed = hub
            .state
            .lock()
            .expect("poisoned")
            .ledger
            .complete(lease_id);
        match completed {
            Ok(_) => {
                permit.send(Accepted {
                    group,
                    at: Instant::now(),
                });
                hub.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(Response::new(SubmitReply {
                    accepted: true,
                    duplicate: false,
                }))
            }
            Err(LeaseError::Duplicate(_)) => {
                hub.duplicates.fetch_add(1, Ordering::Relaxed);
                Ok(Response::new(SubmitReply {
                    accepted: false,
                    duplicate: true,
                }))
            }
            Err(e) => {
                hub.rejections.count("unknown_lease");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }

    type GetWeightsStream = ChunkStream;

    async fn get_weights(
        &self,
        request: Request<WeightsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let hub = &self.0;
        let req = request.into_inner();
        let current = Arc::clone(&hub.root.read().expect("poisoned"));
        let previous = hub.previous.read().expect("poisoned").clone();
        let root = choose_transfer(current, previous, &req)?;
        let served = Arc::clone(
            hub.served
                .lock()
                .expect("poisoned")
                .entry(root.version())
                .or_default(),
        );
        let stall = Duration::from_secs_f64(hub.job.cluster.rpc_timeout_seconds);
        Ok(Response::new(root.serve(req.offset, stall, served)))
    }

    /// Records the rank, then waits for rank 0 to form the group.
    async fn join_rank(
        &self,
        request: Request<JoinRankRequest>,
    ) -> Result<Response<JoinRankReply>, Status> {
        let hub = Arc::clone(&self.0);
        let (peer, local) = match (request.remote_addr(), request.local_addr()) {
            (Some(peer), Some(local)) => (peer.ip(), local.ip()),
            _ => {
                return Err(Status::internal(
                    "join rank: the connection has no addresses",
                ))
            }
        };
        let req = request.into_inner();
        let port = u16::try_from(req.ring_port).map_err(|_| {
            Status::invalid_argument(format!("join rank: port {} is not a port", req.ring_port))
        })?;
        hub.ranks
            .join(
                req.rank as usize,
                req.world_size as usize,
                port,
                req.name,
                peer,
                local,
            )
            .map_err(Status::invalid_argument)?;
        tracing::info!(rank = req.rank, "learner rank joined");
        let timeout = hub.job.parallel.timeout();
        let reply = tokio::task::spawn_blocking(move || {
            hub.ranks.wait_for_setup(timeout, &hub.info.job_json)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(reply))
    }

    /// The rank's shard of the step once rank 0 has formed the batch ("not yet" after
    /// `SHARD_POLL`); the rank's metrics ride along.
    async fn get_shard(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<ShardReply>, Status> {
        let hub = Arc::clone(&self.0);
        let req = request.into_inner();
        let reported = req.metrics.filter(|m| {
            m.rank == req.rank
                && req.rank > 0
                && (req.rank as usize) < hub.ranks.world_size()
                && m.gauges().iter().all(|g| g.value.is_finite())
        });
        if let Some(metrics) = reported {
            hub.set_rank_metrics(metrics);
        }
        let answer = tokio::task::spawn_blocking(move || {
            hub.ranks.shard(req.rank as usize, req.step, SHARD_POLL)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::invalid_argument)?;
        Ok(Response::new(match answer {
            ShardAnswer::Ready(samples) => ShardReply {
                ready: true,
                samples,
                ..ShardReply::default()
            },
            ShardAnswer::NotYet => ShardReply::default(),
            ShardAnswer::Finished => ShardReply {
                finished: true,
                ..ShardReply::default()
            },
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let hub = &self.0;
        let mut doc = hub.status_snapshot();
        let members: Vec<Value> = hub.members().iter().map(MemberView::to_json).collect();
        doc.insert("members".into(), Value::from(members));
        doc.insert("ranks".into(), json!(hub.rank_metrics()));
        doc.insert("totals".into(), hub.cluster_totals().to_json());
        doc.insert("uptime_s".into(), json!(hub.uptime_seconds()));
        let state = hub.state.lock().expect("poisoned");
        doc.insert("leases_active".into(), json!(state.ledger.active_count()));
        doc.insert("leases_expired".into(), json!(state.ledger.expired_count()));
        drop(state);
        doc.insert("version".into(), json!(hub.version()));
        doc.insert(
            "weights".into(),
            json!({
                "blob_bytes": hub.root.read().expect("poisoned").received(),
                "relay_fanout": hub.job.cluster.relay_fanout,
                "served_bytes_by_version": hub.weights_served(),
            }),
        );
        doc.insert("finished".into(), json!(hub.is_finished()));
        doc.insert(
            "accepted_groups".into(),
            json!(hub.accepted.load(Ordering::Relaxed)),
        );
        doc.insert(
            "duplicate_groups".into(),
            json!(hub.duplicates.load(Ordering::Relaxed)),
        );
        doc.insert("rejected".into(), json!(hub.rejections.snapshot()));
        doc.insert("learner_ranks".into(), json!(hub.ranks.world_size()));
        Ok(Response::new(StatusReply {
            json: Value::Object(doc).to_string(),
        }))
    }
}

/// The transfer a `GetWeights` call gets: the version it asks for when that is the
/// current or the previous one, else the current one from byte 0 (a resumed transfer of
/// an older version must start over).
fn choose_transfer(
    current: Arc<Transfer>,
    previous: Option<Arc<Transfer>>,
    req: &WeightsRequest,
) -> Result<Arc<Transfer>, Status> {
    let root = match previous {
        Some(p) if req.version == p.version() && req.version != current.version() => p,
        _ => current,
    };
    if req.offset > 0 && req.version != root.version() {
        return Err(Status::failed_precondition(format!(
            "version {} is no longer served (now {}): restart from offset 0",
            req.version,
            root.version()
        )));
    }
    if req.offset > root.received() {
        return Err(Status::out_of_range(format!(
            "offset {} is past the end ({} bytes)",
            req.offset,
            root.received()
        )));
    }
    Ok(root)
}

/// How long a `GetShard` call waits for the batch before answering "not yet".
const SHARD_POLL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use quill_proto::blob::ManifestEntry;

    fn transfer(version: u64) -> Arc<Transfer> {
        let bytes = vec![version as u8; 64];
        let blob = WeightBlob {
            version,
            manifest: vec![ManifestEntry {
                name: "w".into(),
                dtype: "f32".into(),
                shape: vec![16],
                offset: 0,
                len: 64,
            }],
            // Serving does not re-check the whole-blob CRC (receivers do).
            crc32: 0,
            bytes,
        };
        Transfer::complete(Arc::new(blob), 16)
    }

    #[test]
    fn the_previous_version_stays_servable_for_transfers_that_asked_for_it() {
        let ask = |version, offset| WeightsRequest { version, offset };
        let pick = |previous: Option<u64>, req: WeightsRequest| {
            choose_transfer(transfer(5), previous.map(transfer), &req).map(|t| t.version())
        };
        assert_eq!(pick(Some(4), ask(4, 0)).unwrap(), 4);
        assert_eq!(pick(Some(4), ask(4, 32)).unwrap(), 4);
        assert_eq!(pick(Some(4), ask(5, 32)).unwrap(), 5);
        assert_eq!(pick(Some(4), ask(3, 0)).unwrap(), 5);
        assert_eq!(pick(None, ask(4, 0)).unwrap(), 5);
        let err = pick(Some(4), ask(3, 16)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err
            .message()
            .contains("version 3 is no longer served (now 5)"));
        let err = pick(Some(4), ask(4, 65)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
    }
}
