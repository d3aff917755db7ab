//! The actor process: joins a job, keeps its engine on the newest weights, leases prompt
//! groups, generates them, and hands each finished group to a reward worker (spread over
//! the workers, trying the next one when one fails).
//!
//! Tensors never touch this async code: weights travel as byte blobs to the engine
//! thread, which builds its tensors itself.

use crate::{EngineConfig, EngineHandle, GenerationRequest, GroupOutput, SamplingParams};
use quill_common::device::parse_dtype;
use quill_common::job::JobConfig;
use quill_common::prometheus_http;
use quill_common::proto::{
    HeartbeatRequest, LeaseRequest, PromptLease, RegisterRequest, Role, RolloutGroup, Sample,
    WeightsRequest,
};
use quill_common::rpc::{endpoint, learner_client, reward_client, LearnerConn, RewardConn};
use quill_common::telemetry::{self, Family};
use quill_common::weights::{ManifestEntry, WeightBlob};
use quill_common::{ModelConfig, Qwen2, Tokenizer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Code;

/// Heartbeat periods without an answer after which a member decides the learner is gone.
pub const LEARNER_SILENCE_HEARTBEATS: u32 = 10;

/// Why an actor stopped.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// The learner could not be reached or refused a call.
    #[error("learner {addr}: {reason}")]
    Learner {
        /// The learner's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The job description from the learner is unusable.
    #[error("job description from the learner: {0}")]
    Job(String),
    /// The model or engine failed.
    #[error(transparent)]
    Model(#[from] quill_common::Error),
    /// The Prometheus endpoint could not start.
    #[error("{0}")]
    Metrics(String),
}

/// How an actor joins.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// The learner's `HOST:PORT`.
    pub learner: String,
    /// The job token.
    pub token: String,
    /// A name for logs and status.
    pub name: String,
    /// Overrides the job's device for this actor (`cpu`, `cuda:N`).
    pub device: Option<String>,
    /// Overrides `metrics.member_prometheus_addr`: where to serve Prometheus `/metrics`.
    pub metrics_listen: Option<String>,
}

type Learner = LearnerConn;
type Reward = RewardConn;

struct Shared {
    version: AtomicU64,
    shutdown: AtomicBool,
    rewards: Mutex<Vec<String>>,
    in_flight: AtomicU64,
    sync_seconds: Mutex<(f64, f64)>,
    reported: Mutex<HashMap<String, f64>>,
}

/// Why the actor's Prometheus endpoint could not start (the message names the flag or
/// job field the address came from).
fn metrics_error(source: &str, e: prometheus_http::ServeError) -> ActorError {
    ActorError::Metrics(format!("{source}: {e}"))
}

/// Serves the actor's own gauges: what its last heartbeat reported, its weights version
/// and its generated-token count.
async fn serve_metrics(
    options: &ActorOptions,
    job: &JobConfig,
    member: &str,
    engine: &Arc<EngineHandle>,
    shared: &Arc<Shared>,
) -> Result<(), ActorError> {
    let (addr, source) = match &options.metrics_listen {
        Some(addr) => (Some(addr.clone()), "--metrics-listen"),
        None => (
            job.metrics.member_prometheus_addr.clone(),
            "metrics.member_prometheus_addr",
        ),
    };
    let Some(addr) = addr else {
        return Ok(());
    };
    let (engine, shared, member) = (Arc::clone(engine), Arc::clone(shared), member.to_owned());
    let render: prometheus_http::Render = Arc::new(move || {
        let labels = [("role", "actor"), ("member", member.as_str())];
        let reported = shared.reported.lock().expect("poisoned").clone();
        let mut families = telemetry::heartbeat_gauges("quill_actor_", &reported, &labels);
        families.push(
            Family::counter(
                "quill_generated_tokens_total",
                "Tokens this actor generated.",
            )
            .with(
                &labels,
                engine.stats().generated_tokens.load(Ordering::Relaxed) as f64,
            ),
        );
        families.push(
            Family::gauge("quill_weights_version", "Weights version this actor runs.")
                .with(&labels, shared.version.load(Ordering::SeqCst) as f64),
        );
        telemetry::render_prometheus(&families)
    });
    let bound = prometheus_http::start(&addr, render)
        .await
        .map_err(|e| metrics_error(source, e))?;
    tracing::info!("Prometheus metrics at http://{bound}/metrics");
    Ok(())
}

/// Runs an actor until the learner says the job is over.
pub async fn run(options: ActorOptions) -> Result<(), ActorError> {
    let learner_err = |reason: String| ActorError::Learner {
        addr: options.learner.clone(),
        reason,
    };
    let timeout = Duration::from_secs(30);
    let channel = connect_with_retry(&options.learner, timeout)
        .await
        .map_err(learner_err)?;
    let mut learner: Learner = learner_client(channel, &options.token);
    let reply = learner
        .register(RegisterRequest {
            role: Role::Actor as i32,
            name: options.name.clone(),
            address: String::new(),
        })
        .await
        .map_err(|s| learner_err(format!("register: {}", s.message())))?
        .into_inner();
    let member = reply.member_id.clone();
    let job: JobConfig =
        serde_json::from_str(&reply.job_json).map_err(|e| ActorError::Job(e.to_string()))?;
    let config_json = serde_json::from_str(&reply.model_config_json)
        .map_err(|e| ActorError::Job(e.to_string()))?;
    let config = ModelConfig::from_json(config_json)?;
    let tokenizer_json = reply.tokenizer_json.clone();
    let device_name = options
        .device
        .clone()
        .unwrap_or_else(|| job.model.device.clone());
    let kind = parse_dtype(&job.model.dtype)?;
    let engine = EngineHandle::spawn(
        move || {
            let device = quill_common::device::parse_device(&device_name)?;
            Ok((
                Qwen2::new(config, device, kind)?,
                Tokenizer::from_json(&tokenizer_json)?,
            ))
        },
        EngineConfig {
            max_batch: job.cluster.actor_batch,
            initial_cache_len: 512,
        },
    )?;
    let engine = Arc::new(engine);
    let shared = Arc::new(Shared {
        version: AtomicU64::new(0),
        shutdown: AtomicBool::new(false),
        rewards: Mutex::new(Vec::new()),
        in_flight: AtomicU64::new(0),
        sync_seconds: Mutex::new((0.0, 0.0)),
        reported: Mutex::new(HashMap::new()),
    });
    serve_metrics(&options, &job, &member, &engine, &shared).await?;
    sync_weights(&mut learner, &engine, &shared)
        .await
        .map_err(learner_err)?;
    tracing::info!(member = %member, version = shared.version.load(Ordering::SeqCst), "actor joined");

    let heartbeat = tokio::spawn(heartbeats(
        learner.clone(),
        member.clone(),
        Arc::clone(&engine),
        Arc::clone(&shared),
        job.clone(),
    ));
    let stop_ids = engine.stop_token_ids();
    let mut groups: JoinSet<()> = JoinSet::new();
    let want = job.cluster.leases_per_actor.max(1);
    let hb = Duration::from_secs_f64(job.cluster.heartbeat_seconds);
    let channels = Arc::new(tokio::sync::Mutex::new(HashMap::<String, Reward>::new()));
    while !shared.shutdown.load(Ordering::SeqCst) {
        let free = want.saturating_sub(groups.len());
        if free > 0 {
            let reply = learner
                .lease(LeaseRequest {
                    member_id: member.clone(),
                    max_groups: free as u32,
                    version: shared.version.load(Ordering::SeqCst),
                })
                .await;
            match reply {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.finished {
                        break;
                    }
                    for lease in reply.leases {
                        shared.in_flight.fetch_add(1, Ordering::Relaxed);
                        groups.spawn(generate_and_deliver(
                            lease,
                            member.clone(),
                            Arc::clone(&engine),
                            Arc::clone(&shared),
                            job.clone(),
                            stop_ids.clone(),
                            Arc::clone(&channels),
                            options.token.clone(),
                        ));
                    }
                }
                Err(status) if status.code() == Code::NotFound => {
                    return Err(learner_err(format!("lease: {}", status.message())));
                }
                Err(status) => tracing::warn!("lease failed: {}", status.message()),
            }
        }
        if groups.is_empty() {
            tokio::time::sleep(hb / 4).await;
        } else {
            let _ = tokio::time::timeout(hb / 4, groups.join_next()).await;
        }
    }
    groups.abort_all();
    heartbeat.abort();
    tracing::info!(member = %member, "actor finished");
    Ok(())
}

