//! Compiles the gRPC protocol with the protoc binary vendored by `protoc-bin-vendored`
//! (no system protoc needed).

/// Derives for messages that also travel as JSON; absent fields read as their default.
const SERDE: &str = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/quill/v1/quill.proto");
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Weight chunks are `bytes::Bytes`: slices of a blob, forwarded without copies.
        .bytes(".quill.v1.WeightChunk.data")
        // Metrics messages appear in the status document (JSON) as they are.
        .type_attribute(".quill.v1.ActorMetrics", SERDE)
        .type_attribute(".quill.v1.RewardMetrics", SERDE)
        .type_attribute(".quill.v1.RankMetrics", SERDE)
        .compile_protos(&["proto/quill/v1/quill.proto"], &["proto"])?;
    Ok(())
}
