//! The Qwen2-architecture transformer: weights, checkpoints, forward passes and KV cache.

mod cache;
pub mod checkpoint;
pub mod params;
mod qwen2;
mod rope;

pub use cache::{KvCache, Prefix};
pub use qwen2::{pad_right, Qwen2, MAX_SHARD_BYTES};
