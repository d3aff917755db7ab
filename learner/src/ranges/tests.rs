//! The predictor and `fill_ranges` against a scripted HTTP server on loopback: good
//! replies, malformed ones, errors, a server that hangs, and one that goes away.

use super::*;
use quill_reward::LengthRange;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted server does with one request.
pub(crate) enum Behaviour {
    /// Answer with this status and body.
    Reply(u16, String),
    /// Answer with a chat completion whose content is this.
    Content(String),
    /// Never answer.
    Hang,
    /// Close the connection without a word.
    Close,
}

type Script = Arc<dyn Fn(usize, &str) -> Behaviour + Send + Sync>;

/// A server that answers request number `n` (from 0) with body `b` as `script(n, b)`
/// says; it records every request (head and body).
pub(crate) struct Scripted {
    pub(crate) url: String,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    pub(crate) async fn start(
        script: impl Fn(usize, &str) -> Behaviour + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (script, seen) = (script.clone(), seen.clone());
                tokio::spawn(async move { answer(stream, script, seen).await });
            }
        });
        Scripted {
            url,
            requests,
            task,
        }
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Stops the server: its port refuses connections from now on.
    pub(crate) async fn stop(self) -> String {
        self.task.abort();
        let _ = self.task.await;
        self.url
    }
}

