//! The generation engine against transformers' greedy decoding, and its own invariants:
//! log-probs equal a full-forward recomputation, continuous batching refills slots,
//! results do not depend on batch composition, stop conditions end samples.

mod support;

use quill_actor::{
    Engine, EngineConfig, EngineHandle, FinishReason, GenerationRequest, GroupOutput,
    SamplingParams,
};
use quill_model::{default_model, Qwen2, Tokenizer};
use std::sync::atomic::Ordering;
use support::{expected, fixtures, ids, VARIANTS};
use tch::{Device, Kind, Tensor};

fn engine(variant: &str, max_batch: usize) -> Engine {
    let model = Qwen2::load(&fixtures().join(variant), Device::Cpu, Kind::Float).unwrap();
    let tokenizer = Tokenizer::from_json(&default_model::tokenizer_json()).unwrap();
    Engine::new(
        model,
        tokenizer,
        &EngineConfig {
            max_batch,
            initial_cache_len: 64,
            ..EngineConfig::default()
        },
    )
}

fn greedy(max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_new_tokens,
        ..SamplingParams::default()
    }
}

fn run(engine: &mut Engine, requests: Vec<GenerationRequest>) -> Vec<GroupOutput> {
    let (reply, answers) = crossbeam_channel::unbounded();
    for request in requests {
        engine.submit(request, reply.clone());
    }
    engine.run_until_idle();
    drop(reply);
    let mut out: Vec<GroupOutput> = answers
        .into_iter()
        .map(|a| a.expect("request succeeds"))
        .collect();
    out.sort_by_key(|g| g.id);
    out
}

