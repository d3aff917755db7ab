//! Bad input gets an error that names the problem; nothing panics.

mod support;

use quill_actor::{Engine, EngineConfig, GenerationError, GenerationRequest, SamplingParams};
use quill_model::checkpoint;
use quill_model::{default_model, Qwen2, Tokenizer};
use std::path::{Path, PathBuf};
use support::fixtures;
use tch::{Device, Kind};

fn copy_of(variant: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(variant);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join(variant)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load_error(dir: &Path) -> String {
    match Qwen2::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, tch::Tensor)>)) {
    let file = dir.join(checkpoint::SINGLE_FILE);
    let mut tensors = tch::Tensor::read_safetensors(&file).unwrap();
    edit(&mut tensors);
    std::fs::remove_file(&file).unwrap();
    checkpoint::write_tensors(dir, &tensors, usize::MAX).unwrap();
}

#[test]
#[ignore = "slow tier: needs the fixtures reference.py builds with transformers"]
fn a_missing_tensor_is_named() {
    let (_tmp, dir) = copy_of("tied_gqa_single");
    rewrite_weights(&dir, |t| {
        t.retain(|(name, _)| name != "model.layers.1.self_attn.k_proj.bias")
    });
    let err = load_error(&dir);
    assert!(
        err.contains("missing tensor `model.layers.1.self_attn.k_proj.bias`"),
        "{err}"
    );
}

#[test]
#[ignore = "slow tier: needs the fixtures reference.py builds with transformers"]
fn an_untied_model_needs_its_lm_head() {
    let (_tmp, dir) = copy_of("tied_gqa_single");
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false",
        ),
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(err.contains("missing tensor `lm_head.weight`"), "{err}");
}

#[test]
#[ignore = "slow tier: needs the fixtures reference.py builds with transformers"]
fn a_wrong_shape_is_named() {
    let (_tmp, dir) = copy_of("tied_gqa_single");
    rewrite_weights(&dir, |tensors| {
        for (name, t) in tensors.iter_mut() {
            if name == "model.layers.0.mlp.up_proj.weight" {
                *t = t.narrow(0, 0, 100);
            }
        }
    });
    let err = load_error(&dir);
    assert!(
        err.contains(
            "`model.layers.0.mlp.up_proj.weight` has shape [100, 64], the config needs [160, 64]"
        ),
        "{err}"
    );
}

#[test]
#[ignore = "slow tier: needs the fixtures reference.py builds with transformers"]
fn corrupt_safetensors_are_reported_with_the_file() {
    let (_tmp, dir) = copy_of("tied_gqa_single");
    let file = dir.join(checkpoint::SINGLE_FILE);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("safetensors file") && err.contains("model.safetensors"),
        "{err}"
    );
    std::fs::write(&file, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let err = load_error(&dir);
    assert!(err.contains("safetensors file"), "{err}");
}

#[test]
#[ignore = "slow tier: needs the fixtures reference.py builds with transformers"]
fn a_missing_shard_is_reported() {
    let (_tmp, dir) = copy_of("untied_mha_sharded");
    std::fs::remove_file(dir.join("model-00003-of-00008.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model-00003-of-00008.safetensors"), "{err}");
}

#[test]
#[ignore = "slow tier: needs the fixtures reference.py builds with transformers"]
fn an_empty_directory_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_error(tmp.path());
    assert!(err.contains("config.json"), "{err}");
    std::fs::copy(
        fixtures().join("tied_gqa_single/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = load_error(tmp.path());
    assert!(
        err.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{err}"
    );
}

#[test]
#[ignore = "slow tier: needs the fixtures reference.py builds with transformers"]
fn a_config_without_required_fields_names_them() {
    for field in ["hidden_size", "num_hidden_layers", "vocab_size"] {
        let (_tmp, dir) = copy_of("tied_gqa_single");
        let config = dir.join("config.json");
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        value.as_object_mut().unwrap().remove(field);
        std::fs::write(&config, value.to_string()).unwrap();
        let err = load_error(&dir);
        assert_eq!(
            err,
            format!("model config field `{field}`: missing (required)")
        );
    }
    let (_tmp, dir) = copy_of("tied_gqa_single");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(load_error(&dir).contains("invalid JSON"));
}

fn engine() -> Engine {
    let (model, tokenizer) = default_model::load(Device::Cpu, Kind::Float).unwrap();
    Engine::new(model, tokenizer, &EngineConfig::default())
}

fn rejection(engine: &mut Engine, request: GenerationRequest) -> String {
    let (reply, answer) = crossbeam_channel::unbounded();
    engine.submit(request, reply);
    engine.run_until_idle();
    match answer.recv().unwrap() {
        Err(e @ GenerationError::Invalid { .. }) => e.to_string(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn bad_generation_requests_are_rejected_and_the_engine_goes_on() {
    let mut engine = engine();
    let context = engine.model().config().max_position_embeddings as usize;
    let vocab = engine.model().config().vocab_size;
    let ok = |prompt: Vec<i64>| GenerationRequest {
        id: 7,
        prompt,
        n: 1,
        params: SamplingParams {
            max_new_tokens: 5,
            ..SamplingParams::default()
        },
    };

    let err = rejection(&mut engine, ok(vec![1; context]));
    assert!(
        err.contains(&format!(
            "the prompt has {context} tokens but the model's context holds {context}"
        )),
        "{err}"
    );
    let err = rejection(&mut engine, ok(vec![1, vocab, 2]));
    assert!(
        err.contains(&format!("token id {vocab} is outside the vocabulary")),
        "{err}"
    );
    let err = rejection(&mut engine, ok(vec![]));
    assert!(err.contains("the prompt is empty"), "{err}");
    let err = rejection(
        &mut engine,
        GenerationRequest {
            n: 0,
            ..ok(vec![1])
        },
    );
    assert!(err.contains("n must be at least 1"), "{err}");
    let mut bad = ok(vec![1]);
    bad.params.temperature = -0.5;
    assert!(rejection(&mut engine, bad).contains("temperature must be >= 0"));
    let mut bad = ok(vec![1]);
    bad.params.stop_token_ids = vec![-3];
    assert!(rejection(&mut engine, bad).contains("stop token id -3"));

    let (reply, answer) = crossbeam_channel::unbounded();
    engine.submit(ok(vec![1, 2, 3]), reply);
    engine.run_until_idle();
    assert_eq!(answer.recv().unwrap().unwrap().samples[0].tokens.len(), 5);
}

#[test]
fn model_entry_points_reject_bad_tokens() {
    let (model, _) = default_model::load(Device::Cpu, Kind::Float).unwrap();
    let context = model.config().max_position_embeddings as usize;
    let err = model
        .prefill(&vec![0; context + 3])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("prompt has {} tokens", context + 3)),
        "{err}"
    );
    assert!(model.prefill(&[]).is_err());
    let err = model.prefill(&[5, -1]).unwrap_err().to_string();
    assert!(
        err.contains("token id -1 is outside the vocabulary"),
        "{err}"
    );
}

#[test]
fn a_broken_tokenizer_file_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_file(&path)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.starts_with("tokenizer:") && err.contains("tokenizer.json"),
        "{err}"
    );
}
