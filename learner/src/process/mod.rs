//! The learner process: start-up and serving (`run`), the trainer thread's batch loop
//! (`train_loop`) and how a step's groups become training samples and shards (`group`).

pub mod group;
pub mod run;
pub mod train_loop;
