//! The LLM judge as the quality reward: against a running `quill serve` (the API key, an
//! unreadable reply after retries, an endpoint that goes away), against a scripted
//! endpoint where a test needs known scores (pointwise and pairwise, the cache, the
//! concurrency limit, timeouts, malformed replies), and a short job whose quality reward
//! comes from the judge.

mod support;

use quill_config::job::{JudgeMode, JudgeSection};
use quill_reward_worker::judge::Judge;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::job::{quill_bin, set, wait_until, Proc, TestJob};

/// A scripted OpenAI-compatible endpoint: `reply` maps the prompt to a reply text (or
/// `None` for a 500); it counts requests and the most in flight at once.
struct Scripted {
    addr: String,
    requests: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Scripted {
    fn start(
        delay: Duration,
        reply: impl Fn(&str, usize) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(reply);
        let (r, p) = (Arc::clone(&requests), Arc::clone(&peak));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (reply, r, p, f) = (
                    Arc::clone(&reply),
                    Arc::clone(&r),
                    Arc::clone(&p),
                    Arc::clone(&in_flight),
                );
                std::thread::spawn(move || {
                    let count = r.fetch_add(1, Ordering::SeqCst) + 1;
                    answer(stream, delay, (&f, &p), |prompt| reply(prompt, count));
                });
            }
        });
        Scripted {
            addr,
            requests,
            peak,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Reads one request and answers it after `delay`. The request counts in `in_flight`
/// (and its most in `peak`) from read to reply: it leaves before the reply is written,
/// since once the client has the reply it may send its next request at once.
fn answer(
    mut stream: TcpStream,
    delay: Duration,
    (in_flight, peak): (&AtomicUsize, &AtomicUsize),
    reply: impl Fn(&str) -> Option<String>,
) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let body = loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                break body.to_owned();
            }
        }
    };
    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    peak.fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(delay);
    in_flight.fetch_sub(1, Ordering::SeqCst);
    let request: Value = serde_json::from_str(&body).unwrap();
    let prompt = request["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (status, body) = match reply(&prompt) {
        Some(text) => (
            "200 OK",
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                .to_string(),
        ),
        None => (
            "500 Internal Server Error",
            r#"{"error": {"message": "scripted failure"}}"#.to_owned(),
        ),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn config(dir: &std::path::Path, endpoint: &str, template: &str) -> JudgeSection {
    let prompt_file = dir.join("rubric.txt");
    std::fs::write(&prompt_file, template).unwrap();
    JudgeSection {
        endpoint: endpoint.to_owned(),
        model: "default".into(),
        prompt_file,
        timeout_seconds: 5.0,
        retries: 1,
        backoff_seconds: 0.05,
        ..JudgeSection::default()
    }
}

const POINTWISE: &str =
    "Rate the answer from 1 to 10. End with `Score: N`.\nQuestion: {question}\nAnswer: {answer}";
const PAIRWISE: &str =
    "Question: {question}\n[A] {answer_a}\n[B] {answer_b}\nReply [[A]], [[B]] or [[TIE]].";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn items(answers: &[&str]) -> Vec<(String, String)> {
    answers
        .iter()
        .map(|a| ("Write a poem.".to_owned(), (*a).to_owned()))
        .collect()
}

#[test]
fn pointwise_and_pairwise_scores_with_cache_and_concurrency_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Scripted::start(Duration::from_millis(100), |prompt, _| {
        Some(
            if prompt.contains("Answer: good") {
                "Vivid. Score: 10"
            } else {
                "Flat.\nScore: 4"
            }
            .to_owned(),
        )
    });
    let mut section = config(dir.path(), &server.endpoint(), POINTWISE);
    section.concurrency = 2;
    let judge = Judge::new(&section).unwrap();
    let rt = runtime();
    let answers = [
        "good one",
        "bad one",
        "bad two",
        "good two",
        "bad three",
        "good three",
    ];
    let scores = rt.block_on(judge.score(&items(&answers))).unwrap();
    let expected: Vec<f64> = answers
        .iter()
        .map(|a| {
            if a.starts_with("good") {
                1.0
            } else {
                3.0 / 9.0
            }
        })
        .collect();
    assert_eq!(scores, expected);
    assert_eq!(server.requests.load(Ordering::SeqCst), 6);
    assert_eq!(
        server.peak.load(Ordering::SeqCst),
        2,
        "requests in flight at once"
    );
    // The same prompt and answers again: from the cache, no request.
    assert_eq!(
        rt.block_on(judge.score(&items(&answers))).unwrap(),
        expected
    );
    assert_eq!(server.requests.load(Ordering::SeqCst), 6);
    assert_eq!(judge.cached(), 6);

    // Pairwise: a judge that always prefers whichever answer contains "good", and one
    // biased to the first position; asking in both orders cancels the bias.
    let refs = dir.path().join("refs.jsonl");
    std::fs::write(
        &refs,
        r#"{"question": "Write a poem.", "reference": "a plain reference"}"#,
    )
    .unwrap();
    let fair = Scripted::start(Duration::ZERO, |prompt, _| {
        let a = prompt
            .split("[A] ")
            .nth(1)
            .unwrap()
            .split("\n[B]")
            .next()
            .unwrap();
        let b = prompt
            .split("[B] ")
            .nth(1)
            .unwrap()
            .split('\n')
            .next()
            .unwrap();
        Some(
            match (a.contains("good"), b.contains("good")) {
                (true, false) => "[[A]]",
                (false, true) => "[[B]]",
                _ => "[[TIE]]",
            }
            .to_owned(),
        )
    });
    let mut section = config(dir.path(), &fair.endpoint(), PAIRWISE);
    section.mode = JudgeMode::Pairwise;
    section.references = Some(refs.clone());
    let judge = Judge::new(&section).unwrap();
    let scores = rt
        .block_on(judge.score(&items(&["good text", "dull text", "a plain reference"])))
        .unwrap();
    assert_eq!(scores, [1.0, 0.5, 0.5]);
    let biased = Scripted::start(Duration::ZERO, |_, _| {
        Some("Both fine, but [[A]]".to_owned())
    });
    let mut section = config(dir.path(), &biased.endpoint(), PAIRWISE);
    section.mode = JudgeMode::Pairwise;
    section.references = Some(refs);
    let judge = Judge::new(&section).unwrap();
    assert_eq!(rt.block_on(judge.score(&items(&["x"]))).unwrap(), [0.5]);
    let missing = rt
        .block_on(judge.score(&[("Another question".into(), "y".into())]))
        .unwrap_err();
    assert!(missing.contains("no reference answer"), "{missing}");
}

