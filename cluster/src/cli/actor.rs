//! `quill actor`: join a running job and generate rollouts for it.

use super::member_args::MemberArgs;
use anyhow::Context;
use quill_actor::worker::{run as run_actor, ActorOptions};

/// Flags of `quill actor`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub member: MemberArgs,
    /// Device for this actor's engine (default: the job's model.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Where to serve the weight relay other actors fetch from (IP:PORT; port 0 picks a
    /// free port). A wildcard IP (0.0.0.0) needs --relay-advertise.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub relay_listen: String,
    /// The relay address other actors should dial (default: the bound listen address).
    #[arg(long)]
    pub relay_advertise: Option<String>,
    /// CPU threads libtorch may use (0 keeps libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

/// Runs an actor until the job ends.
pub fn run(args: Args) -> anyhow::Result<()> {
    let token = args.member.token()?;
    args.member
        .install_transport(&[("--relay-listen", &args.relay_listen)])?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let options = ActorOptions {
        name: args.member.name(),
        learner: args.member.learner,
        token,
        device: args.device,
        metrics_listen: args.member.metrics_listen,
        relay_listen: args.relay_listen,
        relay_advertise: args.relay_advertise,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run_actor(options)).context("actor")
}
