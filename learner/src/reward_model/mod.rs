//! `quill train-rm`: Bradley–Terry training of a sequence-classification reward model on
//! preference pairs. A pair's texts are `prompt + "\n\n" + response`, as the quality
//! reward scores them; the loss of a batch is the mean of `−log σ(r_chosen − r_rejected)`.
//! Micro-batches accumulate gradients into one AdamW update (the learner's optimizer and
//! warm-up/cosine schedule); with several ranks each takes a share of every batch and the
//! ranks sum their gradients over the learner's collectives. Checkpoints are Hugging Face
//! `Qwen2ForSequenceClassification` folders plus the optimizer state and the position in
//! the data, so an interrupted run resumes where it stopped.

mod checkpoint;
mod init;
mod pairs;
#[cfg(test)]
mod tests;
mod train;

pub use checkpoint::{latest_checkpoint, Progress};
pub use init::{load_reward_model, ModelSource};
pub use pairs::{load_pairs, split_pairs, PairFields, PreferencePair};
pub use train::{EpochReport, Outcome, RmConfig, RmTrainer, StepReport};

use std::path::PathBuf;

/// What can go wrong while training a reward model.
#[derive(Debug, thiserror::Error)]
pub enum RmError {
    /// The preference file could not be read.
    #[error("preference file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line of the preference file is unusable.
    #[error("preference file {path}, line {line}: {reason}")]
    Record {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The preference file holds no pairs.
    #[error("preference file {0} holds no pairs")]
    Empty(String),
    /// A setting has a bad value; `field` is the flag.
    #[error("{field}: {reason}")]
    Config {
        /// The flag or field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint cannot be used.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model, optimizer or collectives failed.
    #[error(transparent)]
    Learner(#[from] crate::LearnerError),
    /// The model failed to load or save.
    #[error(transparent)]
    Model(#[from] quill_model::Error),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective over the ranks failed.
    #[error(transparent)]
    Collective(#[from] crate::parallel::collective::CollectiveError),
}

impl RmError {
    /// An [`RmError::Config`] for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RmError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for reward-model training.
pub type Result<T, E = RmError> = std::result::Result<T, E>;
