//! The subcommands of the `quill` binary.

pub mod actor;
pub mod bench;
mod bench_weights;
pub mod generate;
pub mod init_model;
pub mod launch;
pub mod learner;
mod model_args;
pub mod plot;
pub mod reward;
pub mod slurm;
pub mod status;
mod status_table;

/// A member name for logs: host and process id.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