async fn connect_with_retry(addr: &str, timeout: Duration) -> Result<Channel, String> {
    let endpoint = endpoint(addr, timeout)?;
    let started = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if started.elapsed() > timeout => return Err(format!("cannot connect: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Fetches the newest weights (resuming a dropped transfer once) into the engine.
async fn sync_weights(
    learner: &mut Learner,
    engine: &Arc<EngineHandle>,
    shared: &Shared,
) -> Result<(), String> {
    let started = Instant::now();
    let blob = fetch_weights(learner).await?;
    let bytes = blob.bytes.len() as f64;
    let version = blob.version;
    let engine = Arc::clone(engine);
    tokio::task::spawn_blocking(move || engine.update_weights(Arc::new(blob)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    shared.version.store(version, Ordering::SeqCst);
    let seconds = started.elapsed().as_secs_f64();
    *shared.sync_seconds.lock().expect("poisoned") = (seconds, bytes / 1e6 / seconds.max(1e-9));
    Ok(())
}

async fn fetch_weights(learner: &mut Learner) -> Result<WeightBlob, String> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut manifest: Vec<ManifestEntry> = Vec::new();
    let (mut version, mut crc32, mut total) = (0u64, 0u32, None::<u64>);
    for attempt in 0..3 {
        let request = WeightsRequest {
            version,
            offset: bytes.len() as u64,
        };
        let mut stream = match learner.get_weights(request).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::FailedPrecondition => {
                bytes.clear();
                continue;
            }
            Err(s) => return Err(format!("weights: {}", s.message())),
        };
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if chunk.offset != bytes.len() as u64 {
                        return Err(format!(
                            "weights: chunk at {} but {} bytes held",
                            chunk.offset,
                            bytes.len()
                        ));
                    }
                    if !chunk.manifest_json.is_empty() {
                        manifest = serde_json::from_str(&chunk.manifest_json)
                            .map_err(|e| format!("weights manifest: {e}"))?;
                    }
                    version = chunk.version;
                    crc32 = chunk.crc32;
                    total = Some(chunk.total_bytes);
                    bytes.extend_from_slice(&chunk.data);
                }
                Ok(None) => break,
                Err(s) if attempt < 2 => {
                    tracing::warn!(
                        "weight transfer broke at byte {}: {}; resuming",
                        bytes.len(),
                        s.message()
                    );
                    break;
                }
                Err(s) => return Err(format!("weights: {}", s.message())),
            }
        }
        if total == Some(bytes.len() as u64) && !manifest.is_empty() {
            let blob = WeightBlob {
                version,
                manifest,
                bytes,
                crc32,
            };
            blob.verify().map_err(|e| e.to_string())?;
            return Ok(blob);
        }
    }
    Err("weights: transfer did not complete after 3 tries".into())
}

