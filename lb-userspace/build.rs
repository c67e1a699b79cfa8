//! Builds the eBPF object (`lb-ebpf`) into OUT_DIR with bpf-linker, so the
//! `lb` binary carries the exact data plane it was built with.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Stable rustc builds `core` for the BPF target only with
    // `-Z build-std=core`, which aya-build passes (and the child cargo
    // accepts) when RUSTC_BOOTSTRAP is set. Setting it here, for the eBPF
    // build alone, keeps the rest of the workspace on plain stable.
    // SAFETY: a build script is single-threaded; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom("stable"),
    )
}
