//! `quill plan`: what a job's learner ranks and actors hold in GPU memory, what does not
//! fit and which setting would make it fit. The arithmetic is `quill_model::memory_plan`.

use anyhow::{anyhow, bail, Context};
use quill_model::memory_plan::{
    self, ActorMemory, LearnerMemory, LearnerSetup, ModelSize, Precision, Sharding, Workload, GIB,
};
use quill_model::{default_model, HeadKind, ModelConfig};
use std::fmt::Write as _;
use std::path::Path;

/// Flags of `quill plan`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "`--sharding zero1|zero2` are the learner's `grpo.sharding` (ZeRO-2 holds \
    the full gradients during the backward pass, as ZeRO-1 does, so their peaks are equal); \
    `--sharding zero3` also shards the decoder layers' weights: the embedding, final norm \
    and head stay whole, one layer's weights and gradients are gathered at a time, and the \
    passes run layer by layer as with --activation-checkpointing. \
    `--precision bf16` is the learner's grpo.precision = \"bf16\": bf16 weights, \
    activations and gradients in the passes, f32 master weights, gradient accumulation and \
    AdamW moments (20 bytes per parameter before activations, against 16 in f32). Tokens \
    per pass are --micro-batch-tokens (packed: real tokens) or one longer sample. Not \
    counted: attention scores (fused kernels keep none), gradient-sync buckets and a KL \
    reference model."
)]
pub struct Args {
    /// The model: a config.json, a folder holding one, or `default` (the embedded model).
    #[arg(long, value_name = "PATH")]
    pub model: String,
    /// Learner GPUs, one per rank; sharded state is split over them.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one)]
    pub gpus: usize,
    /// Memory of one GPU in GiB (learner and actor GPUs alike).
    #[arg(long, value_name = "GIB", value_parser = positive_gib)]
    pub gpu_memory: f64,
    /// GiB of each GPU kept back for the CUDA context and allocator slack.
    #[arg(long, value_name = "GIB", default_value_t = 2.0, value_parser = non_negative_gib)]
    pub reserve: f64,
    /// Samples per prompt (G, `sampling.group_size`).
    #[arg(long, value_name = "G", default_value_t = 32, value_parser = at_least_one)]
    pub group_size: usize,
    /// Prompts per optimiser step (`grpo.prompts_per_step`).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = at_least_one)]
    pub prompts_per_step: usize,
    /// The longest sample in tokens: prompt plus response.
    #[arg(long, value_name = "TOKENS", value_parser = at_least_one)]
    pub max_tokens: usize,
    /// How the learner spreads its state over its GPUs.
    #[arg(long, value_enum, default_value_t = ShardingArg::None)]
    pub sharding: ShardingArg,
    /// Learner compute precision.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// Recompute each decoder layer in the backward pass
    /// (`grpo.activation_checkpointing`).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Tokens per learner forward/backward pass (`grpo.micro_batch_tokens`: real tokens
    /// when packed, rows × longest row when padded).
    #[arg(long, value_name = "TOKENS", default_value_t = 8192, value_parser = at_least_one)]
    pub micro_batch_tokens: usize,
    /// Response tokens whose logits are formed at once (`grpo.logprob_chunk_tokens`).
    #[arg(long, value_name = "TOKENS", default_value_t = 1024, value_parser = at_least_one)]
    pub logprob_chunk_tokens: usize,
    /// The dtype actors generate in (`model.dtype`).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    pub actor_dtype: PrecisionArg,
}

/// `--sharding`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum ShardingArg {
    /// Every rank holds everything.
    None,
    /// Shard the optimiser state (f32 master weights, AdamW moments).
    Zero1,
    /// Also free the full gradients between steps (the same peak as zero1).
    Zero2,
    /// Shard the weights too, a layer gathered at a time (activation checkpointing implied).
    Zero3,
}

/// `--precision` and `--actor-dtype`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum PrecisionArg {
    /// f32 throughout.
    F32,
    /// bf16 weights, gradients and activations (learner: with f32 master weights).
    Bf16,
}

