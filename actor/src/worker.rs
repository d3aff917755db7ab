//! The actor process: joins a job, keeps its engine on the newest weights, leases prompt
//! groups, generates them, and hands each finished group to a reward worker (spread over
//! the workers, trying the next one when one fails).
//!
//! Every actor also serves `WeightRelay`: the learner's heartbeat replies name where to
//! fetch each new version (a parent actor first, the learner last), and the actor forwards
//! what it receives to its own children while it is still arriving.
//!
//! Tensors never touch this async code: weights travel as byte blobs to the engine
//! thread, which builds its tensors itself.

use crate::held::HeldLeases;
use crate::{
    EngineConfig, EngineHandle, GenerationError, GenerationRequest, GroupOutput, SamplingParams,
};
use quill_config::job::JobConfig;
use quill_model::device::parse_dtype;
use quill_model::{ModelConfig, Qwen2, Tokenizer};
use quill_proto::member::{Member, MemberError};
use quill_proto::metrics::MemberMetrics;
use quill_proto::rpc::{self, endpoint, reward_client, RewardConn};
use quill_proto::weight_relay_server::WeightRelayServer;
use quill_proto::{
    ActorMetrics, HeartbeatReply, HeartbeatRequest, LeaseRequest, PromptLease, RegisterRequest,
    ReleaseRequest, Role, RolloutGroup, Sample, WeightSource,
};
use quill_relay::{Fetcher, RelayError, RelayNode, RelayService};
use quill_telemetry::http;
use quill_telemetry::{gauge_families, Family};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::Code;

/// Why an actor stopped.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// The learner could not be reached or refused the registration.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// The learner refused or failed a call after the registration.
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
    Model(#[from] quill_model::Error),
    /// The Prometheus endpoint could not start.
    #[error("{0}")]
    Metrics(String),
    /// The weight relay could not be served.
    #[error("weight relay: {0}")]
    Relay(String),
    /// The generation engine stopped, or a group's task panicked: the actor gave its
    /// leases back and stops.
    #[error("{0}; the actor gave its leases back and stops")]
    Generation(String),
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
    /// Where to serve `WeightRelay` (`HOST:PORT`; port 0 picks a free port).
    pub relay_listen: String,
    /// The relay address other actors should dial (default: the bound address).
    pub relay_advertise: Option<String>,
}

type Reward = RewardConn;

/// Generations that may fail in a row before the actor takes its engine for broken, gives
/// its leases back and stops (a single failure only gives that group's lease back).
const MAX_FAILURES_IN_A_ROW: u64 = 3;

/// Times an actor tries again to fetch its first weights before it gives up.
const FIRST_SYNC_RETRIES: u32 = 2;

struct Shared {
    version: AtomicU64,
    shutdown: AtomicBool,
    rewards: Mutex<Vec<String>>,
    in_flight: AtomicU64,
    sync_seconds: Mutex<(f64, f64)>,
    relay: Arc<RelayNode>,
    fetcher: Fetcher,
    sources: Mutex<Vec<WeightSource>>,
    /// Held while weights are fetched and swapped in: one sync at a time.
    syncing: tokio::sync::Mutex<()>,
    receiving: AtomicU64,
    source: Mutex<String>,
    from_learner: AtomicU64,
    from_relays: AtomicU64,
    corrupt_chunks: AtomicU64,
    reported: Mutex<ActorMetrics>,
    /// The newest version the learner announced and its SHA-256.
    announced: Mutex<(u64, Vec<u8>)>,
    /// A fetched version did not match the learner's digest: fetch the next one from the
    /// learner itself, not from relays.
    learner_only: AtomicBool,
    /// The leases being generated or delivered.
    held: HeldLeases,
    /// Why the engine stopped, once it has.
    engine_failure: Mutex<Option<String>>,
    /// Generations that failed since the last one that succeeded.
    failures_in_a_row: AtomicU64,
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
    let (engine, shared, member) = (Arc::clone(engine), Arc::clone(shared), member.to_owned());
    let render: http::Render = Arc::new(move || {
        let labels = [("role", "actor"), ("member", member.as_str())];
        let reported = *shared.reported.lock().expect("poisoned");
        let gauges = reported.gauges();
        let mut families = gauge_families(
            "quill_actor_",
            gauges.iter().map(|g| (g.name, g.help, g.value)),
            &labels,
        );
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
        quill_telemetry::render_prometheus(families)
    });
    http::start_configured(
        options.metrics_listen.clone(),
        "metrics.member_prometheus_addr",
        job.metrics.member_prometheus_addr.clone(),
        render,
        http::Access::new(&options.token, job.metrics.require_token),
    )
    .await
    .map_err(|e| ActorError::Metrics(e.to_string()))?;
    Ok(())
}

