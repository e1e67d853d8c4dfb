//! Embeds the kernel object built by `cargo xtask build-ebpf`, so `tern` is one self-contained binary.
use std::{env, path::PathBuf};

fn main() {
    let object = match env::var_os("TERN_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
            .join("../target/ebpf/bpfel-unknown-none/release/tern-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=TERN_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the eBPF object {} does not exist: run `cargo xtask build-ebpf` first \
             (or set TERN_EBPF_OBJECT to a built object)",
            object.display()
        );
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("tern-ebpf.o");
    std::fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
}
