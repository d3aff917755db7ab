//! The Qwen2 / Qwen2.5 decoder in tch: embedding, pre-norm decoder layers (GQA attention
//! with q/k/v biases and rotary embeddings, SwiGLU MLP), final RMSNorm, and either a
//! language-model head (tied or not) or a sequence-classification `score` head.

use super::cache::{KvCache, Prefix};
use super::checkpoint::{self, CheckpointReader, TensorSource};
use super::params::{self, Param};
use super::rope::Rope;
use crate::config::{HeadKind, ModelConfig};
use crate::device::dtype_name;
use crate::error::{Error, Result};
use std::path::Path;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

/// Shards written by [`Qwen2::save`] stay below this size (as `save_pretrained` does).
pub const MAX_SHARD_BYTES: usize = 5 << 30;

struct Layer {
    input_norm: Tensor,
    qkv_w: Tensor,
    qkv_b: Tensor,
    o_w: Tensor,
    post_norm: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
}

/// How a forward pass gets its keys and values.
enum Attention<'a> {
    /// Full causal attention over the input itself; optionally keep each layer's k/v.
    /// With `segments`, the one row holds these sequences end to end and each attends
    /// only within itself, after the whole of the segment it continues, if any.
    Causal {
        keep: Option<&'a mut Vec<(Tensor, Tensor)>>,
        segments: Option<&'a [Segment]>,
    },
    /// One new token per row, attending to the cache slots it writes into.
    Cached {
        cache: &'a mut KvCache,
        slots: Tensor,
        dense: bool,
        positions: Tensor,
        mask: Tensor,
        kv_len: i64,
    },
}

/// A Qwen2 model whose weights live in a [`nn::VarStore`] on one device.
pub struct Qwen2 {
    config: ModelConfig,
    vs: nn::VarStore,
    named: Vec<(Param, Tensor)>,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Option<Tensor>,
    rope: Rope,
    kind: Kind,
}

impl Qwen2 {
    /// A model with zeroed weights (load or initialise them next).
    pub fn new(config: ModelConfig, device: Device, kind: Kind) -> Result<Self> {
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(Error::Device(format!("unsupported model dtype {kind:?}")));
        }
        let mut vs = nn::VarStore::new(device);
        let named: Vec<(Param, Tensor)> = params::params(&config)
            .into_iter()
            .map(|p| {
                let var = var_at(&vs.root(), &p.name, &p.shape);
                (p, var)
            })
            .collect();
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let get = |name: &str| -> Tensor {
            named
                .iter()
                .find(|(p, _)| p.name == name)
                .map(|(_, t)| t.shallow_clone())
                .unwrap_or_else(|| panic!("parameter table lacks {name}"))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Layer {
                    input_norm: get(&format!("{p}.input_layernorm.weight")),
                    qkv_w: get(&format!("{p}.self_attn.qkv_proj.weight")),
                    qkv_b: get(&format!("{p}.self_attn.qkv_proj.bias")),
                    o_w: get(&format!("{p}.self_attn.o_proj.weight")),
                    post_norm: get(&format!("{p}.post_attention_layernorm.weight")),
                    gate_up_w: get(&format!("{p}.mlp.gate_up_proj.weight")),
                    down_w: get(&format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        let head = match config.head {
            HeadKind::CausalLm if config.tie_word_embeddings => None,
            HeadKind::CausalLm => Some(get("lm_head.weight")),
            HeadKind::SequenceClassification { .. } => Some(get("score.weight")),
        };
        let rope = Rope::new(
            config.head_dim(),
            config.rope_theta,
            config.max_position_embeddings,
            kind,
            device,
        );
        Ok(Qwen2 {
            embed: get("model.embed_tokens.weight"),
            norm: get("model.norm.weight"),
            layers,
            head,
            rope,
            kind,
            named,
            vs,
            config,
        })
    }

    /// Loads a Hugging Face model directory (`config.json` + safetensors, single or sharded).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let reader = CheckpointReader::open(dir)?;
        let mut model = Qwen2::new(config, device, kind)?;
        model.load_weights(&reader)?;
        Ok(model)
    }

    /// Copies every parameter from `source` (Hugging Face names), checking names and shapes.
    pub fn load_weights(&mut self, source: &dyn TensorSource) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (param, var) in &mut self.named {
            let parts = param
                .parts
                .iter()
                .enumerate()
                .map(|(i, (name, _))| source.fetch(name, &param.part_shape(i)))
                .collect::<Result<Vec<_>>>()?;
            let full = if parts.len() == 1 {
                parts.into_iter().next().expect("one part")
            } else {
                Tensor::f_cat(&parts, 0)?
            };
            var.f_copy_(&full)?;
        }
        Ok(())
    }

