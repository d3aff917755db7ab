//! `quill bench …`: benchmarks that run quill and the peer it is compared with in one run.

mod rl;
mod train;
mod weights;

use crate::cli::model_args::ModelArgs;
use anyhow::{bail, Context};
use quill_actor::{Engine, EngineConfig, GenerationRequest, SamplingParams};
use quill_model::default_model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The reference script (transformers side of the benchmarks), embedded in the binary.
const REFERENCE_PY: &str = include_str!("../../../tests/reference/reference.py");
/// The project's virtual environment, made by `scripts/setup.sh`.
const VENV_PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");

/// Benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// Generation throughput of quill's engine vs transformers' generate() on the same
    /// checkpoint, batch and thread count, for fixed-length and long-tailed outputs.
    Generate(GenerateArgs),
    /// Raw loopback TCP bandwidth, then the time to deliver one weights version to 1, 2,
    /// 4, 8 actor processes through the relay tree (the actors' relay and fetch code).
    Weights(weights::WeightsArgs),
    /// A whole RL run: quill's async pipeline, quill's synchronous mode and TRL's
    /// GRPOTrainer on the same task, model, reward and thread budget; prints wall-clock,
    /// steps/s, samples/s, tokens/s, time to reward levels and one evaluator's scores.
    Rl(rl::RlArgs),
    /// quill's training step against a PyTorch loop (same GRPO loss, clipping and AdamW,
    /// model, batch and threads): tokens/s, peak memory, and the optimiser and gradient
    /// bytes per rank with 1, 2, 4 ranks (ZeRO-2 above one).
    Train(train::TrainArgs),
    /// One weights-only actor of `bench weights` (receives, relays, verifies).
    #[command(hide = true)]
    RelayNode(weights::NodeArgs),
}

/// Flags of `quill bench generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of requests (one sample each) per workload.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Sequences decoded together, by both systems.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// New tokens per request in the fixed workload, and of the long requests in the
    /// long-tailed one (whose other requests get a tenth of it).
    #[arg(long, default_value_t = 256)]
    pub new_tokens: usize,
    /// Every n-th request of the long-tailed workload is long.
    #[arg(long, default_value_t = 8)]
    pub long_every: usize,
    /// Prompt length in tokens (random ids).
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// Sampling temperature used by both systems.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Which workloads to run.
    #[arg(long, value_enum, default_value = "both")]
    pub workload: Workload,
    /// Python interpreter with torch and transformers (default: the project's venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Seed of the prompts and of sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Output-length mixes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Every request generates `--new-tokens`.
    Fixed,
    /// Most requests are short, every `--long-every`-th is ten times longer.
    LongTail,
    /// Both of the above.
    Both,
}

