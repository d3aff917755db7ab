//! `quill bench train`: quill's GRPO training step against a PyTorch loop (the same loss,
//! clipping and AdamW on the same model, batch and threads), and the optimiser, gradient
//! and weight bytes a rank holds with 1, 2, 4 … ranks (ZeRO-2 and ZeRO-3 above one rank:
//! quill's ranks run as threads of this process over a loopback ring, PyTorch's as FSDP2
//! processes over gloo).

use anyhow::{bail, Context};
use quill_learner::parallel::collective::RingCollective;
use quill_learner::train::grad_sync::GradSync;
use quill_learner::train::grpo::{token_weights, GrpoConfig};
use quill_learner::train::shard::bytes;
use quill_learner::{AdamWConfig, LossAggregation, Sharding, TrainSample, Trainer, TrainerConfig};
use quill_model::default_model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The PyTorch side, embedded in the binary.
const PEER_PY: &str = include_str!("train_peer.py");

/// Flags of `quill bench train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// CPU threads of each rank, for quill and PyTorch alike.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Learner ranks to measure, comma-separated; above 1 quill runs sharded ranks as
    /// threads over a loopback ring and PyTorch FSDP2 processes over gloo.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2, 4])]
    pub ranks: Vec<usize>,
    /// The sharding modes measured above one rank, comma-separated (a row each).
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = vec!["zero2".to_owned(), "zero3".to_owned()],
        value_parser = ["zero1", "zero2", "zero3"]
    )]
    pub sharding: Vec<String>,
    /// Samples in the global batch.
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Prompt tokens of each sample.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Response tokens of each sample (the trained tokens).
    #[arg(long, default_value_t = 96)]
    pub response_len: usize,
    /// Timed steps, after one warm-up step; the median is reported.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Times each configuration is measured, quill and PyTorch taking turns; the medians
    /// are compared (runs on a shared machine differ by ±15 %).
    #[arg(long, default_value_t = 3)]
    pub trials: usize,
    /// Python interpreter with torch and transformers (default: the project's venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

/// What one configuration measured.
struct Row {
    seconds_per_step: f64,
    /// AdamW state (and, sharded, the f32 master shard) of one rank.
    optimizer_bytes: u64,
    /// Gradient bytes one rank holds between steps.
    gradients_between: u64,
    /// Gradient bytes one rank holds during the backward pass.
    gradients_peak: u64,
    /// Weight bytes one rank holds between steps.
    weights_between: u64,
    /// Weight bytes one rank holds during a pass (ZeRO-3: one layer gathered).
    weights_peak: u64,
}

fn config(sharding: Sharding) -> TrainerConfig {
    TrainerConfig {
        grpo: GrpoConfig {
            temperature: 1.0,
            ..GrpoConfig::default()
        },
        optimizer: AdamWConfig::default(),
        micro_batch_tokens: usize::MAX / 2,
        sharding,
        ..TrainerConfig::default()
    }
}

/// The random batch both sides train on.
fn batch(args: &TrainArgs, vocab: i64) -> Vec<TrainSample> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    (0..args.samples)
        .map(|i| TrainSample {
            prompt: (0..args.prompt_len)
                .map(|_| rng.random_range(0..vocab))
                .collect(),
            response: (0..args.response_len)
                .map(|_| rng.random_range(0..vocab))
                .collect(),
            behaviour_logprobs: (0..args.response_len)
                .map(|_| -rng.random_range(5.0f32..9.0))
                .collect(),
            advantage: if i % 2 == 0 { 1.0 } else { -1.0 },
        })
        .collect()
}

