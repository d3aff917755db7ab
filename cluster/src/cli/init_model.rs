//! `quill init-model`: write the embedded default model to disk.

use anyhow::Context;
use quill_model::default_model;
use quill_model::device::parse_dtype;
use std::path::PathBuf;

/// Flags of `quill init-model`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write config.json, model.safetensors and tokenizer files into.
    #[arg(long)]
    pub out: PathBuf,
    /// Precision of the saved weights: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Writes the default model.
pub fn run(args: Args) -> anyhow::Result<()> {
    let kind = parse_dtype(&args.dtype)?;
    default_model::write_to(&args.out, kind)
        .with_context(|| format!("writing the default model to {}", args.out.display()))?;
    println!("wrote the default model to {}", args.out.display());
    Ok(())
}
