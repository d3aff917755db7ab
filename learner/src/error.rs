//! The error type of the learner.

use std::path::PathBuf;

/// Anything that can go wrong while validating a batch, training, or saving and restoring
/// training state.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// A training sample is malformed.
    #[error("sample {index}: {reason}")]
    InvalidSample {
        /// Its index in the batch.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A training step was given no samples.
    #[error("the training batch is empty")]
    EmptyBatch,
    /// A learner setting has a bad value.
    #[error("learner config `{field}`: {reason}")]
    Config {
        /// The setting's name.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Too many steps in a row had a non-finite loss or gradient norm.
    #[error(
        "{count} consecutive bad steps (non-finite loss or gradient norm) exceed \
         max_consecutive_bad_steps = {max}"
    )]
    TooManyBadSteps {
        /// Bad steps in a row, this one included.
        count: u32,
        /// The configured maximum.
        max: u32,
    },
    /// A tensor in a saved state file is missing.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor in a saved state file has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the model needs.
        expected: Vec<i64>,
        /// The shape in the file.
        actual: Vec<i64>,
    },
    /// A saved state file or checkpoint directory is malformed.
    #[error("{path}: {reason}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The model failed to load or save.
    #[error(transparent)]
    Model(#[from] quill_model::Error),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective over the learner ranks failed (a rank died, timed out, or diverged).
    #[error(transparent)]
    Collective(#[from] crate::parallel::collective::CollectiveError),
    /// The learner ranks no longer hold the same weights.
    #[error("learner ranks diverged at step {step}: weight checksums {checksums:?}")]
    Diverged {
        /// The step after which the checksums differed.
        step: u64,
        /// Each rank's checksum.
        checksums: Vec<f64>,
    },
}

/// Result alias for this crate.
pub type Result<T, E = LearnerError> = std::result::Result<T, E>;

impl LearnerError {
    /// A [`LearnerError::Config`] for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        LearnerError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A [`LearnerError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LearnerError::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`LearnerError::State`] for `path`.
    pub fn state(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        LearnerError::State {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
