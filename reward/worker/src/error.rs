//! Why a reward worker stopped: each error says what it was doing and why it failed.

use quill_proto::member::MemberError;
use quill_telemetry::http::ConfiguredError;

/// Everything that can stop a reward worker.
#[derive(Debug, thiserror::Error)]
pub enum RewardWorkerError {
    /// The `Reward` service's address could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        /// The address asked for (`--listen`).
        addr: String,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The learner could not be reached or refused the registration.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// The job description the learner sent is unreadable.
    #[error("job description from the learner: {0}")]
    Job(serde_json::Error),
    /// The reward-model thread could not be started.
    #[error("starting the reward-model thread: {0}")]
    QualityThread(std::io::Error),
    /// The quality reward model could not be loaded.
    #[error("loading the quality reward model: {0}")]
    QualityModel(String),
    /// The LLM judge could not be set up.
    #[error(transparent)]
    Judge(#[from] crate::judge::JudgeSetupError),
    /// The Prometheus endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] ConfiguredError),
    /// The `Reward` server failed.
    #[error("reward server: {0}")]
    Server(#[source] tonic::transport::Error),
}
