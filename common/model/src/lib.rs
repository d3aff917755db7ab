//! The Qwen2-architecture transformer in tch: weights in one `VarStore`, full forward
//! passes (optionally with activation checkpointing), prefill and decode over a
//! slot-indexed KV cache, the sequence-classification head; Hugging Face checkpoints
//! (`config.json`, safetensors, tokenizer) in and out; the embedded default model;
//! tensors to and from weight blobs; the memory model `quill plan` prints. Every tensor
//! stays on the thread that made it.

mod cache;
pub mod checkpoint;
mod checkpointed;
pub mod config;
pub mod default_model;
pub mod device;
pub mod error;
pub mod memory_plan;
pub mod params;
pub mod pretrained;
mod qwen2;
mod rope;
pub mod tokenizer;
pub mod weights;

pub use cache::{KvCache, Prefix};
pub use checkpointed::{LayerCheckpoints, LayerHooks, NoHooks};
pub use config::{HeadKind, ModelConfig};
pub use error::{Error, Result};
pub use pretrained::load_pretrained;
pub use qwen2::{pad_right, Qwen2, Segment, MAX_SHARD_BYTES};
pub use tokenizer::Tokenizer;
