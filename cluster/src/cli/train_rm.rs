//! `quill train-rm`: Bradley–Terry training of a reward model on preference pairs.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use quill_learner::parallel::collective::{Collective, RingCollective};
use quill_learner::process::stop;
use quill_learner::reward_model::{
    latest_checkpoint, load_pairs, load_reward_model, split_pairs, ModelSource, Outcome,
    PairFields, RmConfig, RmTrainer,
};
use quill_model::device::parse_device;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The example preference file shipped with quill (`configs/preferences-example.jsonl`).
const EXAMPLE: &str = include_str!("../../../configs/preferences-example.jsonl");

/// Flags of `quill train-rm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Preference pairs: a JSONL file with one {"prompt", "chosen", "rejected"} object per
    /// line, or `example` for the small example set shipped with quill.
    #[arg(long, default_value = "example")]
    pub data: String,
    /// The field holding the prompt.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// The field holding the preferred response.
    #[arg(long, default_value = "chosen")]
    pub chosen_field: String,
    /// The field holding the other response.
    #[arg(long, default_value = "rejected")]
    pub rejected_field: String,
    /// Starting model: a Hugging Face folder or `default` (the embedded tiny model). A
    /// causal LM gets a new score head; a one-label sequence-classification model is
    /// trained further.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Output folder: checkpoints/step-N (resumable), metrics.jsonl (per epoch) and final/
    /// (the trained Qwen2ForSequenceClassification model with its tokenizer).
    #[arg(long, default_value = "reward-model")]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out (same data and flags).
    #[arg(long)]
    pub resume: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Passes over the training pairs.
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Pairs per forward pass on one rank.
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Micro-batches whose gradients add up to one update on each rank (an update takes
    /// micro-batch × accumulation × ranks pairs).
    #[arg(long, default_value_t = 1)]
    pub accumulation: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Learning rate reached at the end of the cosine decay.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// Updates of linear warm-up before the cosine decay.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the total gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Tokens kept of each `prompt + "\n\n" + response` text (the start is kept).
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Share of the pairs held out to measure accuracy and loss after each epoch.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Seed of the held-out split, the data order and a new score head.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many updates (0: at the end of each epoch only).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Checkpoints kept in --out/checkpoints.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Data-parallel ranks: every rank's listen address, comma-separated
    /// (host:port,host:port,...); start one process per rank with the same list.
    #[arg(long, value_delimiter = ',')]
    pub ranks: Vec<String>,
    /// This process's rank in --ranks (0 writes checkpoints and the model; all ranks
    /// need the same --out on a shared file system to resume).
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// The shared secret the ranks prove themselves with when they connect (default: the
    /// QUILL_RING_KEY environment variable).
    #[arg(long)]
    pub ring_key: Option<String>,
    /// Seconds a rank waits for the others in a collective before failing.
    #[arg(long, default_value_t = 300)]
    pub collective_timeout_s: u64,
}

fn collective(args: &Args) -> anyhow::Result<Option<Box<dyn Collective>>> {
    if args.ranks.len() <= 1 {
        return Ok(None);
    }
    if args.rank >= args.ranks.len() {
        bail!(
            "--rank {} is outside the {} --ranks",
            args.rank,
            args.ranks.len()
        );
    }
    let key = args
        .ring_key
        .clone()
        .or_else(|| std::env::var("QUILL_RING_KEY").ok());
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        bail!("--ring-key (or QUILL_RING_KEY) is required with several --ranks");
    };
    let address = &args.ranks[args.rank];
    let listener = TcpListener::bind(address)
        .with_context(|| format!("--ranks: binding rank {}'s address {address}", args.rank))?;
    let ring = RingCollective::connect(
        args.rank,
        listener,
        &args.ranks,
        Duration::from_secs(args.collective_timeout_s),
        key.as_bytes(),
    )
    .context("--ranks: joining the other ranks")?;
    Ok(Some(Box::new(ring)))
}

fn read_pairs(args: &Args) -> anyhow::Result<Vec<quill_learner::reward_model::PreferencePair>> {
    let fields = PairFields {
        prompt: args.prompt_field.clone(),
        chosen: args.chosen_field.clone(),
        rejected: args.rejected_field.clone(),
    };
    if args.data == "example" {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("preferences-example.jsonl");
        std::fs::write(&path, EXAMPLE)?;
        return Ok(load_pairs(&path, &fields)?);
    }
    Ok(load_pairs(Path::new(&args.data), &fields)?)
}

/// Trains the reward model.
pub fn run(args: Args) -> anyhow::Result<()> {
    let pairs = read_pairs(&args).context("--data")?;
    let (train, eval) = split_pairs(pairs, args.eval_fraction, args.seed)?;
    let checkpoint = latest_checkpoint(&args.out);
    if checkpoint.is_some() && !args.resume {
        bail!(
            "--out {} already holds checkpoints: pass --resume to continue, or choose another --out",
            args.out.display()
        );
    }
    if args.resume && checkpoint.is_none() {
        bail!(
            "--resume: no checkpoint in {}",
            args.out.join("checkpoints").display()
        );
    }
    let device = parse_device(&args.device).context("--device")?;
    let (model, tokenizer, new_head) =
        load_reward_model(&args.model, device, args.seed).context("--model")?;
    let config = RmConfig {
        micro_batch: args.micro_batch,
        accumulation: args.accumulation,
        epochs: args.epochs,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        max_length: args.max_length,
        seed: args.seed,
        save_every: args.save_every,
        keep_checkpoints: args.keep_checkpoints,
    };
    let source = ModelSource::read(&args.model).context("--model")?;
    let collective = collective(&args)?;
    let root = collective.as_ref().is_none_or(|c| c.rank() == 0);
    let mut trainer = RmTrainer::new(model, &tokenizer, source, &train, &eval, config, collective)?;
    if let Some(dir) = &checkpoint {
        trainer.resume(dir)?;
        eprintln!(
            "resuming from {} (update {})",
            dir.display(),
            trainer.progress().step
        );
    }
    eprintln!(
        "{} training and {} held-out pairs, {} updates{}",
        train.len(),
        eval.len(),
        trainer.total_steps(),
        if new_head {
            "; a new score head on the model"
        } else {
            ""
        }
    );
    stop::catch_signals();
    let bar = if root {
        ProgressBar::new(trainer.total_steps())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} updates [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.progress().step);
    let outcome = trainer.run(
        &args.out,
        &stop::requested,
        &mut |s| {
            bar.set_position(s.step);
            bar.set_message(format!(
                "epoch {} loss {:.4} acc {:.2} lr {:.2e}",
                s.epoch + 1,
                s.loss,
                s.accuracy,
                s.lr
            ));
        },
        &mut |e| {
            let held = match (e.eval_loss, e.eval_accuracy) {
                (Some(loss), Some(acc)) => format!("held-out loss {loss:.4} accuracy {acc:.3}"),
                _ => "no held-out pairs".to_owned(),
            };
            bar.println(format!(
                "epoch {}: train loss {:.4} accuracy {:.3}, {held}",
                e.epoch + 1,
                e.train_loss,
                e.train_accuracy
            ));
        },
    )?;
    bar.finish_and_clear();
    match outcome {
        Outcome::Finished(dir) => {
            if root {
                println!("wrote the reward model to {}", dir.display());
            }
        }
        Outcome::Interrupted(dir) => {
            if root {
                println!(
                    "interrupted: checkpoint {}; run again with --resume to continue",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}
