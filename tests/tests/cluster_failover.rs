//! Node loss under long-lived streams on the whole topology
//! (router with ECMP, 3 nodes each with lb, BIRD and an etcd member, HTTPS
//! backends in dsr): streams on a killed node move to the others and
//! finish when no backend changed; after a backend change, the streams a
//! node had pinned in changed slots break when it dies (the baseline flow
//! pin sharing removes). Also scenario 1's packet-fixture half: each
//! node's own program, on its live maps, sends a flow to the same backend.
use lb_tests::wait_for;
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::MaglevSlot;
use lb_tests::{
    cluster::{CLIENT, Cluster, VIP, backend_addr, client_flow_key},
    https::StreamRun,
    packet::{Spec, TCP_ACK, TCP_SYN},
};
use lb_userspace::dataplane::Dataplane;
use tokio::task::JoinHandle;

const XDP_TX: u32 = 3;
/// Each stream: 200 chunks of 10 kB, 2 MB at the chunks' pace.
const CHUNKS: u64 = 200;
const CHUNK: usize = 10_000;
const STREAMS: usize = 30;

/// The bytes of a whole stream: every chunk and the end line.
fn whole_bytes() -> u64 {
    CHUNKS * CHUNK as u64 + format!("end {CHUNKS}\n").len() as u64
}

fn new_flows_per_node(c: &Cluster) -> Vec<u64> {
    (0..c.nodes.len()).map(|i| c.pinned_new_flows(i)).collect()
}

/// A stream being read to its end on the client's runtime.
struct Open {
    backend: String,
    sport: u16,
    /// The node the router sent it to when it opened.
    carrier: usize,
    /// Taken by [`join`].
    run: Option<JoinHandle<StreamRun>>,
}

/// Opens `n` streams of 2 MB (a chunk every `every`) from new source ports,
/// one at a time, each read from the moment it opens. A stream's node is
/// the one whose count of new flows went up as it opened (the router's
/// ECMP hash cannot be asked: `ip route get` does not hash as forwarding
/// does).
fn open_streams(c: &Cluster, n: usize, every: Duration) -> Vec<Open> {
    let to: SocketAddr = format!("{VIP}:443").parse().unwrap();
    let start = Instant::now();
    let streams = (0..n)
        .map(|k| {
            let before = new_flows_per_node(c);
            let tls = c.tls.clone();
            let (backend, sport, run) = c.client_rt.run(async move {
                let s = tls
                    .open_stream_sized(to, every, CHUNKS, CHUNK)
                    .await
                    .unwrap_or_else(|f| panic!("stream {k}: {f}"));
                let (backend, sport) = (s.backend.clone(), s.local.port());
                (
                    backend,
                    sport,
                    tokio::spawn(s.run_to_end(Duration::from_secs(30))),
                )
            });
            let grew: Vec<usize> = new_flows_per_node(c)
                .iter()
                .zip(before)
                .enumerate()
                .filter(|(_, (a, b))| **a > *b)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(
                grew.len(),
                1,
                "stream {k} counted as a new flow on one node: {grew:?}"
            );
            Open {
                backend,
                sport,
                carrier: grew[0],
                run: Some(run),
            }
        })
        .collect();
    println!("{n} streams opened in {:?}", start.elapsed());
    streams
}

fn per_node(c: &Cluster, carriers: impl Iterator<Item = usize>) -> Vec<u64> {
    let mut n = vec![0; c.nodes.len()];
    for i in carriers {
        n[i] += 1;
    }
    n
}

fn busiest(per_node: &[u64]) -> usize {
    (0..per_node.len()).max_by_key(|i| per_node[*i]).unwrap()
}

fn join(c: &Cluster, streams: Vec<Open>) -> Vec<(Open, StreamRun)> {
    streams
        .into_iter()
        .map(|mut s| {
            let handle = s.run.take().expect("joined once");
            let run = c.client_rt.run(handle).expect("a stream reader panicked");
            (s, run)
        })
        .collect()
}

/// A frame of the client's TCP connection from `sport` to the service.
fn client_frame(sport: u16, flags: u8) -> Vec<u8> {
    Spec::tcp(CLIENT, VIP, sport, 443, flags).build()
}

