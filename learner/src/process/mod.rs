//! The learner processes: rank 0's start-up and serving (`run`), its trainer thread's
//! step loop (`train_loop`), the batcher thread that assembles the next batch while a
//! step runs (`batcher`), the threads that publish weights and write checkpoints off the
//! step's critical path (`offload`), how a step's groups become training samples and
//! shards (`group`), a rank > 0 (`rank`), what each rank reports about its steps
//! (`rank_metrics`), SIGTERM as a request to stop (`stop`), and their error type
//! (`error`).

pub mod batcher;
pub mod error;
pub mod group;
pub mod offload;
pub mod rank;
pub mod rank_metrics;
pub mod run;
pub mod stop;
pub mod train_loop;
