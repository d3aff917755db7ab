//! Weight relay: one version of the weights held or being received as checksummed chunks,
//! served to other actors while it is still arriving (cut-through), and fetched from an
//! ordered list of sources with resume from the byte reached.
//!
//! Chunks are `bytes::Bytes`: a relay forwards the very buffers it received, and a root
//! serves slices of its blob, so no chunk is copied on its way through a relay.

mod error;
mod fetch;
mod node;
mod transfer;
pub mod tree;

pub use error::RelayError;
pub use fetch::{FetchReport, Fetcher};
pub use node::{RelayNode, RelayService};
pub use transfer::{ChunkStream, Header, Transfer};

/// The member id a [`WeightSource`](quill_proto::WeightSource) carries for the learner
/// itself.
pub const LEARNER_SOURCE: &str = "learner";
