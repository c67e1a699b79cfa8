//! Three balancer nodes behind a router doing ECMP, each announcing the
//! service address through its own BIRD (see `lb_tests::cluster`): traffic
//! spreads over all of them, identical tables, and every way a node stops
//! being fit (daemon killed, BIRD killed, `lb stop`, no usable backend)
//! withdraws its route, with the time it took.
use std::time::{Duration, Instant};

use lb_tests::cluster::{Cluster, new_flows};
use serde_json::Value;

/// Flows each running node took while `f` ran.
fn flows_during(c: &Cluster, f: impl FnOnce()) -> Vec<u64> {
    let count = |c: &Cluster| -> Vec<u64> {
        c.lbs
            .iter()
            .map(|l| l.as_ref().map_or(0, new_flows))
            .collect()
    };
    let before = count(c);
    f();
    count(c).iter().zip(before).map(|(a, b)| a - b).collect()
}

/// `n` connections that must all succeed; flows per node.
fn all_succeed(c: &Cluster, what: &str, n: usize) -> Vec<u64> {
    let mut per_backend = Vec::new();
    let per_node = flows_during(c, || {
        let (per, failures) = c.spread(n);
        assert!(
            failures.is_empty(),
            "{what}: {} of {n} connections failed: {failures:?}",
            failures.len()
        );
        per_backend = per;
    });
    println!(
        "{what}: {n} HTTPS connections, all answered; per node {per_node:?}, per backend {per_backend:?}"
    );
    per_node
}

