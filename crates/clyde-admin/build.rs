//! Generates the admin API's gRPC code from `proto/` (needs `protoc`, Debian's
//! `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The manifest dir of this run, not of the build that compiled this script: a target dir
    // shared by clones at different paths reuses the compiled script.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("clyde/admin/v1/admin.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure().compile_protos(&[proto], &[root])?;
    Ok(())
}
