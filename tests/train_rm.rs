//! `quill train-rm` as a user runs it: the shipped example on the embedded model, the
//! saved reward model scored by transformers, resuming, and bad input.

mod support;

use quill_model::{Qwen2, Tokenizer};
use std::process::Command;
use support::{python, quill, repo_root, stderr, stdout};
use tch::{Device, Kind};

#[test]
#[ignore = "slow tier: runs transformers (tests/reference/reward_model.py)"]
fn trains_on_the_example_and_transformers_gives_the_same_scores() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rm");
    let out_s = out.to_str().unwrap();
    let run = quill(&[
        "train-rm",
        "--out",
        out_s,
        "--lr",
        "1e-3",
        "--max-length",
        "96",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stdout(&run).contains("wrote the reward model to"),
        "{}",
        stdout(&run)
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let epoch: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(epoch["eval_accuracy"].as_f64().is_some(), "{epoch}");

    let final_dir = out.join("final");
    let texts = vec![
        "Write about the sea.\n\nThe tide comes in slowly, carrying shells.".to_owned(),
        "写一篇关于春天的短文\n\n春风吹过田野。".to_owned(),
        "Write about snow.\n\nsnow snow snow snow".to_owned(),
    ];
    let texts_file = dir.path().join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
    let scores_file = dir.path().join("scores.json");
    let status = Command::new(python())
        .arg(repo_root().join("tests/reference/reward_model.py"))
        .arg("score")
        .args([&final_dir, &texts_file, &scores_file])
        .status()
        .unwrap();
    assert!(status.success());
    let want: Vec<f64> =
        serde_json::from_str(&std::fs::read_to_string(&scores_file).unwrap()).unwrap();
    let model = Qwen2::load(&final_dir, Device::Cpu, Kind::Float).unwrap();
    let tokenizer = Tokenizer::from_file(&final_dir.join("tokenizer.json")).unwrap();
    for (text, want) in texts.iter().zip(want) {
        let ids = tokenizer.encode(text).unwrap();
        let got = tch::no_grad(|| model.classify(&[ids]))
            .unwrap()
            .double_value(&[0, 0]);
        assert!(
            (got - want).abs() < 1e-4,
            "{text:?}: quill {got}, transformers {want}"
        );
    }

    let again = quill(&["train-rm", "--out", out_s]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already holds checkpoints: pass --resume"),
        "{}",
        stderr(&again)
    );
    let resumed = quill(&[
        "train-rm",
        "--out",
        out_s,
        "--resume",
        "--lr",
        "1e-3",
        "--max-length",
        "96",
    ]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stderr(&resumed).contains("resuming from"),
        "{}",
        stderr(&resumed)
    );
}

#[test]
fn bad_preference_files_and_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    let out = dir.path().join("rm");
    let fails = |contents: &str, extra: &[&str]| {
        std::fs::write(&data, contents).unwrap();
        let mut args = vec![
            "train-rm",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = quill(&args);
        assert!(!run.status.success());
        stderr(&run)
    };
    let good = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;
    let e = fails(
        &format!("{good}\n{{\"prompt\": \"q\", \"chosen\": \"a\"}}\n"),
        &[],
    );
    assert!(e.contains("line 2: missing field `rejected`"), "{e}");
    let e = fails("", &[]);
    assert!(e.contains("holds no pairs"), "{e}");
    let e = fails(&format!("{good}\n{{not json\n"), &[]);
    assert!(e.contains("line 2: invalid JSON"), "{e}");
    let e = fails(
        r#"{"question": "q", "good": "a", "bad": "b"}"#,
        &["--prompt-field", "question"],
    );
    assert!(e.contains("line 1: missing field `chosen`"), "{e}");
    let e = fails(&format!("{good}\n{good}\n"), &["--eval-fraction", "1.5"]);
    assert!(e.contains("--eval-fraction: must be in [0, 1)"), "{e}");
    let e = fails(&format!("{good}\n{good}\n"), &["--warmup-steps", "5"]);
    assert!(
        e.contains("--warmup-steps: must be below the run's 1 updates"),
        "{e}"
    );
    let e = fails(&format!("{good}\n"), &["--resume"]);
    assert!(e.contains("--resume: no checkpoint"), "{e}");
}
