//! Generates the gRPC code from proto/s2d.proto with a vendored protoc, so
//! a fresh machine needs no protobuf-compiler package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/s2d.proto");
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/s2d.proto"], &["proto"])?;
    Ok(())
}
