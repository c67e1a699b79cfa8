//! Issue 14's churn test on the issue 13 topology with shared pins (router
//! with ECMP, 3 nodes each with lb, BIRD and an etcd member, HTTPS
//! backends): 10 backend changes through the API of the nodes in turn
//! while new long streams open for ~30 s, then each node in turn killed
//! whole and brought back as a rebooted machine (empty bpffs). A revived
//! node builds its tables fresh, so a stream of a changed slot that ECMP
//! hands back to it breaks unless the node took the peers' pins before it
//! announced (the join). Every stream must end whole.
use lb_tests::wait_for;
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::MaglevSlot;
use lb_tests::cluster::{Cluster, VIP, backend_addr, client_flow_key};
use lb_userspace::dataplane::Dataplane;

/// A chunk (and a client line) every this, per stream.
const EVERY: Duration = Duration::from_millis(200);
/// The churn: a change every `CHANGE_EVERY`, streams opened between.
const CHANGES: usize = 10;
const CHANGE_EVERY: Duration = Duration::from_secs(3);
const OPEN_PER_CHANGE: usize = 4;
/// The listed backends, and the spares the churn adds.
const LISTED: usize = 3;
const SPARE: usize = 3;

/// Change `k` of the churn: a spare added or a weight changed, through
/// node `k % 3`'s API; returns when every node installed the new table.
fn change(c: &Cluster, k: usize) {
    let addr = |b: usize| format!("{}:443", backend_addr(b));
    let (method, path, body, want) = match k {
        0 | 2 | 4 => (
            "POST",
            "/api/v1/services/web/backends".to_string(),
            format!(
                "{{\"address\": \"{}\", \"weight\": 100}}",
                addr(LISTED + k / 2)
            ),
            201,
        ),
        _ => {
            let (b, w) = [
                (0, 50),
                (1, 200),
                (0, 100),
                (3, 50),
                (2, 150),
                (4, 200),
                (1, 100),
            ][[1, 3, 5, 6, 7, 8, 9]
                .iter()
                .position(|x| *x == k)
                .expect("a change")];
            (
                "PATCH",
                format!("/api/v1/services/web/backends/{}", addr(b)),
                format!("{{\"weight\": {w}}}"),
                200,
            )
        }
    };
    let before = c.fingerprints()[0].clone();
    let (s, v) = c.lb(k % 3).call(method, &path, Some(&body), None);
    assert_eq!(s, want, "change {k}: {method} {path} {body}: {v}");
    c.wait_new_table(
        &format!("change {k} in every table"),
        &before,
        Duration::from_secs(5),
    );
}

/// A stream opened through the cluster, being read on the client's runtime.
struct Open {
    backend: usize,
    sport: u16,
    /// The node the router sent it to when it opened.
    carrier: usize,
    done: tokio::task::JoinHandle<Result<u64, String>>,
}

/// Opens one open-ended stream (it runs until `stop`), finding its node
/// by whose count of new flows went up.
fn open(c: &Cluster, stop: &tokio::sync::watch::Receiver<bool>) -> Open {
    let to: SocketAddr = format!("{VIP}:443").parse().unwrap();
    let before: Vec<u64> = (0..3).map(|i| c.pinned_new_flows(i)).collect();
    let tls = c.tls.clone();
    let stop = stop.clone();
    let (name, sport, done) = c.client_rt.run(async move {
        let s = tls
            .open_stream(to, EVERY, 0)
            .await
            .unwrap_or_else(|f| panic!("opening a stream: {f}"));
        let (name, sport) = (s.backend.clone(), s.local.port());
        let done =
            tokio::spawn(async move { s.finish(EVERY, stop).await.map_err(|f| f.to_string()) });
        (name, sport, done)
    });
    let grew: Vec<usize> = (0..3)
        .filter(|&i| c.pinned_new_flows(i) > before[i])
        .collect();
    assert_eq!(
        grew.len(),
        1,
        "a stream counted as new on one node: {grew:?}"
    );
    Open {
        backend: c
            .backends
            .iter()
            .position(|b| b.name == name)
            .unwrap_or_else(|| panic!("{name} is no backend")),
        sport,
        carrier: grew[0],
        done,
    }
}

/// On node `i`'s live maps, for each (sport, backend address): whether its
/// fresh table would send the flow elsewhere (at risk without a pin), and
/// whether the node holds a pin to its backend.
fn at_risk(c: &Cluster, i: usize, flows: Vec<(u16, IpAddr)>) -> Vec<(bool, bool)> {
    c.on_node_dataplane(i, move |dp: &Dataplane, _| {
        let ids = &dp.recorded_ids().services["web"];
        let addr = |id: u32| -> Option<IpAddr> {
            ids.backends
                .iter()
                .find(|(_, b)| **b == id)
                .map(|(a, _)| a.ip())
        };
        let (_, table) = dp.active_table(ids.id).expect("web's table");
        flows
            .iter()
            .map(|(sport, backend)| {
                let k = client_flow_key(*sport);
                // Nodes of a cluster not told otherwise run murmur3, alike.
                let h =
                    lb_common::FlowHash::Murmur3.hash(&k.src, &k.dst, k.sport, k.dport, k.proto);
                let s: MaglevSlot = table[lb_common::maglev_slot(h, table.len() as u32) as usize];
                let risk = addr(s.backend) != Some(*backend);
                let pinned = dp
                    .flow_pin(&k)
                    .is_some_and(|v| addr(v.backend) == Some(*backend));
                (risk, pinned)
            })
            .collect()
    })
}

