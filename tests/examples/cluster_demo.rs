//! `cargo xtask run -- --cluster N`: N balancer nodes (lb + BIRD + an etcd
//! member each) behind a router doing ECMP, in the test suite's cluster
//! topology (`lb_tests::cluster`), with a small HTTPS load through the
//! service address and one line a second of per-node and per-backend
//! traffic. Ctrl-C (or --for SECONDS) removes everything.
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
    cluster::{Cluster, ROUTER, VIP, backend_addr, node_addr},
    daemon::{Lb, lb_binary},
    topology::Metrics,
};

const USAGE: &str = "usage: lb-cluster-demo --cluster N [--for SECONDS]

Creates a client namespace, a router namespace (BIRD, ECMP over the nodes'
BGP announcements), N balancer nodes (lb in dsr mode, BIRD and an etcd
member each; N from 1 to 9) and three HTTPS backends on one bridge, runs a
small HTTPS load through the service address and prints each node's and each
backend's traffic every second. Ctrl-C (or --for SECONDS) stops it and
removes everything.";

/// The background load: a new connection (new source port, so ECMP spreads
/// them) this often, each request on its own task.
const LOAD_EVERY: Duration = Duration::from_millis(50);
/// And never for longer than this.
const LOAD_LIMIT: Duration = Duration::from_secs(3600);
const BACKENDS: usize = 3;

fn main() -> ExitCode {
    let mut limit = None;
    let mut nodes = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |what: &str| match args.next().and_then(|s| s.parse::<u64>().ok()) {
            Some(n) => Ok(n),
            None => Err(format!("{what} needs a number")),
        };
        let parsed = match a.as_str() {
            "--for" => number("--for").map(|s| limit = Some(Duration::from_secs(s))),
            "--cluster" => number("--cluster").and_then(|n| match n {
                1..=9 => {
                    nodes = Some(n as usize);
                    Ok(())
                }
                _ => Err(format!("--cluster takes 1 to 9 nodes, not {n}")),
            }),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other:?}")),
        };
        if let Err(e) = parsed {
            eprintln!("{e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let Some(nodes) = nodes else {
        eprintln!("--cluster N is missing\n\n{USAGE}");
        return ExitCode::from(2);
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "lb-cluster-demo creates network namespaces and loads eBPF programs: run it as root"
        );
        return ExitCode::FAILURE;
    }
    println!("lb-cluster-demo: using {}", lb_binary().display());

    // Signals first, so a Ctrl-C during setup still cleans up.
    let mut signals = lb_tests::demo::Signals::catch();

    println!(
        "lb-cluster-demo: creating the router, {nodes} nodes (lb, BIRD, etcd member each) and \
         {BACKENDS} backends..."
    );
    let mut cluster = Cluster::start_with_etcd(nodes, BACKENDS);
    println!("lb-cluster-demo: waiting for every node's BGP announcement to reach the router...");
    let all: Vec<usize> = (0..nodes).collect();
    cluster.wait_next_hops(&all, Duration::from_secs(30));
    print_intro(&cluster);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (tls, stop, ok, failed) = (
            cluster.tls.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        let to: SocketAddr = format!("{VIP}:443").parse().expect("the service address");
        cluster.client_rt.spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(LOAD_EVERY);
            while !stop.load(Ordering::SeqCst) && started.elapsed() < LOAD_LIMIT {
                tick.tick().await;
                let (tls, ok, failed) = (tls.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    match tls.get(to, "/", None).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                });
            }
        })
    };

    let started = Instant::now();
    let mut last = Last::default();
    let reason = signals.every_second(started, limit, || {
        restart_crashed(&mut cluster);
        summary(&cluster, started, &mut last, (&ok, &failed));
    });

    println!(
        "lb-cluster-demo: {reason}; stopping the load, the nodes, the router and the backends..."
    );
    stop.store(true, Ordering::SeqCst);
    cluster.client_rt.wait(load);
    let mut namespaces = vec![cluster.client.clone(), cluster.router.clone()];
    namespaces.extend(cluster.nodes.iter().cloned());
    namespaces.extend(cluster.backend_ns.iter().cloned());
    // Daemons, BIRDs, etcd members, servers, then the namespaces.
    drop(cluster);
    println!(
        "lb-cluster-demo: stopped every lb, BIRD and etcd member; removed namespaces {}; bye",
        namespaces.join(" ")
    );
    ExitCode::SUCCESS
}

