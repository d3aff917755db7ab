//! quill's actor side: the continuous-batching generation engine (KV cache, shared prompt
//! prefill, temperature/top-p/top-k sampling with per-token log-probs, stop tokens and
//! stop strings) and its threaded front end.

pub mod engine;
pub mod handle;
pub mod request;
pub mod sampling;
pub mod stop;
pub mod worker;

pub use engine::{Engine, EngineConfig, EngineStats};
pub use handle::EngineHandle;
pub use request::{FinishReason, GenerationError, GenerationRequest, GroupOutput, Sample};
pub use sampling::SamplingParams;
