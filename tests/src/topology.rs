//! The end-to-end topology: a client namespace and a balancer namespace
//! joined by a veth, real HTTPS backends on ports of the balancer's
//! namespace, and the `lb` daemon attached to its end of the veth. Tokio
//! runtimes whose threads live in one namespace run the servers and the
//! clients. Dropping a `Site` stops everything and deletes the namespaces,
//! also when a test panics.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    daemon::{Lb, TempDir},
    https::{Backend, ClientTls, Identity, Pki},
    netns::{self, Topology},
};

/// Addresses of the balancer's and the client's end of the veth.
pub const LB_V4: &str = "10.202.0.1";
pub const CLIENT_V4: &str = "10.202.0.2";
pub const LB_V6: &str = "fd00:202::1";
pub const CLIENT_V6: &str = "fd00:202::2";
/// The veth ends.
pub const LB_IF: &str = "lb0";
pub const CLIENT_IF: &str = "cl0";
/// The admin API, inside the balancer's namespace.
pub const API: &str = "127.0.0.1:9180";
/// The admin token the config sets.
pub const TOKEN: &str = "e2e-token";

/// A multi-threaded tokio runtime whose every thread runs inside one
/// network namespace, so sockets its tasks make belong there. Futures are
/// always spawned onto it (never polled on the caller's thread).
pub struct NsRuntime {
    pub ns: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl NsRuntime {
    pub fn new(ns: &str, threads: usize) -> NsRuntime {
        let name = ns.to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(4)
            .enable_all()
            .thread_name(format!("rt-{ns}"))
            .on_thread_start(move || netns::enter(&name))
            .build()
            .expect("tokio runtime");
        NsRuntime {
            ns: ns.to_string(),
            rt: Some(rt),
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime")
    }

    /// Starts `fut` on the runtime's threads.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt().spawn(fut)
    }

    /// Runs `fut` on the runtime's threads and waits for it (from outside
    /// any runtime).
    pub fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.wait(self.spawn(fut))
    }