async fn heartbeats(
    mut learner: Learner,
    member: String,
    engine: Arc<EngineHandle>,
    shared: Arc<Shared>,
    job: JobConfig,
) {
    let every = Duration::from_secs_f64(job.cluster.heartbeat_seconds);
    let mut last = (
        Instant::now(),
        engine.stats().generated_tokens.load(Ordering::Relaxed),
    );
    let mut silent_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        let tokens = engine.stats().generated_tokens.load(Ordering::Relaxed);
        let rate = (tokens - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
        last = (Instant::now(), tokens);
        let (sync_s, sync_mbps) = *shared.sync_seconds.lock().expect("poisoned");
        let metrics = HashMap::from([
            ("tokens_per_s".to_owned(), rate),
            (
                "groups_in_flight".to_owned(),
                shared.in_flight.load(Ordering::Relaxed) as f64,
            ),
            ("weight_sync_seconds".to_owned(), sync_s),
            ("weight_sync_mb_per_s".to_owned(), sync_mbps),
        ]);
        shared
            .reported
            .lock()
            .expect("poisoned")
            .clone_from(&metrics);
        let version = shared.version.load(Ordering::SeqCst);
        match learner
            .heartbeat(HeartbeatRequest {
                member_id: member.clone(),
                version,
                metrics,
            })
            .await
        {
            Ok(reply) => {
                silent_since = None;
                let reply = reply.into_inner();
                *shared.rewards.lock().expect("poisoned") = reply.reward_addresses;
                if reply.shutdown {
                    shared.shutdown.store(true, Ordering::SeqCst);
                    return;
                }
                if reply.latest_version > version {
                    if let Err(e) = sync_weights(&mut learner, &engine, &shared).await {
                        tracing::warn!("weight sync failed: {e}");
                    }
                }
            }
            Err(status) => {
                tracing::warn!("heartbeat failed: {}", status.message());
                let since = *silent_since.get_or_insert_with(Instant::now);
                if since.elapsed() > every * LEARNER_SILENCE_HEARTBEATS {
                    tracing::warn!("the learner is gone: stopping");
                    shared.shutdown.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn generate_and_deliver(
    lease: PromptLease,
    member: String,
    engine: Arc<EngineHandle>,
    shared: Arc<Shared>,
    job: JobConfig,
    stop_token_ids: Vec<i64>,
    channels: Arc<tokio::sync::Mutex<HashMap<String, Reward>>>,
    token: String,
) {
    let started = Instant::now();
    let request = GenerationRequest {
        id: lease.lease_id,
        prompt: lease.prompt_tokens.clone(),
        n: lease.group_size as usize,
        params: SamplingParams {
            temperature: job.sampling.temperature,
            top_p: job.sampling.top_p,
            top_k: job.sampling.top_k,
            max_new_tokens: job.sampling.max_new_tokens,
            seed: lease.seed,
            stop_token_ids,
            stop_strings: job.sampling.stop.clone(),
        },
    };
    let answer = engine.submit(request);
    let group = tokio::task::spawn_blocking(move || answer.recv()).await;
    let group: GroupOutput = match group {
        Ok(Ok(Ok(group))) => group,
        Ok(Ok(Err(e))) => {
            tracing::warn!(lease = lease.lease_id, "generation failed: {e}");
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        _ => {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    let rollout = RolloutGroup {
        lease_id: lease.lease_id,
        prompt_id: lease.prompt_id,
        question: lease.question.clone(),
        prompt_tokens: lease.prompt_tokens.clone(),
        length_lo: lease.length_lo,
        length_hi: lease.length_hi,
        samples: group
            .samples
            .into_iter()
            .map(|s| Sample {
                finish_reason: s.finish.as_str().to_owned(),
                tokens: s.tokens,
                logprobs: s.logprobs,
                version_first: s.version_first,
                version_last: s.version_last,
                text: s.text,
            })
            .collect(),
        actor_id: member,
        generate_seconds: started.elapsed().as_secs_f64(),
    };
    deliver(rollout, &lease, &shared, &channels, &token, &job).await;
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Sends a group to a reward worker, trying each known worker in turn until one takes it
/// or the lease's deadline passes (then the learner re-issues the prompt anyway).
async fn deliver(
    rollout: RolloutGroup,
    lease: &PromptLease,
    shared: &Shared,
    channels: &tokio::sync::Mutex<HashMap<String, Reward>>,
    token: &str,
    job: &JobConfig,
) {
    let timeout = Duration::from_secs_f64(job.cluster.rpc_timeout_seconds);
    let mut attempt = lease.lease_id as usize;
    loop {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if now_ms > lease.deadline_unix_ms || shared.shutdown.load(Ordering::SeqCst) {
            tracing::warn!(
                lease = lease.lease_id,
                "gave up delivering: lease expired or job over"
            );
            return;
        }
        let addrs = shared.rewards.lock().expect("poisoned").clone();
        if addrs.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let addr = addrs[attempt % addrs.len()].clone();
        attempt += 1;
        let client = {
            let mut cache = channels.lock().await;
            match cache.get(&addr) {
                Some(c) => c.clone(),
                None => match endpoint(&addr, timeout) {
                    Ok(ep) => {
                        let client = reward_client(ep.connect_lazy(), token);
                        cache.insert(addr.clone(), client.clone());
                        client
                    }
                    Err(e) => {
                        tracing::warn!("{e}");
                        continue;
                    }
                },
            }
        };
        match client.clone().score(rollout.clone()).await {
            Ok(_) => return,
            Err(status) if status.code() == Code::InvalidArgument => {
                tracing::warn!(
                    lease = lease.lease_id,
                    "group refused: {}",
                    status.message()
                );
                return;
            }
            Err(status) => {
                tracing::warn!(lease = lease.lease_id, reward = %addr, "reward worker failed: {}; trying another", status.message());
                channels.lock().await.remove(&addr);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
