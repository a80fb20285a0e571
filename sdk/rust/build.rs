//! Generates the `saga.v1` gRPC code from the workspace's `proto/` with a
//! vendored `protoc` (no system protobuf compiler needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    tonic_build::configure().compile_protos(
        &[
            root.join("saga/v1/coordinator.proto"),
            root.join("saga/v1/participant.proto"),
        ],
        &[root, include],
    )?;
    Ok(())
}