/// The median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Times `steps` steps after a warm-up; the median seconds.
fn median_step(steps: usize, mut step: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    step()?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let started = Instant::now();
        step()?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn grad_bytes(trainer: &Trainer) -> u64 {
    trainer
        .optimizer()
        .params()
        .iter()
        .map(|p| bytes(&p.grad()))
        .sum()
}

fn param_bytes(trainer: &Trainer) -> u64 {
    trainer.optimizer().params().iter().map(bytes).sum()
}

/// One rank, unsharded.
fn quill_single(args: &TrainArgs, samples: &[TrainSample]) -> anyhow::Result<Row> {
    tch::set_num_threads(args.threads as i32);
    let (model, _) = default_model::load(tch::Device::Cpu, tch::Kind::Float)?;
    let mut trainer = Trainer::new(model, None, config(Sharding::None))?;
    let seconds_per_step = median_step(args.steps, || {
        trainer.step(samples)?;
        Ok(())
    })?;
    let optimizer_bytes = trainer
        .optimizer()
        .moments()
        .map(|(_, m, v)| bytes(m) + bytes(v))
        .sum();
    let gradients = grad_bytes(&trainer);
    let weights = param_bytes(&trainer);
    Ok(Row {
        seconds_per_step,
        optimizer_bytes,
        gradients_between: gradients,
        gradients_peak: gradients,
        weights_between: weights,
        weights_peak: weights,
    })
}

/// The bytes of one decoder layer's f32 weights (ZeRO-3 gathers one at a time).
fn layer_bytes(trainer: &Trainer) -> u64 {
    4 * quill_model::memory_plan::ModelSize::of(trainer.model().config()).layer_params
}

/// `world` ranks sharded as `sharding`, threads over a loopback ring; rank 0's figures.
fn quill_sharded(
    args: &TrainArgs,
    samples: &[TrainSample],
    world: usize,
    sharding: Sharding,
) -> anyhow::Result<Row> {
    let listeners = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let addresses = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let weights = token_weights(samples, LossAggregation::TokenMean);
    let rows = std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (addresses, weights) = (&addresses, &weights);
                scope.spawn(move || -> anyhow::Result<Row> {
                    tch::set_num_threads(args.threads as i32);
                    let ring = RingCollective::connect(
                        rank,
                        listener,
                        addresses,
                        Duration::from_secs(120),
                        b"bench",
                    )?;
                    let (model, _) = default_model::load(tch::Device::Cpu, tch::Kind::Float)?;
                    let mut trainer = Trainer::new(model, None, config(sharding))?;
                    trainer.attach(GradSync::new(Box::new(ring), 32 << 20))?;
                    let (shard, w): (Vec<TrainSample>, Vec<f64>) = samples
                        .iter()
                        .cloned()
                        .zip(weights.iter().copied())
                        .enumerate()
                        .filter(|(i, _)| i % world == rank)
                        .map(|(_, pair)| pair)
                        .unzip();
                    let seconds_per_step = median_step(args.steps, || {
                        trainer.step_shard(&shard, &w)?;
                        Ok(())
                    })?;
                    let state = trainer.shard().context("a sharded trainer holds a shard")?;
                    let shard_grad = bytes(state.grad());
                    // The full gradients of what a pass holds: every weight, or under
                    // ZeRO-3 the resident ones and the gathered layer's.
                    let gathered = match state.sharded_layers() {
                        0 => 0,
                        _ => layer_bytes(&trainer),
                    };
                    let held = param_bytes(&trainer);
                    Ok(Row {
                        seconds_per_step,
                        optimizer_bytes: state.optimizer_bytes(),
                        gradients_between: shard_grad + grad_bytes(&trainer),
                        gradients_peak: shard_grad + held + gathered,
                        weights_between: held,
                        weights_peak: held + gathered,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank thread does not panic"))
            .collect::<Vec<_>>()
    });
    rows.into_iter().next().context("no ranks")?
}

/// The PyTorch loop: seconds per step, peak RSS, optimiser and gradient bytes (per rank).
/// Above one rank, `world` FSDP2 processes over gloo; `reshard` frees each layer's
/// gathered weights after its forward pass (ZeRO-3), else they stay gathered (ZeRO-2).
fn peer(
    args: &TrainArgs,
    samples: &[TrainSample],
    opt: &AdamWConfig,
    world: usize,
    reshard: bool,
) -> anyhow::Result<[f64; 4]> {
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let model_dir = work.path().join("model");
    default_model::write_to(&model_dir, tch::Kind::Float)?;
    let script = work.path().join("train_peer.py");
    std::fs::write(&script, PEER_PY)?;
    let spec = json!({
        "grpo": {"temperature": 1.0, "eps_low": 0.2, "eps_high": 0.2},
        "optimizer": {
            "lr": opt.lr, "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps,
            "weight_decay": opt.weight_decay, "max_grad_norm": opt.max_grad_norm.unwrap_or(f64::MAX),
        },
        "samples": samples.iter().map(|s| json!({
            "prompt": s.prompt, "response": s.response,
            "behaviour_logprobs": s.behaviour_logprobs, "advantage": s.advantage,
        })).collect::<Vec<_>>(),
    });
    let batch = work.path().join("batch.json");
    std::fs::write(&batch, spec.to_string())?;
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| PathBuf::from(super::VENV_PYTHON));
    let out = Command::new(&python)
        .arg(&script)
        .arg("--model")
        .arg(&model_dir)
        .arg("--batch")
        .arg(&batch)
        .args(["--threads", &args.threads.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--world", &world.to_string()])
        .args(reshard.then_some("--reshard"))
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the PyTorch loop failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the PyTorch loop printed no JSON line")?;
    let field = |k: &str| {
        doc[k]
            .as_f64()
            .with_context(|| format!("no `{k}` from PyTorch"))
    };
    Ok([
        field("seconds_per_step")?,
        field("peak_rss_bytes")?,
        field("optimizer_bytes")?,
        field("gradient_bytes")?,
    ])
}

/// Peak resident memory of this process so far (`VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / (1u64 << 20) as f64)
}

/// Runs the benchmark and prints the table.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if [
        args.threads,
        args.samples,
        args.response_len,
        args.steps,
        args.trials,
    ]
    .contains(&0)
    {
        bail!("--threads, --samples, --response-len, --steps and --trials must be at least 1");
    }
    if let Some(k) = args.ranks.iter().find(|&&k| k == 0 || k > args.samples) {
        bail!(
            "--ranks: {k} is not between 1 and --samples ({})",
            args.samples
        );
    }
    let (model, _) = default_model::load(tch::Device::Cpu, tch::Kind::Float)?;
    let vocab = model.config().vocab_size;
    drop(model);
    let samples = batch(&args, vocab);
    let tokens = (args.samples * args.response_len) as f64;
    println!(
        "default model, {} samples of {}+{} tokens, {} threads per rank, median of {} steps, \
         median of {} trials",
        args.samples, args.prompt_len, args.response_len, args.threads, args.steps, args.trials
    );
    println!(
        "{:<6} {:<9} {:>12} {:>12} {:>6} {:>15} {:>15} {:>22} {:>22} {:>30} {:>18}",
        "ranks",
        "sharding",
        "quill tok/s",
        "torch tok/s",
        "ratio",
        "quill RSS MiB",
        "torch RSS MiB",
        "opt+grad/rank MiB",
        "… in backward MiB",
        "weights/rank MiB",
        "torch opt+grad MiB"
    );
    let mut runs = Vec::new();
    for &k in &args.ranks {
        match k {
            1 => runs.push((1, Sharding::None)),
            _ => {
                for name in &args.sharding {
                    let sharding = serde_json::from_value(json!(name))
                        .with_context(|| format!("--sharding: no mode {name:?}"))?;
                    runs.push((k, sharding));
                }
            }
        }
    }
    let mut one_rank = None;
    for (k, sharding) in runs {
        // quill and PyTorch take turns, `--trials` times each; the medians are compared.
        let reshard = sharding == Sharding::Zero3;
        let mut quill_times = Vec::with_capacity(args.trials);
        let mut peer_runs = Vec::with_capacity(args.trials);
        let mut last = None;
        for _ in 0..args.trials {
            let row = if k == 1 {
                quill_single(&args, &samples)?
            } else {
                quill_sharded(&args, &samples, k, sharding)?
            };
            quill_times.push(row.seconds_per_step);
            last = Some(row);
            peer_runs.push(peer(&args, &samples, &AdamWConfig::default(), k, reshard)?);
        }
        let row = Row {
            seconds_per_step: median(quill_times),
            ..last.context("at least one trial")?
        };
        let peer_seconds = median(peer_runs.iter().map(|r| r[0]).collect());
        let [_, peer_rss, peer_opt, peer_grad] = peer_runs
            .iter()
            .copied()
            .max_by(|a, b| a[1].total_cmp(&b[1]))
            .context("at least one trial")?;
        let between = (row.optimizer_bytes + row.gradients_between) as f64;
        let peak = (row.optimizer_bytes + row.gradients_peak) as f64;
        let (base, base_weights) = *one_rank.get_or_insert((between, row.weights_between as f64));
        let quill_tps = tokens / row.seconds_per_step;
        let tps = tokens / peer_seconds;
        let quill_rss = if k == 1 {
            peak_rss().map_or("-".into(), |b| mib(b as f64))
        } else {
            "-".into()
        };
        let weights = row.weights_between as f64;
        println!(
            "{k:<6} {:<9} {quill_tps:>12.1} {tps:>12.1} {:>6} {quill_rss:>15} {:>15} {:>22} {:>22} {:>30} {:>18}",
            sharding.name(),
            format!("{:.2}x", quill_tps / tps),
            mib(peer_rss),
            format!("{} ({:.2}x)", mib(between), between / base),
            format!("{} ({:.2}x)", mib(peak), peak / base),
            format!(
                "{} ({:.2}x), pass {}",
                mib(weights),
                weights / base_weights,
                mib(row.weights_peak as f64)
            ),
            mib(peer_opt + peer_grad),
        );
    }
    println!(
        "Above one rank quill's ranks are threads of one process (no per-rank RSS) and \
         PyTorch's are FSDP2 processes over gloo (reshard_after_forward for the zero3 rows; \
         torch RSS and opt+grad are the largest rank's, between steps). Weights are those \
         quill holds between steps, and during a pass (ZeRO-3 gathers one layer)."
    );
    Ok(())
}
