//! The reward worker process: register with the learner, serve `Reward`, heart-beat with
//! the worker's rates, serve `/metrics`, and stop on the learner's `shutdown` or when it
//! has been silent for `LEARNER_SILENCE_HEARTBEATS` heartbeats.

use crate::quality::QualityScorer;
use crate::service::{RewardService, RewardWorker};
use anyhow::Context;
use quill_config::job::JobConfig;
use quill_proto::auth::require_token;
use quill_proto::metrics::MemberMetrics;
use quill_proto::reward_server::RewardServer;
use quill_proto::rpc::{self, LEARNER_SILENCE_HEARTBEATS, MAX_MESSAGE_BYTES};
use quill_proto::{HeartbeatRequest, RegisterRequest, Role};
use quill_telemetry::http::{self, Render};
use quill_telemetry::{render_prometheus, Family};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;

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
pub async fn serve(args: RewardOptions, token: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = match args.advertise {
        Some(a) => a,
        None => listener.local_addr()?.to_string(),
    };
    let channel = rpc::endpoint(&args.learner, Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the learner at {}", args.learner))?;
    let mut learner = rpc::learner_client(channel, &token);
    let reply = learner
        .register(RegisterRequest {
            role: Role::Reward as i32,
            name: args.name,
            address: address.clone(),
            relay_address: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("register with the learner: {}", s.message()))?
        .into_inner();
    let job: JobConfig =
        serde_json::from_str(&reply.job_json).context("job description from the learner")?;
    let quality = match &job.rewards.quality_model {
        Some(dir) if job.rewards.quality_weight > 0.0 => Some(QualityScorer::start(
            dir.as_ref(),
            &job.model.device,
            job.rewards.quality_batch_size,
        )?),
        _ => None,
    };
    let worker = Arc::new(RewardWorker {
        member: reply.member_id.clone(),
        learner: learner.clone(),
        quality,
        in_flight: Default::default(),
        waiting: Default::default(),
        scored: Default::default(),
        latency_ms: Mutex::new(0.0),
        limit: tokio::sync::Semaphore::new(job.cluster.ingest_queue),
        job,
    });
    tracing::info!(member = %reply.member_id, %address, "reward worker serving");
    let page_worker = Arc::clone(&worker);
    let render: Render = Arc::new(move || metrics_page(&page_worker));
    http::start_configured(
        args.metrics_listen,
        "metrics.member_prometheus_addr",
        worker.job.metrics.member_prometheus_addr.clone(),
        render,
    )
    .await?;
    let service = InterceptedService::new(
        RewardServer::new(RewardService(Arc::clone(&worker)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        require_token(token),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let beat_worker = Arc::clone(&worker);
    tokio::spawn(async move {
        let every = Duration::from_secs_f64(beat_worker.job.cluster.heartbeat_seconds);
        let mut silent_since: Option<std::time::Instant> = None;
        // Groups scored over the last SCORED_RATE_WINDOW: (when, count) samples.
        let mut window = VecDeque::from([(std::time::Instant::now(), 0u64)]);
        loop {
            tokio::time::sleep(every).await;
            let now = std::time::Instant::now();
            let scored = beat_worker.scored.load(Ordering::Relaxed);
            window.push_back((now, scored));
            while window.len() > 2 && now.duration_since(window[1].0) >= SCORED_RATE_WINDOW {
                window.pop_front();
            }
            let (since, before) = window[0];
            let scored_per_s =
                (scored - before) as f64 / now.duration_since(since).as_secs_f64().max(1e-9);
            let mut metrics = beat_worker.metrics();
            metrics.scored_per_s = scored_per_s;
            let request = HeartbeatRequest {
                member_id: beat_worker.member.clone(),
                version: 0,
                metrics: Some(MemberMetrics::Reward(metrics)),
                ..HeartbeatRequest::default()
            };
            match learner.heartbeat(request).await {
                Ok(reply) if reply.get_ref().shutdown => break,
                Ok(_) => silent_since = None,
                Err(status) => {
                    tracing::warn!("heartbeat failed: {}", status.message());
                    let since = *silent_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > every * LEARNER_SILENCE_HEARTBEATS {
                        tracing::warn!("the learner is gone: stopping");
                        break;
                    }
                }
            }
        }
        let _ = stop_tx.send(());
    });
    rpc::server()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stop_rx.await;
            },
        )
        .await
        .context("reward server")?;
    tracing::info!("reward worker finished");
    Ok(())
}

/// The worker's own `/metrics` page: latency, queue, groups in progress and scored.
fn metrics_page(worker: &RewardWorker) -> String {
    let labels = [("role", "reward"), ("member", worker.member.as_str())];
    let mut families: Vec<Family> = worker
        .metrics()
        .gauges()
        .iter()
        .filter(|g| g.name != "scored_per_s")
        .map(|g| Family::gauge(&format!("quill_reward_{}", g.name), g.help).with(&labels, g.value))
        .collect();
    families.push(
        Family::counter(
            "quill_reward_scored_groups_total",
            "Groups scored and answered.",
        )
        .with(&labels, worker.scored.load(Ordering::Relaxed) as f64),
    );
    render_prometheus(&families)
}
