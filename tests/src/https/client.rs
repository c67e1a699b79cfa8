//! The test client: HTTPS requests and streams (hyper over tokio-rustls)
//! that name the backend by the certificate it showed, and UDP flows.

use std::{
    collections::HashMap,
    io,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, channel::Channel, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    client::conn::http1::{self, Parts},
    header::{CONNECTION, HOST},
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::watch,
    task::JoinHandle,
};
use tokio_rustls::TlsConnector;

use super::{Identity, Lines, SERVICE_NAME, hyper_io, server::chunk_line, timed_out, until};

/// Where a client connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Handshake,
    Exchange,
}

/// A failed request, with the backend when the handshake got far enough to
/// show its certificate.
#[derive(Clone, Debug)]
pub struct Failure {
    pub stage: Stage,
    pub backend: Option<String>,
    pub kind: io::ErrorKind,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} failed ({:?}) on {}: {}",
            self.stage,
            self.kind,
            self.backend.as_deref().unwrap_or("an unknown backend"),
            self.message
        )
    }
}

impl Failure {
    fn new(stage: Stage, backend: Option<&str>, e: io::Error) -> Failure {
        Failure {
            stage,
            backend: backend.map(str::to_string),
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    /// The peer reset the connection or closed it without TLS close_notify.
    pub fn is_reset(&self) -> bool {
        matches!(
            self.kind,
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
    }
}

/// One answered request.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The name in the certificate the client saw.
    pub cert: String,
    /// The response body (the backend's name for plain requests).
    pub body: String,
    /// The client's address of the connection.
    pub local: SocketAddr,
}

pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
/// A request body: empty, or a stream of lines (see [`Stream`]).
pub type RequestBody = BoxBody<Bytes, io::Error>;

/// TLS client settings and the names of the certificates it may see.
#[derive(Clone)]
pub struct ClientTls {
    pub(super) connector: TlsConnector,
    pub(super) names: Arc<Mutex<HashMap<Vec<u8>, String>>>,
}

impl ClientTls {
    /// Names a certificate the client may see from now on.
    pub fn learn(&self, identity: &Identity) {
        self.names
            .lock()
            .unwrap()
            .insert(identity.cert.to_vec(), identity.name.clone());
    }

    /// TCP connect (from `from_port` if given), TLS handshake with SNI
    /// [`SERVICE_NAME`], and the name of the certificate shown. Sockets are
    /// made in the namespace of the runtime this runs on.
    pub async fn connect(
        &self,
        to: SocketAddr,
        from_port: Option<u16>,
    ) -> Result<(ClientStream, String, SocketAddr), Failure> {
        let tcp = async {
            let sock = if to.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(port) = from_port {
                let any: SocketAddr = if to.is_ipv4() {
                    ([0, 0, 0, 0], port).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, port).into()
                };
                // A chosen port is used again by later connections of the
                // same test (the same 5-tuple through another node): close
                // with RST, so no TIME_WAIT holds the port or the 4-tuple.
                sock.set_reuseaddr(true)?;
                // Linger 0 never blocks: close sends RST at once.
                socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO))?;
                sock.bind(any)?;
            }
            sock.connect(to).await
        };
        let stream = tokio::time::timeout(Duration::from_secs(3), tcp)
            .await
            .map_err(|_| Failure::new(Stage::Connect, None, timed_out("connect")))?
            .map_err(|e| Failure::new(Stage::Connect, None, e))?;
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .map_err(|e| Failure::new(Stage::Connect, None, e))?;
        let name = ServerName::try_from(SERVICE_NAME).expect("valid name");
        let tls =
            tokio::time::timeout(Duration::from_secs(5), self.connector.connect(name, stream))
                .await
                .map_err(|_| Failure::new(Stage::Handshake, None, timed_out("TLS handshake")))?
                .map_err(|e| Failure::new(Stage::Handshake, None, e))?;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let backend = self.names.lock().unwrap().get(&cert).cloned();
        let backend = backend.ok_or_else(|| {
            Failure::new(
                Stage::Handshake,
                None,
                io::Error::other("the certificate belongs to no backend of this test"),
            )
        })?;
        Ok((tls, backend, local))
    }

    /// `n` GETs of `/`, each over a new connection (so a new source port),
    /// `workers` at a time; the results in no particular order. Runs on the
    /// caller's runtime, so in its namespace.
    pub async fn get_many(
        &self,
        to: SocketAddr,
        n: usize,
        workers: usize,
    ) -> Vec<Result<Reply, Failure>> {
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let tls = self.clone();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for _ in (w..n).step_by(workers) {
                        out.push(tls.get(to, "/", None).await);
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for t in tasks {
            all.extend(t.await.expect("a client task panicked"));
        }
        all
    }

    /// One `GET path` over a new connection; the whole answer is read, up to
    /// a clean TLS close.
    pub async fn get(
        &self,
        to: SocketAddr,
        path: &str,
        from_port: Option<u16>,
    ) -> Result<Reply, Failure> {
        let (tls, cert, local) = self.connect(to, from_port).await?;
        let fail = |e: io::Error| Failure::new(Stage::Exchange, Some(&cert), e);
        let request = request(Method::GET, SERVICE_NAME, path, empty()).map_err(fail)?;
        let exchange = async {
            let (response, conn) = send(tls, request).await?;
            let body = ok_response(response)?
                .into_body()
                .collect()
                .await
                .map_err(hyper_io)?
                .to_bytes();
            closed_cleanly(conn).await?;
            io::Result::Ok(body)
        };
        let body = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| fail(timed_out("request")))?
            .map_err(fail)?;
        Ok(Reply {
            cert,
            body: String::from_utf8_lossy(&body).trim_end().to_string(),
            local,
        })
    }

    /// Opens `/stream`: `chunks` lines, one every `every`; `chunks = 0`
    /// streams until [`Stream::finish`] is told to stop.
    pub async fn open_stream(
        &self,
        to: SocketAddr,
        every: Duration,
        chunks: u64,
    ) -> Result<Stream, Failure> {
        self.open_stream_sized(to, every, chunks, 0).await
    }

    /// [`ClientTls::open_stream`] with each chunk padded to `size` bytes:
    /// `chunks * size` bytes at `size` per `every` (0: lines unpadded).
    pub async fn open_stream_sized(
        &self,
        to: SocketAddr,
        every: Duration,
        chunks: u64,
        size: usize,
    ) -> Result<Stream, Failure> {
        let (tls, backend, local) = self.connect(to, None).await?;
        let fail = |e: io::Error| Failure::new(Stage::Exchange, Some(&backend), e);
        let path = format!(
            "/stream?every={}&chunks={chunks}&size={size}",
            every.as_millis()
        );
        // An open-ended stream's request body carries the client's lines.
        let (pings, body) = if chunks == 0 {
            let (tx, body) = Channel::<Bytes, io::Error>::new(4);
            (Some(tx), body.boxed())
        } else {
            (None, empty())
        };
        let method = if chunks == 0 {
            Method::POST
        } else {
            Method::GET
        };
        let request = request(method, SERVICE_NAME, &path, body).map_err(fail)?;
        let (response, conn) = tokio::time::timeout(Duration::from_secs(10), send(tls, request))
            .await
            .map_err(|_| fail(timed_out("stream request")))?
            .map_err(fail)?;
        let response = ok_response(response).map_err(fail)?;
        Ok(Stream {
            backend,
            local,
            chunks,
            size,
            lines: Lines::new(response.into_body()),
            pings,
            conn: Some(conn),
        })
    }
}

