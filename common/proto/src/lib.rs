//! The contracts between quill's processes: the gRPC protocol (`proto/quill/v1/quill.proto`,
//! compiled at build time), the job token and the authenticated channels and servers that
//! carry it, a member's registration and heartbeat loop, and the wire form of a weight
//! version. No tch: every role and tool can depend on it.

pub mod auth;
pub mod blob;
mod generated;
pub mod member;
pub mod metrics;
pub mod rpc;

pub use generated::*;
