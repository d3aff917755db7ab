//! The learner process (rank 0): the trainer thread, the hub's gRPC server on the job's
//! address, eviction of silent members, and the periodic throughput line.

use crate::data::{self, Dataset};
use crate::hub::leases::Ledger;
use crate::hub::{Hub, LearnerService};
use crate::process::error::RunError;
use crate::process::train_loop::{trainer_main, Boot};
use quill_config::job::JobConfig;
use quill_proto::auth;
use quill_proto::learner_server::LearnerServer;
use quill_proto::rpc;
use quill_proto::status::StatusDocument;
use quill_proto::Role;
use quill_telemetry::http::{self, Render};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Heartbeat periods of silence after which a member's leases go back in line.
pub const EVICT_AFTER_HEARTBEATS: u32 = 5;

/// How this learner process was started.
#[derive(Debug, Clone, Default)]
pub struct LearnerOptions {
    /// Continue from the latest checkpoint under the job's output directory.
    pub resume: bool,
    /// Overrides `cluster.learner_addr` (port 0 picks a free port).
    pub listen: Option<String>,
    /// Learner ranks in the job (data parallelism); 0 or 1 for a single learner.
    pub world_size: usize,
    /// Overrides `metrics.prometheus_addr`: where to serve Prometheus `GET /metrics`.
    pub metrics_listen: Option<String>,
}

/// The file the learner writes its bound address into (for launchers and tests).
pub fn address_file(job: &JobConfig) -> PathBuf {
    job.job.output_dir.join("learner.addr")
}

/// Runs rank 0 until training ends; returns after members were told to stop.
pub fn run(job: JobConfig, options: LearnerOptions) -> Result<(), RunError> {
    let token = auth::load_token(job.job.token_file.as_deref())?;
    let prompts = data::load_prompts(&job.data)?;
    std::fs::create_dir_all(&job.job.output_dir)
        .map_err(|e| RunError::Io(job.job.output_dir.display().to_string(), e))?;
    if !options.resume {
        prepare_fresh_start(&job)?;
    }
    let (ingest_tx, ingest_rx) = mpsc::channel(job.cluster.ingest_queue.max(1));
    let (boot_tx, boot_rx) = std::sync::mpsc::channel();
    let (hub_tx, hub_rx) = std::sync::mpsc::channel();
    let trainer_job = job.clone();
    let trainer = std::thread::Builder::new()
        .name("quill-trainer".into())
        .spawn({
            let token = token.clone();
            move || {
                trainer_main(
                    trainer_job,
                    token,
                    options.resume,
                    boot_tx,
                    hub_rx,
                    ingest_rx,
                )
            }
        })
        .map_err(|e| RunError::Io("<trainer thread>".into(), e))?;
    let boot: Boot = match boot_rx.recv() {
        Ok(result) => result?,
        Err(_) => {
            return Err(join(trainer)
                .err()
                .unwrap_or(RunError::Startup("trainer thread exited".into())))
        }
    };
    let max_request_bytes = rpc::group_request_bytes(
        job.sampling.group_size,
        job.sampling.max_new_tokens,
        boot.info.context,
    );
    let mut dataset = Dataset::new(prompts, job.job.seed, job.data.shuffle, job.data.epochs);
    dataset.restore(boot.data.cursor);
    let mut ledger = Ledger::starting_at(boot.data.last_lease)
        .with_max_life(Duration::from_secs(job.cluster.max_lease_seconds));
    ledger.requeue(boot.data.outstanding.iter().copied());
    let hub = Arc::new(
        Hub::new(
            job.clone(),
            boot.info,
            boot.tokenizer,
            dataset,
            ledger,
            boot.weights,
            ingest_tx,
        )
        .with_ranks(options.world_size.max(1)),
    );
    let runtime =
        tokio::runtime::Runtime::new().map_err(|e| RunError::Io("<tokio runtime>".into(), e))?;
    let listen = options
        .listen
        .unwrap_or_else(|| job.cluster.learner_addr.clone());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&listen))
        .map_err(|e| RunError::Server(format!("cannot listen on {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| RunError::Server(e.to_string()))?;
    let addr_file = address_file(&job);
    std::fs::write(&addr_file, bound.to_string())
        .map_err(|e| RunError::Io(addr_file.display().to_string(), e))?;
    tracing::info!(address = %bound, "learner listening");
    let page_hub = Arc::clone(&hub);
    let render: Render = Arc::new(move || crate::prometheus::render(&page_hub));
    runtime
        .block_on(http::start_configured(
            options.metrics_listen.clone(),
            "metrics.prometheus_addr",
            job.metrics.prometheus_addr.clone(),
            render,
            http::Access::new(&token, job.metrics.require_token),
        ))
        .map_err(|e| RunError::Server(e.to_string()))?;
    hub_tx
        .send(Arc::clone(&hub))
        .map_err(|_| RunError::Startup("the trainer thread stopped".into()))?;

    let heartbeat = Duration::from_secs_f64(job.cluster.heartbeat_seconds);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(rpc::serve(
        listener,
        token,
        LearnerServer::new(LearnerService(Arc::clone(&hub))),
        max_request_bytes,
        job.cluster.idle_connection(),
        async {
            let _ = stop_rx.await;
        },
    ));
    let ticker_hub = Arc::clone(&hub);
    let log_every = Duration::from_secs_f64(job.metrics.log_every_seconds);
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(heartbeat);
        let mut last_log = tokio::time::Instant::now();
        loop {
            ticks.tick().await;
            for gone in ticker_hub.evict_silent(heartbeat * EVICT_AFTER_HEARTBEATS) {
                tracing::warn!(member = %gone, "no heartbeat: removed, its leases go back in line");
            }
            if last_log.elapsed() >= log_every {
                last_log = tokio::time::Instant::now();
                if let Some(line) = throughput_line(&ticker_hub.status_document()) {
                    println!("{line}");
                }
            }
        }
    });
    let trained = join(trainer);
    hub.finish();
    let end = hub.status_document();
    tracing::info!(
        "job over: {} leases open, {} expired, {} given back; {} groups accepted",
        end.leases_active,
        end.leases_expired,
        end.leases_released,
        end.accepted_groups
    );
    // Let members see `shutdown` in their next heartbeat before the server goes away.
    runtime.block_on(async { tokio::time::sleep(heartbeat * 2).await });
    let _ = stop_tx.send(());
    let closed = runtime.block_on(async { tokio::time::timeout(SHUTDOWN_GRACE, server).await });
    if closed.is_err() {
        tracing::warn!(
            "connections still open {SHUTDOWN_GRACE:?} after the server stopped (a stopped \
             peer?): closing them"
        );
    }
    trained
}

