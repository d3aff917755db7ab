//! `quill`: one binary for every role of a quill job, plus offline tools.

mod allocator;
mod bench;
mod cli;
mod eval;
mod launch;
mod plot;
mod serve;

use clap::{Parser, Subcommand};

/// quill trains language models to write ultra-long text with reinforcement learning
/// (the LongWriter-Zero recipe) on a distributed actor/learner architecture.
#[derive(Parser)]
#[command(name = "quill", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample long outputs from a model with the continuous-batching engine.
    Generate(cli::generate::Args),
    /// Benchmarks that compare quill with the peer systems in one run.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Write the embedded default model as a Hugging Face directory.
    InitModel(cli::init_model::Args),
    /// Run rank 0 of a job: the hub (prompts, leases, weights) and the GRPO trainer.
    Learner(cli::learner::Args),
    /// Join a running job as an actor that generates rollouts.
    Actor(cli::actor::Args),
    /// Join a running job as a reward worker.
    Reward(cli::reward::Args),
    /// Start a whole job: learner, actors and reward workers.
    #[command(subcommand)]
    Launch(launch::Launch),
    /// Show a running job: cluster totals, actors, reward workers and learner ranks.
    Status(cli::status::Args),
    /// Draw PNG charts (reward, length, throughput) from a metrics JSONL file.
    Plot(plot::Args),
    /// Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming).
    Serve(serve::Args),
    /// Plan GPU memory: what learner ranks and actors hold, what fits, what would.
    Plan(cli::plan::Args),
    /// Train a reward model on preference pairs (Bradley–Terry).
    TrainRm(cli::train_rm::Args),
    /// Offline tools for prompt files (length ranges).
    #[command(subcommand)]
    Data(cli::data::Data),
    /// Make a job CA and per-host certificates and keys for mutual TLS.
    Certs(cli::certs::Args),
    /// Evaluate a model (or a checkpoint series) on writing prompts: length score,
    /// critic score and pairwise Elo against a baseline, resumable.
    Eval(Box<eval::Args>),
}

fn main() -> anyhow::Result<()> {
    allocator::tune();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Bench(bench) => bench::run(bench),
        Command::InitModel(args) => cli::init_model::run(args),
        Command::Learner(args) => cli::learner::run(args),
        Command::Actor(args) => cli::actor::run(args),
        Command::Reward(args) => cli::reward::run(args),
        Command::Launch(launch) => launch::run(launch),
        Command::Plot(args) => plot::run(args),
        Command::Status(args) => cli::status::run(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::TrainRm(args) => cli::train_rm::run(args),
        Command::Data(command) => cli::data::run(command),
        Command::Certs(args) => cli::certs::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Eval(args) => eval::run(*args),
    }
}
