//! Shared pieces of the integration tests: frame building and checking,
//! network-namespace topologies that clean up after themselves, and the root
//! check that privileged tests start with.
pub mod capture;
pub mod cluster;
pub mod daemon;
pub mod demo;
pub mod etcd;
pub mod fixtures;
pub mod https;
pub mod inputs;
pub mod netns;
pub mod packet;
pub mod quic;
pub mod rng;
pub mod servers;
pub mod topology;

/// Fails the test, loudly, when it cannot do its job without root.
pub fn require_root() {
    if !rustix::process::geteuid().is_root() {
        panic!(
            "this test loads eBPF programs and creates network namespaces: it must run as root \
             (run `cargo xtask test` as root)"
        );
    }
}

/// Polls `ok` every 2 ms until it holds; how long that took. Fails the
/// test, naming `what`, after `within`.
pub fn wait_for(
    what: &str,
    within: std::time::Duration,
    mut ok: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    start.elapsed()
}
