//! The table gate on the whole topology (router with ECMP, 3 nodes
//! each with lb, BIRD and an etcd member): a node announces only while its
//! table is the cluster's. Changes under traffic withdraw nobody; a node
//! whose table really differs (a node-local Maglev table size) never
//! announces, nor does one that refuses the cluster's services (a
//! node-local policy); a node that rejoins while etcd is unreachable announces
//! nothing until it has synced and its fingerprint is the cluster's
//! (scenario 5).
use lb_tests::wait_for;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{Cluster, backend_addr, new_flows, node_addr, router_next_hops},
    topology::Metrics,
};
use rustix::process::Signal;

/// One cluster at a time: the gate's grace and the samples' timings want
/// the CPU (two clusters are 6 daemons, 8 BIRDs and 6 etcd members).
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_cluster() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn addrs(nodes: &[usize]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|i| node_addr(*i)).collect();
    v.sort();
    v
}

/// The router's next hops sampled every few ms on a thread of its own
/// until [`HopLog::finish`]: every set seen, with when.
struct HopLog {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Duration, Vec<String>)>>,
}

impl HopLog {
    fn start(c: &Cluster) -> HopLog {
        let router = c.router.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut seen = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                seen.push((t0.elapsed(), router_next_hops(&router)));
                std::thread::sleep(Duration::from_millis(3));
            }
            seen
        });
        HopLog { stop, thread }
    }

    /// Stops sampling; asserts every sample was `want`, returns how many.
    fn finish(self, want: &[usize]) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let seen = self.thread.join().unwrap();
        let want = addrs(want);
        let other: Vec<_> = seen.iter().filter(|(_, h)| *h != want).collect();
        assert!(
            other.is_empty(),
            "the router's next hops were not {want:?} in {} of {} samples: {:?}",
            other.len(),
            seen.len(),
            other.iter().take(10).collect::<Vec<_>>()
        );
        seen.len()
    }
}

fn change(c: &Cluster, node: usize, add: bool) {
    let gone = format!("{}:443", backend_addr(2));
    let (s, v) = if add {
        c.lb(node).call(
            "POST",
            "/api/v1/services/web/backends",
            Some(&format!("{{\"address\": \"{gone}\", \"weight\": 100}}")),
            None,
        )
    } else {
        c.lb(node).call(
            "DELETE",
            &format!("/api/v1/services/web/backends/{gone}"),
            None,
            None,
        )
    };
    assert_eq!(s, if add { 201 } else { 204 }, "{v}");
}

fn matches_metric(c: &Cluster, i: usize) -> Option<f64> {
    Metrics::scrape(c.lb(i))
        .0
        .iter()
        .find(|((name, _), _)| name == "lb_service_table_matches_cluster")
        .map(|(_, v)| *v)
}

/// All three announcing with the cluster's table.
fn all_in_step(c: &Cluster) {
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(20));
    wait_for(
        "every node connected, synced, its table the cluster's",
        Duration::from_secs(10),
        || {
            (0..3).all(|i| {
                let st = c.status(i)["cluster"].clone();
                let w = c.web(i);
                st["connected"] == true
                    && st["synced"] == true
                    && w["table_fingerprint"] == w["cluster_fingerprint"]
                    && w["announce"]["reason"] == "announced"
            })
        },
    );
}