fn prompts_and_greedy(variant: &str) -> Vec<(Vec<i64>, Vec<i64>)> {
    let want = expected(variant);
    (0..3)
        .map(|i| {
            (
                ids(&want[&format!("prompt_{i}")]),
                ids(&want[&format!("greedy_{i}")]),
            )
        })
        .collect()
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn greedy_matches_transformers_one_sequence_at_a_time() {
    for variant in VARIANTS {
        let mut engine = engine(variant, 1);
        for (i, (prompt, want)) in prompts_and_greedy(variant).into_iter().enumerate() {
            let request = GenerationRequest {
                id: 0,
                prompt,
                n: 1,
                params: greedy(want.len()),
            };
            let got = &run(&mut engine, vec![request])[0].samples[0];
            assert_eq!(got.tokens.len(), 512);
            assert_eq!(got.tokens, want, "{variant} prompt {i}");
            assert_eq!(got.finish, FinishReason::Length);
        }
    }
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn greedy_matches_transformers_in_one_padded_batch() {
    for variant in VARIANTS {
        let cases = prompts_and_greedy(variant);
        let requests = cases
            .iter()
            .enumerate()
            .map(|(i, (prompt, want))| GenerationRequest {
                id: i as u64,
                prompt: prompt.clone(),
                n: 1,
                params: greedy(want.len()),
            })
            .collect();
        let mut engine = engine(variant, 3);
        for (group, (_, want)) in run(&mut engine, requests).iter().zip(&cases) {
            assert_eq!(
                &group.samples[0].tokens, want,
                "{variant} prompt {}",
                group.id
            );
        }
    }
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn greedy_matches_transformers_under_continuous_batching() {
    let variant = "tied_gqa_single";
    let cases = prompts_and_greedy(variant);
    // One long request and eight short ones in two slots: the short ones must take turns
    // in the second slot while the long one runs, never waiting for it.
    let mut requests = vec![GenerationRequest {
        id: 0,
        prompt: cases[0].0.clone(),
        n: 1,
        params: greedy(512),
    }];
    for id in 1..=8u64 {
        let p = 1 + (id as usize % 2);
        requests.push(GenerationRequest {
            id,
            prompt: cases[p].0.clone(),
            n: 1,
            params: greedy(60),
        });
    }
    let mut engine = engine(variant, 2);
    let stats = engine.stats();
    let groups = run(&mut engine, requests);
    for group in &groups {
        let p = if group.id == 0 {
            0
        } else {
            1 + (group.id as usize % 2)
        };
        let sample = &group.samples[0];
        assert_eq!(
            sample.tokens,
            cases[p].1[..sample.tokens.len()],
            "request {}",
            group.id
        );
        assert_eq!(sample.tokens.len(), if group.id == 0 { 512 } else { 60 });
    }
    // A sample's first token comes from its prefill, each later one from a decode step.
    // With refilling, the long sample alone sets the step count (static batches of two
    // would need 511 + 4 * 59 steps).
    assert_eq!(stats.steps.load(Ordering::Relaxed), 511);
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn samples_moved_to_lower_slots_continue_exactly() {
    let variant = "tied_gqa_single";
    let cases = prompts_and_greedy(variant);
    // Three slots and nothing queued behind: the samples in slots 0 and 1 finish first,
    // so the long ones behind them move down (with their cache rows) mid-generation.
    let lengths = [40, 90, 512];
    let requests = lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| GenerationRequest {
            id: i as u64,
            prompt: cases[i].0.clone(),
            n: 1,
            params: greedy(len),
        })
        .collect();
    let mut engine = engine(variant, 3);
    for (group, len) in run(&mut engine, requests).iter().zip(lengths) {
        let want = &cases[group.id as usize].1[..len];
        assert_eq!(&group.samples[0].tokens, want, "request {}", group.id);
    }
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn logprobs_equal_a_full_forward_recomputation() {
    let mut engine = engine("tied_gqa_single", 4);
    let prompt = ids(&expected("tied_gqa_single")["prompt_1"]);
    let temperature = 0.7;
    let request = GenerationRequest {
        id: 0,
        prompt: prompt.clone(),
        n: 3,
        params: SamplingParams {
            temperature,
            max_new_tokens: 200,
            seed: 5,
            ..SamplingParams::default()
        },
    };
    let group = run(&mut engine, vec![request]).remove(0);
    let model = engine.model();
    for sample in &group.samples {
        let full: Vec<i64> = prompt.iter().chain(&sample.tokens).copied().collect();
        let logits = tch::no_grad(|| model.logits(&Tensor::from_slice(&full).unsqueeze(0)));
        let logprobs = (logits.get(0) / temperature).log_softmax(-1, Kind::Float);
        let start = prompt.len() as i64 - 1;
        let positions = Tensor::arange_start(
            start,
            start + sample.tokens.len() as i64,
            (Kind::Int64, Device::Cpu),
        );
        let picked = logprobs
            .index_select(0, &positions)
            .gather(1, &Tensor::from_slice(&sample.tokens).unsqueeze(1), false)
            .squeeze_dim(1);
        let engine_lp = Tensor::from_slice(&sample.logprobs);
        let diff = support::max_abs_diff(&picked, &engine_lp);
        assert!(diff <= 1e-4, "log-probs differ by {diff}");
    }
    assert_ne!(
        group.samples[0].tokens, group.samples[1].tokens,
        "samples are independent draws"
    );
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn results_do_not_depend_on_batch_composition() {
    let want = expected("untied_mha_sharded");
    let prompt = ids(&want["prompt_0"]);
    let sampled = |id: u64| GenerationRequest {
        id,
        prompt: prompt.clone(),
        n: 2,
        params: SamplingParams {
            max_new_tokens: 80,
            seed: 11,
            ..SamplingParams::default()
        },
    };
    let alone = run(&mut engine("untied_mha_sharded", 1), vec![sampled(0)]).remove(0);
    let crowd: Vec<GenerationRequest> = (0..3)
        .map(|i| GenerationRequest {
            id: 10 + i,
            prompt: ids(&want["prompt_2"]),
            n: 2,
            params: greedy(50 + 20 * i as usize),
        })
        .chain([sampled(1)])
        .collect();
    let together = run(&mut engine("untied_mha_sharded", 3), crowd).remove(0);
    assert_eq!(together.id, 1);
    for (a, b) in alone.samples.iter().zip(&together.samples) {
        assert_eq!(a.tokens, b.tokens);
    }
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn stop_tokens_and_stop_strings_end_samples() {
    // A fixture model: its greedy continuations have no near-ties, so reruns agree.
    let mut engine = engine("tied_gqa_single", 4);
    let tokenizer = engine.tokenizer().clone();
    let prompt = ids(&expected("tied_gqa_single")["prompt_0"]);
    let free = run(
        &mut engine,
        vec![GenerationRequest {
            id: 0,
            prompt: prompt.clone(),
            n: 1,
            params: greedy(40),
        }],
    )
    .remove(0)
    .samples
    .remove(0);
    assert_eq!(free.tokens.len(), 40);

    let stop_token = free.tokens[12];
    let first = free.tokens.iter().position(|&t| t == stop_token).unwrap();
    let params = SamplingParams {
        stop_token_ids: vec![stop_token],
        ..greedy(40)
    };
    let by_token = run(
        &mut engine,
        vec![GenerationRequest {
            id: 1,
            prompt: prompt.clone(),
            n: 1,
            params,
        }],
    )
    .remove(0)
    .samples
    .remove(0);
    assert_eq!(by_token.tokens, free.tokens[..=first]);
    assert_eq!(by_token.finish, FinishReason::StopToken(stop_token));

    let tail = tokenizer.decode(&free.tokens[20..23]).unwrap();
    let stop: String = tail.chars().take(4).collect();
    let params = SamplingParams {
        stop_strings: vec![stop.clone()],
        ..greedy(40)
    };
    let by_string = run(
        &mut engine,
        vec![GenerationRequest {
            id: 2,
            prompt,
            n: 1,
            params,
        }],
    )
    .remove(0)
    .samples
    .remove(0);
    assert!(
        by_string.text.contains(&stop),
        "{:?} lacks {stop:?}",
        by_string.text
    );
    let shorter = tokenizer
        .decode(&by_string.tokens[..by_string.tokens.len() - 1])
        .unwrap();
    assert!(!shorter.contains(&stop), "stopped late");
    assert_eq!(by_string.tokens, free.tokens[..by_string.tokens.len()]);
    assert_eq!(by_string.finish, FinishReason::StopString(stop));
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn generation_stops_at_the_end_of_the_context() {
    let mut engine = engine("tied_gqa_single", 2);
    let context = engine.model().config().max_position_embeddings as usize;
    let prompt: Vec<i64> = (0..context as i64 - 10).map(|i| 1 + i % 300).collect();
    let group = run(
        &mut engine,
        vec![GenerationRequest {
            id: 0,
            prompt,
            n: 1,
            params: greedy(100),
        }],
    )
    .remove(0);
    assert_eq!(group.samples[0].tokens.len(), 10);
    assert_eq!(group.samples[0].finish, FinishReason::Context);
}

#[test]
#[ignore = "slow tier: parity with transformers"]
fn the_threaded_engine_answers_every_request() {
    let dir = fixtures().join("untied_mha_sharded");
    let handle = EngineHandle::spawn(
        move || {
            let model = Qwen2::load(&dir, Device::Cpu, Kind::Float)?;
            Ok((
                model,
                Tokenizer::from_json(&default_model::tokenizer_json())?,
            ))
        },
        EngineConfig {
            max_batch: 4,
            initial_cache_len: 32,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let cases = prompts_and_greedy("untied_mha_sharded");
    let answers: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (prompt, _))| {
            handle.submit(GenerationRequest {
                id: i as u64,
                prompt: prompt.clone(),
                n: 2,
                params: greedy(100),
            })
        })
        .collect();
    for (answer, (_, want)) in answers.into_iter().zip(&cases) {
        let group = answer.recv().unwrap().unwrap();
        for sample in group.samples {
            assert_eq!(sample.tokens, want[..100]);
        }
    }
    assert_eq!(handle.stats().finished_samples.load(Ordering::Relaxed), 6);
}
