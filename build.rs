//! Generates the gRPC code from `proto/saga/v1` with a vendored `protoc`, so
//! the build needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure().compile_protos(
        &[
            "proto/saga/v1/coordinator.proto",
            "proto/saga/v1/participant.proto",
        ],
        &[std::path::PathBuf::from("proto"), include],
    )?;
    Ok(())
}
