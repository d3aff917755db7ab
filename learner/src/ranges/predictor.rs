//! The range predictor: asks an OpenAI-compatible chat endpoint (`POST /v1/chat/completions`)
//! for a question's target word range, and checks the answer with the recipe's rules.

use super::RangeError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use quill_reward::LengthRange;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpStream;

/// The placeholder a predictor template must contain exactly once.
pub const QUESTION_SLOT: &str = "{question}";

/// The built-in prompt: the recipe's rules for a predicted range.
pub const DEFAULT_TEMPLATE: &str = "You set the length of answers to writing tasks. For the \
task below, give the range of words a good answer should have, as [lo, hi]: both bounds \
multiples of 100 between 0 and 12000, hi - lo at most 3000. If no length makes sense for \
the task, give [0, 0]. Reply with the range only.\n\nTask: {question}";

/// What the predictor says about a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// A range within the recipe's bounds.
    Range(LengthRange),
    /// `[0, 0]`: no sensible range; the prompt is skipped.
    NoRange,
}

/// Settings of a range predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictorConfig {
    /// Base URL of the endpoint, `http://host:port` (the `/v1/chat/completions` path is
    /// added; a URL already ending in it is used as it is).
    pub url: String,
    /// The `model` field of each request.
    pub model: String,
    /// The prompt, with `{question}` exactly once.
    pub template: String,
    /// Limit on each request, connection included.
    pub timeout: Duration,
    /// Further tries after a failed one (transport errors, timeouts, 5xx/429, replies that
    /// are not a valid range), with doubling pauses from `backoff`.
    pub retries: u32,
    /// Pause before the first retry.
    pub backoff: Duration,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
}

impl PredictorConfig {
    /// A config for `url` and `model` with the built-in template, a 60 s timeout and 3 retries.
    pub fn new(url: &str, model: &str) -> Self {
        PredictorConfig {
            url: url.to_owned(),
            model: model.to_owned(),
            template: DEFAULT_TEMPLATE.to_owned(),
            timeout: Duration::from_secs(60),
            retries: 3,
            backoff: Duration::from_millis(500),
            api_key: None,
        }
    }
}

/// A client of one endpoint.
#[derive(Debug, Clone)]
pub struct RangePredictor {
    config: PredictorConfig,
    uri: Uri,
    authority: String,
    host: String,
    port: u16,
}

/// Why one try failed, and whether another may succeed.
enum Failure {
    Retry(RangeError),
    Fatal(RangeError),
}

impl RangePredictor {
    /// Checks the config; errors name the setting (`url`, `template`, `timeout`).
    pub fn new(config: PredictorConfig) -> Result<Self, RangeError> {
        let count = config.template.matches(QUESTION_SLOT).count();
        if count != 1 {
            return Err(RangeError::Config {
                field: "template",
                reason: format!("must contain {QUESTION_SLOT} exactly once (found {count})"),
            });
        }
        if config.timeout.is_zero() {
            return Err(RangeError::Config {
                field: "timeout",
                reason: "must be above 0".into(),
            });
        }
        let bad_url = |reason: &str| RangeError::Config {
            field: "url",
            reason: format!("{reason}, got {:?}", config.url),
        };
        let base = config.url.trim_end_matches('/');
        let full = if base.ends_with("/v1/chat/completions") {
            base.to_owned()
        } else {
            format!("{base}/v1/chat/completions")
        };
        let uri: Uri = full
            .parse()
            .map_err(|_| bad_url("must be an http:// URL such as http://127.0.0.1:8000"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad_url(
                "must start with http:// (plain HTTP; put TLS in a proxy)",
            ));
        }
        let host = uri.host().ok_or_else(|| bad_url("has no host"))?.to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri.authority().map(ToString::to_string).unwrap_or_default();
        Ok(RangePredictor {
            config,
            uri,
            authority,
            host,
            port,
        })
    }

    /// The endpoint's full URL.
    pub fn url(&self) -> String {
        self.uri.to_string()
    }

    /// The range for `question`, retrying as configured.
    pub async fn predict(&self, question: &str) -> Result<Prediction, RangeError> {
        let mut pause = self.config.backoff;
        let mut tries = 0;
        loop {
            match self.try_once(question).await {
                Ok(prediction) => return Ok(prediction),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) if tries >= self.config.retries => return Err(e),
                Err(Failure::Retry(e)) => {
                    tracing::debug!("range predictor: {e}; retrying in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    tries += 1;
                }
            }
        }
    }

