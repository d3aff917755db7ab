//! Activation checkpointing per decoder layer: a causal forward pass that keeps only each
//! layer's input, and a backward pass that recomputes one layer at a time, last first.
//!
//! tch has no `torch.utils.checkpoint`, so the backward pass is driven by hand: the layers
//! run under `no_grad` in the forward pass; in the backward pass layer `l` is recomputed
//! from a detached copy `x` of its kept input, `(layer(x) · g).sum()` is backpropagated
//! (which adds the layer's parameter gradients and gives `∂/∂x`), and `x`'s gradient is
//! the `g` of layer `l − 1`. Live activations: the `L` layer inputs `[B, T, hidden]` plus
//! the autograd state of one layer, instead of every layer's.

use crate::error::{Error, Result};
use crate::qwen2::{packed_positions, Qwen2};
use tch::{Kind, Tensor};

/// What a checkpointed forward pass kept for its backward pass.
pub struct LayerCheckpoints<'a> {
    model: &'a Qwen2,
    tokens: Tensor,
    positions: Tensor,
    /// The sequence lengths of a packed row (`None`: padded rows).
    segments: Option<Vec<i64>>,
    /// Each decoder layer's input, without autograd history.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf: the final norm's backward fills its gradient.
    last: Tensor,
}

impl Qwen2 {
    /// Final-norm hidden states `[B, T, hidden]`, as [`Qwen2::hidden`], with activation
    /// checkpointing: the returned tensor's autograd graph reaches only the final norm.
    /// Backpropagate a loss to it first, then call [`LayerCheckpoints::backward`] to carry
    /// the gradient through the decoder layers and the embedding.
    pub fn hidden_checkpointed(&self, tokens: &Tensor) -> (Tensor, LayerCheckpoints<'_>) {
        let positions = self.causal_positions(tokens);
        self.checkpointed(tokens, positions, None)
    }

    /// [`Qwen2::hidden_packed`] with activation checkpointing, as
    /// [`Qwen2::hidden_checkpointed`].
    pub fn hidden_packed_checkpointed(
        &self,
        tokens: &Tensor,
        lens: &[i64],
    ) -> (Tensor, LayerCheckpoints<'_>) {
        let positions = packed_positions(lens, tokens.device());
        self.checkpointed(tokens, positions, Some(lens.to_vec()))
    }

    fn checkpointed(
        &self,
        tokens: &Tensor,
        positions: Tensor,
        segments: Option<Vec<i64>>,
    ) -> (Tensor, LayerCheckpoints<'_>) {
        let (inputs, last) = tch::no_grad(|| {
            let mut x = self.embed(tokens);
            let mut inputs = Vec::with_capacity(self.num_layers());
            for l in 0..self.num_layers() {
                let y = self.causal_layer(l, &x, &positions, segments.as_deref());
                inputs.push(x);
                x = y;
            }
            (inputs, x)
        });
        let last = last.set_requires_grad(true);
        let hidden = self.final_norm(&last);
        let kept = LayerCheckpoints {
            model: self,
            tokens: tokens.shallow_clone(),
            positions,
            segments,
            inputs,
            last,
        };
        (hidden, kept)
    }
}

impl LayerCheckpoints<'_> {
    /// Backpropagates the gradient that reached the last layer's output through every
    /// decoder layer (each recomputed from its kept input) and the embedding, adding to
    /// the parameters' gradients. Fails when no gradient reached the hidden states.
    pub fn backward(self) -> Result<()> {
        let mut grad = self.last.grad();
        if !grad.defined() {
            return Err(Error::NoGradient);
        }
        for (l, input) in self.inputs.into_iter().enumerate().rev() {
            let x = input.set_requires_grad(true);
            let y = self
                .model
                .causal_layer(l, &x, &self.positions, self.segments.as_deref());
            y.f_mul(&grad)?.f_sum(Kind::Float)?.f_backward()?;
            grad = x.grad();
        }
        let embedded = self.model.embed(&self.tokens);
        embedded.f_mul(&grad)?.f_sum(Kind::Float)?.f_backward()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{default_model, Error, ModelConfig, Qwen2};
    use serde_json::json;
    use tch::{Device, Kind, Tensor};

    fn tiny() -> Qwen2 {
        let config = ModelConfig::from_json(json!({
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 32,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32,
            "tie_word_embeddings": false
        }))
        .unwrap();
        let weights = default_model::weights(&config, 3);
        let mut model = Qwen2::new(config, Device::Cpu, Kind::Float).unwrap();
        model.load_weights(&weights).unwrap();
        model
    }

    #[test]
    fn the_checkpointed_pass_keeps_one_input_per_layer_and_matches_the_plain_one() {
        let model = tiny();
        let tokens = Tensor::from_slice(&[1i64, 5, 9, 2, 7, 7, 3, 0]).view([2, 4]);
        let (hidden, kept) = model.hidden_checkpointed(&tokens);
        assert!(hidden.equal(&model.hidden(&tokens)));
        assert_eq!(kept.inputs.len(), 3);
        assert!(kept.inputs.iter().all(|x| !x.requires_grad()));
        assert!(matches!(kept.backward(), Err(Error::NoGradient)));
    }

    #[test]
    fn a_packed_row_gives_each_sequence_the_hidden_states_it_has_alone() {
        let model = tiny();
        let seqs: [&[i64]; 3] = [&[1, 5, 9, 2, 7], &[7, 3], &[4, 4, 8, 1]];
        let flat: Vec<i64> = seqs.concat();
        let tokens = Tensor::from_slice(&flat).unsqueeze(0);
        let lens: Vec<i64> = seqs.iter().map(|s| s.len() as i64).collect();
        let packed = model.hidden_packed(&tokens, &lens);
        assert_eq!(packed.size(), [1, 11, 16]);
        let mut start = 0;
        for seq in seqs {
            let alone = model.hidden(&Tensor::from_slice(seq).unsqueeze(0));
            let part = packed.narrow(1, start, seq.len() as i64);
            let diff = (part - &alone).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{seq:?}: {diff}");
            start += seq.len() as i64;
        }
        let (checkpointed, kept) = model.hidden_packed_checkpointed(&tokens, &lens);
        assert!(checkpointed.equal(&packed));
        assert_eq!(kept.segments.as_deref(), Some(&lens[..]));
    }
}
