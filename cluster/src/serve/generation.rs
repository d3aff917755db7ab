//! `/v1/completions` and `/v1/chat/completions`: requests to engine requests, and engine
//! output to OpenAI's JSON, whole or as server-sent events.

use super::output::{self, Streamed};
use super::request::{self, ApiError, Sampling};
use super::App;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use quill_actor::{
    GenerationError, GenerationRequest, GroupOutput, SamplingParams, TokenEvent, TokenStream,
};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Which API shapes the answer.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Completion,
    Chat,
}

impl Api {
    fn endpoint(self) -> &'static str {
        match self {
            Api::Completion => "completions",
            Api::Chat => "chat_completions",
        }
    }

    /// The request field that holds the prompt (named in prompt errors).
    fn prompt_field(self) -> &'static str {
        match self {
            Api::Completion => "prompt",
            Api::Chat => "messages",
        }
    }
}

/// What the engine sends back for one prompt.
enum Update {
    Token(usize, TokenEvent),
    Done(usize, Result<GroupOutput, GenerationError>),
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn parse(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::status(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {e}"),
        )
    })
}

/// `POST /v1/completions`.
pub async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let answer = async {
        let request = request::completion(parse(&body)?, &app.limits)?;
        let prompts = request
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| encode(&app, p, &format!("prompt[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        generate(&app, Api::Completion, prompts, request.sampling, Vec::new()).await
    };
    finish(&app, Api::Completion, answer.await)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let answer = async {
        let request = request::chat(parse(&body)?, &app.limits)?;
        let text = app
            .chat
            .render(&request.messages)
            .map_err(|e| ApiError::field("messages", format!("{e:#}")))?;
        let prompt = encode(&app, &text, "messages")?;
        generate(
            &app,
            Api::Chat,
            vec![prompt],
            request.sampling,
            app.chat.stop_strings(),
        )
        .await
    };
    finish(&app, Api::Chat, answer.await)
}

fn finish(app: &App, api: Api, answer: Result<Response, ApiError>) -> Response {
    let response = answer.unwrap_or_else(IntoResponse::into_response);
    app.metrics
        .request(api.endpoint(), response.status().as_u16());
    response
}

fn encode(app: &App, text: &str, field: &str) -> Result<Vec<i64>, ApiError> {
    let ids = app
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::field(field, e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::field(field, "has no tokens"));
    }
    Ok(ids)
}

fn engine_error(api: Api, error: GenerationError) -> ApiError {
    match error {
        GenerationError::Invalid { reason, .. } => ApiError::field(api.prompt_field(), reason),
        GenerationError::Failed { reason, .. } => ApiError::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {reason}"),
        ),
        GenerationError::ShutDown => ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the generation engine is shutting down",
        ),
    }
}

/// Submits one engine request per prompt and answers whole or streamed.
async fn generate(
    app: &Arc<App>,
    api: Api,
    prompts: Vec<Vec<i64>>,
    sampling: Sampling,
    mut stops: Vec<String>,
) -> Result<Response, ApiError> {
    stops.extend(sampling.stop.iter().cloned());
    let seed = sampling.seed.unwrap_or_else(rand::random);
    let (updates, mut inbox) = mpsc::unbounded_channel();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let count = prompts.len();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let request = GenerationRequest {
            id: i as u64,
            prompt,
            n: sampling.n,
            params: SamplingParams {
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: 0,
                max_new_tokens: sampling.max_tokens,
                seed: seed.wrapping_add(i as u64),
                stop_token_ids: app.stop_token_ids.clone(),
                stop_strings: stops.clone(),
            },
        };
        let app = Arc::clone(app);
        let updates = updates.clone();
        let top = sampling.top_logprobs;
        tokio::task::spawn_blocking(move || watch(&app, request, top, i, &updates));
    }
    drop(updates);
    let reply = Reply {
        app: Arc::clone(app),
        api,
        id: format!(
            "{}-{}",
            if api == Api::Chat { "chatcmpl" } else { "cmpl" },
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_now(),
        sampling,
        stops,
        count,
        prompt_tokens,
    };
    if reply.sampling.stream {
        // A request the engine refuses at once (a prompt too long) is still a 4xx.
        let first = inbox.recv().await;
        if let Some(Update::Done(_, Err(error))) = first {
            return Err(engine_error(api, error));
        }
        Ok(reply.stream(first, inbox))
    } else {
        reply.whole(inbox).await
    }
}

