//! Real HTTPS (and UDP echo) backends and an HTTPS client for end-to-end
//! tests. Certificates come from a CA made at test time, one per backend, so
//! the client can tell from the certificate alone which backend it reached:
//! proof that the balancer passes TLS through instead of terminating it.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::topology::NsRuntime;

/// The name every backend certificate carries besides its own, and the SNI
/// the client sends: what a public service name would be.
pub const SERVICE_NAME: &str = "lb.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority made for one test, and the backend identities it
/// signs.
pub struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: CertificateDer<'static>,
    ca_pem: String,
}

/// One backend's certificate and key.
#[derive(Clone)]
pub struct Identity {
    /// The certificate's common name, e.g. `backend-8001.test`.
    pub name: String,
    pub cert: CertificateDer<'static>,
    key: Arc<Vec<u8>>,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lb test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        Pki {
            ca: cert.der().clone(),
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// The CA certificate in PEM, for `curl --cacert`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A certificate for `name` (its CN and first SAN), also valid for
    /// [`SERVICE_NAME`].
    pub fn issue(&self, name: &str) -> Identity {
        let key = rcgen::KeyPair::generate().expect("backend key");
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string(), SERVICE_NAME.to_string()])
                .expect("backend params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("backend certificate");
        Identity {
            name: name.to_string(),
            cert: cert.der().clone(),
            key: Arc::new(key.serialize_der()),
        }
    }

    /// A client that trusts only this CA and names each certificate it
    /// sees by the identities given.
    pub fn client(&self, identities: &[&Identity]) -> ClientTls {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .expect("CA certificate as a root");
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection shows its certificate: no session resumption.
        config.resumption = Resumption::disabled();
        ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            names: Arc::new(Mutex::new(
                identities
                    .iter()
                    .map(|i| (i.cert.to_vec(), i.name.clone()))
                    .collect(),
            )),
        }
    }
}

impl Identity {
    fn server_config(&self) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.as_ref().clone()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .expect("backend certificate and key");
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------
// Backends.

/// What a backend saw. Connections from loopback are the health checker's
/// and are counted apart from the client's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// TCP connections accepted from the client (through the balancer).
    pub accepted: u64,
    /// TCP connections accepted from loopback (health checks).
    pub health_accepted: u64,
    /// Responses completed to the client (short ones and streams).
    pub requests: u64,
    /// Streams completed to the client.
    pub streams: u64,
    /// Client connections that ended in an error on this side.
    pub errors: u64,
    /// UDP datagrams from the client.
    pub datagrams: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    health_accepted: AtomicU64,
    requests: AtomicU64,
    streams: AtomicU64,
    errors: AtomicU64,
    datagrams: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Addresses of the client connections (not loopback) accepted.
    peers: Mutex<HashSet<IpAddr>>,
}

