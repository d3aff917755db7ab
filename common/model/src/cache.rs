//! The key/value cache of the decoder: one row ("slot") per sequence being generated.

use crate::config::ModelConfig;
use tch::{Device, Kind, Tensor};

/// Keys and values of a prompt computed once, to be copied into any number of slots
/// (the G samples of one prompt share one prefill).
#[derive(Debug)]
pub struct Prefix {
    /// Prompt length in tokens.
    pub len: i64,
    /// Per layer, keys `[1, kv_heads, len, head_dim]`.
    pub keys: Vec<Tensor>,
    /// Per layer, values `[1, kv_heads, len, head_dim]`.
    pub values: Vec<Tensor>,
    /// Logits of the last prompt position, `[vocab]`, f32.
    pub last_logits: Tensor,
}

/// A slot-indexed cache: per layer `[slots, kv_heads, capacity, head_dim]`.
///
/// Capacity grows by doubling (never beyond the model's context) as sequences get longer.
pub struct KvCache {
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    slots: i64,
    capacity: i64,
    max_capacity: i64,
}

impl KvCache {
    /// An empty cache of `slots` rows with room for `capacity` positions each.
    pub fn new(
        config: &ModelConfig,
        slots: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let capacity = capacity.clamp(1, config.max_position_embeddings);
        let shape = [
            slots,
            config.num_key_value_heads,
            capacity,
            config.head_dim(),
        ];
        let make = || {
            (0..config.num_hidden_layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect()
        };
        KvCache {
            keys: make(),
            values: make(),
            slots,
            capacity,
            max_capacity: config.max_position_embeddings,
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> i64 {
        self.slots
    }

    /// Positions each slot can hold right now.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Grows every layer so that each slot holds at least `len` positions.
    pub fn ensure_capacity(&mut self, len: i64) {
        if len <= self.capacity {
            return;
        }
        let mut capacity = self.capacity;
        while capacity < len {
            capacity *= 2;
        }
        let capacity = capacity.min(self.max_capacity).max(len);
        let old = self.capacity;
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut shape = t.size();
            shape[2] = capacity;
            let grown = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
            grown.narrow(2, 0, old).copy_(t);
            *t = grown;
        }
        self.capacity = capacity;
    }

    /// Copies the first `len` positions of slot `from` into slot `to` (whose earlier
    /// contents are overwritten); `from` keeps its rows.
    pub fn copy_slot(&mut self, from: i64, to: i64, len: i64) {
        let len = len.min(self.capacity);
        for cache in self.keys.iter().chain(&self.values) {
            let source = cache.narrow(0, from, 1).narrow(2, 0, len);
            cache.narrow(0, to, 1).narrow(2, 0, len).copy_(&source);
        }
    }

    /// Copies a prefilled prompt into `slot` (positions `0..prefix.len`).
    pub fn load_prefix(&mut self, slot: i64, prefix: &Prefix) {
        self.ensure_capacity(prefix.len);
        for (cache, src) in self
            .keys
            .iter()
            .zip(&prefix.keys)
            .chain(self.values.iter().zip(&prefix.values))
        {
            cache.narrow(0, slot, 1).narrow(2, 0, prefix.len).copy_(src);
        }
    }
}
