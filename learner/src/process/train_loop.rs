//! The trainer thread of rank 0: loads the policy (every tensor stays on this thread),
//! restores the latest checkpoint when resuming, then turns accepted groups into GRPO
//! steps, publishing each new version's weights to the hub and checkpointing as asked.

use crate::data::Cursor;
use crate::hub::{Accepted, Hub, JobInfo};
use crate::parallel::collective::{nccl_unique_id, Backend};
use crate::parallel::ranks::GroupSetup;
use crate::process::batcher::{Batch, Batcher};
use crate::process::error::RunError;
use crate::process::group;
use crate::process::offload::Offload;
use crate::process::rank_metrics::RankMeter;
use crate::process::stop;
use crate::train::checkpoint::{self, Snapshot};
use crate::train::sample::validate_batch;
use crate::train::schedule::LrSchedule;
use crate::train::shard::Sharding;
use crate::train::trainer::{StepStats, Trainer, TrainerConfig};
use crate::{AdamWConfig, GrpoConfig, MemoryConfig};
use crate::{LearnerError, TrainerState};
use quill_config::job::{self, JobConfig};
use quill_model::device::{parse_device, parse_dtype};
use quill_model::{default_model, load_pretrained, Qwen2, Tokenizer};
use quill_proto::blob::WeightBlob;
use quill_proto::status::{Rejection, RejectionCounts, StepMetrics, StepRecord};
use quill_telemetry::{MetricsWriter, Record};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// What the trainer thread hands the hub once the model is loaded.
pub struct Boot {
    /// Registration data for members.
    pub info: JobInfo,
    /// The tokenizer (for leasing prompts).
    pub tokenizer: Tokenizer,
    /// The weights of the current version.
    pub weights: Arc<WeightBlob>,
    /// Data state restored from a checkpoint.
    pub data: DataState,
}

/// The learner's own part of a checkpoint's trainer state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataState {
    /// Where the dataset stood.
    pub cursor: Cursor,
    /// Prompts not yet trained at checkpoint time: leased, waiting for re-issue, or
    /// ingested and untrained (all leased again after a resume).
    pub outstanding: Vec<u64>,
    /// The last lease id issued (new ids continue after it).
    pub last_lease: u64,
}

/// The trainer config a job asks for.
pub fn trainer_config(job: &JobConfig) -> TrainerConfig {
    let grpo = &job.grpo;
    let opt = &job.optimizer;
    let schedule = match opt.schedule {
        job::LrSchedule::Constant => LrSchedule::WarmupConstant {
            warmup_steps: opt.warmup_steps,
        },
        job::LrSchedule::Cosine => LrSchedule::Cosine {
            warmup_steps: opt.warmup_steps,
            total_steps: grpo.steps,
            min_lr: opt.min_lr,
        },
    };
    TrainerConfig {
        grpo: GrpoConfig {
            eps_low: grpo.eps_low,
            eps_high: grpo.eps_high,
            aggregation: grpo.loss_aggregation,
            kl_coef: grpo.kl_coef,
            kl_estimator: grpo.kl_estimator,
            tis_cap: grpo.tis_cap,
            temperature: if job.sampling.temperature > 0.0 {
                job.sampling.temperature
            } else {
                1.0
            },
        },
        optimizer: AdamWConfig {
            lr: opt.lr,
            beta1: opt.betas[0],
            beta2: opt.betas[1],
            eps: opt.eps,
            weight_decay: opt.weight_decay,
            max_grad_norm: (opt.max_grad_norm > 0.0).then_some(opt.max_grad_norm),
            schedule,
        },
        micro_batch_tokens: grpo.micro_batch_tokens,
        memory: MemoryConfig {
            logprob_chunk_tokens: grpo.logprob_chunk_tokens,
            activation_checkpointing: grpo.activation_checkpointing,
            packing: grpo.packing,
        },
        precision: grpo.precision,
        max_consecutive_bad_steps: opt.max_consecutive_bad_steps,
        sharding: match grpo.sharding {
            job::Sharding::None => Sharding::None,
            job::Sharding::Zero1 => Sharding::Zero1,
            job::Sharding::Zero2 => Sharding::Zero2,
            job::Sharding::Zero3 => Sharding::Zero3,
        },
    }
}

