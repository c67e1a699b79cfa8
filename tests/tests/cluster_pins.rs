//! Issue 14 on the issue 13 topology (router with ECMP, 3 nodes each with
//! lb, BIRD and an etcd member, 3 HTTPS backends): a backend change, then
//! the loss of a node. Without shared pins the streams that were on the
//! lost node in a changed slot break (the other nodes send them to the
//! slot's previous backend: `cluster_failover.rs`'s baseline); with
//! `[cluster] pin_sync` none does.
use lb_tests::wait_for;
use std::time::Duration;

use lb_tests::{
    cluster::{Cluster, VIP, backend_addr},
    daemon::Lb,
    topology::Metrics,
};

/// Streams opened after the backend change.
const STREAMS: usize = 30;
/// A chunk every 100 ms, 80 chunks: about 8 s each.
const EVERY: Duration = Duration::from_millis(100);
const CHUNKS: u64 = 80;

/// New flows node `lb` sent to `backend` since it started.
fn new_flows_to(lb: &Lb, backend: &str) -> u64 {
    let labels = vec![
        ("backend".to_string(), backend.to_string()),
        ("service".to_string(), "web".to_string()),
    ];
    Metrics::scrape(lb)
        .0
        .get(&("lb_new_flows_total".to_string(), labels))
        .copied()
        .unwrap_or(0.0) as u64
}

struct Outcome {
    /// Streams each node took, and of those the ones on the added backend
    /// (the streams in changed slots: the ones a lost pin can break).
    per_node: Vec<(u64, u64)>,
    killed: usize,
    broken: Vec<String>,
    /// Each surviving node's pin-sync status (with sharing).
    pin_sync: Vec<serde_json::Value>,
}

/// Backend 2 removed through node 0 and added back through node 1 (its
/// slots now changed on every node), `STREAMS` streams opened, then the
/// node carrying most of the streams on backend 2 killed whole.
fn backend_change_then_node_loss(c: &mut Cluster) -> Outcome {
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(20));
    wait_for(
        "every node connected to etcd",
        Duration::from_secs(10),
        || (0..3).all(|i| c.status(i)["cluster"]["connected"] == true),
    );
    let before = c.fingerprints();
    let added = format!("{}:443", backend_addr(2));
    let (s, v) = c.lb(0).call(
        "DELETE",
        &format!("/api/v1/services/web/backends/{added}"),
        None,
        None,
    );
    assert_eq!(s, 204, "{v}");
    c.wait_new_table(
        "the removal in every table",
        &before[0],
        Duration::from_secs(3),
    );
    let (s, v) = c.lb(1).call(
        "POST",
        "/api/v1/services/web/backends",
        Some(&format!("{{\"address\": \"{added}\", \"weight\": 100}}")),
        None,
    );
    assert_eq!(s, 201, "{v}");
    wait_for(
        "the addition in every table",
        Duration::from_secs(3),
        || c.fingerprints() == before,
    );
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(5));
    let totals = |c: &Cluster| -> Vec<(u64, u64)> {
        (0..3)
            .map(|i| {
                let all = lb_tests::cluster::new_flows(c.lb(i));
                (all, new_flows_to(c.lb(i), &added))
            })
            .collect()
    };
    let start = totals(c);
    let to = format!("{VIP}:443").parse().unwrap();
    let tls = c.tls.clone();
    let streams = c.client_rt.run(async move {
        let mut out = Vec::new();
        for _ in 0..STREAMS {
            out.push(tls.open_stream(to, EVERY, CHUNKS).await);
        }
        out
    });
    let mut opened = Vec::new();
    for s in streams {
        opened.push(s.unwrap_or_else(|f| panic!("opening a stream: {f}")));
    }
    let finishing = c.client_rt.spawn(async move {
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = opened
            .into_iter()
            .map(|s| tokio::spawn(s.finish(EVERY, stop.clone())))
            .collect();
        let mut broken = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(_)) => {}
                Ok(Err(f)) => broken.push(f.to_string()),
                Err(e) => broken.push(format!("stream task: {e}")),
            }
        }
        broken
    });
    // Let the pins reach the other nodes and every stream get going.
    std::thread::sleep(Duration::from_secs(1));
    let per_node: Vec<(u64, u64)> = totals(c)
        .iter()
        .zip(&start)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1))
        .collect();
    let killed = (0..3).max_by_key(|&i| per_node[i].1).unwrap();
    c.kill_node(killed);
    let broken = c.client_rt.wait(finishing);
    let pin_sync = (0..3)
        .filter(|&i| i != killed)
        .map(|i| c.status(i)["pin_sync"].clone())
        .collect();
    Outcome {
        per_node,
        killed,
        broken,
        pin_sync,
    }
}

/// The test: 0 streams break with shared pins. The same steps
/// without sharing are `cluster_failover.rs`'s baseline (some break); here
/// the killed node must have carried streams in changed slots (at risk)
/// and the survivors must have inserted their pins, or the test shows
/// nothing.
#[test]
fn shared_pins_keep_every_stream_through_a_node_loss_after_a_backend_change() {
    let mut c = Cluster::start_with_pin_sync(3, 3);
    wait_for(
        "every node knows its 2 peers",
        Duration::from_secs(10),
        || {
            (0..3).all(|i| {
                c.status(i)["pin_sync"]["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == 2)
            })
        },
    );
    let shared = backend_change_then_node_loss(&mut c);
    println!(
        "with pin sharing: streams per node (all, on the added backend) {:?}; node {} killed: \
         {} of {STREAMS} streams broke",
        shared.per_node,
        shared.killed,
        shared.broken.len()
    );
    for p in &shared.pin_sync {
        println!("  surviving node's pin sync: {p}");
    }
    assert!(shared.broken.is_empty(), "{:#?}", shared.broken);
    let on_killed = shared.per_node[shared.killed].1;
    assert!(
        on_killed > 0,
        "the killed node carried streams in changed slots"
    );
    let inserted: u64 = shared
        .pin_sync
        .iter()
        .map(|p| p["inserted"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        inserted >= 2 * on_killed,
        "each survivor inserted the killed node's pins: {inserted} < 2 x {on_killed}"
    );
    for p in &shared.pin_sync {
        for (reason, n) in p["dropped"].as_object().unwrap() {
            assert_eq!(n.as_u64(), Some(0), "pins dropped ({reason}): {p}");
        }
    }
}
