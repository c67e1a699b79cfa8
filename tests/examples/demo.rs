//! `cargo xtask run`: the balancer in front of three HTTPS + QUIC backends,
//! all in network namespaces this demo creates (and removes on Ctrl-C), with
//! a small background load (HTTPS requests, QUIC connections that move to a
//! new port now and then) and a one-line-per-second summary.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Lb, lb_binary},
    https::Backend,
    quic::{Cids, LbCids, PLAINTEXT_TOML, QuicClient, QuicConn, QuicServer, plaintext_config},
    topology::{self, API, LB_V4, Metrics, ServiceConf, Site, TOKEN},
};

const USAGE: &str = "usage: lb-demo [--for SECONDS]

Creates a client namespace and a balancer namespace joined by a veth, three
backends on ports 8001-8003 of the balancer's namespace (HTTPS on TCP, QUIC
with QUIC-LB connection IDs on UDP), and the lb daemon on port 443 there;
prints how to try it, then a summary every second. Ctrl-C (or --for SECONDS)
stops it and removes everything.";

/// The background load: one request over a new connection this often.
const LOAD_EVERY: Duration = Duration::from_millis(200);
/// And never for longer than this.
const LOAD_LIMIT: Duration = Duration::from_secs(3600);
/// The QUIC load: this often a new connection, and one of the open ones
/// reads some bytes, moving to a new local port halfway.
const QUIC_EVERY: Duration = Duration::from_secs(1);
/// QUIC connections kept open (the oldest closes when a new one opens).
const QUIC_OPEN: usize = 4;

