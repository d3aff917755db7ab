//! The contracts between quill's processes: the gRPC protocol (`proto/quill/v1/quill.proto`,
//! compiled at build time), the job token and the authenticated channels and servers that
//! carry it (plaintext on loopback or mutual TLS with the job's CA), a member's registration and heartbeat loop, the wire form of a weight
//! version, and the typed metrics, status document and step record the learner reports.
//! No tch: every role and tool can depend on it.

pub mod auth;
pub mod blob;
#[cfg(test)]
mod decode_props;
mod generated;
pub mod incoming;
pub mod member;
pub mod metrics;
pub mod rpc;
pub mod status;
pub mod tls;

pub use generated::*;
