//! The admin listener's accept loop: HTTP/1 connections served by the API
//! router, with a cap on open connections, a header-read timeout and an
//! idle timeout, so idle or slow clients cannot take the daemon's file
//! descriptors (which health checks need) or its attention. At the cap, the
//! connection idle the longest is closed to make room; when every one is
//! busy, the new connection is closed instead. The same loop serves the TCP
//! listener and the Unix socket, each with its own connections and cap, and
//! tells the router who the peer is ([`Peer`]).
use std::{
    collections::HashMap,
    convert::Infallible,
    fmt,
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::Router;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    task::AbortHandle,
};
use tower::ServiceExt;
use tracing::{debug, warn};

/// Bounds on the admin listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Who sent a request, as the listener saw it (a request extension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    /// A process on the admin socket, from its credentials (SO_PEERCRED).
    Unix {
        uid: u32,
        pid: Option<i32>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix {
                uid,
                pid: Some(pid),
            } => write!(f, "unix socket uid {uid} pid {pid}"),
            Peer::Unix { uid, pid: None } => write!(f, "unix socket uid {uid}"),
        }
    }
}

/// A listener the admin loop accepts connections from.
pub trait Accept {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_peer(&self) -> impl Future<Output = io::Result<(Self::Io, Peer)>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_peer(&self) -> io::Result<(Self::Io, Peer)> {
        let (s, a) = self.accept().await?;
        Ok((s, Peer::Tcp(a)))
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_peer(&self) -> io::Result<(Self::Io, Peer)> {
        let (s, _) = self.accept().await?;
        let cred = s.peer_cred()?;
        Ok((
            s,
            Peer::Unix {
                uid: cred.uid(),
                pid: cred.pid(),
            },
        ))
    }
}

/// The admin socket, removed when dropped (unless another daemon has
/// replaced it since). Bound before the runtime exists (and before the
/// daemon drops its capabilities); served through [`AdminSocket::tokio`].
pub struct AdminSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    ino: u64,
}

impl AdminSocket {
    /// Binds `path` with mode 0600, creating its directory with mode 0700.
    /// A socket left by a daemon that died is replaced; a live one (another
    /// daemon answers on it) or anything that is not a socket is an error.
    pub fn bind(path: &Path) -> io::Result<AdminSocket> {
        if let Some(dir) = path.parent() {
            crate::files::create_private_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "another daemon serves the admin socket {}; stop it or give this one \
                             another admin.socket",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; remove it or set admin.socket",
                        path.display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(crate::files::FILE_MODE),
        )?;
        let ino = std::fs::symlink_metadata(path)?.ino();
        Ok(AdminSocket {
            listener,
            path: path.to_path_buf(),
            ino,
        })
    }

    /// The listener for the runtime (call inside it).
    pub fn tokio(&self) -> io::Result<UnixListener> {
        let l = self.listener.try_clone()?;
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct Conn {
    abort: AbortHandle,
    /// Requests in flight.
    busy: Arc<AtomicUsize>,
    /// Milliseconds since `epoch` of the last request start or end.
    last: Arc<AtomicU64>,
}

type Conns = Arc<Mutex<HashMap<u64, Conn>>>;

/// Serves `router` on `listener` until `shutdown` resolves, then closes
/// idle connections at once and gives busy ones up to two seconds.
pub async fn serve<L: Accept>(
    listener: &L,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let epoch = Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let conns: Conns = Arc::new(Mutex::new(HashMap::new()));
    let mut next_id = 0u64;
    let mut reap = tokio::time::interval(Duration::from_secs(1).min(limits.idle_timeout));
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut accept_errors = 0u64;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = reap.tick() => {
                let idle_ms = limits.idle_timeout.as_millis() as u64;
                let now = now_ms();
                conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|_, c| {
                    let idle = c.busy.load(Ordering::SeqCst) == 0
                        && now.saturating_sub(c.last.load(Ordering::SeqCst)) >= idle_ms;
                    if idle {
                        c.abort.abort();
                    }
                    !idle && !c.abort.is_finished()
                });
            }
            accepted = listener.accept_peer() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        accept_errors += 1;
                        if accept_errors.is_power_of_two() {
                            warn!(errors = accept_errors, "admin API accept failed: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                {
                    let mut map = conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    map.retain(|_, c| !c.abort.is_finished());
                    if map.len() >= limits.max_connections {
                        let victim = map
                            .iter()
                            .filter(|(_, c)| c.busy.load(Ordering::SeqCst) == 0)
                            .min_by_key(|(_, c)| c.last.load(Ordering::SeqCst))
                            .map(|(id, _)| *id);
                        if let Some(id) = victim {
                            if let Some(c) = map.remove(&id) {
                                c.abort.abort();
                            }
                        } else {
                            debug!(%peer, "admin API at its connection cap, all busy; closing the new connection");
                            continue;
                        }
                    }
                }
                let id = next_id;
                next_id += 1;
                let busy = Arc::new(AtomicUsize::new(0));
                let last = Arc::new(AtomicU64::new(now_ms()));
                let (b, l, r) = (busy.clone(), last.clone(), router.clone());
                let who = peer.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let guard = Busy::new(b.clone(), l.clone(), now_ms);
                    let r = r.clone();
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(who.clone());
                    async move {
                        let resp = r.oneshot(req).await;
                        drop(guard);
                        resp.map_err(|e: Infallible| match e {})
                    }
                });
                let map = conns.clone();
                let task = tokio::spawn(async move {
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        debug!(%peer, "admin connection: {e}");
                    }
                    map.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
                });
                conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(
                    id,
                    Conn {
                        abort: task.abort_handle(),
                        busy,
                        last,
                    },
                );
            }
        }
    }
    // Shutting down: idle connections go now, busy ones get a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = {
            let mut map = conns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.retain(|_, c| {
                if c.busy.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline {
                    c.abort.abort();
                    return false;
                }
                !c.abort.is_finished()
            });
            map.len()
        };
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts a request in flight on its connection for as long as it lives.
struct Busy {
    busy: Arc<AtomicUsize>,
    last: Arc<AtomicU64>,
    now_ms: Box<dyn Fn() -> u64 + Send>,
}

impl Busy {
    fn new(
        busy: Arc<AtomicUsize>,
        last: Arc<AtomicU64>,
        now_ms: impl Fn() -> u64 + Send + 'static,
    ) -> Self {
        busy.fetch_add(1, Ordering::SeqCst);
        last.store(now_ms(), Ordering::SeqCst);
        Busy {
            busy,
            last,
            now_ms: Box::new(now_ms),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.last.store((self.now_ms)(), Ordering::SeqCst);
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Raises this process's open-file soft limit to its hard limit; returns
/// (before, after).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // `None` is RLIM_INFINITY.
    let limit = |v: Option<u64>| v.unwrap_or(u64::MAX);
    let mut lim = getrlimit(Resource::Nofile);
    let before = limit(lim.current);
    if limit(lim.current) < limit(lim.maximum) {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim)?;
    }
    Ok((before, limit(lim.current)))
}