/// The backend (index in `c.backends`) node `i`'s own program sends each
/// frame to, on the node's live maps; panics unless it forwards it.
fn sent_by_node(c: &Cluster, i: usize, frames: Vec<Vec<u8>>) -> Vec<usize> {
    let macs = c.backend_macs();
    let out = c.on_node_dataplane(i, move |dp, ifindex| {
        frames
            .iter()
            .map(|f| dp.test_run_xdp_on(f, ifindex).expect("test run"))
            .collect::<Vec<_>>()
    });
    out.into_iter()
        .map(|(action, frame)| {
            assert_eq!(action, XDP_TX, "node {i} forwards the frame back out");
            macs.iter()
                .position(|m| frame[..6] == m[..])
                .unwrap_or_else(|| {
                    panic!("node {i} sent a frame to {:02x?}, no backend", &frame[..6])
                })
        })
        .collect()
}

fn backend_index(c: &Cluster, name: &str) -> usize {
    c.backends
        .iter()
        .position(|b| b.name == name)
        .unwrap_or_else(|| panic!("{name} is no backend"))
}

/// Node `i`'s view of each port's flow: its slot in the active table (the
/// backends as addresses: ids differ between nodes) and the node's pin.
#[derive(Clone, Debug)]
struct View {
    /// (current backend, previous backend) of the flow's slot.
    slot: (IpAddr, IpAddr),
    /// The backend the node pinned the flow to, if it did.
    pin: Option<IpAddr>,
    /// Where the node's program sends the flow's next packet (not a SYN),
    /// by fixture after the pin was read (index in `c.backends`).
    next: Option<usize>,
}

impl View {
    fn changed(&self) -> bool {
        self.slot.0 != self.slot.1
    }
}

/// Node `i`'s [`View`] of the flows from `sports`; with `fixture`, also
/// where its program sends each flow's next packet.
fn views(c: &Cluster, i: usize, sports: Vec<u16>, fixture: bool) -> Vec<View> {
    let macs = c.backend_macs();
    c.on_node_dataplane(i, move |dp: &Dataplane, ifindex| {
        let ids = &dp.recorded_ids().services["web"];
        let addr = |id: u32| -> IpAddr {
            ids.backends
                .iter()
                .find(|(_, b)| **b == id)
                .map(|(a, _)| a.ip())
                .unwrap_or_else(|| panic!("backend id {id} is not in the record"))
        };
        let (_, table) = dp.active_table(ids.id).expect("web's table");
        let mut out: Vec<View> = sports
            .iter()
            .map(|sport| {
                let k = client_flow_key(*sport);
                // Nodes of a cluster not told otherwise run murmur3, alike.
                let h =
                    lb_common::FlowHash::Murmur3.hash(&k.src, &k.dst, k.sport, k.dport, k.proto);
                let s: MaglevSlot = table[lb_common::maglev_slot(h, table.len() as u32) as usize];
                View {
                    slot: (addr(s.backend), addr(s.prev)),
                    pin: dp.flow_pin(&k).map(|v| addr(v.backend)),
                    next: None,
                }
            })
            .collect();
        // After every pin is read: a miss in a changed slot pins too.
        for (v, sport) in out.iter_mut().filter(|_| fixture).zip(&sports) {
            let (action, frame) = dp
                .test_run_xdp_on(&client_frame(*sport, TCP_ACK), ifindex)
                .expect("test run");
            assert_eq!(action, XDP_TX, "node {i} forwards port {sport}'s packet");
            v.next = macs.iter().position(|m| frame[..6] == m[..]);
            assert!(
                v.next.is_some(),
                "node {i} sent port {sport}'s packet to no backend"
            );
        }
        out
    })
}

