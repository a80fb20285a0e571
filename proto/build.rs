//! Generates the `saga.v1` gRPC code from `saga/v1/*.proto` with a vendored
//! `protoc`, so the build needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=saga");
    let include = include
        .to_str()
        .ok_or("the vendored protoc's include path is not UTF-8")?
        .to_owned();
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .compile_protos(
            &["saga/v1/coordinator.proto", "saga/v1/participant.proto"],
            &[".", include.as_str()],
        )?;
    Ok(())
}
