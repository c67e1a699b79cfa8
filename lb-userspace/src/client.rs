//! A small blocking HTTP/1.1 client for the admin API: over the Unix
//! socket (which no general HTTP client here speaks) or over TCP. One
//! request per connection (`Connection: close`), a deadline for the whole
//! exchange, and the answer read to its end.
use std::{
    io::{self, Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

/// Where the admin API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The admin socket.
    Unix(PathBuf),
    /// `host:port` of the TCP listener (from an `http://` URL).
    Tcp(String),
}

impl Endpoint {
    /// `unix:/path`, a bare absolute path, or `http://host:port[/]`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        match s.strip_prefix("http://") {
            Some(rest) => {
                let hostport = rest.trim_end_matches('/');
                if hostport.is_empty() || hostport.contains('/') {
                    return Err(format!("{s:?}: expected http://host:port"));
                }
                Ok(Endpoint::Tcp(hostport.to_string()))
            }
            None if s.starts_with("https://") => Err(format!(
                "{s:?}: the admin API speaks plain HTTP; put a TLS proxy in front to expose it"
            )),
            None => Err(format!("{s:?}: expected http://host:port or unix:/path")),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(h) => write!(f, "http://{h}"),
        }
    }
}

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// `Retry-After` in seconds, when the answer has one.
    pub retry_after: Option<u64>,
}

/// Largest answer read.
const MAX_ANSWER: u64 = 64 << 20;

/// One request. `token` goes in an `Authorization: Bearer` header.
pub fn request(
    to: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
    timeout: Duration,
) -> io::Result<Answer> {
    let host = match to {
        Endpoint::Unix(_) => "localhost",
        Endpoint::Tcp(h) => h.as_str(),
    };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    } else if !matches!(method, "GET" | "HEAD") {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    let mut raw = Vec::new();
    match to {
        Endpoint::Unix(p) => exchange(connect_unix(p, timeout)?, &head, body, &mut raw)?,
        Endpoint::Tcp(h) => {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(h.as_str())?
                .next()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{h}: no address"))
                })?;
            let s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            exchange(s, &head, body, &mut raw)?;
        }
    }
    parse_answer(&raw)
}

fn connect_unix(p: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s = UnixStream::connect(p)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn exchange<S: Read + Write>(
    mut s: S,
    head: &str,
    body: Option<&[u8]>,
    raw: &mut Vec<u8>,
) -> io::Result<()> {
    // The server may answer and close before it reads a body it refuses:
    // a failed write still leaves its answer to read.
    let sent = s
        .write_all(head.as_bytes())
        .and_then(|()| body.map_or(Ok(()), |b| s.write_all(b)))
        .and_then(|()| s.flush());
    let read = s.take(MAX_ANSWER).read_to_end(raw);
    match (sent, read) {
        _ if !raw.is_empty() => Ok(()),
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(()), Ok(_)) => Ok(()),
    }
}

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

/// Parses a whole HTTP/1.1 answer (Content-Length, chunked, or to EOF).
pub fn parse_answer(raw: &[u8]) -> io::Result<Answer> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("the answer has no complete header"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("the header is not text"))?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut length = None;
    let mut retry_after = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("retry-after") {
                retry_after = v.parse::<u64>().ok();
            }
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| bad("the answer ended before its Content-Length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Answer {
        status,
        body,
        retry_after,
    })
}

fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("a chunk size line is cut"))?;
        let line = std::str::from_utf8(&rest[..eol]).map_err(|_| bad("chunk size"))?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| bad("a chunk is cut"))?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or_else(|| bad("a chunk is cut"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("unix:/run/lb/lb.sock"),
            Ok(Endpoint::Unix("/run/lb/lb.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("/run/x.sock"),
            Ok(Endpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:9180/"),
            Ok(Endpoint::Tcp("127.0.0.1:9180".into()))
        );
        assert!(Endpoint::parse("https://x:1").is_err());
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://x:1/api").is_err());
    }

    #[test]
    fn answers_parse_by_length_chunks_or_eof() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"{}"[..]));
        let a = parse_answer(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((a.status, a.body.as_slice()), (404, &b"abcde"[..]));
        let a = parse_answer(b"HTTP/1.1 500 x\r\n\r\nrest").unwrap();
        assert_eq!((a.body.as_slice(), a.retry_after), (&b"rest"[..], None));
        let a =
            parse_answer(b"HTTP/1.1 429 x\r\nRetry-After: 3\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert_eq!((a.status, a.retry_after), (429, Some(3)));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
