//! The balancer's userspace: the daemon that loads and drives the kernel data
//! plane, checks backends and serves the admin API.
pub mod access;
pub mod admin;
pub mod announce;
pub mod api;
pub mod client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod files;
pub mod health;
pub mod links;
pub mod maglev;
pub mod mapstore;
pub mod metrics;
pub mod nexthop;
pub mod notify;
pub mod pins;
pub mod pinsync;
pub mod privs;
pub mod rates;
mod rtnl;
pub mod source;
pub mod state;
mod sys;
pub mod ui;

/// Locks `m` even when a thread panicked while holding it: the data behind
/// this crate's mutexes stays consistent between statements, and readers
/// prefer the last state to a second panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The eBPF object built from `lb-ebpf` by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
