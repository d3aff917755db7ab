//! `quill eval` end to end: a scripted OpenAI-compatible endpoint as generator and judge
//! where the scores must be known (length scores, critic scores, verdicts in both orders,
//! Elo, unreadable replies), resuming after a kill, a real `quill serve` with the tiny
//! model as generator and judge (its replies are mostly unreadable: counted), the local
//! engine on a checkpoint series with its PNGs, and bad input.

mod support;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::job::{quill_bin, wait_until, Proc};
use support::{quill, stderr, stdout};

/// A scripted OpenAI-compatible endpoint: `reply` maps a chat prompt to a reply text
/// (`None`: a 400); it counts generation requests (prompts that are not judge rubrics).
struct Scripted {
    addr: String,
    generations: Arc<AtomicUsize>,
}

impl Scripted {
    fn start(delay: Duration, reply: fn(&str) -> Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let generations = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&generations);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || answer(stream, delay, reply, &counter));
            }
        });
        Scripted { addr, generations }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn generations(&self) -> usize {
        self.generations.load(Ordering::SeqCst)
    }
}

fn is_judge_prompt(prompt: &str) -> bool {
    prompt.contains("[Response]") || prompt.contains("[Response A]")
}

fn answer(
    mut stream: TcpStream,
    delay: Duration,
    reply: fn(&str) -> Option<String>,
    generations: &AtomicUsize,
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
    let request: Value = serde_json::from_str(&body).unwrap();
    let prompt = request["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !is_judge_prompt(&prompt) {
        generations.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
    }
    let (status, body) = match reply(&prompt) {
        Some(text) => (
            "200 OK",
            json!({"choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text}}]})
            .to_string(),
        ),
        None => (
            "400 Bad Request",
            r#"{"error": {"message": "scripted refusal"}}"#.to_owned(),
        ),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The scripted model and judge. Generation: "Write N words" gets a think block and an
/// answer of N words (one of them `excellent` when the question says "win"). Critic:
/// `Score: 7`, unreadable for "garble". Pairwise: prefers the response with `excellent`,
/// else always says A (a position bias that both orders cancel into a tie); unreadable
/// for "garble".
fn scripted_reply(prompt: &str) -> Option<String> {
    if prompt.contains("refuse") && is_judge_prompt(prompt) {
        return None;
    }
    if prompt.contains("garble") && is_judge_prompt(prompt) {
        return Some("What a question.".into());
    }
    if prompt.contains("[Response A]") {
        let a = prompt.split("[Response A]").nth(1).unwrap();
        let (a, b) = a.split_once("[Response B]").unwrap();
        return Some(
            match (a.contains("excellent"), b.contains("excellent")) {
                (true, false) => "A is richer. [[A]]",
                (false, true) => "B is richer. [[B]]",
                _ => "Hard to say. [[A]]",
            }
            .into(),
        );
    }
    if prompt.contains("[Response]") {
        return Some("Solid.\nScore: 7".into());
    }
    let n: usize = prompt
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or(10);
    let mut words = vec!["word"; n];
    if prompt.contains("win") {
        words[0] = "excellent";
    }
    Some(format!(
        "<think>a plan</think>\n<answer>{}</answer>",
        words.join(" ")
    ))
}

fn prompt_line(idx: usize, question: &str, kind: &str, baseline: bool) -> String {
    let mut record = json!({"idx": idx, "question": question, "type": kind, "length": 100});
    if baseline {
        record["baseline_response"] = json!("a plain baseline");
    }
    record.to_string()
}

/// Five prompts with known scores (see `scripted_reply`).
fn write_prompts(dir: &Path) -> std::path::PathBuf {
    let lines = [
        prompt_line(1, "Write 100 words to win.", "a", true),
        prompt_line(2, "Write 50 words.", "a", true),
        prompt_line(3, "Write 200 words.", "b", true),
        prompt_line(4, "Write 400 words of garble.", "b", true),
        prompt_line(5, "Write 100 words.", "b", false),
    ];
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn eval_args<'a>(prompts: &'a Path, out: &'a Path, url: &'a str) -> Vec<String> {
    [
        "eval",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--endpoint",
        url,
        "--endpoint-model",
        "scripted",
        "--judge-endpoint",
        url,
        "--retries",
        "1",
        "--backoff-s",
        "0.01",
        "--bootstrap",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    quill(&args)
}

fn read_results(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn close(a: &Value, b: f64) -> bool {
    (a.as_f64().unwrap_or(f64::NAN) - b).abs() < 1e-6
}

/// Width and height of a PNG, decoded in full by libtorch's image reader.
fn png_size(path: &Path) -> (i64, i64) {
    let image = tch::vision::image::load(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
    let size = image.size();
    assert_eq!(size[0], 3, "{}: RGB", path.display());
    (size[2], size[1])
}

#[test]
fn known_scores_verdicts_and_elo_from_a_scripted_endpoint_and_a_resume_that_redoes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Scripted::start(Duration::ZERO, scripted_reply);
    let prompts = write_prompts(dir.path());
    let out = dir.path().join("out");
    let url = server.url();
    let args = eval_args(&prompts, &out, &url);
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(server.generations(), 5);
    let results = read_results(&out);
    let samples = results["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 5);
    let by_id = |id: &str| samples.iter().find(|s| s["id"] == id).unwrap();
    for (id, score) in [
        ("1", 100.0),
        ("2", 50.0),
        ("3", 200.0 / 3.0),
        ("4", 0.0),
        ("5", 100.0),
    ] {
        assert!(
            close(&by_id(id)["length_score"], score),
            "{id}: {}",
            by_id(id)
        );
    }
    assert_eq!(by_id("2")["output_length"], 50);
    assert_eq!(
        by_id("2")["answer"].as_str().unwrap().split(' ').count(),
        50
    );
    // Verdicts in both orders: the model's answer first, then second.
    assert_eq!(by_id("1")["pairwise"][0]["verdicts"], json!(["A", "B"]));
    assert_eq!(by_id("1")["pairwise"][0]["outcome"], "win");
    assert_eq!(by_id("2")["pairwise"][0]["verdicts"], json!(["A", "A"]));
    assert_eq!(by_id("2")["pairwise"][0]["outcome"], "tie");
    assert_eq!(by_id("4")["pairwise"][0]["verdicts"], json!([null, null]));
    assert_eq!(by_id("4")["pairwise"][0]["outcome"], Value::Null);
    assert_eq!(by_id("4")["critic"]["score"], Value::Null);
    assert_eq!(by_id("5")["pairwise"], json!([]));
    assert_eq!(by_id("5")["critic"]["score"], 7.0);

    let summary = &results["summary"];
    let model = &summary["models"][0];
    assert_eq!(model["model"], "scripted");
    assert_eq!(model["samples"], 5);
    let mean: f64 = samples
        .iter()
        .map(|s| s["length_score"].as_f64().unwrap())
        .sum::<f64>()
        / 5.0;
    assert!(close(&model["length_score"], mean));
    assert!(close(&model["length_score_by_type"]["a"], 75.0));
    assert!(close(
        &model["length_score_by_type"]["b"],
        (200.0 / 3.0 + 100.0) / 3.0
    ));
    assert!(close(&model["critic_score"], 7.0));
    assert_eq!(
        (
            model["critic_scored"].clone(),
            model["critic_unparsable"].clone()
        ),
        (json!(4), json!(1))
    );
    assert_eq!(
        model["pairwise"]["baseline"],
        json!({"win": 1, "tie": 2, "loss": 0, "undecided": 1, "unparsable_verdicts": 2})
    );
    assert_eq!(
        (
            summary["verdicts"].clone(),
            summary["unparsable_verdicts"].clone()
        ),
        (json!(8), json!(2))
    );
    // 2 points of 3 against the anchor: 400·log10(2) above it.
    assert_eq!(summary["anchor"], "baseline");
    assert!(
        close(&model["elo"], 1000.0 + 400.0 * 2f64.log10()),
        "{model}"
    );
    let ci = model["elo_ci"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() <= model["elo"].as_f64().unwrap());
    assert!(ci[1].as_f64().unwrap() >= model["elo"].as_f64().unwrap());
    let notes = summary["notes"].to_string();
    assert!(
        notes.contains("2 of 8 pairwise verdicts were unreadable"),
        "{notes}"
    );
    let printed = stdout(&output);
    assert!(
        printed.contains("vs baseline: 1 wins, 2 ties, 0 losses, 1 undecided"),
        "{printed}"
    );
    assert_eq!(png_size(&out.join("summary.png")), (1400, 700));

    // The same command again: everything is done, nothing is asked again.
    let before = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(server.generations(), 5, "a finished sample was redone");
    assert!(
        stderr(&output).contains("5 samples already done"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("samples.jsonl")).unwrap(),
        before
    );
    assert_eq!(results_summary(&out), results_summary_of(summary));

    // Two records lost and a line cut short: only those two are redone.
    let kept: Vec<&str> = before.lines().take(3).collect();
    std::fs::write(
        out.join("samples.jsonl"),
        kept.join("\n") + "\n{\"model\": \"scr",
    )
    .unwrap();
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(server.generations(), 7);
    let after = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(after.lines().count(), 5);
    assert!(after.starts_with(&(kept.join("\n") + "\n")));
    assert_eq!(results_summary(&out), results_summary_of(summary));

    // Other settings into the same folder would mix results: refused, naming them.
    let mut other = args.clone();
    other.extend(["--judge-model".into(), "another".into()]);
    let output = run(&other);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("other settings")
            && error.contains("judge_model: \"default\" → \"another\""),
        "{error}"
    );
    assert_eq!(server.generations(), 7);

    // Against another model's answers (this run's, so every decided verdict is a tie):
    // that model is rated, level with this one.
    let versus = dir.path().join("versus");
    let mut compare = eval_args(&prompts, &versus, &url);
    let previous = format!("previous={}", out.join("samples.jsonl").display());
    compare.extend(["--compare".into(), previous, "--no-critic".into()]);
    let output = run(&compare);
    assert!(output.status.success(), "{}", stderr(&output));
    let versus_results = read_results(&versus);
    let summary = &versus_results["summary"];
    let model = &summary["models"][0];
    assert_eq!(
        model["pairwise"]["previous"],
        json!({"win": 0, "tie": 4, "loss": 0, "undecided": 1, "unparsable_verdicts": 2})
    );
    assert_eq!(model["pairwise"]["baseline"]["win"], 1);
    let previous = summary["ratings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["player"] == "previous")
        .unwrap();
    assert!(
        close(&previous["elo"], model["elo"].as_f64().unwrap()),
        "{summary}"
    );
    assert!(
        close(&model["elo"], 1000.0 + 400.0 * 2f64.log10()),
        "{summary}"
    );
}

fn results_summary(out: &Path) -> Value {
    results_summary_of(&read_results(out)["summary"])
}

/// The summary without the fields a rerun may order differently.
fn results_summary_of(summary: &Value) -> Value {
    let mut summary = summary.clone();
    summary.as_object_mut().unwrap().remove("notes");
    summary
}

#[test]
fn a_killed_run_continues_where_it_stopped_and_a_refusing_judge_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Scripted::start(Duration::from_millis(400), scripted_reply);
    let prompts = write_prompts(dir.path());
    let out = dir.path().join("out");
    let url = slow.url();
    let mut args = eval_args(&prompts, &out, &url);
    args.extend(["--concurrency".into(), "1".into(), "--no-pairwise".into()]);
    let mut command = Command::new(quill_bin());
    command.args(&args);
    let mut eval = Proc::spawn(command, &dir.path().join("eval.log"));
    let samples = out.join("samples.jsonl");
    wait_until(
        "two samples",
        Duration::from_secs(20),
        &mut [&mut eval],
        || {
            let text = std::fs::read_to_string(&samples).ok()?;
            (text.lines().count() >= 2).then_some(())
        },
    );
    eval.child.kill().unwrap();
    eval.child.wait().unwrap();
    let done = std::fs::read_to_string(&samples).unwrap().lines().count();
    assert!((2..5).contains(&done), "{done} samples before the kill");
    let asked = slow.generations();
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        slow.generations() - asked,
        5 - done,
        "only the missing samples are redone"
    );
    let results = read_results(&out);
    let mut ids: Vec<String> = results["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["1", "2", "3", "4", "5"]);

    // A judge that refuses (HTTP 400) on the third prompt: an error naming the flag, and
    // the two samples started before it kept, the one still running when it failed too.
    let prompts = dir.path().join("refuse.jsonl");
    std::fs::write(
        &prompts,
        [
            prompt_line(1, "Write 10 words.", "a", false),
            prompt_line(2, "Write 20 words.", "a", false),
            prompt_line(3, "Write 30 words, refuse.", "a", false),
        ]
        .join("\n"),
    )
    .unwrap();
    let fast = Scripted::start(Duration::ZERO, scripted_reply);
    let url = fast.url();
    let out = dir.path().join("refused");
    let mut args = eval_args(&prompts, &out, &url);
    args.extend(["--concurrency".into(), "2".into()]);
    let output = run(&args);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("--judge-endpoint")
            && error.contains("400")
            && error.contains("run the same command again"),
        "{error}"
    );
    let kept = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(kept.lines().count(), 2, "{kept}");
}

#[test]
fn quill_serve_as_generator_and_judge_with_unreadable_verdicts_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(quill_bin());
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--default-max-tokens",
        "8",
    ]);
    let mut server = Proc::spawn(command, &dir.path().join("serve.log"));
    let log = server.log.clone();
    let addr = wait_until(
        "the serve address",
        Duration::from_secs(60),
        &mut [&mut server],
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
    let url = format!("http://{addr}/v1");
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        [
            prompt_line(1, "Write a story.", "fiction", true),
            prompt_line(2, "写一首诗。", "poetry", true),
            prompt_line(3, "Write an essay.", "essay", true),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let output = quill(&[
        "eval",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--endpoint",
        &url,
        "--endpoint-model",
        "default",
        "--max-new-tokens",
        "12",
        "--judge-endpoint",
        &url,
        "--judge-max-tokens",
        "6",
        "--retries",
        "0",
        "--bootstrap",
        "50",
    ]);
    assert!(
        output.status.success(),
        "{}\n{}",
        stderr(&output),
        server.log()
    );
    let results = read_results(&out);
    let samples = results["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    let (mut unreadable, mut critic_unreadable) = (0, 0);
    for s in samples {
        let score = s["length_score"]
            .as_f64()
            .expect("every sample has a length score");
        assert!((0.0..=100.0).contains(&score));
        assert!(!s["response"].as_str().unwrap().is_empty());
        let c = &s["pairwise"][0];
        let nulls = c["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v.is_null())
            .count();
        assert_eq!(c["unparsable"], nulls);
        unreadable += nulls;
        critic_unreadable += usize::from(s["critic"]["score"].is_null());
    }
    let summary = &results["summary"];
    assert_eq!(summary["unparsable_verdicts"], unreadable);
    assert_eq!(summary["verdicts"], 6);
    assert_eq!(summary["models"][0]["critic_unparsable"], critic_unreadable);
    let tally = &summary["models"][0]["pairwise"]["baseline"];
    let total: u64 = ["win", "tie", "loss", "undecided"]
        .iter()
        .map(|k| tally[k].as_u64().unwrap())
        .sum();
    assert_eq!(total, 3);
    if unreadable > 0 {
        assert!(
            summary["notes"].to_string().contains("unreadable"),
            "{summary}"
        );
    }
    // The server went away: the error names the flag and keeps the finished samples.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let output = quill(&[
        "eval",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        dir.path().join("gone").to_str().unwrap(),
        "--endpoint",
        &url,
        "--endpoint-model",
        "default",
        "--retries",
        "0",
    ]);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("--endpoint") && error.contains("cannot be reached"),
        "{error}"
    );
}

#[test]
fn a_checkpoint_series_on_the_local_engine_draws_its_charts() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("checkpoints");
    // The learner's names (zero-padded) and a half-written one it would leave behind.
    for step in ["step-00000020", "step-10", "step-00000030.tmp-1-1"] {
        let o = quill(&[
            "init-model",
            "--out",
            checkpoints.join(step).to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    std::fs::create_dir_all(checkpoints.join("notes")).unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        [
            json!({"question": "Write a poem.", "length": 20}).to_string(),
            json!({"question": "Describe the sea."}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let output = quill(&[
        "eval",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--checkpoints",
        checkpoints.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--threads",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let results = read_results(&out);
    let models = results["summary"]["models"].as_array().unwrap();
    let steps: Vec<&Value> = models.iter().map(|m| &m["step"]).collect();
    assert_eq!(steps, [&json!(10), &json!(20)]);
    let samples = results["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4);
    // Prompts are ids by line number; only the first requires a length.
    assert_eq!(samples[0]["id"], "1");
    assert!(samples[0]["length_score"].is_number());
    assert!(samples[1]["length_score"].is_null());
    assert_eq!(models[0]["length_scored"], 1);
    // Same weights, greedy: the same answers at both steps.
    assert_eq!(samples[0]["response"], samples[2]["response"]);
    assert_eq!(models[1]["model"], "step-00000020");
    for png in [
        "summary-step-10.png",
        "summary-step-00000020.png",
        "series.png",
    ] {
        assert_eq!(png_size(&out.join(png)), (1400, 700), "{png}");
    }
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let eval = |prompts: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = quill(&args);
        assert!(!o.status.success(), "{}", stdout(&o));
        stderr(&o)
    };
    let e = eval(&dir.path().join("missing.jsonl"), &[]);
    assert!(
        e.contains("--prompts") && e.contains("missing.jsonl"),
        "{e}"
    );
    let file = dir.path().join("p.jsonl");
    let good = prompt_line(1, "Write.", "a", true);
    std::fs::write(&file, format!("{good}\n{{\"idx\": 2,\n")).unwrap();
    let e = eval(&file, &[]);
    assert!(e.contains("line 2: not JSON"), "{e}");
    std::fs::write(
        &file,
        format!("{good}\n{{\"idx\": 2, \"prompt\": \"x\"}}\n"),
    )
    .unwrap();
    let e = eval(&file, &[]);
    assert!(
        e.contains("line 2") && e.contains("`question`") && e.contains("--question-field"),
        "{e}"
    );
    std::fs::write(&file, "{\"idx\": 1, \"question\": \"q\", \"length\": 0}\n").unwrap();
    let e = eval(&file, &[]);
    assert!(
        e.contains("line 1") && e.contains("above 0") && e.contains("--length-field"),
        "{e}"
    );
    std::fs::write(&file, format!("{good}\n")).unwrap();
    let e = eval(&file, &["--compare", "other"]);
    assert!(e.contains("--compare needs --judge-endpoint"), "{e}");
    let e = eval(&file, &["--judge-endpoint", "ftp://x", "--no-critic"]);
    assert!(
        e.contains("--judge-endpoint") && e.contains("http://"),
        "{e}"
    );
    let e = eval(&file, &["--model", "/no/such/model"]);
    assert!(e.contains("--model /no/such/model"), "{e}");
    let e = eval(&file, &["--checkpoints", dir.path().to_str().unwrap()]);
    assert!(e.contains("no step-N folders"), "{e}");
    let rubric = dir.path().join("rubric.txt");
    std::fs::write(&rubric, "{question} {answer_a}").unwrap();
    let e = eval(
        &file,
        &[
            "--judge-endpoint",
            "http://127.0.0.1:9/v1",
            "--pairwise-template",
            rubric.to_str().unwrap(),
        ],
    );
    assert!(
        e.contains("--pairwise-template") && e.contains("{answer_b}"),
        "{e}"
    );
    // Every flag has help text.
    let help = stdout(&quill(&["eval", "--help"]));
    for flag in [
        "--prompts",
        "--endpoint-model",
        "--judge-endpoint",
        "--compare",
        "--bootstrap",
        "--checkpoints",
        "--critic-template",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
    // Long help puts each flag on its own line and its text, indented deeper, below it.
    let lines: Vec<&str> = help.lines().collect();
    let undocumented: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, l)| {
            l.trim_start().starts_with('-')
                && !lines
                    .get(i + 1)
                    .is_some_and(|next| next.starts_with("          ") && !next.trim().is_empty())
        })
        .map(|(_, l)| *l)
        .collect();
    assert!(
        undocumented.is_empty(),
        "flags without help: {undocumented:?}"
    );
    assert!(
        !out.join("samples.jsonl").exists(),
        "bad input leaves nothing behind"
    );
}