#[test]
fn malformed_replies_timeouts_and_failures_are_retried_then_named() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    // Two unreadable replies, then a good one: two retries reach it, one does not.
    let flaky = Scripted::start(Duration::ZERO, |_, n| {
        Some(if n % 3 == 0 {
            "Score: 7".into()
        } else {
            "I like it.".into()
        })
    });
    let mut section = config(dir.path(), &flaky.endpoint(), POINTWISE);
    section.retries = 2;
    section.cache_entries = 0;
    let judge = Judge::new(&section).unwrap();
    assert_eq!(
        rt.block_on(judge.score(&items(&["a"]))).unwrap(),
        [6.0 / 9.0]
    );
    section.retries = 1;
    let judge = Judge::new(&section).unwrap();
    let error = rt.block_on(judge.score(&items(&["a"]))).unwrap_err();
    assert!(
        error.contains("unreadable reply") && error.contains("after 2 tries"),
        "{error}"
    );
    assert!(error.contains(&flaky.addr), "names the endpoint: {error}");

    // A 500 is retried too.
    let failing = Scripted::start(Duration::ZERO, |_, n| {
        (n > 1).then(|| "Score: 2".to_owned())
    });
    let judge = Judge::new(&config(dir.path(), &failing.endpoint(), POINTWISE)).unwrap();
    assert_eq!(
        rt.block_on(judge.score(&items(&["a"]))).unwrap(),
        [1.0 / 9.0]
    );

    // Too slow: the timeout, named.
    let slow = Scripted::start(Duration::from_secs(3), |_, _| Some("Score: 5".into()));
    let mut section = config(dir.path(), &slow.endpoint(), POINTWISE);
    section.timeout_seconds = 0.3;
    section.retries = 0;
    let judge = Judge::new(&section).unwrap();
    let error = rt.block_on(judge.score(&items(&["a"]))).unwrap_err();
    assert!(error.contains("did not answer within 0.3 s"), "{error}");

    // Nobody listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let judge = Judge::new(&config(
        dir.path(),
        &format!("http://127.0.0.1:{port}/v1"),
        POINTWISE,
    ))
    .unwrap();
    let error = rt.block_on(judge.score(&items(&["a"]))).unwrap_err();
    assert!(error.contains("cannot be reached"), "{error}");

    // Set-up errors name the field.
    let bad = config(dir.path(), "http://127.0.0.1:1/v1", "no slots here");
    let error = Judge::new(&bad).err().unwrap().to_string();
    assert!(
        error.starts_with("rewards.judge.prompt_file") && error.contains("{question}"),
        "{error}"
    );
    let mut keyed = config(dir.path(), "http://127.0.0.1:1/v1", POINTWISE);
    keyed.api_key_env = Some("QUILL_TEST_NO_SUCH_VAR".into());
    let error = Judge::new(&keyed).err().unwrap().to_string();
    assert!(error.starts_with("rewards.judge.api_key_env"), "{error}");
}