/// Counts a live socket or task until dropped.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(n: &Arc<AtomicUsize>) -> Live {
        n.fetch_add(1, Ordering::SeqCst);
        Live(n.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTPS server and a UDP echo server on `[::]:port` (dual stack) of the
/// balancer's namespace. Paths:
/// - `/healthz`: `ok`;
/// - `/stream?every=MS&chunks=N`: `N` lines `<name> <i>`, one every `MS`
///   ms, then `end <N>`; with `chunks=0` it streams until the client sends
///   a line `stop` (other client lines are ignored);
/// - anything else: the backend's name.
///
/// UDP datagrams are answered with `<name> <datagram>`.
pub struct Backend {
    /// `backend-<port>.test`, also the certificate's name.
    pub name: String,
    pub port: u16,
    pub identity: Identity,
    counters: Arc<Counters>,
    kill: watch::Sender<bool>,
    live: Arc<AtomicUsize>,
}

impl Backend {
    pub fn start(rt: &NsRuntime, port: u16, identity: Identity) -> Backend {
        let name = identity.name.clone();
        let counters = Arc::new(Counters::default());
        let (kill, _) = watch::channel(false);
        let live = Arc::new(AtomicUsize::new(0));
        let acceptor = TlsAcceptor::from(identity.server_config());
        let ctx = Arc::new(ServerCtx {
            name: name.clone(),
            counters: counters.clone(),
            kill: kill.clone(),
            live: live.clone(),
        });
        let (listener, udp) = rt
            .run(async move {
                let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                let sock = TcpSocket::new_v6()?;
                set_v6only(&sock, false)?;
                sock.set_reuseaddr(true)?;
                sock.bind(addr)?;
                let listener = sock.listen(1024)?;
                let udp = UdpSocket::bind(addr).await?;
                io::Result::Ok((listener, udp))
            })
            .unwrap_or_else(|e| panic!("backend {name} cannot listen on port {port}: {e}"));
        let c = ctx.clone();
        let guard = Live::new(&live);
        rt.spawn(async move {
            let _guard = guard;
            let mut killed = c.kill.subscribe();
            loop {
                tokio::select! {
                    _ = until(&mut killed) => return,
                    r = listener.accept() => match r {
                        Ok((stream, peer)) => {
                            let guard = Live::new(&c.live);
                            tokio::spawn(serve(c.clone(), acceptor.clone(), stream, peer, guard));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    },
                }
            }
        });
        let c = ctx;
        let guard = Live::new(&live);
        rt.spawn(async move {
            let _guard = guard;
            let mut killed = c.kill.subscribe();
            let mut buf = vec![0u8; 2048];
            loop {
                tokio::select! {
                    _ = until(&mut killed) => return,
                    r = udp.recv_from(&mut buf) => {
                        let Ok((n, peer)) = r else { continue };
                        if !peer.ip().to_canonical().is_loopback() {
                            c.counters.datagrams.fetch_add(1, Ordering::Relaxed);
                        }
                        let mut reply = format!("{} ", c.name).into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = udp.send_to(&reply, peer).await;
                    }
                }
            }
        });
        Backend {
            name: identity.name.clone(),
            port,
            identity,
            counters,
            kill,
            live,
        }
    }

    pub fn stats(&self) -> BackendStats {
        let c = &self.counters;
        BackendStats {
            accepted: c.accepted.load(Ordering::SeqCst),
            health_accepted: c.health_accepted.load(Ordering::SeqCst),
            requests: c.requests.load(Ordering::SeqCst),
            streams: c.streams.load(Ordering::SeqCst),
            errors: c.errors.load(Ordering::SeqCst),
            datagrams: c.datagrams.load(Ordering::SeqCst),
        }
    }

    /// The client addresses (IPv4-mapped ones as IPv4) of the TCP
    /// connections accepted so far, health checks from loopback left out:
    /// what the backend saw as the peer, e.g. to check that the balancer
    /// preserved the client's address.
    pub fn peers(&self) -> HashSet<IpAddr> {
        self.counters.peers.lock().unwrap().clone()
    }

    /// The last error a client connection ended with, on this side.
    pub fn last_error(&self) -> Option<String> {
        self.counters.last_error.lock().unwrap().clone()
    }

    /// Simulates a crash: stops accepting and closes every socket at once
    /// (TCP and UDP), and returns when they are all closed.
    pub fn kill(&self) {
        self.kill.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.live.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "{}: sockets still open 5 s after the kill",
                self.name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn is_killed(&self) -> bool {
        *self.kill.borrow()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill.send_replace(true);
    }
}

/// Waits until the flag turns true (or its sender is gone).
async fn until(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

fn set_v6only(sock: &TcpSocket, only: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = only.into();
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct ServerCtx {
    name: String,
    counters: Arc<Counters>,
    kill: watch::Sender<bool>,
    live: Arc<AtomicUsize>,
}

async fn serve(
    ctx: Arc<ServerCtx>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    guard: Live,
) {
    let _guard = guard;
    let from_client = !peer.ip().to_canonical().is_loopback();
    let c = &ctx.counters;
    if from_client {
        c.peers.lock().unwrap().insert(peer.ip().to_canonical());
        c.accepted.fetch_add(1, Ordering::SeqCst);
    } else {
        c.health_accepted.fetch_add(1, Ordering::SeqCst);
    }
    let mut killed = ctx.kill.subscribe();
    if *killed.borrow() {
        return;
    }
    let result = tokio::select! {
        // A crash: the socket is dropped wherever it was.
        _ = until(&mut killed) => return,
        r = tokio::time::timeout(Duration::from_secs(120), exchange(&ctx, acceptor, stream)) => {
            r.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connection older than 120 s")))
        }
    };
    if from_client && let Err(e) = result {
        c.errors.fetch_add(1, Ordering::SeqCst);
        *c.last_error.lock().unwrap() = Some(format!("{peer}: {e}"));
    }
}

/// Reads an HTTP/1 request head and returns its path.
async fn read_head<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> io::Result<String> {
    let mut head = Vec::new();
    let mut path = None;
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_until(b'\n', &mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request within 10 s"))??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the request ended",
            ));
        }
        head.extend_from_slice(&line);
        if head.len() > 8192 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head over 8 KiB",
            ));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if path.is_none() {
            let mut parts = text.split(' ');
            match (parts.next(), parts.next()) {
                (Some(_method), Some(p)) => path = Some(p.to_string()),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad request line {text:?}"),
                    ));
                }
            }
        } else if text.is_empty() {
            return Ok(path.unwrap_or_default());
        }
    }
}

