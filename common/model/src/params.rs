//! The parameter layout of quill's Qwen2 and its mapping to Hugging Face tensor names.
//!
//! quill fuses `q_proj`/`k_proj`/`v_proj` into one `qkv_proj` and `gate_proj`/`up_proj`
//! into one `gate_up_proj` (fewer, larger matmuls). AdamW and gradient clipping act
//! element-wise or globally, so training the fused tensors is the same as training the
//! parts. Loading concatenates the Hugging Face parts along dim 0; saving splits them.

use crate::config::{HeadKind, ModelConfig};

/// One parameter of quill's model and the Hugging Face tensors it is made of.
#[derive(Debug, Clone)]
pub struct Param {
    /// quill's name (dotted, also the VarStore path).
    pub name: String,
    /// Its full shape.
    pub shape: Vec<i64>,
    /// Hugging Face parts, concatenated along dim 0, each with its number of rows.
    pub parts: Vec<(String, i64)>,
}

impl Param {
    fn plain(name: String, shape: Vec<i64>) -> Self {
        let parts = vec![(name.clone(), shape[0])];
        Param { name, shape, parts }
    }

    fn fused(name: String, cols: Option<i64>, parts: Vec<(String, i64)>) -> Self {
        let rows = parts.iter().map(|p| p.1).sum();
        let shape = match cols {
            Some(c) => vec![rows, c],
            None => vec![rows],
        };
        Param { name, shape, parts }
    }

    /// The shape of part `i` in the Hugging Face checkpoint.
    pub fn part_shape(&self, i: usize) -> Vec<i64> {
        let mut shape = self.shape.clone();
        shape[0] = self.parts[i].1;
        shape
    }
}

/// Every parameter of a model with this config, in a fixed order.
pub fn params(config: &ModelConfig) -> Vec<Param> {
    let h = config.hidden_size;
    let d = config.head_dim();
    let q_rows = config.num_attention_heads * d;
    let kv_rows = config.num_key_value_heads * d;
    let inter = config.intermediate_size;
    let mut out = vec![Param::plain(
        "model.embed_tokens.weight".into(),
        vec![config.vocab_size, h],
    )];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let attn = format!("{p}.self_attn");
        let qkv = |suffix: &str| {
            vec![
                (format!("{attn}.q_proj.{suffix}"), q_rows),
                (format!("{attn}.k_proj.{suffix}"), kv_rows),
                (format!("{attn}.v_proj.{suffix}"), kv_rows),
            ]
        };
        out.push(Param::plain(format!("{p}.input_layernorm.weight"), vec![h]));
        out.push(Param::fused(
            format!("{attn}.qkv_proj.weight"),
            Some(h),
            qkv("weight"),
        ));
        out.push(Param::fused(
            format!("{attn}.qkv_proj.bias"),
            None,
            qkv("bias"),
        ));
        out.push(Param::plain(
            format!("{attn}.o_proj.weight"),
            vec![h, q_rows],
        ));
        out.push(Param::plain(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
        ));
        out.push(Param::fused(
            format!("{p}.mlp.gate_up_proj.weight"),
            Some(h),
            vec![
                (format!("{p}.mlp.gate_proj.weight"), inter),
                (format!("{p}.mlp.up_proj.weight"), inter),
            ],
        ));
        out.push(Param::plain(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, inter],
        ));
    }
    out.push(Param::plain("model.norm.weight".into(), vec![h]));
    match config.head {
        HeadKind::CausalLm if !config.tie_word_embeddings => {
            out.push(Param::plain(
                "lm_head.weight".into(),
                vec![config.vocab_size, h],
            ));
        }
        HeadKind::CausalLm => {}
        HeadKind::SequenceClassification { num_labels } => {
            out.push(Param::plain("score.weight".into(), vec![num_labels, h]));
        }
    }
    out
}
