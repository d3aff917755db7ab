//! Activation checkpointing per decoder layer: a causal forward pass that keeps only each
//! layer's input, and a backward pass that recomputes one layer at a time, last first.
//!
//! tch has no `torch.utils.checkpoint`, so the backward pass is driven by hand: the layers
//! run under `no_grad` in the forward pass; in the backward pass layer `l` is recomputed
//! from a detached copy `x` of its kept input, `(layer(x) · g).sum()` is backpropagated
//! (which adds the layer's parameter gradients and gives `∂/∂x`), and `x`'s gradient is
//! the `g` of layer `l − 1`. Live activations: the `L` layer inputs `[B, T, hidden]` plus
//! the autograd state of one layer, instead of every layer's.

use crate::error::Error;
use crate::qwen2::{packed_positions, Qwen2, Segment};
use tch::{Kind, Tensor};

/// What a caller does around each decoder layer of a checkpointed pass: a learner that
/// shards the layers' weights over ranks (ZeRO-3) gathers a layer's weights before it
/// runs and frees them after, and hands its gradients on once the layer's backward is
/// done. Every method does nothing unless implemented.
pub trait LayerHooks {
    /// The caller's error; the model's own errors convert into it.
    type Error: From<Error>;

    /// Before layer `layer` runs in the forward pass.
    fn before_forward(&mut self, _layer: usize) -> std::result::Result<(), Self::Error> {
        Ok(())
    }

    /// After layer `layer` ran in the forward pass.
    fn after_forward(&mut self, _layer: usize) -> std::result::Result<(), Self::Error> {
        Ok(())
    }

    /// Before layer `layer` is recomputed for the backward pass.
    fn before_backward(&mut self, _layer: usize) -> std::result::Result<(), Self::Error> {
        Ok(())
    }

    /// After the gradient went through layer `layer` (its parameters' gradients are set).
    fn after_backward(&mut self, _layer: usize) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
}

/// No hooks: the layers' weights stay where they are.
pub struct NoHooks;

impl LayerHooks for NoHooks {
    type Error = Error;
}

/// What a checkpointed forward pass kept for its backward pass.
pub struct LayerCheckpoints<'a> {
    model: &'a Qwen2,
    tokens: Tensor,
    positions: Tensor,
    /// The sequences of a packed row (`None`: padded rows).
    segments: Option<Vec<Segment>>,
    /// Each decoder layer's input, without autograd history.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf: the final norm's backward fills its gradient.
    last: Tensor,
}

impl Qwen2 {
    /// Final-norm hidden states `[B, T, hidden]`, as [`Qwen2::hidden`], with activation
    /// checkpointing: the returned tensor's autograd graph reaches only the final norm.
    /// Backpropagate a loss to it first, then call [`LayerCheckpoints::backward`] to carry
    /// the gradient through the decoder layers and the embedding. `hooks` run around
    /// every layer.
    pub fn hidden_checkpointed<H: LayerHooks + ?Sized>(
        &self,
        tokens: &Tensor,
        hooks: &mut H,
    ) -> std::result::Result<(Tensor, LayerCheckpoints<'_>), H::Error> {
        let positions = self.causal_positions(tokens);
        self.checkpointed(tokens, positions, None, hooks)
    }

    /// [`Qwen2::hidden_packed`] with activation checkpointing, as
    /// [`Qwen2::hidden_checkpointed`].
    pub fn hidden_packed_checkpointed<H: LayerHooks + ?Sized>(
        &self,
        tokens: &Tensor,
        segments: &[Segment],
        hooks: &mut H,
    ) -> std::result::Result<(Tensor, LayerCheckpoints<'_>), H::Error> {
        let positions = packed_positions(segments, tokens.device());
        self.checkpointed(tokens, positions, Some(segments.to_vec()), hooks)
    }

    fn checkpointed<H: LayerHooks + ?Sized>(
        &self,
        tokens: &Tensor,
        positions: Tensor,
        segments: Option<Vec<Segment>>,
        hooks: &mut H,
    ) -> std::result::Result<(Tensor, LayerCheckpoints<'_>), H::Error> {
        let guard = tch::no_grad_guard();
        let mut x = self.embed(tokens);
        let mut inputs = Vec::with_capacity(self.num_layers());
        for l in 0..self.num_layers() {
            hooks.before_forward(l)?;
            let y = self.causal_layer(l, &x, &positions, segments.as_deref());
            hooks.after_forward(l)?;
            inputs.push(x);
            x = y;
        }
        drop(guard);
        let last = x.set_requires_grad(true);
        let hidden = self.final_norm(&last);
        let kept = LayerCheckpoints {
            model: self,
            tokens: tokens.shallow_clone(),
            positions,
            segments,
            inputs,
            last,
        };
        Ok((hidden, kept))
    }
}

