//! Backend health checking: one tokio task per (service, backend) runs TCP,
//! HTTP(S) or UDP probes on a jittered interval, counts consecutive results
//! against rise/fall thresholds and reports crossings as `HealthEvent`s.
//! Probes share one semaphore so a large fleet cannot flood the host.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, Hash, Hasher, RandomState},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::{Semaphore, mpsc::UnboundedSender},
    task::JoinHandle,
    time::Instant,
};
use tracing::{Instrument, debug, info, warn};

/// The most of an HTTP response we read looking for the status line.
const MAX_RESPONSE_HEAD: usize = 4096;
/// Largest UDP reply we accept in full (the largest possible datagram).
const MAX_DATAGRAM: usize = 65_535;
/// Floor for the check interval, so a zero in the config cannot spin a core.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
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

/// A change of a backend's health, sent when rise/fall thresholds are crossed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub service: String,
    pub backend: SocketAddr,
    pub healthy: bool,
    pub reason: String,
}

/// Every check result: (service, backend, "success" | "failure" | "timeout").
pub type ResultHook = Arc<dyn Fn(&str, SocketAddr, &'static str) + Send + Sync>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub healthy: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// The most recent failure, kept after later successes.
    pub last_error: Option<String>,
    /// Checks completed since the target (or its spec) was set.
    pub checks: u64,
}

impl BackendHealth {
    fn new(healthy: bool) -> Self {
        BackendHealth {
            healthy,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_error: None,
            checks: 0,
        }
    }
}

/// What a target's task shares with the `Checker`. `retired` is set under
/// the lock before the task is aborted, so a task caught mid-check can
/// neither change the view nor send an event afterwards.
struct Shared {
    health: BackendHealth,
    retired: bool,
    /// Check at once, and let the first result decide the verdict (a fresh
    /// verdict, reported as an event when it differs from the assumed one).
    decisive: bool,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    // Nothing panics while holding this lock, but never cascade a panic.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Running {
    spec: CheckSpec,
    shared: SharedRef,
    task: JoinHandle<()>,
}

impl Running {
    fn stop(self) {
        lock(&self.shared).retired = true;
        self.task.abort();
    }
}

/// Where a target that starts (or restarts with another spec) begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Healthy, first check after a jittered delay: a backend never seen.
    New,
    /// A verdict known from before (kept across a restart): counted from
    /// zero against rise and fall, so a backend known down needs `rise`
    /// passing checks to come back.
    Known(bool),
    /// Assumed `healthy` until the first check, which runs at once and
    /// decides the verdict on its own (reported as an event when it differs):
    /// a backend re-activated, or whose check changed.
    Fresh(bool),
}

/// Owns one check task per target.
pub struct Checker {
    semaphore: Arc<Semaphore>,
    events: UnboundedSender<HealthEvent>,
    on_result: ResultHook,
    targets: HashMap<(String, SocketAddr), Running>,
    /// Service addresses probes must not leave from (see `source`).
    avoid: ServiceAddrs,
}

type ServiceAddrs = Arc<std::sync::RwLock<Arc<HashSet<IpAddr>>>>;

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("targets", &self.targets.len())
            .field("available_permits", &self.semaphore.available_permits())
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// `max_concurrent` bounds checks in flight across all targets (0 is
    /// taken as 1).
    pub fn new(
        max_concurrent: usize,
        events: UnboundedSender<HealthEvent>,
        on_result: ResultHook,
    ) -> Self {
        let permits = max_concurrent.clamp(1, Semaphore::MAX_PERMITS);
        Checker {
            semaphore: Arc::new(Semaphore::new(permits)),
            events,
            on_result,
            targets: HashMap::new(),
            avoid: Default::default(),
        }
    }

    /// The service addresses of this host: a probe the kernel would send
    /// from one of them is bound to another address instead.
    pub fn set_service_addresses(&self, addrs: HashSet<IpAddr>) {
        if let Ok(mut a) = self.avoid.write() {
            *a = Arc::new(addrs);
        }
    }

    /// Replaces the set of targets: starts tasks for new ones, stops removed
    /// ones, restarts changed ones (a changed spec resets the counters but
    /// keeps the healthy flag and last error); unchanged targets keep running
    /// undisturbed. If a (service, backend) pair appears twice, the last one
    /// wins. Must be called from within a tokio runtime.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        self.set_targets_from(targets, |_| Start::New);
    }

    /// Like [`Checker::set_targets`], with `start` telling where a target
    /// that is not running yet begins; a running target whose spec changed
    /// keeps its healthy flag, and gets a decisive first check at once when
    /// `start` says [`Start::Fresh`].
    pub fn set_targets_from(
        &mut self,
        targets: Vec<Target>,
        start: impl Fn(&(String, SocketAddr)) -> Start,
    ) {
        let mut wanted: HashMap<(String, SocketAddr), Target> = HashMap::new();
        for target in targets {
            let key = (target.service.clone(), target.backend);
            if let Some(dup) = wanted.insert(key, target) {
                warn!(
                    service = %dup.service,
                    backend = %dup.backend,
                    "duplicate health check target; the last one wins"
                );
            }
        }

        let mut old = std::mem::take(&mut self.targets);
        for (key, target) in wanted {
            let begin = start(&key);
            let (healthy, last_error, decisive) = match old.remove(&key) {
                Some(running) if running.spec == target.spec => {
                    self.targets.insert(key, running);
                    continue;
                }
                Some(running) => {
                    let carried = {
                        let s = lock(&running.shared);
                        (
                            s.health.healthy,
                            s.health.last_error.clone(),
                            matches!(begin, Start::Fresh(_)),
                        )
                    };
                    running.stop();
                    carried
                }
                // A new target starts healthy so traffic flows at once.
                None => match begin {
                    Start::New => (true, None, false),
                    Start::Known(h) => (h, None, false),
                    Start::Fresh(h) => (h, None, true),
                },
            };
            let mut health = BackendHealth::new(healthy);
            health.last_error = last_error;
            let running = self.start(target, health, decisive);
            self.targets.insert(key, running);
        }
        for (_, running) in old {
            running.stop();
        }
    }

    /// Current view of every target, keyed by (service, backend).
    pub fn status(&self) -> HashMap<(String, SocketAddr), BackendHealth> {
        self.targets
            .iter()
            .map(|(key, running)| (key.clone(), lock(&running.shared).health.clone()))
            .collect()
    }

    fn start(&self, target: Target, health: BackendHealth, decisive: bool) -> Running {
        let shared = Arc::new(Mutex::new(Shared {
            health,
            retired: false,
            decisive,
        }));
        let span = tracing::info_span!(
            "health",
            service = %target.service,
            backend = %target.backend,
        );
        let spec = target.spec.clone();
        let task = tokio::spawn(
            run_target(
                target,
                shared.clone(),
                self.semaphore.clone(),
                self.events.clone(),
                self.on_result.clone(),
                self.avoid.clone(),
            )
            .instrument(span),
        );
        Running { spec, shared, task }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, running) in self.targets.drain() {
            running.stop();
        }
    }
}

