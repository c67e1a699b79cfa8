//! The program's pin reports (`LB_PIN_RING`, cluster pin sharing), by
//! `BPF_PROG_TEST_RUN` on the real object: which pins are reported, what a
//! report holds, a full ring, and a report replayed into a second node's
//! maps (other ids) keeping the flow on its backend.
use std::net::SocketAddr;

use lb_common::{PinReport, PinReportStat};
use lb_tests::fixtures::{client_flows, five_backends, flow_key, options, service};
use lb_tests::packet::{self, Spec, TCP_ACK, TCP_SYN};
use lb_userspace::dataplane::{
    BackendSpec, Dataplane, MapWriter, Options, PinOutcome, PinRefusal, PinRing, ServiceSpec,
    words_addr,
};

const XDP_PASS: u32 = 2;

/// The backend port each flow's packet (with `flags`) was sent to.
fn send(dp: &Dataplane, flows: &[Spec], flags: u8) -> Vec<u16> {
    flows
        .iter()
        .map(|f| {
            let (action, out) = dp
                .test_run_xdp(&f.clone().with_flags(flags).build())
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!(action, XDP_PASS);
            packet::parse(&out).unwrap().dport
        })
        .collect()
}

fn loaded(pin_report: bool) -> (MapWriter, PinRing) {
    lb_tests::require_root();
    let dp = Dataplane::load(Options {
        pin_report,
        flow_insert_rate: 0,
        ..options()
    })
    .expect("the eBPF object loads and verifies");
    let mut w = MapWriter::new(dp);
    let ring = w.dataplane_mut().take_pin_ring().unwrap();
    (w, ring)
}

fn drain(ring: &mut PinRing) -> Vec<PinReport> {
    let mut out = Vec::new();
    while ring.drain(&mut out, 1024) > 0 {}
    out
}

fn with_backend(svc: &ServiceSpec, port: u16) -> ServiceSpec {
    let mut s = svc.clone();
    s.backends.push(BackendSpec::new(
        format!("127.0.0.1:{port}").parse().unwrap(),
        100,
    ));
    s
}

