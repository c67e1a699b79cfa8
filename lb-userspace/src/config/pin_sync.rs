//! `[cluster] pin_sync`: where this node takes flow pins from the other
//! nodes, the file holding the key that authenticates them, and how many
//! pins a second it sends at most.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::errors::{FieldError, Seg, key};

pub const DEFAULT_MAX_PINS_PER_SECOND: u32 = 20_000;

/// `pin_sync` as written in the file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPinSync {
    /// `ip:port` this node receives pins on; published in etcd for the
    /// other nodes, so a specific address.
    pub listen: Option<String>,
    /// The shared key (at least 32 bytes), the same file on every node.
    pub key_file: Option<String>,
    /// Pins sent a second at most; the rest are dropped and counted.
    pub max_pins_per_second: Option<i64>,
}

/// `pin_sync`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinSyncConfig {
    pub listen: SocketAddr,
    pub key_file: PathBuf,
    pub max_pins_per_second: u32,
}

pub(super) fn parse(at: &[Seg], raw: &RawPinSync) -> Result<PinSyncConfig, FieldError> {
    let at = key(at, "pin_sync");
    let listen_at = key(&at, "listen");
    let listen = raw.listen.as_deref().ok_or_else(|| {
        FieldError::new(
            &listen_at,
            "pin_sync.listen is required: the ip:port this node takes pins on",
        )
    })?;
    let listen: SocketAddr = listen.parse().map_err(|_| {
        FieldError::new(
            &listen_at,
            format!("{listen:?} is not an ip:port (IPv6 as [addr]:port)"),
        )
    })?;
    if listen.ip().is_unspecified() || listen.port() == 0 {
        return Err(FieldError::new(
            &listen_at,
            "give a specific address and port: the other nodes send to it",
        ));
    }
    let key_at = key(&at, "key_file");
    let key_file = match raw.key_file.as_deref() {
        None => {
            return Err(FieldError::new(
                &key_at,
                "pin_sync.key_file is required: pins are authenticated with a shared key",
            ));
        }
        Some(p) if p.starts_with('/') && !p.ends_with('/') => PathBuf::from(p),
        Some(p) => {
            return Err(FieldError::new(
                &key_at,
                format!("{p:?} is not an absolute file path"),
            ));
        }
    };
    let max_pins_per_second = match raw.max_pins_per_second {
        None => DEFAULT_MAX_PINS_PER_SECOND,
        Some(v) if (1..=10_000_000).contains(&v) => v as u32,
        Some(v) => {
            return Err(FieldError::new(
                &key(&at, "max_pins_per_second"),
                format!("{v} is out of range 1..=10000000"),
            ));
        }
    };
    Ok(PinSyncConfig {
        listen,
        key_file,
        max_pins_per_second,
    })
}