fn main() -> ExitCode {
    let mut limit = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--for" => match args.next().and_then(|s| s.parse::<u64>().ok()) {
                Some(s) => limit = Some(Duration::from_secs(s)),
                None => {
                    eprintln!("--for needs a number of seconds\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lb-demo creates network namespaces and loads eBPF programs: run it as root");
        return ExitCode::FAILURE;
    }
    let lb = lb_binary();
    println!("lb-demo: using {}", lb.display());

    // Signals first, so a Ctrl-C during setup still cleans up.
    let mut signals = lb_tests::demo::Signals::catch();

    println!("lb-demo: creating namespaces, backends and the daemon...");
    let site = Site::new("demo");
    let weights = [(8001u16, 100u16), (8002, 100), (8003, 200)];
    let backends: Vec<Backend> = weights
        .iter()
        .map(|&(p, _)| site.https_backend(p))
        .collect();
    let mut svc = ServiceConf::tcp(&weights);
    svc.protocols = vec!["tcp", "udp"];
    svc.quic = Some(PLAINTEXT_TOML.to_string());
    svc.health = Some(
        r#"{ kind = "https", path = "/healthz", interval = "1s", timeout = "500ms", rise = 2, fall = 2 }"#
            .into(),
    );
    let daemon = site.start_lb(&svc);
    // Each backend's QUIC server issues CIDs with the server id the daemon
    // assigned it.
    let ids = topology::server_ids(&daemon);
    let quic: Vec<QuicServer> = backends
        .iter()
        .map(|b| {
            let cids = LbCids::new(plaintext_config(), &ids[&b.port]).expect("a valid server id");
            QuicServer::start(
                &site.servers,
                SocketAddr::from(([0, 0, 0, 0], b.port)),
                &b.identity,
                Cids::Lb(cids),
            )
        })
        .collect();
    let ca = site.dir.path("ca.pem");
    std::fs::write(&ca, site.pki.ca_pem()).expect("write the CA certificate");
    print_intro(&site, &daemon, &backends, &weights, &ids, &ca);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (tls, to, stop, ok, failed) = (
            site.tls.clone(),
            site.v4(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        site.client.spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(LOAD_EVERY);
            while !stop.load(Ordering::SeqCst) && started.elapsed() < LOAD_LIMIT {
                tick.tick().await;
                match tls.get(to, "/", None).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    let quic_load = QuicLoad::default();
    let quic_task = site.client.spawn(quic_load.clone().run(
        QuicClient::new(&site.pki),
        site.v4(),
        stop.clone(),
    ));

    let started = Instant::now();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let reason = signals.every_second(started, limit, || {
        summary(
            &daemon,
            started,
            &mut last,
            (&backends, &quic),
            (&ok, &failed),
            &quic_load,
        );
    });

    println!("lb-demo: {reason}; stopping the load, the daemon and the backends...");
    stop.store(true, Ordering::SeqCst);
    site.client.wait(load);
    site.client.wait(quic_task);
    drop(daemon);
    drop(quic);
    drop(backends);
    let namespaces = [site.client_ns.clone(), site.lb_ns.clone()];
    drop(site);
    println!(
        "lb-demo: removed namespaces {} and {}; bye",
        namespaces[0], namespaces[1]
    );
    ExitCode::SUCCESS
}

fn print_intro(
    site: &Site,
    daemon: &Lb,
    backends: &[Backend],
    weights: &[(u16, u16)],
    ids: &std::collections::HashMap<u16, Vec<u8>>,
    ca: &std::path::Path,
) {
    let (cl, lbns) = (&site.client_ns, &site.lb_ns);
    let list: Vec<String> = backends
        .iter()
        .zip(weights)
        .map(|(b, (_, w))| {
            let id: String = ids
                .get(&b.port)
                .map(|id| id.iter().map(|x| format!("{x:02x}")).collect())
                .unwrap_or_default();
            format!(
                "{} (127.0.0.1:{}, weight {w}, QUIC server id {id})",
                b.name, b.port
            )
        })
        .collect();
    let api = format!("http://{API}");
    println!(
        r#"
lb-demo is running.
  namespaces: {cl} (client, {client_ip} on cl0) and {lbns} (balancer, {LB_V4} on lb0)
  service:    web, 0.0.0.0:443 tcp+udp, QUIC-LB {quic} ->
              {list}
  daemon:     pid {pid}, log {log}

Try it from the client namespace (each new connection is balanced; the answer
and the certificate name the backend, TLS passes through untouched):
  sudo ip netns exec {cl} curl -k https://{LB_V4}/
  sudo ip netns exec {cl} curl -sv --cacert {ca} --resolve lb.test:443:{LB_V4} https://lb.test/ 2>&1 | grep -E 'subject|backend'

The admin API listens on its Unix socket {sock} (root only, no token
needed; the lb CLI's way in) and on {API} inside the balancer's namespace,
where every request but /healthz needs the demo's token:
  sudo curl --unix-socket {sock} http://localhost/api/v1/services
  sudo ip netns exec {lbns} curl -H 'Authorization: Bearer {TOKEN}' {api}/metrics
  sudo curl --unix-socket {sock} -X PATCH -H 'Content-Type: application/json' \
      -d '{{"state": "draining"}}' http://localhost/api/v1/services/web/backends/127.0.0.1:8003
or with the lb CLI:
  sudo {lb} status --socket {sock}
  sudo {lb} backends activate -s web 127.0.0.1:8003 --socket {sock}

Background load: one HTTPS request every {every} ms; a new QUIC connection
every second ({open} kept open), and one of them reads 256 KiB moving to a new
UDP port halfway: with QUIC-LB it keeps its backend. The QUIC servers issue
connection IDs carrying the server ids above (config id 1, 2-byte server id,
8-byte nonce, plaintext). Ctrl-C stops the demo and removes everything.
"#,
        client_ip = topology::CLIENT_V4,
        list = list.join(",\n              "),
        quic = PLAINTEXT_TOML,
        pid = daemon.pid(),
        log = daemon_log(site).display(),
        ca = ca.display(),
        lb = lb_binary().display(),
        sock = daemon.socket.display(),
        every = LOAD_EVERY.as_millis(),
        open = QUIC_OPEN,
    );
}

/// Where `Lb::start` writes the daemon's log for the first start.
fn daemon_log(site: &Site) -> std::path::PathBuf {
    site.dir.path("lb.0.log")
}

/// What the QUIC load did so far.
#[derive(Clone, Default)]
struct QuicLoad {
    opened: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Moves that kept their backend, and those that did not.
    kept: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
}

impl QuicLoad {
    /// Every [`QUIC_EVERY`]: a new connection (the oldest of
    /// [`QUIC_OPEN`] closes), and the next open one reads 256 KiB, moving to
    /// a new local port after 64 KiB, then asks who serves it.
    async fn run(self, client: QuicClient, to: SocketAddr, stop: Arc<AtomicBool>) {
        let started = Instant::now();
        let mut open: Vec<(QuicConn, String)> = Vec::new();
        let mut tick = tokio::time::interval(QUIC_EVERY);
        let mut next = 0;
        while !stop.load(Ordering::SeqCst) && started.elapsed() < LOAD_LIMIT {
            tick.tick().await;
            let limit = Duration::from_secs(5);
            match tokio::time::timeout(limit, async {
                let conn = client.connect(to).await?;
                let who = conn.who().await?;
                anyhow::Ok((conn, who.name))
            })
            .await
            {
                Ok(Ok(c)) => {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    if open.len() == QUIC_OPEN {
                        open.remove(0);
                    }
                    open.push(c);
                }
                _ => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if open.is_empty() {
                continue;
            }
            next = (next + 1) % open.len();
            let (conn, name) = &open[next];
            let moved = tokio::time::timeout(limit, async {
                conn.fetch(256 << 10, Some(64 << 10)).await?;
                conn.who().await
            })
            .await;
            match moved {
                Ok(Ok(who)) if who.name == *name => self.kept.fetch_add(1, Ordering::Relaxed),
                _ => {
                    open.remove(next);
                    self.lost.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

/// One line: per backend the new flows (from /metrics, with the change over
/// the last second) split into TCP (the connections the HTTPS server
/// accepted) and UDP (the rest), the QUIC connections its server took, its
/// health and state (from the API); then the loads' results.
fn summary(
    daemon: &Lb,
    started: Instant,
    last: &mut BTreeMap<String, u64>,
    (https, quic): (&[Backend], &[QuicServer]),
    (ok, failed): (&AtomicU64, &AtomicU64),
    load: &QuicLoad,
) {
    let (status, text) = daemon.raw("GET", "/metrics", None, None);
    if status != 200 {
        println!(
            "[{:>4}s] the admin API does not answer; is the daemon still running?",
            started.elapsed().as_secs()
        );
        return;
    }
    let m = Metrics::parse(&text);
    let mut parts = Vec::new();
    let mut backends: Vec<(SocketAddr, serde_json::Value)> = topology::backends(daemon)
        .into_values()
        .filter_map(|b| Some((b["address"].as_str()?.parse().ok()?, b)))
        .collect();
    backends.sort_by_key(|(a, _)| *a);
    for (addr, b) in &backends {
        let port = addr.port();
        let flows = m.backend("lb_new_flows_total", port);
        let before = last.insert(addr.to_string(), flows).unwrap_or(flows);
        let tcp = https
            .iter()
            .find(|s| s.port == port)
            .map_or(0, |s| s.stats().accepted);
        let conns = quic
            .iter()
            .find(|s| s.addr.port() == port)
            .map_or(0, |s| s.stats().connections);
        let health = match (b["healthy"].as_bool(), b["state"].as_str()) {
            (Some(false), _) => "DOWN",
            (_, Some("active")) => "up",
            (_, Some(state)) => state,
            _ => "?",
        };
        parts.push(format!(
            ":{port} {flows:>4} (+{}) tcp {tcp} udp {} quic {conns} {health}",
            flows - before.min(flows),
            flows.saturating_sub(tcp),
        ));
    }
    // The balancer's view of the QUIC packets: routed by the server id in
    // their CID, or by the 4-tuple (long headers and the like).
    let (mut by_cid, mut fallback) = (0, 0);
    for ((name, labels), v) in &m.0 {
        if name != "lb_quic_packets_total" {
            continue;
        }
        match labels.iter().find(|(k, _)| k == "route") {
            Some((_, r)) if r == "cid" => by_cid += *v as u64,
            Some(_) => fallback += *v as u64,
            None => {}
        }
    }
    println!(
        "[{:>4}s] requests per backend: {} | https {} ok {} failed | quic {} opened {} failed, \
         moves {} kept {} lost, packets {by_cid} by CID {fallback} by 4-tuple",
        started.elapsed().as_secs(),
        parts.join("  "),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        load.opened.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
        load.kept.load(Ordering::Relaxed),
        load.lost.load(Ordering::Relaxed),
    );
}
