//! Flow-table pressure: a flood of SYNs from spoofed sources, crafted frames
//! through `BPF_PROG_TEST_RUN`, against a small flow table (its size set in
//! the config), and what happens to the established flows of real clients.
//!
//! The design keeps flow entries only for slots whose backend changed
//! ("sticky" slots). So:
//! - a SYN flood into a table that never changed costs no entry at all;
//! - a flow in a clean slot needs no entry: it keeps its backend whatever
//!   the flood does (100%);
//! - a flow established before its slot changed needs no entry either: an
//!   unpinned non-SYN packet in a sticky slot goes to the slot's previous
//!   backend, which is its backend (100%);
//! - a flow established after its slot changed (it went to the new backend)
//!   lives only in the flow table. A spoofed SYN is one packet: its entry is
//!   never used again, and the kernel's LRU evicts unused entries first, so
//!   a SYN flood does not evict a flow that has sent a second packet (while
//!   such flows hold less than half the table). A flood that sends two
//!   packets per spoofed source (SYN, then ACK: no handshake is needed) does
//!   evict idle flows, whose next packet then follows the slot's previous
//!   backend; a flow that talks more often than the flood turns the table
//!   over keeps its entry.
//!
//! `LB_FUZZ_SEED` picks the spoofed sources; `LB_FUZZ_SCALE` the flood size.
use std::{path::Path, time::Instant};

use lb_common::MaglevSlot;
use lb_tests::{
    packet::{self, Spec, TCP_ACK, TCP_SYN},
    rng::{self, Rng},
};
use lb_userspace::{
    config::Config,
    dataplane::{
        BackendSpec, Dataplane, Family, Forwarding, MapWriter, Options, Protocol, ServiceSpec,
        addr_words,
    },
};

const XDP_PASS: u32 = 2;
const FLOW_TABLE: u32 = 4096;
const FLOOD: usize = 200_000;

/// The data plane with the flow table sized by the config file (and, unlike
/// the daemon's, pinned nowhere: each test has its own).
fn dataplane() -> Dataplane {
    lb_tests::require_root();
    let text = format!(
        "[dataplane]\nflow_table_size = {FLOW_TABLE}\nmax_services = 1\n\n\
         [[services]]\nname = \"web\"\nbackends = [{{ address = \"127.0.0.1:8001\" }}]\n"
    );
    let config = Config::parse(Path::new("flood.toml"), &text).expect("config");
    assert_eq!(config.dataplane.flow_table_size, FLOW_TABLE);
    Dataplane::load(Options {
        flow_table_size: config.dataplane.flow_table_size,
        max_services: config.dataplane.max_services,
        ..Options::default()
    })
    .expect("the eBPF object loads")
}

fn web(ports: std::ops::RangeInclusive<u16>) -> ServiceSpec {
    ServiceSpec {
        when_all_down: Default::default(),
        name: "web".into(),
        listen: "0.0.0.0:443".parse().unwrap(),
        protocols: vec![Protocol::Tcp],
        forwarding: Forwarding::Local,
        backends: ports
            .map(|p| BackendSpec::new(format!("127.0.0.1:{p}").parse().unwrap(), 100))
            .collect(),
    }
}

/// A real client's flow: the frame and the backend port it was given.
#[derive(Clone)]
struct Flow {
    spec: Spec,
    backend: u16,
}

fn clients(n: usize, first_port: u16) -> Vec<Spec> {
    (0..n)
        .map(|i| {
            let src = format!("10.1.{}.{}", i / 250, i % 250 + 1);
            Spec::tcp(&src, "10.0.0.1", first_port + i as u16, 443, TCP_SYN)
        })
        .collect()
}

/// Sends one packet of the flow with `flags`; the backend port it went to.
fn send(dp: &Dataplane, spec: &Spec, flags: u8) -> u16 {
    let (action, out) = dp
        .test_run_xdp(&spec.clone().with_flags(flags).build())
        .expect("test run");
    assert_eq!(action, XDP_PASS);
    packet::parse(&out).unwrap().dport
}

/// SYN, then ACK: an established connection, and the backend it uses.
fn establish(dp: &Dataplane, specs: &[Spec]) -> Vec<Flow> {
    specs
        .iter()
        .map(|s| {
            let backend = send(dp, s, TCP_SYN);
            assert_eq!(send(dp, s, TCP_ACK), backend, "a flow moved on its ACK");
            Flow {
                spec: s.clone(),
                backend,
            }
        })
        .collect()
}

