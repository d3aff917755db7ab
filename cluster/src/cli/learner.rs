//! `quill learner`: a learner rank. Rank 0 is the job's hub and trains; ranks > 0 join it
//! (`--rank R --world-size K --learner RANK0`) and train their shard of every batch.

use anyhow::bail;
use anyhow::Context;
use quill_config::job::JobConfig;
use quill_learner::process::rank::{run_rank, RankOptions};
use quill_learner::process::run::{run as run_learner, LearnerOptions};
use quill_learner::process::stop;
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
    /// This learner's rank in a data-parallel learner (0 is the hub).
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// How many learner ranks train together (every rank gets the same value).
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Rank 0's address, HOST:PORT (required for ranks > 0, which take the job from it;
    /// rank 0 ignores it, so every rank can get the same command line).
    #[arg(long)]
    pub learner: Option<String>,
    /// Train on this device instead of `model.device` (e.g. `cuda:1` for a second GPU).
    #[arg(long)]
    pub device: Option<String>,
    #[command(flatten)]
    pub tls: super::tls_args::TlsArgs,
}

/// Runs the learner until training ends (rank 0: or until SIGTERM or SIGINT, after a
/// final checkpoint).
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.world_size == 0 {
        bail!("--world-size must be at least 1");
    }
    if args.rank >= args.world_size {
        bail!(
            "--rank {} is outside --world-size {} (ranks are 0 to {})",
            args.rank,
            args.world_size,
            args.world_size - 1
        );
    }
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
    args.tls.install_for_job(&mut job)?;
    if let Some(listen) = &args.listen {
        quill_proto::tls::Transport::process().check("--listen", listen)?;
    }
    if args.rank > 0 {
        let Some(learner) = args.learner else {
            bail!(
                "--rank {} needs --learner: the address of rank 0",
                args.rank
            );
        };
        let token = quill_proto::auth::load_token(job.job.token_file.as_deref())?;
        let options = RankOptions {
            rank: args.rank,
            world_size: args.world_size,
            learner,
            token,
            device: args.device,
            name: super::default_name(),
            connect_timeout: job.parallel.timeout(),
        };
        return run_rank(options).with_context(|| format!("learner rank {}", args.rank));
    }
    if let Some(device) = args.device {
        job.model.device = device;
    }
    let options = LearnerOptions {
        resume: args.resume,
        listen: args.listen,
        world_size: args.world_size,
        metrics_listen: args.metrics_listen,
    };
    stop::catch_signals();
    run_learner(job, options).context("learner")
}