/// An empty request body.
pub fn empty() -> RequestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A request for `path` on `host`, `Connection: close`: every request of
/// the tests and the bench has a connection of its own.
pub fn request(
    method: Method,
    host: &str,
    path: &str,
    body: RequestBody,
) -> io::Result<Request<RequestBody>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host)
        .header(CONNECTION, "close")
        .body(body)
        .map_err(io::Error::other)
}

/// Sends `request` on a new HTTP/1 connection over `io` (TLS or plain
/// TCP); the connection runs on a task of its own until the answer is
/// read, and hands the socket back instead of closing it.
pub async fn send<S>(
    io: S,
    request: Request<RequestBody>,
) -> io::Result<(Response<Incoming>, Connection<S>)>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    send_on(&http1::Builder::new(), io, request).await
}

/// [`send`] on a connection set up by `builder` (the bench reads in large
/// fixed-size buffers).
pub async fn send_on<S>(
    builder: &http1::Builder,
    io: S,
    request: Request<RequestBody>,
) -> io::Result<(Response<Incoming>, Connection<S>)>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = builder
        .handshake(TokioIo::new(io))
        .await
        .map_err(hyper_io)?;
    let conn = Connection(tokio::spawn(conn.without_shutdown()));
    let response = sender.send_request(request).await.map_err(hyper_io)?;
    Ok((response, conn))
}