/// The life of one target: a random first delay, then a check every
/// interval (±10%), measured from the start of the previous one.
async fn run_target(
    target: Target,
    shared: SharedRef,
    semaphore: Arc<Semaphore>,
    events: UnboundedSender<HealthEvent>,
    on_result: ResultHook,
    avoid: ServiceAddrs,
) {
    let spec = &target.spec;
    let interval = spec.interval.max(MIN_INTERVAL);
    if !lock(&shared).decisive {
        tokio::time::sleep(scale(interval, random_fraction(&target, 0))).await;
    }

    // Built once (TLS config, CA file) and kept while it works.
    let mut probe: Option<Probe> = None;
    for round in 1u64.. {
        let started = Instant::now();
        let Ok(permit) = semaphore.acquire().await else {
            return;
        };
        let prepared = match probe.take() {
            Some(p) => Ok(p),
            None => Probe::prepare_off_runtime(&spec.kind, target.backend).await,
        };
        let result = match prepared {
            Ok(p) => {
                let avoid = avoid.read().map(|a| a.clone()).unwrap_or_default();
                let source = crate::source::probe_source(target.backend, &avoid);
                let result = p.run(target.backend, spec.timeout, source).await;
                probe = Some(p);
                result
            }
            Err(e) => Err(e),
        };
        drop(permit);

        let Some(outcome) = record(&target, &shared, &events, result) else {
            return;
        };
        on_result(&target.service, target.backend, outcome);

        let period = scale(interval, 0.9 + 0.2 * random_fraction(&target, round));
        tokio::time::sleep(period.saturating_sub(started.elapsed())).await;
    }
}

/// Applies one result to the shared state and sends an event when a
/// threshold is crossed. Returns the hook's outcome, or `None` if the target
/// has been retired.
fn record(
    target: &Target,
    shared: &SharedRef,
    events: &UnboundedSender<HealthEvent>,
    result: Result<(), CheckError>,
) -> Option<&'static str> {
    let rise = target.spec.rise.max(1);
    let fall = target.spec.fall.max(1);
    let mut s = lock(shared);
    if s.retired {
        return None;
    }
    let decisive = std::mem::take(&mut s.decisive);
    let h = &mut s.health;
    h.checks = h.checks.saturating_add(1);
    let (outcome, change) = match result {
        Ok(()) if decisive => {
            h.consecutive_ok = h.consecutive_ok.saturating_add(1);
            h.consecutive_fail = 0;
            let up = !h.healthy;
            (
                "success",
                up.then(|| "the first check of a fresh verdict passed".to_string()),
            )
        }
        Ok(()) => {
            h.consecutive_ok = h.consecutive_ok.saturating_add(1);
            h.consecutive_fail = 0;
            let up = !h.healthy && h.consecutive_ok >= rise;
            (
                "success",
                up.then(|| format!("{rise} consecutive checks passed")),
            )
        }
        Err(e) => {
            h.consecutive_fail = h.consecutive_fail.saturating_add(1);
            h.consecutive_ok = 0;
            let outcome = match e {
                CheckError::Timeout(_) => "timeout",
                _ => "failure",
            };
            debug!(error = %e, label = e.label(), "health check failed");
            let down = h.healthy && (decisive || h.consecutive_fail >= fall);
            let reason = down.then(|| {
                sanitize_reason(&if decisive {
                    format!("the first check of a fresh verdict failed: {e}")
                } else {
                    format!("{fall} consecutive checks failed; last: {e}")
                })
            });
            h.last_error = Some(sanitize_reason(&e.to_string()));
            (outcome, reason)
        }
    };
    if let Some(reason) = change {
        h.healthy = !h.healthy;
        if h.healthy {
            info!(%reason, "backend is healthy");
        } else {
            warn!(%reason, "backend is unhealthy");
        }
        // Sent under the lock so events for one target keep their order and
        // none escapes after the target is retired. A closed receiver means
        // the daemon is shutting down; nothing to do then.
        let _ = events.send(HealthEvent {
            service: target.service.clone(),
            backend: target.backend,
            healthy: h.healthy,
            reason,
        });
    }
    Some(outcome)
}

