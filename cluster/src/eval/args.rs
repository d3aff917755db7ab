//! Flags of `quill eval`.

use std::path::PathBuf;

/// Flags of `quill eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The prompts: a JSONL file, one object per line, e.g. Arena-Write's records (`idx`,
    /// `question`, `type`, `length`, `baseline_response`); the field names are flags.
    #[arg(long)]
    pub prompts: PathBuf,
    /// The output folder: samples.jsonl (per-sample results, appended as they finish;
    /// a second run with the same flags skips what is there), results.json and the PNGs.
    #[arg(long)]
    pub out: PathBuf,
    /// The field holding the question.
    #[arg(long, default_value = "question")]
    pub question_field: String,
    /// The field holding the prompt's id (a number or a string); without it a record's
    /// line number is its id.
    #[arg(long, default_value = "idx")]
    pub id_field: String,
    /// The field holding the required length in words (CJK characters for Chinese); a
    /// record without it gets no length score.
    #[arg(long, default_value = "length")]
    pub length_field: String,
    /// The field holding the prompt's category; scores are also averaged per category.
    #[arg(long, default_value = "type")]
    pub type_field: String,
    /// The field holding the baseline's answer that the model is judged against
    /// (opponent `baseline`, anchored at Elo 1000); records without it skip that
    /// comparison.
    #[arg(long, default_value = "baseline_response")]
    pub baseline_field: String,
    /// Evaluate only the first N prompts of the file.
    #[arg(long)]
    pub limit: Option<usize>,

    /// A model to generate with: a Hugging Face Qwen2 folder, or `default` (the embedded
    /// tiny model). Repeat for a checkpoint series (a folder named step-N is step N).
    /// Default: `default`, unless --checkpoints or --endpoint is given.
    #[arg(long)]
    pub model: Vec<String>,
    /// A folder of checkpoints named step-N (a training run's checkpoints/): every one is
    /// evaluated, in step order, and series.png shows how the scores moved.
    #[arg(long)]
    pub checkpoints: Option<PathBuf>,
    /// Device for local models: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight precision of local models: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// CPU threads libtorch may use (0 keeps libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// A job file whose `[template]` wraps questions for local models (default: the
    /// recipe's think/answer template).
    #[arg(long)]
    pub job: Option<PathBuf>,
    /// Sequences a local model decodes together.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,

    /// Generate with an OpenAI-compatible endpoint instead of a local model: its base URL
    /// (e.g. http://127.0.0.1:8000/v1; /chat/completions is added). Plain http:// only.
    #[arg(long, requires = "endpoint_model")]
    pub endpoint: Option<String>,
    /// The model name sent to --endpoint (also the name in the results).
    #[arg(long, requires = "endpoint")]
    pub endpoint_model: Option<String>,
    /// An environment variable holding --endpoint's API key (sent as a bearer token).
    #[arg(long)]
    pub endpoint_api_key_env: Option<String>,

    /// Most new tokens per answer.
    #[arg(long, default_value_t = 4096)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Random seed (the prompt on line i samples with seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// The judge's OpenAI-compatible endpoint (base URL, as --endpoint). Without it only
    /// length scores are computed.
    #[arg(long)]
    pub judge_endpoint: Option<String>,
    /// The model name sent to --judge-endpoint.
    #[arg(long, default_value = "default")]
    pub judge_model: String,
    /// An environment variable holding --judge-endpoint's API key.
    #[arg(long)]
    pub judge_api_key_env: Option<String>,
    /// The pairwise rubric: a text file with {question}, {answer_a} and {answer_b} once
    /// each, asking for [[A]], [[B]] or [[TIE]] (default: configs/eval-pairwise.txt).
    #[arg(long)]
    pub pairwise_template: Option<PathBuf>,
    /// The critic's criteria: a text file with {question} and {answer} once each, asking
    /// for `Score: N` from 1 to 10 (default: configs/eval-critic.txt).
    #[arg(long)]
    pub critic_template: Option<PathBuf>,
    /// Skip pairwise judging.
    #[arg(long)]
    pub no_pairwise: bool,
    /// Skip critic scoring.
    #[arg(long)]
    pub no_critic: bool,
    /// Another model's answers to judge against, as NAME=FILE: a JSONL file with the id
    /// field and `answer` or `response` per line (the samples.jsonl of another
    /// `quill eval` of one model works). Repeat for several.
    #[arg(long = "compare", value_name = "NAME=FILE")]
    pub compare: Vec<String>,
    /// Most tokens of a judge reply.
    #[arg(long, default_value_t = 1024)]
    pub judge_max_tokens: usize,
    /// The judge's sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    pub judge_temperature: f64,

    /// Seconds one request (generation or judge) may take.
    #[arg(long, default_value_t = 600.0)]
    pub timeout_s: f64,
    /// Further tries after a failed request or an unreadable judge reply; a verdict or
    /// score still unreadable after them is counted as unparsable.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Seconds before the first retry (doubling after each).
    #[arg(long, default_value_t = 1.0)]
    pub backoff_s: f64,
    /// Prompts in flight at once (generation and judging).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Bootstrap rounds for the Elo ratings' 95% intervals (0: none).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap's resampling.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
}