/// Only new pins in changed slots are reported, one report each, naming
/// the flow and the backend's address and port; a second node given the
/// reports (its ids differ) sends the flows' next packets to the same
/// backends, where without them it sends them to the slots' previous ones.
#[test]
fn new_pins_in_changed_slots_are_reported_and_replay_on_another_node() {
    let svc = five_backends();
    let (mut a, mut ring) = loaded(true);
    a.apply(std::slice::from_ref(&svc)).unwrap();
    let flows = client_flows(3000);
    send(a.dataplane(), &flows, TCP_SYN);
    assert_eq!(drain(&mut ring).len(), 0, "clean slots pin nothing");

    let svc = with_backend(&svc, 8006);
    a.apply(std::slice::from_ref(&svc)).unwrap();
    let ports = send(a.dataplane(), &flows, TCP_SYN);
    let reports = drain(&mut ring);
    let pinned = a.dataplane().flow_count();
    println!(
        "{} SYNs, {pinned} pinned in changed slots, {} reports",
        flows.len(),
        reports.len()
    );
    assert!(pinned > 100, "{pinned} flows in changed slots");
    assert_eq!(reports.len(), pinned, "one report per new pin");
    let counts = ring.counts().unwrap();
    assert_eq!(counts[PinReportStat::Reported as usize], pinned as u64);
    assert_eq!(counts[PinReportStat::RingFull as usize], 0);
    let id = a.service_id("web").unwrap();
    let mut reported_flows = Vec::new();
    for r in &reports {
        let i = flows
            .iter()
            .position(|f| flow_key(f) == r.key)
            .expect("a report names a flow that was sent");
        assert_eq!(r.backend_port, ports[i], "the backend the SYN went to");
        assert_eq!(words_addr(&r.backend_addr).to_string(), "127.0.0.1");
        assert_eq!(r.service, id);
        reported_flows.push(i);
    }
    // Established packets of pinned flows write no new pins.
    send(a.dataplane(), &flows, TCP_ACK);
    assert_eq!(drain(&mut ring).len(), 0, "ACKs of pinned flows");

    // Node b: another service first (other ids), backends listed in
    // another order, the same change.
    let (mut b, _) = loaded(false);
    let other = service("other", "0.0.0.0:80", &["127.0.0.1:9001", "127.0.0.1:9002"]);
    let mut reversed = five_backends();
    reversed.backends.reverse();
    b.apply(&[other.clone(), reversed.clone()]).unwrap();
    let mut reversed = with_backend(&reversed, 8006);
    b.apply(&[other.clone(), reversed.clone()]).unwrap();
    assert_ne!(b.service_id("web"), a.service_id("web"));
    assert_eq!(b.table_fingerprint("web"), a.table_fingerprint("web"));
    let subset: Vec<Spec> = reported_flows.iter().map(|&i| flows[i].clone()).collect();
    let want: Vec<u16> = reported_flows.iter().map(|&i| ports[i]).collect();
    let unpinned = send(b.dataplane(), &subset, TCP_ACK);
    let moved = unpinned.iter().zip(&want).filter(|(x, y)| x != y).count();
    println!(
        "node b without the reports: {moved} of {} flows moved",
        want.len()
    );
    assert_eq!(
        moved,
        want.len(),
        "every flow moves to its slot's previous backend"
    );
    b.dataplane_mut().clear_flows();
    for r in &reports {
        let backend = SocketAddr::new(words_addr(&r.backend_addr), r.backend_port);
        assert_eq!(
            b.insert_replicated_pin(&r.key, backend).unwrap(),
            PinOutcome::Inserted
        );
    }
    assert_eq!(send(b.dataplane(), &subset, TCP_ACK), want);

    // Node c joined later: it built the table after one more change
    // (8007 added) from scratch, so all its slots are clean, and a clean
    // slot's packets never read the flow table. A replicated pin naming
    // another backend than its slot's makes that slot changed there.
    let (mut c, _) = loaded(false);
    c.apply(&[with_backend(&svc, 8007)]).unwrap();
    let fresh = send(c.dataplane(), &subset, TCP_ACK);
    let moved = fresh.iter().zip(&want).filter(|(x, y)| x != y).count();
    println!(
        "node c (fresh table, one change later) without the pins: {moved} of {} flows moved",
        want.len()
    );
    assert!(moved > 0, "some slots moved to 8007");
    c.dataplane_mut().clear_flows();
    for r in &reports {
        let backend = SocketAddr::new(words_addr(&r.backend_addr), r.backend_port);
        assert_eq!(
            c.insert_replicated_pin(&r.key, backend).unwrap(),
            PinOutcome::Inserted
        );
    }
    assert_eq!(send(c.dataplane(), &subset, TCP_ACK), want);

    // Refused: a backend this node does not have, and one that is down here.
    let r = reports.iter().find(|r| r.backend_port == 8006).unwrap();
    let unknown: SocketAddr = "127.0.0.1:8999".parse().unwrap();
    assert_eq!(
        b.insert_replicated_pin(&r.key, unknown).unwrap(),
        PinOutcome::Refused(PinRefusal::UnknownBackend)
    );
    reversed.backends.last_mut().unwrap().healthy = false;
    b.apply(&[other, reversed]).unwrap();
    assert_eq!(
        b.insert_replicated_pin(&r.key, "127.0.0.1:8006".parse().unwrap())
            .unwrap(),
        PinOutcome::Refused(PinRefusal::NotLive)
    );
}

/// A full ring drops reports and counts each; the flows are still pinned
/// and forwarded.
#[test]
fn a_full_ring_drops_and_counts_reports() {
    let mut svc = five_backends();
    let (mut w, mut ring) = loaded(true);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    for port in 8006..8016 {
        svc = with_backend(&svc, port);
        w.apply(std::slice::from_ref(&svc)).unwrap();
    }
    let flows = client_flows(20000);
    send(w.dataplane(), &flows, TCP_SYN);
    let pinned = w.dataplane().flow_count() as u64;
    let counts = ring.counts().unwrap();
    let (reported, full) = (
        counts[PinReportStat::Reported as usize],
        counts[PinReportStat::RingFull as usize],
    );
    println!("{pinned} pins: {reported} reported, {full} dropped on a full ring");
    assert!(full > 0, "the ring filled");
    assert_eq!(reported + full, pinned);
    assert_eq!(drain(&mut ring).len() as u64, reported);
}

/// Loaded without `pin_report` (no `[cluster] pin_sync`), the program
/// reports nothing.
#[test]
fn nothing_is_reported_when_sharing_is_off() {
    let svc = five_backends();
    let (mut w, mut ring) = loaded(false);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let svc = with_backend(&svc, 8006);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    send(w.dataplane(), &client_flows(2000), TCP_SYN);
    assert!(w.dataplane().flow_count() > 100);
    assert_eq!(drain(&mut ring).len(), 0);
    assert_eq!(ring.counts().unwrap(), [0, 0]);
}
