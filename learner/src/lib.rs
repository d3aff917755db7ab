//! quill's learner core: the GRPO loss, AdamW with savable state and learning-rate
//! schedules, the training step (micro-batching, gradient accumulation, clipping, skipping
//! bad steps) and atomic checkpoints. Every tensor stays on the calling thread.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod grad_sync;
pub mod group;
pub mod grpo;
pub mod hub;
pub mod ledger;
pub mod mfu;
pub mod optim;
pub mod prometheus;
pub mod rank_metrics;
pub mod rank_worker;
pub mod ranks;
pub mod relay_tree;
pub mod run;
pub mod sample;
pub mod schedule;
mod state_file;
pub mod train_loop;
pub mod trainer;

#[cfg(test)]
mod testing;

pub use checkpoint::{latest_checkpoint, prune, TrainerState};
pub use error::{LearnerError, Result};
pub use grpo::{GrpoConfig, KlEstimator, LossAggregation, LossStats};
pub use optim::{AdamW, AdamWConfig};
pub use sample::TrainSample;
pub use schedule::LrSchedule;
pub use trainer::{Progress, StepStats, Trainer, TrainerConfig};
