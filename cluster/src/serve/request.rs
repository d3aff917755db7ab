//! OpenAI request bodies, read field by field so that every error names its field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// An error answered as OpenAI's `{"error": {...}}` document.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What is wrong.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 about one field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("`{param}`: {}", message.into()),
            param: Some(param.to_owned()),
        }
    }

    /// An error with a status and no field.
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// OpenAI's error type for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": Value::Null,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Server-side bounds on what a request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The name `/v1/models` lists; requests must name it.
    pub model: String,
    /// Largest `n`.
    pub max_n: usize,
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    /// Most prompts in one completions request.
    pub max_prompts: usize,
}

/// Most `stop` strings (OpenAI's bound).
const MAX_STOP: usize = 4;
/// Most `top_logprobs` / completions `logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What both endpoints share.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Choices per prompt.
    pub n: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// New tokens per choice at most.
    pub max_tokens: usize,
    /// Stop strings (not part of the returned text).
    pub stop: Vec<String>,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk with token counts (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Random seed, if the request fixes one.
    pub seed: Option<u64>,
    /// Whether to return per-token log-probs.
    pub logprobs: bool,
    /// Most likely alternatives per token to list.
    pub top_logprobs: usize,
}

/// A checked `/v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The prompts, used as written.
    pub prompts: Vec<String>,
    /// Sampling settings.
    pub sampling: Sampling,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// A checked `/v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Sampling settings.
    pub sampling: Sampling,
}

/// The fields of one JSON object, read once each; what is left unread is unknown.
struct Fields {
    map: Map<String, Value>,
    read: BTreeSet<String>,
}

impl Fields {
    fn new(body: Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(map) => Ok(Fields {
                map,
                read: BTreeSet::new(),
            }),
            _ => Err(ApiError::status(
                StatusCode::BAD_REQUEST,
                "the request body must be a JSON object",
            )),
        }
    }

    /// The value of `name` unless it is absent or null.
    fn get(&mut self, name: &str) -> Option<Value> {
        self.read.insert(name.to_owned());
        self.map.get(name).filter(|v| !v.is_null()).cloned()
    }

    fn bool(&mut self, name: &str, default: bool) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(ApiError::field(
                name,
                format!("must be true or false, got {other}"),
            )),
        }
    }

    fn number(&mut self, name: &str, default: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if x.is_finite() && (lo..=hi).contains(&x) {
                    Ok(x)
                } else {
                    Err(ApiError::field(
                        name,
                        format!("must be between {lo} and {hi}, got {n}"),
                    ))
                }
            }
            Some(other) => Err(ApiError::field(
                name,
                format!("must be a number, got {other}"),
            )),
        }
    }

    fn integer(&mut self, name: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::field(
                    name,
                    format!("must be an integer from {lo} to {hi}, got {n}"),
                )),
            },
            Some(other) => Err(ApiError::field(
                name,
                format!("must be an integer, got {other}"),
            )),
        }
    }

    /// A field quill does not implement: accepted only at its neutral value.
    fn neutral(&mut self, name: &str, is_neutral: impl Fn(&Value) -> bool) -> Result<(), ApiError> {
        match self.get(name) {
            Some(v) if !is_neutral(&v) => Err(ApiError::field(
                name,
                format!("is not supported by quill serve (got {v})"),
            )),
            _ => Ok(()),
        }
    }

    /// Fails on the first field no reader asked for.
    fn finish(self) -> Result<(), ApiError> {
        match self.map.keys().find(|k| !self.read.contains(*k)) {
            Some(unknown) => Err(ApiError::field(unknown, "unknown field")),
            None => Ok(()),
        }
    }
}

fn string_list(name: &str, value: Value) -> Result<Vec<String>, ApiError> {
    match value {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s),
                other => Err(ApiError::field(
                    &format!("{name}[{i}]"),
                    format!("must be a string, got {other}"),
                )),
            })
            .collect(),
        other => Err(ApiError::field(
            name,
            format!("must be a string or an array of strings, got {other}"),
        )),
    }
}