fn tokenizer_json(job: &JobConfig) -> Result<String, RunError> {
    if job.model.path == default_model::NAME {
        return Ok(default_model::tokenizer_json());
    }
    let path = PathBuf::from(&job.model.path).join("tokenizer.json");
    std::fs::read_to_string(&path).map_err(|e| RunError::Io(path.display().to_string(), e))
}

/// Loads the policy a job trains (f32 master weights), its frozen reference when the KL
/// term needs one, and the tokenizer.
pub(crate) fn load_models(job: &JobConfig) -> Result<(Qwen2, Option<Qwen2>, Tokenizer), RunError> {
    let device = parse_device(&job.model.device)?;
    let kind = parse_dtype(&job.model.dtype)?;
    if kind != tch::Kind::Float {
        tracing::info!(
            "the learner trains an f32 master copy; {} applies to published weights",
            job.model.dtype
        );
    }
    let (model, tokenizer) = load_pretrained(&job.model.path, device, tch::Kind::Float)?;
    let reference = if job.grpo.kl_coef > 0.0 {
        let path = job
            .model
            .reference_path
            .as_deref()
            .unwrap_or(&job.model.path);
        Some(load_pretrained(path, device, tch::Kind::Float)?.0)
    } else {
        None
    };
    Ok((model, reference, tokenizer))
}

/// Makes rank 0's trainer the root of the data-parallel group: waits for every other
/// rank to join, fixes the group (addresses, backend, NCCL id), connects, and copies its
/// state to the others; ring ranks prove themselves with the job `token`. A failure is
/// also reported to the ranks waiting to join.
fn form_group(
    job: &JobConfig,
    hub: &Hub,
    trainer: &mut Trainer,
    token: &str,
) -> Result<(), RunError> {
    let formed = (|| {
        let (host, mut addresses) = hub
            .ranks
            .wait_for_ranks(job.parallel.timeout())
            .map_err(RunError::Startup)?;
        let listener = group::ring_listener(host)?;
        let port = listener
            .local_addr()
            .map_err(|e| RunError::Io("<collective listener>".into(), e))?
            .port();
        addresses[0] = std::net::SocketAddr::new(host, port).to_string();
        let device = trainer.model().device();
        let backend = group::backend(job, device);
        let nccl_id = if backend == Backend::Nccl {
            nccl_unique_id().map_err(LearnerError::from)?
        } else {
            Vec::new()
        };
        hub.ranks.set_setup(GroupSetup {
            addresses: addresses.clone(),
            backend,
            nccl_id: nccl_id.clone(),
        });
        let membership = group::Membership {
            backend,
            addresses: &addresses,
            nccl_id: &nccl_id,
            token,
        };
        let sync = group::connect(job, 0, membership, listener, device)?;
        trainer.attach(sync)?;
        tracing::info!(
            ranks = addresses.len(),
            backend = backend.as_str_name(),
            "learner ranks formed a group"
        );
        Ok::<_, RunError>(())
    })();
    if let Err(e) = &formed {
        hub.ranks
            .fail(format!("rank 0 could not form the group: {e}"));
    }
    formed
}

