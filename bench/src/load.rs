//! The end-to-end load: HTTP(S) backends and the client that loads them,
//! both plain threads with blocking sockets, each thread inside its network
//! namespace and CPU-accounting group. Every loop is bounded in time and
//! in count.
//!
//! Backends answer `GET /` with a 3-byte body and `GET /bulk/<n>` with n
//! bytes, read and drop a request body (chunked or with a length) and
//! answer with its length in bytes (the bulk upload), HTTP/1.1 with
//! keep-alive unless the request says `Connection: close`; the TLS ones use a certificate for `bench.local`
//! made for the run (ECDSA P-256), without session resumption.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use lb_tests::{https, netns};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
    client::Resumption,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio_rustls::TlsConnector;

use crate::sys::{self, CpuGroup};

pub const SNI: &str = "bench.local";

/// The run's certificate and key, as rustls and as PEM for the peers.
pub struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Tls {
    pub fn new() -> Tls {
        let ck = rcgen::generate_simple_self_signed(vec![SNI.to_string()]).expect("certificate");
        let cert: CertificateDer<'static> = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection pays a full handshake.
        client.resumption = Resumption::disabled();
        Tls {
            server: Arc::new(server),
            client: Arc::new(client),
            cert_pem: ck.cert.pem(),
            key_pem: ck.signing_key.serialize_pem(),
        }
    }
}

/// Where a thread goes before it does its part.
fn enter(ns: &str, group: Option<&CpuGroup>) {
    netns::enter(ns);
    if let Some(g) = group {
        g.add_thread(sys::gettid());
    }
}

// ---------------------------------------------------------------------------
// Backends.

/// HTTP and HTTPS listeners on `0.0.0.0:<port>` in a namespace, a few
/// accepting threads each and one thread per connection. Stopped and joined on drop.
pub struct Backends {
    stop: Arc<AtomicBool>,
    fds: Vec<i32>,
    acceptors: Vec<JoinHandle<()>>,
    pub served: Arc<AtomicU64>,
}

impl Backends {
    pub fn start(
        ns: &str,
        http_ports: &[u16],
        https_ports: &[u16],
        tls: &Tls,
        group: Option<Arc<CpuGroup>>,
    ) -> Backends {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let mut fds = Vec::new();
        let mut acceptors = Vec::new();
        let listeners: Vec<(u16, Option<Arc<ServerConfig>>)> = http_ports
            .iter()
            .map(|p| (*p, None))
            .chain(https_ports.iter().map(|p| (*p, Some(tls.server.clone()))))
            .collect();
        for (port, tls) in listeners {
            let (tx, rx) = mpsc::channel();
            let (ns, stop, served, group) =
                (ns.to_string(), stop.clone(), served.clone(), group.clone());
            acceptors.push(thread::spawn(move || {
                enter(&ns, group.as_deref());
                let l = TcpListener::bind(("0.0.0.0", port))
                    .unwrap_or_else(|e| panic!("backend bind :{port}: {e}"));
                tx.send(l.as_raw_fd()).unwrap();
                // Several threads accept on the listener, so accepting is
                // never what limits one backend (the direct setup has one).
                let more: Vec<JoinHandle<()>> = (1..ACCEPTORS)
                    .map(|_| {
                        let (l, stop, tls, served) = (
                            l.try_clone().unwrap(),
                            stop.clone(),
                            tls.clone(),
                            served.clone(),
                        );
                        thread::spawn(move || accept_loop(&l, &stop, &tls, &served))
                    })
                    .collect();
                accept_loop(&l, &stop, &tls, &served);
                for m in more {
                    let _ = m.join();
                }
            }));
            fds.push(rx.recv_timeout(Duration::from_secs(5)).expect("backend up"));
        }
        Backends {
            stop,
            fds,
            acceptors,
            served,
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Shutting a listening socket down wakes its blocked accept.
        for fd in &self.fds {
            // SAFETY: shutdown(2) takes no pointers; the listener is still
            // open (its thread is joined below).
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
    }
}

/// Threads accepting on each backend listener.
const ACCEPTORS: usize = 4;

fn accept_loop(
    l: &TcpListener,
    stop: &AtomicBool,
    tls: &Option<Arc<ServerConfig>>,
    served: &Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((s, _)) = l.accept() else { break };
        let (tls, served) = (tls.clone(), served.clone());
        // Threads inherit the namespace and the group.
        thread::spawn(move || {
            let _ = serve(s, tls, &served);
        });
    }
}

fn serve(s: TcpStream, tls: Option<Arc<ServerConfig>>, served: &AtomicU64) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    match tls {
        Some(cfg) => {
            let conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
            let mut tls = StreamOwned::new(conn, s);
            let r = serve_http(&mut tls, served);
            tls.conn.send_close_notify();
            let _ = tls.flush();
            r
        }
        None => {
            let mut s = s;
            serve_http(&mut s, served)
        }
    }
}

