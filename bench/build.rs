//! Builds the test-only eBPF programs (`test-ebpf`: the baseline XDP program
//! the bench measures lb against) into OUT_DIR, so the product never carries
//! them.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Stable rustc builds `core` for the BPF target only with
    // `-Z build-std=core`, which aya-build passes (and the child cargo
    // accepts) when RUSTC_BOOTSTRAP is set: here, for the eBPF build alone.
    // SAFETY: a build script is single-threaded; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../test-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "lb-test-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom("stable"),
    )
}
