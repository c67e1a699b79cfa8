//! The test backends: an HTTPS server (hyper over tokio-rustls) and a UDP
//! echo server on one port, counting what they saw and able to crash on
//! demand.

use std::{
    collections::HashSet,
    convert::Infallible,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, channel::Channel, combinators::BoxBody};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use super::{Identity, Lines, hyper_io, timed_out, until};
use crate::topology::NsRuntime;

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
/// - `/stream?every=MS&chunks=N[&size=B]`: `N` lines `<name> <i>`, one
///   every `MS` ms, then `end <N>`; with `chunks=0` it streams until the
///   request body holds a line `stop` (other lines are ignored); with
///   `size`, each line is padded with `x` to `B` bytes (bulk at a set rate);
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
        Self::start_with(rt, port, identity, true)
    }

    /// [`Backend::start`] without the UDP echo when `udp_echo` is false,
    /// leaving the port's UDP side to another server (QUIC in the demo).
    pub fn start_with(rt: &NsRuntime, port: u16, identity: Identity, udp_echo: bool) -> Backend {
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
                // Dual stack: IPv4 clients arrive as IPv4-mapped addresses.
                socket2::SockRef::from(&sock).set_only_v6(false)?;
                sock.set_reuseaddr(true)?;
                sock.bind(addr)?;
                let listener = sock.listen(1024)?;
                let udp = match udp_echo {
                    true => Some(UdpSocket::bind(addr).await?),
                    false => None,
                };
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
        if let Some(udp) = udp {
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
        }
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
        r = tokio::time::timeout(
            Duration::from_secs(120),
            exchange(ctx.clone(), from_client, acceptor, stream),
        ) => {
            r.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connection older than 120 s")))
        }
    };
    if from_client && let Err(e) = result {
        c.errors.fetch_add(1, Ordering::SeqCst);
        *c.last_error.lock().unwrap() = Some(format!("{peer}: {e}"));
    }
}

/// One connection: TLS, one request, the answer, then close_notify and FIN
/// so the client can tell a complete answer from a cut one.
async fn exchange(
    ctx: Arc<ServerCtx>,
    from_client: bool,
    acceptor: TlsAcceptor,
    stream: TcpStream,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
        .await
        .map_err(|_| timed_out("TLS handshake"))??;
    let service = service_fn(move |request| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(answer(&ctx, from_client, request)) }
    });
    http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(hyper_io)
}

type Body = BoxBody<Bytes, io::Error>;

fn answer(ctx: &Arc<ServerCtx>, from_client: bool, request: Request<Incoming>) -> Response<Body> {
    let query = |key: &str| -> Option<u64> {
        request
            .uri()
            .query()?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
    };
    let body = match request.uri().path() {
        "/healthz" => text("ok\n".to_owned()),
        "/stream" => {
            let every = Duration::from_millis(query("every").unwrap_or(100).max(1));
            let chunks = query("chunks").unwrap_or(10);
            let size = query("size").unwrap_or(0).min(MAX_CHUNK) as usize;
            return stream(ctx.clone(), from_client, request, every, chunks, size);
        }
        _ => text(format!("{}\n", ctx.name)),
    };
    // Counted before the answer leaves: a client that has its answer finds
    // it counted.
    if from_client {
        ctx.counters.requests.fetch_add(1, Ordering::SeqCst);
    }
    Response::new(body)
}

/// The largest `size` of a `/stream` chunk.
const MAX_CHUNK: u64 = 1 << 20;

fn text(body: String) -> Body {
    Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed()
}

/// The `/stream` answer, written by a task of its own: the chunks, then
/// `end <n>`. An open-ended stream also reads the request body for `stop`.
fn stream(
    ctx: Arc<ServerCtx>,
    from_client: bool,
    request: Request<Incoming>,
    every: Duration,
    chunks: u64,
    size: usize,
) -> Response<Body> {
    let (mut tx, body) = Channel::<Bytes, io::Error>::new(4);
    tokio::spawn(async move {
        let sent = if chunks == 0 {
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut lines = Lines::new(request.into_body());
            let reader = async move {
                loop {
                    match lines.next().await? {
                        None => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the client left the stream without saying stop",
                            ));
                        }
                        Some(line) if line.trim() == "stop" => break,
                        Some(_) => {}
                    }
                }
                stop_tx.send_replace(true);
                // The rest of the request is read before the answer ends,
                // so the close finds nothing unread (which would reset).
                while lines.next().await?.is_some() {}
                io::Result::Ok(())
            };
            let writer = chunk_loop(&ctx.name, &mut tx, (every, size), None, Some(stop_rx));
            tokio::try_join!(reader, writer).map(|(_, sent)| sent)
        } else {
            chunk_loop(&ctx.name, &mut tx, (every, size), Some(chunks), None).await
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => return tx.abort(e),
        };
        if tx
            .send_data(Bytes::from(format!("end {sent}\n")))
            .await
            .is_ok()
            && from_client
        {
            ctx.counters.streams.fetch_add(1, Ordering::SeqCst);
            ctx.counters.requests.fetch_add(1, Ordering::SeqCst);
        }
    });
    Response::new(body.boxed())
}

/// Sends `<name> <i>` lines (padded to `size` bytes) every `every` until
/// `chunks` are sent or `stop` turns true; returns how many were sent.
async fn chunk_loop(
    name: &str,
    tx: &mut http_body_util::channel::Sender<Bytes, io::Error>,
    (every, size): (Duration, usize),
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
                Some(rx) => until(rx).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = stopped => return Ok(sent),
            _ = tick.tick() => {
                tx.send_data(Bytes::from(chunk_line(name, sent, size)))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the connection is gone"))?;
                sent += 1;
            }
        }
    }
}

/// Chunk `i`'s line: `<name> <i>`, then ` xxx..` up to `size` bytes with
/// the newline (no padding when the line is already that long).
pub(super) fn chunk_line(name: &str, i: u64, size: usize) -> String {
    let mut line = format!("{name} {i}");
    if size > line.len() + 2 {
        line.push(' ');
        let pad = size - line.len() - 1;
        line.extend(std::iter::repeat_n('x', pad));
    }
    line.push('\n');
    line
}
