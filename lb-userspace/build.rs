//! Builds the eBPF object (`lb-ebpf`) into OUT_DIR with bpf-linker, so the
//! `lb` binary carries the exact data plane it was built with.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
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