/// Ten changes through one node under traffic: fingerprints differ for a
/// moment on each, and no node is withdrawn for it (the gate's grace).
/// Then node 2 restarts with another Maglev table size (node config, not
/// in etcd): its table differs, and it never announces while the others
/// do; restarted with the cluster's size, it announces again.
#[test]
fn changes_withdraw_nobody_and_a_node_with_another_table_never_announces() {
    let _one = one_cluster();
    let mut c = Cluster::start_with_etcd(3, 3);
    all_in_step(&c);
    assert_eq!(matches_metric(&c, 0), Some(1.0));

    let hops = HopLog::start(&c);
    let mut took = Vec::new();
    for n in 0..10 {
        let before = c.fingerprint(0);
        change(&c, n % 2, n % 2 == 1);
        took.push(c.wait_new_table("the change in every table", &before, Duration::from_secs(2)));
        let (_, failures) = c.spread(8);
        assert!(failures.is_empty(), "change {n}: {failures:?}");
    }
    // Past the grace after the last change: a withdrawal would show.
    std::thread::sleep(Duration::from_millis(2500));
    let samples = hops.finish(&[0, 1, 2]);
    println!(
        "10 changes under traffic: every table equal after {took:?}; next hops [0,1,2] in all \
         {samples} samples"
    );
    for i in 0..3 {
        let log = c.lb(i).log();
        assert!(!log.contains("table_differs"), "node {i}:\n{log}");
    }

    // Node 2 with a table of its own.
    c.lbs[2].take().unwrap().kill();
    c.wait_next_hops(&[0, 1], Duration::from_secs(2));
    let hops = HopLog::start(&c);
    let t = Instant::now();
    c.lbs[2] = Some(c.start_lb_edited(2, |text| {
        text.replacen("[dataplane]\n", "[dataplane]\nmaglev_table_size = 251\n", 1)
    }));
    let differs = wait_for(
        "node 2 withdrawn as table_differs",
        Duration::from_secs(10),
        || c.web(2)["announce"]["reason"] == "table_differs",
    );
    // Past the grace: still out, the others still in.
    std::thread::sleep(Duration::from_millis(2500));
    let samples = hops.finish(&[0, 1]);
    let w = c.web(2);
    assert_eq!(w["announce"]["reason"], "table_differs", "{w}");
    assert_ne!(w["table_fingerprint"], w["cluster_fingerprint"], "{w}");
    assert_eq!(w["cluster_fingerprint"].as_str(), Some(&*c.fingerprint(0)));
    assert_eq!(matches_metric(&c, 2), Some(0.0));
    assert_eq!(matches_metric(&c, 0), Some(1.0));
    let out = c.lb(2).cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DIFFERS") && text.contains("table_differs"),
        "{text}"
    );
    println!(
        "node 2 with maglev_table_size 251: table_differs {differs:?} after its start, next hops \
         [0,1] in all {samples} samples over {:?}",
        t.elapsed()
    );

    c.lbs[2].take().unwrap().kill();
    let t = Instant::now();
    c.lbs[2] = Some(c.start_lb(2));
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(10));
    println!(
        "node 2 restarted with the cluster's table size: in the router's next hops {:?} after \
         its restart began",
        t.elapsed()
    );
    all_in_step(&c);
    let (per, failures) = c.spread(60);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(per.iter().all(|n| *n > 0), "{per:?}");

    // Node 2 with a policy (node config) that refuses backend 2: the
    // cluster's services fail validation there, it keeps its own table
    // and stays out; once a change through node 0 removes backend 2, the
    // new revision passes there too and node 2 announces.
    let refused = format!("{}:443", backend_addr(2));
    c.lbs[2].take().unwrap().kill();
    c.wait_next_hops(&[0, 1], Duration::from_secs(2));
    let hops = HopLog::start(&c);
    c.lbs[2] = Some(c.start_lb_edited(2, |text| {
        let text = text.replacen(&format!("{{ address = \"{refused}\" }}, "), "", 1);
        assert!(!text.contains(&refused), "{text}");
        format!(
            "{text}\n[policy]\nallowed_backend_networks = [\"{}/32\", \"{}/32\"]\n",
            backend_addr(0),
            backend_addr(1)
        )
    }));
    wait_for(
        "node 2 refusing the cluster's services",
        Duration::from_secs(10),
        || c.web(2)["announce"]["reason"] == "table_differs",
    );
    std::thread::sleep(Duration::from_millis(2500));
    let samples = hops.finish(&[0, 1]);
    let st = c.status(2)["cluster"].clone();
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not applied")),
        "{st}"
    );
    assert_eq!(c.web(2)["announce"]["reason"], "table_differs");
    let t = Instant::now();
    change(&c, 0, false);
    let back = c.wait_next_hops(&[0, 1, 2], Duration::from_secs(5));
    all_in_step(&c);
    println!(
        "node 2 refusing the cluster's revision: table_differs, next hops [0,1] in all {samples} \
         samples; the revision it accepts -> announced {back:?} after the change ({:?})",
        t.elapsed()
    );
}

