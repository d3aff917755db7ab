//! Peak memory of one micro-batch's forward and backward pass, measured as the growth of
//! a child process's high-water RSS, with and without log-prob chunks and activation
//! checkpointing, next to what `quill_model::memory_plan` predicts.

use crate::testing::VOCAB;
use crate::train::grpo::{micro_batch_backward, GrpoConfig, MemoryConfig};
use crate::train::sample::TrainSample;
use quill_model::memory_plan::{self, LearnerSetup, ModelSize, Precision, Sharding, Workload};
use quill_model::{default_model, ModelConfig, Qwen2};
use serde_json::json;
use std::process::Command;
use tch::{Device, Kind};

/// The child's mode: `chunk,checkpointing`.
const MODE_VAR: &str = "QUILL_PEAK_MEMORY_MODE";
/// Tokens of the one sample the pass trains on (prompt 1, response the rest).
const TOKENS: usize = 2048;

fn config() -> ModelConfig {
    ModelConfig::from_json(json!({
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": TOKENS,
        "tie_word_embeddings": true
    }))
    .expect("valid config")
}

/// A `/proc/self/status` field in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field}"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// In the child: one pass, printing how far the high-water RSS rose above the RSS
/// before it.
fn measure(chunk: usize, checkpointing: bool) {
    tch::set_num_threads(1);
    let config = config();
    let weights = default_model::weights(&config, 1);
    let mut model = Qwen2::new(config, Device::Cpu, Kind::Float).expect("model");
    model.load_weights(&weights).expect("weights");
    drop(weights);
    let token = |i: usize| (i as i64 * 7919) % (VOCAB - 1) + 1;
    let sample = TrainSample {
        prompt: vec![1],
        response: (1..TOKENS).map(token).collect(),
        behaviour_logprobs: vec![-9.0; TOKENS - 1],
        advantage: 1.0,
    };
    let memory = MemoryConfig {
        logprob_chunk_tokens: chunk,
        activation_checkpointing: checkpointing,
    };
    // Reset the high-water mark to the current RSS (Linux: clear_refs "5").
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
    let before = status_bytes("VmRSS:");
    let weight = [1.0 / (TOKENS - 1) as f64];
    micro_batch_backward(
        &model,
        None,
        &[&sample],
        &weight,
        &GrpoConfig::default(),
        &memory,
    )
    .expect("pass");
    println!("PEAK_GROWTH {}", status_bytes("VmHWM:") - before);
}

/// Runs [`measure`] in a child process and returns its peak growth in bytes.
fn child(chunk: usize, checkpointing: bool) -> u64 {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "train::peak_memory_tests::chunks_and_checkpointing_lower_the_peak",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MODE_VAR, format!("{chunk},{checkpointing}"))
        .output()
        .expect("child runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The harness prints the test's name on the same line, before the measurement.
    text.split("PEAK_GROWTH ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no measurement in {text}"))
}

#[test]
fn chunks_and_checkpointing_lower_the_peak() {
    if let Ok(mode) = std::env::var(MODE_VAR) {
        let (chunk, checkpointing) = mode.split_once(',').expect("chunk,checkpointing");
        measure(chunk.parse().unwrap(), checkpointing.parse().unwrap());
        return;
    }
    let size = ModelSize::of(&config());
    let plan = |chunk: usize, checkpointing: bool| {
        let setup = LearnerSetup {
            gpus: 1,
            sharding: Sharding::None,
            precision: Precision::F32,
            activation_checkpointing: checkpointing,
            micro_batch_tokens: TOKENS,
            logprob_chunk_tokens: chunk,
        };
        let work = Workload {
            group_size: 1,
            prompts_per_step: 1,
            max_tokens: TOKENS,
        };
        let m = memory_plan::learner_memory(&size, &setup, &work);
        m.gradients + m.activations + m.logits
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut rows = Vec::new();
    for (chunk, checkpointing) in [(TOKENS, false), (128, false), (128, true)] {
        let measured = child(chunk, checkpointing);
        let planned = plan(chunk, checkpointing);
        eprintln!(
            "chunk {chunk:>4}, checkpointing {checkpointing:>5}: peak growth {:>7.1} MiB, \
             plan (gradients + activations + logits) {:>7.1} MiB",
            mib(measured),
            mib(planned)
        );
        rows.push((measured, planned));
    }
    let [(whole, _), (chunked, _), (checkpointed, _)] = rows[..] else {
        unreachable!()
    };
    // Each saving is at least half the one the plan predicts.
    let saved = |a: u64, b: u64| a.saturating_sub(b);
    let (logits_saving, layer_saving) = (
        saved(plan(TOKENS, false), plan(128, false)),
        saved(plan(128, false), plan(128, true)),
    );
    assert!(
        saved(whole, chunked) >= logits_saving / 2,
        "chunks: {whole} → {chunked} bytes, plan saves {logits_saving}"
    );
    assert!(
        saved(chunked, checkpointed) >= layer_saving / 2,
        "checkpointing: {chunked} → {checkpointed} bytes, plan saves {layer_saving}"
    );
}
