//! Compiles the vectord.v1 contract in proto/ with a vendored protoc, so a fresh machine needs
//! no system protoc, and writes the file descriptor set that reflection serves.
use std::{env, error::Error, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { env::set_var("PROTOC", protoc) };
    let include = protoc_bin_vendored::include_path()?;

    let dir = PathBuf::from("proto/vectord/v1");
    let mut protos = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            protos.push(path);
        }
    }
    protos.sort();
    println!("cargo:rerun-if-changed=proto");

    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("vectord_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;
    Ok(())
}
