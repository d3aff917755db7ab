//! Data parallelism across learner ranks: the collectives (TCP ring, NCCL), gradient
//! synchronisation, rank 0's table of ranks and the process of a rank > 0.

pub mod collective;
pub mod grad_sync;
pub mod rank_metrics;
pub mod rank_worker;
pub mod ranks;