/// The slot of the active table a flow hashes to.
fn slot(w: &MapWriter, spec: &Spec) -> MaglevSlot {
    let p = packet::parse(&spec.build()).unwrap();
    let h = w.dataplane().flow_hash().hash(
        &addr_words(p.src),
        &addr_words(p.dst),
        p.sport.to_be(),
        p.dport.to_be(),
        p.proto,
    );
    let (_, table) = w.dataplane().active_table(0).unwrap();
    table[lb_common::maglev_slot(h, table.len() as u32) as usize]
}

fn port_of(w: &MapWriter, svc: &ServiceSpec, id: u32) -> u16 {
    svc.backends
        .iter()
        .find(|b| w.backend_id(&svc.name, b.address) == Some(id))
        .map(|b| b.address.port())
        .expect("backend id of the service")
}

/// Spoofed SYNs to 10.0.0.1:443 from random sources. The template is built
/// once; each frame gets another source address and port. Checksums go
/// stale, which the data plane never looks at (the stack would).
struct Flooder {
    rng: Rng,
    frame: Vec<u8>,
}

impl Flooder {
    fn new(seed: u64) -> Self {
        Flooder {
            rng: Rng::new(seed),
            frame: Spec::tcp("192.0.2.1", "10.0.0.1", 1, 443, TCP_SYN).build(),
        }
    }

    /// Runs `n` frames: SYNs from new sources, or with `ack`, a SYN and
    /// an ACK from each (what a flood that mimics handshakes sends; no
    /// handshake is needed to send the second packet). Returns the time.
    fn run(&mut self, dp: &Dataplane, n: usize, ack: bool) -> std::time::Duration {
        let started = Instant::now();
        for i in 0..n {
            if !ack || i % 2 == 0 {
                // Anything but the real clients' 10.1.0.0/16.
                let src = (self.rng.u32() & 0x7fff_ffff) | 0x4000_0000;
                self.frame[26..30].copy_from_slice(&src.to_be_bytes());
                self.frame[34..36].copy_from_slice(&self.rng.u16().to_be_bytes());
                self.frame[47] = TCP_SYN;
            } else {
                self.frame[47] = TCP_ACK;
            }
            let (action, _) = dp.test_run_xdp(&self.frame).expect("test run");
            assert_eq!(action, XDP_PASS);
        }
        started.elapsed()
    }
}

/// Key size, maximum entries and locked memory of this process's flow
/// tables (LRU hash maps of 16-byte values keyed by a 16-byte `FlowKey4`
/// or a 40-byte `FlowKey`), from `/proc/self/fdinfo`.
fn flow_maps() -> Vec<(u32, u32, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        // The LRU maps of 16-byte values (the fragments map has 40-byte
        // keys too, and 8-byte values).
        let key_size = field("key_size:").and_then(|v| v.parse().ok());
        if field("map_type:").as_deref() == Some("9")
            && matches!(key_size, Some(16 | 40))
            && field("value_size:").as_deref() == Some("16")
        {
            out.push((
                key_size.unwrap(),
                field("max_entries:").unwrap().parse().unwrap(),
                field("memlock:").and_then(|v| v.parse().ok()).unwrap_or(0),
            ));
        }
    }
    out
}

fn percent(kept: usize, of: usize) -> f64 {
    if of == 0 {
        100.0
    } else {
        100.0 * kept as f64 / of as f64
    }
}

#[derive(Default)]
struct Category {
    flows: usize,
    kept: usize,
}

const CATEGORIES: [&str; 3] = [
    "clean slot",
    "sticky slot, established before the change",
    "sticky slot, established after the change",
];

/// Sends one more packet of every flow; per category, how many kept their
/// backend, and how many went anywhere but their slot's previous backend.
fn survivors(
    w: &MapWriter,
    svc: &ServiceSpec,
    before: &[Flow],
    after: &[Flow],
) -> ([Category; 3], usize) {
    let mut cats: [Category; 3] = Default::default();
    let mut elsewhere = 0;
    for (established_after, flows) in [(false, before), (true, after)] {
        for f in flows {
            let s = slot(w, &f.spec);
            let cat = match (s.backend != s.prev, established_after) {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => 2,
            };
            let now = send(w.dataplane(), &f.spec, TCP_ACK);
            cats[cat].flows += 1;
            if now == f.backend {
                cats[cat].kept += 1;
            } else if now != port_of(w, svc, s.prev) {
                elsewhere += 1;
            }
        }
    }
    (cats, elsewhere)
}

