//! quill's length reward against its Python port (tests/reference/length_reward.py),
//! which scores TRL's completions in `quill bench rl` (tests/reference/rl_bench.py): the
//! same rewards on tests/fixtures/length_reward.jsonl, the same ranges parsed from
//! questions, and a clear error for a bad fixture.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use quill_reward::{parse_length_range, response_length_reward, LengthRange};
use serde::Deserialize;
use support::{python, repo_root};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    response: String,
    lo: u32,
    hi: u32,
    l_max: u32,
}

/// Runs `rl_bench.py` with `args`.
fn rl_bench(args: &[&str]) -> Output {
    Command::new(python())
        .current_dir(repo_root())
        .arg("tests/reference/rl_bench.py")
        .args(args)
        .output()
        .expect("python runs")
}

/// The JSON object on the last line of a successful run's stdout.
fn last_json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "rl_bench.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout.clone()).expect("utf-8 stdout");
    let last = stdout.lines().last().expect("a line of output");
    serde_json::from_str(last).expect("the last line is JSON")
}

#[test]
#[ignore = "slow tier: runs the venv's python"]
fn the_python_port_gives_the_rust_length_reward() {
    let path = repo_root().join("tests/fixtures/length_reward.jsonl");
    let text = std::fs::read_to_string(&path).expect("fixtures");
    let fixtures: Vec<Fixture> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a fixture"))
        .collect();
    assert!(fixtures.len() >= 20, "only {} fixtures", fixtures.len());
    assert!(
        fixtures.iter().any(|f| f
            .response
            .chars()
            .any(|c| ('\u{4E00}'..='\u{9FFF}').contains(&c))),
        "the fixtures must include a Chinese text"
    );
    let json = last_json(&rl_bench(&["reward", "--fixtures", path.to_str().unwrap()]));
    let python: Vec<f64> = json["rewards"]
        .as_array()
        .expect("rewards")
        .iter()
        .map(|r| r.as_f64().expect("a number"))
        .collect();
    assert_eq!(python.len(), fixtures.len(), "one reward per fixture");
    for (i, (f, got)) in fixtures.iter().zip(&python).enumerate() {
        let range = LengthRange::new(f.lo, f.hi).expect("a valid range");
        let want = response_length_reward(&f.response, range, f.l_max);
        assert!(
            (got - want).abs() <= 1e-12,
            "fixture {} ({:?}, [{}, {}], l_max {}): python {got}, rust {want}",
            i + 1,
            f.response,
            f.lo,
            f.hi,
            f.l_max
        );
    }
}

/// Questions for the range parser: the Rust unit tests' cases and some more.
const QUESTIONS: &[&str] = &[
    "Write an essay of 2,000 words about rivers.",
    "In 2000 Words, describe a river.",
    "Write a 2k-word essay.",
    "写一篇２０００字的散文",
    "写一篇2千字的文章",
    "Write 1.5k words.",
    "写一篇1.5万字的小说",
    "Write a 333-word poem.",
    "Answer in not more than 2000 words.",
    "The essay shouldn't exceed 2000 words.",
    "The essay must not be more than 2000 words long.",
    "Write a maximum of 2000 words.",
    "Write 2,000 words maximum.",
    "字数不多于2000字",
    "文章不得超过 2000 字",
    "写一篇2000字以内的文章",
    "Write not fewer than 2000 words.",
    "Write 2000+ words.",
    "Write 2,000 words or more.",
    "写2000字以上的文章",
    "Write an 800–1,200-word essay.",
    "Write between 800 words and 1200 words.",
    "Write 1200-800 words.",
    "写800字至1200字的文章",
    "写800~1200字",
    "Write 1-2k words.",
    "Write 800-1.2k words.",
    "Write 5 paragraphs in 3 to 4 sections.",
    "Describe the wordless 400 wordsmiths.",
    "Write 2.5 words.",
    "Write 99999999999999999999999 words.",
    "Write 4000000000 words.",
    "Write v2 words and GPT4 words.",
    "Write 3 to 5 paragraphs of 500 words each, 800 words at most in all.",
    "Write 500 words, then 800 more words.",
    "It can’t be longer than 1,000 words.",
    "请写一篇不应超过三千字、至少1500余字的文章",
    "写一篇3000多字的散文，不宜少于 2000 字",
    "Write\u{3000}300\u{00A0}words",
    "WRITE 1,234,567 WORDS",
    "Write 12.000 words or under",
    "写一篇两千字的文章",
    "写一篇一万五字的小说",
    "写八百到一千二百字",
    "写一千零五十字左右",
    "写三四千字",
    "写一篇关于十字路口的文章",
];

#[test]
#[ignore = "slow tier: runs the venv's python"]
fn the_python_port_parses_ranges_like_rust() {
    let script = "import json, sys\n\
                  sys.dont_write_bytecode = True\n\
                  sys.path.insert(0, 'tests/reference')\n\
                  from length_reward import parse_length_range\n\
                  ranges = [parse_length_range(q) for q in json.load(sys.stdin)]\n\
                  print(json.dumps([r and [r.lo, r.hi] for r in ranges]))";
    let mut child = Command::new(python())
        .current_dir(repo_root())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(QUESTIONS).unwrap().as_bytes())
        .expect("questions sent");
    let json = last_json(&child.wait_with_output().expect("python ends"));
    let python: Vec<Option<(u32, u32)>> = serde_json::from_value(json).expect("ranges");
    assert_eq!(python.len(), QUESTIONS.len());
    for (question, got) in QUESTIONS.iter().zip(python) {
        let want = parse_length_range(question).map(|r| (r.lo(), r.hi()));
        assert_eq!(got, want, "question {question:?}");
    }
}

#[test]
#[ignore = "slow tier: runs the venv's python"]
fn a_fixture_without_lo_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"response\": \"<answer>a b</answer>\", \"lo\": 1, \"hi\": 2, \"l_max\": 4}\n\
         {\"response\": \"<answer>a b</answer>\", \"hi\": 2, \"l_max\": 4}\n",
    )
    .expect("bad fixture written");
    let output = rl_bench(&["reward", "--fixtures", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted a fixture without `lo`");
    assert!(
        stderr.contains("bad.jsonl:2: missing field `lo`"),
        "stderr: {stderr}"
    );
}
