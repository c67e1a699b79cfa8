//! `[bgp]`: how the daemon announces its service addresses through the
//! node's BIRD 2 (the include file it writes, the control socket it asks
//! to reconfigure, the interface the announced routes hang on).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::errors::{FieldError, Seg, key};

pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";
pub const DEFAULT_INCLUDE_FILE: &str = "/etc/bird/lb-routes.conf";
pub const DEFAULT_ANNOUNCE_INTERFACE: &str = "lb-announce";

/// `[bgp]` as written in the file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBgp {
    /// BIRD's control socket (`bird -s`).
    pub bird_socket: Option<String>,
    /// The file lb writes and BIRD's config `include`s.
    pub include_file: Option<String>,
    /// The TUN device the daemon holds open; the announced routes go
    /// through it, so they go down with the daemon.
    pub interface: Option<String>,
}

/// `[bgp]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpConfig {
    pub bird_socket: PathBuf,
    pub include_file: PathBuf,
    pub interface: String,
}

fn absolute(path: &[Seg], v: Option<&String>, default: &str) -> Result<PathBuf, FieldError> {
    match v {
        None => Ok(PathBuf::from(default)),
        Some(s) if s.starts_with('/') && !s.ends_with('/') && !s.contains('\n') => {
            Ok(PathBuf::from(s))
        }
        Some(s) => Err(FieldError::new(
            path,
            format!("{s:?} must be an absolute file path, e.g. {default:?}"),
        )),
    }
}

/// A name the kernel takes for a new link (IFNAMSIZ, no '/' or space) and
/// BIRD's config can quote.
fn interface_name(path: &[Seg], v: Option<&String>) -> Result<String, FieldError> {
    let Some(s) = v else {
        return Ok(DEFAULT_ANNOUNCE_INTERFACE.into());
    };
    let ok = (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s != "."
        && s != "..";
    if !ok {
        return Err(FieldError::new(
            path,
            format!(
                "{s:?} is not a usable interface name: 1 to 15 letters, digits, '-', '_' or '.' \
                 (e.g. {DEFAULT_ANNOUNCE_INTERFACE:?})"
            ),
        ));
    }
    Ok(s.clone())
}

/// Validates `[bgp]` (absent: the daemon announces nothing).
pub(super) fn parse(raw: Option<&RawBgp>) -> Result<Option<BgpConfig>, FieldError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let at = [Seg::Key("bgp".into())];
    let bird_socket = absolute(
        &key(&at, "bird_socket"),
        raw.bird_socket.as_ref(),
        DEFAULT_BIRD_SOCKET,
    )?;
    let include_file = absolute(
        &key(&at, "include_file"),
        raw.include_file.as_ref(),
        DEFAULT_INCLUDE_FILE,
    )?;
    if include_file == bird_socket {
        return Err(FieldError::new(
            &key(&at, "include_file"),
            "the include file cannot be BIRD's control socket",
        ));
    }
    let interface = interface_name(&key(&at, "interface"), raw.interface.as_ref())?;
    Ok(Some(BgpConfig {
        bird_socket,
        include_file,
        interface,
    }))
}
