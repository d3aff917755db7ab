//! Pieces shared by every quill role: the Qwen2 model in tch, checkpoints, the tokenizer,
//! the think-then-answer prompt template, the embedded default model, device parsing.

pub mod auth;
pub mod collective;
pub mod config;
pub mod default_model;
pub mod device;
pub mod error;
pub mod job;
pub mod model;
pub mod pretrained;
pub mod prometheus_http;
pub mod proto;
pub mod relay;
pub mod rpc;
pub mod telemetry;
pub mod template;
pub mod tokenizer;
pub mod weights;

pub use config::{HeadKind, ModelConfig};
pub use error::{Error, Result};
pub use model::{KvCache, Prefix, Qwen2};
pub use pretrained::load_pretrained;
pub use tokenizer::Tokenizer;
