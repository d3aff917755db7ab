//! `quill reward`: a reward worker that scores rollout groups for a running job.

use anyhow::Context;
use quill_proto::auth::load_token;
use quill_reward_worker::process::{serve, RewardOptions};
use std::path::PathBuf;

/// Flags of `quill reward`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The learner's HOST:PORT.
    #[arg(long)]
    pub learner: String,
    /// Where to serve the Reward service (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The address actors should dial (default: the bound listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// File holding the job token (else $QUILL_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A name shown in status and logs (default: host and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Serve this worker's Prometheus `GET /metrics` on this HOST:PORT instead of the job's
    /// `metrics.member_prometheus_addr` (port 0 picks a free port; the bound address is logged).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Runs a reward worker until the job ends.
pub fn run(args: Args) -> anyhow::Result<()> {
    let token = load_token(args.token_file.as_deref())?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let options = RewardOptions {
        learner: args.learner,
        listen: args.listen,
        advertise: args.advertise,
        name: args.name.unwrap_or_else(super::default_name),
        metrics_listen: args.metrics_listen,
    };
    runtime.block_on(serve(options, token))
}
