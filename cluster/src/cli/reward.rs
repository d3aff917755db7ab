//! `quill reward`: a reward worker that scores rollout groups for a running job.

use super::member_args::MemberArgs;
use anyhow::Context;
use quill_reward_worker::process::{serve, RewardOptions};

/// Flags of `quill reward`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub member: MemberArgs,
    /// Where to serve the Reward service (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The address actors should dial (default: the bound listen address).
    #[arg(long)]
    pub advertise: Option<String>,
}

/// Runs a reward worker until the job ends.
pub fn run(args: Args) -> anyhow::Result<()> {
    let token = args.member.token()?;
    args.member
        .install_transport(&[("--listen", &args.listen)])?;
    let options = RewardOptions {
        name: args.member.name(),
        learner: args.member.learner,
        listen: args.listen,
        advertise: args.advertise,
        metrics_listen: args.member.metrics_listen,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    Ok(runtime.block_on(serve(options, token))?)
}