fn ok_response(response: Response<Incoming>) -> io::Result<Response<Incoming>> {
    if response.status() == StatusCode::OK {
        Ok(response)
    } else {
        Err(io::Error::other(format!("answer {}", response.status())))
    }
}

/// A client connection's task; aborted when dropped.
pub struct Connection<S>(JoinHandle<hyper::Result<Parts<TokioIo<S>>>>);

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// After the answer: nothing may follow but the server's clean TLS close
/// (close_notify, then FIN), which tells a complete answer from a cut one.
async fn closed_cleanly(mut conn: Connection<ClientStream>) -> io::Result<()> {
    let parts = (&mut conn.0)
        .await
        .map_err(io::Error::other)?
        .map_err(hyper_io)?;
    let mut rest = parts.read_buf.to_vec();
    let mut tls = parts.io.into_inner();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
        .await
        .map_err(|_| timed_out("waiting for the close"))??;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} bytes after the end",
            rest.len()
        )))
    }
}

/// An open streaming response.
pub struct Stream {
    /// The backend whose certificate the client saw.
    pub backend: String,
    /// The client's address of the connection.
    pub local: SocketAddr,
    chunks: u64,
    size: usize,
    lines: Lines,
    /// The request body of an open-ended stream.
    pings: Option<http_body_util::channel::Sender<Bytes, io::Error>>,
    conn: Option<Connection<ClientStream>>,
}

impl Stream {
    /// Reads the stream to its end and checks it: every chunk, in order,
    /// from the backend of the certificate, then `end <n>` and a clean TLS
    /// close. For an open-ended stream the client writes a line every
    /// `ping` (so the connection keeps sending packets towards the service)
    /// until `stop` turns true, then asks the server to stop. Returns the
    /// chunks received.
    pub async fn finish(
        self,
        ping: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<u64, Failure> {
        let Stream {
            backend,
            chunks,
            size,
            mut lines,
            pings,
            mut conn,
            ..
        } = self;
        let open_ended = chunks == 0;
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the connection is gone");
        let pinger = async {
            let Some(mut tx) = pings else {
                return io::Result::Ok(());
            };
            let mut tick = tokio::time::interval(ping);
            loop {
                tokio::select! {
                    _ = until(&mut stop) => break,
                    _ = tick.tick() => {
                        tx.send_data(Bytes::from_static(b"ping\n")).await.map_err(|_| gone())?;
                    }
                }
            }
            // The request body ends after `stop`.
            tx.send_data(Bytes::from_static(b"stop\n"))
                .await
                .map_err(|_| gone())
        };
        let reader = async {
            let mut got = 0u64;
            loop {
                let line = tokio::time::timeout(Duration::from_secs(10), lines.next())
                    .await
                    .map_err(|_| timed_out("waiting 10 s for a chunk"))??;
                let Some(line) = line else {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stream ended after {got} chunks without its end line"),
                    ));
                };
                let l = line.trim_end();
                if let Some(total) = l.strip_prefix("end ") {
                    let total: u64 = total.parse().map_err(|_| io::Error::other(l.to_string()))?;
                    if total != got || (!open_ended && total != chunks) {
                        return Err(io::Error::other(format!(
                            "server sent {total} chunks, client got {got} (asked {chunks})"
                        )));
                    }
                    break;
                }
                if line != chunk_line(&backend, got, size) {
                    return Err(io::Error::other(format!(
                        "chunk {got}: expected {backend:?}, got {:?}",
                        truncated(l)
                    )));
                }
                got += 1;
            }
            // Nothing may follow but a clean close.
            if let Some(line) = lines.next().await? {
                return Err(io::Error::other(format!("{line:?} after the end")));
            }
            if let Some(conn) = conn.take() {
                closed_cleanly(conn).await?;
            }
            Ok(got)
        };
        let (_, got) = tokio::try_join!(pinger, reader)
            .map_err(|e| Failure::new(Stage::Exchange, Some(&backend), e))?;
        Ok(got)
    }
}

/// A line shortened for an error message (chunks may be padded).
fn truncated(l: &str) -> &str {
    l.get(..l.len().min(80)).unwrap_or(l)
}

/// How a stream of known length went, read by [`Stream::run_to_end`].
#[derive(Clone, Debug)]
pub struct StreamRun {
    /// The backend whose certificate the client saw.
    pub backend: String,
    /// The client's address of the connection.
    pub local: SocketAddr,
    /// Chunks received in order from that backend.
    pub chunks: u64,
    /// Body bytes received, the end line included.
    pub bytes: u64,
    /// The longest wait for a line (the first one included).
    pub longest_stall: Duration,
    /// The end line came, its count matched, and the connection closed
    /// cleanly (TLS close_notify, then FIN).
    pub whole: bool,
    /// What broke it, when it did not end whole.
    pub failure: Option<Failure>,
}

