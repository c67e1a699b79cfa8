//! `cargo xtask run`: the balancer in front of three HTTPS backends, all in
//! network namespaces this demo creates (and removes on Ctrl-C), with a
//! small background load and a one-line-per-second summary.
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
    topology::{self, API, LB_V4, Metrics, ServiceConf, Site, TOKEN},
};

const USAGE: &str = "usage: lb-demo [--for SECONDS]

Creates a client namespace and a balancer namespace joined by a veth, three
HTTPS backends on ports 8001-8003 of the balancer's namespace, and the lb
daemon on port 443 there; prints how to try it, then a summary every second.
Ctrl-C (or --for SECONDS) stops it and removes everything.";

/// The background load: one request over a new connection this often.
const LOAD_EVERY: Duration = Duration::from_millis(200);
/// And never for longer than this.
const LOAD_LIMIT: Duration = Duration::from_secs(3600);

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
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut int, mut term) = signals.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).expect("SIGINT handler"),
            signal(SignalKind::terminate()).expect("SIGTERM handler"),
        )
    });

    println!("lb-demo: creating namespaces, backends and the daemon...");
    let site = Site::new("demo");
    let weights = [(8001u16, 100u16), (8002, 100), (8003, 200)];
    let backends: Vec<Backend> = weights.iter().map(|&(p, _)| site.backend(p)).collect();
    let mut svc = ServiceConf::tcp(&weights);
    svc.protocols = vec!["tcp", "udp"];
    svc.health = Some(
        r#"{ kind = "https", path = "/healthz", interval = "1s", timeout = "500ms", rise = 2, fall = 2 }"#
            .into(),
    );
    let daemon = site.start_lb(&svc);
    let ca = site.dir.path("ca.pem");
    std::fs::write(&ca, site.pki.ca_pem()).expect("write the CA certificate");
    print_intro(&site, &daemon, &backends, &weights, &ca);

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

    let started = Instant::now();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let reason = loop {
        let tick = signals.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => None,
                _ = int.recv() => Some("Ctrl-C"),
                _ = term.recv() => Some("SIGTERM"),
            }
        });
        if let Some(r) = tick {
            break r;
        }
        summary(&daemon, started, &mut last, &ok, &failed);
        if limit.is_some_and(|l| started.elapsed() >= l) {
            break "time is up";
        }
    };

    println!("lb-demo: {reason}; stopping the load, the daemon and the backends...");
    stop.store(true, Ordering::SeqCst);
    site.client.wait(load);
    drop(daemon);
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
    ca: &std::path::Path,
) {
    let (cl, lbns) = (&site.client_ns, &site.lb_ns);
    let list: Vec<String> = backends
        .iter()
        .zip(weights)
        .map(|(b, (_, w))| format!("{} (127.0.0.1:{}, weight {w})", b.name, b.port))
        .collect();
    let api = format!("http://{API}");
    println!(
        r#"
lb-demo is running.
  namespaces: {cl} (client, {client_ip} on cl0) and {lbns} (balancer, {LB_V4} on lb0)
  service:    web, 0.0.0.0:443 tcp+udp -> {list}
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

Background load: one HTTPS request every {every} ms. Ctrl-C stops the demo and removes everything.
"#,
        client_ip = topology::CLIENT_V4,
        list = list.join(", "),
        pid = daemon.pid(),
        log = daemon_log(site).display(),
        ca = ca.display(),
        lb = lb_binary().display(),
        sock = daemon.socket.display(),
        every = LOAD_EVERY.as_millis(),
    );
}

/// Where `Lb::start` writes the daemon's log for the first start.
fn daemon_log(site: &Site) -> std::path::PathBuf {
    site.dir.path("lb.0.log")
}

/// One line: new flows per backend (from /metrics, with the change over the
/// last second), health and state (from the API), the load's results.
fn summary(
    daemon: &Lb,
    started: Instant,
    last: &mut BTreeMap<String, u64>,
    ok: &AtomicU64,
    failed: &AtomicU64,
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
        let flows = m.backend("lb_new_flows_total", addr.port());
        let before = last.insert(addr.to_string(), flows).unwrap_or(flows);
        let health = match (b["healthy"].as_bool(), b["state"].as_str()) {
            (Some(false), _) => "DOWN",
            (_, Some("active")) => "up",
            (_, Some(state)) => state,
            _ => "?",
        };
        parts.push(format!(
            ":{} {flows:>5} (+{}) {health}",
            addr.port(),
            flows - before.min(flows)
        ));
    }
    println!(
        "[{:>4}s] requests per backend: {} | load {} ok {} failed",
        started.elapsed().as_secs(),
        parts.join("  "),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
}