/// After a second, kills the node carrying most of `streams`, all of them
/// still running (so each has packets to send after the kill); returns
/// the node and the time until the router's withdrawal.
fn kill_busiest(c: &mut Cluster, streams: &[Open], carried: &[u64]) -> (usize, Duration) {
    std::thread::sleep(Duration::from_secs(1));
    let dead = busiest(carried);
    let running = streams
        .iter()
        .filter(|s| s.run.as_ref().is_some_and(|r| !r.is_finished()))
        .count();
    assert_eq!(
        running,
        streams.len(),
        "every stream still runs at the kill"
    );
    let before = c.next_hops();
    let killed = Instant::now();
    c.kill_node(dead);
    let rest: Vec<usize> = (0..3).filter(|i| *i != dead).collect();
    // Every next-hop set the router goes through, until it is the others'
    // and has stayed so for a second.
    let mut states: Vec<(Duration, Vec<String>)> = vec![(Duration::ZERO, before)];
    let mut withdrawn = None;
    loop {
        let hops = c.next_hops();
        let t = killed.elapsed();
        if hops != states.last().unwrap().1 {
            states.push((t, hops.clone()));
        }
        let want: Vec<String> = rest
            .iter()
            .map(|i| lb_tests::cluster::node_addr(*i))
            .collect();
        if hops == want {
            withdrawn.get_or_insert(t);
        } else {
            withdrawn = None;
        }
        if withdrawn.is_some_and(|w| t > w + Duration::from_secs(1)) {
            break;
        }
        assert!(
            t < Duration::from_secs(5),
            "next hops after the kill: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    println!("the router's next hops after node {dead}'s kill: {states:?}");
    (dead, withdrawn.unwrap())
}

fn stall_summary(runs: &[&StreamRun]) -> String {
    let mut stalls: Vec<Duration> = runs.iter().map(|r| r.longest_stall).collect();
    stalls.sort();
    match (stalls.first(), stalls.last()) {
        (Some(lo), Some(hi)) => format!(
            "longest stall per stream {lo:?} .. {hi:?} (median {:?})",
            stalls[stalls.len() / 2]
        ),
        _ => "no streams".into(),
    }
}

/// Scenario 2, with scenario 1's packet-fixture half first: 30 streams of
/// 2 MB, then the node carrying most of them dies whole; every stream
/// finishes whole, and the router's withdrawal is timed.
#[test]
fn streams_of_a_dead_node_move_to_the_others_and_finish_whole() {
    let started = Instant::now();
    let mut c = Cluster::start_with_etcd(3, 3);
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(20));
    wait_for("one table on every node", Duration::from_secs(10), || {
        let f = c.fingerprints();
        f.iter().all(|x| !x.is_empty() && *x == f[0])
    });

    // Scenario 1, by packet fixture on each node's own program on its
    // live maps: a SYN of one 5-tuple reaches one backend; so does the
    // next packet of an established flow (a stream only one node saw
    // start).
    const SPORT: u16 = 20_002;
    let probe = open_streams(&c, 1, Duration::from_millis(50));
    let frames = vec![
        client_frame(SPORT, TCP_SYN),
        client_frame(probe[0].sport, TCP_ACK),
    ];
    let sent: Vec<Vec<usize>> = (0..3)
        .map(|i| sent_by_node(&c, i, frames.clone()))
        .collect();
    println!(
        "by fixture on nodes 0, 1, 2: SYN from port {SPORT} to backends {:?}, the established \
         stream from port {} (through node {}, on {}) to {:?}",
        sent.iter().map(|s| s[0]).collect::<Vec<_>>(),
        probe[0].sport,
        probe[0].carrier,
        probe[0].backend,
        sent.iter().map(|s| s[1]).collect::<Vec<_>>(),
    );
    for (i, s) in sent.iter().enumerate() {
        assert_eq!(s[0], sent[0][0], "node {i}: the SYN's backend");
        assert_eq!(
            c.backends[s[1]].name, probe[0].backend,
            "node {i}: the stream's"
        );
    }

    let streams = open_streams(&c, STREAMS, Duration::from_millis(50));
    let carried = per_node(&c, streams.iter().map(|s| s.carrier));
    println!("{STREAMS} streams of 2 MB, per node {carried:?}");
    let (dead, withdrawn) = kill_busiest(&mut c, &streams, &carried);
    let rest: Vec<usize> = (0..3).filter(|i| *i != dead).collect();

    let done = join(&c, streams);
    let runs: Vec<&StreamRun> = done.iter().map(|(_, r)| r).collect();
    let moved = done.iter().filter(|(s, _)| s.carrier == dead).count();
    let of_dead: Vec<&StreamRun> = done
        .iter()
        .filter(|(s, _)| s.carrier == dead)
        .map(|(_, r)| r)
        .collect();
    println!(
        "node {dead} killed whole -> the router's withdrawal after {withdrawn:?}; \
         {moved} streams moved off it"
    );
    println!("all streams: {}", stall_summary(&runs));
    println!("streams of node {dead}: {}", stall_summary(&of_dead));
    let broken: Vec<String> = done
        .iter()
        .filter(|(_, r)| !r.whole || r.bytes != whole_bytes())
        .map(|(s, r)| {
            format!(
                "port {} on node {} ({}): {} bytes, {:?}",
                s.sport, s.carrier, s.backend, r.bytes, r.failure
            )
        })
        .collect();
    println!("{} of {STREAMS} streams broken", broken.len());
    assert!(broken.is_empty(), "broken streams: {broken:#?}");
    assert!(moved > 0, "the killed node carried streams");
    let probe = join(&c, probe);
    assert!(probe[0].1.whole, "{:?}", probe[0].1.failure);
    assert!(rest.iter().all(|i| c.lbs[*i].is_some()));
    assert!(
        withdrawn < Duration::from_secs(1),
        "withdrawal took {withdrawn:?}"
    );
    println!("test took {:?}", started.elapsed());
}

/// Scenario 6, today's baseline: 30 streams open, a 4th backend added
/// through the API, 30 more streams, then the node carrying most of the
/// new ones dies. A flow is pinned only on the node that saw its SYN; the
/// node that takes it over has no pin and sends its packets in a changed
/// slot to the slot's previous backend, which resets it. So exactly the
/// new streams in changed slots that reached another node break; streams
/// opened before the change and streams in unchanged slots never do.
/// "Another node" is more than the dead node's: the router's ECMP is
/// hash-threshold, so dropping one next hop also moves some flows between
/// the survivors; and until the withdrawal the bridge floods the dead
/// node's frames (its port went down) to every node, whose programs
/// balance them (XDP does not check the destination MAC).
#[test]
fn after_a_backend_change_node_loss_breaks_the_new_streams_pinned_on_it() {
    let started = Instant::now();
    let mut c = Cluster::start_with_etcd_and_spares(3, 3, 1);
    c.wait_next_hops(&[0, 1, 2], Duration::from_secs(20));
    wait_for("one table on every node", Duration::from_secs(10), || {
        let f = c.fingerprints();
        f.iter().all(|x| !x.is_empty() && *x == f[0])
    });
    let before_fp = c.fingerprints()[0].clone();

    // Opened before the change: 2 MB over 16 s, so they outlive the kill.
    let old = open_streams(&c, STREAMS, Duration::from_millis(80));
    let added = format!("{}:443", backend_addr(3));
    let (s, v) = c.lb(0).call(
        "POST",
        "/api/v1/services/web/backends",
        Some(&format!("{{\"address\": \"{added}\", \"weight\": 100}}")),
        None,
    );
    assert_eq!(s, 201, "{v}");
    let took = c.wait_new_table(
        "the new table on every node",
        &before_fp,
        Duration::from_secs(5),
    );
    println!("backend {added} added through node 0: every node's table has it after {took:?}");

    let new = open_streams(&c, STREAMS, Duration::from_millis(50));
    let carried_old = per_node(&c, old.iter().map(|s| s.carrier));
    let carried_new = per_node(&c, new.iter().map(|s| s.carrier));
    println!("streams per node: {carried_old:?} opened before the change, {carried_new:?} after");

    let (dead, withdrawn) = kill_busiest(&mut c, &new, &carried_new);
    let rest: Vec<usize> = (0..3).filter(|i| *i != dead).collect();
    let sports: Vec<u16> = new.iter().map(|s| s.sport).collect();
    let old_done = join(&c, old);
    let new_done = join(&c, new);

    // Every node's slot and pin for each new stream, read from its pinned
    // maps once the streams ended (the dead node's maps outlive it).
    let seen: Vec<Vec<View>> = (0..3)
        .map(|i| views(&c, i, sports.clone(), i != dead))
        .collect();
    let mut changed = Vec::new();
    let mut took_over = Vec::new();
    for (k, (s, _)) in new_done.iter().enumerate() {
        let mine = &seen[s.carrier][k];
        for (i, v) in seen.iter().enumerate() {
            assert_eq!(
                v[k].slot, mine.slot,
                "port {}: node {i} has the same slot",
                s.sport
            );
        }
        let backend: IpAddr = backend_addr(backend_index(&c, &s.backend)).parse().unwrap();
        assert_eq!(
            mine.slot.0, backend,
            "port {}: a new stream takes its slot's current backend",
            s.sport
        );
        // Pinned only in a changed slot, by the node that saw the SYN.
        assert_eq!(
            mine.pin,
            mine.changed().then_some(backend),
            "port {}",
            s.sport
        );
        // Any other node's pin was made when it got the flow's packets
        // without one: to the slot's previous backend.
        let others: Vec<usize> = (0..3)
            .filter(|i| *i != s.carrier && seen[*i][k].pin.is_some())
            .collect();
        for i in &others {
            assert!(
                mine.changed() && rest.contains(i),
                "port {}: node {i}'s pin",
                s.sport
            );
            assert_eq!(
                seen[*i][k].pin,
                Some(mine.slot.1),
                "port {}: node {i}'s pin",
                s.sport
            );
        }
        if s.carrier == dead && mine.changed() {
            assert!(!others.is_empty(), "port {}: a node took it over", s.sport);
        }
        changed.push(mine.changed());
        took_over.push(others);
    }
    let in_changed = changed.iter().filter(|c| **c).count();

    let broken: Vec<usize> = (0..STREAMS).filter(|k| !new_done[*k].1.whole).collect();
    let old_broken = old_done.iter().filter(|(_, r)| !r.whole).count();
    let on_dead = broken
        .iter()
        .filter(|k| new_done[**k].0.carrier == dead)
        .count();
    println!(
        "node {dead} killed whole -> withdrawal after {withdrawn:?}; {in_changed} of the {STREAMS} new \
         streams are in changed slots; {} of {STREAMS} new streams broken ({on_dead} carried by node \
         {dead}, {} moved between the others), {old_broken} of {STREAMS} opened before the change",
        broken.len(),
        broken.len() - on_dead
    );
    for k in &broken {
        let (s, r) = &new_done[*k];
        println!(
            "  broken: port {} on node {} -> nodes {:?} ({}), slot (current, previous) {:?}: {:?}",
            s.sport, s.carrier, took_over[*k], s.backend, seen[s.carrier][*k].slot, r.failure
        );
    }
    let whole: Vec<&StreamRun> = new_done
        .iter()
        .chain(&old_done)
        .filter(|(_, r)| r.whole)
        .map(|(_, r)| r)
        .collect();
    println!("streams that finished: {}", stall_summary(&whole));

    assert_eq!(
        old_broken, 0,
        "streams opened before the change never break"
    );
    for (s, r) in old_done.iter().chain(&new_done) {
        if r.whole {
            assert_eq!(r.bytes, whole_bytes(), "port {}", s.sport);
        }
    }
    for (k, (s, r)) in new_done.iter().enumerate() {
        // A stream breaks exactly when a node without its pin took it over
        // in a changed slot.
        assert_eq!(
            !r.whole,
            changed[k] && !took_over[k].is_empty(),
            "port {} on node {} (taken over by {:?}), slot changed {}: {:?}",
            s.sport,
            s.carrier,
            took_over[k],
            changed[k],
            r.failure
        );
        if let Some(f) = &r.failure {
            assert!(f.is_reset(), "port {}: {f}", s.sport);
        }
    }
    // Why, on each program: a node that took a broken stream over sends
    // its next packet to the slot's previous backend, not to the stream's.
    for k in &broken {
        for node in &took_over[*k] {
            let v = &seen[*node][*k];
            let next = v.next.expect("a fixture on a live node");
            assert_eq!(
                backend_addr(next),
                v.slot.1.to_string(),
                "node {node} sends port {} to the previous backend",
                sports[*k]
            );
            assert_ne!(c.backends[next].name, new_done[*k].0.backend);
        }
    }
    println!(
        "BASELINE: {} of {STREAMS} streams opened after a backend change broke when node {dead} died",
        broken.len()
    );
    println!("test took {:?}", started.elapsed());
}
