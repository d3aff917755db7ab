//! `quill`: one binary for every role of a quill job, plus offline tools.

mod cmd;

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
    Generate(cmd::generate::Args),
    /// Benchmarks that compare quill with the peer systems in one run.
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
    /// Write the embedded default model as a Hugging Face directory.
    InitModel(cmd::init_model::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Bench(bench) => cmd::bench::run(bench),
        Command::InitModel(args) => cmd::init_model::run(args),
    }
}
