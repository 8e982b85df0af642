//! Generates the `wharf.v1` messages and tonic services. Needs `protoc` (Debian: protobuf-compiler,
//! which `make` installs when missing).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=wharf/v1/wharf.proto");
    tonic_prost_build::configure().compile_protos(&["wharf/v1/wharf.proto"], &["."])?;
    Ok(())
}
