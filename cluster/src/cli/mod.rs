//! The role and tool subcommands of the `quill` binary: flags, then a call into the
//! library crate that does the work.

pub mod actor;
pub mod certs;
pub mod data;
pub mod generate;
pub mod init_model;
pub mod learner;
pub mod member_args;
pub mod model_args;
pub mod plan;
pub mod reward;
pub mod status;
mod status_table;
pub mod tls_args;
pub mod train_rm;

/// A member name for logs: host and process id.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