    /// Waits for a task spawned earlier, re-raising its panic.
    pub fn wait<T>(&self, task: tokio::task::JoinHandle<T>) -> T {
        match self.rt().block_on(task) {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("task failed: {e}"),
        }
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A backend of a service as the config lists it.
#[derive(Clone, Copy, Debug)]
pub struct BackendConf {
    pub port: u16,
    pub weight: u16,
    /// A QUIC-LB server id (hex) for the config; the daemon assigns one
    /// when absent.
    pub server_id: Option<&'static str>,
}

/// The one service the daemon balances: `0.0.0.0:443` to ports of
/// `127.0.0.1` in the balancer's namespace.
#[derive(Clone, Debug)]
pub struct ServiceConf {
    pub protocols: Vec<&'static str>,
    /// A TOML inline table, e.g. `{ kind = "tcp", interval = "200ms" }`.
    pub health: Option<String>,
    pub backends: Vec<BackendConf>,
    /// The service's QUIC-LB table, e.g. `{ config_id = 1, server_id_len
    /// = 2, nonce_len = 8, mode = "plaintext" }`.
    pub quic: Option<String>,
}

impl ServiceConf {
    pub fn tcp(backends: &[(u16, u16)]) -> ServiceConf {
        ServiceConf {
            protocols: vec!["tcp"],
            health: None,
            backends: backends
                .iter()
                .map(|&(port, weight)| BackendConf {
                    port,
                    weight,
                    server_id: None,
                })
                .collect(),
            quic: None,
        }
    }
}

/// Client and balancer namespaces, their runtimes, the test CA, and a
/// scratch directory. Fields drop in order: clients, servers, namespaces.
pub struct Site {
    pub client: NsRuntime,
    pub servers: NsRuntime,
    pub pki: Pki,
    pub tls: ClientTls,
    pub lb_ns: String,
    pub client_ns: String,
    _topo: Topology,
    pub dir: TempDir,
    /// `dataplane.xdp_mode` of the daemon's config: "native" unless made
    /// with [`Site::with_mode`].
    pub xdp_mode: &'static str,
}

impl Site {
    /// Builds the namespaces and the veth (IPv4 and IPv6, no DAD).
    pub fn new(tag: &str) -> Site {
        Self::with_mode(tag, "native")
    }

    /// [`Site::new`] with the daemon attached in `xdp_mode` ("native",
    /// "tc", ...); `tag` gets the mode appended, so rows of one test differ.
    pub fn with_mode(tag: &str, xdp_mode: &'static str) -> Site {
        let tag = &format!("{tag}-{xdp_mode}");
        let mut topo = Topology::new();
        let lb_ns = topo.namespace("lb");
        let client_ns = topo.namespace("client");
        let lb_addrs = [format!("{LB_V4}/24"), format!("{LB_V6}/64")];
        let client_addrs = [format!("{CLIENT_V4}/24"), format!("{CLIENT_V6}/64")];
        topo.veth(
            (&lb_ns, LB_IF, &[&lb_addrs[0], &lb_addrs[1]]),
            (&client_ns, CLIENT_IF, &[&client_addrs[0], &client_addrs[1]]),
        );
        let pki = Pki::new();
        let tls = pki.client(&[]);
        Site {
            client: NsRuntime::new(&client_ns, 2),
            servers: NsRuntime::new(&lb_ns, 2),
            pki,
            tls,
            lb_ns,
            client_ns,
            _topo: topo,
            dir: TempDir::new(tag),
            xdp_mode,
        }
    }

    /// The service address clients use (port 443).
    pub fn v4(&self) -> SocketAddr {
        format!("{LB_V4}:443").parse().unwrap()
    }

    pub fn v6(&self) -> SocketAddr {
        format!("[{LB_V6}]:443").parse().unwrap()
    }

    /// The name of the backend on `port` (its certificate's name too).
    pub fn backend_name(port: u16) -> String {
        format!("backend-{port}.test")
    }

    /// Starts an HTTPS + UDP echo backend on `port` with a certificate of
    /// its own, which the client learns.
    pub fn backend(&self, port: u16) -> Backend {
        let identity: Identity = self.pki.issue(&Self::backend_name(port));
        self.tls.learn(&identity);
        Backend::start(&self.servers, port, identity)
    }

    /// [`Site::backend`] without the UDP echo: the port's UDP side is left
    /// to a QUIC server.
    pub fn https_backend(&self, port: u16) -> Backend {
        let identity: Identity = self.pki.issue(&Self::backend_name(port));
        self.tls.learn(&identity);
        Backend::start_with(&self.servers, port, identity, false)
    }

    /// Writes the daemon's config (native XDP on the veth, the admin API
    /// with a token, a state file of its own) and returns its path.
    pub fn config(&self, svc: &ServiceConf) -> PathBuf {
        self.config_with(svc, false)
    }

    /// [`Site::config`] plus `web6`, the same service on `[::]:443`: a
    /// wildcard serves one family, so IPv6 clients need a service of their own.
    pub fn config_dual(&self, svc: &ServiceConf) -> PathBuf {
        self.config_with(svc, true)
    }

    fn config_with(&self, svc: &ServiceConf, dual: bool) -> PathBuf {
        let token = self.dir.secret("token", &format!("{TOKEN}\n"));
        let backends: Vec<String> = svc
            .backends
            .iter()
            .map(|b| {
                let sid = b
                    .server_id
                    .map(|s| format!(", server_id = \"{s}\""))
                    .unwrap_or_default();
                format!(
                    "{{ address = \"127.0.0.1:{}\", weight = {}{sid} }}",
                    b.port, b.weight
                )
            })
            .collect();
        let protocols: Vec<String> = svc.protocols.iter().map(|p| format!("{p:?}")).collect();
        let health = svc
            .health
            .as_ref()
            .map(|h| format!("health = {h}\n"))
            .unwrap_or_default()
            + &svc
                .quic
                .as_ref()
                .map(|q| format!("quic = {q}\n"))
                .unwrap_or_default();
        let text = format!(
            r#"[dataplane]
interface = "{LB_IF}"
xdp_mode = "{xdp_mode}"
flow_table_size = 65536
max_services = 4

[admin]
listen = "{API}"
token_file = {token:?}
state_file = {state:?}

[[services]]
name = "web"
listen = "0.0.0.0:443"
protocols = [{protocols}]
forwarding = "local"
{health}backends = [{backends}]
{web6}"#,
            web6 = if dual {
                format!(
                    "\n[[services]]\nname = \"web6\"\nlisten = \"[::]:443\"\nprotocols = [{}]\n\
                     forwarding = \"local\"\n{health}backends = [{}]\n",
                    protocols.join(", "),
                    backends.join(", ")
                )
            } else {
                String::new()
            },
            xdp_mode = self.xdp_mode,
            token = token.display().to_string(),
            state = self.dir.path("state.json").display().to_string(),
            protocols = protocols.join(", "),
            backends = backends.join(", "),
        );
        let path = self.dir.path("lb.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts `lb run` with [`Site::config`] and waits for its API.
    pub fn start_lb(&self, svc: &ServiceConf) -> Lb {
        let config = self.config(svc);
        Lb::start(&self.lb_ns, &config, API, &["--reset-state"])
    }

    /// Starts `lb run` with [`Site::config_dual`]: `web` for IPv4 clients,
    /// `web6` (same backends) for IPv6 ones.
    pub fn start_lb_dual(&self, svc: &ServiceConf) -> Lb {
        let config = self.config_dual(svc);
        Lb::start(&self.lb_ns, &config, API, &["--reset-state"])
    }
}

/// An API change with the token; panics unless the status is `want`.
pub fn change(lb: &Lb, method: &str, path: &str, body: Option<&str>, want: u16) -> Value {
    let (status, v) = lb.call(method, path, body, Some(TOKEN));
    assert_eq!(status, want, "{method} {path} {body:?}: {v}\n{}", lb.log());
    v
}

/// The `web` service's backends as the API shows them, by port.
pub fn backends(lb: &Lb) -> HashMap<u16, Value> {
    let (status, v) = lb.get("/api/v1/services/web/backends");
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let addr: SocketAddr = b["address"].as_str()?.parse().ok()?;
            Some((addr.port(), b.clone()))
        })
        .collect()
}

/// The QUIC-LB server ids (hex in the API) of the `web` service's
/// backends, by port; panics if one has none.
pub fn server_ids(lb: &Lb) -> HashMap<u16, Vec<u8>> {
    backends(lb)
        .into_iter()
        .map(|(port, b)| {
            let hex = b["server_id"]
                .as_str()
                .unwrap_or_else(|| panic!("backend {port} shows no server_id: {b}"));
            assert!(hex.len() % 2 == 0, "backend {port}: odd hex {hex:?}");
            let id = (0..hex.len())
                .step_by(2)
                .map(|i| {
                    u8::from_str_radix(&hex[i..i + 2], 16)
                        .unwrap_or_else(|e| panic!("backend {port}: {hex:?}: {e}"))
                })
                .collect();
            (port, id)
        })
        .collect()
}

/// Waits until the API says the backend on `port` is (un)healthy; returns
/// how long that took.
pub fn wait_health(lb: &Lb, port: u16, healthy: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if backends(lb).get(&port).and_then(|b| b["healthy"].as_bool()) == Some(healthy) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "backend {port} not healthy={healthy} after {within:?}:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Prometheus text, parsed: (metric name, sorted labels) -> value.
pub struct Metrics(pub HashMap<(String, Vec<(String, String)>), f64>);

impl Metrics {
    pub fn scrape(lb: &Lb) -> Metrics {
        let (status, text) = lb.raw("GET", "/metrics", None, None);
        assert_eq!(status, 200, "{text}");
        Metrics::parse(&text)
    }

    pub fn parse(text: &str) -> Metrics {
        let mut out = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut labels: Vec<(String, String)> = labels
                .split("\",")
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
                .collect();
            labels.sort();
            out.insert((name.to_string(), labels), value);
        }
        Metrics(out)
    }

    /// A per-backend series of service `web` (0 when absent).
    /// A backend's metric summed over `web` and `web6` (its IPv6 twin).
    pub fn backend(&self, name: &str, port: u16) -> u64 {
        ["web", "web6"]
            .iter()
            .map(|svc| {
                let labels = vec![
                    ("backend".to_string(), format!("127.0.0.1:{port}")),
                    ("service".to_string(), svc.to_string()),
                ];
                self.0
                    .get(&(name.to_string(), labels))
                    .copied()
                    .unwrap_or(0.0) as u64
            })
            .sum()
    }
}

/// One frame the client sent towards the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentFrame {
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub sport: u16,
    /// A TCP SYN without ACK: a new connection.
    pub syn: bool,
    /// The whole frame, Ethernet header included (what XDP counts).
    pub len: usize,
}

/// Counts, with an AF_PACKET socket, every frame a namespace sends out of
/// one interface to `service` port 443 (TCP or UDP): the packets the
/// balancer's XDP program must see, independent of the balancer.
pub struct TxCapture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(Vec<SentFrame>, u32)>>,
}

