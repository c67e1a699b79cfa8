//! The HTTP/1.1 exchange of a health check: the request it sends and the
//! status it judges.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::CheckError;

/// The most of an HTTP response we read looking for the status line.
const MAX_RESPONSE_HEAD: usize = 4096;

pub(super) fn http_request(
    path: &str,
    host: Option<&str>,
    backend: SocketAddr,
) -> Result<Vec<u8>, CheckError> {
    let path = if path.is_empty() { "/" } else { path };
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(CheckError::InvalidCheck(format!(
            "HTTP path {path:?} contains spaces or control characters"
        )));
    }
    let host = match host {
        Some(h) if h.is_empty() || h.bytes().any(|b| b.is_ascii_control() || b == b' ') => {
            return Err(CheckError::InvalidCheck(format!(
                "HTTP host {h:?} is empty or contains spaces or control characters"
            )));
        }
        Some(h) => h.to_owned(),
        None => backend.to_string(),
    };
    Ok(format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health/1\r\nConnection: close\r\n\r\n"
    )
    .into_bytes())
}

/// Sends the request and reads just enough of the answer to judge the status.
pub(super) async fn http_exchange<S>(mut stream: S, request: &[u8]) -> Result<(), CheckError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request).await.map_err(CheckError::Io)?;
    stream.flush().await.map_err(CheckError::Io)?;

    let mut buf = [0u8; MAX_RESPONSE_HEAD];
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].iter().position(|&b| b == b'\n') {
            let status = parse_status_line(&buf[..end])?;
            return if (200..=299).contains(&status) {
                Ok(())
            } else {
                Err(CheckError::BadStatus(status))
            };
        }
        if len == buf.len() {
            return Err(CheckError::BadResponse(format!(
                "no status line in the first {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        let n = stream.read(&mut buf[len..]).await.map_err(CheckError::Io)?;
        if n == 0 {
            return Err(CheckError::BadResponse(if len == 0 {
                "connection closed without a response".to_owned()
            } else {
                "connection closed in the middle of the status line".to_owned()
            }));
        }
        len += n;
    }
}

/// Parses `HTTP/1.x NNN [reason]` (with or without the trailing CR).
pub(super) fn parse_status_line(line: &[u8]) -> Result<u16, CheckError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // The reply itself is not echoed: readers of the API see only that it
    // was not a status line.
    let bad = || {
        CheckError::BadResponse(format!(
            "the first line ({} bytes) is not an HTTP/1.x status line",
            line.len()
        ))
    };
    let mut parts = line.splitn(3, |&b| b == b' ');
    let version = parts.next().ok_or_else(bad)?;
    let code = parts.next().ok_or_else(bad)?;
    if !version.starts_with(b"HTTP/") || code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    Ok(code
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0')))
}
