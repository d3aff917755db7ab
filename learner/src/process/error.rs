//! What stops a learner process (rank 0 or a rank > 0).

use crate::data;
use quill_proto::auth;

/// Everything that can stop the learner.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The trainer failed.
    #[error(transparent)]
    Learner(#[from] crate::error::LearnerError),
    /// The model or tokenizer failed.
    #[error(transparent)]
    Model(#[from] quill_model::Error),
    /// The prompt data is unusable.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// No usable job token.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// Metrics could not be written.
    #[error(transparent)]
    Telemetry(#[from] quill_telemetry::TelemetryError),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The server could not start or failed.
    #[error("learner server: {0}")]
    Server(String),
    /// Work off the step's critical path (publishing, checkpoint writing) failed.
    #[error("background work: {0}")]
    Offload(String),
    /// Start-up failed.
    #[error("learner start-up failed: {0}")]
    Startup(String),
}
