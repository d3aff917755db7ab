//! A length range for every prompt: the stated-count rules first, otherwise a range
//! predicted by a model behind an OpenAI-compatible endpoint (`predictor`), and the
//! offline tool that writes ranges into a prompt file (`fill`, `quill data ranges`).

mod fill;
mod predictor;
#[cfg(test)]
pub(crate) mod tests;

pub use fill::{fill_ranges, FillCounts, FillFields};
pub use predictor::{
    parse_prediction, Prediction, PredictorConfig, RangePredictor, DEFAULT_TEMPLATE, QUESTION_SLOT,
};

/// What can go wrong while predicting or filling ranges.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    /// A predictor setting has a bad value.
    #[error("range predictor `{field}`: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The endpoint cannot be reached (refused, reset, closed mid-reply).
    #[error("the range predictor at {url} is unreachable: {detail}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// What the connection said.
        detail: String,
    },
    /// The endpoint did not answer in time.
    #[error("the range predictor at {url} did not answer within {seconds} s")]
    Timeout {
        /// The endpoint.
        url: String,
        /// The limit.
        seconds: f64,
    },
    /// The endpoint answered with an error status.
    #[error("the range predictor at {url} answered HTTP {status}: {body}")]
    Status {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the reply.
        body: String,
    },
    /// The reply is not a valid range.
    #[error("the range predictor's reply {reply:?} is not a valid range: {reason}")]
    Malformed {
        /// The start of the reply.
        reply: String,
        /// Why it is not valid.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line of the input is unusable.
    #[error("{path}, line {line}: {reason}")]
    Record {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl RangeError {
    /// Whether the error is about the endpoint itself (down, slow, refusing) rather than one
    /// question's reply.
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            RangeError::Unreachable { .. } | RangeError::Timeout { .. } | RangeError::Status { .. }
        )
    }
}