/// Checks `model` and the sampling fields both endpoints share.
fn sampling(
    fields: &mut Fields,
    limits: &Limits,
    logprobs: bool,
    top_logprobs: usize,
) -> Result<Sampling, ApiError> {
    match fields.get("model") {
        None => return Err(ApiError::field("model", "is required")),
        Some(Value::String(m)) if m == limits.model => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "`model`: `{m}` is not served here; this server serves `{}`",
                    limits.model
                ),
                param: Some("model".into()),
            })
        }
        Some(other) => {
            return Err(ApiError::field(
                "model",
                format!("must be a string, got {other}"),
            ))
        }
    }
    let n = fields.integer("n", 1, limits.max_n as u64)?.unwrap_or(1) as usize;
    let temperature = fields.number("temperature", 1.0, 0.0, 2.0)?;
    let top_p = fields.number("top_p", 1.0, 0.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::field("top_p", "must be greater than 0"));
    }
    let mut max_tokens = fields.integer("max_tokens", 1, limits.max_tokens as u64)?;
    if let Some(m) = fields.integer("max_completion_tokens", 1, limits.max_tokens as u64)? {
        max_tokens = Some(m);
    }
    let stop = match fields.get("stop") {
        None => Vec::new(),
        Some(value) => string_list("stop", value)?,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::field(
            "stop",
            format!("at most {MAX_STOP} strings, got {}", stop.len()),
        ));
    }
    if let Some(i) = stop.iter().position(String::is_empty) {
        return Err(ApiError::field(&format!("stop[{i}]"), "must not be empty"));
    }
    let stream = fields.bool("stream", false)?;
    let include_usage = match fields.get("stream_options") {
        None => false,
        Some(Value::Object(options)) if stream => {
            let mut options = Fields::new(Value::Object(options))?;
            let include = options.bool("include_usage", false).map_err(|e| {
                ApiError::field(
                    "stream_options.include_usage",
                    e.message.replace("`include_usage`: ", ""),
                )
            })?;
            options.finish().map_err(|e| {
                ApiError::field(
                    &format!("stream_options.{}", e.param.unwrap_or_default()),
                    "unknown field",
                )
            })?;
            include
        }
        Some(Value::Object(_)) => {
            return Err(ApiError::field(
                "stream_options",
                "is only allowed when `stream` is true",
            ))
        }
        Some(other) => {
            return Err(ApiError::field(
                "stream_options",
                format!("must be an object, got {other}"),
            ))
        }
    };
    let seed = fields.integer("seed", 0, u64::MAX)?;
    fields.get("user");
    for penalty in ["presence_penalty", "frequency_penalty"] {
        fields.neutral(penalty, |v| v.as_f64() == Some(0.0))?;
    }
    fields.neutral("logit_bias", |v| v.as_object().is_some_and(Map::is_empty))?;
    Ok(Sampling {
        n,
        temperature,
        top_p,
        max_tokens: max_tokens.unwrap_or(limits.default_max_tokens as u64) as usize,
        stop,
        stream,
        include_usage,
        seed,
        logprobs,
        top_logprobs,
    })
}

/// Reads a `/v1/completions` body.
pub fn completion(body: Value, limits: &Limits) -> Result<CompletionRequest, ApiError> {
    let mut fields = Fields::new(body)?;
    let prompts = match fields.get("prompt") {
        None => return Err(ApiError::field("prompt", "is required")),
        Some(value) => string_list("prompt", value)?,
    };
    if prompts.is_empty() || prompts.len() > limits.max_prompts {
        return Err(ApiError::field(
            "prompt",
            format!(
                "must hold 1 to {} prompts, got {}",
                limits.max_prompts,
                prompts.len()
            ),
        ));
    }
    if let Some(i) = prompts.iter().position(String::is_empty) {
        return Err(ApiError::field(
            &format!("prompt[{i}]"),
            "must not be empty",
        ));
    }
    let top = fields.integer("logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
    let sampling = sampling(
        &mut fields,
        limits,
        top.is_some(),
        top.unwrap_or(0) as usize,
    )?;
    fields.neutral("echo", |v| v == &Value::Bool(false))?;
    fields.neutral("suffix", |_| false)?;
    fields.neutral("best_of", |v| {
        v.as_u64().is_some_and(|b| b == 1 || b == sampling.n as u64)
    })?;
    fields.finish()?;
    Ok(CompletionRequest { prompts, sampling })
}

/// Reads a `/v1/chat/completions` body.
pub fn chat(body: Value, limits: &Limits) -> Result<ChatRequest, ApiError> {
    let mut fields = Fields::new(body)?;
    let messages = match fields.get("messages") {
        None => return Err(ApiError::field("messages", "is required")),
        Some(Value::Array(items)) if !items.is_empty() => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| message(i, item))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(ApiError::field(
                "messages",
                format!("must be a non-empty array of messages, got {other}"),
            ))
        }
    };
    let logprobs = fields.bool("logprobs", false)?;
    let top = fields
        .integer("top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?
        .unwrap_or(0) as usize;
    if top > 0 && !logprobs {
        return Err(ApiError::field(
            "top_logprobs",
            "needs `logprobs` set to true",
        ));
    }
    let sampling = sampling(&mut fields, limits, logprobs, top)?;
    fields.neutral("tools", |v| v.as_array().is_some_and(Vec::is_empty))?;
    fields.neutral("tool_choice", |v| v == "none")?;
    fields.neutral("response_format", |v| v["type"] == "text")?;
    fields.finish()?;
    Ok(ChatRequest { messages, sampling })
}

