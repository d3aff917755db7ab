//! `quill plot` as a user runs it: charts from a metrics file, and clear errors on bad input.

use std::path::Path;

mod support;

use support::{quill, stderr, stdout};

/// 30 step records like the learner writes, interleaved with records of other kinds.
fn synthetic_metrics() -> String {
    let mut lines = Vec::new();
    for step in 1..=30 {
        let s = f64::from(step);
        let wiggle = (s * 1.7).sin();
        let record = serde_json::json!({
            "kind": "step",
            "time": 1_700_000_000.0 + 42.0 * s,
            "step": step,
            "reward_mean": 0.2 + 0.02 * s + 0.05 * wiggle,
            "reward_length": 0.1 + 0.025 * s + 0.08 * wiggle,
            "reward_format": 0.6 + 0.01 * s - 0.03 * wiggle,
            "reward_quality": 0.3 + 0.015 * s + 0.04 * wiggle,
            "response_words_mean": 900.0 + 250.0 * s + 120.0 * wiggle,
            "in_range_share": (0.05 + 0.025 * s + 0.05 * wiggle).clamp(0.0, 1.0),
            "generated_tokens_per_s": 5200.0 + 300.0 * wiggle,
            "trained_tokens_per_s": 8100.0 + 450.0 * (s * 0.9).cos(),
            "discarded_token_share": 0.4 / s,
            "stale_share": 0.01 / s,
            "idle_share": 0.1 + 0.05 * wiggle,
            "entropy": 6.0 - 0.05 * s,
        });
        lines.push(record.to_string());
        if step % 10 == 0 {
            lines.push(format!(
                r#"{{"kind":"throughput","time":{},"generated_tokens_per_s":5000}}"#,
                1_700_000_000.0 + 42.0 * s
            ));
            lines.push(String::new());
        }
    }
    lines.join("\n") + "\n"
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR", "{}", path.display());
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn plot_writes_every_chart() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(&metrics, synthetic_metrics()).unwrap();
    let out_dir = dir.path().join("charts/run1");
    for x in ["step", "time"] {
        let out = quill(&[
            "plot",
            metrics.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--x",
            x,
            "--smooth",
            "4",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        for name in [
            "reward.png",
            "length.png",
            "throughput.png",
            "waste.png",
            "entropy.png",
        ] {
            let path = out_dir.join(name);
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert_eq!(png_size(&path), (1200, 800), "{name}");
            assert!(std::fs::metadata(&path).unwrap().len() > 10_000, "{name}");
        }
    }
}

#[test]
fn plot_skips_a_chart_whose_fields_are_all_missing() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let lines: Vec<String> = (1..=5)
        .map(|s| {
            let reward = if s == 3 { "null".to_owned() } else { format!("{}", 0.1 * f64::from(s)) };
            format!(r#"{{"kind":"step","time":{s},"step":{s},"reward_mean":{reward},"response_words_mean":{}}}"#, 100 * s)
        })
        .collect();
    std::fs::write(&metrics, lines.join("\n")).unwrap();
    let out_dir = dir.path().join("charts");
    let out = quill(&[
        "plot",
        metrics.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(png_size(&out_dir.join("reward.png")), (1200, 800));
    assert_eq!(png_size(&out_dir.join("length.png")), (1200, 800));
    assert!(!out_dir.join("throughput.png").exists());
    assert!(
        stderr(&out).contains("skipped throughput.png"),
        "{}",
        stderr(&out)
    );
}

/// Runs `quill plot` on `contents` and returns its stderr, checking that it failed cleanly.
fn plot_fails(contents: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    if let Some(contents) = contents {
        std::fs::write(&metrics, contents).unwrap();
    }
    let out_dir = dir.path().join("charts");
    let out = quill(&[
        "plot",
        metrics.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("metrics.jsonl"), "{err}");
    assert!(!out_dir.exists(), "{err}");
    err
}

#[test]
fn plot_rejects_a_missing_file() {
    let err = plot_fails(None);
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn plot_names_the_malformed_line() {
    let err = plot_fails(Some(
        "{\"kind\":\"step\",\"step\":1,\"reward_mean\":0.5}\n\n{\"kind\":\"step\",\"step\":2,\n",
    ));
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn plot_needs_step_records() {
    let err = plot_fails(Some(
        "{\"kind\":\"throughput\",\"generated_tokens_per_s\":10}\n",
    ));
    assert!(err.contains("none of kind \"step\""), "{err}");
}

#[test]
fn plot_rejects_a_non_numeric_field() {
    let err = plot_fails(Some(
        "{\"kind\":\"step\",\"step\":1,\"reward_mean\":\"high\"}\n",
    ));
    assert!(err.contains("`reward_mean`"), "{err}");
    assert!(err.contains("expected a number"), "{err}");
}
