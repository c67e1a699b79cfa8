//! Health checks against real local servers: probes, TLS, the scheduler.

use std::{
    collections::VecDeque,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    ServerConfig,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    server::Acceptor,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc::{UnboundedReceiver, error::TryRecvError, unbounded_channel},
    task::JoinHandle,
    time::Instant,
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

/// Status lines as hyper reads them: only an HTTP/1.x line with a
/// three-digit code counts, and a long head is cut off.
#[tokio::test]
async fn status_lines() {
    let t = Duration::from_secs(1);
    let answering = |reply: Vec<u8>| {
        serve(move |mut stream| {
            let reply = reply.clone();
            async move {
                let _ = read_request_head(&mut stream).await;
                let _ = stream.write_all(&reply).await;
            }
        })
    };
    for good in [
        &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
        b"HTTP/1.0 200\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    ] {
        let server = answering(good.to_vec()).await;
        let seen = check_once(&http("/", None), server.addr, t).await;
        assert!(
            seen.is_ok(),
            "{:?}: {seen:?}",
            String::from_utf8_lossy(good)
        );
    }
    let huge = [
        &b"HTTP/1.1 200 OK\r\nX-Pad: "[..],
        &[b'a'; 9000],
        b"\r\n\r\n",
    ]
    .concat();
    for bad in [
        &b""[..],
        b"HTTP/1.1",
        b"HTTP/1.1 20\r\n\r\n",
        b"HTTP/1.1 2000 x\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 x\r\n\r\n",
        &huge,
    ] {
        let server = answering(bad.to_vec()).await;
        let err = check_once(&http("/", None), server.addr, t)
            .await
            .unwrap_err();
        assert_eq!(
            err.label(),
            "bad_response",
            "{:?}: {err}",
            String::from_utf8_lossy(&bad[..bad.len().min(40)])
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
        st[&("web".to_owned(), a.addr)].checks >= 3 && st[&("web".to_owned(), b.addr)].checks >= 3
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