/// A uniform-enough value in [0, 1) from the target, a counter and the
/// clock, hashed with a randomly keyed SipHash.
fn random_fraction(target: &Target, counter: u64) -> f64 {
    let mut h = RandomState::new().build_hasher();
    target.service.hash(&mut h);
    target.backend.hash(&mut h);
    counter.hash(&mut h);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `d * factor`, falling back to `d` when the product is not representable.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
}

/// A check with everything that can be computed ahead of time done.
enum Probe {
    Tcp,
    Http {
        request: Vec<u8>,
    },
    Https {
        request: Vec<u8>,
        tls: tokio_rustls::TlsConnector,
        server_name: ServerName<'static>,
    },
    Udp {
        payload: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

impl Probe {
    /// [`Probe::prepare`] on a blocking thread: it may read a CA file.
    async fn prepare_off_runtime(
        kind: &CheckKind,
        backend: SocketAddr,
    ) -> Result<Probe, CheckError> {
        let kind = kind.clone();
        tokio::task::spawn_blocking(move || Probe::prepare(&kind, backend))
            .await
            .unwrap_or_else(|e| {
                Err(CheckError::InvalidCheck(format!(
                    "preparing the check failed: {e}"
                )))
            })
    }

    fn prepare(kind: &CheckKind, backend: SocketAddr) -> Result<Probe, CheckError> {
        Ok(match kind {
            CheckKind::Tcp => Probe::Tcp,
            CheckKind::Http { path, host } => Probe::Http {
                request: http_request(path, host.as_deref(), backend)?,
            },
            CheckKind::Https {
                path,
                host,
                sni,
                ca_file,
            } => Probe::Https {
                request: http_request(path, host.as_deref(), backend)?,
                tls: tokio_rustls::TlsConnector::from(tls_config(ca_file.as_deref())?),
                server_name: server_name(sni.as_deref(), host.as_deref(), backend)?,
            },
            CheckKind::Udp { payload, expect } => Probe::Udp {
                payload: payload.clone(),
                expect: expect.clone(),
            },
        })
    }

    /// One check; `source`, when set, is the address probes leave from.
    async fn run(
        &self,
        backend: SocketAddr,
        timeout: Duration,
        source: Option<SocketAddr>,
    ) -> Result<(), CheckError> {
        tokio::time::timeout(timeout, self.exchange(backend, source))
            .await
            .unwrap_or(Err(CheckError::Timeout(timeout)))
    }

    async fn exchange(
        &self,
        backend: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<(), CheckError> {
        match self {
            Probe::Tcp => {
                tcp_connect(backend, source)
                    .await
                    .map_err(CheckError::connect)?;
                Ok(())
            }
            Probe::Http { request } => {
                let stream = connect(backend, source).await?;
                http_exchange(stream, request).await
            }
            Probe::Https {
                request,
                tls,
                server_name,
            } => {
                let stream = connect(backend, source).await?;
                let stream = tls
                    .connect(server_name.clone(), stream)
                    .await
                    .map_err(CheckError::Tls)?;
                http_exchange(stream, request).await
            }
            Probe::Udp { payload, expect } => {
                udp_exchange(backend, source, payload, expect.as_deref()).await
            }
        }
    }
}

async fn tcp_connect(backend: SocketAddr, source: Option<SocketAddr>) -> io::Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect(backend).await;
    };
    let socket = if backend.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(src)?;
    socket.connect(backend).await
}

async fn connect(backend: SocketAddr, source: Option<SocketAddr>) -> Result<TcpStream, CheckError> {
    let stream = tcp_connect(backend, source)
        .await
        .map_err(CheckError::connect)?;
    // The request is one small write; send it at once.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn http_request(
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
async fn http_exchange<S>(mut stream: S, request: &[u8]) -> Result<(), CheckError>
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
fn parse_status_line(line: &[u8]) -> Result<u16, CheckError> {
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

async fn udp_exchange(
    backend: SocketAddr,
    source: Option<SocketAddr>,
    payload: &[u8],
    expect: Option<&[u8]>,
) -> Result<(), CheckError> {
    let local: SocketAddr = source.unwrap_or(match backend {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    });
    let socket = UdpSocket::bind(local).await.map_err(CheckError::Io)?;
    socket.connect(backend).await.map_err(CheckError::connect)?;
    // A connected socket reports an ICMP port unreachable as ECONNREFUSED.
    socket.send(payload).await.map_err(CheckError::datagram)?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = socket.recv(&mut buf).await.map_err(CheckError::datagram)?;
    match expect {
        Some(want) if !contains(&buf[..n], want) => Err(CheckError::UnexpectedReply),
        _ => Ok(()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// SNI: `sni`, else `host` without its port, else the backend IP (which
/// rustls does not send as SNI, but verifies against when a CA is given).
fn server_name(
    sni: Option<&str>,
    host: Option<&str>,
    backend: SocketAddr,
) -> Result<ServerName<'static>, CheckError> {
    let name = match (sni, host) {
        (Some(sni), _) => sni,
        (None, Some(host)) => strip_port(host),
        (None, None) => return Ok(ServerName::IpAddress(backend.ip().into())),
    };
    ServerName::try_from(name.to_owned())
        .map_err(|_| CheckError::InvalidCheck(format!("{name:?} is not a valid TLS server name")))
}

/// `example.com:8443` → `example.com`, `[::1]:443` → `::1`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, CheckError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CheckError::InvalidCheck(format!("TLS setup failed: {e}")))?;
    let mut config = match ca_file {
        Some(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { algorithms }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, CheckError> {
    let fail = |reason: String| CheckError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = crate::files::read_regular(path, MAX_CA_FILE).map_err(|e| fail(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| fail(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(fail("no PEM CERTIFICATE found".to_owned()));
    }
    Ok(roots)
}

/// Accepts any server certificate (health checks of backends with
/// self-signed certificates), while still checking that the server holds
/// the certificate's key.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        future::Future,
        sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    };

    use rustls::{
        ServerConfig,
        pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
        server::Acceptor,
    };
    use tokio::{
        net::TcpListener,
        sync::mpsc::{UnboundedReceiver, error::TryRecvError, unbounded_channel},
    };
    use tokio_rustls::LazyConfigAcceptor;

    use super::*;

    /// Upper bound for any single wait in these tests.
    const WAIT: Duration = Duration::from_secs(4);

    /// A loopback TCP server: counts accepted connections, hands each to
    /// `handler` on its own task, and stops accepting when dropped.
    struct TestServer {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestServer {
        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    async fn serve<F, Fut>(handler: F) -> TestServer
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(stream));
            }
        });
        TestServer {
            addr,
            accepted,
            task,
        }
    }

    /// A loopback port with nothing listening on it.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    async fn read_request_head<S: AsyncRead + Unpin>(stream: &mut S) -> String {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    fn response(status: u16) -> Vec<u8> {
        format!("HTTP/1.1 {status} Test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .into_bytes()
    }

    /// An HTTP backend whose answers the test controls: queued statuses
    /// first, then 503 while `bad` is set and 200 otherwise.
    #[derive(Default)]
    struct HttpBackend {
        bad: AtomicBool,
        queued: Mutex<VecDeque<u16>>,
        requests: Mutex<Vec<String>>,
    }

    impl HttpBackend {
        fn queue(&self, statuses: &[u16]) {
            self.queued.lock().unwrap().extend(statuses);
        }
        fn next_status(&self) -> u16 {
            let queued = self.queued.lock().unwrap().pop_front();
            queued.unwrap_or(if self.bad.load(Ordering::SeqCst) {
                503
            } else {
                200
            })
        }
    }

    async fn http_server(backend: Arc<HttpBackend>) -> TestServer {
        serve(move |mut stream| {
            let backend = backend.clone();
            async move {
                let head = read_request_head(&mut stream).await;
                backend.requests.lock().unwrap().push(head);
                let status = backend.next_status();
                let _ = stream.write_all(&response(status)).await;
            }
        })
        .await
    }

    /// A server that accepts and then never says anything.
    async fn hanging_server() -> TestServer {
        serve(|stream| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        })
        .await
    }

    fn http(path: &str, host: Option<&str>) -> CheckKind {
        CheckKind::Http {
            path: path.to_owned(),
            host: host.map(str::to_owned),
        }
    }

    fn spec(kind: CheckKind, interval_ms: u64, timeout_ms: u64, rise: u32, fall: u32) -> CheckSpec {
        CheckSpec {
            kind,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            rise,
            fall,
        }
    }

    fn target(service: &str, backend: SocketAddr, spec: CheckSpec) -> Target {
        Target {
            service: service.to_owned(),
            backend,
            spec,
        }
    }

    /// A checker whose hook records every outcome in order.
    fn checker(
        max_concurrent: usize,
    ) -> (
        Checker,
        UnboundedReceiver<HealthEvent>,
        Arc<Mutex<Vec<&'static str>>>,
    ) {
        let (tx, rx) = unbounded_channel();
        let results = Arc::new(Mutex::new(Vec::new()));
        let log = results.clone();
        let hook: ResultHook = Arc::new(move |_, _, outcome| log.lock().unwrap().push(outcome));
        (Checker::new(max_concurrent, tx, hook), rx, results)
    }

    /// Polls `cond` every few milliseconds; panics after `WAIT`.
    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn next_event(rx: &mut UnboundedReceiver<HealthEvent>) -> HealthEvent {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no health event in time")
            .expect("event channel closed")
    }

    fn health(checker: &Checker, service: &str, backend: SocketAddr) -> BackendHealth {
        checker.status()[&(service.to_owned(), backend)].clone()
    }

    // ---- single checks -------------------------------------------------

    #[tokio::test]
    async fn tcp_connect_succeeds_and_refused_port_fails() {
        let server = serve(|_| async {}).await;
        let t = Duration::from_secs(1);
        check_once(&CheckKind::Tcp, server.addr, t).await.unwrap();

        let err = check_once(&CheckKind::Tcp, closed_port().await, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "refused", "{err}");
    }

    #[tokio::test]
    async fn http_2xx_passes_and_sends_path_and_host() {
        let backend = Arc::new(HttpBackend::default());
        let server = http_server(backend.clone()).await;
        let t = Duration::from_secs(1);

        check_once(&http("/healthz?deep=1", None), server.addr, t)
            .await
            .unwrap();
        check_once(&http("/ready", Some("web.example:8080")), server.addr, t)
            .await
            .unwrap();

        let requests = backend.requests.lock().unwrap().clone();
        assert_eq!(
            requests[0],
            format!(
                "GET /healthz?deep=1 HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-health/1\r\n\
                 Connection: close\r\n\r\n",
                server.addr
            )
        );
        assert!(
            requests[1].starts_with("GET /ready HTTP/1.1\r\n"),
            "{}",
            requests[1]
        );
        assert!(
            requests[1].contains("\r\nHost: web.example:8080\r\n"),
            "{}",
            requests[1]
        );
    }

    #[tokio::test]
    async fn http_non_2xx_and_garbage_fail() {
        let backend = Arc::new(HttpBackend::default());
        let server = http_server(backend.clone()).await;
        let t = Duration::from_secs(1);

        backend.bad.store(true, Ordering::SeqCst);
        let err = check_once(&http("/", None), server.addr, t)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckError::BadStatus(503)), "{err}");
        assert_eq!(err.label(), "bad_status");

        backend.queue(&[302]);
        let err = check_once(&http("/", None), server.addr, t)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckError::BadStatus(302)), "{err}");

