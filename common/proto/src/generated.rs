//! The gRPC protocol (`proto/quill/v1/quill.proto`), generated at build time.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("quill.v1");
