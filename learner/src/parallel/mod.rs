//! Data parallelism across learner ranks: the collectives (TCP ring, NCCL) and rank 0's
//! table of ranks. Nothing here knows about training; `train::grad_sync` uses the
//! collectives, `process::rank` runs a rank > 0.

pub mod collective;
pub mod ranks;