    /// Every weight under its Hugging Face name, converted to `kind` (fused tensors split).
    pub fn hf_tensors(&self, kind: Kind) -> Vec<(String, Tensor)> {
        self.hf_tensors_of(kind, |_| true)
    }

    /// [`Qwen2::hf_tensors`] of the parameters whose own name (a fused tensor's, e.g.
    /// `model.layers.0.self_attn.qkv_proj.weight`) passes `keep`; the others are not
    /// touched (a learner that shards the layers' weights holds only some at a time).
    pub fn hf_tensors_of(&self, kind: Kind, keep: impl Fn(&str) -> bool) -> Vec<(String, Tensor)> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::new();
        for (param, var) in self.named.iter().filter(|(p, _)| keep(&p.name)) {
            let var = var.to_kind(kind);
            if param.parts.len() == 1 {
                out.push((param.parts[0].0.clone(), var));
            } else {
                let rows: Vec<i64> = param.parts.iter().map(|p| p.1).collect();
                for ((name, _), piece) in param.parts.iter().zip(var.split_with_sizes(rows, 0)) {
                    out.push((name.clone(), piece.contiguous()));
                }
            }
        }
        out
    }

    /// Writes `config.json` and safetensors weights in `kind` into `dir` (created if missing).
    pub fn save(&self, dir: &Path, kind: Kind) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        checkpoint::write_json(
            &dir.join("config.json"),
            &self.config.to_json(dtype_name(kind)),
        )?;
        checkpoint::write_tensors(dir, &self.hf_tensors(kind), MAX_SHARD_BYTES)
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The dtype of the weights and activations.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The variable store (for optimisers and weight updates).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Checks that every id is inside the vocabulary.
    pub fn check_tokens(&self, tokens: &[i64]) -> Result<()> {
        let vocab = self.config.vocab_size;
        match tokens.iter().find(|&&id| id < 0 || id >= vocab) {
            Some(&id) => Err(Error::TokenOutOfVocab { id, vocab }),
            None => Ok(()),
        }
    }

    /// Logits `[B, T, vocab]` (model dtype) of a full causal pass over `tokens` (`[B, T]`).
    /// Rows may be right-padded: causal attention keeps padding from touching real tokens.
    pub fn logits(&self, tokens: &Tensor) -> Tensor {
        let hidden = self.hidden(tokens);
        self.project(&hidden)
    }

    /// Final-norm hidden states `[B, T, hidden]` of a full causal pass.
    pub fn hidden(&self, tokens: &Tensor) -> Tensor {
        let positions = self.causal_positions(tokens);
        let mut attention = Attention::Causal {
            keep: None,
            segments: None,
        };
        self.body(tokens, &positions, &mut attention)
    }

    /// Final-norm hidden states `[1, N, hidden]` of sequences packed end to end in one
    /// row `tokens` (`[1, N]`) without padding: `segments`, whose lengths sum to `N`, and
    /// any of which continues only an earlier one that stands alone. A segment that
    /// stands alone starts at position 0 and attends only to itself; one that continues a
    /// shared prompt starts after it and attends to all of it, then to itself. Every
    /// sequence gets the hidden states it would get alone, and a shared prompt is
    /// computed once.
    pub fn hidden_packed(&self, tokens: &Tensor, segments: &[Segment]) -> Tensor {
        let positions = packed_positions(segments, tokens.device());
        let mut attention = Attention::Causal {
            keep: None,
            segments: Some(segments),
        };
        self.body(tokens, &positions, &mut attention)
    }

    /// Runs the prompt once and keeps its keys/values for any number of samples.
    pub fn prefill(&self, prompt: &[i64]) -> Result<Prefix> {
        if prompt.is_empty() {
            return Err(Error::Tokenizer("the prompt encodes to no tokens".into()));
        }
        let max = self.config.max_position_embeddings as usize;
        if prompt.len() >= max {
            return Err(Error::PromptTooLong {
                len: prompt.len(),
                max,
            });
        }
        self.check_tokens(prompt)?;
        let len = prompt.len() as i64;
        let tokens = Tensor::from_slice(prompt).to(self.device()).unsqueeze(0);
        let positions = Tensor::arange(len, (Kind::Int64, self.device())).unsqueeze(0);
        let mut kept = Vec::with_capacity(self.layers.len());
        let hidden = self.body(
            &tokens,
            &positions,
            &mut Attention::Causal {
                keep: Some(&mut kept),
                segments: None,
            },
        );
        let last_logits = self
            .project(&hidden.narrow(1, len - 1, 1))
            .reshape([-1])
            .to_kind(Kind::Float);
        let (keys, values) = kept.into_iter().unzip();
        Ok(Prefix {
            len,
            keys,
            values,
            last_logits,
        })
    }

    /// One decoding step: row `i` feeds `tokens[i]` at `positions[i]` into cache slot
    /// `slots[i]` and gets the next-token logits (`[rows, vocab]`, f32).
    pub fn decode(
        &self,
        cache: &mut KvCache,
        slots: &[i64],
        tokens: &[i64],
        positions: &[i64],
    ) -> Result<Tensor> {
        let rows = slots.len();
        assert!(rows > 0 && tokens.len() == rows && positions.len() == rows);
        self.check_tokens(tokens)?;
        let kv_len = positions.iter().max().copied().unwrap_or(0) + 1;
        if kv_len > self.config.max_position_embeddings {
            return Err(Error::PromptTooLong {
                len: kv_len as usize,
                max: self.config.max_position_embeddings as usize,
            });
        }
        cache.ensure_capacity(kv_len);
        let device = self.device();
        let dense = rows as i64 <= cache.slots() && slots.iter().zip(0..).all(|(&s, i)| s == i);
        let positions = Tensor::from_slice(positions).to(device);
        let mask = Tensor::arange(kv_len, (Kind::Int64, device))
            .unsqueeze(0)
            .le_tensor(&positions.unsqueeze(1))
            .view([rows as i64, 1, 1, kv_len]);
        let tokens = Tensor::from_slice(tokens).to(device).unsqueeze(1);
        let mut attention = Attention::Cached {
            cache,
            slots: Tensor::from_slice(slots).to(device),
            dense,
            positions: positions.shallow_clone(),
            mask,
            kv_len,
        };
        let hidden = self.body(&tokens, &positions.unsqueeze(1), &mut attention);
        Ok(self.project(&hidden.squeeze_dim(1)).to_kind(Kind::Float))
    }

    /// Scores of a sequence-classification model, `[B, num_labels]` (f32), pooled like
    /// `Qwen2ForSequenceClassification`: at the last token that is not `pad_token_id`.
    pub fn classify(&self, batch: &[Vec<i64>]) -> Result<Tensor> {
        if !matches!(self.config.head, HeadKind::SequenceClassification { .. }) {
            return Err(Error::config(
                "architectures",
                "this is not a sequence-classification model",
            ));
        }
        for row in batch {
            if row.is_empty() {
                return Err(Error::Tokenizer("cannot score an empty sequence".into()));
            }
            self.check_tokens(row)?;
        }
        let (tokens, _) = pad_right(batch, 0, self.device());
        let hidden = self.hidden(&tokens);
        let pooled_at: Vec<i64> = batch
            .iter()
            .map(|row| {
                let pad = self.config.pad_token_id;
                row.iter().rposition(|&t| Some(t) != pad).unwrap_or(0) as i64
            })
            .collect();
        let rows = Tensor::arange(batch.len() as i64, (Kind::Int64, self.device()));
        let cols = Tensor::from_slice(&pooled_at).to(self.device());
        let pooled = hidden.index(&[Some(rows), Some(cols)]);
        Ok(self.project(&pooled).to_kind(Kind::Float))
    }

    /// The head (language-model logits or classification scores, model dtype) of
    /// final-norm hidden states `[..., hidden]`: `logits` is `project(hidden)`.
    pub fn project(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(self.head.as_ref().unwrap_or(&self.embed), None::<Tensor>)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The token embeddings `[B, T, hidden]` of `tokens` (`[B, T]`).
    pub(crate) fn embed(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, tokens, -1, false, false)
    }

    /// The final RMSNorm of the last decoder layer's output.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Tensor {
        x.rms_norm(
            [self.config.hidden_size],
            Some(&self.norm),
            self.config.rms_norm_eps,
        )
    }

    /// Positions `0..T` of every row of `tokens` (`[B, T]`).
    pub(crate) fn causal_positions(&self, tokens: &Tensor) -> Tensor {
        let (b, t) = tokens.size2().expect("tokens are [B, T]");
        Tensor::arange(t, (Kind::Int64, tokens.device()))
            .unsqueeze(0)
            .expand([b, t], false)
    }

    /// Decoder layer `l` over `x` with full causal attention (no cache), within each of
    /// `segments` when the row is packed.
    pub(crate) fn causal_layer(
        &self,
        l: usize,
        x: &Tensor,
        positions: &Tensor,
        segments: Option<&[Segment]>,
    ) -> Tensor {
        let mut attention = Attention::Causal {
            keep: None,
            segments,
        };
        self.layer(l, x, positions, &mut attention)
    }

    fn layer(&self, l: usize, x: &Tensor, positions: &Tensor, attention: &mut Attention) -> Tensor {
        let c = &self.config;
        let width = [c.hidden_size];
        let eps = c.rms_norm_eps;
        let inter = c.intermediate_size;
        let layer = &self.layers[l];
        let h = x.rms_norm(width, Some(&layer.input_norm), eps);
        // Out-of-place residual adds: autograd keeps the norms' inputs.
        let x = x + self.attend(l, layer, &h, positions, attention);
        let h = x.rms_norm(width, Some(&layer.post_norm), eps);
        let gate_up = h.linear(&layer.gate_up_w, None::<Tensor>);
        let act = gate_up.narrow(-1, 0, inter).silu() * gate_up.narrow(-1, inter, inter);
        &x + act.linear(&layer.down_w, None::<Tensor>)
    }

    fn body(&self, tokens: &Tensor, positions: &Tensor, attention: &mut Attention) -> Tensor {
        let mut x = self.embed(tokens);
        for l in 0..self.layers.len() {
            x = self.layer(l, &x, positions, attention);
        }
        self.final_norm(&x)
    }

    fn attend(
        &self,
        l: usize,
        layer: &Layer,
        h: &Tensor,
        positions: &Tensor,
        attention: &mut Attention,
    ) -> Tensor {
        let c = &self.config;
        let (b, t, _) = h.size3().expect("hidden is [B, T, H]");
        let (nh, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let qkv = h
            .linear(&layer.qkv_w, Some(&layer.qkv_b))
            .view([b, t, nh + 2 * kvh, d]);
        let qk = self.rope.apply(&qkv.narrow(2, 0, nh + kvh), positions);
        let q = qk.narrow(2, 0, nh).transpose(1, 2);
        let k = qk.narrow(2, nh, kvh).transpose(1, 2);
        let v = qkv.narrow(2, nh + kvh, kvh).transpose(1, 2);
        let out = match attention {
            Attention::Causal { keep, segments } => {
                if let Some(kept) = keep {
                    kept.push((k.contiguous(), v.contiguous()));
                }
                let causal = |q: &Tensor, k: &Tensor, v: &Tensor| {
                    Tensor::scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        None::<Tensor>,
                        0.0,
                        true,
                        None,
                        true,
                    )
                };
                match segments {
                    None => causal(&q, &k, &v),
                    Some(segments) => packed_attention(segments, &q, &k, &v, causal),
                }
            }
            Attention::Cached {
                cache,
                slots,
                dense,
                positions,
                mask,
                kv_len,
            } => {
                let index = [Some(&*slots), None, Some(&*positions)];
                let mut ck = cache.keys[l].shallow_clone();
                let mut cv = cache.values[l].shallow_clone();
                let _ = ck.index_put_(&index, &k.squeeze_dim(2), false);
                let _ = cv.index_put_(&index, &v.squeeze_dim(2), false);
                let read = |t: &Tensor| {
                    let t = t.narrow(2, 0, *kv_len);
                    if *dense {
                        t.narrow(0, 0, b)
                    } else {
                        t.index_select(0, slots)
                    }
                };
                Tensor::scaled_dot_product_attention(
                    &q,
                    &read(&ck),
                    &read(&cv),
                    Some(&*mask),
                    0.0,
                    false,
                    None,
                    true,
                )
            }
        };
        out.transpose(1, 2)
            .reshape([b, t, nh * d])
            .linear(&layer.o_w, None::<Tensor>)
    }
}

