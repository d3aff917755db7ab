//! The reward worker process: register with the learner, serve `Reward`, heart-beat with
//! the worker's rates, serve `/metrics`, and stop on the learner's `shutdown` or when it
//! has been silent for `LEARNER_SILENCE_HEARTBEATS` heartbeats.

use crate::judge::Judge;
use crate::quality::{Quality, QualityScorer};
use crate::service::{RewardService, RewardWorker};
use crate::RewardWorkerError;
use quill_config::job::JobConfig;
use quill_proto::member::Member;
use quill_proto::metrics::MemberMetrics;
use quill_proto::reward_server::RewardServer;
use quill_proto::rpc;
use quill_proto::{HeartbeatRequest, RegisterRequest, Role};
use quill_telemetry::http::{self, Render};
use quill_telemetry::{gauge_families, render_prometheus, Family};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The span `scored_per_s` is averaged over (scoring comes in bursts, one per group).
const SCORED_RATE_WINDOW: Duration = Duration::from_secs(10);

/// Where and as whom a reward worker runs.
#[derive(Debug, Clone)]
pub struct RewardOptions {
    /// The learner's HOST:PORT.
    pub learner: String,
    /// Where to serve the Reward service (port 0 picks a free port).
    pub listen: String,
    /// The address actors should dial (default: the bound listen address).
    pub advertise: Option<String>,
    /// A name shown in status and logs.
    pub name: String,
    /// Serve `/metrics` here instead of the job's `metrics.member_prometheus_addr`.
    pub metrics_listen: Option<String>,
}

/// Runs a reward worker until the job ends.
pub async fn serve(args: RewardOptions, token: String) -> Result<(), RewardWorkerError> {
    let listen_err = |error| RewardWorkerError::Listen {
        addr: args.listen.clone(),
        error,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(listen_err)?;
    let address = match args.advertise {
        Some(a) => a,
        None => listener.local_addr().map_err(listen_err)?.to_string(),
    };
    let (member, reply) = Member::join(
        &args.learner,
        &token,
        RegisterRequest {
            role: Role::Reward as i32,
            name: args.name,
            address: address.clone(),
            relay_address: String::new(),
        },
    )
    .await?;
    let job: JobConfig = serde_json::from_str(&reply.job_json).map_err(RewardWorkerError::Job)?;
    let max_request_bytes = rpc::group_request_bytes(
        job.sampling.group_size,
        job.sampling.max_new_tokens,
        model_context(&reply.model_config_json),
    );
    let quality = match (&job.rewards.quality_model, &job.rewards.judge) {
        _ if job.rewards.quality_weight <= 0.0 => None,
        (Some(dir), _) => Some(Quality::Model(QualityScorer::start(
            dir.as_ref(),
            &job.model.device,
            job.rewards.quality_batch_size,
        )?)),
        (None, Some(judge)) => Some(Quality::Judge(Box::new(Judge::new(judge)?))),
        (None, None) => None,
    };
    let worker = Arc::new(RewardWorker {
        member: member.id.clone(),
        learner: member.learner.clone(),
        quality,
        in_flight: Default::default(),
        waiting: Default::default(),
        scored: Default::default(),
        latency_ms: Mutex::new(0.0),
        scored_per_s: Mutex::new(0.0),
        limit: tokio::sync::Semaphore::new(job.cluster.ingest_queue),
        job,
    });
    tracing::info!(member = %member.id, %address, "reward worker serving");
    let page_worker = Arc::clone(&worker);
    let render: Render = Arc::new(move || metrics_page(&page_worker));
    http::start_configured(
        args.metrics_listen,
        "metrics.member_prometheus_addr",
        worker.job.metrics.member_prometheus_addr.clone(),
        render,
        http::Access::new(&token, worker.job.metrics.require_token),
    )
    .await?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(heartbeats(member, Arc::clone(&worker), stop_tx));
    rpc::serve(
        listener,
        token,
        RewardServer::new(RewardService(Arc::clone(&worker))),
        max_request_bytes,
        worker.job.cluster.idle_connection(),
        async {
            let _ = stop_rx.await;
        },
    )
    .await
    .map_err(RewardWorkerError::Server)?;
    tracing::info!("reward worker finished");
    Ok(())
}

/// Heart-beats with the worker's gauges until the learner says the job is over or falls
/// silent; then stops the server through `stop`.
async fn heartbeats(member: Member, worker: Arc<RewardWorker>, stop: oneshot::Sender<()>) {
    let every = Duration::from_secs_f64(worker.job.cluster.heartbeat_seconds);
    // Groups scored over the last SCORED_RATE_WINDOW: (when, count) samples.
    let mut window = VecDeque::from([(Instant::now(), 0u64)]);
    let build = || {
        let now = Instant::now();
        let scored = worker.scored.load(Ordering::Relaxed);
        window.push_back((now, scored));
        while window.len() > 2 && now.duration_since(window[1].0) >= SCORED_RATE_WINDOW {
            window.pop_front();
        }
        let (since, before) = window[0];
        *worker.scored_per_s.lock().expect("poisoned") =
            (scored - before) as f64 / now.duration_since(since).as_secs_f64().max(1e-9);
        HeartbeatRequest {
            metrics: Some(MemberMetrics::Reward(worker.metrics())),
            ..HeartbeatRequest::default()
        }
    };
    member.heartbeats(every, build, |_, _| {}).await;
    let _ = stop.send(());
}

/// The worker's own `/metrics` page: latency, queue, groups in progress and scored.
fn metrics_page(worker: &RewardWorker) -> String {
    let labels = [("role", "reward"), ("member", worker.member.as_str())];
    let gauges = worker.metrics().gauges();
    let mut families = gauge_families(
        "quill_reward_",
        gauges.iter().map(|g| (g.name, g.help, g.value)),
        &labels,
    );
    families.push(
        Family::counter(
            "quill_reward_scored_groups_total",
            "Groups scored and answered.",
        )
        .with(&labels, worker.scored.load(Ordering::Relaxed) as f64),
    );
    render_prometheus(families)
}

/// Prompt tokens a request may carry: the model's context (`max_position_embeddings` of
/// the config the learner sent), else 128 Ki tokens.
fn model_context(config_json: &str) -> usize {
    serde_json::from_str::<serde_json::Value>(config_json)
        .ok()
        .and_then(|config| config["max_position_embeddings"].as_u64())
        .map_or(128 << 10, |context| context as usize)
}