impl Stream {
    /// Reads a stream of known length (`chunks > 0`) to its end, never
    /// failing: what arrived, the longest gap between lines, and whether it
    /// ended whole. A line that does not come within `patience` breaks it.
    pub async fn run_to_end(self, patience: Duration) -> StreamRun {
        let Stream {
            backend,
            local,
            chunks,
            size,
            mut lines,
            mut conn,
            ..
        } = self;
        let mut run = StreamRun {
            backend: backend.clone(),
            local,
            chunks: 0,
            bytes: 0,
            longest_stall: Duration::ZERO,
            whole: false,
            failure: None,
        };
        let result = async {
            let mut last = tokio::time::Instant::now();
            loop {
                let line = tokio::time::timeout(patience, lines.next())
                    .await
                    .map_err(|_| timed_out("waiting for a chunk"))??;
                let now = tokio::time::Instant::now();
                run.longest_stall = run.longest_stall.max(now - last);
                last = now;
                let Some(line) = line else {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "stream ended after {} chunks without its end line",
                            run.chunks
                        ),
                    ));
                };
                run.bytes += line.len() as u64;
                let l = line.trim_end();
                if let Some(total) = l.strip_prefix("end ") {
                    if total.parse() != Ok(run.chunks) || run.chunks != chunks {
                        return Err(io::Error::other(format!(
                            "server ended with {l:?}, client got {} (asked {chunks})",
                            run.chunks
                        )));
                    }
                    break;
                }
                if line != chunk_line(&backend, run.chunks, size) {
                    return Err(io::Error::other(format!(
                        "chunk {}: expected {backend:?}, got {:?}",
                        run.chunks,
                        truncated(l)
                    )));
                }
                run.chunks += 1;
            }
            if let Some(line) = lines.next().await? {
                return Err(io::Error::other(format!(
                    "{:?} after the end",
                    truncated(&line)
                )));
            }
            if let Some(conn) = conn.take() {
                closed_cleanly(conn).await?;
            }
            io::Result::Ok(())
        }
        .await;
        match result {
            Ok(()) => run.whole = true,
            Err(e) => run.failure = Some(Failure::new(Stage::Exchange, Some(&backend), e)),
        }
        run
    }
}

/// One UDP flow: a socket connected to the service, from one source port.
pub struct UdpFlow {
    sock: UdpSocket,
    tag: String,
    sent: usize,
}

impl UdpFlow {
    /// Opens the flow (from `from_port` if given; made in the namespace of
    /// the runtime this runs on).
    pub async fn open(to: SocketAddr, tag: &str, from_port: Option<u16>) -> io::Result<UdpFlow> {
        let any: SocketAddr = match (to.is_ipv4(), from_port.unwrap_or(0)) {
            (true, p) => ([0, 0, 0, 0], p).into(),
            (false, p) => (Ipv6Addr::UNSPECIFIED, p).into(),
        };
        let sock = UdpSocket::bind(any).await?;
        sock.connect(to).await?;
        Ok(UdpFlow {
            sock,
            tag: tag.to_string(),
            sent: 0,
        })
    }

    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Sends `n` datagrams, each answered before the next is sent (up to 3
    /// tries each), and returns the backend named in each answer. Fails on
    /// a datagram that got no answer.
    pub async fn exchange(&mut self, n: usize) -> io::Result<Vec<String>> {
        let mut names = Vec::with_capacity(n);
        let mut buf = vec![0u8; 2048];
        for _ in 0..n {
            let payload = format!("{} {}", self.tag, self.sent);
            self.sent += 1;
            let mut answered = None;
            'tries: for _ in 0..3 {
                self.sock.send(payload.as_bytes()).await?;
                let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(r) = tokio::time::timeout_at(deadline, self.sock.recv(&mut buf)).await
                {
                    let text = String::from_utf8_lossy(&buf[..r?]).into_owned();
                    // Late answers to an earlier datagram carry another payload.
                    if let Some(name) = text.strip_suffix(&format!(" {payload}")) {
                        answered = Some(name.to_string());
                        break 'tries;
                    }
                }
            }
            names.push(answered.ok_or_else(|| timed_out(&format!("datagram {payload:?}")))?);
        }
        Ok(names)
    }
}
