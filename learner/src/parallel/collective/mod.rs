//! Collectives for the data-parallel learner: all-reduce, reduce-scatter, all-gather,
//! broadcast and barrier over the learner ranks, every operation bounded by a timeout so
//! that a rank that dies makes the others fail with a clear error instead of hanging.
//!
//! Reduce-scatter and all-gather split a buffer of `K·n` elements into `K` equal parts in
//! rank order (rank `r` owns elements `r·n .. (r+1)·n`). They take no uneven sizes: a
//! caller with a length that is not a multiple of `K` pads it with zeros to the next
//! multiple (the sharded optimiser's layout does, see `train::shard`).
//!
//! Two backends: [`RingCollective`], a ring all-reduce over TCP for CPU tensors (tests and
//! CPU-only clusters), and [`NcclCollective`], raw NCCL calls on CUDA tensors' device
//! pointers (cudarc, loaded at run time).

mod nccl;
mod ring;

pub use nccl::{nccl_unique_id, NcclCollective, NCCL_ID_BYTES};
#[cfg(test)]
pub(crate) use ring::on_loopback_ranks;
pub use ring::RingCollective;

use std::time::Duration;
use tch::Tensor;

/// How an all-reduce combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The mean over ranks.
    Average,
}

/// Which collective backend a learner uses (the wire enum rank 0 sends every rank).
pub use quill_proto::CollectiveBackend as Backend;

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer did not answer within the timeout.
    #[error("{op}: learner rank {peer} did not answer within {seconds:.0} s (collective timeout)")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The silent rank.
        peer: usize,
        /// The timeout.
        seconds: f64,
    },
    /// A peer closed its connection or failed.
    #[error("{op}: learner rank {peer} is gone ({detail})")]
    PeerGone {
        /// The operation.
        op: &'static str,
        /// The rank that went away.
        peer: usize,
        /// What the socket said.
        detail: String,
    },
    /// A collective did not complete (NCCL: the failing rank is not known).
    #[error("{op}: {detail}")]
    Stalled {
        /// The operation.
        op: &'static str,
        /// What happened.
        detail: String,
    },
    /// The ranks called different operations or sizes: a bug or mismatched binaries.
    #[error("{op}: ranks disagree: {detail}")]
    Mismatch {
        /// The operation.
        op: &'static str,
        /// What differed.
        detail: String,
    },
    /// The backend cannot run here (no CUDA, no libnccl, wrong device or dtype).
    #[error("collective backend {backend}: {reason}")]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// Setting up the group failed.
    #[error("collective set-up: {0}")]
    Setup(String),
    /// libtorch refused a tensor operation.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result of collective operations.
pub type Result<T> = std::result::Result<T, CollectiveError>;

/// Collective operations over a fixed group of ranks. Every rank must call the same
/// operations in the same order with tensors of the same size and kind.
pub trait Collective: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Reduces `tensor` (contiguous, f32 or bf16) over all ranks, in place; every rank ends
    /// with the same bits.
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Reduces `input` (contiguous, `K·n` elements, f32 or bf16) over all ranks and writes
    /// this rank's part of the result, elements `rank·n .. (rank+1)·n`, into `output`
    /// (`n` elements). Sizes that are not `K·n` against `n` are a [`CollectiveError::Mismatch`].
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Concatenates every rank's `input` (`n` elements) in rank order into `output`
    /// (`K·n` elements, same kind) on every rank.
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;
    /// Copies `root`'s `tensor` into every other rank's `tensor` (same shape and kind).
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
}

/// Checks that `whole` holds `world` times the elements of `part` (reduce-scatter and
/// all-gather).
pub(crate) fn check_parts(
    op: &'static str,
    whole: &Tensor,
    part: &Tensor,
    world: usize,
) -> Result<()> {
    if whole.numel() != part.numel() * world {
        return Err(CollectiveError::Mismatch {
            op,
            detail: format!(
                "the full buffer has {} elements, not {world} ranks × {} (pad it to a multiple of the world size)",
                whole.numel(),
                part.numel()
            ),
        });
    }
    Ok(())
}

/// Timeout used when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