/// Runs on a blocking thread: submits the request and forwards its tokens and result.
fn watch(
    app: &App,
    request: GenerationRequest,
    top_logprobs: usize,
    prompt: usize,
    updates: &mpsc::UnboundedSender<Update>,
) {
    let (sender, events) = crossbeam_channel::unbounded();
    let answer = app.engine.submit_watched(
        request,
        Some(TokenStream {
            sender,
            top_logprobs,
        }),
    );
    loop {
        crossbeam_channel::select! {
            recv(events) -> event => match event {
                Ok(event) => {
                    if updates.send(Update::Token(prompt, event)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            },
            recv(answer) -> result => {
                for event in events.try_iter() {
                    let _ = updates.send(Update::Token(prompt, event));
                }
                let result = result.unwrap_or(Err(GenerationError::ShutDown));
                let _ = updates.send(Update::Done(prompt, result));
                return;
            }
        }
    }
    let result = answer.recv().unwrap_or(Err(GenerationError::ShutDown));
    let _ = updates.send(Update::Done(prompt, result));
}

/// Everything needed to shape one request's answer.
struct Reply {
    app: Arc<App>,
    api: Api,
    id: String,
    created: u64,
    sampling: Sampling,
    stops: Vec<String>,
    count: usize,
    prompt_tokens: usize,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.app.limits.model,
            "choices": choices,
        })
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    /// The log-probs object for some tokens, or null when not asked for.
    fn logprobs(
        &self,
        tokens: &[i64],
        logprobs: &[f32],
        events: &[TokenEvent],
        offset: usize,
    ) -> Value {
        if !self.sampling.logprobs {
            return Value::Null;
        }
        let tokenizer = &self.app.tokenizer;
        match self.api {
            Api::Completion => output::completion_logprobs(
                tokenizer,
                tokens,
                logprobs,
                events,
                offset,
                self.sampling.top_logprobs,
            ),
            Api::Chat => output::chat_logprobs(tokenizer, tokens, logprobs, events),
        }
    }

    fn choice(
        &self,
        index: usize,
        text: String,
        logprobs: Value,
        finish: Option<&str>,
        chunk: bool,
    ) -> Value {
        match (self.api, chunk) {
            (Api::Completion, _) => json!({
                "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
            (Api::Chat, false) => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            (Api::Chat, true) => json!({
                "index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish,
            }),
        }
    }

    /// Waits for every prompt and answers with one JSON document.
    async fn whole(self, mut inbox: mpsc::UnboundedReceiver<Update>) -> Result<Response, ApiError> {
        let n = self.sampling.n;
        let mut events: Vec<Vec<TokenEvent>> = vec![Vec::new(); self.count * n];
        let mut groups: Vec<Option<GroupOutput>> = vec![None; self.count];
        while let Some(update) = inbox.recv().await {
            match update {
                Update::Token(p, event) if self.sampling.logprobs => {
                    events[p * n + event.index].push(event)
                }
                Update::Token(..) => {}
                Update::Done(p, result) => {
                    groups[p] = Some(result.map_err(|e| engine_error(self.api, e))?)
                }
            }
        }
        let tokenizer = &self.app.tokenizer;
        let mut choices = Vec::with_capacity(self.count * n);
        let mut completion_tokens = 0;
        for (p, group) in groups.into_iter().enumerate() {
            let group = group.ok_or_else(|| engine_error(self.api, GenerationError::ShutDown))?;
            for (j, sample) in group.samples.iter().enumerate() {
                completion_tokens += sample.tokens.len();
                let tokens = output::visible_tokens(sample);
                let index = p * n + j;
                let logprobs =
                    self.logprobs(tokens, &sample.logprobs[..tokens.len()], &events[index], 0);
                let finish = output::finish_reason(&sample.finish);
                choices.push(self.choice(
                    index,
                    output::final_text(tokenizer, sample),
                    logprobs,
                    Some(finish),
                    false,
                ));
            }
        }
        let mut body = self.envelope(false, choices);
        body["usage"] = self.usage(completion_tokens);
        Ok(axum::Json(body).into_response())
    }

    /// Answers with server-sent events: text as it becomes safe to send, a last chunk
    /// per choice with its finish reason, optionally the usage, then `[DONE]`.
    fn stream(self, first: Option<Update>, mut inbox: mpsc::UnboundedReceiver<Update>) -> Response {
        let (events_out, events) = mpsc::channel::<Result<Event, Infallible>>(64);
        tokio::spawn(async move {
            let n = self.sampling.n;
            let choices = self.count * n;
            let mut streamed: Vec<Streamed> = (0..choices)
                .map(|_| Streamed::new(self.stops.clone(), self.app.stop_token_ids.clone()))
                .collect();
            let mut pending: Vec<Vec<TokenEvent>> = vec![Vec::new(); choices];
            let mut offsets = vec![0usize; choices];
            let mut completion_tokens = 0;
            let send = |value: Value| {
                let events_out = events_out.clone();
                async move {
                    events_out
                        .send(Ok(Event::default().data(value.to_string())))
                        .await
                        .is_ok()
                }
            };
            if self.api == Api::Chat {
                for index in 0..choices {
                    let role = json!({"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": null, "finish_reason": null});
                    if !send(self.envelope(true, vec![role])).await {
                        return;
                    }
                }
            }
            let mut next = first;
            while let Some(update) = next.take() {
                let chunks = match update {
                    Update::Token(p, event) => {
                        let index = p * n + event.index;
                        completion_tokens += 1;
                        streamed[index].push(event.token);
                        if !self.app.stop_token_ids.contains(&event.token) {
                            pending[index].push(event);
                        }
                        let delta = streamed[index].delta(&self.app.tokenizer);
                        if delta.is_empty() {
                            Vec::new()
                        } else {
                            vec![self.chunk(
                                index,
                                delta,
                                &mut pending[index],
                                &mut offsets[index],
                                None,
                            )]
                        }
                    }
                    Update::Done(p, Ok(group)) => group
                        .samples
                        .iter()
                        .enumerate()
                        .map(|(j, sample)| {
                            let index = p * n + j;
                            let rest = streamed[index].rest(&self.app.tokenizer, sample);
                            let finish = output::finish_reason(&sample.finish);
                            self.chunk(
                                index,
                                rest,
                                &mut pending[index],
                                &mut offsets[index],
                                Some(finish),
                            )
                        })
                        .collect(),
                    Update::Done(_, Err(error)) => vec![engine_error(self.api, error).body()],
                };
                for chunk in chunks {
                    if !send(chunk).await {
                        return;
                    }
                }
                next = inbox.recv().await;
            }
            if self.sampling.include_usage {
                let mut last = self.envelope(true, Vec::new());
                last["usage"] = self.usage(completion_tokens);
                if !send(last).await {
                    return;
                }
            }
            let _ = events_out.send(Ok(Event::default().data("[DONE]"))).await;
        });
        Sse::new(tokio_stream::wrappers::ReceiverStream::new(events)).into_response()
    }

    /// One streamed chunk: a choice's text delta with the log-probs of the tokens since
    /// the last chunk.
    fn chunk(
        &self,
        index: usize,
        delta: String,
        pending: &mut Vec<TokenEvent>,
        offset: &mut usize,
        finish: Option<&str>,
    ) -> Value {
        let events = std::mem::take(pending);
        let tokens: Vec<i64> = events.iter().map(|e| e.token).collect();
        let logprobs: Vec<f32> = events.iter().map(|e| e.logprob).collect();
        let logprobs = self.logprobs(&tokens, &logprobs, &events, *offset);
        *offset += delta.len();
        let choice = self.choice(index, delta, logprobs, finish, true);
        self.envelope(true, vec![choice])
    }
}