/// Runs a benchmark.
pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Generate(args) => generate(args),
        Bench::Weights(args) => weights::run(args),
        Bench::Rl(args) => rl::run(args),
        Bench::Train(args) => train::run(args),
        Bench::RelayNode(args) => weights::node(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.batch == 0 || args.new_tokens < 10 || args.long_every == 0 {
        bail!("--requests, --batch and --long-every must be positive and --new-tokens at least 10");
    }
    let threads = if args.model.threads > 0 {
        args.model.threads
    } else {
        tch::get_num_threads()
    };
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| PathBuf::from(VENV_PYTHON));
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let script = work.path().join("reference.py");
    std::fs::write(&script, REFERENCE_PY).context("writing the reference script")?;
    let model_dir = if args.model.model == default_model::NAME {
        let dir = work.path().join("default-model");
        default_model::write_to(&dir, tch::Kind::Float)?;
        dir
    } else {
        PathBuf::from(&args.model.model)
    };
    let (model, tokenizer) = args.model.load()?;
    let mut engine = Engine::new(
        model,
        tokenizer,
        &EngineConfig {
            max_batch: args.batch,
            initial_cache_len: (args.prompt_len + args.new_tokens) as i64,
            ..EngineConfig::default()
        },
    );
    let vocab = engine.model().config().vocab_size;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let prompts: Vec<Vec<i64>> = (0..args.requests)
        .map(|_| {
            (0..args.prompt_len)
                .map(|_| rng.random_range(0..vocab))
                .collect()
        })
        .collect();
    let workloads: &[Workload] = match args.workload {
        Workload::Both => &[Workload::Fixed, Workload::LongTail],
        Workload::Fixed => &[Workload::Fixed],
        Workload::LongTail => &[Workload::LongTail],
    };
    println!(
        "model {}, {} requests, batch {}, {} CPU threads, temperature {}",
        args.model.model, args.requests, args.batch, threads, args.temperature
    );
    println!(
        "{:<10} {:>8} {:>14} {:>20} {:>7}",
        "workload", "tokens", "quill tok/s", "transformers tok/s", "ratio"
    );
    for &workload in workloads {
        let lengths: Vec<usize> = (0..args.requests)
            .map(|i| match workload {
                Workload::LongTail if i % args.long_every != args.long_every - 1 => {
                    args.new_tokens / 10
                }
                _ => args.new_tokens,
            })
            .collect();
        let quill = time_quill(&mut engine, &prompts, &lengths, &args)?;
        let peer = time_transformers(
            &python, &script, &model_dir, &prompts, &lengths, &args, threads,
        )?;
        let name = if workload == Workload::Fixed {
            "fixed"
        } else {
            "long-tail"
        };
        let total: usize = lengths.iter().sum();
        println!(
            "{name:<10} {total:>8} {quill:>14.1} {peer:>20.1} {:>6.2}x",
            quill / peer
        );
    }
    Ok(())
}

fn time_quill(
    engine: &mut Engine,
    prompts: &[Vec<i64>],
    lengths: &[usize],
    args: &GenerateArgs,
) -> anyhow::Result<f64> {
    let (reply, answers) = crossbeam_channel::unbounded();
    let started = Instant::now();
    for (i, (prompt, &len)) in prompts.iter().zip(lengths).enumerate() {
        let request = GenerationRequest {
            id: i as u64,
            prompt: prompt.clone(),
            n: 1,
            params: SamplingParams {
                temperature: args.temperature,
                max_new_tokens: len,
                seed: args.seed + i as u64,
                ..SamplingParams::default()
            },
        };
        engine.submit(request, reply.clone());
    }
    engine.run_until_idle();
    let seconds = started.elapsed().as_secs_f64();
    drop(reply);
    let mut tokens = 0;
    for answer in answers {
        tokens += answer?
            .samples
            .iter()
            .map(|s| s.tokens.len())
            .sum::<usize>();
    }
    let expected: usize = lengths.iter().sum();
    if tokens != expected {
        bail!("quill generated {tokens} tokens, the workload asks for {expected}");
    }
    Ok(tokens as f64 / seconds)
}

fn time_transformers(
    python: &Path,
    script: &Path,
    model_dir: &Path,
    prompts: &[Vec<i64>],
    lengths: &[usize],
    args: &GenerateArgs,
    threads: i32,
) -> anyhow::Result<f64> {
    let requests = script.with_file_name("requests.json");
    std::fs::write(
        &requests,
        serde_json::json!({"prompts": prompts, "lengths": lengths}).to_string(),
    )?;
    let output = Command::new(python)
        .arg(script)
        .arg("bench-generate")
        .arg("--model")
        .arg(model_dir)
        .arg("--requests")
        .arg(&requests)
        .args(["--batch", &args.batch.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--temperature", &args.temperature.to_string()])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "the transformers benchmark failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("reading the transformers result `{line}`"))?;
    let tokens = result["tokens"].as_f64().unwrap_or(0.0);
    let seconds = result["seconds"].as_f64().unwrap_or(f64::INFINITY);
    Ok(tokens / seconds)
}