/// How long the server waits at the end for its connections' calls to finish; a peer
/// stopped with SIGSTOP would otherwise hold it until keepalive gives up on it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A fresh (not resumed) job must not mix with an earlier one in the same directory: its
/// checkpoints would be taken for this job's, so they are refused; old metrics are replaced.
fn prepare_fresh_start(job: &JobConfig) -> Result<(), RunError> {
    let root = job.job.output_dir.join("checkpoints");
    if let Some(found) = crate::train::checkpoint::latest_checkpoint(&root) {
        return Err(RunError::Startup(format!(
            "{} already holds checkpoints ({}): pass --resume to continue that job, or use another job.output_dir",
            job.job.output_dir.display(),
            found.display()
        )));
    }
    let metrics = job.job.output_dir.join(&job.metrics.jsonl);
    match std::fs::remove_file(&metrics) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(RunError::Io(metrics.display().to_string(), e))
        }
        _ => Ok(()),
    }
}

fn join(handle: std::thread::JoinHandle<Result<(), RunError>>) -> Result<(), RunError> {
    handle
        .join()
        .unwrap_or_else(|_| Err(RunError::Startup("the trainer thread panicked".into())))
}

/// The human-readable throughput line of a status document: cluster totals (live actors
/// and reward workers, generated tokens/s summed over actors, trained tokens/s summed over
/// learner ranks, the ingest queue) and live per-actor rates from heartbeats; from the
/// latest step, where its time went, the trainer's idle share and which side is the
/// bottleneck, and the waste so far (groups generated, trained and refused by reason,
/// the share of generated tokens thrown away); none before the first step.
pub fn throughput_line(doc: &StatusDocument) -> Option<String> {
    let step = doc.step.as_ref()?;
    let totals = &doc.totals;
    let actors = doc
        .members
        .iter()
        .filter_map(|m| m.reported.actor())
        .map(|m| format!("{:.0}", m.tokens_per_s))
        .collect::<Vec<_>>()
        .join(", ");
    let rewards: Vec<f64> = doc
        .members
        .iter()
        .filter_map(|m| Some(m.reported.reward()?.latency_ms))
        .collect();
    let lag = doc
        .members
        .iter()
        .filter(|m| m.reported.role() == Role::Actor)
        .map(|m| doc.version.saturating_sub(m.version))
        .max()
        .unwrap_or(0);
    let refused = if doc.rejected.is_empty() {
        "none".to_owned()
    } else {
        doc.rejected
            .iter()
            .map(|(reason, n)| format!("{} {n}", reason.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(format!(
        "step {}/{} v{} | {:.2} groups/s | time {:.2} s: wait {:.2}, fwd/bwd {:.2}, optimiser {:.2}, publish {:.3}, idle {:.0}% ({}-bound) | waste: {} generated, {} trained, refused {refused}, {:.1}% of tokens discarded, {:.1}% stale | entropy {:.2} | cluster: {} actors gen {:.0} tok/s, {} ranks train {:.0} tok/s, {} reward workers, queue {}/{} | per actor tok/s: {actors} (max lag {lag}) | reward {:.0} ms | step {:.2} s | staleness {:.2} | weights {:.2} s {:.0} MB/s | reward {:.3} in-range {:.0}% words {:.0}",
        step.step, step.steps_total, doc.version, step.rollout_groups_per_s,
        step.wait_seconds + step.step_seconds + step.publish_seconds + step.checkpoint_seconds,
        step.wait_seconds, step.forward_backward_seconds, step.optimizer_seconds,
        step.publish_seconds, 100.0 * step.idle_share, step.bottleneck,
        step.generated_groups_total, step.trained_groups_total,
        100.0 * step.discarded_token_share, 100.0 * step.stale_share, step.entropy,
        totals.actors, totals.generated_tokens_per_s, totals.ranks, totals.trained_tokens_per_s,
        totals.reward_workers, totals.queue_depth, totals.queue_capacity,
        rewards.iter().sum::<f64>() / rewards.len().max(1) as f64, step.step_seconds,
        step.staleness_mean, step.weight_sync_seconds, step.weight_sync_mb_per_s,
        step.reward_mean, 100.0 * step.in_range_share, step.response_words_mean,
    ))
}
