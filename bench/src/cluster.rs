//! Several nodes behind an ECMP router, on the test suite's cluster topology
//! (lb + BIRD + etcd member per node): failover time, time for an API change
//! to reach every node's table, and each node's data-plane CPU under the
//! same offered load with 1 and with 3 nodes announcing.
use lb_tests::wait_for;
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::cluster::{Bird, Cluster, VIP, backend_addr};

use crate::{
    Scale,
    e2e::attached_programs,
    report::{Report, Table, num},
    results::{ClusterMetric, ClusterRow, FigureId, NodeCpuRow},
    sys,
};

const NODES: usize = 3;
const BACKENDS: usize = 3;

pub fn run(scale: &Scale, report: &mut Report) {
    let missing: Vec<&str> = ["bird", "birdc", "etcd", "etcdctl"]
        .into_iter()
        .filter(|c| !sys::have(c))
        .collect();
    if !missing.is_empty() {
        report.skip(format!(
            "cluster: {} missing (`cargo xtask setup` installs bird2, etcd-server, etcd-client)",
            missing.join(", ")
        ));
        return;
    }
    let mut c = Cluster::start_with_etcd(NODES, BACKENDS);
    let all: Vec<usize> = (0..NODES).collect();
    c.wait_next_hops(&all, Duration::from_secs(30));
    wait_for(
        "every node connected to etcd",
        Duration::from_secs(20),
        || (0..NODES).all(|i| c.lb(i).get("/api/v1/status").1["cluster"]["connected"] == true),
    );

    let changes = change_times(&c, scale.cluster_changes);
    let (cpu, offered) = cpu_phases(&mut c, scale);
    let failovers = failover_times(&mut c, scale.failovers);
    drop(c);

    let mut t = Table::new(
        format!("Cluster of {NODES} nodes: failover and change propagation"),
        &["what", "median ms", "min ms", "max ms", "samples"],
    );
    let stats = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (sys::median(v), min, max)
    };
    let (f_med, f_min, f_max) = stats(&failovers);
    let (c_med, c_min, c_max) = stats(&changes);
    t.row(vec![
        "node killed whole -> the router's withdrawal".into(),
        num(f_med),
        num(f_min),
        num(f_max),
        failovers.len().to_string(),
    ]);
    t.row(vec![
        format!("API change on one node -> equal new table on all {NODES}"),
        num(c_med),
        num(c_min),
        num(c_max),
        changes.len().to_string(),
    ]);
    t.note(
        "failover: the node's link goes down, then its lb, BIRD and etcd member get SIGKILL \
         (`Cluster::kill_node`); the time runs until the router's kernel route for the service \
         address has lost that next hop (BFD at 100 ms x 3 is what tells the router); the node \
         is brought back before the next trial",
    );
    t.note(
        "change: a backend's weight PATCHed through each node's API in turn (written to etcd \
         with compare-and-swap); the time runs until every node's table_fingerprint is equal \
         and new",
    );
    report.table(t);

    let mut t = Table::new(
        format!(
            "Cluster: data-plane CPU per node, {} HTTPS connections/s through the service \
             address for {:.0} s",
            scale.cluster_rate,
            scale.cluster_phase.as_secs_f64()
        ),
        &[
            "nodes announcing",
            "node",
            "packets",
            "run time ms",
            "ns/packet",
            "idle packets/s",
            "load packets",
            "load run time ms",
            "share of load",
        ],
    );
    for r in &cpu {
        t.row(vec![
            r.nodes_announcing.to_string(),
            format!("node{}", r.node),
            r.packets.to_string(),
            num(r.run_time_ms),
            num(r.ns_per_packet),
            num(r.idle_packets_per_s),
            r.load_packets.to_string(),
            num(r.load_run_time_ms),
            format!("{:.0}%", r.share * 100.0),
        ]);
    }
    t.note(
        "run time and packets: the kernel's BPF statistics (kernel.bpf_stats_enabled) of the \
         programs attached to each node's interface, over the load phase; 1 node: the other \
         two nodes' BIRD killed, so the router sends everything to node0",
    );
    t.note(
        "every node's programs also see its BGP, BFD, etcd and health-check packets (idle \
         packets/s, measured for as long without load before): load packets and load run \
         time are the phase's less the idle rate's; share: of all nodes' load run time",
    );
    report.table(t);

    use ClusterMetric as M;
    for (m, v) in [
        (M::FailoverMedianMs, f_med),
        (M::FailoverMinMs, f_min),
        (M::FailoverMaxMs, f_max),
        (M::ChangeToAllNodesMedianMs, c_med),
        (M::ChangeToAllNodesMaxMs, c_max),
    ] {
        report.figure(FigureId::Cluster(m), v);
    }
    for nodes in [1, NODES] {
        let rows: Vec<&NodeCpuRow> = cpu.iter().filter(|r| r.nodes_announcing == nodes).collect();
        let packets: u64 = rows.iter().map(|r| r.packets).sum();
        let ms: f64 = rows.iter().map(|r| r.run_time_ms).sum();
        let busiest = rows
            .iter()
            .max_by(|a, b| a.load_run_time_ms.total_cmp(&b.load_run_time_ms))
            .expect("a row per node");
        report.figure(
            FigureId::Cluster(M::NsPerPacket { nodes }),
            ms * 1e6 / packets.max(1) as f64,
        );
        report.figure(
            FigureId::Cluster(M::BusiestNodeShare { nodes }),
            busiest.share,
        );
        report.figure(
            FigureId::Cluster(M::BusiestNodeMsPerS { nodes }),
            busiest.load_run_time_ms / offered.as_secs_f64(),
        );
    }
    report.sections.cluster = Some(ClusterRow {
        nodes: NODES,
        failover_ms: failovers,
        change_to_all_nodes_ms: changes,
        load_conn_per_s: scale.cluster_rate,
        load_seconds: offered.as_secs_f64(),
        cpu,
    });
}

