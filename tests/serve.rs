//! `quill serve` as a client sees it: real HTTP requests to a running server with the
//! embedded tiny model (completions and chat, whole and streamed, `n > 1`, log-probs),
//! greedy output equal to `quill generate`'s, 4xx errors naming the field, the API key,
//! and requests decoded together.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::http::{request, Response};
use support::job::{quill_bin, wait_until, Proc};
use support::{quill, stderr, stdout};

const KEY: &str = "test-key-123";

/// A running `quill serve` on a free loopback port.
pub struct Server {
    _proc: Proc,
    /// host:port
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, KEY).unwrap();
        let mut command = Command::new(quill_bin());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "1"])
            .arg("--api-key-file")
            .arg(&key)
            .args(extra);
        let mut proc = Proc::spawn(command, &dir.path().join("serve.log"));
        let log = proc.log.clone();
        let addr = wait_until(
            "the serve address",
            Duration::from_secs(60),
            &mut [&mut proc],
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let rest = text.split(" on http://").nth(1)?;
                Some(rest.split('/').next().unwrap().to_owned())
            },
        );
        Server {
            _proc: proc,
            addr,
            _dir: dir,
        }
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        request(&self.addr, "POST", path, Some(KEY), Some(&body.to_string()))
    }

    fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, Some(KEY), None)
    }
}

/// The streamed text of every choice, the finish reason of each, and the chunks.
fn assemble(events: &[String]) -> (Vec<String>, Vec<String>, Vec<Value>) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut texts = Vec::new();
    let mut finishes = Vec::new();
    for chunk in &chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            if texts.len() <= i {
                texts.resize(i + 1, String::new());
                finishes.resize(i + 1, String::new());
            }
            let piece = choice["text"]
                .as_str()
                .or_else(|| choice["delta"]["content"].as_str())
                .unwrap_or_default();
            texts[i].push_str(piece);
            if let Some(f) = choice["finish_reason"].as_str() {
                finishes[i] = f.to_owned();
            }
        }
    }
    (texts, finishes, chunks)
}

