//! Command-line flags shared by every command that loads a model.

use anyhow::Context;
use quill_model::device::{parse_device, parse_dtype};
use quill_model::{load_pretrained, Qwen2, Tokenizer};

/// Which model to load, where and in what precision.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face Qwen2/Qwen2.5 directory (config.json, *.safetensors, tokenizer.json),
    /// or `default` for the embedded tiny model.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Device to run on: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight and activation precision: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// CPU threads libtorch may use (0 keeps libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

impl ModelArgs {
    /// Applies the thread setting and loads the model and tokenizer.
    pub fn load(&self) -> anyhow::Result<(Qwen2, Tokenizer)> {
        self.load_quill()
            .with_context(|| format!("loading model `{}`", self.model))
    }

    /// Like [`ModelArgs::load`], with the library's error type (for engine threads).
    pub fn load_quill(&self) -> quill_model::Result<(Qwen2, Tokenizer)> {
        self.apply_threads();
        let device = parse_device(&self.device)?;
        let kind = parse_dtype(&self.dtype)?;
        load_pretrained(&self.model, device, kind)
    }

    /// Sets libtorch's CPU thread count if one was given.
    pub fn apply_threads(&self) {
        if self.threads > 0 {
            tch::set_num_threads(self.threads);
        }
    }
}