#[test]
fn three_nodes_announce_spread_and_withdraw() {
    let started = Instant::now();
    let mut c = Cluster::start(3, 3);
    let up = c.wait_next_hops(&[0, 1, 2], Duration::from_secs(20));
    println!("all 3 nodes announced {up:?} after the last daemon started");

    // (1) Identical tables (backends listed in another order on each node),
    // announced everywhere, traffic on every node.
    let views: Vec<Value> = (0..3).map(|i| c.web(i)).collect();
    let fp = views[0]["table_fingerprint"]
        .as_str()
        .expect("a fingerprint")
        .to_string();
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v["table_fingerprint"], fp.as_str(), "node {i}: {v}");
        assert_eq!(v["announce"]["announced"], true, "node {i}: {v}");
        assert_eq!(v["announce"]["reason"], "announced", "node {i}: {v}");
        let m = lb_tests::topology::Metrics::scrape(c.lb(i)).0;
        let announced = m
            .iter()
            .find(|((n, l), _)| n == "lb_service_announced" && l.iter().any(|(_, v)| v == "web"))
            .map(|(_, v)| *v);
        assert_eq!(announced, Some(1.0), "node {i}: lb_service_announced");
        assert!(
            m.keys().any(|(n, l)| n == "lb_service_table_info"
                && l.iter().any(|(k, v)| k == "fingerprint" && *v == fp)),
            "node {i}: lb_service_table_info with {fp}"
        );
    }
    let status = lb_tests::netns::run_in(
        &c.nodes[0],
        &[
            lb_tests::daemon::lb_binary().to_str().unwrap(),
            "status",
            "--socket",
            c.lb(0).socket.to_str().unwrap(),
        ],
    );
    assert!(
        status.contains(&format!("table fingerprint {fp}")) && status.contains("BGP: announced"),
        "lb status:\n{status}"
    );
    let per_node = all_succeed(&c, "3 nodes", 600);
    assert!(
        per_node.iter().all(|n| *n > 0),
        "every node carries traffic: {per_node:?}"
    );

    // The same 5-tuple through each node reaches the same backend.
    // Below the ephemeral range, so no connection of the spread used it.
    const SPORT: u16 = 20_001;
    let mut picked = Vec::new();
    for i in 0..3 {
        c.steer(SPORT, Some(i));
        let mut cert = String::new();
        let per_node = flows_during(&c, || cert = c.get_from(SPORT));
        assert_eq!(
            per_node[i], 1,
            "the connection went through node {i}: {per_node:?}"
        );
        picked.push(cert);
    }
    c.steer(SPORT, None);
    println!("port {SPORT} through nodes 0, 1, 2: {picked:?}");
    assert!(picked.iter().all(|b| *b == picked[0]), "{picked:?}");

    // (2) A node's lb killed: its TUN device goes with it, BIRD withdraws.
    c.lbs[0].as_mut().unwrap().kill();
    let killed = Instant::now();
    c.wait_next_hops(&[1, 2], Duration::from_secs(3));
    let withdrawn = killed.elapsed();
    println!("lb SIGKILL on node 0 -> route gone from the router's kernel: {withdrawn:?}");
    assert!(
        withdrawn < Duration::from_secs(1),
        "withdrawal took {withdrawn:?}"
    );
    c.lbs[0] = None;
    let per_node = all_succeed(&c, "node 0's lb killed", 150);
    assert_eq!(per_node[0], 0);
    c.lbs[0] = Some(c.start_lb(0));
    let back = c.wait_next_hops(&[0, 1, 2], Duration::from_secs(5));
    println!("node 0's lb restarted: announced again {back:?} after its API answered");
    assert_eq!(c.web(0)["table_fingerprint"], fp.as_str());
    let per_node = all_succeed(&c, "node 0 back", 150);
    assert!(
        per_node[0] > 0,
        "node 0 carries traffic again: {per_node:?}"
    );

    // (3) A node's BIRD killed: the router drops it (BFD, or the session's
    // TCP reset), and takes it back when BIRD returns.
    c.node_birds[1].kill();
    let killed = Instant::now();
    c.wait_next_hops(&[0, 2], Duration::from_secs(3));
    let withdrawn = killed.elapsed();
    println!("BIRD SIGKILL on node 1 -> route gone from the router's kernel: {withdrawn:?}");
    assert!(
        withdrawn < Duration::from_secs(1),
        "withdrawal took {withdrawn:?}"
    );
    let per_node = all_succeed(&c, "node 1's BIRD killed", 150);
    assert_eq!(per_node[1], 0, "node 1 gets nothing: {per_node:?}");
    let config = c.node_birds[1].config.clone();
    c.node_birds[1] = lb_tests::cluster::Bird::start(&c.nodes[1], &config);
    let back = c.wait_next_hops(&[0, 1, 2], Duration::from_secs(10));
    println!("node 1's BIRD restarted: route back after {back:?}");
    let per_node = all_succeed(&c, "node 1's BIRD back", 150);
    assert!(
        per_node[1] > 0,
        "node 1 carries traffic again: {per_node:?}"
    );

    // (3b) A node that stops answering without closing anything (BIRD
    // frozen, as a hung or cut-off node): only BFD tells the router.
    let frozen = c.node_birds[2].pid();
    lb_tests::cluster::signal(frozen, rustix::process::Signal::STOP);
    let stopped = Instant::now();
    c.wait_next_hops(&[0, 1], Duration::from_secs(5));
    let withdrawn = stopped.elapsed();
    println!("BIRD frozen (SIGSTOP) on node 2 -> route gone (BFD): {withdrawn:?}");
    assert!(
        withdrawn < Duration::from_secs(1),
        "withdrawal took {withdrawn:?}"
    );
    lb_tests::cluster::signal(frozen, rustix::process::Signal::CONT);
    let back = c.wait_next_hops(&[0, 1, 2], Duration::from_secs(10));
    println!("node 2's BIRD thawed: route back after {back:?}");

    // (4a) `lb stop` withdraws before the daemon detaches.
    let (status, body) = c.lb(2).call("POST", "/api/v1/stop", None, None);
    assert!(status < 300, "lb stop: {status} {body}");
    let stopped = Instant::now();
    c.wait_next_hops(&[0, 1], Duration::from_secs(3));
    println!("lb stop on node 2 -> route gone: {:?}", stopped.elapsed());
    assert!(
        c.lbs[2]
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(10))
            .is_some()
    );
    c.lbs[2] = None;
    all_succeed(&c, "node 2 stopped", 100);
    c.lbs[2] = Some(c.start_lb(2));
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(5));

    // (4b) No usable backend (`when_all_down = "refuse"`): every node
    // withdraws; one backend back: every node announces again.
    for b in &c.backends {
        b.kill();
    }
    let down = Instant::now();
    c.wait_next_hops(&[], Duration::from_secs(5));
    println!(
        "all backends down -> every route gone after {:?}",
        down.elapsed()
    );
    for i in 0..3 {
        let v = c.web(i);
        assert_eq!(v["announce"]["announced"], false, "node {i}: {v}");
        assert_eq!(
            v["announce"]["reason"], "no_usable_backend",
            "node {i}: {v}"
        );
    }
    c.restart_backend(1);
    let up = Instant::now();
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(5));
    println!(
        "backend b1 up again -> every node announces after {:?}",
        up.elapsed()
    );
    let (per, failures) = c.spread(60);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(per[1], 60, "only b1 is up: {per:?}");
    assert!(
        c.lb(0).log().contains("reason=\"no_usable_backend\"")
            || c.lb(0).log().contains("reason=no_usable_backend"),
        "the withdrawal is logged with its reason:\n{}",
        c.lb(0).log()
    );
    println!("cluster test took {:?}", started.elapsed());
}