impl LayerCheckpoints<'_> {
    /// Backpropagates the gradient that reached the last layer's output through every
    /// decoder layer (each recomputed from its kept input, `hooks` around it) and the
    /// embedding, adding to the parameters' gradients. Fails when no gradient reached the
    /// hidden states.
    pub fn backward<H: LayerHooks + ?Sized>(
        self,
        hooks: &mut H,
    ) -> std::result::Result<(), H::Error> {
        let mut grad = self.last.grad();
        if !grad.defined() {
            return Err(Error::NoGradient.into());
        }
        for (l, input) in self.inputs.into_iter().enumerate().rev() {
            hooks.before_backward(l)?;
            let x = input.set_requires_grad(true);
            let y = self
                .model
                .causal_layer(l, &x, &self.positions, self.segments.as_deref());
            y.f_mul(&grad)
                .and_then(|t| t.f_sum(Kind::Float))
                .and_then(|t| t.f_backward())
                .map_err(Error::from)?;
            drop(y);
            hooks.after_backward(l)?;
            grad = x.grad();
        }
        let embedded = self.model.embed(&self.tokens);
        embedded
            .f_mul(&grad)
            .and_then(|t| t.f_sum(Kind::Float))
            .and_then(|t| t.f_backward())
            .map_err(Error::from)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::NoHooks;
    use crate::{default_model, Error, ModelConfig, Qwen2, Segment};
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
        let (hidden, kept) = model.hidden_checkpointed(&tokens, &mut NoHooks).unwrap();
        assert!(hidden.equal(&model.hidden(&tokens)));
        assert_eq!(kept.inputs.len(), 3);
        assert!(kept.inputs.iter().all(|x| !x.requires_grad()));
        assert!(matches!(
            kept.backward(&mut NoHooks),
            Err(Error::NoGradient)
        ));
    }

    #[test]
    fn a_packed_row_gives_each_sequence_the_hidden_states_it_has_alone() {
        let model = tiny();
        let seqs: [&[i64]; 3] = [&[1, 5, 9, 2, 7], &[7, 3], &[4, 4, 8, 1]];
        let flat: Vec<i64> = seqs.concat();
        let tokens = Tensor::from_slice(&flat).unsqueeze(0);
        let segments: Vec<Segment> = seqs
            .iter()
            .map(|s| Segment::alone(s.len() as i64))
            .collect();
        let packed = model.hidden_packed(&tokens, &segments);
        assert_eq!(packed.size(), [1, 11, 16]);
        let mut start = 0;
        for seq in seqs {
            let alone = model.hidden(&Tensor::from_slice(seq).unsqueeze(0));
            let part = packed.narrow(1, start, seq.len() as i64);
            let diff = (part - &alone).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{seq:?}: {diff}");
            start += seq.len() as i64;
        }
        let (checkpointed, kept) = model
            .hidden_packed_checkpointed(&tokens, &segments, &mut NoHooks)
            .unwrap();
        assert!(checkpointed.equal(&packed));
        assert_eq!(kept.segments.as_deref(), Some(&segments[..]));
    }

    #[test]
    fn continuations_of_a_shared_prompt_get_the_hidden_states_they_have_alone() {
        let model = tiny();
        // [prompt a, a's two continuations, a sequence alone, prompt b, b's continuation]
        let (a, b): (&[i64], &[i64]) = (&[1, 5, 9], &[6, 2]);
        let (a1, a2, lone, b1): (&[i64], &[i64], &[i64], &[i64]) =
            (&[2, 7, 7], &[3], &[4, 4, 8, 1], &[9, 9]);
        let flat = [a, a1, a2, lone, b, b1].concat();
        let segments = [
            Segment::alone(3),
            Segment::after(0, 3),
            Segment::after(0, 1),
            Segment::alone(4),
            Segment::alone(2),
            Segment::after(4, 2),
        ];
        let tokens = Tensor::from_slice(&flat).unsqueeze(0);
        let packed = model.hidden_packed(&tokens, &segments);
        let alone = |seq: &[i64]| model.hidden(&Tensor::from_slice(seq).unsqueeze(0));
        let close = |got: Tensor, want: Tensor, what: &str| {
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{what}: {diff}");
        };
        let whole_a1 = alone(&[a, a1].concat());
        close(packed.narrow(1, 0, 3), whole_a1.narrow(1, 0, 3), "prompt a");
        close(packed.narrow(1, 3, 3), whole_a1.narrow(1, 3, 3), "a + a1");
        close(
            packed.narrow(1, 6, 1),
            alone(&[a, a2].concat()).narrow(1, 3, 1),
            "a + a2",
        );
        close(packed.narrow(1, 7, 4), alone(lone), "alone");
        close(packed.narrow(1, 11, 4), alone(&[b, b1].concat()), "b + b1");
        // Gradients through the shared prompt are those of the separate passes, summed.
        let grads = |hidden: Tensor| {
            let vars = model.var_store().trainable_variables();
            for v in &vars {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            hidden.sum(Kind::Float).backward();
            // The head's weight gets none: the hidden states come before it.
            vars.iter()
                .map(|v| Some(v.grad()).filter(Tensor::defined).map(|g| g.copy()))
                .collect::<Vec<_>>()
        };
        let shared = grads(model.hidden_packed(&tokens, &segments).narrow(1, 3, 4));
        let apart = grads(
            alone(&[a, a1].concat()).narrow(1, 3, 3).sum(Kind::Float)
                + alone(&[a, a2].concat()).narrow(1, 3, 1).sum(Kind::Float),
        );
        assert_eq!(shared.iter().flatten().count(), shared.len() - 1);
        for (s, p) in shared.iter().zip(&apart) {
            match (s, p) {
                (Some(s), Some(p)) => {
                    let diff = (s - p).abs().max().double_value(&[]);
                    assert!(diff < 1e-4, "gradient differs by {diff}");
                }
                (s, p) => assert_eq!(s.is_some(), p.is_some()),
            }
        }
        let (checkpointed, _) = model
            .hidden_packed_checkpointed(&tokens, &segments, &mut NoHooks)
            .unwrap();
        close(checkpointed, packed, "checkpointed");
    }
}
