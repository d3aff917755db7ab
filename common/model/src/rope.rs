//! Rotary position embeddings, as Qwen2 computes them (`rotate_half` convention).

use tch::{Device, Kind, Tensor};

/// Precomputed cos/sin tables for every position of the context.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables of shape `[max_positions, head_dim]` in `kind`, computed in f32 like
    /// Hugging Face (`inv_freq = 1 / theta^(2i/d)`, angles duplicated over both halves).
    pub fn new(head_dim: i64, theta: f64, max_positions: i64, kind: Kind, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let inv_freq = (Tensor::from(theta).to_device(device).pow(&exponents)).reciprocal();
        let positions = Tensor::arange(max_positions, (Kind::Float, device));
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        Rope {
            cos: angles.cos().to_kind(kind),
            sin: angles.sin().to_kind(kind),
        }
    }

    /// Rotates `x` of shape `[B, T, heads, head_dim]` at `positions` (`[B, T]`, int64).
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Tensor {
        let (b, t) = positions.size2().expect("positions are [B, T]");
        let d = self.cos.size()[1];
        let flat = positions.reshape([-1]);
        let cos = self.cos.index_select(0, &flat).view([b, t, 1, d]);
        let sin = self.sin.index_select(0, &flat).view([b, t, 1, d]);
        let half = d / 2;
        let rotated = Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
        x * cos + rotated * sin
    }
}