#[test]
fn completions_whole_and_streamed_with_n_and_logprobs() {
    let server = Server::start(&["--served-model-name", "tiny"]);
    let models = server.get("/v1/models");
    assert_eq!(models.status, 200, "{}", models.body);
    assert_eq!(models.json()["data"][0]["id"], "tiny");

    let body = json!({"model": "tiny", "prompt": ["Write about rain.", "Write about snow."],
                      "n": 3, "temperature": 0.9, "seed": 7, "max_tokens": 20, "logprobs": 2});
    let whole = server.post("/v1/completions", &body);
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    let mut completion_tokens = 0;
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        let lp = &choice["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        let values = lp["token_logprobs"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 20);
        assert_eq!(values.len(), tokens.len());
        assert!(values.iter().all(|v| v.as_f64().unwrap() <= 0.0));
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), tokens.len());
        for top in tops {
            let top = top.as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 2);
            // The most likely entry is at least as likely as anything else listed.
            assert!(top.values().all(|v| v.as_f64().unwrap() <= 0.0));
        }
        completion_tokens += tokens.len();
    }
    // Different choices of one prompt are different samples.
    assert!(choices[0]["text"] != choices[1]["text"] || choices[1]["text"] != choices[2]["text"]);
    let usage = &whole["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() as usize >= completion_tokens);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);

    // The same request streamed: the same samples (the seed fixes them), chunk by chunk.
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    streamed_body["stream_options"] = json!({"include_usage": true});
    let streamed = server.post("/v1/completions", &streamed_body);
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert!(streamed
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let (texts, finishes, chunks) = assemble(&streamed.events());
    assert!(
        chunks.len() > 6,
        "a chunk per token or so, got {}",
        chunks.len()
    );
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(texts[i], choice["text"].as_str().unwrap(), "choice {i}");
        assert_eq!(finishes[i], choice["finish_reason"].as_str().unwrap());
    }
    let streamed_logprobs: usize = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .map(|c| {
            c["logprobs"]["token_logprobs"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .sum();
    assert_eq!(streamed_logprobs, completion_tokens);
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);
}

#[test]
fn greedy_output_equals_quill_generate() {
    let server = Server::start(&[]);
    let question = "Write a short story about a lighthouse.";
    // Raw completion with a stop string that never comes: both run to the same end.
    let generated = quill(&[
        "generate",
        "--raw",
        "-p",
        question,
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--stop",
        "QQQZZZ",
        "--json",
        "--threads",
        "1",
    ]);
    assert!(generated.status.success(), "{}", stderr(&generated));
    let generated: Value =
        serde_json::from_str(stdout(&generated).lines().next().unwrap()).unwrap();
    let served = server.post(
        "/v1/completions",
        &json!({"model": "default", "prompt": question, "temperature": 0, "max_tokens": 24,
                "stop": "QQQZZZ", "logprobs": 0}),
    );
    assert_eq!(served.status, 200, "{}", served.body);
    let choice = &served.json()["choices"][0];
    let mut text = generated["text"].as_str().unwrap().to_owned();
    let mut logprobs: Vec<f64> = generated["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    if generated["finish_reason"] == "stop_token" {
        // quill generate keeps the end-of-text token; the API leaves it out.
        text = text.trim_end_matches("<|endoftext|>").to_owned();
        logprobs.pop();
    }
    assert_eq!(choice["text"].as_str().unwrap(), text);
    let served_logprobs: Vec<f64> = choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(served_logprobs, logprobs);

    // Chat on a model without a chat template: the recipe's template and stop strings,
    // exactly what `quill generate` does without --raw.
    let generated = quill(&[
        "generate",
        "-p",
        question,
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
        "--json",
        "--threads",
        "1",
    ]);
    assert!(generated.status.success(), "{}", stderr(&generated));
    let generated: Value =
        serde_json::from_str(stdout(&generated).lines().next().unwrap()).unwrap();
    let served = server.post(
        "/v1/chat/completions",
        &json!({"model": "default", "messages": [{"role": "user", "content": question}],
                "temperature": 0, "max_tokens": 40}),
    );
    assert_eq!(served.status, 200, "{}", served.body);
    let served = served.json();
    let mut text = generated["text"].as_str().unwrap().to_owned();
    for stop in ["<|user|>", "<|endoftext|>", "</answer>"] {
        if let Some(at) = text.find(stop) {
            text.truncate(at);
        }
    }
    assert_eq!(
        served["choices"][0]["message"]["content"].as_str().unwrap(),
        text
    );
    assert_eq!(served["object"], "chat.completion");
}

#[test]
fn chat_streams_with_logprobs() {
    let server = Server::start(&[]);
    let body = json!({"model": "default", "messages": [{"role": "user", "content": "Write a haiku."}],
                      "n": 2, "max_tokens": 16, "seed": 3, "logprobs": true, "top_logprobs": 1});
    let whole = server.post("/v1/chat/completions", &body).json();
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let streamed = server.post("/v1/chat/completions", &streamed_body);
    let (texts, _, chunks) = assemble(&streamed.events());
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    for i in 0..2 {
        let choice = &whole["choices"][i];
        assert_eq!(texts[i], choice["message"]["content"].as_str().unwrap());
        for item in choice["logprobs"]["content"].as_array().unwrap() {
            assert!(item["logprob"].as_f64().unwrap() <= 0.0);
            assert_eq!(item["top_logprobs"].as_array().unwrap().len(), 1);
        }
    }
}

#[test]
fn bad_requests_get_4xx_with_a_message_and_the_key_is_enforced() {
    let server = Server::start(&[]);
    let ok = json!({"model": "default", "prompt": "hi", "max_tokens": 2});
    let no_key = request(
        &server.addr,
        "POST",
        "/v1/completions",
        None,
        Some(&ok.to_string()),
    );
    assert_eq!(no_key.status, 401);
    assert!(no_key.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("API key"));
    let wrong = request(&server.addr, "GET", "/v1/models", Some("nope"), None);
    assert_eq!(wrong.status, 401);
    assert_eq!(
        request(&server.addr, "GET", "/metrics", None, None).status,
        401
    );
    assert_eq!(
        request(&server.addr, "GET", "/health", None, None).status,
        200
    );
    assert_eq!(server.post("/v1/completions", &ok).status, 200);

    let long_prompt = "word ".repeat(5000);
    let cases = [
        (
            json!({"model": "default", "prompt": "hi", "temperature": "hot"}),
            400,
            "temperature",
        ),
        (
            json!({"model": "default", "prompt": "hi", "n": 0}),
            400,
            "n",
        ),
        (
            json!({"model": "default", "prompt": "hi", "max_tokens": -1}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "default", "prompt": "hi", "stop": [""]}),
            400,
            "stop[0]",
        ),
        (
            json!({"model": "default", "prompt": "hi", "best_of": 4}),
            400,
            "best_of",
        ),
        (
            json!({"model": "default", "prompt": "hi", "colour": "red"}),
            400,
            "colour",
        ),
        (json!({"model": "default"}), 400, "prompt"),
        (
            json!({"model": "default", "prompt": long_prompt}),
            400,
            "prompt",
        ),
        (json!({"model": "gpt-9", "prompt": "hi"}), 404, "model"),
    ];
    for (body, status, field) in cases {
        let answer = server.post("/v1/completions", &body);
        assert_eq!(answer.status, status, "{}", answer.body);
        let error = &answer.json()["error"];
        assert_eq!(error["param"], field, "{}", answer.body);
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{}",
            answer.body
        );
    }
    let chat = server.post(
        "/v1/chat/completions",
        &json!({"model": "default", "messages": [{"role": "robot", "content": "x"}]}),
    );
    assert_eq!(chat.status, 400);
    assert_eq!(chat.json()["error"]["param"], "messages[0].role");
    let not_json = request(
        &server.addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        Some("{oops"),
    );
    assert_eq!(not_json.status, 400);
    assert!(not_json.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("JSON"));
    // A streamed request the engine refuses is still a 4xx, not an event stream.
    let streamed = server.post(
        "/v1/completions",
        &json!({"model": "default", "prompt": "word ".repeat(5000), "stream": true}),
    );
    assert_eq!(streamed.status, 400, "{}", streamed.body);
    let metrics = server.get("/metrics").body;
    assert!(
        metrics.contains("quill_serve_refused_keys_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"quill_serve_requests_total{endpoint="completions",status="400"}"#),
        "{metrics}"
    );
}

#[test]
fn bad_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(quill_bin())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("QUILL_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--api-key-file"), "{}", stderr(&out));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "  \n").unwrap();
    let out = quill(&["serve", "--api-key-file", empty.to_str().unwrap()]);
    assert!(stderr(&out).contains("API key"), "{}", stderr(&out));
    let out = quill(&["serve", "--listen", "nowhere"]);
    assert!(stderr(&out).contains("--listen"), "{}", stderr(&out));
    let missing = Path::new("/nonexistent/template.jinja");
    let out = quill(&["serve", "--chat-template", missing.to_str().unwrap()]);
    assert!(stderr(&out).contains("--chat-template"), "{}", stderr(&out));
}

#[test]
fn concurrent_requests_are_decoded_together() {
    let server = Server::start(&["--batch-size", "8"]);
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    let body = json!({"model": "default", "prompt": format!("Story number {i}:"),
                                      "max_tokens": 48, "stop": "QQQZZZ", "seed": i});
                    server.post("/v1/completions", &body).status
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(answers, [200; 4]);
    let metrics = server.get("/metrics").body;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    // Each request has one choice, so a step with several sequences decoded several requests.
    assert!(value("quill_serve_peak_batch") >= 2.0, "{metrics}");
    let mean = value("quill_serve_decoded_rows_total") / value("quill_serve_engine_steps_total");
    assert!(mean > 1.0, "mean batch {mean}:\n{metrics}");
}