/// Scenario 5: node 2's lb dies, a backend is removed through node 0 while
/// it is down (its state file is now stale), and it starts again while no
/// etcd member answers. It announces nothing (`cluster_not_synced`), the
/// others keep announcing on their last state, and no flow reaches its
/// stale table. etcd back: it syncs, and announces only once its table's
/// fingerprint is the cluster's.
#[test]
fn a_rejoining_node_announces_only_once_its_table_is_the_clusters() {
    let _one = one_cluster();
    let mut c = Cluster::start_with_etcd(3, 3);
    all_in_step(&c);
    let stale = c.fingerprint(2);

    c.lbs[2].take().unwrap().kill();
    c.wait_next_hops(&[0, 1], Duration::from_secs(2));
    change(&c, 0, false);
    wait_for(
        "the removal on nodes 0 and 1",
        Duration::from_secs(2),
        || {
            let (a, b) = (c.fingerprint(0), c.fingerprint(1));
            a == b && a != stale
        },
    );
    let current = c.fingerprint(0);

    // Every member stopped: node 2 cannot sync; 0 and 1 keep announcing.
    for m in 0..3 {
        c.etcd.as_ref().unwrap().signal(m, Signal::STOP);
    }
    let hops = HopLog::start(&c);
    c.lbs[2] = Some(c.start_lb(2));
    let flows_before = new_flows(c.lb(2));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let w = c.web(2);
        assert_eq!(w["announce"]["reason"], "cluster_not_synced", "{w}");
        assert_eq!(w["table_fingerprint"].as_str(), Some(&*stale), "{w}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = c.status(2)["cluster"].clone();
    assert_eq!(st["synced"], false, "{st}");
    assert_eq!(st["connected"], false, "{st}");
    let (per, failures) = c.spread(60);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(per[2], 0, "the removed backend got flows: {per:?}");
    assert_eq!(
        new_flows(c.lb(2)),
        flows_before,
        "flows reached node 2's stale table"
    );
    for i in 0..2 {
        assert_eq!(c.web(i)["announce"]["reason"], "announced");
    }
    let out = c.lb(2).cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NOT SYNCED"), "{text}");
    let samples = hops.finish(&[0, 1]);
    println!("etcd unreachable: node 2 not announced in all {samples} samples over 3 s");

    // etcd back: node 2 syncs; whenever it shows itself announced, its
    // table is the cluster's.
    for m in 0..3 {
        c.etcd.as_ref().unwrap().signal(m, Signal::CONT);
    }
    let t = Instant::now();
    let (mut synced, mut matched, mut announced) = (None, None, None);
    while announced.is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "node 2 did not announce: {}\n{}",
            c.web(2),
            c.lb(2).log()
        );
        let w = c.web(2);
        if synced.is_none() && c.status(2)["cluster"]["synced"] == true {
            synced = Some(t.elapsed());
        }
        if matched.is_none() && w["table_fingerprint"].as_str() == Some(&*current) {
            matched = Some(t.elapsed());
        }
        if w["announce"]["announced"] == true {
            assert_eq!(w["table_fingerprint"].as_str(), Some(&*current), "{w}");
            assert_eq!(w["cluster_fingerprint"].as_str(), Some(&*current), "{w}");
            announced = Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(synced.is_some() && matched.is_some());
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(5));
    println!(
        "etcd resumed -> node 2 synced {synced:?}, its table the cluster's {matched:?}, announced \
         {announced:?}, in the router's next hops {:?}",
        t.elapsed()
    );
    let (per, failures) = c.spread(60);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(per[2], 0, "{per:?}");
    assert!(
        new_flows(c.lb(2)) > flows_before,
        "node 2 carries traffic again"
    );
}