async fn answer(mut stream: TcpStream, script: Script, seen: Arc<Mutex<Vec<String>>>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, body_start) = loop {
        let n = stream.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&data[..end]).to_string(), end + 4);
        }
    };
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while data.len() < body_start + length {
        let n = stream.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        data.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&data[body_start..body_start + length]).to_string();
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(format!("{head}\r\n\r\n{body}"));
        seen.len() - 1
    };
    let (status, reply) = match script(index, &body) {
        Behaviour::Reply(status, reply) => (status, reply),
        Behaviour::Content(content) => (
            200,
            serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                .to_string(),
        ),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        Behaviour::Close => return,
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

fn predictor(url: &str) -> RangePredictor {
    RangePredictor::new(PredictorConfig {
        timeout: Duration::from_millis(500),
        retries: 2,
        backoff: Duration::from_millis(10),
        api_key: Some("sk-test".into()),
        ..PredictorConfig::new(url, "judge")
    })
    .unwrap()
}

fn range(lo: u32, hi: u32) -> Prediction {
    Prediction::Range(LengthRange::new(lo, hi).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_reply_gives_a_range_and_the_request_is_a_chat_completion() {
    let server = Scripted::start(|_, _| Behaviour::Content("[1800, 2200]".into())).await;
    let p = predictor(&server.url);
    assert_eq!(
        p.predict("Write about tides.").await.unwrap(),
        range(1800, 2200)
    );
    let request = server.requests.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("POST /v1/chat/completions HTTP/1.1"),
        "{request}"
    );
    assert!(
        request.contains("authorization: Bearer sk-test"),
        "{request}"
    );
    let body: serde_json::Value =
        serde_json::from_str(request.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["model"], "judge");
    let content = body["messages"][0]["content"].as_str().unwrap();
    assert!(content.ends_with("Task: Write about tides."), "{content}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_replies_and_server_errors_are_retried() {
    let server = Scripted::start(|n, _| match n {
        0 => Behaviour::Content("about two thousand words".into()),
        1 => Behaviour::Reply(503, "busy".into()),
        _ => Behaviour::Content("[0, 0]".into()),
    })
    .await;
    assert_eq!(
        predictor(&server.url)
            .predict("Write a grocery list.")
            .await
            .unwrap(),
        Prediction::NoRange
    );
    assert_eq!(server.count(), 3);

    let bad = Scripted::start(|n, _| match n % 3 {
        0 => Behaviour::Content("[1850, 2200]".into()),
        1 => Behaviour::Reply(200, "{\"no\": \"choices\"}".into()),
        _ => Behaviour::Reply(200, "not json".into()),
    })
    .await;
    let err = predictor(&bad.url).predict("q").await.unwrap_err();
    assert!(matches!(err, RangeError::Malformed { .. }) && !err.is_endpoint_failure());
    assert!(err.to_string().contains("not a chat completion"), "{err}");
    assert_eq!(bad.count(), 3, "one try and two retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried() {
    let server =
        Scripted::start(|_, _| Behaviour::Reply(401, "{\"error\": \"bad key\"}".into())).await;
    let err = predictor(&server.url)
        .predict("q")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("answered HTTP 401") && err.contains("bad key"),
        "{err}"
    );
    assert_eq!(server.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_vanished_endpoint_is_a_clear_error() {
    let hanging = Scripted::start(|_, _| Behaviour::Hang).await;
    let started = std::time::Instant::now();
    let err = predictor(&hanging.url).predict("q").await.unwrap_err();
    assert!(matches!(err, RangeError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("did not answer within 0.5 s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(hanging.count(), 3);

    let closing = Scripted::start(|_, _| Behaviour::Close).await;
    let err = predictor(&closing.url).predict("q").await.unwrap_err();
    assert!(matches!(err, RangeError::Unreachable { .. }), "{err}");

    let gone = Scripted::start(|_, _| Behaviour::Content("[100, 200]".into())).await;
    let url = gone.stop().await;
    let err = predictor(&url).predict("q").await.unwrap_err().to_string();
    assert!(
        err.contains("is unreachable") && err.contains(&url),
        "{err}"
    );
}

#[test]
fn the_blocking_api_works_outside_a_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(Scripted::start(|n, _| {
        Behaviour::Content(format!("[{}, {}]", 100 * (n + 1), 100 * (n + 2)))
    }));
    let p = predictor(&server.url);
    let got = p.predict_blocking(&["a".into(), "b".into()]);
    assert_eq!(got[0].as_ref().unwrap(), &range(100, 200));
    assert_eq!(got[1].as_ref().unwrap(), &range(200, 300));
}

/// Replies by the question: poems get [300, 600], grocery lists [0, 0], riddles junk,
/// anything with "storm" an error status (the endpoint refusing).
pub(crate) fn by_question(_: usize, body: &str) -> Behaviour {
    if body.contains("storm") {
        Behaviour::Reply(500, "overloaded".into())
    } else if body.contains("poem") {
        Behaviour::Content("[300, 600]".into())
    } else if body.contains("grocery") {
        Behaviour::Content("[0, 0]".into())
    } else {
        Behaviour::Content("I cannot say".into())
    }
}

const INPUT: &str = concat!(
    "{\"question\": \"Write a poem about rain.\", \"id\": 1}\n",
    "{\"question\": \"Write 500 words on tides.\"}\n",
    "\n",
    "{\"question\": \"写一篇两千字的文章\"}\n",
    "{\"question\": \"Write a grocery list.\"}\n",
    "{\"question\": \"Write a riddle.\"}\n",
    "{\"prompt\": \"raw\", \"length_range\": [10, 20]}\n",
    "{\"question\": \"Write a poem about a storm.\"}\n",
    "{\"question\": \"Write a poem about snow.\"}\n",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_ranges_writes_ranges_counts_skips_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, INPUT).unwrap();
    let fields = FillFields::default();
    let server = Scripted::start(by_question).await;
    let p = predictor(&server.url);
    let mut seen = Vec::new();
    let err = fill_ranges(&input, &output, &fields, Some(&p), &mut |_, done, total| {
        seen.push((done, total))
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("answered HTTP 500"), "{err}");
    assert_eq!(
        seen.last(),
        Some(&(7, 9)),
        "seven lines done before the storm"
    );
    let progress = dir.path().join("out.jsonl.progress.json");
    assert!(progress.exists());

    let fixed =
        Scripted::start(|_, body: &str| by_question(0, &body.replace("storm", "squall"))).await;
    let p = predictor(&fixed.url);
    let counts = fill_ranges(&input, &output, &fields, Some(&p), &mut |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(
        counts,
        FillCounts {
            given: 1,
            stated: 2,
            predicted: 3,
            no_range: 1,
            bad_reply: 1,
            unpredicted: 0,
        }
    );
    assert!(!progress.exists());
    let written: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ranges: Vec<String> = written
        .iter()
        .map(|v| v["length_range"].to_string())
        .collect();
    assert_eq!(
        ranges,
        [
            "[300,600]",
            "[450,550]",
            "[1800,2200]",
            "[10,20]",
            "[300,600]",
            "[300,600]"
        ]
    );
    assert_eq!(written[0]["id"], 1, "other fields are kept");
    assert_eq!(
        fixed.count(),
        2,
        "the resumed run asks only about the last two lines"
    );

    let again = fill_ranges(&input, &output, &fields, Some(&p), &mut |_, _, _| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("already exists"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_ranges_without_a_predictor_and_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, INPUT).unwrap();
    let counts = fill_ranges(
        &input,
        &output,
        &FillFields::default(),
        None,
        &mut |_, _, _| {},
    )
    .await
    .unwrap();
    assert_eq!(
        (counts.kept(), counts.unpredicted, counts.skipped()),
        (3, 5, 5)
    );
    std::fs::write(&input, "{\"question\": \"Write 5 words.\"}\n{oops\n").unwrap();
    let err = fill_ranges(
        &input,
        &dir.path().join("o2"),
        &FillFields::default(),
        None,
        &mut |_, _, _| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.ends_with("in.jsonl, line 2: invalid JSON: key must be a string at line 1 column 2"),
        "{err}"
    );
    std::fs::write(&input, "{\"text\": \"Write 5 words.\"}\n").unwrap();
    let err = fill_ranges(
        &input,
        &dir.path().join("o3"),
        &FillFields::default(),
        None,
        &mut |_, _, _| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("line 1: needs a non-empty string `question` or `prompt`"),
        "{err}"
    );
}
