//! The quality reward from an LLM judge on an OpenAI-compatible endpoint
//! (`[rewards.judge]`): a rubric prompt per answer (pointwise rating, or a comparison
//! with a reference answer in both orders), at most `concurrency` requests in flight,
//! a timeout per request, retries with doubling backoff, and a cache keyed by prompt and
//! answer.

pub mod client;
pub mod verdict;

use client::{CallError, ChatClient};
use quill_config::job::{JudgeMode, JudgeParse, JudgeSection};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Semaphore;
use verdict::Verdict;

/// The judge of one reward worker.
pub struct Judge {
    config: JudgeSection,
    template: String,
    references: HashMap<String, String>,
    client: ChatClient,
    limit: Semaphore,
    cache: Mutex<HashMap<[u8; 32], f64>>,
}

/// A judge that cannot be set up; names the job field.
#[derive(Debug, thiserror::Error)]
#[error("rewards.judge.{field}: {reason}")]
pub struct JudgeSetupError {
    /// The field under `[rewards.judge]`.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn setup(field: &'static str, reason: impl Into<String>) -> JudgeSetupError {
    JudgeSetupError {
        field,
        reason: reason.into(),
    }
}

impl Judge {
    /// Reads the prompt template (and references) and builds the client.
    pub fn new(config: &JudgeSection) -> Result<Self, JudgeSetupError> {
        let template = std::fs::read_to_string(&config.prompt_file).map_err(|e| {
            setup(
                "prompt_file",
                format!("{}: {e}", config.prompt_file.display()),
            )
        })?;
        let slots: &[&str] = match config.mode {
            JudgeMode::Pointwise => &["{question}", "{answer}"],
            JudgeMode::Pairwise => &["{question}", "{answer_a}", "{answer_b}"],
        };
        for slot in slots {
            let count = template.matches(slot).count();
            if count != 1 {
                return Err(setup(
                    "prompt_file",
                    format!(
                        "{} must contain {slot} exactly once (found {count})",
                        config.prompt_file.display()
                    ),
                ));
            }
        }
        let references = match &config.references {
            Some(path) => read_references(path)?,
            None => HashMap::new(),
        };
        let key = match &config.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                setup(
                    "api_key_env",
                    format!("the environment variable {var} is not set"),
                )
            })?),
            None => None,
        };
        let client = ChatClient::new(
            &config.endpoint,
            key,
            Duration::from_secs_f64(config.timeout_seconds),
        )
        .map_err(|e| setup("endpoint", e))?;
        Ok(Judge {
            config: config.clone(),
            template,
            references,
            client,
            limit: Semaphore::new(config.concurrency),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Scores each `(question, answer)` in [0, 1], all requests concurrently up to the
    /// limit; the first failure (after its retries) fails the lot.
    pub async fn score(&self, items: &[(String, String)]) -> Result<Vec<f64>, String> {
        let calls = items.iter().map(|(q, a)| self.score_one(q, a));
        let mut scores = Vec::with_capacity(items.len());
        for result in futures_join(calls).await {
            scores.push(result.map_err(|e| e.to_string())?);
        }
        Ok(scores)
    }

    async fn score_one(&self, question: &str, answer: &str) -> Result<f64, CallError> {
        let key: [u8; 32] = Sha256::new()
            .chain_update(self.template.as_bytes())
            .chain_update([0])
            .chain_update(question.as_bytes())
            .chain_update([0])
            .chain_update(answer.as_bytes())
            .finalize()
            .into();
        if let Some(&score) = self.cache.lock().expect("poisoned").get(&key) {
            return Ok(score);
        }
        let score = match self.config.mode {
            JudgeMode::Pointwise => {
                let prompt = self
                    .template
                    .replacen("{question}", question, 1)
                    .replacen("{answer}", answer, 1);
                let (min, max) = (self.config.min_score, self.config.max_score);
                let rating = self.ask(&prompt, |reply| self.rating(reply)).await?;
                (rating - min) / (max - min)
            }
            JudgeMode::Pairwise => {
                let reference = self.references.get(question.trim()).ok_or_else(|| {
                    self.client.malformed(format!(
                        "no reference answer for the question {:?} in rewards.judge.references",
                        question.chars().take(80).collect::<String>()
                    ))
                })?;
                let first = self.compare(question, answer, reference).await?;
                let second = self.compare(question, reference, answer).await?;
                let outcome = |v: Verdict, answer_is_a: bool| match (v, answer_is_a) {
                    (Verdict::Tie, _) => 0.5,
                    (Verdict::A, true) | (Verdict::B, false) => 1.0,
                    _ => 0.0,
                };
                (outcome(first, true) + outcome(second, false)) / 2.0
            }
        };
        if self.config.cache_entries > 0 {
            let mut cache = self.cache.lock().expect("poisoned");
            if cache.len() >= self.config.cache_entries {
                cache.clear();
            }
            cache.insert(key, score);
        }
        Ok(score)
    }

    async fn compare(&self, question: &str, a: &str, b: &str) -> Result<Verdict, CallError> {
        let prompt = self
            .template
            .replacen("{question}", question, 1)
            .replacen("{answer_a}", a, 1)
            .replacen("{answer_b}", b, 1);
        self.ask(&prompt, |reply| verdict::verdict(&reply_text(reply)?))
            .await
    }

    fn rating(&self, reply: &Value) -> Result<f64, String> {
        let (min, max) = (self.config.min_score, self.config.max_score);
        match self.config.parse {
            JudgeParse::Text => verdict::rating_from_text(&reply_text(reply)?, min, max),
            JudgeParse::Logprobs => verdict::rating_from_logprobs(reply, min, max),
        }
    }

    /// Sends one prompt and reads the reply, retrying transient failures and unreadable
    /// replies with doubling backoff.
    async fn ask<T>(
        &self,
        prompt: &str,
        read: impl Fn(&Value) -> Result<T, String>,
    ) -> Result<T, CallError> {
        let mut body = json!({
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        });
        if self.config.parse == JudgeParse::Logprobs {
            body["max_tokens"] = json!(1);
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(20);
        }
        let mut backoff = self.config.backoff_seconds;
        let mut tries = 0;
        loop {
            let result = {
                let _permit = self.limit.acquire().await.expect("never closed");
                self.client.post(&body).await
            };
            let result =
                result.and_then(|reply| read(&reply).map_err(|e| self.client.malformed(e)));
            match result {
                Ok(value) => return Ok(value),
                Err(error) if error.is_transient() && tries < self.config.retries => {
                    tracing::warn!(%error, retry_in_s = backoff, "judge request failed; retrying");
                    tokio::time::sleep(Duration::from_secs_f64(backoff)).await;
                    backoff *= 2.0;
                    tries += 1;
                }
                Err(error) if tries > 0 => {
                    return Err(match error {
                        CallError::Malformed { url, reason } => CallError::Malformed {
                            url,
                            reason: format!("{reason} (after {} tries)", tries + 1),
                        },
                        other => other,
                    })
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Cached scores (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.lock().expect("poisoned").len()
    }
}

/// The text of the first choice of a chat reply.
fn reply_text(reply: &Value) -> Result<String, String> {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no choices[0].message.content in {}", truncate(reply)))
}

fn truncate(value: &Value) -> String {
    value.to_string().chars().take(200).collect()
}

/// Runs futures concurrently on the current task and returns their results in order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut results: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(|r| r.expect("ready")).collect()
}

fn read_references(path: &Path) -> Result<HashMap<String, String>, JudgeSetupError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| setup("references", format!("{}: {e}", path.display())))?;
    let mut references = HashMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let record: Value = serde_json::from_str(line).map_err(|e| {
            setup(
                "references",
                format!("{} line {}: {e}", path.display(), i + 1),
            )
        })?;
        let field = |name: &str| {
            record[name].as_str().map(str::to_owned).ok_or_else(|| {
                setup(
                    "references",
                    format!(
                        "{} line {}: no string field `{name}`",
                        path.display(),
                        i + 1
                    ),
                )
            })
        };
        references.insert(field("question")?.trim().to_owned(), field("reference")?);
    }
    Ok(references)
}
