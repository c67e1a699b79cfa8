//! The test-only eBPF objects built from `test-ebpf` by this crate's build
//! script.

/// The floor: a program that parses Ethernet/IP/TCP, swaps MACs and returns
/// `XDP_TX`, built from `test-ebpf/src/baseline.rs`.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));
