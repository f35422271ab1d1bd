//! Compiles proto/helloworld.proto (needs protoc; `make` provides it).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/helloworld.proto");
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure().compile_protos(&[proto], &[include])?;
    Ok(())
}
