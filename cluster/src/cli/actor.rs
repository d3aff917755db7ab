//! `quill actor`: join a running job and generate rollouts for it.

use anyhow::Context;
use quill_actor::worker::{run as run_actor, ActorOptions};
use quill_proto::auth::load_token;
use std::path::PathBuf;

/// Flags of `quill actor`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The learner's HOST:PORT.
    #[arg(long)]
    pub learner: String,
    /// File holding the job token (else $QUILL_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Device for this actor's engine (default: the job's model.device).
    #[arg(long)]
    pub device: Option<String>,
    /// A name shown in status and logs (default: host and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Serve this actor's Prometheus `GET /metrics` on this HOST:PORT instead of the job's
    /// `metrics.member_prometheus_addr` (port 0 picks a free port; the bound address is logged).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
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
    let token = load_token(args.token_file.as_deref())?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let options = ActorOptions {
        learner: args.learner,
        token,
        name: args.name.unwrap_or_else(super::default_name),
        device: args.device,
        metrics_listen: args.metrics_listen,
        relay_listen: args.relay_listen,
        relay_advertise: args.relay_advertise,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run_actor(options)).context("actor")
}
