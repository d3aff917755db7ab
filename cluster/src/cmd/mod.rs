//! The subcommands of the `quill` binary.

pub mod bench;
pub mod generate;
pub mod init_model;
mod model_args;
