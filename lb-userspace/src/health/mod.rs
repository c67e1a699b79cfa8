//! Backend health checking: one tokio task per (service, backend) runs TCP,
//! HTTP(S) or UDP probes on a jittered interval, counts consecutive results
//! against rise/fall thresholds and reports crossings as `HealthEvent`s.
//! Probes share one semaphore so a large fleet cannot flood the host.

mod http;
mod probe;
mod scheduler;
mod tls;

pub use scheduler::{BackendHealth, Checker, HealthEvent, ResultHook, Start};

use std::{io, net::SocketAddr, path::PathBuf, time::Duration};

use thiserror::Error;

use probe::Probe;
#[cfg(test)]
use {scheduler::*, tls::*};

/// Largest `ca_file` accepted.
pub const MAX_CA_FILE: u64 = 1 << 20;
/// Longest failure reason kept for the API and `lb status`.
pub const MAX_REASON: usize = 160;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// TCP connect succeeds.
    Tcp,
    /// HTTP/1.1 GET `path`, expect a 2xx status. `host` is the Host header
    /// (default: the backend address).
    Http { path: String, host: Option<String> },
    /// Same over TLS. SNI = `sni`, else `host` (without a port), else none
    /// when the backend is an IP. The certificate is not verified unless
    /// `ca_file` is given; then it must chain to that PEM CA and match the
    /// SNI name (or the backend IP when there is no name).
    Https {
        path: String,
        host: Option<String>,
        sni: Option<String>,
        ca_file: Option<PathBuf>,
    },
    /// Send `payload` as one datagram; a reply must arrive within the
    /// timeout; if `expect` is set the reply must contain those bytes.
    Udp {
        payload: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// One backend of one service to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub backend: SocketAddr,
    pub spec: CheckSpec,
}

/// Why one check failed (for logs, metrics and the API).
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("no answer within {0:?}; the backend is hung, overloaded or unreachable")]
    Timeout(Duration),
    #[error("connection refused; nothing is listening on the backend port")]
    Refused,
    #[error("cannot connect to the backend: {0}")]
    Connect(io::Error),
    #[error("I/O error talking to the backend: {0}")]
    Io(io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("backend answered HTTP {0}; a healthy backend answers 2xx")]
    BadStatus(u16),
    #[error("backend sent a malformed HTTP response: {0}")]
    BadResponse(String),
    #[error("the UDP reply does not contain the expected bytes")]
    UnexpectedReply,
    #[error("invalid health check: {0}; fix the service's health settings")]
    InvalidCheck(String),
    #[error("cannot use CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
}

impl CheckError {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CheckError::Timeout(_) => "timeout",
            CheckError::Refused => "refused",
            CheckError::Connect(_) => "connect",
            CheckError::Io(_) => "io",
            CheckError::Tls(_) => "tls",
            CheckError::BadStatus(_) => "bad_status",
            CheckError::BadResponse(_) => "bad_response",
            CheckError::UnexpectedReply => "unexpected_reply",
            CheckError::InvalidCheck(_) | CheckError::CaFile { .. } => "config",
        }
    }

    fn connect(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => CheckError::Refused,
            _ => CheckError::Connect(e),
        }
    }

    /// For UDP, where a refusal (ICMP port unreachable) shows up on send or
    /// receive rather than on connect.
    fn datagram(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => CheckError::Refused,
            _ => CheckError::Io(e),
        }
    }
}

/// Runs one check, bounded by `timeout` in total (connect + TLS + request +
/// response).
pub async fn check_once(
    kind: &CheckKind,
    backend: SocketAddr,
    timeout: Duration,
) -> Result<(), CheckError> {
    Probe::prepare_off_runtime(kind, backend)
        .await?
        .run(backend, timeout, None)
        .await
}

/// A failure reason as readers see it: printable ASCII only (anything else
/// becomes `?`), at most [`MAX_REASON`] characters. The reasons hold no
/// bytes of a backend's reply, but I/O and TLS errors come from libraries.
pub fn sanitize_reason(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(MAX_REASON + 1)
        .collect();
    if out.len() > MAX_REASON {
        out.truncate(MAX_REASON - 3);
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests;