/// Positions `[1, N]` of a packed row of `segments`: `0..len` for a segment that stands
/// alone, and on from its prompt's length for one that continues a prompt.
pub(crate) fn packed_positions(segments: &[Segment], device: Device) -> Tensor {
    let flat: Vec<i64> = segments
        .iter()
        .flat_map(|s| {
            let first = s.after.map_or(0, |p| segments[p].len);
            first..first + s.len
        })
        .collect();
    Tensor::from_slice(&flat).to(device).unsqueeze(0)
}

/// Attention of a packed row `[B, heads, T, d]` within each of `segments` (the
/// block-diagonal causal mask, without forming it). A segment that continues a prompt
/// runs causally behind that prompt's queries, keys and values, and keeps its own rows:
/// the fused causal kernel then never forms a `[T, T]` mask or score matrix, for the
/// price of recomputing the prompt rows' attention (the projections and the MLP, most of
/// a layer's work, still run once per prompt).
fn packed_attention(
    segments: &[Segment],
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) -> Tensor {
    let starts: Vec<i64> = segments
        .iter()
        .scan(0, |start, s| {
            let here = *start;
            *start += s.len;
            Some(here)
        })
        .collect();
    let parts: Vec<Tensor> = segments
        .iter()
        .zip(&starts)
        .map(|(s, &start)| {
            let part = |t: &Tensor| t.narrow(2, start, s.len);
            let Some(p) = s.after else {
                return causal(&part(q), &part(k), &part(v));
            };
            let (p_start, p_len) = (starts[p], segments[p].len);
            let behind = |t: &Tensor| Tensor::cat(&[t.narrow(2, p_start, p_len), part(t)], 2);
            causal(&behind(q), &behind(k), &behind(v)).narrow(2, p_len, s.len)
        })
        .collect();
    Tensor::cat(&parts, 2)
}