fn message(i: usize, item: Value) -> Result<Message, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(map) = item else {
        return Err(ApiError::field(
            &format!("messages[{i}]"),
            format!("must be an object with `role` and `content`, got {item}"),
        ));
    };
    let role = match map.get("role") {
        Some(Value::String(r))
            if ["system", "user", "assistant", "developer"].contains(&r.as_str()) =>
        {
            r.clone()
        }
        Some(other) => {
            return Err(ApiError::field(
                &at("role"),
                format!("must be system, user, assistant or developer, got {other}"),
            ))
        }
        None => return Err(ApiError::field(&at("role"), "is required")),
    };
    let content = match map.get("content") {
        Some(Value::String(c)) => c.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(
                |(j, part)| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text),
                    _ => Err(ApiError::field(
                        &format!("messages[{i}].content[{j}]"),
                        "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                    )),
                },
            )
            .collect::<Result<Vec<_>, _>>()?
            .concat(),
        Some(other) => {
            return Err(ApiError::field(
                &at("content"),
                format!("must be a string, got {other}"),
            ))
        }
        None => return Err(ApiError::field(&at("content"), "is required")),
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !["role", "content", "name"].contains(&k.as_str()))
    {
        return Err(ApiError::field(&at(unknown), "unknown field"));
    }
    Ok(Message { role, content })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            model: "tiny".into(),
            max_n: 8,
            max_tokens: 1000,
            default_max_tokens: 64,
            max_prompts: 4,
        }
    }

    fn param_of(body: Value) -> (StatusCode, String, String) {
        let e = completion(body, &limits()).unwrap_err();
        (e.status, e.param.unwrap_or_default(), e.message)
    }

    #[test]
    fn reads_a_full_completion_request() {
        let r = completion(
            json!({"model": "tiny", "prompt": ["a", "b"], "n": 3, "temperature": 0,
                   "top_p": 0.5, "max_tokens": 7, "stop": "x", "logprobs": 2, "stream": true,
                   "stream_options": {"include_usage": true}, "seed": 5, "user": "u"}),
            &limits(),
        )
        .unwrap();
        assert_eq!(r.prompts, ["a", "b"]);
        let s = r.sampling;
        assert_eq!(
            (s.n, s.max_tokens, s.seed, s.top_logprobs),
            (3, 7, Some(5), 2)
        );
        assert_eq!((s.temperature, s.top_p), (0.0, 0.5));
        assert!(s.logprobs && s.stream && s.include_usage);
        assert_eq!(s.stop, ["x"]);
        let d = completion(json!({"model": "tiny", "prompt": "a"}), &limits()).unwrap();
        assert_eq!(d.sampling.max_tokens, 64);
        assert!(!d.sampling.logprobs);
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (json!({"prompt": "a"}), "model"),
            (json!({"model": "tiny"}), "prompt"),
            (json!({"model": "tiny", "prompt": 3}), "prompt"),
            (json!({"model": "tiny", "prompt": ["a", 1]}), "prompt[1]"),
            (json!({"model": "tiny", "prompt": "a", "n": 0}), "n"),
            (json!({"model": "tiny", "prompt": "a", "n": 9}), "n"),
            (
                json!({"model": "tiny", "prompt": "a", "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "temperature": 3}),
                "temperature",
            ),
            (json!({"model": "tiny", "prompt": "a", "top_p": 0}), "top_p"),
            (
                json!({"model": "tiny", "prompt": "a", "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "max_tokens": 5000}),
                "max_tokens",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "stop": ["a", ""]}),
                "stop[1]",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "logprobs": 21}),
                "logprobs",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "echo": true}),
                "echo",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "presence_penalty": 1}),
                "presence_penalty",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "stream_options": {}}),
                "stream_options",
            ),
            (
                json!({"model": "tiny", "prompt": "a", "frobnicate": 1}),
                "frobnicate",
            ),
        ];
        for (body, field) in cases {
            let (status, param, message) = param_of(body.clone());
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(param, field, "{body}: {message}");
            assert!(message.contains(field), "{message}");
        }
        let (status, param, _) = param_of(json!({"model": "big", "prompt": "a"}));
        assert_eq!((status, param.as_str()), (StatusCode::NOT_FOUND, "model"));
    }

    #[test]
    fn reads_chat_messages_and_names_bad_ones() {
        let r = chat(
            json!({"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                   "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 9}),
            &limits(),
        )
        .unwrap();
        assert_eq!(r.messages[1].content, "hi");
        assert_eq!((r.sampling.top_logprobs, r.sampling.max_tokens), (3, 9));
        for (body, field) in [
            (json!({"model": "tiny", "messages": []}), "messages"),
            (
                json!({"model": "tiny", "messages": [{"content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
                "top_logprobs",
            ),
        ] {
            let e = chat(body.clone(), &limits()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
        }
    }
}
