//! `quill learner`: rank 0 of a job (the hub and the trainer).

use anyhow::Context;
use quill_common::job::JobConfig;
use quill_learner::run::{run as run_learner, LearnerOptions};
use std::path::PathBuf;

/// Flags of `quill learner`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The job file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the latest checkpoint in the job's output directory.
    #[arg(long)]
    pub resume: bool,
    /// Listen here instead of `cluster.learner_addr` (port 0 picks a free port; the bound
    /// address is written to OUTPUT_DIR/learner.addr).
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve Prometheus `GET /metrics` (the cluster aggregate) on this HOST:PORT instead of
    /// `metrics.prometheus_addr` (port 0 picks a free port; the bound address is logged).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Write checkpoints and metrics here instead of `job.output_dir`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// File holding the job token (overrides `job.token_file`; else $QUILL_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CPU threads libtorch may use (0 keeps libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

/// Runs the learner until training ends.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut job = JobConfig::from_file(&args.config)?;
    if args.token_file.is_some() {
        job.job.token_file = args.token_file;
    }
    if let Some(dir) = args.output_dir {
        job.job.output_dir = dir;
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let options = LearnerOptions {
        resume: args.resume,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
    };
    run_learner(job, options).context("learner")
}