#[test]
fn churn_then_each_node_killed_and_revived_breaks_no_stream() {
    let mut c = Cluster::start_with_pin_sync_and_spares(3, LISTED, SPARE);
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(20));
    wait_for(
        "every node connected to etcd and knowing its 2 peers",
        Duration::from_secs(10),
        || {
            (0..3).all(|i| {
                let s = c.status(i);
                s["cluster"]["connected"] == true
                    && s["pin_sync"]["peers"]
                        .as_array()
                        .is_some_and(|p| p.len() == 2)
            })
        },
    );
    // The nodes start one after the other: the first finds no peer.
    for i in 0..3 {
        let join = c.status(i)["pin_sync"]["join"].clone();
        println!("node {i}'s join at start: {join}");
        assert!(
            join["state"] == "no_peer" || join["state"] == "synced",
            "node {i} at start: {join}"
        );
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut streams: Vec<Open> = Vec::new();
    let churn = Instant::now();
    for k in 0..CHANGES {
        let period = Instant::now();
        change(&c, k);
        for _ in 0..OPEN_PER_CHANGE {
            streams.push(open(&c, &stop));
            std::thread::sleep(CHANGE_EVERY / (OPEN_PER_CHANGE as u32 + 1));
        }
        if let Some(rest) = CHANGE_EVERY.checked_sub(period.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let carried = |i: usize| streams.iter().filter(|s| s.carrier == i).count();
    println!(
        "churn: {CHANGES} changes, {} streams opened in {:?}; per node {:?}",
        streams.len(),
        churn.elapsed(),
        (0..3).map(carried).collect::<Vec<_>>()
    );
    let mut risk_total = 0;
    for i in 0..3 {
        let ended: Vec<String> = streams
            .iter_mut()
            .filter(|s| s.done.is_finished())
            .map(|s| {
                let how = c.client_rt.wait(std::mem::replace(
                    &mut s.done,
                    c.client_rt.spawn(async { Ok(0) }),
                ));
                format!(
                    "port {} (node {}, b{}): {how:?}",
                    s.sport, s.carrier, s.backend
                )
            })
            .collect();
        assert!(
            ended.is_empty(),
            "streams ended before node {i}'s kill: {ended:#?}"
        );
        let route = |c: &Cluster| {
            lb_tests::netns::run_in(
                &c.router,
                &["ip", "-4", "route", "show", &format!("{VIP}/32")],
            )
            .split_whitespace()
            .filter(|w| w.starts_with("10.213."))
            .collect::<Vec<_>>()
            .join(" ")
        };
        let route_before = route(&c);
        let killed = Instant::now();
        c.kill_node(i);
        let rest: Vec<usize> = (0..3).filter(|j| *j != i).collect();
        c.wait_next_hops(&rest, Duration::from_secs(5));
        let withdrawn = killed.elapsed();
        // The node's streams go on through the others for a while.
        std::thread::sleep(Duration::from_secs(2));
        let ended_at_kill = streams.iter().filter(|s| s.done.is_finished()).count();
        let revived = Instant::now();
        c.revive_node(i);
        let lb_up = revived.elapsed();
        c.wait_next_hops(&[0, 1, 2], Duration::from_secs(30));
        let announced = revived.elapsed();
        // ECMP's hash-threshold mapping depends on the next hops' order.
        println!(
            "node {i}: the router's next hops in order before the kill [{route_before}], after \
             the revive [{}]",
            route(&c)
        );
        println!("node {i}: {ended_at_kill} streams ended after the kill, before the revive");
        let join = c.status(i)["pin_sync"]["join"].clone();
        // Streams of this node that its fresh table sends elsewhere: only
        // the pins taken at join keep them.
        let mine: Vec<&Open> = streams.iter().filter(|s| s.carrier == i).collect();
        let flows = mine
            .iter()
            .map(|s| (s.sport, backend_addr(s.backend).parse().unwrap()))
            .collect();
        let seen = at_risk(&c, i, flows);
        let risk = seen.iter().filter(|(r, _)| *r).count();
        let unpinned: Vec<u16> = mine
            .iter()
            .zip(&seen)
            .filter(|(_, (r, p))| *r && !*p)
            .map(|(s, _)| s.sport)
            .collect();
        println!(
            "node {i}: withdrawn {withdrawn:?} after the kill; {} streams moved; revived: lb up in \
             {lb_up:?}, announced after {announced:?}; join {join}; {risk} of its streams in \
             slots its fresh table sends elsewhere",
            mine.len()
        );
        assert_eq!(join["state"], "synced", "node {i}'s join: {join}");
        assert_eq!(
            join["peers"].as_array().map(Vec::len),
            Some(2),
            "node {i} took both peers' pins: {join}"
        );
        assert!(
            join["pins"].as_u64().unwrap_or(0) > 0,
            "node {i} received pins at join: {join}"
        );
        assert!(
            unpinned.is_empty(),
            "node {i}'s streams from ports {unpinned:?} are at risk and were not pinned at join"
        );
        risk_total += risk;
        // ECMP hands the node's streams back: some chunks through it.
        std::thread::sleep(Duration::from_secs(2));
    }
    stop_tx.send(true).unwrap();
    let mut broken = Vec::new();
    for s in streams.drain(..) {
        match c.client_rt.run(s.done) {
            Ok(Ok(_)) => {}
            Ok(Err(f)) => broken.push(format!("port {} (node {}): {f}", s.sport, s.carrier)),
            Err(e) => broken.push(format!("stream task: {e}")),
        }
    }
    println!(
        "{} streams broken; {risk_total} streams went back to a revived node in slots its fresh \
         table sends elsewhere",
        broken.len()
    );
    assert!(broken.is_empty(), "{broken:#?}");
    assert!(
        risk_total > 0,
        "no stream went back to a revived node in a changed slot: the join was not exercised"
    );
}
