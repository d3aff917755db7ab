//! Compiles the gRPC protocol with the protoc binary vendored by `protoc-bin-vendored`
//! (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Weight chunks are `bytes::Bytes`: slices of a blob, forwarded without copies.
        .bytes(".quill.v1.WeightChunk.data")
        .compile_protos(&["proto/quill/v1/quill.proto"], &["proto"])?;
    Ok(())
}
