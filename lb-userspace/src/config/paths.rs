//! Where the daemon keeps things when the config does not say: the admin
//! listener and socket, the state file, the record of pinned maps, pins.

use std::path::{Path, PathBuf};

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
/// Where the admin socket lives when neither the config nor systemd's
/// `RuntimeDirectory=` (`$RUNTIME_DIRECTORY`) says otherwise; the CLI
/// looks here by default.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/lb/lb.sock";

/// The admin socket of a config that names none: `lb.sock` in systemd's
/// runtime directory when it sets one, else [`DEFAULT_ADMIN_SOCKET`].
pub fn default_admin_socket() -> PathBuf {
    match std::env::var("RUNTIME_DIRECTORY") {
        Ok(dirs) if dirs.starts_with('/') => {
            let first = dirs.split(':').next().unwrap_or(&dirs);
            Path::new(first).join("lb.sock")
        }
        _ => PathBuf::from(DEFAULT_ADMIN_SOCKET),
    }
}
/// The directory of default state files (systemd's `StateDirectory=lb`
/// sets `$STATE_DIRECTORY` to it too).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lb";

/// The state file of a config that names none: one per config file (its
/// name and a hash of its absolute path), under `$STATE_DIRECTORY` when
/// systemd sets it, else [`DEFAULT_STATE_DIR`]; two daemons with different
/// config files never share one.
pub fn default_state_file(config: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(config).unwrap_or_else(|_| {
        std::env::current_dir().map_or_else(|_| config.to_path_buf(), |d| d.join(config))
    });
    let dir = std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        // systemd may pass several, colon-separated: the first is ours.
        .and_then(|d| {
            let first = d.to_string_lossy().split(':').next()?.to_string();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let stem = abs
        .file_stem()
        .map_or_else(|| "lb".into(), |s| s.to_string_lossy().to_string());
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = fnv1a(abs.as_os_str().as_encoded_bytes());
    dir.join(format!("{stem}-{:08x}.state.json", hash as u32))
}

/// The record of the maps pinned at `pin`, in the state file's directory.
pub fn record_path(state_file: &Path, pin: &Path) -> PathBuf {
    let dir = state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let hash = fnv1a(pin.as_os_str().as_encoded_bytes());
    dir.join(format!("dataplane-{:08x}.json", hash as u32))
}

/// Where versions before the per-pin record kept it.
pub fn legacy_record_path(state_file: &Path) -> PathBuf {
    state_file.with_extension("dataplane.json")
}

/// FNV-1a, 64 bits: a stable hash (unlike std's) for names and fingerprints.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_extend(FNV1A_START, bytes)
}

/// FNV-1a's starting value, for hashing piece by piece with `fnv1a_extend`.
pub const FNV1A_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of what `h` hashed so far followed by `bytes`.
pub fn fnv1a_extend(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
/// Maps and links are pinned here so the data plane outlives the daemon.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";
