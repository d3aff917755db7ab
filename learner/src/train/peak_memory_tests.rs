//! Peak memory of one micro-batch's forward and backward pass, measured as the growth of
//! a child process's high-water RSS, with and without log-prob chunks and activation
//! checkpointing, and for a long packed micro-batch under a 32k vocabulary, next to what
//! `quill_model::memory_plan` predicts.

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
        packing: true,
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
        None,
    )
    .expect("pass");
    println!("PEAK_GROWTH {}", status_bytes("VmHWM:") - before);
}

/// Runs [`measure`] in a child process and returns its peak growth in bytes.
fn child(chunk: usize, checkpointing: bool) -> u64 {
    run_child(
        "train::peak_memory_tests::chunks_and_checkpointing_lower_the_peak",
        &format!("{chunk},{checkpointing}"),
    )
}

/// Runs the test `name` in a child process with [`MODE_VAR`] set to `mode` and returns
/// the peak growth it printed, in bytes.
fn run_child(name: &str, mode: &str) -> u64 {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(MODE_VAR, mode)
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

/// Tokens of the long packed micro-batch: one 6,144-token sample and sixteen of 128.
const LONG_TOKENS: usize = 8192;
const LONG_SAMPLE: usize = 6144;
const SHORT_SAMPLES: usize = 16;

fn long_config() -> ModelConfig {
    ModelConfig::from_json(json!({
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 32768,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": LONG_TOKENS,
        "tie_word_embeddings": true
    }))
    .expect("valid config")
}

/// In the child: one packed pass over the long sample and the short ones.
fn measure_long() {
    tch::set_num_threads(1);
    let config = long_config();
    let vocab = config.vocab_size;
    let weights = default_model::weights(&config, 2);
    let mut model = Qwen2::new(config, Device::Cpu, Kind::Float).expect("model");
    model.load_weights(&weights).expect("weights");
    drop(weights);
    let sample = |seed: i64, len: usize| TrainSample {
        prompt: vec![1 + seed],
        response: (1..len as i64)
            .map(|i| (seed * 31 + i * 7919) % (vocab - 1) + 1)
            .collect(),
        behaviour_logprobs: vec![-10.0; len - 1],
        advantage: 1.0,
    };
    let short = (LONG_TOKENS - LONG_SAMPLE) / SHORT_SAMPLES;
    let mut samples = vec![sample(0, LONG_SAMPLE)];
    samples.extend((1..=SHORT_SAMPLES as i64).map(|s| sample(s, short)));
    let groups = crate::train::sample::packed_micro_batches(&samples, LONG_TOKENS);
    assert_eq!(groups.len(), 1, "everything fits one packed micro-batch");
    let refs: Vec<&TrainSample> = samples.iter().collect();
    let weight = crate::train::grpo::token_weights(&samples, Default::default());
    let memory = MemoryConfig::default();
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
    let before = status_bytes("VmRSS:");
    micro_batch_backward(
        &model,
        None,
        &refs,
        &weight,
        &GrpoConfig::default(),
        &memory,
        None,
    )
    .expect("pass");
    println!("PEAK_GROWTH {}", status_bytes("VmHWM:") - before);
}

#[test]
fn a_long_packed_micro_batch_stays_under_the_plan() {
    if std::env::var(MODE_VAR).is_ok() {
        measure_long();
        return;
    }
    let size = ModelSize::of(&long_config());
    let setup = LearnerSetup {
        gpus: 1,
        sharding: Sharding::None,
        precision: Precision::F32,
        activation_checkpointing: false,
        micro_batch_tokens: LONG_TOKENS,
        logprob_chunk_tokens: MemoryConfig::default().logprob_chunk_tokens,
    };
    let work = Workload {
        group_size: 1 + SHORT_SAMPLES,
        prompts_per_step: 1,
        max_tokens: LONG_SAMPLE,
    };
    let m = memory_plan::learner_memory(&size, &setup, &work);
    let planned = m.gradients + m.activations + m.logits;
    let measured = run_child(
        "train::peak_memory_tests::a_long_packed_micro_batch_stays_under_the_plan",
        "long",
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "packed {LONG_TOKENS} tokens (one {LONG_SAMPLE}, {SHORT_SAMPLES} short), vocab 32768: \
         peak growth {:.1} MiB, plan (gradients + activations + logits) {:.1} MiB \
         (unchunked logits alone: {:.1} MiB)",
        mib(measured),
        mib(planned),
        mib(m.logits_unchunked)
    );
    assert!(measured <= planned, "{measured} bytes > planned {planned}");
}