/// Runs an actor until the learner says the job is over.
pub async fn run(options: ActorOptions) -> Result<(), ActorError> {
    let learner_err = |reason: String| ActorError::Learner {
        addr: options.learner.clone(),
        reason,
    };
    let listener = tokio::net::TcpListener::bind(&options.relay_listen)
        .await
        .map_err(|e| {
            ActorError::Relay(format!(
                "cannot listen on --relay-listen {}: {e}",
                options.relay_listen
            ))
        })?;
    let relay_address = relay_address(&listener, options.relay_advertise.as_deref())?;
    let (mut member, reply) = Member::join(
        &options.learner,
        &options.token,
        RegisterRequest {
            role: Role::Actor as i32,
            name: options.name.clone(),
            address: String::new(),
            relay_address: relay_address.clone(),
        },
    )
    .await?;
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
            let device = quill_model::device::parse_device(&device_name)?;
            Ok((
                Qwen2::new(config, device, kind)?,
                Tokenizer::from_json(&tokenizer_json)?,
            ))
        },
        EngineConfig {
            max_batch: job.cluster.actor_batch,
            initial_cache_len: 512,
            // The actor asks for at most `leases_per_actor` groups at a time, plus one
            // weight update and the shutdown: its requests never wait for room.
            request_queue: job.cluster.leases_per_actor.max(1) + 2,
        },
    )?;
    let engine = Arc::new(engine);
    let stall = relay_stall(&job);
    let relay = RelayNode::new(stall);
    let shared = Arc::new(Shared {
        version: AtomicU64::new(0),
        shutdown: AtomicBool::new(false),
        rewards: Mutex::new(Vec::new()),
        in_flight: AtomicU64::new(0),
        sync_seconds: Mutex::new((0.0, 0.0)),
        relay: Arc::clone(&relay),
        fetcher: Fetcher {
            learner: Some(member.learner.clone()),
            token: options.token.clone(),
            stall,
        },
        sources: Mutex::new(Vec::new()),
        syncing: tokio::sync::Mutex::new(()),
        receiving: AtomicU64::new(0),
        source: Mutex::new(String::new()),
        from_learner: AtomicU64::new(0),
        from_relays: AtomicU64::new(0),
        corrupt_chunks: AtomicU64::new(0),
        reported: Mutex::default(),
        announced: Mutex::default(),
        learner_only: AtomicBool::new(false),
        held: HeldLeases::default(),
        engine_failure: Mutex::new(None),
        failures_in_a_row: AtomicU64::new(0),
    });
    serve_metrics(&options, &job, &member.id, &engine, &shared).await?;
    let relay_server = tokio::spawn(rpc::serve(
        listener,
        options.token.clone(),
        WeightRelayServer::new(RelayService(relay)),
        rpc::SMALL_REQUEST_BYTES,
        job.cluster.idle_connection(),
        std::future::pending(),
    ));
    // The first weights: a failed fetch (a forged relay copy makes the next try go to the
    // learner alone) is tried again with a fresh heartbeat's sources and version.
    let mut tries = 0;
    loop {
        let reply = member
            .heartbeat(heartbeat_request(&shared, ActorMetrics::default()))
            .await
            .map_err(|s| learner_err(format!("heartbeat: {}", s.message())))?;
        take_reply(&shared, &reply);
        match sync_weights(reply.latest_version, &engine, &shared).await {
            Ok(()) => break,
            Err(e) if tries < FIRST_SYNC_RETRIES => {
                tries += 1;
                tracing::warn!("first weights: {e}");
            }
            Err(e) => return Err(learner_err(e)),
        }
    }
    tracing::info!(member = %member.id, version = shared.version.load(Ordering::SeqCst), relay = %relay_address, "actor joined");

    let hb = Duration::from_secs_f64(job.cluster.heartbeat_seconds);
    let heartbeat = tokio::spawn(heartbeats(
        member.clone(),
        Arc::clone(&engine),
        Arc::clone(&shared),
        hb,
    ));
    let stop_ids = engine.stop_token_ids();
    let mut groups: JoinSet<()> = JoinSet::new();
    let want = job.cluster.leases_per_actor.max(1);
    let channels = Arc::new(tokio::sync::Mutex::new(HashMap::<String, Reward>::new()));
    let mut failure = None;
    let mut refused = None;
    while failure.is_none() && !shared.shutdown.load(Ordering::SeqCst) {
        let free = want.saturating_sub(groups.len());
        if free > 0 {
            let reply = member
                .learner
                .lease(LeaseRequest {
                    member_id: member.id.clone(),
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
                    let behind = reply.latest_version > shared.version.load(Ordering::SeqCst);
                    if behind
                        && reply.leases.is_empty()
                        && catch_up(reply.latest_version, &mut member, &engine, &shared).await
                    {
                        continue;
                    }
                    for lease in reply.leases {
                        shared.in_flight.fetch_add(1, Ordering::Relaxed);
                        shared.held.take(lease.lease_id, lease.deadline_unix_ms);
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
                Err(status) if status.code() == Code::FailedPrecondition => {
                    refused = Some(format!(
                        "the learner gives this actor no more leases: {}",
                        status.message()
                    ));
                }
                Err(status) => tracing::warn!("lease failed: {}", status.message()),
            }
        }
        failure = refused.take();
        failure = failure.or(if groups.is_empty() {
            tokio::time::sleep(hb / 4).await;
            None
        } else {
            match tokio::time::timeout(hb / 4, groups.join_next()).await {
                Ok(Some(Err(e))) if e.is_panic() => Some(format!(
                    "a group's task panicked: {}",
                    rpc::panic_message(e.into_panic().as_ref())
                )),
                _ => None,
            }
        });
        failure = failure.or_else(|| shared.engine_failure.lock().expect("poisoned").clone());
    }
    groups.abort_all();
    if let Some(failure) = &failure {
        release(&member, &shared.held.ids(), failure).await;
    }
    heartbeat.abort();
    relay_server.abort();
    match failure {
        Some(failure) => Err(ActorError::Generation(failure)),
        None => {
            tracing::info!(member = %member.id, "actor finished");
            Ok(())
        }
    }
}

/// How long a relay child waits for the next bytes before it tries another source.
fn relay_stall(job: &JobConfig) -> Duration {
    Duration::from_secs_f64((job.cluster.heartbeat_seconds * 4.0).max(2.0))
}

/// The relay address to announce: `--relay-advertise`, else the bound address (which must
/// then be a concrete IP, not a wildcard).
fn relay_address(
    listener: &tokio::net::TcpListener,
    advertise: Option<&str>,
) -> Result<String, ActorError> {
    if let Some(addr) = advertise {
        return match addr.parse::<std::net::SocketAddr>() {
            Ok(_) => Ok(addr.to_owned()),
            Err(_) => Err(ActorError::Relay(format!(
                "--relay-advertise `{addr}` is not IP:PORT"
            ))),
        };
    }
    let bound = listener
        .local_addr()
        .map_err(|e| ActorError::Relay(e.to_string()))?;
    if bound.ip().is_unspecified() {
        return Err(ActorError::Relay(format!(
            "--relay-listen {bound} is a wildcard address: give --relay-advertise IP:PORT"
        )));
    }
    Ok(bound.to_string())
}

/// A heartbeat with the actor's weights state and `metrics` (the member id is filled in
/// when it is sent).
fn heartbeat_request(shared: &Shared, metrics: ActorMetrics) -> HeartbeatRequest {
    HeartbeatRequest {
        held_leases: shared.held.ids(),
        member_id: String::new(),
        version: shared.version.load(Ordering::SeqCst),
        metrics: Some(MemberMetrics::Actor(metrics)),
        receiving_version: shared.receiving.load(Ordering::SeqCst),
        weight_source: shared.source.lock().expect("poisoned").clone(),
    }
}

/// Takes the reward workers, the weight sources and the newest version and its digest
/// from a reply.
fn take_reply(shared: &Shared, reply: &HeartbeatReply) {
    *shared.rewards.lock().expect("poisoned") = reply.reward_addresses.clone();
    *shared.sources.lock().expect("poisoned") = reply.weight_sources.clone();
    *shared.announced.lock().expect("poisoned") =
        (reply.latest_version, reply.latest_sha256.clone());
    shared.relay.set_latest(reply.latest_version);
}

/// Fetches `version` from the sources the learner named (resuming from the next source
/// when one fails), relaying it to children meanwhile, checks it against the learner's
/// digest, and swaps it into the engine. A version that fails the digest is dropped and
/// the next try fetches from the learner alone.
async fn sync_weights(
    version: u64,
    engine: &Arc<EngineHandle>,
    shared: &Shared,
) -> Result<(), String> {
    let started = Instant::now();
    let expected = match &*shared.announced.lock().expect("poisoned") {
        (announced, digest) if *announced == version => digest.clone(),
        (announced, _) => {
            return Err(format!(
                "no digest for weights v{version} (the learner announced v{announced})"
            ))
        }
    };
    let mut sources = shared.sources.lock().expect("poisoned").clone();
    if shared.learner_only.load(Ordering::SeqCst) {
        sources.retain(|s| s.member_id == quill_relay::LEARNER_SOURCE);
    }
    let transfer = shared.relay.begin(version);
    shared.receiving.store(version, Ordering::SeqCst);
    let fetched = shared.fetcher.fetch(&transfer, &sources, 3).await;
    shared.receiving.store(0, Ordering::SeqCst);
    let report = match fetched {
        Ok(report) => report,
        Err(e) => {
            if !matches!(e, RelayError::Exhausted { .. }) {
                shared.relay.give_up(version);
            }
            return Err(e.to_string());
        }
    };
    shared
        .from_learner
        .fetch_add(report.from_learner, Ordering::Relaxed);
    shared
        .from_relays
        .fetch_add(report.from_relays, Ordering::Relaxed);
    shared
        .corrupt_chunks
        .fetch_add(report.corrupt_chunks, Ordering::Relaxed);
    let report_source = report.source.clone();
    *shared.source.lock().expect("poisoned") = report.source;
    let bytes = transfer.received() as f64;
    let engine = Arc::clone(engine);
    let held = Arc::clone(&transfer);
    let checked = tokio::task::spawn_blocking(move || {
        let blob = held.to_blob().map_err(|e| (e.to_string(), false))?;
        blob.check_digest(&expected)
            .map_err(|e| (e.to_string(), true))?;
        engine
            .update_weights(Arc::new(blob))
            .map_err(|e| (e.to_string(), false))
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Err((e, forged)) = checked {
        if forged {
            shared.relay.give_up(version);
            shared.learner_only.store(true, Ordering::SeqCst);
            return Err(format!(
                "{e} (last bytes from {report_source}): fetching it again from the learner"
            ));
        }
        return Err(e);
    }
    shared.learner_only.store(false, Ordering::SeqCst);
    shared.relay.promote(&transfer);
    shared.version.store(version, Ordering::SeqCst);
    let seconds = started.elapsed().as_secs_f64();
    *shared.sync_seconds.lock().expect("poisoned") = (seconds, bytes / 1e6 / seconds.max(1e-9));
    Ok(())
}

/// Syncs to `version` in the background unless a sync is already running.
fn spawn_sync(version: u64, engine: &Arc<EngineHandle>, shared: &Arc<Shared>) {
    let (engine, shared) = (Arc::clone(engine), Arc::clone(shared));
    tokio::spawn(async move {
        let Ok(_syncing) = shared.syncing.try_lock() else {
            return;
        };
        if let Err(e) = sync_weights(version, &engine, &shared).await {
            tracing::warn!("weight sync failed: {e}");
        }
    });
}

/// Catches up with a version the learner named outside the heartbeat rhythm (a lease
/// reply): heart-beats at once for that version's digest and sources, then fetches it,
/// or waits for the sync already running. Returns whether the engine is now on `version`
/// or newer. Admission leases less to an actor behind the learner, so the actor syncs
/// the moment it learns of new weights instead of at its next heartbeat.
async fn catch_up(
    version: u64,
    member: &mut Member,
    engine: &Arc<EngineHandle>,
    shared: &Shared,
) -> bool {
    let _syncing = shared.syncing.lock().await;
    if shared.version.load(Ordering::SeqCst) >= version {
        return true;
    }
    let metrics = *shared.reported.lock().expect("poisoned");
    let sent = heartbeat_request(shared, metrics);
    let reply = match member.heartbeat(sent.clone()).await {
        Ok(reply) if !reply.shutdown => reply,
        Ok(_) => return false,
        Err(status) => {
            tracing::warn!("heartbeat for new weights: {}", status.message());
            return false;
        }
    };
    take_heartbeat(shared, &sent, &reply);
    if let Err(e) = sync_weights(reply.latest_version, engine, shared).await {
        tracing::warn!("weight sync failed: {e}");
    }
    shared.version.load(Ordering::SeqCst) >= version
}

/// Takes a heartbeat reply to `sent`: the learner's addresses, version and digest, and
/// the leases it renewed or says are lost.
fn take_heartbeat(shared: &Shared, sent: &HeartbeatRequest, reply: &HeartbeatReply) {
    take_reply(shared, reply);
    shared.held.renewed(
        &sent.held_leases,
        &reply.lost_leases,
        reply.lease_deadline_unix_ms,
    );
}

/// Heart-beats with the actor's rates (a reply naming a newer version starts a background
/// sync) until the learner says the job is over or falls silent; then stops the actor.
async fn heartbeats(
    member: Member,
    engine: Arc<EngineHandle>,
    shared: Arc<Shared>,
    every: Duration,
) {
    let mut last = (
        Instant::now(),
        engine.stats().generated_tokens.load(Ordering::Relaxed),
    );
    let build = || {
        let tokens = engine.stats().generated_tokens.load(Ordering::Relaxed);
        let rate = (tokens - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
        last = (Instant::now(), tokens);
        let (sync_s, sync_mbps) = *shared.sync_seconds.lock().expect("poisoned");
        let metrics = ActorMetrics {
            tokens_per_s: rate,
            groups_in_flight: shared.in_flight.load(Ordering::Relaxed) as u32,
            weight_sync_seconds: sync_s,
            weight_sync_mb_per_s: sync_mbps,
            relay_bytes_served: shared.relay.bytes_served.load(Ordering::Relaxed),
            weight_bytes_from_learner: shared.from_learner.load(Ordering::Relaxed),
            weight_bytes_from_relays: shared.from_relays.load(Ordering::Relaxed),
            weight_corrupt_chunks: shared.corrupt_chunks.load(Ordering::Relaxed),
        };
        shared
            .reported
            .lock()
            .expect("poisoned")
            .clone_from(&metrics);
        heartbeat_request(&shared, metrics)
    };
    let take = |sent: &HeartbeatRequest, reply: HeartbeatReply| {
        take_heartbeat(&shared, sent, &reply);
        if reply.latest_version > sent.version {
            spawn_sync(reply.latest_version, &engine, &shared);
        }
    };
    member.heartbeats(every, build, take).await;
    shared.shutdown.store(true, Ordering::SeqCst);
}

#[allow(clippy::too_many_arguments)]
async fn generate_and_deliver(
    lease: PromptLease,
    member: Member,
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
    let group = tokio::task::spawn_blocking(move || engine.submit(request).recv()).await;
    let group: Result<GroupOutput, String> = match group {
        Ok(Ok(Ok(group))) => Ok(group),
        Ok(Ok(Err(GenerationError::ShutDown))) | Ok(Err(_)) => {
            let reason = "the generation engine stopped".to_owned();
            shared
                .engine_failure
                .lock()
                .expect("poisoned")
                .get_or_insert_with(|| reason.clone());
            Err(reason)
        }
        Ok(Ok(Err(e))) => {
            let reason = format!("generation failed: {e}");
            let failures = shared.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
            if failures >= MAX_FAILURES_IN_A_ROW {
                shared
                    .engine_failure
                    .lock()
                    .expect("poisoned")
                    .get_or_insert_with(|| {
                        format!("{failures} generations in a row failed; the last: {e}")
                    });
            }
            Err(reason)
        }
        Err(e) => Err(format!("generation task: {e}")),
    };
    let group = match group {
        Ok(group) => {
            shared.failures_in_a_row.store(0, Ordering::Relaxed);
            group
        }
        Err(reason) => {
            tracing::warn!(lease = lease.lease_id, "{reason}");
            release(&member, &[lease.lease_id], &reason).await;
            shared.held.done(lease.lease_id);
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
        actor_id: member.id.clone(),
        generate_seconds: started.elapsed().as_secs_f64(),
        lease_key: lease.key,
    };
    deliver(rollout, &lease, &shared, &channels, &token, &job).await;
    shared.held.done(lease.lease_id);
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Gives `lease_ids` back to the learner (logged; a learner that cannot be reached lets
/// them expire instead).
async fn release(member: &Member, lease_ids: &[u64], reason: &str) {
    if lease_ids.is_empty() {
        return;
    }
    let request = ReleaseRequest {
        member_id: member.id.clone(),
        lease_ids: lease_ids.to_vec(),
        reason: reason.to_owned(),
    };
    match member.learner.clone().release_leases(request).await {
        Ok(reply) => tracing::warn!(
            released = reply.into_inner().released,
            "gave leases back: {reason}"
        ),
        Err(status) => tracing::warn!(
            "could not give leases back ({}); they expire instead",
            status.message()
        ),
    }
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
        if !shared.held.is_live(lease.lease_id) || shared.shutdown.load(Ordering::SeqCst) {
            tracing::warn!(
                lease = lease.lease_id,
                "gave up delivering: lease expired or lost, or job over"
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