impl From<ShardingArg> for Sharding {
    fn from(arg: ShardingArg) -> Self {
        match arg {
            ShardingArg::None => Sharding::None,
            ShardingArg::Zero1 => Sharding::Zero1,
            ShardingArg::Zero2 => Sharding::Zero2,
            ShardingArg::Zero3 => Sharding::Zero3,
        }
    }
}

impl From<PrecisionArg> for Precision {
    fn from(arg: PrecisionArg) -> Self {
        match arg {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

fn gib(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| "not a finite number of GiB".into())
}

fn positive_gib(text: &str) -> Result<f64, String> {
    gib(text).and_then(|v| {
        if v > 0.0 {
            Ok(v)
        } else {
            Err("must be above 0".into())
        }
    })
}

fn non_negative_gib(text: &str) -> Result<f64, String> {
    gib(text).and_then(|v| {
        if v >= 0.0 {
            Ok(v)
        } else {
            Err("must be at least 0".into())
        }
    })
}

/// Prints the plan.
pub fn run(args: Args) -> anyhow::Result<()> {
    print!("{}", plan(&args)?);
    Ok(())
}

/// The model config `--model` names.
fn model_config(model: &str) -> anyhow::Result<ModelConfig> {
    let config = if model == default_model::NAME {
        ModelConfig::from_json(default_model::config_json())?
    } else {
        let path = Path::new(model);
        let config = if path.is_dir() {
            ModelConfig::from_dir(path).map_err(anyhow::Error::from)
        } else {
            config_file(path)
        };
        config.with_context(|| format!("--model {model}"))?
    };
    if !matches!(config.head, HeadKind::CausalLm) {
        bail!("--model {model}: a sequence-classification model; quill plan plans causal LMs");
    }
    Ok(config)
}

/// The model config in a `config.json` file.
fn config_file(path: &Path) -> anyhow::Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(ModelConfig::from_json(json)?)
}

/// The plan as text.
fn plan(args: &Args) -> anyhow::Result<String> {
    let size = ModelSize::of(&model_config(&args.model)?);
    let setup = LearnerSetup {
        gpus: args.gpus,
        sharding: args.sharding.into(),
        precision: args.precision.into(),
        activation_checkpointing: args.activation_checkpointing,
        micro_batch_tokens: args.micro_batch_tokens,
        logprob_chunk_tokens: args.logprob_chunk_tokens,
    };
    let work = Workload {
        group_size: args.group_size,
        prompts_per_step: args.prompts_per_step,
        max_tokens: args.max_tokens,
    };
    memory_plan::validate(&size, &setup, &work)
        .map_err(|e| anyhow!("--{}: {}", e.field.replace('_', "-"), e.reason))?;
    if args.reserve >= args.gpu_memory {
        bail!(
            "--reserve: {} GiB leaves nothing of --gpu-memory {} GiB",
            args.reserve,
            args.gpu_memory
        );
    }
    let usable = ((args.gpu_memory - args.reserve) * GIB) as u64;
    let mut out = String::new();
    writeln!(
        out,
        "model: {} parameters ({} layers, hidden {}, vocabulary {}, context {})",
        count_text(size.params),
        size.layers,
        size.hidden,
        size.vocab,
        size.context
    )?;
    let samples = work.samples_per_step();
    writeln!(
        out,
        "step: {} prompts x {} samples = {samples} samples of up to {} tokens, {} per learner rank",
        work.prompts_per_step,
        work.group_size,
        work.max_tokens,
        samples.div_ceil(setup.gpus)
    )?;
    writeln!(
        out,
        "GPU: {} GiB, {:.1} GiB usable after a {} GiB reserve\n",
        args.gpu_memory,
        usable as f64 / GIB,
        args.reserve
    )?;
    learner_section(&mut out, &size, &setup, &work, usable)?;
    let actor = memory_plan::actor_memory(
        &size,
        args.actor_dtype.into(),
        work.max_tokens as u64,
        usable,
    );
    actor_section(&mut out, &actor, args.actor_dtype.into(), samples)?;
    Ok(out)
}

/// Bytes in GiB, MiB or KiB, right-aligned.
fn gib_text(bytes: u64) -> String {
    let (value, unit) = match bytes as f64 {
        b if b >= GIB => (b / GIB, "GiB"),
        b if b >= (1 << 20) as f64 => (b / (1 << 20) as f64, "MiB"),
        b => (b / 1024.0, "KiB"),
    };
    format!("{value:>9.2} {unit}")
}

/// A count in millions or billions.
fn count_text(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.2} M", n as f64 / 1e6)
    }
}