/// `n` weight changes of one backend, through node 0, 1, 2, 0, ... in
/// turn: ms from the API call until every node has the same new table.
fn change_times(c: &Cluster, n: usize) -> Vec<f64> {
    let backend = format!("{}:443", backend_addr(0));
    let mut times = Vec::new();
    for k in 0..n {
        let before = c.fingerprints();
        assert!(before.iter().all(|f| *f == before[0]), "{before:?}");
        let weight = if k % 2 == 0 { 200 } else { 100 };
        let node = c.lb(k % NODES);
        let t0 = Instant::now();
        let (status, body) = node.call(
            "PATCH",
            &format!("/api/v1/services/web/backends/{backend}"),
            Some(&format!("{{\"weight\": {weight}}}")),
            None,
        );
        assert_eq!(status, 200, "{body}\n{}", node.log());
        c.wait_new_table(
            "a change in every node's table",
            &before[0],
            Duration::from_secs(10),
        );
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        // Let the nodes settle (health publishes, watch) between changes.
        std::thread::sleep(Duration::from_millis(50));
    }
    times
}

/// Packets and run time (ns) of the programs on each node's interface.
fn program_counters(c: &Cluster) -> Vec<(u64, u64)> {
    let ids: Vec<Vec<u32>> = c
        .nodes
        .iter()
        .map(|ns| attached_programs(ns, "eth0"))
        .collect();
    let mut out = vec![(0u64, 0u64); c.nodes.len()];
    for p in aya::programs::loaded_programs().filter_map(Result::ok) {
        for (i, ids) in ids.iter().enumerate() {
            if ids.contains(&p.id()) {
                out[i].0 += p.run_count();
                out[i].1 += p.run_time().as_nanos() as u64;
            }
        }
    }
    out
}

fn minus(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.0.saturating_sub(y.0), x.1.saturating_sub(y.1)))
        .collect()
}

