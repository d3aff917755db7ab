//! The long-running roles of a job that live in the binary: the reward worker's service
//! and the local launcher's process supervision.

pub mod quality;
pub mod reward_worker;
pub mod supervisor;
