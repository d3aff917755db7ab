//! A learner rank > 0: joins rank 0 over gRPC, forms the collective group, receives rank
//! 0's weights and optimizer state, then takes every step on the shard rank 0 hands it,
//! summing gradients with the other ranks (with sharding: its optimiser shard, which it
//! loads from and writes into the checkpoints as rank 0 does). It exits when rank 0 says training is over,
//! and fails with a clear error when rank 0 or another rank goes away.

use crate::process::error::RunError;
use crate::process::group;
use crate::process::rank_metrics::RankMeter;
use crate::process::train_loop::{load_models, trainer_config};
use crate::train::checkpoint::{self, ShardSnapshot};
use crate::train::trainer::Trainer;
use quill_config::job::JobConfig;
use quill_proto::rpc;
use quill_proto::{JoinRankRequest, ShardRequest};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How a learner rank > 0 was started.
#[derive(Debug, Clone)]
pub struct RankOptions {
    /// This rank (1 ..= world_size - 1).
    pub rank: usize,
    /// The number of learner ranks.
    pub world_size: usize,
    /// Rank 0's gRPC address, `HOST:PORT`.
    pub learner: String,
    /// The job token.
    pub token: String,
    /// Overrides the job's `model.device` on this rank (e.g. `cuda:1`).
    pub device: Option<String>,
    /// A name for logs (host, pid).
    pub name: String,
    /// How long to keep trying to reach rank 0.
    pub connect_timeout: Duration,
}

/// Runs rank `options.rank` until rank 0 finishes training.
pub fn run_rank(options: RankOptions) -> Result<(), RunError> {
    let rank0 = options.learner.clone();
    let gone = move |what: &str, detail: String| {
        RunError::Server(format!("rank 0 at {rank0}: {what}: {detail}"))
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Io("<tokio runtime>".into(), e))?;
    let listener = group::ring_listener(group::route_to(&options.learner)?)?;
    let port = listener
        .local_addr()
        .map_err(|e| RunError::Io("<collective listener>".into(), e))?
        .port();
    let channel = runtime
        .block_on(connect(&options.learner, options.connect_timeout))
        .map_err(|e| gone("cannot connect", e))?;
    let mut client = rpc::learner_client(channel.clone(), &options.token);
    tracing::info!(rank = options.rank, learner = %options.learner, "joining the learner ranks");
    let reply = runtime
        .block_on(client.join_rank(JoinRankRequest {
            rank: options.rank as u32,
            world_size: options.world_size as u32,
            ring_port: u32::from(port),
            name: options.name.clone(),
        }))
        .map_err(|s| gone("join refused", s.message().to_owned()))?
        .into_inner();
    let mut client = rpc::learner_client_in_session(channel, &options.token, &reply.session);
    let mut job: JobConfig = serde_json::from_str(&reply.job_json)
        .map_err(|e| RunError::Startup(format!("rank 0 sent an unreadable job: {e}")))?;
    if let Some(device) = &options.device {
        job.model.device = device.clone();
    }
    let (model, reference, _) = load_models(&job)?;
    let device = model.device();
    let mut trainer = Trainer::new(model, reference, trainer_config(&job))?;
    let membership = group::Membership {
        backend: reply.backend(),
        addresses: &reply.ring_addresses,
        nccl_id: &reply.nccl_id,
        token: &options.token,
    };
    let sync = group::connect(&job, options.rank, membership, listener, device)?;
    trainer.attach(sync)?;
    let root = job.job.output_dir.join("checkpoints");
    checkpoint::load_shard(&root, &mut trainer)?;
    // Under ZeRO-3 rank 0 gathers the layers' weights to publish them and for its
    // checkpoints' model folder; this rank takes part at the same points.
    let gathers = trainer.shards_weights();
    let publish_kind = quill_model::device::parse_dtype(&job.checkpoint.publish_dtype)?;
    let follow_gather = |trainer: &mut Trainer, kind: tch::Kind| -> Result<(), RunError> {
        if gathers {
            trainer.full_weights(kind)?;
        }
        Ok(())
    };
    let save_shard = |trainer: &mut Trainer| -> Result<(), RunError> {
        follow_gather(trainer, trainer.model().kind())?;
        if let Some(shard) = ShardSnapshot::take(trainer) {
            shard.write(&root)?;
        }
        Ok(())
    };
    tracing::info!(
        rank = options.rank,
        step = trainer.progress().step,
        "in the group; rank 0's state received"
    );
    let every = job.parallel.check_every_steps;
    let timeout = job.parallel.timeout();
    let meter = RankMeter::new(&job, &trainer);
    let mut metrics = None;
    loop {
        let waited = Instant::now();
        let step = trainer.progress().step + 1;
        let samples = loop {
            let mut request = tonic::Request::new(ShardRequest {
                rank: options.rank as u32,
                step,
                metrics: metrics.clone(),
            });
            request.set_timeout(timeout);
            let reply = runtime
                .block_on(client.get_shard(request))
                .map_err(|s| gone("lost", s.message().to_owned()))?
                .into_inner();
            if reply.finished {
                tracing::info!(rank = options.rank, "rank 0 finished training");
                return save_shard(&mut trainer);
            }
            if reply.ready {
                break reply.samples;
            }
        };
        let wait_seconds = waited.elapsed().as_secs_f64();
        let (shard, weights) = group::from_wire(samples);
        let stats = trainer.step_shard(&shard, &weights)?;
        if every > 0 && trainer.progress().step % every == 0 {
            trainer.check_ranks()?;
        }
        if !stats.skipped {
            follow_gather(&mut trainer, publish_kind)?;
        }
        let saving = job.checkpoint.every_steps;
        if saving > 0 && trainer.progress().step % saving == 0 {
            save_shard(&mut trainer)?;
        }
        metrics = Some(meter.metrics(
            options.rank as u32,
            stats.seconds,
            stats.shard_tokens,
            wait_seconds,
            0.0,
        ));
    }
}

async fn connect(addr: &str, timeout: Duration) -> Result<Channel, String> {
    // Calls wait for other ranks and for batches, so only connecting is bounded here.
    let endpoint =
        rpc::endpoint(addr, Duration::from_secs(30))?.timeout(Duration::from_secs(24 * 3600));
    rpc::connect_retrying(&endpoint, timeout, Duration::from_millis(250))
        .await
        .map_err(|e| e.to_string())
}
