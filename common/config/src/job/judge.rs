//! `[rewards.judge]`: the quality reward from an LLM judge on an OpenAI-compatible
//! endpoint instead of a local reward model.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What the judge is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeMode {
    /// Rate one answer on a scale (`min_score`..=`max_score`); the reward is the rating
    /// mapped onto [0, 1].
    #[default]
    Pointwise,
    /// Compare the answer with a reference answer, in both orders; the reward is the
    /// answer's mean outcome (win 1, tie 0.5, loss 0).
    Pairwise,
}

/// How the score is read from the judge's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeParse {
    /// From the reply's text: the number after the last `Score:` (pointwise), or the
    /// verdict `[[A]]`, `[[B]]` or `[[TIE]]` (pairwise).
    #[default]
    Text,
    /// Pointwise only: the expected rating over the first reply token's distribution
    /// (`top_logprobs`), counting tokens that are whole ratings in range.
    Logprobs,
}

/// `[rewards.judge]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeSection {
    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:8000/v1` (plain
    /// HTTP; put a TLS-terminating proxy in front of an HTTPS endpoint).
    pub endpoint: String,
    /// The `model` sent with every request.
    pub model: String,
    /// An environment variable holding the endpoint's API key (sent as a Bearer token).
    pub api_key_env: Option<String>,
    /// The rubric prompt template: `{question}` and `{answer}` once each, and for
    /// `pairwise` `{reference}` too (there `{answer}` and `{reference}` are "A" and "B",
    /// swapped in the second order).
    pub prompt_file: PathBuf,
    /// `pointwise` or `pairwise`.
    pub mode: JudgeMode,
    /// `text` or `logprobs`.
    pub parse: JudgeParse,
    /// Pairwise: a JSONL file of `{"question": ..., "reference": ...}` records.
    pub references: Option<PathBuf>,
    /// Lowest rating (pointwise).
    pub min_score: f64,
    /// Highest rating (pointwise).
    pub max_score: f64,
    /// Requests in flight at once, per reward worker.
    pub concurrency: usize,
    /// Seconds one request may take.
    pub timeout_seconds: f64,
    /// Further tries after a failed request or an unreadable reply.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff_seconds: f64,
    /// `max_tokens` of each judge request.
    pub max_tokens: usize,
    /// Sampling temperature of the judge (0: greedy).
    pub temperature: f64,
    /// Scores kept in the cache (keyed by prompt and answer); 0 turns it off.
    pub cache_entries: usize,
}

impl Default for JudgeSection {
    fn default() -> Self {
        JudgeSection {
            endpoint: String::new(),
            model: String::new(),
            api_key_env: None,
            prompt_file: PathBuf::new(),
            mode: JudgeMode::default(),
            parse: JudgeParse::default(),
            references: None,
            min_score: 1.0,
            max_score: 10.0,
            concurrency: 8,
            timeout_seconds: 60.0,
            retries: 3,
            backoff_seconds: 0.5,
            max_tokens: 512,
            temperature: 0.0,
            cache_entries: 100_000,
        }
    }
}
