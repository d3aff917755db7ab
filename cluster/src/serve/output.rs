//! From engine samples and token events to the text, log-probs and finish reason a client
//! sees: stop strings and a final stop token are not part of the text, and a stream never
//! sends text that a stop string may still take back.

use quill_actor::{FinishReason, Sample, TokenEvent};
use quill_model::Tokenizer;
use serde_json::{json, Value};

/// OpenAI's finish reason.
pub fn finish_reason(finish: &FinishReason) -> &'static str {
    match finish {
        FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
        FinishReason::Length | FinishReason::Context => "length",
    }
}

/// The tokens whose text a client sees: all but a final stop token.
pub fn visible_tokens(sample: &Sample) -> &[i64] {
    match sample.finish {
        FinishReason::StopToken(_) => &sample.tokens[..sample.tokens.len() - 1],
        _ => &sample.tokens,
    }
}

/// The text a client sees: the visible tokens' text, cut before a stop string.
pub fn final_text(tokenizer: &Tokenizer, sample: &Sample) -> String {
    let mut text = tokenizer.decode_generated(visible_tokens(sample));
    if let FinishReason::StopString(stop) = &sample.finish {
        if let Some(at) = text.find(stop.as_str()) {
            text.truncate(at);
        }
    }
    text
}

/// One choice's text as it streams: tokens arrive one by one; [`Streamed::delta`] gives
/// the text that is safe to send so far.
pub struct Streamed {
    stops: Vec<String>,
    stop_ids: Vec<i64>,
    tokens: Vec<i64>,
    sent: usize,
}

impl Streamed {
    /// Text for a choice that ends at any of `stops` or `stop_ids`.
    pub fn new(stops: Vec<String>, stop_ids: Vec<i64>) -> Self {
        Streamed {
            stops,
            stop_ids,
            tokens: Vec::new(),
            sent: 0,
        }
    }

    /// Takes a sampled token.
    pub fn push(&mut self, token: i64) {
        if !self.stop_ids.contains(&token) {
            self.tokens.push(token);
        }
    }

    /// Text not sent yet that no stop string can still claim (and no split character).
    pub fn delta(&mut self, tokenizer: &Tokenizer) -> String {
        let text = tokenizer.decode_generated(&self.tokens);
        let mut end = text.len();
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            end = at;
        }
        if text[..end].ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        for stop in &self.stops {
            let held = (1..stop.len())
                .rev()
                .filter(|&k| stop.is_char_boundary(k))
                .find(|&k| text[..end].ends_with(&stop[..k]))
                .unwrap_or(0);
            end = end.min(text[..end].len() - held);
        }
        self.take(&text, end)
    }

    /// The rest of the final text once the sample is done.
    pub fn rest(&mut self, tokenizer: &Tokenizer, sample: &Sample) -> String {
        let text = final_text(tokenizer, sample);
        let end = text.len();
        self.take(&text, end)
    }

    fn take(&mut self, text: &str, end: usize) -> String {
        if end <= self.sent || !text.is_char_boundary(self.sent) || !text.is_char_boundary(end) {
            return String::new();
        }
        let delta = text[self.sent..end].to_owned();
        self.sent = end;
        delta
    }
}

/// A token's text for log-prob listings.
fn token_text(tokenizer: &Tokenizer, id: i64) -> String {
    tokenizer.decode_generated(&[id])
}

/// The completions API's `logprobs` object for some tokens.
pub fn completion_logprobs(
    tokenizer: &Tokenizer,
    tokens: &[i64],
    logprobs: &[f32],
    events: &[TokenEvent],
    offset: usize,
    top: usize,
) -> Value {
    let texts: Vec<String> = tokens.iter().map(|&t| token_text(tokenizer, t)).collect();
    let mut offsets = Vec::with_capacity(texts.len());
    let mut at = offset;
    for text in &texts {
        offsets.push(at);
        at += text.len();
    }
    let top_logprobs: Value = if top == 0 {
        Value::Null
    } else {
        events
            .iter()
            .take(tokens.len())
            .map(|e| {
                let map: serde_json::Map<String, Value> = e
                    .top
                    .iter()
                    .map(|&(id, lp)| (token_text(tokenizer, id), json!(lp)))
                    .collect();
                Value::Object(map)
            })
            .collect()
    };
    json!({
        "tokens": texts,
        "token_logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    })
}

/// The chat API's `logprobs` object for some tokens.
pub fn chat_logprobs(
    tokenizer: &Tokenizer,
    tokens: &[i64],
    logprobs: &[f32],
    events: &[TokenEvent],
) -> Value {
    let entry = |id: i64, lp: f32| {
        let text = token_text(tokenizer, id);
        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .zip(logprobs)
        .enumerate()
        .map(|(i, (&id, &lp))| {
            let mut item = entry(id, lp);
            let top: Vec<Value> = events
                .get(i)
                .map(|e| e.top.iter().map(|&(t, l)| entry(t, l)).collect())
                .unwrap_or_default();
            item["top_logprobs"] = Value::Array(top);
            item
        })
        .collect();
    json!({ "content": content })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quill_model::default_model;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_json(&default_model::tokenizer_json()).unwrap()
    }

    fn sample(tokens: Vec<i64>, finish: FinishReason, tok: &Tokenizer) -> Sample {
        Sample {
            text: tok.decode_generated(&tokens),
            logprobs: vec![0.0; tokens.len()],
            tokens,
            finish,
            version_first: 0,
            version_last: 0,
        }
    }

    #[test]
    fn a_stream_holds_back_what_a_stop_string_may_claim_and_adds_up_to_the_text() {
        let tok = tokenizer();
        let ids = tok.encode("one two </answer> three").unwrap();
        let stop = "</answer>".to_owned();
        let mut streamed = Streamed::new(vec![stop.clone()], Vec::new());
        let mut sent = String::new();
        let mut end = ids.len();
        for (i, &id) in ids.iter().enumerate() {
            streamed.push(id);
            sent.push_str(&streamed.delta(&tok));
            assert!(!sent.contains('<'), "a stop prefix leaked: {sent:?}");
            if tok.decode_generated(&ids[..=i]).contains(&stop) {
                end = i + 1;
                break;
            }
        }
        let done = sample(ids[..end].to_vec(), FinishReason::StopString(stop), &tok);
        sent.push_str(&streamed.rest(&tok, &done));
        assert_eq!(sent, final_text(&tok, &done));
        assert_eq!(sent, "one two ");
    }

    #[test]
    fn a_final_stop_token_is_not_text() {
        let tok = tokenizer();
        let eos = tok.token_id("<|endoftext|>").unwrap();
        let mut ids = tok.encode("hello world").unwrap();
        ids.push(eos);
        let done = sample(ids.clone(), FinishReason::StopToken(eos), &tok);
        assert_eq!(final_text(&tok, &done), "hello world");
        assert_eq!(visible_tokens(&done).len(), ids.len() - 1);
        let mut streamed = Streamed::new(Vec::new(), vec![eos]);
        let mut sent = String::new();
        for id in ids {
            streamed.push(id);
            sent.push_str(&streamed.delta(&tok));
        }
        sent.push_str(&streamed.rest(&tok, &done));
        assert_eq!(sent, "hello world");
        assert_eq!(finish_reason(&done.finish), "stop");
        assert_eq!(finish_reason(&FinishReason::Length), "length");
    }
}