/// Runs the trainer thread until the job's steps are done or the data runs out; `token`
/// is the job token (for the learner ranks' ring).
pub fn trainer_main(
    job: JobConfig,
    token: String,
    resume: bool,
    boot: std::sync::mpsc::Sender<Result<Boot, RunError>>,
    hub: std::sync::mpsc::Receiver<Arc<Hub>>,
    ingest: mpsc::Receiver<Accepted>,
) -> Result<(), RunError> {
    let (model, reference, tokenizer) = match load_models(&job) {
        Ok(parts) => parts,
        Err(e) => {
            let message = e.to_string();
            let _ = boot.send(Err(e));
            return Err(RunError::Startup(message));
        }
    };
    let tokenizer_text = tokenizer_json(&job)?;
    let info = JobInfo {
        job_json: serde_json::to_string(&job).expect("job configs serialise"),
        model_config_json: model.config().to_json("float32").to_string(),
        tokenizer_json: tokenizer_text.clone(),
        vocab_size: model.config().vocab_size,
        context: model.config().max_position_embeddings as usize,
    };
    let mut trainer = Trainer::new(model, reference, trainer_config(&job))?;
    let root = job.job.output_dir.join("checkpoints");
    let mut data = DataState::default();
    if resume {
        let read_data = |dir: &Path, state: &TrainerState| {
            serde_json::from_value::<DataState>(state.extra.clone()).map_err(|e| {
                LearnerError::state(
                    dir.join("trainer_state.json"),
                    format!(
                        "its data state is unreadable ({e}); resuming without it would \
                         train prompts twice or skip them"
                    ),
                )
            })
        };
        match checkpoint::load_newest(&root, &mut trainer, read_data)? {
            Some((dir, state, read)) => {
                data = read;
                tracing::info!(checkpoint = %dir.display(), step = state.progress.step, version = state.progress.version, "resumed");
            }
            None => tracing::info!(
                "--resume: no checkpoint under {}, starting fresh",
                root.display()
            ),
        }
    }
    let publish_kind = parse_dtype(&job.checkpoint.publish_dtype)?;
    let weights = publish(&mut trainer, publish_kind)?;
    boot.send(Ok(Boot {
        info,
        tokenizer,
        weights,
        data,
    }))
    .map_err(|_| RunError::Startup("the learner stopped during start-up".into()))?;
    let Ok(hub) = hub.recv() else {
        return Ok(());
    };
    let metrics = MetricsWriter::create(&job.job.output_dir.join(&job.metrics.jsonl))?;
    let tokenizer_files = [("tokenizer.json", tokenizer_text.as_bytes())];
    let snapshot = |trainer: &mut Trainer| -> Result<Snapshot, RunError> {
        let (cursor, outstanding, last_lease) = hub.data_state();
        let extra = serde_json::to_value(DataState {
            cursor,
            outstanding,
            last_lease,
        })
        .expect("serialises");
        Ok(Snapshot::take(trainer, &tokenizer_files, extra)?)
    };
    let keep = job.checkpoint.keep;
    let write = move |root: &Path, snapshot: Snapshot| -> Result<(), RunError> {
        snapshot.write(root)?;
        checkpoint::prune(root, keep)?;
        Ok(())
    };
    let world = hub.ranks.world_size();
    if world > 1 {
        form_group(&job, &hub, &mut trainer, &token)?;
        checkpoint::load_shard(&root, &mut trainer)?;
    }
    let mut checkpoints = {
        let root = root.clone();
        Offload::spawn("checkpoints", move |s| write(&root, s))
    };
    let trained = train(
        &job,
        &hub,
        ingest,
        &mut trainer,
        &metrics,
        &mut checkpoints,
        &snapshot,
    );
    hub.ranks.finish();
    trained?;
    checkpoints.finish()?;
    write(&root, snapshot(&mut trainer)?)?;
    hub.finish();
    Ok(())
}

