//! Tests of reward-model training: one update against PyTorch, learning a synthetic
//! preference, two ranks against one, and resuming an interrupted run.

use super::*;
use crate::parallel::collective::{on_loopback_ranks, Collective};
use quill_model::{Qwen2, Tokenizer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn pair(prompt: &str, chosen: &str, rejected: &str) -> PreferencePair {
    PreferencePair {
        prompt: prompt.into(),
        chosen: chosen.into(),
        rejected: rejected.into(),
    }
}

fn small_pairs(n: usize) -> Vec<PreferencePair> {
    (0..n)
        .map(|i| {
            pair(
                &format!("Write about the sea, take {i}."),
                "The sea is wide and the light is low over the water.",
                &"sea ".repeat(3 + i % 4),
            )
        })
        .collect()
}

fn trainer(
    pairs: &[PreferencePair],
    eval: &[PreferencePair],
    config: RmConfig,
    collective: Option<Box<dyn Collective>>,
) -> RmTrainer {
    let (model, tokenizer, _) = load_reward_model("default", Device::Cpu, config.seed).unwrap();
    RmTrainer::new(
        model,
        &tokenizer,
        ModelSource::Default,
        pairs,
        eval,
        config,
        collective,
    )
    .unwrap()
}

fn weights(model: &Qwen2) -> Vec<(String, Tensor)> {
    let mut w = model.hf_tensors(Kind::Float);
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn flat(weights: &[(String, Tensor)]) -> Vec<f32> {
    weights
        .iter()
        .flat_map(|(_, t)| Vec::<f32>::try_from(t.reshape([-1])).unwrap())
        .collect()
}

#[test]
#[ignore = "slow tier: runs PyTorch (tests/reference/reward_model.py)"]
fn one_update_equals_a_pytorch_bradley_terry_step() {
    let pairs = small_pairs(4);
    let config = RmConfig {
        micro_batch: 2,
        accumulation: 2,
        epochs: 2,
        lr: 1e-3,
        weight_decay: 0.01,
        ..RmConfig::default()
    };
    let mut t = trainer(&pairs, &[], config, None);
    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("before");
    checkpoint::write_model(&before, t.model(), &ModelSource::Default).unwrap();
    let tokenizer = Tokenizer::from_file(&before.join("tokenizer.json")).unwrap();
    let ids = |text: String| tokenizer.encode(&text).unwrap();
    let spec = serde_json::json!({
        "chosen": pairs.iter().map(|p| ids(p.text(&p.chosen))).collect::<Vec<_>>(),
        "rejected": pairs.iter().map(|p| ids(p.text(&p.rejected))).collect::<Vec<_>>(),
        "lr": t.next_lr(),
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
    });
    let spec_file = dir.path().join("pairs.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let out = dir.path().join("after.safetensors");
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/reference/reward_model.py"))
        .args([
            "bt-step".as_ref(),
            before.as_os_str(),
            spec_file.as_os_str(),
            out.as_os_str(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let (report, _) = t.train_step(&[0, 1, 2, 3], false).unwrap();
    let mut want: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let loss = want.remove("__loss__").unwrap().double_value(&[0]);
    let grad_norm = want.remove("__grad_norm__").unwrap().double_value(&[0]);
    assert!(
        (report.loss - loss).abs() < 1e-5 * loss.abs().max(1.0),
        "{report:?} vs {loss}"
    );
    assert!(
        (report.grad_norm - grad_norm).abs() < 1e-4 * grad_norm,
        "{report:?} vs {grad_norm}"
    );
    let mut want: Vec<(String, Tensor)> = want.into_iter().collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    let got = weights(t.model());
    let moved = max_diff(
        &got,
        &weights(&Qwen2::load(&before, Device::Cpu, Kind::Float).unwrap()),
    );
    let diff = max_diff(&got, &want);
    assert!(moved > 1e-4, "the update moved the weights ({moved})");
    // The update is about ±lr = 1e-3 per weight; micro-batches pad differently from
    // PyTorch's one batch, so near-zero gradients differ by float noise.
    assert!(
        diff < 1e-5,
        "quill and PyTorch differ by {diff} after one update"
    );
}

#[test]
fn two_ranks_take_the_same_update_as_one() {
    let pairs = small_pairs(6);
    let config = RmConfig {
        micro_batch: 2,
        lr: 1e-3,
        ..RmConfig::default()
    };
    let mut single = trainer(&pairs, &pairs[..2], config.clone(), None);
    let (want, _) = single.train_step(&[0, 1, 2, 3, 4], false).unwrap();
    let want_eval = single.evaluate().unwrap().unwrap();
    let want_weights = weights(single.model());
    let results = on_loopback_ranks(2, Duration::from_secs(30), |ring| {
        let config = RmConfig {
            micro_batch: 1,
            ..config.clone()
        };
        let rank = ring.rank();
        let mut t = trainer(&pairs, &pairs[..2], config, Some(Box::new(ring)));
        let (report, stop) = t.train_step(&[0, 1, 2, 3, 4], rank == 1).unwrap();
        let eval = t.evaluate().unwrap().unwrap();
        (report, stop, eval, flat(&weights(t.model())))
    });
    let want_flat = flat(&want_weights);
    for (report, stop, eval, got) in results {
        let diff = got
            .iter()
            .zip(&want_flat)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            (report.loss - want.loss).abs() < 1e-6,
            "{report:?} vs {want:?}"
        );
        assert!(
            (report.grad_norm - want.grad_norm).abs() < 1e-5 * want.grad_norm,
            "the ranks' gradients add up to the single rank's: {report:?} vs {want:?}"
        );
        assert_eq!(report.accuracy, want.accuracy);
        assert!(stop, "rank 1's stop request reaches every rank");
        assert!((eval.0 - want_eval.0).abs() < 1e-6 && eval.1 == want_eval.1);
        // Adam's first update is about ±lr per weight; float noise in near-zero gradients
        // moves a few weights by a small fraction of that.
        assert!(diff < 1e-5, "two ranks end {diff} away from one");
    }
}

/// Answers near 12 words are preferred to ones of 3 or 40: the length signal the quality
/// reward should not need to learn, but one a tiny model can.
fn length_pairs(n: usize, seed: u64) -> Vec<PreferencePair> {
    use rand::{Rng, SeedableRng};
    let words = [
        "sea", "light", "tree", "river", "stone", "night", "wind", "snow",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut text = |len: usize| {
        (0..len)
            .map(|_| words[rng.random_range(0..words.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    (0..n)
        .map(|i| {
            let good = text(10 + i % 5);
            let bad = text(if i % 2 == 0 { 2 + i % 3 } else { 36 + i % 8 });
            pair("Write about 12 words.", &good, &bad)
        })
        .collect()
}

#[test]
#[ignore = "slow tier: trains a reward model for 3 epochs of 160 pairs (minutes on 2 busy cores)"]
fn a_tiny_reward_model_learns_a_length_preference() {
    let train = length_pairs(160, 1);
    let eval = length_pairs(60, 2);
    let config = RmConfig {
        micro_batch: 16,
        epochs: 3,
        lr: 2e-3,
        warmup_steps: 3,
        ..RmConfig::default()
    };
    let mut t = trainer(&train, &eval, config, None);
    let before = t.evaluate().unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut epochs = Vec::new();
    let outcome = t
        .run(dir.path(), &|| false, &mut |_| {}, &mut |e| epochs.push(*e))
        .unwrap();
    let last = epochs.last().unwrap();
    let accuracy = last.eval_accuracy.unwrap();
    assert!(
        accuracy >= 0.85,
        "held-out accuracy {accuracy} (before: {before:?}, epochs {epochs:?})"
    );
    assert!(last.eval_loss.unwrap() < before.0);
    assert_eq!(outcome, Outcome::Finished(dir.path().join("final")));
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let pairs = small_pairs(10);
    let config = RmConfig {
        micro_batch: 2,
        epochs: 2,
        lr: 1e-3,
        warmup_steps: 1,
        ..RmConfig::default()
    };
    let full_dir = tempfile::tempdir().unwrap();
    let mut full = trainer(&pairs, &pairs[..2], config.clone(), None);
    full.run(full_dir.path(), &|| false, &mut |_| {}, &mut |_| {})
        .unwrap();
    let want = weights(full.model());

    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(&pairs, &pairs[..2], config.clone(), None);
    let steps = std::cell::Cell::new(0);
    let outcome = first
        .run(
            dir.path(),
            &|| steps.get() == 7,
            &mut |_| steps.set(steps.get() + 1),
            &mut |_| {},
        )
        .unwrap();
    let checkpoint = latest_checkpoint(dir.path()).unwrap();
    assert_eq!(outcome, Outcome::Interrupted(checkpoint.clone()));
    assert!(checkpoint.ends_with("step-00000008"), "{checkpoint:?}");

    let mut second = trainer(&pairs, &pairs[..2], config.clone(), None);
    second.resume(&checkpoint).unwrap();
    assert_eq!(second.progress().step, 8);
    second
        .run(dir.path(), &|| false, &mut |_| {}, &mut |_| {})
        .unwrap();
    assert_eq!(max_diff(&weights(second.model()), &want), 0.0);
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let full_metrics = std::fs::read_to_string(full_dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics, full_metrics,
        "epoch numbers survive the interruption"
    );

    let mut other = trainer(&pairs[..6], &pairs[..2], config, None);
    let err = other.resume(&checkpoint).unwrap_err().to_string();
    assert!(err.contains("different data"), "{err}");
}