/// Requests on one connection until the client closes or asks to.
fn serve_http(s: &mut (impl Read + Write), served: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut have = 0usize;
    loop {
        let end = loop {
            if let Some(i) = find(&buf[..have], b"\r\n\r\n") {
                break i + 4;
            }
            if have == buf.len() {
                return Err(io::Error::other("request head too long"));
            }
            let n = s.read(&mut buf[have..])?;
            if n == 0 {
                return Ok(());
            }
            have += n;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let close = head.contains("\r\nconnection: close");
        if let Some(len) = body_length(&head) {
            // An upload: the body is dropped, its length is the answer;
            // whatever followed it is not read, so the connection ends.
            let mut body = Discard {
                s: &mut *s,
                buf: vec![0u8; 256 * 1024],
                pos: 0,
                len: 0,
            };
            body.buf[..have - end].copy_from_slice(&buf[end..have]);
            body.len = have - end;
            let got = body.body(len)?;
            let n = got.to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{n}",
                n.len()
            );
            s.write_all(resp.as_bytes())?;
            s.flush()?;
            served.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let body: u64 = path
            .strip_prefix("/bulk/")
            .and_then(|n| n.parse().ok())
            .unwrap_or(3);
        let mut resp =
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {body}\r\n");
        if close {
            resp.push_str("Connection: close\r\n");
        }
        resp.push_str("\r\n");
        if body == 3 {
            resp.push_str("ok\n");
            s.write_all(resp.as_bytes())?;
        } else {
            s.write_all(resp.as_bytes())?;
            let chunk = vec![0u8; 256 * 1024];
            let mut left = body;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n])?;
                left -= n as u64;
            }
        }
        s.flush()?;
        served.fetch_add(1, Ordering::Relaxed);
        buf.copy_within(end..have, 0);
        have -= end;
        if close {
            return Ok(());
        }
    }
}

/// A request's body: `Some(None)` when chunked, `Some(Some(n))` with a
/// length, `None` without a body. `head` is lower case.
fn body_length(head: &str) -> Option<Option<u64>> {
    if head.contains("\r\ntransfer-encoding: chunked") {
        return Some(None);
    }
    head.split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .map(Some)
}

