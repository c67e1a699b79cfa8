//! BIRD's side of announcing: the include file of static routes lb writes
//! (atomically) and the control socket's text protocol, which lb uses to
//! make BIRD read it again (`configure`).

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// The static protocols lb's file declares, one per address family: what
/// the operator's BGP export filter names (`proto ~ "lb_services*"`).
pub const PROTOCOL_V4: &str = "lb_services4";
pub const PROTOCOL_V6: &str = "lb_services6";

/// How long one exchange with BIRD may take.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum BirdError {
    #[error("writing BIRD's include file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD's control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD's control socket {0}: no answer within 5 s")]
    Timeout(PathBuf),
    #[error("BIRD's control socket {0} closed before answering")]
    Closed(PathBuf),
    #[error("BIRD refused `configure` ({code}): {message}")]
    Refused { code: u16, message: String },
}

/// The include file's text: every address as a host route through
/// `interface`, so BIRD drops them all when that interface goes.
pub fn render(addresses: &[IpAddr], interface: &str) -> String {
    let mut out = String::from(
        "# Written by lb ([bgp] in its config) on every change; do not edit.\n\
         # Routes go through the daemon's TUN device, so they vanish with it.\n",
    );
    for (proto, channel, v6) in [(PROTOCOL_V4, "ipv4", false), (PROTOCOL_V6, "ipv6", true)] {
        out.push_str(&format!("protocol static {proto} {{\n  {channel};\n"));
        for a in addresses.iter().filter(|a| a.is_ipv6() == v6) {
            let len = if v6 { 128 } else { 32 };
            out.push_str(&format!("  route {a}/{len} via \"{interface}\";\n"));
        }
        out.push_str("}\n");
    }
    out
}

/// Replaces `path` with `text` in one rename, so BIRD never reads half.
pub fn write_include(path: &Path, text: &str) -> Result<(), BirdError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| BirdError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".lb-routes")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(text.as_bytes()).map_err(err)?;
    // BIRD may run as its own user (Debian's `bird`): readable by all.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// A reply's last line: `dddd text`, where `dddd-` or a leading space
/// continues. Codes below 8000 are successes (0003 reconfigured, 0019
/// nothing to do, ...), 8xxx and 9xxx errors.
fn final_line(line: &str) -> Option<(u16, &str)> {
    let code = line.get(..4)?.parse::<u16>().ok()?;
    (line.as_bytes().get(4) == Some(&b' ')).then(|| (code, line[5..].trim()))
}

/// Asks BIRD to read its config again (with lb's include file).
pub async fn configure(socket: &Path) -> Result<String, BirdError> {
    match tokio::time::timeout(TIMEOUT, exchange(socket, "configure")).await {
        Ok(r) => r,
        Err(_) => Err(BirdError::Timeout(socket.to_path_buf())),
    }
}

async fn exchange(socket: &Path, command: &str) -> Result<String, BirdError> {
    let io = |source| BirdError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // The greeting: "0001 BIRD 2.x ready."
    let answer = |line: Option<String>| line.ok_or(BirdError::Closed(socket.to_path_buf()));
    let hello = answer(lines.next_line().await.map_err(io)?)?;
    if final_line(&hello).is_none() {
        return Err(BirdError::Closed(socket.to_path_buf()));
    }
    write
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut text = Vec::new();
    loop {
        let line = answer(lines.next_line().await.map_err(io)?)?;
        if let Some((code, msg)) = final_line(&line) {
            text.push(msg.to_string());
            let all = text.join(" ");
            return if code < 8000 {
                Ok(all)
            } else {
                Err(BirdError::Refused { code, message: all })
            };
        }
        let body = line.get(5..).unwrap_or(&line).trim();
        if !body.is_empty() {
            text.push(body.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_protocol_per_family() {
        let text = render(
            &["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            "lb-announce",
        );
        assert!(text.contains(
            "protocol static lb_services4 {\n  ipv4;\n  route 10.0.0.1/32 via \"lb-announce\";\n}"
        ));
        assert!(text.contains(
            "protocol static lb_services6 {\n  ipv6;\n  route 2001:db8::1/128 via \"lb-announce\";\n}"
        ));
        // Nothing to announce still declares both (an empty static protocol).
        let empty = render(&[], "x");
        assert_eq!(empty.matches("protocol static").count(), 2);
        assert!(!empty.contains("route"));
    }

    #[test]
    fn reads_final_lines() {
        assert_eq!(final_line("0003 Reconfigured"), Some((3, "Reconfigured")));
        assert_eq!(final_line("0002-Reading configuration"), None);
        assert_eq!(final_line(" continued"), None);
        assert_eq!(
            final_line("8002 /etc/bird.conf:3:1 syntax error"),
            Some((8002, "/etc/bird.conf:3:1 syntax error"))
        );
    }
}