/// A running `quill serve` with the tiny model and an API key.
fn serve(dir: &std::path::Path) -> (Proc, String) {
    let key = dir.join("key");
    std::fs::write(&key, "judge-key").unwrap();
    let mut command = Command::new(quill_bin());
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--default-max-tokens",
        "16",
    ]);
    command.arg("--api-key-file").arg(&key);
    let mut proc = Proc::spawn(command, &dir.join("serve.log"));
    let log = proc.log.clone();
    let addr = wait_until(
        "the serve address",
        Duration::from_secs(60),
        &mut [&mut proc],
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Some(
                text.split(" on http://")
                    .nth(1)?
                    .split('/')
                    .next()?
                    .to_owned(),
            )
        },
    );
    (proc, addr)
}

#[test]
fn against_quill_serve_the_key_is_sent_replies_are_checked_and_a_gone_endpoint_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(dir.path());
    let rt = runtime();
    let endpoint = format!("http://{addr}/v1");
    // Without the key the server refuses; a refusal is not retried.
    let mut section = config(dir.path(), &endpoint, POINTWISE);
    section.retries = 3;
    section.max_tokens = 8;
    let judge = Judge::new(&section).unwrap();
    let error = rt.block_on(judge.score(&items(&["a"]))).unwrap_err();
    assert!(
        error.contains("401") && error.contains("API key"),
        "{error}"
    );
    // With it, the tiny model answers, but not with a rating: named, after the retries.
    std::env::set_var("QUILL_TEST_JUDGE_KEY", "judge-key");
    section.api_key_env = Some("QUILL_TEST_JUDGE_KEY".into());
    section.retries = 1;
    let judge = Judge::new(&section).unwrap();
    let error = rt.block_on(judge.score(&items(&["a"]))).unwrap_err();
    assert!(
        error.contains("no rating found") && error.contains("after 2 tries"),
        "{error}"
    );
    let log = server.log();
    // The server went away: the error says the endpoint cannot be reached.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let error = rt.block_on(judge.score(&items(&["b"]))).unwrap_err();
    assert!(
        error.contains("cannot be reached") && error.contains(&addr),
        "{error}\n{log}"
    );
}

#[test]
fn a_job_whose_quality_reward_comes_from_the_judge_runs_to_the_end() {
    // Longer answers score higher, so the quality reward is a real, varying signal.
    let server = Scripted::start(Duration::ZERO, |prompt, _| {
        let answer = prompt.split("Answer: ").nth(1).unwrap_or_default();
        let words = answer.split_whitespace().count();
        Some(format!("Score: {}", (1 + words).min(10)))
    });
    let rubric = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rubric.path(), POINTWISE).unwrap();
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 2);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 16);
        set(t, "rewards", "quality_weight", 1.0);
        let mut judge = toml::Table::new();
        judge.insert("endpoint".into(), server.endpoint().into());
        judge.insert("model".into(), "scripted".into());
        judge.insert(
            "prompt_file".into(),
            rubric.path().display().to_string().into(),
        );
        t["rewards"]
            .as_table_mut()
            .unwrap()
            .insert("judge".into(), judge.into());
    });
    let mut command = Command::new(quill_bin());
    command
        .args(["launch", "local", "--config"])
        .arg(&job.config)
        .args(["--threads", "1"]);
    let mut launcher = Proc::spawn(command, &job.dir.path().join("launch.log"));
    let status = launcher.wait(Duration::from_secs(240));
    assert!(status.success(), "{}", launcher.log());
    job.no_process_left();
    let steps = job.steps();
    assert_eq!(steps.len(), 2);
    for step in &steps {
        let quality = step["reward_quality"]
            .as_f64()
            .expect("a quality reward per step");
        assert!((0.0..=1.0).contains(&quality), "{quality}");
    }
    assert!(
        server.requests.load(Ordering::SeqCst) > 0,
        "the judge was asked"
    );
}
