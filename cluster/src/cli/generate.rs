//! `quill generate`: sample from a model with the continuous-batching engine.

use super::model_args::ModelArgs;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use quill_actor::{EngineConfig, EngineHandle, GenerationRequest, SamplingParams};
use quill_config::template::{PromptTemplate, DEFAULT_STOP_STRINGS};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Flags of `quill generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A question or prompt; repeat the flag for several.
    #[arg(long, short = 'p')]
    pub prompt: Vec<String>,
    /// A file with one prompt per line (blank lines are skipped).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Send prompts as written instead of wrapping them in the think/answer template.
    #[arg(long)]
    pub raw: bool,
    /// Samples per prompt (they share one prefill of the prompt).
    #[arg(short = 'n', long, default_value_t = 1)]
    pub n: usize,
    /// Most new tokens per sample (the model's context also bounds it).
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 disables it.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed (sample i of prompt j uses stream i of seed + j).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop strings; repeat for several. Default: <|user|>, <|endoftext|>, </answer>.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Sequences decoded together (continuous batching refills finished slots).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Print one JSON object per sample (text, token ids, log-probs, finish reason).
    #[arg(long)]
    pub json: bool,
}

/// Runs `quill generate`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let prompts = read_prompts(&args)?;
    if args.n == 0 {
        bail!("-n must be at least 1");
    }
    let load_args = args.model.clone();
    let engine_config = EngineConfig {
        max_batch: args.batch_size.max(1),
        // Every prompt is queued up front (they are all in memory already).
        request_queue: prompts.len() + 1,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::spawn(move || load_args.load_quill(), engine_config)
        .with_context(|| format!("loading model `{}`", args.model.model))?;
    let tokenizer = engine.tokenizer().clone();
    let template = PromptTemplate::default();
    let stop_strings = if args.stop.is_empty() {
        DEFAULT_STOP_STRINGS.iter().map(|s| s.to_string()).collect()
    } else {
        args.stop.clone()
    };
    let stop_token_ids = engine.stop_token_ids();
    let mut pending = Vec::with_capacity(prompts.len());
    for (i, question) in prompts.iter().enumerate() {
        let text = if args.raw {
            question.clone()
        } else {
            template.render(question)
        };
        let request = GenerationRequest {
            id: i as u64,
            prompt: tokenizer.encode(&text)?,
            n: args.n,
            params: SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                top_k: args.top_k,
                max_new_tokens: args.max_new_tokens,
                seed: args.seed.wrapping_add(i as u64),
                stop_token_ids: stop_token_ids.clone(),
                stop_strings: stop_strings.clone(),
            },
        };
        pending.push(engine.submit(request));
    }
    let started = Instant::now();
    let bar = ProgressBar::new((prompts.len() * args.n) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} samples  {msg}",
        )
        .expect("valid template"),
    );
    let mut groups = Vec::with_capacity(pending.len());
    for answer in pending {
        let group = loop {
            match answer.recv_timeout(Duration::from_millis(100)) {
                Ok(result) => break result?,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let stats = engine.stats();
                    let tokens = stats.generated_tokens.load(Ordering::Relaxed);
                    bar.set_position(stats.finished_samples.load(Ordering::Relaxed));
                    bar.set_message(format!(
                        "{tokens} tokens, {:.0} tokens/s",
                        tokens as f64 / started.elapsed().as_secs_f64()
                    ));
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    bail!("the generation engine stopped unexpectedly")
                }
            }
        };
        groups.push(group);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut total = 0usize;
    for group in &groups {
        for (j, sample) in group.samples.iter().enumerate() {
            total += sample.tokens.len();
            if args.json {
                let line = serde_json::json!({
                    "prompt": prompts[group.id as usize],
                    "sample": j,
                    "text": sample.text,
                    "tokens": sample.tokens,
                    "logprobs": sample.logprobs,
                    "finish_reason": sample.finish.as_str(),
                });
                println!("{line}");
            } else {
                println!(
                    "=== prompt {} sample {} ({} tokens, {}) ===\n{}\n",
                    group.id,
                    j,
                    sample.tokens.len(),
                    sample.finish.as_str(),
                    sample.text
                );
            }
        }
    }
    let summary = format!(
        "generated {total} tokens in {seconds:.2} s: {:.1} tokens/s",
        total as f64 / seconds.max(1e-9)
    );
    if args.json {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    Ok(())
}

fn read_prompts(args: &Args) -> anyhow::Result<Vec<String>> {
    let mut prompts = args.prompt.clone();
    if let Some(path) = &args.prompt_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompt file {}", path.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    if prompts.is_empty() {
        bail!("no prompt given: use --prompt TEXT or --prompt-file FILE");
    }
    Ok(prompts)
}
