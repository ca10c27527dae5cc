//! Builds the eBPF programs (`tunnel-ebpf/ebpf`, package `enc-tunnel-ebpf-programs`) with the
//! nightly toolchain and bpf-linker, and leaves the object in `$OUT_DIR` for
//! `include_bytes_aligned!`.
//!
//! The programs crate is its own workspace (it only builds for the BPF target), so cargo is run
//! from its directory; aya-build's `--target-dir` under `$OUT_DIR` keeps the nested cargo from
//! waiting on our own build lock. It is not a build-dependency (that would compile it for the
//! host), so changes are tracked with `rerun-if-changed` on its sources and on the common crate.
//! `AYA_BUILD_SKIP=1` skips the build (for tools that only need metadata); the loader then
//! embeds an empty object and fails at load time.

use std::path::PathBuf;

fn main() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("ebpf");
    let common_dir = manifest_dir.join("common");
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join(".cargo"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let object = out_dir.join("enc-tunnel-ebpf-programs");
    // An empty placeholder so include_bytes! compiles when the build is skipped.
    if !object.exists() {
        std::fs::write(&object, [])?;
    }

    std::env::set_current_dir(&ebpf_dir)?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| std::io::Error::other("non-UTF-8 path to tunnel-ebpf/ebpf"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "enc-tunnel-ebpf-programs",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
}