        let garbage = serve(|mut stream| async move {
            let _ = read_request_head(&mut stream).await;
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        })
        .await;
        let err = check_once(&http("/", None), garbage.addr, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "bad_response", "{err}");
        // What the backend sent is not echoed to readers of the reason.
        assert!(!err.to_string().contains("SSH"), "{err}");

        let silent_close = serve(|mut stream| async move {
            let _ = read_request_head(&mut stream).await;
        })
        .await;
        let err = check_once(&http("/", None), silent_close.addr, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "bad_response", "{err}");
    }

    #[tokio::test]
    async fn http_rejects_bad_input_without_connecting() {
        let backend = Arc::new(HttpBackend::default());
        let server = http_server(backend.clone()).await;
        let t = Duration::from_secs(1);
        for kind in [
            http("/a b", None),
            http("/x\r\nX-Injected: 1", None),
            http("/", Some("evil\r\nX: y")),
            http("/", Some("")),
        ] {
            let err = check_once(&kind, server.addr, t).await.unwrap_err();
            assert_eq!(err.label(), "config", "{kind:?}: {err}");
        }
        assert_eq!(server.accepted(), 0);
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 204 No Content\r").unwrap(),
            204
        );
        assert_eq!(parse_status_line(b"HTTP/1.0 200").unwrap(), 200);
        assert_eq!(parse_status_line(b"HTTP/2 500 oops").unwrap(), 500);
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000 x",
            b"ICY 200 OK",
            b"HTTP/1.1 2x0 x",
        ] {
            assert!(
                parse_status_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn host_ports_are_stripped_for_sni() {
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }

    // ---- TLS -----------------------------------------------------------

    /// A temporary file removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let name = format!(
                "lb-health-test-{}-{nanos}-{}.pem",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            );
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// An HTTPS backend with a self-signed certificate for "backend.test"
    /// that records the SNI of every ClientHello it sees.
    struct TlsBackend {
        server: TestServer,
        cert_pem: String,
        snis: Arc<Mutex<Vec<Option<String>>>>,
    }

    async fn https_server() -> TlsBackend {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["backend.test".to_owned()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
        let config = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap(),
        );
        let snis = Arc::new(Mutex::new(Vec::new()));
        let seen = snis.clone();
        let server = serve(move |tcp| {
            let (config, seen) = (config.clone(), seen.clone());
            async move {
                let Ok(start) = LazyConfigAcceptor::new(Acceptor::default(), tcp).await else {
                    return;
                };
                let sni = start.client_hello().server_name().map(str::to_owned);
                seen.lock().unwrap().push(sni);
                let Ok(mut tls) = start.into_stream(config).await else {
                    return;
                };
                let head = read_request_head(&mut tls).await;
                let status = if head.starts_with("GET /tls-health HTTP/1.1\r\n") {
                    200
                } else {
                    404
                };
                let _ = tls.write_all(&response(status)).await;
                let _ = tls.shutdown().await;
            }
        })
        .await;
        TlsBackend {
            server,
            cert_pem: cert.pem(),
            snis,
        }
    }

    fn https(host: Option<&str>, sni: Option<&str>, ca_file: Option<&Path>) -> CheckKind {
        CheckKind::Https {
            path: "/tls-health".to_owned(),
            host: host.map(str::to_owned),
            sni: sni.map(str::to_owned),
            ca_file: ca_file.map(Path::to_owned),
        }
    }

    #[tokio::test]
    async fn https_without_ca_accepts_any_certificate() {
        let backend = https_server().await;
        let addr = backend.server.addr;
        let t = Duration::from_secs(2);

        check_once(&https(None, None, None), addr, t).await.unwrap();
        check_once(&https(None, Some("backend.test"), None), addr, t)
            .await
            .unwrap();
        // No sni: the Host header's name (without port) is sent.
        check_once(&https(Some("other.test:8443"), None, None), addr, t)
            .await
            .unwrap();

        assert_eq!(
            *backend.snis.lock().unwrap(),
            [
                None,
                Some("backend.test".to_owned()),
                Some("other.test".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn https_with_ca_verifies_chain_and_name() {
        let backend = https_server().await;
        let addr = backend.server.addr;
        let ca = TempFile::new(&backend.cert_pem);
        let t = Duration::from_secs(2);

        check_once(&https(None, Some("backend.test"), Some(&ca.0)), addr, t)
            .await
            .unwrap();

        let err = check_once(&https(None, Some("wrong.test"), Some(&ca.0)), addr, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "tls", "{err}");

        // No name at all: verified against the IP, which the cert lacks.
        let err = check_once(&https(None, None, Some(&ca.0)), addr, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "tls", "{err}");

        assert_eq!(
            *backend.snis.lock().unwrap(),
            [
                Some("backend.test".to_owned()),
                Some("wrong.test".to_owned()),
                None
            ]
        );

        // A CA file that is missing or holds no certificate is a config error.
        let missing = ca.0.with_extension("missing");
        let err = check_once(&https(None, Some("backend.test"), Some(&missing)), addr, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "config", "{err}");
        let empty = TempFile::new("not a certificate\n");
        let err = check_once(&https(None, Some("backend.test"), Some(&empty.0)), addr, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "config", "{err}");
        assert_eq!(backend.server.accepted(), 3);
    }

    /// `ca_file` pointing at /proc/kmsg (whose read blocks until the kernel
    /// logs), a FIFO or a file over 1 MiB is refused without reading it
    /// (the check would hang or balloon otherwise), and nothing connects.
    #[tokio::test]
    async fn ca_files_that_are_not_small_regular_files_are_refused() {
        let backend = https_server().await;
        let addr = backend.server.addr;
        let t = Duration::from_secs(2);
        let fifo = TempFile::new("");
        std::fs::remove_file(&fifo.0).unwrap();
        let c = std::ffi::CString::new(fifo.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let big = TempFile::new(&"x".repeat(MAX_CA_FILE as usize + 1));
        let kmsg = PathBuf::from("/proc/kmsg");
        for (path, want) in [
            (&kmsg, "procfs"),
            (&fifo.0, "not a regular file"),
            (&big.0, "more than the 1048576 allowed"),
        ] {
            let started = Instant::now();
            let err = check_once(&https(None, Some("backend.test"), Some(path)), addr, t)
                .await
                .unwrap_err();
            assert_eq!(err.label(), "config", "{err}");
            assert!(err.to_string().contains(want), "{err}");
            assert!(started.elapsed() < Duration::from_secs(1), "{err}");
        }
        assert_eq!(backend.server.accepted(), 0);
    }

    #[test]
    fn reasons_are_short_printable_ascii() {
        assert_eq!(sanitize_reason("refused"), "refused");
        assert_eq!(sanitize_reason("a\r\nb\u{1b}[31mé"), "a??b?[31m?");
        let long = sanitize_reason(&"y".repeat(1000));
        assert_eq!(long.len(), MAX_REASON);
        assert!(long.ends_with("..."));
    }

    // ---- UDP -----------------------------------------------------------

    async fn udp_echo_server() -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        (addr, task)
    }

    fn udp(payload: &[u8], expect: Option<&[u8]>) -> CheckKind {
        CheckKind::Udp {
            payload: payload.to_vec(),
            expect: expect.map(<[u8]>::to_vec),
        }
    }

    #[tokio::test]
    async fn udp_reply_checks() {
        let (addr, echo) = udp_echo_server().await;
        let t = Duration::from_millis(300);

        check_once(&udp(b"ping", None), addr, t).await.unwrap();
        check_once(&udp(b"ping", Some(b"ping")), addr, t)
            .await
            .unwrap();
        let err = check_once(&udp(b"ping", Some(b"pong")), addr, t)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckError::UnexpectedReply), "{err}");
        echo.abort();

        // Bound but silent: nothing ever replies.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let started = Instant::now();
        let err = check_once(&udp(b"ping", None), silent.local_addr().unwrap(), t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "timeout", "{err}");
        assert!(started.elapsed() < t + Duration::from_millis(500));

        // Nothing bound: the kernel's port unreachable comes back as refused.
        let closed = {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.local_addr().unwrap()
        };
        let err = check_once(&udp(b"ping", None), closed, t)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "refused", "{err}");
    }

    // ---- hung backends ---------------------------------------------------

    #[tokio::test]
    async fn hung_backend_times_out_in_bounded_time() {
        let server = hanging_server().await;
        let t = Duration::from_millis(300);
        for kind in [http("/", None), https(None, None, None)] {
            let started = Instant::now();
            let err = tokio::time::timeout(WAIT, check_once(&kind, server.addr, t))
                .await
                .expect("check_once overran its timeout")
                .unwrap_err();
            let took = started.elapsed();
            assert_eq!(err.label(), "timeout", "{err}");
            assert!(
                took >= t && took < t + Duration::from_millis(300),
                "{took:?}"
            );
        }
    }

    #[tokio::test]
    async fn checker_reports_timeouts_to_the_hook() {
        let server = hanging_server().await;
        let (mut checker, mut rx, results) = checker(4);
        checker.set_targets(vec![target(
            "web",
            server.addr,
            spec(http("/", None), 50, 100, 1, 1),
        )]);
        let event = next_event(&mut rx).await;
        assert!(!event.healthy);
        assert!(
            event.reason.contains("no answer within"),
            "{}",
            event.reason
        );
        assert_eq!(results.lock().unwrap()[0], "timeout");
        let h = health(&checker, "web", server.addr);
        assert!(h.last_error.unwrap().contains("no answer within"));
    }

    // ---- the Checker -----------------------------------------------------

    fn failures(results: &Mutex<Vec<&'static str>>) -> usize {
        results
            .lock()
            .unwrap()
            .iter()
            .filter(|r| **r != "success")
            .count()
    }

    fn last_is(results: &Mutex<Vec<&'static str>>, outcome: &str) -> bool {
        results.lock().unwrap().last() == Some(&outcome)
    }

    #[tokio::test]
    async fn rise_and_fall_count_consecutive_results() {
        let backend = Arc::new(HttpBackend::default());
        let server = http_server(backend.clone()).await;
        let addr = server.addr;
        let (mut checker, mut rx, results) = checker(4);
        checker.set_targets(vec![target(
            "web",
            addr,
            spec(http("/", None), 50, 200, 2, 3),
        )]);

        // New targets start healthy, before any check.
        let h = health(&checker, "web", addr);
        assert!(h.healthy && h.checks == 0);
        wait_until("3 checks", || health(&checker, "web", addr).checks >= 3).await;

        // Runs of fall-1 failures between successes never add up to a fall.
        for round in 1..=2 {
            backend.queue(&[503, 503]);
            wait_until("2 failures then a success", || {
                failures(&results) == 2 * round && last_is(&results, "success")
            })
            .await;
        }
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        let h = health(&checker, "web", addr);
        assert!(h.healthy);
        assert_eq!(h.consecutive_fail, 0);
        assert!(h.consecutive_ok >= 1);
        assert!(h.last_error.as_deref().unwrap().contains("503"), "{h:?}");

        // Persistently bad: exactly one down event, after `fall` in a row.
        backend.bad.store(true, Ordering::SeqCst);
        let event = next_event(&mut rx).await;
        assert_eq!(
            (event.service.as_str(), event.backend, event.healthy),
            ("web", addr, false)
        );
        assert!(
            event.reason.contains("3 consecutive checks failed"),
            "{}",
            event.reason
        );
        let tail_failures = results
            .lock()
            .unwrap()
            .iter()
            .rev()
            .take_while(|r| **r != "success")
            .count();
        assert!(tail_failures >= 3, "{:?}", results.lock().unwrap());
        let h = health(&checker, "web", addr);
        assert!(
            !h.healthy && h.consecutive_fail >= 3 && h.consecutive_ok == 0,
            "{h:?}"
        );
        let failed_so_far = failures(&results);
        wait_until("more failures", || failures(&results) >= failed_so_far + 3).await;
        assert_eq!(
            rx.try_recv(),
            Err(TryRecvError::Empty),
            "a second down event"
        );

        // One success among failures is not a rise.
        backend.queue(&[200]);
        wait_until("a success then a failure", || {
            let r = results.lock().unwrap();
            r.len() >= 2 && r[r.len() - 2] == "success" && r[r.len() - 1] == "failure"
        })
        .await;
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert!(!health(&checker, "web", addr).healthy);

        // Good again: one up event after `rise` successes.
        backend.bad.store(false, Ordering::SeqCst);
        let event = next_event(&mut rx).await;
        assert_eq!(
            (event.service.as_str(), event.backend, event.healthy),
            ("web", addr, true)
        );
        assert!(
            event.reason.contains("2 consecutive checks passed"),
            "{}",
            event.reason
        );
        let h = health(&checker, "web", addr);
        assert!(
            h.healthy && h.consecutive_ok >= 2 && h.consecutive_fail == 0,
            "{h:?}"
        );

        // The hook saw every completed check, once (this runtime is
        // single-threaded, so no check is half-recorded while we look).
        assert_eq!(h.checks, results.lock().unwrap().len() as u64);
        assert_eq!(
            backend.requests.lock().unwrap().len() as u64,
            h.checks,
            "every check reached the server once"
        );
    }

    #[tokio::test]
    async fn set_targets_adds_keeps_restarts_and_removes() {
        let a_backend = Arc::new(HttpBackend::default());
        let b_backend = Arc::new(HttpBackend::default());
        let a = http_server(a_backend).await;
        let b = http_server(b_backend).await;
        let c = closed_port().await;
        let s = spec(http("/", None), 50, 200, 2, 1);
        let (mut checker, mut rx, _) = checker(8);
        checker.set_targets(vec![
            target("web", a.addr, s.clone()),
            target("web", b.addr, s.clone()),
            target("web", c, s.clone()),
        ]);
        assert_eq!(checker.status().len(), 3);
        assert!(
            checker
                .status()
                .values()
                .all(|h| h.healthy && h.checks == 0)
        );

        let down = next_event(&mut rx).await;
        assert_eq!((down.backend, down.healthy), (c, false));
        wait_until("checks of a and b", || {
            let st = checker.status();
            st[&("web".to_owned(), a.addr)].checks >= 3
                && st[&("web".to_owned(), b.addr)].checks >= 3
        })
        .await;

        // Drop a, keep b as is, change c's spec.
        let b_before = health(&checker, "web", b.addr);
        let mut c_spec = s.clone();
        c_spec.interval = Duration::from_millis(60);
        checker.set_targets(vec![
            target("web", b.addr, s.clone()),
            target("web", c, c_spec),
        ]);

        let st = checker.status();
        assert_eq!(st.len(), 2);
        let b_now = &st[&("web".to_owned(), b.addr)];
        assert!(b_now.checks >= b_before.checks && b_now.consecutive_ok >= b_before.consecutive_ok);
        let c_now = &st[&("web".to_owned(), c)];
        assert!(
            !c_now.healthy,
            "a restarted target keeps its health: {c_now:?}"
        );
        assert_eq!(
            (c_now.checks, c_now.consecutive_ok, c_now.consecutive_fail),
            (0, 0, 0)
        );

        // a sees no more connections after a short grace.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let a_seen = a.accepted();
        let b_seen = b.accepted();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(a.accepted(), a_seen, "removed target still checked");
        assert!(b.accepted() > b_seen, "kept target no longer checked");
        let st = checker.status();
        assert!(st[&("web".to_owned(), b.addr)].checks > b_before.checks);
        let c_now = &st[&("web".to_owned(), c)];
        assert!(!c_now.healthy && c_now.checks > 0);
        // c stayed down throughout: no event beyond the first.
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));

        // Removing everything stops everything.
        checker.set_targets(Vec::new());
        assert!(checker.status().is_empty());
    }

    #[tokio::test]
    async fn dropping_the_checker_stops_checks() {
        let server = serve(|_| async {}).await;
        let (mut checker, _rx, _) = checker(2);
        checker.set_targets(vec![target(
            "web",
            server.addr,
            spec(CheckKind::Tcp, 20, 100, 1, 1),
        )]);
        wait_until("a check", || server.accepted() >= 2).await;
        drop(checker);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let seen = server.accepted();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(server.accepted(), seen);
    }

    #[tokio::test]
    async fn concurrency_is_bounded_by_the_semaphore() {
        let current = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let (cur, mx) = (current.clone(), max.clone());
        let server = serve(move |mut stream| {
            let (cur, mx) = (cur.clone(), mx.clone());
            async move {
                let now = cur.fetch_add(1, Ordering::SeqCst) + 1;
                mx.fetch_max(now, Ordering::SeqCst);
                let _ = read_request_head(&mut stream).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Leave before answering: the client holds its permit until
                // it has read the answer, so this count never lags it.
                cur.fetch_sub(1, Ordering::SeqCst);
                let _ = stream.write_all(&response(200)).await;
            }
        })
        .await;

        let (mut checker, mut rx, results) = checker(2);
        let s = spec(http("/", None), 50, 1000, 1, 1);
        checker.set_targets(
            (0..10)
                .map(|i| target(&format!("svc{i}"), server.addr, s.clone()))
                .collect(),
        );
        wait_until("12 checks", || results.lock().unwrap().len() >= 12).await;
        assert_eq!(max.load(Ordering::SeqCst), 2, "peak concurrent connections");
        assert!(results.lock().unwrap().iter().all(|r| *r == "success"));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn checks_are_jittered_and_paced_from_their_start() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let seen = starts.clone();
        let server = serve(move |mut stream| {
            seen.lock().unwrap().push(Instant::now());
            async move {
                let _ = read_request_head(&mut stream).await;
                // Each check takes twice the interval.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = stream.write_all(&response(200)).await;
            }
        })
        .await;

        let (mut checker, _rx, results) = checker(4);
        let began = Instant::now();
        checker.set_targets(vec![target(
            "web",
            server.addr,
            spec(http("/", None), 100, 1000, 1, 1),
        )]);
        wait_until("4 checks", || results.lock().unwrap().len() >= 4).await;

        let starts = starts.lock().unwrap().clone();
        // First check within [0, interval) plus scheduling slack.
        assert!(
            starts[0] - began < Duration::from_millis(180),
            "{:?}",
            starts[0] - began
        );
        for pair in starts.windows(2) {
            let gap = pair[1] - pair[0];
            // max(interval, check time) = 200ms; from the end it would be
            // at least 290ms.
            assert!(
                gap >= Duration::from_millis(180) && gap < Duration::from_millis(280),
                "gap {gap:?}"
            );
        }
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let t = target(
            "web",
            "127.0.0.1:80".parse().unwrap(),
            spec(CheckKind::Tcp, 1000, 100, 1, 1),
        );
        let samples: Vec<f64> = (0..1000).map(|i| random_fraction(&t, i)).collect();
        assert!(samples.iter().all(|f| (0.0..1.0).contains(f)));
        let below_half = samples.iter().filter(|f| **f < 0.5).count();
        assert!((350..650).contains(&below_half), "{below_half}");
        let interval = Duration::from_secs(1);
        for f in [0.0, 0.5, 0.999_999] {
            let period = scale(interval, 0.9 + 0.2 * f);
            assert!(period >= Duration::from_millis(900) && period <= Duration::from_millis(1100));
        }
        // Absurd durations fall back instead of panicking.
        assert_eq!(scale(Duration::MAX, 1.1), Duration::MAX);
    }
}