fn query(path: &str, key: &str) -> Option<u64> {
    let q = path.split_once('?')?.1;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

async fn exchange(ctx: &ServerCtx, acceptor: TlsAcceptor, stream: TcpStream) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let from_client = stream
        .peer_addr()
        .map(|p| !p.ip().to_canonical().is_loopback())
        .unwrap_or(false);
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
        .await
        .map_err(|_| timed_out("TLS handshake"))??;
    let (r, mut w) = tokio::io::split(tls);
    let mut r = BufReader::new(r);
    let path = read_head(&mut r).await?;
    let c = &ctx.counters;
    match path.split('?').next().unwrap_or("") {
        "/healthz" => respond(&mut w, "ok\n").await?,
        "/stream" => {
            let every = Duration::from_millis(query(&path, "every").unwrap_or(100).max(1));
            let chunks = query(&path, "chunks").unwrap_or(10);
            w.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
            )
            .await?;
            w.flush().await?;
            let sent = if chunks == 0 {
                let (stop_tx, stop_rx) = watch::channel(false);
                let reader = async move {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await? == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the client left the stream without saying stop",
                            ));
                        }
                        if line.trim() == "stop" {
                            stop_tx.send_replace(true);
                            return Ok(());
                        }
                    }
                };
                let writer = chunk_loop(&ctx.name, &mut w, every, None, Some(stop_rx));
                tokio::try_join!(reader, writer)?.1
            } else {
                chunk_loop(&ctx.name, &mut w, every, Some(chunks), None).await?
            };
            w.write_all(format!("end {sent}\n").as_bytes()).await?;
            if from_client {
                c.streams.fetch_add(1, Ordering::SeqCst);
            }
        }
        _ => respond(&mut w, &format!("{}\n", ctx.name)).await?,
    }
    // Counted before the close, which is what completes the answer for the
    // client: a client that has its answer finds it counted.
    if from_client {
        c.requests.fetch_add(1, Ordering::SeqCst);
    }
    // close_notify, then FIN: the client can tell a complete answer from a
    // cut one.
    w.shutdown().await
}

