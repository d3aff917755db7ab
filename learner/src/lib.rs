//! quill's learner core: the GRPO loss, AdamW with savable state and learning-rate
//! schedules, the training step (micro-batching, gradient accumulation, clipping, skipping
//! bad steps) and atomic checkpoints. Every tensor stays on the calling thread.

pub mod data;
pub mod error;
pub mod hub;
pub mod parallel;
pub mod process;
pub mod prometheus;
pub mod ranges;
pub mod reward_model;
pub mod train;

#[cfg(test)]
mod testing;

pub use error::{LearnerError, Result};
pub use train::checkpoint::{latest_checkpoint, prune, TrainerState};
pub use train::grpo::{GrpoConfig, KlEstimator, LossAggregation, LossStats, MemoryConfig};
pub use train::optim::{AdamW, AdamWConfig};
pub use train::sample::TrainSample;
pub use train::schedule::LrSchedule;
pub use train::shard::Sharding;
pub use train::trainer::{Progress, StepStats, Trainer, TrainerConfig};
