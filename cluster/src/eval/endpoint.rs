//! Calls to an OpenAI-compatible chat endpoint (the generator's or the judge's) through
//! the judge's HTTP client: transient failures retried with doubling pauses, an
//! unreadable reply asked again and, after the retries, reported rather than fatal.

use anyhow::{anyhow, Context};
use quill_reward_worker::judge::client::ChatClient;
use serde_json::{json, Value};
use std::time::Duration;

/// One endpoint, named in errors by the flag that gave it.
pub struct Endpoint {
    client: ChatClient,
    flag: &'static str,
    model: String,
    retries: u32,
    backoff: Duration,
}

/// Retry settings shared by every endpoint of a run.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Seconds one request may take.
    pub timeout: Duration,
    /// Further tries after a failure.
    pub retries: u32,
    /// Pause before the first retry.
    pub backoff: Duration,
}

impl Endpoint {
    /// A client for `url` (`flag` names it in errors), sending `model`; the API key comes
    /// from the environment variable `key_env` when given.
    pub fn new(
        flag: &'static str,
        url: &str,
        model: &str,
        key_env: Option<&str>,
        retry: Retry,
    ) -> anyhow::Result<Self> {
        let key = match key_env {
            Some(var) => Some(
                std::env::var(var)
                    .with_context(|| format!("{flag}: the API key variable {var} is not set"))?,
            ),
            None => None,
        };
        let client =
            ChatClient::new(url, key, retry.timeout).map_err(|e| anyhow!("{flag}: {e}"))?;
        Ok(Endpoint {
            client,
            flag,
            model: model.to_owned(),
            retries: retry.retries,
            backoff: retry.backoff,
        })
    }

    /// A chat request body with one user message and `extra` fields.
    pub fn body(&self, content: &str, extra: Value) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
        });
        if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
            body.extend(extra);
        }
        body
    }

    /// Posts `body` and reads the reply with `read`. Transient failures (no connection,
    /// timeouts, 5xx, 429) and unreadable replies are tried again up to the retries; a
    /// reply still unreadable after them is `Ok(Err(reason))`; any other failure is an
    /// error naming the flag.
    pub async fn ask<T>(
        &self,
        body: &Value,
        read: impl Fn(&Value) -> Result<T, String>,
    ) -> anyhow::Result<Result<T, String>> {
        let mut pause = self.backoff;
        let mut tries = 0;
        loop {
            let failure = match self.client.post(body).await {
                Ok(reply) => match read(&reply) {
                    Ok(value) => return Ok(Ok(value)),
                    Err(reason) if tries >= self.retries => {
                        return Ok(Err(format!("{reason} (after {} tries)", tries + 1)))
                    }
                    Err(reason) => reason,
                },
                Err(error) if error.is_transient() && tries < self.retries => error.to_string(),
                Err(error) => {
                    return Err(anyhow!(
                        "{}: {error}{}",
                        self.flag,
                        if tries > 0 {
                            format!(" (after {} tries)", tries + 1)
                        } else {
                            String::new()
                        }
                    ))
                }
            };
            tracing::warn!(endpoint = self.client.url(), %failure, retry_in_s = pause.as_secs_f64(), "retrying");
            tokio::time::sleep(pause).await;
            pause *= 2;
            tries += 1;
        }
    }
}

/// The text of a chat reply's first choice.
pub fn reply_text(reply: &Value) -> Result<String, String> {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "no choices[0].message.content in {}",
                reply.to_string().chars().take(200).collect::<String>()
            )
        })
}