const PACKET_OUTGOING: u8 = 4;

impl TxCapture {
    pub fn start(ns: &str, ifname: &str, service: [std::net::IpAddr; 2]) -> TxCapture {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let ifname = std::ffi::CString::new(ifname).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = netns::spawn_in(ns, move || {
            let fd = Fd(crate::capture::packet_socket(&ifname));
            fd.set(libc::SO_RCVBUFFORCE, &(16i32 << 20));
            fd.set(
                libc::SO_RCVTIMEO,
                &libc::timeval {
                    tv_sec: 0,
                    tv_usec: 20_000,
                },
            );
            ready_tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                // SAFETY: sockaddr_ll is plain integers; all zeroes is valid.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: `buf` is writable for `buf.len()` bytes, `from`
                // for `from_len` bytes; both live across the call.
                let n = unsafe {
                    libc::recvfrom(
                        fd.0,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_TRUNC,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n < 0 {
                    // Timeout: stop once asked and the queue is empty.
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    continue;
                }
                let n = n as usize;
                if from.sll_pkttype != PACKET_OUTGOING {
                    continue;
                }
                if let Some(f) = classify(&buf[..n.min(buf.len())], n, &service) {
                    frames.push(f);
                }
            }
            let mut stats = [0u32; 2];
            let mut len = size_of::<[u32; 2]>() as libc::socklen_t;
            // SAFETY: `stats` is writable for the `len` bytes given.
            unsafe {
                libc::getsockopt(
                    fd.0,
                    libc::SOL_PACKET,
                    libc::PACKET_STATISTICS,
                    stats.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            (frames, stats[1])
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture did not start");
        TxCapture {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops and returns the frames, failing if the socket dropped any.
    pub fn finish(mut self) -> Vec<SentFrame> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (frames, drops) = self
            .handle
            .take()
            .unwrap()
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        assert_eq!(drops, 0, "the capture socket dropped {drops} frames");
        frames
    }
}

impl Drop for TxCapture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Fd(i32);

impl Fd {
    fn set<T>(&self, opt: i32, v: &T) {
        // SAFETY: `v` is a live `T` and the length given is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.0,
                libc::SOL_SOCKET,
                opt,
                (v as *const T).cast(),
                size_of::<T>() as u32,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt {opt}: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this `Fd` and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// A frame to one of the service addresses, port 443, TCP or UDP.
fn classify(f: &[u8], len: usize, service: &[std::net::IpAddr; 2]) -> Option<SentFrame> {
    use std::net::IpAddr;
    let ethertype = u16::from_be_bytes(f.get(12..14)?.try_into().ok()?);
    let (proto, dst, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(f.get(14)? & 0x0f) * 4;
            let dst: [u8; 4] = f.get(30..34)?.try_into().ok()?;
            (*f.get(23)?, IpAddr::from(dst), 14 + ihl)
        }
        0x86dd => {
            let dst: [u8; 16] = f.get(38..54)?.try_into().ok()?;
            (*f.get(20)?, IpAddr::from(dst), 54)
        }
        _ => return None,
    };
    if !service.contains(&dst) || (proto != 6 && proto != 17) {
        return None;
    }
    let sport = u16::from_be_bytes(f.get(l4..l4 + 2)?.try_into().ok()?);
    let dport = u16::from_be_bytes(f.get(l4 + 2..l4 + 4)?.try_into().ok()?);
    if dport != 443 {
        return None;
    }
    let syn = proto == 6 && f.get(l4 + 13)? & 0x12 == 0x02;
    Some(SentFrame {
        proto,
        sport,
        syn,
        len,
    })
}

/// Prints the daemon's log if the test panics while this lives.
pub struct LogOnPanic<'a>(pub &'a Lb);

impl Drop for LogOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- lb log ----\n{}---- end of lb log ----", self.0.log());
        }
    }
}