#[test]
fn a_syn_flood_keeps_established_flows_and_the_flow_table_bounded() {
    // The kernel's LRU keeps fresh entries on per-CPU lists and, short of
    // free ones, takes them from another CPU's list whether used or not:
    // the order of eviction checked below holds per CPU. Every packet of
    // this test runs on the CPU it starts on (once a flood on a migrating
    // thread evicted 128 of 491 used pins).
    let mut one = rustix::thread::CpuSet::new();
    one.set(rustix::thread::sched_getcpu());
    rustix::thread::sched_setaffinity(None, &one).expect("pin the test's thread to its CPU");
    let seed = rng::seed("syn flood", 0xf100d);
    let flood = FLOOD * rng::scale();
    let dp = dataplane();
    let maps = flow_maps();
    assert!(
        maps.iter().any(|(key, _, _)| *key == 16)
            && maps.iter().any(|(key, _, _)| *key == 40)
            && maps.iter().all(|(_, max, _)| *max == FLOW_TABLE),
        "flow table sizes in this process: {maps:?}"
    );
    let mut svc = web(8001..=8005);
    let mut w = MapWriter::new(dp);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let mut flooder = Flooder::new(seed);

    // A table that never changed: a SYN costs no flow entry.
    let took = flooder.run(w.dataplane(), flood / 4, false);
    assert_eq!(
        w.dataplane().flow_count(),
        0,
        "SYNs into an unchanged table made flow entries"
    );
    println!(
        "syn flood into an unchanged table: {} SYNs in {:.2} s, no flow entry",
        flood / 4,
        took.as_secs_f64()
    );

    // Real clients, then a change (a sixth backend), then more clients.
    let before = establish(w.dataplane(), &clients(3000, 20000));
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    for f in &before {
        assert_eq!(
            send(w.dataplane(), &f.spec, TCP_ACK),
            f.backend,
            "a flow moved when a backend was added"
        );
    }
    let locked = |key: u32| maps.iter().find(|m| m.0 == key).map_or(0, |m| m.2);
    println!(
        "flow tables of {FLOW_TABLE} entries each, set by dataplane.flow_table_size: IPv4 {} \
         bytes locked, IPv6 {} bytes",
        locked(16),
        locked(40)
    );
    let mut first_port = 30000;
    for (ack, what) in [(false, "SYN flood"), (true, "SYN+ACK flood")] {
        // Fresh clients whose slots changed before they came: the flood
        // can hurt only them.
        let after = establish(w.dataplane(), &clients(3000, first_port));
        first_port += 3000;
        let pinned_before = w.dataplane().flow_count();
        let took = flooder.run(w.dataplane(), flood, ack);
        let pinned_after = w.dataplane().flow_count();
        assert!(
            pinned_after <= FLOW_TABLE as usize,
            "{pinned_after} flow entries"
        );
        let (cats, elsewhere) = survivors(&w, &svc, &before, &after);
        println!(
            "{what}: {flood} spoofed frames in {:.2} s = {:.0} frames/s through test-run; \
             flow entries {pinned_before} before, {pinned_after} after",
            took.as_secs_f64(),
            flood as f64 / took.as_secs_f64()
        );
        for (c, name) in cats.iter().zip(CATEGORIES) {
            println!(
                "  {name:<45} {:>5} flows, {:>5} kept their backend ({:.1}%)",
                c.flows,
                c.kept,
                percent(c.kept, c.flows)
            );
        }
        assert!(
            cats.iter().all(|c| c.flows > 100),
            "too few flows per category"
        );
        assert_eq!(
            cats[0].kept, cats[0].flows,
            "{what}: clean-slot flows moved"
        );
        assert_eq!(
            cats[1].kept, cats[1].flows,
            "{what}: flows established before their slot changed moved"
        );
        if !ack {
            // Single-packet flood entries are evicted before used ones.
            assert_eq!(
                cats[2].kept, cats[2].flows,
                "a SYN flood evicted flows that had sent a second packet"
            );
        }
        // A flow that lost its entry follows the slot's previous backend.
        assert_eq!(
            elsewhere, 0,
            "{what}: a flow went to neither of its slot's backends"
        );
    }
}

