//! The learner processes: rank 0's start-up and serving (`run`), its trainer thread's
//! batch loop (`train_loop`), how a step's groups become training samples and shards
//! (`group`), a rank > 0 (`rank`), what each rank reports about its steps
//! (`rank_metrics`), and their error type (`error`).

pub mod error;
pub mod group;
pub mod rank;
pub mod rank_metrics;
pub mod run;
pub mod train_loop;