fn learner_section(
    out: &mut String,
    size: &ModelSize,
    setup: &LearnerSetup,
    work: &Workload,
    usable: u64,
) -> anyhow::Result<()> {
    let m: LearnerMemory = memory_plan::learner_memory(size, setup, work);
    writeln!(
        out,
        "learner: {} GPU{}, sharding {}, precision {}, activation checkpointing {}",
        setup.gpus,
        if setup.gpus == 1 { "" } else { "s" },
        setup.sharding.name(),
        setup.precision.name(),
        if setup.activation_checkpointing {
            "on"
        } else {
            "off"
        }
    )?;
    let gradients = match setup.precision {
        Precision::F32 => "gradients",
        Precision::Bf16 => "gradients (bf16 + f32 accumulation)",
    };
    let optimizer = match (setup.sharding, setup.precision) {
        (Sharding::None, Precision::F32) => "optimiser state (AdamW moments)",
        _ => "optimiser state (f32 master + AdamW moments)",
    };
    let passes = format!("activations ({} tokens per pass)", m.tokens_per_pass);
    let chunk = format!("logits (chunks of {} tokens)", setup.logprob_chunk_tokens);
    for (name, bytes) in [
        ("weights", m.weights),
        (gradients, m.gradients),
        (optimizer, m.optimizer),
        (passes.as_str(), m.activations),
        (chunk.as_str(), m.logits),
    ] {
        writeln!(out, "  {name:<46}{}", gib_text(bytes))?;
    }
    writeln!(
        out,
        "  {:<46}{}",
        "(logits without chunks)",
        gib_text(m.logits_unchunked)
    )?;
    let total = m.total();
    let verdict = if total <= usable {
        "fits".to_owned()
    } else {
        format!(
            "does NOT fit ({:.2} GiB over)",
            (total - usable) as f64 / GIB
        )
    };
    writeln!(
        out,
        "  {:<46}{}  {verdict}",
        "total per rank",
        gib_text(total)
    )?;
    if total > usable {
        let fixes = memory_plan::learner_fixes(size, setup, work, usable);
        if fixes.is_empty() {
            writeln!(
                out,
                "  nothing up to {} GPUs makes it fit: one pass of {} tokens needs more; \
                 lower --max-tokens or use GPUs with more memory",
                memory_plan::MAX_PLANNED_GPUS,
                m.tokens_per_pass
            )?;
        } else {
            writeln!(out, "  it fits with:")?;
            for fix in fixes {
                writeln!(out, "    - {} ({})", fix.change, gib_text(fix.total).trim())?;
            }
        }
    }
    writeln!(out)?;
    Ok(())
}

fn actor_section(
    out: &mut String,
    actor: &ActorMemory,
    dtype: Precision,
    samples: usize,
) -> anyhow::Result<()> {
    writeln!(out, "actor: one GPU, generating in {}", dtype.name())?;
    writeln!(out, "  {:<46}{}", "weights", gib_text(actor.weights))?;
    let kv = format!("KV cache per sample ({} positions)", actor.cache_tokens);
    writeln!(out, "  {kv:<46}{}", gib_text(actor.kv_per_sample))?;
    writeln!(
        out,
        "  {:<46}{}",
        "logits per sample",
        gib_text(actor.logits_per_sample)
    )?;
    let fit = actor.samples_that_fit;
    if fit == 0 {
        let hint = match dtype {
            Precision::F32 => "; --actor-dtype bf16 halves the weights and the cache",
            Precision::Bf16 => "; it needs a GPU with more memory",
        };
        writeln!(
            out,
            "  no sample fits beside the weights: does NOT fit{hint}"
        )?;
    } else {
        writeln!(
            out,
            "  samples that fit: {fit} (cluster.actor_batch); a step's {samples} samples at \
             once need {} actor GPUs",
            (samples as u64).div_ceil(fit)
        )?;
    }
    Ok(())
}