/// Writes `<name> <i>` lines every `every` until `chunks` are sent or
/// `stop` turns true; returns how many were sent.
async fn chunk_loop<W: AsyncWrite + Unpin>(
    name: &str,
    w: &mut W,
    every: Duration,
    chunks: Option<u64>,
    mut stop: Option<watch::Receiver<bool>>,
) -> io::Result<u64> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    loop {
        if chunks.is_some_and(|n| sent >= n) {
            return Ok(sent);
        }
        let stopped = async {
            match stop.as_mut() {
                Some(rx) => {
                    until(rx).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = stopped => return Ok(sent),
            _ = tick.tick() => {
                w.write_all(format!("{name} {sent}\n").as_bytes()).await?;
                w.flush().await?;
                sent += 1;
            }
        }
    }
}

async fn respond<W: AsyncWrite + Unpin>(w: &mut W, body: &str) -> io::Result<()> {
    let msg = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    w.write_all(msg.as_bytes()).await?;
    w.flush().await
}

// ---------------------------------------------------------------------------
// The client.

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

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS client settings and the names of the certificates it may see.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    names: Arc<Mutex<HashMap<Vec<u8>, String>>>,
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

    /// One `GET path` over a new connection; the whole answer is read, up to
    /// a clean TLS close.
    pub async fn get(
        &self,
        to: SocketAddr,
        path: &str,
        from_port: Option<u16>,
    ) -> Result<Reply, Failure> {
        let (mut tls, cert, local) = self.connect(to, from_port).await?;
        let fail = |e: io::Error| Failure::new(Stage::Exchange, Some(&cert), e);
        let exchange = async {
            tls.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {SERVICE_NAME}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            tls.flush().await?;
            let mut answer = Vec::new();
            tls.read_to_end(&mut answer).await?;
            io::Result::Ok(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| fail(timed_out("request")))?
            .map_err(fail)?;
        let text = String::from_utf8_lossy(&answer);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Err(fail(io::Error::other(format!(
                "no response head in {text:?}"
            ))));
        };
        if !head.starts_with("HTTP/1.1 200 ") {
            return Err(fail(io::Error::other(format!("answer {head:?}"))));
        }
        Ok(Reply {
            cert,
            body: body.trim_end().to_string(),
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
        let (tls, backend, _) = self.connect(to, None).await?;
        let (r, mut w) = tokio::io::split(tls);
        let mut r = BufReader::new(r);
        let head = async {
            w.write_all(
                format!(
                    "GET /stream?every={}&chunks={chunks} HTTP/1.1\r\nHost: {SERVICE_NAME}\r\n\r\n",
                    every.as_millis()
                )
                .as_bytes(),
            )
            .await?;
            w.flush().await?;
            let mut status = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before the response head",
                    ));
                }
                if status.is_empty() {
                    status = line.trim_end().to_string();
                } else if line.trim_end().is_empty() {
                    break;
                }
            }
            if !status.starts_with("HTTP/1.1 200 ") {
                return Err(io::Error::other(format!("answer {status:?}")));
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(10), head)
            .await
            .map_err(|_| timed_out("stream request"))
            .and_then(|r| r)
            .map_err(|e| Failure::new(Stage::Exchange, Some(&backend), e))?;
        Ok(Stream {
            backend,
            chunks,
            r,
            w,
        })
    }
}

/// An open streaming response.
pub struct Stream {
    /// The backend whose certificate the client saw.
    pub backend: String,
    chunks: u64,
    r: BufReader<tokio::io::ReadHalf<ClientStream>>,
    w: tokio::io::WriteHalf<ClientStream>,
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
            mut r,
            mut w,
        } = self;
        let open_ended = chunks == 0;
        let pinger = async {
            if !open_ended {
                return io::Result::Ok(());
            }
            let mut tick = tokio::time::interval(ping);
            loop {
                tokio::select! {
                    _ = until(&mut stop) => break,
                    _ = tick.tick() => {
                        w.write_all(b"ping\n").await?;
                        w.flush().await?;
                    }
                }
            }
            w.write_all(b"stop\n").await?;
            w.flush().await
        };
        let reader = async {
            let mut got = 0u64;
            let mut line = String::new();
            loop {
                line.clear();
                let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
                    .await
                    .map_err(|_| timed_out("waiting 10 s for a chunk"))??;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stream ended after {got} chunks without its end line"),
                    ));
                }
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
                if l != format!("{backend} {got}") {
                    return Err(io::Error::other(format!(
                        "chunk {got}: expected {backend:?}, got {l:?}"
                    )));
                }
                got += 1;
            }
            // Nothing may follow but a clean close.
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest))
                .await
                .map_err(|_| timed_out("waiting for the close"))??;
            if !rest.is_empty() {
                return Err(io::Error::other(format!(
                    "{} bytes after the end",
                    rest.len()
                )));
            }
            Ok(got)
        };
        let (_, got) = tokio::try_join!(pinger, reader)
            .map_err(|e| Failure::new(Stage::Exchange, Some(&backend), e))?;
        Ok(got)
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