/// The training loop of rank 0: batches from the batcher thread, one step each (sharded
/// over the learner ranks), weights handed to the publisher thread, records written,
/// checkpoints handed to the checkpoint thread. Every group of a step stays in the
/// pipeline (admission counts it) until its step's weights are published.
fn train(
    job: &JobConfig,
    hub: &Arc<Hub>,
    ingest: mpsc::Receiver<Accepted>,
    trainer: &mut Trainer,
    metrics: &MetricsWriter,
    checkpoints: &mut Offload<Snapshot>,
    snapshot: &dyn Fn(&mut Trainer) -> Result<Snapshot, RunError>,
) -> Result<(), RunError> {
    let publish_kind = parse_dtype(&job.checkpoint.publish_dtype)?;
    let world = hub.ranks.world_size();
    let started = Instant::now();
    let meter = RankMeter::new(job, trainer);
    let batcher = Batcher::spawn(job, Arc::clone(hub), ingest, trainer.progress().version);
    let mut publisher = {
        let hub = Arc::clone(hub);
        Offload::spawn("publisher", move |p: Publication| {
            if let Some((version, tensors)) = p.weights {
                let blob = quill_model::weights::to_blob(version, &tensors)?;
                hub.publish(Arc::new(blob));
            }
            hub.retire(p.retire);
            Ok(())
        })
    };
    let mut ledger = WasteLedger::new(hub);
    let mut entropy = EntropyWatch::default();
    while trainer.progress().step < job.grpo.steps {
        let waited = Instant::now();
        let Some(mut batch) = batcher.next() else {
            if stop::requested() {
                tracing::warn!(
                    step = trainer.progress().step,
                    "asked to stop (SIGTERM or SIGINT): writing a final checkpoint"
                );
            } else {
                tracing::info!("no more prompts: training ends early");
            }
            break;
        };
        let wait_seconds = waited.elapsed().as_secs_f64();
        let samples = std::mem::take(&mut batch.samples);
        let stats = if world > 1 {
            validate_batch(&samples, trainer.model().config())?;
            let mut shards = group::split(samples, job.grpo.loss_aggregation, world).into_iter();
            let (own, own_weights) = shards.next().expect("one shard per rank");
            // Rank 0 trains its own shard in place; its slot in the table stays empty.
            let wire = std::iter::once(Vec::new())
                .chain(shards.map(|(samples, weights)| {
                    samples
                        .into_iter()
                        .zip(weights)
                        .map(|(s, w)| group::to_wire(s, w))
                        .collect()
                }))
                .collect();
            hub.ranks.publish(trainer.progress().step + 1, wire);
            trainer.step_shard(&own, &own_weights)?
        } else {
            trainer.step(&samples)?
        };
        let every = job.parallel.check_every_steps;
        let spread = if world > 1 && every > 0 && trainer.progress().step % every == 0 {
            Some(trainer.check_ranks()?)
        } else {
            None
        };
        entropy.observe(stats.step, stats.entropy);
        if stats.skipped {
            tracing::warn!(
                step = stats.step,
                in_a_row = stats.consecutive_bad_steps,
                "non-finite loss or gradient: the update was skipped"
            );
        }
        hub.trained(&batch.lease_ids);
        let publish_started = Instant::now();
        let weights = match stats.skipped {
            true => None,
            false => Some((stats.version, trainer.full_weights(publish_kind)?)),
        };
        publisher.send(Publication {
            weights,
            retire: batch.groups,
        })?;
        let publish_seconds = publish_started.elapsed().as_secs_f64();
        let checkpoint_started = Instant::now();
        let step = trainer.progress().step;
        if job.checkpoint.every_steps > 0 && step % job.checkpoint.every_steps == 0 {
            checkpoints.send(snapshot(trainer)?)?;
        }
        let checkpoint_seconds = checkpoint_started.elapsed().as_secs_f64();
        let ranked = meter.metrics(
            0,
            stats.seconds,
            stats.shard_tokens,
            wait_seconds,
            publish_seconds + checkpoint_seconds,
        );
        hub.set_rank_metrics(ranked.clone());
        let timing = Timing {
            wait_seconds,
            publish_seconds,
            checkpoint_seconds,
            elapsed: started.elapsed().as_secs_f64(),
        };
        let metrics_of_step = StepMetrics {
            rank_weight_spread: spread,
            idle_share: ranked.idle_share,
            bottleneck: if ranked.idle_share > BOTTLENECK_IDLE_SHARE {
                "actors"
            } else {
                "learner"
            }
            .to_owned(),
            mfu: ranked.mfu,
            ..step_metrics(job, hub, &stats, &batch, &timing, &mut ledger)
        };
        let record = StepRecord {
            version: stats.version,
            learner_ranks: world,
            rejected: ledger.rejected.clone(),
            metrics: metrics_of_step,
        };
        metrics.write(&step_line(&record))?;
        hub.set_step_record(record);
    }
    drop(batcher);
    publisher.finish()
}

