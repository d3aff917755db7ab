//! The job file: every setting of a quill job as one TOML document (`configs/*.toml`),
//! parsed into typed sections, validated with errors that name the field (and, for
//! parse errors, its line and column), and the think-then-answer prompt template. No tch:
//! the launcher, the status tool and every role read it.

pub mod job;
pub mod template;

pub use job::{JobConfig, JobConfigError};
pub use template::PromptTemplate;