/// Flows that keep talking through a SYN+ACK flood keep their flow-table
/// entry as long as they talk more often than the flood turns the table
/// over: the LRU evicts what is not used. Each round, every real flow sends
/// one packet after `interval` flood frames; measured for flows established
/// after their slot changed, the only ones a flood can hurt.
#[test]
fn talking_flows_outlive_the_flood() {
    let seed = rng::seed("syn flood, talking clients", 0x7a1c);
    let dp = dataplane();
    let mut svc = web(8001..=8005);
    let mut w = MapWriter::new(dp);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let mut flooder = Flooder::new(seed);
    println!("talking clients through a SYN+ACK flood, flow table {FLOW_TABLE} entries:");
    let mut first_port = 20000;
    let mut results = Vec::new();
    for interval in [2_000usize, 16_000, 64_000] {
        // Fresh flows, all in sticky slots, established after the change.
        let specs: Vec<Spec> = clients(6000, first_port)
            .into_iter()
            .filter(|s| {
                let sl = slot(&w, s);
                sl.backend != sl.prev
            })
            .collect();
        first_port += 6000;
        let flows = establish(w.dataplane(), &specs);
        let mut kept = vec![true; flows.len()];
        let rounds = (FLOOD / 2 / interval).max(3);
        for _ in 0..rounds {
            flooder.run(w.dataplane(), interval, true);
            for (i, f) in flows.iter().enumerate() {
                if send(w.dataplane(), &f.spec, TCP_ACK) != f.backend {
                    kept[i] = false;
                }
            }
        }
        let n = kept.iter().filter(|k| **k).count();
        println!(
            "  a packet every {interval:>6} flood frames (~{} new flow entries): {n} of {} flows \
             kept their backend throughout ({:.1}%)",
            interval / 12,
            flows.len(),
            percent(n, flows.len())
        );
        results.push((interval, percent(n, flows.len())));
        assert!(w.dataplane().flow_count() <= FLOW_TABLE as usize);
    }
    // Talking far more often than the flood can fill the table: no loss.
    assert_eq!(
        results[0].1, 100.0,
        "flows talking every 2,000 flood frames were lost"
    );
}

/// The flow table's size as `/metrics` reads it (`FlowCounter::count`: two
/// counters, no walk) follows the pins the program adds and the ones the
/// daemon's sweep removes, and stays within the capacity once the LRU
/// evicts (which neither side sees).
#[test]
fn the_flow_table_size_follows_inserts_and_removals_without_a_walk() {
    let dp = dataplane();
    let mut svc = web(8001..=8005);
    let mut w = MapWriter::new(dp);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let counter = w.dataplane().flow_counter().unwrap();
    let size = |w: &MapWriter| {
        let v4 = counter.count(Family::V4).unwrap();
        assert_eq!(w.dataplane().flow_entries_of(Family::V4).unwrap(), v4);
        // Every flow here is IPv4: the IPv6 table stays empty.
        assert_eq!(counter.count(Family::V6).unwrap(), 0);
        assert_eq!(w.dataplane().flow_entries().unwrap(), v4);
        v4 as usize
    };
    assert_eq!(size(&w), 0);

    // A sixth backend makes slots sticky; flows there are pinned once.
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let (sticky, clean): (Vec<Spec>, Vec<Spec>) = clients(3000, 20000).into_iter().partition(|s| {
        let sl = slot(&w, s);
        sl.backend != sl.prev
    });
    assert!(sticky.len() > 200 && clean.len() > 200);
    let flows = establish(w.dataplane(), &sticky);
    establish(w.dataplane(), &clean);
    assert_eq!(w.dataplane().flow_count(), sticky.len());
    assert_eq!(size(&w), sticky.len(), "one entry per sticky flow");
    // Packets of pinned flows, and a re-pick of a pin, add no entry.
    establish(w.dataplane(), &sticky);
    assert_eq!(size(&w), sticky.len(), "known keys counted again");

    // The sixth backend goes: its pins are stale and the sweep removes them.
    let on_sixth = flows.iter().filter(|f| f.backend == 8006).count();
    assert!(on_sixth > 0, "no flow went to the new backend");
    svc.backends.pop();
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let plan = w.sweep_plan(lb_userspace::dataplane::monotonic_secs());
    let found = counter.walk(&plan);
    let report = w.finish_sweep(&plan, &found).unwrap();
    assert_eq!(report.stale_pins_removed, on_sixth);
    assert_eq!(w.dataplane().flow_count(), sticky.len() - on_sixth);
    assert_eq!(size(&w), sticky.len() - on_sixth, "removals counted");

    // A flood of new keys in sticky slots: the LRU evicts, the size stays
    // at most the capacity and never below what the table holds.
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8007".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    Flooder::new(0x5123).run(w.dataplane(), 20 * FLOW_TABLE as usize, false);
    let held = w.dataplane().flow_count();
    let counted = size(&w);
    println!("after the flood: {held} entries held, {counted} counted, capacity {FLOW_TABLE}");
    assert!(held <= counted && counted <= FLOW_TABLE as usize);
    assert_eq!(
        counted, FLOW_TABLE as usize,
        "the flood added more keys than fit"
    );

    // The sweep's walk finds what the LRU evicted: exact again.
    svc.backends.pop();
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let plan = w.sweep_plan(lb_userspace::dataplane::monotonic_secs());
    let found = counter.walk(&plan);
    w.finish_sweep(&plan, &found).unwrap();
    let held = w.dataplane().flow_count();
    assert!(held > 0 && held < FLOW_TABLE as usize, "{held} entries");
    assert_eq!(size(&w), held, "the walk corrects the count");

    // Emptied by the daemon: the count follows down to zero.
    w.dataplane_mut().clear_flows();
    assert_eq!(size(&w), 0);
}
