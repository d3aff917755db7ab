//! The Qwen2 model against Hugging Face transformers: logits, cached decoding, the
//! classification head, and checkpoints written by quill loaded back in transformers.
//! quill's side runs on `QUILL_TEST_DEVICE` (CPU unless set; see `scripts/gpu-check.sh`).

mod support;

use quill_model::{checkpoint, KvCache};
use quill_model::{Qwen2, Tokenizer};
use support::{expected, fixtures, ids, max_abs_diff, run_reference, test_device, VARIANTS};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn load(variant: &str) -> Qwen2 {
    Qwen2::load(&fixtures().join(variant), test_device(), Kind::Float).expect("fixture loads")
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn logits_match_transformers() {
    for variant in VARIANTS {
        let model = load(variant);
        let want = expected(variant);
        let input = want["logits_input"].to_device(model.device());
        let got = tch::no_grad(|| model.logits(&input));
        let diff = max_abs_diff(&got, &want["logits"]);
        assert!(diff <= TOLERANCE, "{variant}: max |Δlogit| = {diff}");
    }
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn right_padded_rows_keep_their_logits() {
    let model = load("untied_mha_sharded");
    let want = expected("untied_mha_sharded");
    let input = &want["logits_input"];
    let mut rows = vec![ids(&input.get(0)), ids(&input.get(1))];
    rows[1].truncate(15);
    let (batch, _) = quill_model::pad_right(&rows, 7, model.device());
    let got = tch::no_grad(|| model.logits(&batch));
    let diff = max_abs_diff(
        &got.get(1).narrow(0, 0, 15),
        &want["logits"].get(1).narrow(0, 0, 15),
    );
    assert!(diff <= TOLERANCE, "padded row: {diff}");
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn cached_decoding_matches_full_forward() {
    for variant in VARIANTS {
        let model = load(variant);
        let want = expected(variant);
        let row = ids(&want["logits_input"].get(0));
        let _guard = tch::no_grad_guard();
        let prefix = model.prefill(&row[..10]).unwrap();
        let diff = max_abs_diff(&prefix.last_logits, &want["logits"].get(0).get(9));
        assert!(diff <= TOLERANCE, "{variant} prefill: {diff}");
        // Slot 2 of 3, with a capacity that has to grow along the way.
        let mut cache = KvCache::new(model.config(), 3, 4, Kind::Float, model.device());
        cache.load_prefix(2, &prefix);
        for (pos, &token) in row.iter().enumerate().skip(10) {
            let logits = model
                .decode(&mut cache, &[2], &[token], &[pos as i64])
                .unwrap();
            let diff = max_abs_diff(&logits.get(0), &want["logits"].get(0).get(pos as i64));
            assert!(diff <= TOLERANCE, "{variant} position {pos}: {diff}");
        }
        assert!(cache.capacity() >= row.len() as i64);
    }
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn classification_head_matches_transformers() {
    let dir = fixtures().join("reward_model");
    let model = Qwen2::load(&dir, test_device(), Kind::Float).unwrap();
    let want = expected("reward_model");
    let rows: Vec<Vec<i64>> = (0..3).map(|i| ids(&want[&format!("row_{i}")])).collect();
    let got = tch::no_grad(|| model.classify(&rows)).unwrap();
    let diff = max_abs_diff(&got, &want["scores"]);
    assert!(diff <= TOLERANCE, "scores: {diff}");
    let lm = load("tied_gqa_single");
    let err = lm.classify(&rows).unwrap_err().to_string();
    assert!(err.contains("not a sequence-classification model"), "{err}");
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn bf16_weights_run_close_to_f32() {
    let model = Qwen2::load(
        &fixtures().join("tied_gqa_single"),
        test_device(),
        Kind::BFloat16,
    )
    .unwrap();
    let want = expected("tied_gqa_single");
    let input = want["logits_input"].to_device(model.device());
    let got = tch::no_grad(|| model.logits(&input)).to_kind(Kind::Float);
    assert_eq!(got.kind(), Kind::Float);
    let scale = want["logits"].abs().max().double_value(&[]);
    let diff = max_abs_diff(&got, &want["logits"]);
    assert!(
        diff < 0.1 * scale,
        "bf16 drifted: {diff} (logit scale {scale})"
    );
    assert!(diff > 0.0, "bf16 cannot be bit-identical to f32");
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn saved_checkpoints_load_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let input = expected("untied_mha_sharded")["logits_input"].shallow_clone();
    let rows: Vec<Vec<i64>> = (0..2).map(|i| ids(&input.get(i))).collect();
    let input_json = dir.path().join("input.json");
    std::fs::write(&input_json, serde_json::to_string(&rows).unwrap()).unwrap();
    let default_dir = dir.path().join("default");
    quill_model::default_model::write_to(&default_dir, Kind::Float).unwrap();
    let default_vocab = Tokenizer::from_file(&default_dir.join("tokenizer.json"))
        .unwrap()
        .vocab_size();
    assert!(default_vocab > 300, "the default tokenizer was written");
    for (name, source) in [
        ("tied", fixtures().join("tied_gqa_single")),
        ("untied", fixtures().join("untied_mha_sharded")),
        ("default", default_dir.clone()),
    ] {
        let model = Qwen2::load(&source, Device::Cpu, Kind::Float).unwrap();
        let saved = dir.path().join(format!("saved-{name}"));
        model.save(&saved, Kind::Float).unwrap();
        let out = dir.path().join(format!("{name}.safetensors"));
        run_reference(&[
            "logits".as_ref(),
            saved.as_os_str(),
            input_json.as_os_str(),
            out.as_os_str(),
        ]);
        let theirs = Tensor::read_safetensors(&out).unwrap().remove(0).1;
        let ours = tch::no_grad(|| model.logits(&input));
        let diff = max_abs_diff(&ours, &theirs);
        assert!(
            diff <= TOLERANCE,
            "{name}: transformers on quill's checkpoint differs by {diff}"
        );
    }
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn sharded_save_round_trips() {
    let model = load("untied_mha_sharded");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        std::fs::read(fixtures().join("untied_mha_sharded/config.json")).unwrap(),
    )
    .unwrap();
    checkpoint::write_tensors(dir.path(), &model.hf_tensors(Kind::Float), 50_000).unwrap();
    assert!(
        dir.path().join(checkpoint::INDEX_FILE).exists(),
        "small shards force an index"
    );
    let back = Qwen2::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    for ((name, a), (_, b)) in model
        .hf_tensors(Kind::Float)
        .iter()
        .zip(back.hf_tensors(Kind::Float))
    {
        assert!(a.equal(&b), "{name} changed in the round trip");
    }
}
