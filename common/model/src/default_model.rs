//! The embedded default model: a tiny Qwen2 with a small byte-level BPE tokenizer, built
//! from a fixed seed on use (nothing is downloaded), small enough to train on two CPU cores.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::{checkpoint, params, Qwen2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The name that selects the embedded model wherever a model directory is expected.
pub const NAME: &str = "default";

/// The seed its weights are drawn from.
pub const SEED: u64 = 20_260_126;

/// Special tokens: end of text, the template's turn markers and its think/answer tags.
pub const SPECIAL_TOKENS: [&str; 7] = [
    "<|endoftext|>",
    "<|user|>",
    "<|assistant|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
];

const WORDS: &str = include_str!("default_words.txt");
const HIDDEN: i64 = 128;
const INIT_STD: f64 = 0.02;

/// GPT-2's reversible map from bytes to printable characters (`Ġ` is the space).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("valid")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid")
            }
        })
        .collect()
}

/// The vocabulary: 256 byte tokens, then whole common words (with a leading space) built
/// by chains of merges, then the special tokens. Returns (vocab, merges, special ids).
fn vocabulary() -> (Vec<String>, Vec<String>, Vec<i64>) {
    let mut vocab: Vec<String> = byte_chars().iter().map(char::to_string).collect();
    let mut merges = Vec::new();
    let space = byte_chars()[b' ' as usize];
    for word in WORDS.split_whitespace() {
        let mut current = space.to_string();
        for c in word.chars() {
            let next = format!("{current}{c}");
            if !vocab.contains(&next) {
                merges.push(format!("{current} {c}"));
                vocab.push(next.clone());
            }
            current = next;
        }
    }
    let specials = SPECIAL_TOKENS
        .iter()
        .map(|s| {
            vocab.push((*s).to_owned());
            vocab.len() as i64 - 1
        })
        .collect();
    (vocab, merges, specials)
}

/// The `tokenizer.json` text of the default tokenizer.
pub fn tokenizer_json() -> String {
    let (vocab, merges, specials) = vocabulary();
    let model_vocab: Map<String, Value> = vocab[..vocab.len() - specials.len()]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .zip(&specials)
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": model_vocab, "merges": merges}
    })
    .to_string()
}

/// The default model's `config.json`.
pub fn config_json() -> Value {
    let (vocab, _, specials) = vocabulary();
    let vocab_size = (vocab.len() as i64 + 63) / 64 * 64;
    let eos = specials[0];
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 3 * HIDDEN,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos
    })
}

/// Weights under Hugging Face names: N(0, 0.02) matrices, zero biases, unit norms, drawn
/// in a fixed order from a ChaCha stream seeded with `seed`.
pub fn weights(config: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, INIT_STD as f32).expect("valid std");
    let mut out = HashMap::new();
    for param in params::params(config) {
        for (i, (name, _)) in param.parts.iter().enumerate() {
            let shape = param.part_shape(i);
            let numel = shape.iter().product::<i64>() as usize;
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; numel]
            } else if name.ends_with(".bias") {
                vec![0.0; numel]
            } else {
                (0..numel).map(|_| normal.sample(&mut rng)).collect()
            };
            out.insert(
                name.clone(),
                Tensor::from_slice(&values).view(shape.as_slice()),
            );
        }
    }
    out
}

/// The default model and its tokenizer on `device` in `kind`.
pub fn load(device: Device, kind: Kind) -> Result<(Qwen2, Tokenizer)> {
    let config = ModelConfig::from_json(config_json())?;
    let tensors = weights(&config, SEED);
    let mut model = Qwen2::new(config, device, kind)?;
    model.load_weights(&tensors)?;
    Ok((model, Tokenizer::from_json(&tokenizer_json())?))
}

/// Writes the tokenizer files of the default model into `dir`.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer_json()).map_err(|e| Error::io(&path, e))?;
    checkpoint::write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[0]}),
    )
}

/// Writes the default model as a Hugging Face directory (config, weights, tokenizer).
pub fn write_to(dir: &Path, kind: Kind) -> Result<()> {
    let (model, _) = load(Device::Cpu, Kind::Float)?;
    model.save(dir, kind)?;
    write_tokenizer(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_decode_past_the_padding_and_broken_bytes() {
        let tok = Tokenizer::from_json(&tokenizer_json()).unwrap();
        let vocab = config_json()["vocab_size"].as_i64().unwrap();
        let padding = tok.vocab_size() as i64;
        assert!(
            padding < vocab,
            "the model's vocabulary is padded past the tokenizer's"
        );
        let mut ids = tok.encode("the sea").unwrap();
        ids.insert(1, padding);
        ids.push(vocab - 1);
        assert!(tok.decode(&ids).is_err(), "the strict decode refuses them");
        assert_eq!(tok.decode_generated(&ids), "the sea");
        // A lone UTF-8 continuation byte (0x80) becomes U+FFFD, the text around it stays.
        let byte = tok.token_id(&byte_chars()[0x80].to_string()).unwrap();
        let mut ids = tok.encode("a").unwrap();
        ids.push(byte);
        ids.extend(tok.encode("b").unwrap());
        assert_eq!(tok.decode_generated(&ids), "a\u{FFFD}b");
    }

    #[test]
    fn tokenizer_round_trips_and_merges_words() {
        let tok = Tokenizer::from_json(&tokenizer_json()).unwrap();
        let text = "<think> plan </think><answer> The story of the river, 写作! </answer>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        let words = tok.encode(" the story of the river").unwrap();
        assert_eq!(words.len(), 5, "common words are single tokens: {words:?}");
        for special in SPECIAL_TOKENS {
            assert_eq!(
                tok.encode(special).unwrap(),
                vec![tok.token_id(special).unwrap()]
            );
        }
    }

    #[test]
    fn weights_are_deterministic() {
        let config = ModelConfig::from_json(config_json()).unwrap();
        let a = weights(&config, SEED);
        let b = weights(&config, SEED);
        let c = weights(&config, SEED + 1);
        let name = "model.layers.0.self_attn.q_proj.weight";
        assert!(a[name].equal(&b[name]));
        assert!(!a[name].equal(&c[name]));
        let vocab = Tokenizer::from_json(&tokenizer_json())
            .unwrap()
            .vocab_size() as i64;
        assert!(config.vocab_size >= vocab);
    }
}
