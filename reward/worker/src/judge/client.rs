//! A small client for an OpenAI-compatible `/chat/completions` endpoint (plain HTTP/1.1
//! through hyper), with a timeout per request and errors that say which failures are
//! worth retrying.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

/// Why one request to the judge failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection, or it broke.
    #[error("the judge endpoint {url} cannot be reached: {reason}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// What failed.
        reason: String,
    },
    /// No answer in time.
    #[error("the judge endpoint {url} did not answer within {seconds} s")]
    Timeout {
        /// The URL called.
        url: String,
        /// The limit.
        seconds: f64,
    },
    /// An HTTP error status.
    #[error("the judge endpoint {url} answered {status}: {body}")]
    Status {
        /// The URL called.
        url: String,
        /// The status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// A reply that is not the JSON the API promises, or whose score cannot be read.
    #[error("unreadable reply from the judge endpoint {url}: {reason}")]
    Malformed {
        /// The URL called.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl CallError {
    /// Whether another try may succeed (not for a refused request, such as a wrong key).
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => true,
        }
    }
}

/// Calls one endpoint's `/chat/completions`.
pub struct ChatClient {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    url: String,
    key: Option<String>,
    timeout: Duration,
}

impl ChatClient {
    /// A client for the API at `endpoint` (the base URL, ending in `/v1` or similar).
    pub fn new(endpoint: &str, key: Option<String>, timeout: Duration) -> Result<Self, String> {
        let url = format!("{}/chat/completions", endpoint.trim().trim_end_matches('/'));
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{endpoint}` is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!("`{endpoint}` is not an http:// URL with a host"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Ok(ChatClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            uri,
            url,
            key,
            timeout,
        })
    }

    /// The URL called.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Posts `body` and returns the reply's JSON.
    pub async fn post(&self, body: &Value) -> Result<Value, CallError> {
        let mut request =
            hyper::Request::post(self.uri.clone()).header(CONTENT_TYPE, "application/json");
        if let Some(key) = &self.key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| self.unreachable(e))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(e))?
                .to_bytes();
            Ok::<_, CallError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CallError::Timeout {
                url: self.url.clone(),
                seconds: self.timeout.as_secs_f64(),
            })??;
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            return Err(CallError::Status {
                url: self.url.clone(),
                status,
                body: text.chars().take(300).collect(),
            });
        }
        serde_json::from_str(&text).map_err(|e| self.malformed(format!("not JSON ({e})")))
    }

    fn unreachable(&self, error: impl std::error::Error) -> CallError {
        let mut reason = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        CallError::Unreachable {
            url: self.url.clone(),
            reason,
        }
    }

    /// A [`CallError::Malformed`] for this endpoint.
    pub fn malformed(&self, reason: impl Into<String>) -> CallError {
        CallError::Malformed {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }
}
