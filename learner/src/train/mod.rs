//! Training on one rank: the GRPO loss, AdamW and learning-rate schedules, the step
//! (micro-batches, gradient accumulation, clipping, skipping bad steps), mixed precision,
//! sharded optimiser state, gradients and weights (ZeRO 1–3), checkpoints and the
//! model-FLOPs accounting.

pub mod checkpoint;
pub mod grad_sync;
pub mod grpo;
pub mod mfu;
pub mod optim;
#[cfg(test)]
mod peak_memory_tests;
pub mod precision;
pub mod sample;
pub mod schedule;
pub mod shard;
mod state_file;
pub mod trainer;
pub mod zero3;