/// One sequence of a packed row ([`Qwen2::hidden_packed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Its number of tokens in the row.
    pub len: i64,
    /// The earlier segment it continues (a prompt several samples share): it attends to
    /// all of that segment and its positions go on from that segment's length. `None`:
    /// it stands alone from position 0.
    pub after: Option<usize>,
}

impl Segment {
    /// A sequence of `len` tokens on its own.
    pub fn alone(len: i64) -> Self {
        Segment { len, after: None }
    }

    /// `len` tokens continuing segment `prompt`.
    pub fn after(prompt: usize, len: i64) -> Self {
        Segment {
            len,
            after: Some(prompt),
        }
    }
}

/// Right-pads rows of token ids with `pad` into a `[B, T]` tensor; also returns the lengths.
pub fn pad_right(batch: &[Vec<i64>], pad: i64, device: Device) -> (Tensor, Vec<i64>) {
    let width = batch.iter().map(Vec::len).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(batch.len() * width);
    for row in batch {
        flat.extend_from_slice(row);
        flat.extend(std::iter::repeat_n(pad, width - row.len()));
    }
    let lens = batch.iter().map(|r| r.len() as i64).collect();
    let tensor = Tensor::from_slice(&flat)
        .view([batch.len() as i64, width as i64])
        .to(device);
    (tensor, lens)
}

fn var_at(root: &nn::Path, dotted: &str, shape: &[i64]) -> Tensor {
    let mut segments: Vec<&str> = dotted.split('.').collect();
    let leaf = segments.pop().expect("non-empty name");
    let path = segments.iter().fold(root.clone(), |p, s| p.sub(*s));
    path.var(leaf, shape, Init::Const(0.0))
}
