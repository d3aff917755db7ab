//! Links libtorch (see `build/libtorch_rpath.rs`) and compiles the gRPC protocol with the
//! protoc binary vendored by `protoc-bin-vendored` (no system protoc needed).
include!("../build/libtorch_rpath.rs");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    link_libtorch();
    println!("cargo:rerun-if-changed=proto");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Weight chunks are `bytes::Bytes`: slices of a blob, forwarded without copies.
        .bytes(".quill.v1.WeightChunk.data")
        .compile_protos(&["proto/quill/v1/quill.proto"], &["proto"])?;
    Ok(())
}
