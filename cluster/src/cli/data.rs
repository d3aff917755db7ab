//! `quill data`: offline tools for prompt files.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use quill_learner::ranges::{fill_ranges, FillFields, PredictorConfig, RangePredictor};
use std::path::PathBuf;
use std::time::Duration;

/// `quill data` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Data {
    /// Write IN's prompts to OUT, each with a `length_range`: kept from the record, read
    /// from a stated count ("2,000 words", "两千字"), or predicted by a model behind an
    /// OpenAI-compatible endpoint. Prompts with no sensible range are left out and counted.
    /// An interrupted run continues where it stopped when started again with the same
    /// IN and OUT.
    Ranges(RangesArgs),
}

/// Flags of `quill data ranges`.
#[derive(clap::Args, Debug)]
pub struct RangesArgs {
    /// The prompt file (JSONL).
    pub input: PathBuf,
    /// The file to write (JSONL; OUT.progress.json holds an unfinished run's position).
    pub output: PathBuf,
    /// Base URL of the predictor's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000
    /// (`/v1/chat/completions` is added). Without it, prompts that state no length are
    /// left out.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The `model` field of the predictor's requests.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// A text file holding the predictor's prompt, with {question} exactly once (default:
    /// a built-in prompt stating the recipe's rules).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Seconds each request may take.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,
    /// Further tries after a failed request or an invalid reply.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// The API key sent as a bearer token (default: the QUILL_PREDICTOR_API_KEY
    /// environment variable).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The field holding the question.
    #[arg(long, default_value = "question")]
    pub question_field: String,
    /// The field holding a ready-made prompt (read when there is no question).
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// The field holding a target word count (records with it are kept as they are).
    #[arg(long, default_value = "length")]
    pub length_field: String,
    /// The field the `[lo, hi]` range is written to (records with it are kept as they are).
    #[arg(long, default_value = "length_range")]
    pub range_field: String,
}

/// Runs a `quill data` subcommand.
pub fn run(command: Data) -> anyhow::Result<()> {
    match command {
        Data::Ranges(args) => ranges(args),
    }
}

fn ranges(args: RangesArgs) -> anyhow::Result<()> {
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        anyhow::bail!("--timeout-s must be above 0, got {}", args.timeout_s);
    }
    let predictor = match &args.endpoint {
        None => None,
        Some(url) => {
            let template = match &args.template {
                None => quill_learner::ranges::DEFAULT_TEMPLATE.to_owned(),
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("--template {}", path.display()))?,
            };
            let config = PredictorConfig {
                template,
                timeout: Duration::from_secs_f64(args.timeout_s),
                retries: args.retries,
                api_key: args
                    .api_key
                    .clone()
                    .or_else(|| std::env::var("QUILL_PREDICTOR_API_KEY").ok()),
                ..PredictorConfig::new(url, &args.model)
            };
            Some(RangePredictor::new(config).map_err(|e| {
                let flag = match &e {
                    quill_learner::ranges::RangeError::Config { field: "url", .. } => "--endpoint",
                    _ => "--template",
                };
                anyhow::anyhow!("{flag}: {e}")
            })?)
        }
    };
    let fields = FillFields {
        question: args.question_field,
        prompt: args.prompt_field,
        length: args.length_field,
        range: args.range_field,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} lines [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let counts = runtime.block_on(fill_ranges(
        &args.input,
        &args.output,
        &fields,
        predictor.as_ref(),
        &mut |counts, done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(format!(
                "{} kept, {} left out",
                counts.kept(),
                counts.skipped()
            ));
        },
    ));
    bar.finish_and_clear();
    let counts = counts.map_err(|e| {
        anyhow::anyhow!(
            "{e}\nprogress is saved: run the same command again to continue where it stopped"
        )
    })?;
    println!(
        "wrote {} prompts to {}: {} with a range given, {} stated, {} predicted; left out {}: \
         {} with no sensible range ([0, 0]), {} with invalid predictions, {} with no stated \
         length and no --endpoint",
        counts.kept(),
        args.output.display(),
        counts.given,
        counts.stated,
        counts.predicted,
        counts.skipped(),
        counts.no_range,
        counts.bad_reply,
        counts.unpredicted
    );
    Ok(())
}