/// Below this share of its first step's entropy the policy is taken to be collapsing.
const COLLAPSE_ENTROPY_SHARE: f64 = 0.3;

/// Warns once when the policy's entropy falls below [`COLLAPSE_ENTROPY_SHARE`] of the
/// first step's: a policy collapsing onto few answers gives groups of identical rewards
/// (zero advantage) and stops learning.
#[derive(Default)]
struct EntropyWatch {
    first: Option<f64>,
    warned: bool,
}

impl EntropyWatch {
    fn observe(&mut self, step: u64, entropy: f64) {
        if !entropy.is_finite() {
            return;
        }
        let first = *self.first.get_or_insert(entropy);
        if !self.warned && entropy < COLLAPSE_ENTROPY_SHARE * first {
            self.warned = true;
            tracing::warn!(
                step,
                entropy,
                first,
                "the policy's entropy fell below {:.0}% of the first step's: it may be \
                 collapsing onto few answers (watch the zero_advantage refusals; a \
                 lower learning rate counters it)",
                100.0 * COLLAPSE_ENTROPY_SHARE
            );
        }
    }
}

/// Above this idle share the trainer is waiting for the actors: they are the bottleneck.
const BOTTLENECK_IDLE_SHARE: f64 = 0.15;

/// A step's weights on their way to the hub, and the groups its publication retires.
struct Publication {
    weights: Option<(u64, Vec<(String, tch::Tensor)>)>,
    retire: usize,
}

fn publish(trainer: &mut Trainer, kind: tch::Kind) -> Result<Arc<WeightBlob>, RunError> {
    let version = trainer.progress().version;
    Ok(Arc::new(quill_model::weights::to_blob(
        version,
        &trainer.full_weights(kind)?,
    )?))
}

/// Where a step's wall time went besides the step itself.
struct Timing {
    wait_seconds: f64,
    publish_seconds: f64,
    checkpoint_seconds: f64,
    elapsed: f64,
}

/// The hub's waste counters as of the latest step, for per-step differences (its
/// `rejected` is also the step record's).
struct WasteLedger {
    rejected: RejectionCounts,
    generated: u64,
    trained: u64,
}