fn print_intro(c: &Cluster) {
    let lb = lb_binary();
    let lb = lb.display();
    let sock = |i: usize| c.lb(i).socket.display().to_string();
    let mut nodes = String::new();
    for (i, ns) in c.nodes.iter().enumerate() {
        nodes += &format!(
            "\n  node{i}:      {ns}, {} (lb pid {}, BIRD pid {}, etcd member m{i}), admin socket {}",
            node_addr(i),
            c.lb(i).pid(),
            c.node_birds[i].pid(),
            sock(i),
        );
    }
    let backends: Vec<String> = (0..c.backends.len())
        .map(|i| format!("{}:443 ({})", backend_addr(i), c.backends[i].name))
        .collect();
    let last = c.nodes.len() - 1;
    let other = if last > 0 { 1 } else { 0 };
    let etcd_dir = c
        .etcd
        .as_ref()
        .map(|e| e.dir.0.display().to_string())
        .unwrap_or_default();
    println!(
        r#"
lb-cluster-demo is running.
  client:     {cl}, 10.214.0.2 (default route to the router)
  router:     {rt}, {ROUTER} on the bridge (BIRD: BGP + BFD with every node, ECMP into the kernel)
  service:    web, {VIP}:443 tcp, dsr, announced over BGP by every node that can serve it{nodes}
  backends:   {backends} (HTTPS, the service address on lo)
  files:      {dir} {etcd_dir}
              (configs, logs and sockets of lb and BIRD; etcd members' data and logs)

Try it from the client namespace (each new connection may take another node; the answer names
the backend, which is the same whichever node a connection takes):
  sudo ip netns exec {cl} curl -sk https://{VIP}/; echo
The router's next hops for the service address, one per announcing node:
  sudo ip netns exec {rt} ip route show {VIP}
  sudo birdc -s {router_ctl} show protocols
A node's view (announced or not and why, table fingerprint, etcd revision, live nodes):
  sudo {lb} status --socket {sock0}
Change the backends through one node: every node applies it through etcd, with equal tables:
  sudo {lb} backends remove -s web {b_last}:443 --socket {sock0}
  sudo {lb} backends add -s web {b_last}:443 --socket {sock_other}
Take node{last} away and watch the others take over (the router drops it through BFD within a
second; its line below stops growing):
  sudo ip -n {n_last} link set eth0 down
  sudo ip -n {n_last} link set eth0 up        (it rejoins: BGP, etcd, then it announces again)
  sudo kill -9 {pid_last}    (its lb crashes and is withdrawn at once; the demo starts it again)

Background load: one HTTPS request over a new connection every {every} ms. Each second: per node the
new flows and packets it balanced (with the change over the last second) and whether it announces
the service (and its table's fingerprint, equal on every node); per backend the new flows all
nodes sent it; then the load's results. Ctrl-C stops the
demo and removes everything.
"#,
        cl = c.client,
        rt = c.router,
        dir = c.dir.0.display(),
        backends = backends.join(", "),
        router_ctl = c.router_bird.socket.display(),
        sock0 = sock(0),
        sock_other = sock(other),
        b_last = backend_addr(c.backends.len() - 1),
        n_last = c.nodes[last],
        pid_last = c.lb(last).pid(),
        every = LOAD_EVERY.as_millis(),
    );
}

/// A node's lb that exited (`kill -9` from the operator) is started again.
fn restart_crashed(c: &mut Cluster) {
    for i in 0..c.nodes.len() {
        let exited = c.lbs[i]
            .as_mut()
            .and_then(|lb| lb.wait_exit(Duration::ZERO));
        if let Some(status) = exited {
            println!("lb-cluster-demo: node{i}'s lb exited ({status}); starting it again");
            let lb = c.start_lb(i);
            println!(
                "lb-cluster-demo: node{i}'s lb is back, pid {}; it announces again once its \
                 data plane is attached and a backend is usable",
                lb.pid()
            );
            c.lbs[i] = Some(lb);
        }
    }
}

/// The counters of the last summary, for the per-second changes.
#[derive(Default)]
struct Last {
    nodes: Vec<(u64, u64)>,
    backends: Vec<u64>,
}

/// One node's figures from its `/metrics`, `None` when its lb does not
/// answer.
struct NodeView {
    flows: u64,
    packets: u64,
    announced: bool,
    fingerprint: String,
    /// New flows per backend address.
    per_backend: BTreeMap<String, u64>,
}

fn node_view(lb: &Lb) -> Option<NodeView> {
    let (status, text) = lb.raw("GET", "/metrics", None, None);
    if status != 200 {
        return None;
    }
    let m = Metrics::parse(&text);
    let sum = |metric: &str| -> u64 {
        m.0.iter()
            .filter(|((name, _), _)| name == metric)
            .map(|(_, v)| *v as u64)
            .sum()
    };
    let label = |labels: &[(String, String)], key: &str| {
        labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let fingerprint =
        m.0.keys()
            .filter(|(name, _)| name == "lb_service_table_info")
            .find_map(|(_, labels)| label(labels, "fingerprint"))
            .unwrap_or_default();
    let mut per_backend = BTreeMap::new();
    for ((name, labels), v) in &m.0 {
        if name == "lb_new_flows_total"
            && let Some(b) = label(labels, "backend")
        {
            *per_backend.entry(b).or_insert(0) += *v as u64;
        }
    }
    Some(NodeView {
        per_backend,
        flows: sum("lb_new_flows_total"),
        packets: sum("lb_packets_total"),
        announced: sum("lb_service_announced") > 0,
        fingerprint,
    })
}

/// Counter `now` and its change since `before` (a restarted lb counts from
/// zero again).
fn with_change(now: u64, before: Option<u64>) -> String {
    let before = before.unwrap_or(now);
    format!("{now} (+{})", now.saturating_sub(before.min(now)))
}

/// One line: per node its new flows and packets (with the change over the
/// last second), whether it announces and its table's fingerprint; per
/// backend the new flows all nodes sent it; then the load's results.
fn summary(c: &Cluster, started: Instant, last: &mut Last, (ok, failed): (&AtomicU64, &AtomicU64)) {
    let mut parts = Vec::new();
    let mut now_nodes = Vec::new();
    let views: Vec<Option<NodeView>> = c
        .lbs
        .iter()
        .map(|l| l.as_ref().and_then(node_view))
        .collect();
    for (i, view) in views.iter().enumerate() {
        let Some(v) = view else {
            parts.push(format!("node{i} lb not answering"));
            now_nodes.push((0, 0));
            continue;
        };
        let before = last.nodes.get(i).copied();
        let short: String = v.fingerprint.chars().take(8).collect();
        parts.push(format!(
            "node{i} {} flows {} packets {} table {short}",
            if v.announced {
                "announced"
            } else {
                "withdrawn"
            },
            with_change(v.flows, before.map(|b| b.0)),
            with_change(v.packets, before.map(|b| b.1)),
        ));
        now_nodes.push((v.flows, v.packets));
    }
    let mut backends = Vec::new();
    let mut now_backends = Vec::new();
    for i in 0..c.backends.len() {
        let addr = format!("{}:443", backend_addr(i));
        let flows: u64 = views
            .iter()
            .flatten()
            .filter_map(|v| v.per_backend.get(&addr))
            .sum();
        backends.push(format!(
            "b{i} {}",
            with_change(flows, last.backends.get(i).copied())
        ));
        now_backends.push(flows);
    }
    last.nodes = now_nodes;
    last.backends = now_backends;
    println!(
        "[{:>4}s] {} || new flows per backend {} || https {} ok {} failed",
        started.elapsed().as_secs(),
        parts.join(" | "),
        backends.join(" "),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
}
