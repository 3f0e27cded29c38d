//! Generates the prost messages and tonic clients/servers of `ccm.v1` and
//! writes the file descriptor set (with imports and source info, so the
//! google.api options, the well-known types and every doc comment are in it).
//!
//! protoc comes from `protoc-bin-vendored`: no system protoc is needed.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

/// Name of the encoded `FileDescriptorSet` in `OUT_DIR` (see `src/lib.rs`).
const DESCRIPTOR_SET: &str = "ccm_descriptor_set.bin";

fn proto_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_set = out_dir.join(DESCRIPTOR_SET);

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=ccm");
    println!("cargo:rerun-if-changed=google");

    // The contracts plus the vendored google/api annotation protos (listed
    // explicitly so `google.api.HttpRule` gets a Rust type too).
    let mut protos = proto_files(&root.join("ccm/v1"))?;
    protos.extend(proto_files(&root.join("google/api"))?);
    if protos.is_empty() {
        return Err("no .proto files found under proto/ccm/v1".into());
    }
    let includes = vec![root.clone(), protoc_bin_vendored::include_path()?];

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    // Pass 1 (prost-reflect-build): runs protoc once, writes the descriptor
    // set (prost-build passes --include_imports and --include_source_info)
    // and adds `#[derive(ReflectMessage)]` to every message, resolved
    // against `crate::descriptor_pool()`.
    prost_reflect_build::Builder::new()
        .file_descriptor_set_path(&descriptor_set)
        .descriptor_pool("crate::descriptor_pool()")
        .configure(&mut config, &protos, &includes)?;

    // Pass 2 (tonic-prost-build): generates messages, clients and servers
    // from the descriptor set written above.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .file_descriptor_set_path(&descriptor_set)
        .skip_protoc_run()
        .compile_with_config(config, &protos, &includes)?;

    Ok(())
}