    /// Predicts every question on a thread of its own (usable from sync code and from
    /// inside another runtime); results in order.
    pub fn predict_blocking(&self, questions: &[String]) -> Vec<Result<Prediction, RangeError>> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a current-thread runtime builds");
                    runtime.block_on(async {
                        let mut out = Vec::with_capacity(questions.len());
                        for q in questions {
                            out.push(self.predict(q).await);
                        }
                        out
                    })
                })
                .join()
                .expect("the predictor thread does not panic")
        })
    }

    async fn try_once(&self, question: &str) -> Result<Prediction, Failure> {
        let prompt = self
            .config
            .template
            .replacen(QUESTION_SLOT, question.trim(), 1);
        let body = json!({
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": 64,
        });
        let timeout = self.config.timeout;
        let (status, reply) = tokio::time::timeout(timeout, self.post(body.to_string()))
            .await
            .map_err(|_| {
                Failure::Retry(RangeError::Timeout {
                    url: self.url(),
                    seconds: timeout.as_secs_f64(),
                })
            })??;
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Failure::Retry(self.status_error(status, &reply)));
        }
        if !status.is_success() {
            return Err(Failure::Fatal(self.status_error(status, &reply)));
        }
        let content = serde_json::from_slice::<Value>(&reply)
            .ok()
            .and_then(|v| {
                v.pointer("/choices/0/message/content")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .ok_or_else(|| {
                Failure::Retry(RangeError::Malformed {
                    reply: shorten(&String::from_utf8_lossy(&reply)),
                    reason: "not a chat completion (no choices[0].message.content)".into(),
                })
            })?;
        parse_prediction(&content).map_err(|reason| {
            Failure::Retry(RangeError::Malformed {
                reply: shorten(&content),
                reason,
            })
        })
    }

    fn status_error(&self, status: StatusCode, body: &[u8]) -> RangeError {
        RangeError::Status {
            url: self.url(),
            status: status.as_u16(),
            body: shorten(&String::from_utf8_lossy(body)),
        }
    }

    async fn post(&self, body: String) -> Result<(StatusCode, Bytes), Failure> {
        let unreachable = |detail: String| {
            Failure::Retry(RangeError::Unreachable {
                url: self.url(),
                detail,
            })
        };
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let mut request = Request::post(self.uri.path())
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/json");
        if let Some(key) = &self.config.api_key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| {
            Failure::Fatal(RangeError::Config {
                field: "url",
                reason: e.to_string(),
            })
        })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("the connection failed: {e}")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(format!("the reply broke off: {e}")))?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    }
}

/// The first `[lo, hi]` in a reply, checked with the recipe's rules: `[0, 0]` is
/// [`Prediction::NoRange`]; otherwise bounds are multiples of 100 in 0–12,000 with
/// `lo <= hi` and a width of at most 3,000.
pub fn parse_prediction(reply: &str) -> Result<Prediction, String> {
    let (lo, hi) = first_pair(reply).ok_or("no [lo, hi] pair of whole numbers in the reply")?;
    if (lo, hi) == (0, 0) {
        return Ok(Prediction::NoRange);
    }
    let range = LengthRange::new(lo, hi).map_err(|e| e.to_string())?;
    range.check_recipe_bounds().map_err(|e| e.to_string())?;
    Ok(Prediction::Range(range))
}

/// The numbers of the first `[a, b]` (whitespace allowed) in `text`.
fn first_pair(text: &str) -> Option<(u32, u32)> {
    text.match_indices('[').find_map(|(start, _)| {
        let rest = &text[start + 1..];
        let inner = &rest[..rest.find(']')?];
        let (a, b) = inner.split_once(',')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    })
}

/// `text` cut to 200 characters for an error message.
fn shorten(text: &str) -> String {
    let mut out: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(lo: u32, hi: u32) -> Prediction {
        Prediction::Range(LengthRange::new(lo, hi).unwrap())
    }

    #[test]
    fn replies_are_parsed_and_checked_with_the_recipe_rules() {
        assert_eq!(parse_prediction("[1800, 2200]"), Ok(range(1800, 2200)));
        assert_eq!(
            parse_prediction("Range: [ 300 ,600 ] words"),
            Ok(range(300, 600))
        );
        assert_eq!(parse_prediction("[0, 0]"), Ok(Prediction::NoRange));
        assert_eq!(
            parse_prediction("[a] then [9000, 12000]"),
            Ok(range(9000, 12_000))
        );
        let err = |reply: &str| parse_prediction(reply).unwrap_err();
        assert!(err("about two thousand").contains("no [lo, hi]"));
        assert!(err("[1850, 2200]").contains("multiples of 100"));
        assert!(err("[1000, 4100]").contains("wider than"));
        assert!(err("[11000, 12100]").contains("12000"));
        assert!(err("[2200, 1800]").contains("lower bound is above"));
        assert!(err("[-100, 200]").contains("no [lo, hi]"));
    }

    #[test]
    fn bad_settings_name_the_field() {
        let err = |config: PredictorConfig| RangePredictor::new(config).unwrap_err().to_string();
        let base = PredictorConfig::new("http://127.0.0.1:9", "m");
        assert!(err(PredictorConfig {
            template: "no slot".into(),
            ..base.clone()
        })
        .starts_with("range predictor `template`"));
        assert!(err(PredictorConfig {
            url: "https://example.com".into(),
            ..base.clone()
        })
        .contains("`url`: must start with http://"));
        assert!(err(PredictorConfig {
            url: "not a url".into(),
            ..base.clone()
        })
        .contains("`url`"));
        assert!(err(PredictorConfig {
            timeout: Duration::ZERO,
            ..base.clone()
        })
        .contains("`timeout`"));
        let p = RangePredictor::new(PredictorConfig::new("http://127.0.0.1:9/", "m")).unwrap();
        assert_eq!(p.url(), "http://127.0.0.1:9/v1/chat/completions");
    }
}
