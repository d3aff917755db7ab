//! The reward worker role: the `Reward` gRPC service that scores rollout groups (length,
//! format and, with a reward model, quality), turns them into advantages and forwards them
//! to the learner (`service`); the reward-model scorer on its own thread and the choice of
//! quality source (`quality`); the LLM judge on an OpenAI-compatible endpoint (`judge`); and
//! the worker process (`process`); and its error type (`error`).

pub mod error;
pub mod judge;
pub mod process;
pub mod quality;
pub mod service;

pub use error::RewardWorkerError;