impl WasteLedger {
    fn new(hub: &Hub) -> Self {
        WasteLedger {
            rejected: hub.rejections.snapshot(),
            generated: hub.waste.totals().groups,
            trained: 0,
        }
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// What a step measured, from the trainer's statistics, the batch, the hub's waste
/// counters and the members' latest heartbeats (rank 0's own idle share, the bottleneck
/// and MFU are filled in by the caller).
fn step_metrics(
    job: &JobConfig,
    hub: &Hub,
    stats: &StepStats,
    batch: &Batch,
    timing: &Timing,
    ledger: &mut WasteLedger,
) -> StepMetrics {
    let column = |i: usize| mean(batch.rewards.iter().map(|r| r[i]));
    let per = |sum: f64, n: usize| if n > 0 { sum / n as f64 } else { 0.0 };
    let actors = hub.actor_metrics();
    let rewards = hub.reward_metrics();
    let rejected = hub.rejections.snapshot();
    let refused: RejectionCounts = rejected
        .iter()
        .map(|(&reason, &n)| {
            (
                reason,
                n - ledger.rejected.get(&reason).copied().unwrap_or(0),
            )
        })
        .filter(|&(_, n)| n > 0)
        .collect();
    let waste = hub.waste.totals();
    let stale: u64 = [Rejection::TooStale, Rejection::TooStaleAtTrain]
        .iter()
        .filter_map(|r| rejected.get(r))
        .sum();
    let generated_groups = waste.groups - ledger.generated;
    ledger.trained += batch.groups as u64;
    ledger.generated = waste.groups;
    ledger.rejected = rejected;
    StepMetrics {
        step: stats.step,
        steps_total: job.grpo.steps,
        elapsed_s: timing.elapsed,
        skipped: stats.skipped,
        loss: stats.loss,
        grad_norm: stats.grad_norm,
        lr: stats.lr,
        clip_fraction: stats.clip_fraction,
        mean_ratio: stats.mean_ratio,
        kl: stats.mean_kl,
        entropy: stats.entropy,
        groups: batch.groups,
        prompt_ids: batch.prompt_ids.clone(),
        groups_by_actor: batch.groups_by_actor.clone(),
        samples_scored: batch.rewards.len(),
        reward_mean: column(0),
        reward_length: column(1),
        reward_format: column(2),
        reward_quality: job.rewards.has_quality().then(|| column(3)),
        response_words_mean: mean(batch.words.iter().copied()),
        in_range_share: mean(batch.in_range.iter().map(|&b| f64::from(u8::from(b)))),
        staleness_mean: mean(batch.staleness.iter().copied()),
        trained_tokens: stats.tokens,
        step_seconds: stats.seconds,
        padding_share: stats.padding_share,
        forward_backward_seconds: stats.forward_backward_seconds,
        optimizer_seconds: stats.optimizer_seconds,
        wait_seconds: timing.wait_seconds,
        trained_tokens_per_s: stats.tokens as f64 / stats.seconds.max(1e-9),
        generated_tokens_per_s: actors.iter().map(|m| m.tokens_per_s).sum(),
        actors: actors.len(),
        rollout_groups_per_s: batch.groups as f64 / (timing.wait_seconds + stats.seconds).max(1e-9),
        generated_tokens: batch.generated_tokens,
        reward_latency_ms: per(rewards.iter().map(|m| m.latency_ms).sum(), rewards.len()),
        ingest_queue: hub.queue_depth(),
        ingest_capacity: job.cluster.ingest_queue,
        publish_seconds: timing.publish_seconds,
        checkpoint_seconds: timing.checkpoint_seconds,
        weight_sync_seconds: per(
            actors.iter().map(|m| m.weight_sync_seconds).sum(),
            actors.len(),
        ),
        weight_sync_mb_per_s: per(
            actors.iter().map(|m| m.weight_sync_mb_per_s).sum(),
            actors.len(),
        ),
        generated_groups,
        refused,
        generated_groups_total: waste.groups,
        trained_groups_total: ledger.trained,
        discarded_token_share: waste.discarded_share(),
        stale_share: stale as f64 / waste.groups.max(1) as f64,
        rank_weight_spread: None,
        idle_share: 0.0,
        bottleneck: String::new(),
        mfu: None,
    }
}

/// The step's line of `metrics.jsonl`: `kind` and `time`, then the record's fields.
fn step_line(record: &StepRecord) -> Record {
    let Value::Object(fields) = serde_json::to_value(record).expect("step records serialise")
    else {
        unreachable!("a struct serialises to a JSON object")
    };
    fields
        .into_iter()
        .fold(Record::new("step"), |line, (k, v)| line.with(&k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entropy_watch_warns_once_on_a_collapse() {
        let mut watch = EntropyWatch::default();
        watch.observe(1, f64::NAN);
        assert_eq!(watch.first, None, "a skipped step's entropy is no baseline");
        watch.observe(2, 7.0);
        watch.observe(3, 2.2);
        assert!(!watch.warned, "2.2 is above 30 % of 7");
        watch.observe(4, 2.0);
        assert!(watch.warned);
        assert_eq!(watch.first, Some(7.0));
    }
}
