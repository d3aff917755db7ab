//! quill's actor side: the continuous-batching generation engine (KV cache, shared prompt
//! prefill, temperature/top-p/top-k sampling with per-token log-probs, stop tokens and
//! stop strings) and its threaded front end.

pub mod engine;
pub mod held;
pub mod worker;

pub use engine::handle::EngineHandle;
pub use engine::request::{
    FinishReason, GenerationError, GenerationRequest, GroupOutput, Sample, TokenEvent, TokenStream,
};
pub use engine::sampling::SamplingParams;
pub use engine::{Engine, EngineConfig, EngineStats};