/// New HTTPS connections to the service address at `rate` a second for
/// `dur` (open loop), each from a new source port; how long it took with
/// every answer in.
fn offered_load(c: &Cluster, rate: u32, dur: Duration) -> (Duration, u64) {
    let tls = c.tls.clone();
    let to: SocketAddr = format!("{VIP}:443").parse().unwrap();
    let n = (rate as f64 * dur.as_secs_f64()) as u64;
    let t0 = Instant::now();
    let failed = c.client_rt.run(async move {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
            let tls = tls.clone();
            tasks.push(tokio::spawn(
                async move { tls.get(to, "/", None).await.is_ok() },
            ));
        }
        let mut failed = 0;
        for t in tasks {
            if !t.await.unwrap_or(false) {
                failed += 1;
            }
        }
        failed
    });
    (t0.elapsed(), failed)
}

/// The same load with all nodes announcing, then with node0 alone (the
/// others' BIRD killed, started again afterwards).
fn cpu_phases(c: &mut Cluster, scale: &Scale) -> (Vec<NodeCpuRow>, Duration) {
    // The kernel counts programs' run time while this is held.
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time statistics");
    let idle_start = program_counters(c);
    let t0 = Instant::now();
    std::thread::sleep(scale.cluster_phase);
    let idle = minus(&program_counters(c), &idle_start);
    let idle_secs = t0.elapsed().as_secs_f64();

    let mut rows = Vec::new();
    let mut offered = Duration::ZERO;
    for announcing in [NODES, 1] {
        if announcing == 1 {
            for i in 1..NODES {
                c.node_birds[i].kill();
            }
            c.wait_next_hops(&[0], Duration::from_secs(10));
        }
        // Warm up: ARP and the nodes' next-hop caches.
        offered_load(c, scale.cluster_rate, Duration::from_millis(200));
        let before = program_counters(c);
        let (took, failed) = offered_load(c, scale.cluster_rate, scale.cluster_phase);
        let delta = minus(&program_counters(c), &before);
        assert_eq!(
            failed, 0,
            "connections failed with {announcing} node(s) announcing"
        );
        offered = took;
        // The load's part: less what the idle phase saw in as long.
        let scale_idle = took.as_secs_f64() / idle_secs;
        let load: Vec<(f64, f64)> = delta
            .iter()
            .zip(&idle)
            .map(|(d, i)| {
                (
                    (d.0 as f64 - i.0 as f64 * scale_idle).max(0.0),
                    (d.1 as f64 - i.1 as f64 * scale_idle).max(0.0),
                )
            })
            .collect();
        let load_ns: f64 = load.iter().map(|l| l.1).sum();
        for (i, (packets, ns)) in delta.into_iter().enumerate() {
            rows.push(NodeCpuRow {
                nodes_announcing: announcing,
                node: i,
                packets,
                run_time_ms: ns as f64 / 1e6,
                ns_per_packet: ns as f64 / packets.max(1) as f64,
                idle_packets_per_s: idle[i].0 as f64 / idle_secs,
                load_packets: load[i].0 as u64,
                load_run_time_ms: load[i].1 / 1e6,
                share: load[i].1 / load_ns.max(1.0),
            });
        }
    }
    for i in 1..NODES {
        let config = c.node_birds[i].config.clone();
        c.node_birds[i] = Bird::start(&c.nodes[i], &config);
    }
    let all: Vec<usize> = (0..NODES).collect();
    c.wait_next_hops(&all, Duration::from_secs(30));
    (rows, offered)
}

/// `n` trials, killing node 0, 1, 2, 0, ... whole: ms from the kill until
/// the router's route has lost that node. The node comes back, and every
/// node announces again, before the next trial.
fn failover_times(c: &mut Cluster, n: usize) -> Vec<f64> {
    let all: Vec<usize> = (0..NODES).collect();
    let mut times = Vec::new();
    for k in 0..n {
        let i = k % NODES;
        let others: Vec<usize> = all.iter().copied().filter(|j| *j != i).collect();
        let t0 = Instant::now();
        c.kill_node(i);
        c.wait_next_hops(&others, Duration::from_secs(10));
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        if k + 1 < n {
            c.revive_node(i);
            c.wait_next_hops(&all, Duration::from_secs(30));
        }
    }
    times
}