/// Reads a request body from `s` and drops it, starting with what is
/// already in `buf[pos..len]`.
struct Discard<'a, S> {
    s: &'a mut S,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl<S: Read> Discard<'_, S> {
    /// The body's length in bytes (chunked: without the framing).
    fn body(&mut self, len: Option<u64>) -> io::Result<u64> {
        if let Some(n) = len {
            self.skip(n)?;
            return Ok(n);
        }
        let mut total = 0;
        loop {
            let line = self.line()?;
            let hex = line.split(';').next().unwrap_or("").trim();
            let n = u64::from_str_radix(hex, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
            if n == 0 {
                // Trailers, up to the empty line.
                while !self.line()?.is_empty() {}
                return Ok(total);
            }
            self.skip(n)?;
            if !self.line()?.is_empty() {
                return Err(io::Error::other("chunk longer than its size"));
            }
            total += n;
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.pos == self.len {
            self.pos = 0;
            self.len = self.s.read(&mut self.buf)?;
            if self.len == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// One line, without its CRLF.
    fn line(&mut self) -> io::Result<String> {
        let mut l = Vec::new();
        loop {
            self.fill()?;
            let b = self.buf[self.pos];
            self.pos += 1;
            if b == b'\n' {
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                return Ok(String::from_utf8_lossy(&l).into_owned());
            }
            if l.len() > 1024 {
                return Err(io::Error::other("chunk line too long"));
            }
            l.push(b);
        }
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            self.fill()?;
            let k = n.min((self.len - self.pos) as u64);
            self.pos += k as usize;
            n -= k;
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Client: the tests' HTTP client (hyper over tokio-rustls), each load thread
// driving it on a runtime of its own so sockets stay in its namespace.

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the load thread");
}

/// One request on a new connection: connect, (TLS handshake,) GET, read
/// the whole response. Returns the body's length.
pub fn request(to: SocketAddr, tls: Option<&Arc<ClientConfig>>, path: &str) -> io::Result<u64> {
    RUNTIME.with(|rt| rt.block_on(fetch(to, tls, path, None)))
}

/// [`request`]; with `until`, stops once that much time passed (for bulk
/// transfers) and returns what arrived by then.
async fn fetch(
    to: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    path: &str,
    until: Option<Instant>,
) -> io::Result<u64> {
    let timed_out =
        |what: &str| io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"));
    let s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| timed_out("connect"))??;
    s.set_nodelay(true)?;
    let req = https::request(Method::GET, SNI, path, https::empty())?;
    // Reads of up to 256 KiB, as the bench's client always made: the
    // client must not be what limits a bulk download.
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.read_buf_exact_size(Some(256 * 1024));
    // Each connection stays open (`_conn`) until its body is read.
    match tls {
        Some(cfg) => {
            let name = ServerName::try_from(SNI).map_err(io::Error::other)?;
            let t = TlsConnector::from(cfg.clone()).connect(name, s).await?;
            let (response, _conn) = https::send_on(&builder, t, req).await?;
            read_body(response, until).await
        }
        None => {
            let (response, _conn) = https::send_on(&builder, s, req).await?;
            read_body(response, until).await
        }
    }
}

/// Reads a 200 answer's body to its end, or until `until`; its length.
async fn read_body(
    response: hyper::Response<hyper::body::Incoming>,
    until: Option<Instant>,
) -> io::Result<u64> {
    if response.status() != StatusCode::OK {
        return Err(io::Error::other(format!(
            "bad response: {}",
            response.status()
        )));
    }
    let mut body = response.into_body();
    let mut got = 0u64;
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(got);
        }
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timed out"))?;
        match frame {
            None => return Ok(got),
            Some(frame) => {
                if let Ok(data) = frame.map_err(https::hyper_io)?.into_data() {
                    got += data.len() as u64;
                }
            }
        }
    }
}

/// The outcome of a load phase.
#[derive(Default, Clone, Copy)]
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

/// `conc` connections at a time, each a new connection with one request,
/// for `dur` (or `max` requests).
pub fn closed_loop(
    ns: &str,
    group: Option<Arc<CpuGroup>>,
    to: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    conc: usize,
    dur: Duration,
    max: u64,
) -> Outcome {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            let (ns, group, tls, ok, errors) = (
                ns.to_string(),
                group.clone(),
                tls.clone(),
                ok.clone(),
                errors.clone(),
            );
            thread::spawn(move || {
                enter(&ns, group.as_deref());
                while Instant::now() < deadline && ok.load(Ordering::Relaxed) < max {
                    match request(to, tls.as_ref(), "/") {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    Outcome {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Requests (each a new connection) started at a fixed rate whatever the
/// responses do (open loop), for `dur`. Latency runs from the time a
/// request was due, so a stall counts for every request it delays.
/// Returns the latencies in microseconds of the requests that succeeded.
pub fn open_loop(
    ns: &str,
    group: Option<Arc<CpuGroup>>,
    to: SocketAddr,
    rate: u32,
    dur: Duration,
) -> (Vec<f64>, Outcome) {
    let n = (rate as f64 * dur.as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let next = Arc::new(Mutex::new(0u64));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let give_up = start + dur + Duration::from_secs(10);
    let workers = 48;
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (ns, group, next, lat, errors) = (
                ns.to_string(),
                group.clone(),
                next.clone(),
                lat.clone(),
                errors.clone(),
            );
            thread::spawn(move || {
                enter(&ns, group.as_deref());
                // Wake up on time, not up to 50 us late.
                // SAFETY: PR_SET_TIMERSLACK takes an integer, no pointers.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
                loop {
                    let i = {
                        let mut g = next.lock().unwrap();
                        let i = *g;
                        *g += 1;
                        i
                    };
                    if i >= n || Instant::now() > give_up {
                        break;
                    }
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    match request(to, None, "/") {
                        Ok(_) => lat.lock().unwrap().push(due.elapsed().as_secs_f64() * 1e6),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    let out = Outcome {
        ok: lat.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
    };
    (lat, out)
}

/// One connection downloading for `dur`: bytes per second.
pub fn bulk(ns: &str, group: Option<Arc<CpuGroup>>, to: SocketAddr, dur: Duration) -> (f64, u64) {
    let ns = ns.to_string();
    thread::spawn(move || {
        enter(&ns, group.as_deref());
        // Far more than can arrive in time: the reader stops on the clock.
        let path = format!("/bulk/{}", 1u64 << 40);
        let start = Instant::now();
        let got = RUNTIME
            .with(|rt| rt.block_on(fetch(to, None, &path, Some(start + dur))))
            .unwrap_or(0);
        let secs = start.elapsed().as_secs_f64();
        (got as f64 / secs, got)
    })
    .join()
    .unwrap()
}

/// One connection uploading for `dur`: a POST whose chunked body is sent
/// until then, timed until the backend's answer, which says how many
/// bytes it read. Bytes per second and bytes, as the backend counted them.
pub fn upload(ns: &str, group: Option<Arc<CpuGroup>>, to: SocketAddr, dur: Duration) -> (f64, u64) {
    let ns = ns.to_string();
    thread::spawn(move || {
        enter(&ns, group.as_deref());
        let start = Instant::now();
        match send_upload(to, start + dur) {
            Ok(got) => (got as f64 / start.elapsed().as_secs_f64(), got),
            Err(_) => (0.0, 0),
        }
    })
    .join()
    .unwrap()
}

fn send_upload(to: SocketAddr, until: Instant) -> io::Result<u64> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {SNI}\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes())?;
    // One write per chunk of 256 KiB, framing included, as the download's
    // reads: the client must not be what limits it.
    const CHUNK: usize = 256 * 1024;
    let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
    chunk.resize(chunk.len() + CHUNK, 0);
    chunk.extend_from_slice(b"\r\n");
    let mut sent = 0u64;
    while Instant::now() < until {
        s.write_all(&chunk)?;
        sent += CHUNK as u64;
    }
    s.write_all(b"0\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let (status, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !status.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("bad response: {status}")));
    }
    let got: u64 = body
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("bad upload answer {body:?}")))?;
    if got != sent {
        return Err(io::Error::other(format!(
            "the backend read {got} bytes of {sent}"
        )));
    }
    Ok(got)
}

/// Waits until a TCP connection to `to` from namespace `ns` succeeds.
pub fn wait_listening(ns: &str, to: SocketAddr, timeout: Duration) -> bool {
    let ns = ns.to_string();
    netns::within(&ns, move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    })
}
