//! What the engine is asked for and what it gives back.

use crate::engine::sampling::SamplingParams;
use crossbeam_channel::Sender;

/// One prompt and how many samples (the GRPO group size) to draw from it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Caller's id, echoed in the output.
    pub id: u64,
    /// Prompt token ids.
    pub prompt: Vec<i64>,
    /// Number of samples; they share one prefill of the prompt.
    pub n: usize,
    /// How to sample and when to stop.
    pub params: SamplingParams,
}

/// Why a sample ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced this stop token (kept as its last token).
    StopToken(i64),
    /// Its text came to contain this stop string.
    StopString(String),
    /// It reached `max_new_tokens`.
    Length,
    /// It filled the model's context.
    Context,
}

impl FinishReason {
    /// A short name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::StopToken(_) => "stop_token",
            FinishReason::StopString(_) => "stop_string",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
    }
}

/// One finished sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Generated token ids (stop token included).
    pub tokens: Vec<i64>,
    /// Per generated token, its log-probability under the distribution it was sampled
    /// from (see [`crate::engine::sampling`] for exactly which).
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// The decoded text of `tokens`.
    pub text: String,
    /// Weights version in force when the first token was sampled.
    pub version_first: u64,
    /// Weights version in force when the last token was sampled.
    pub version_last: u64,
}

/// All samples of one request, in sample order.
#[derive(Debug, Clone)]
pub struct GroupOutput {
    /// The request's id.
    pub id: u64,
    /// The prompt's token ids.
    pub prompt: Vec<i64>,
    /// The samples.
    pub samples: Vec<Sample>,
    /// Seconds from admission of the request to its last sample.
    pub seconds: f64,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The request itself is unusable.
    #[error("invalid generation request {id}: {reason}")]
    Invalid {
        /// The request's id.
        id: u64,
        /// What is wrong.
        reason: String,
    },
    /// The model rejected the input or libtorch failed while it ran.
    #[error("generation request {id} failed: {reason}")]
    Failed {
        /// The request's id.
        id: u64,
        /// The underlying error.
        reason: String,
    },
    /// The engine stopped before the request finished.
    #[error("the generation engine has shut down")]
    ShutDown,
}

/// One token as the engine samples it, for a watcher that streams output.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// Which sample of the request it belongs to.
    pub index: usize,
    /// The sampled token id.
    pub token: i64,
    /// Its log-probability (as in [`Sample::logprobs`]).
    pub logprob: f32,
    /// The most likely tokens of the same distribution and their log-probabilities,
    /// most likely first ([`TokenStream::top_logprobs`] of them).
    pub top: Vec<(i64, f32)>,
}

/// Where the engine sends a request's tokens as it samples them; never blocks the
/// engine (the channel is unbounded, and a closed one is ignored).
#[derive(Debug, Clone)]
pub struct TokenStream {
    /// Receives one event per sampled token.
    pub sender: Sender<TokenEvent>,
    /// How many most-likely alternatives each event lists (0 for none).
    pub top_logprobs: usize,
}
