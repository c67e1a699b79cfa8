//! Data-plane cost per packet through `BPF_PROG_TEST_RUN` on the real
//! object, next to the baseline program (parse, swap MACs, `XDP_TX`)
//! measured in the same run on the same frame sizes.
//!
//! With `repeat`, the kernel runs the program again on the buffer the last
//! run left. The bench's services are built so that buffer is the input
//! again: the backends listen on the service port itself (127.0.x.y:443,
//! local mode), so the rewrite writes the bytes that were there and every
//! run takes the full forwarding path, checksum updates included. That is
//! checked, not assumed: a run before and after each measurement must give
//! the input back with the expected action, and across the measured runs the
//! service's packet counter, its new-flow counter, the action counter and
//! the drop-reason counters must advance by exactly the number of runs.
//!
//! A packet that must insert into the flow table cannot be repeated (the
//! second run finds the entry the first made), so that case runs once per
//! distinct frame (`repeat` = 1) and the fixed cost of such a call, measured
//! on the baseline program the same way, is subtracted.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicBool, Ordering},
};

use crate::{
    Scale,
    report::{Report, Table, num, ratio},
    results::{
        Case, CaseDetail, FigureId, FlowTable, Method, PerPacketId, PerPacketRow, QuicCase, Slot,
        Traffic,
    },
    sys,
};
use aya::{Ebpf, TestRun, TestRunOptions, programs::Xdp};
use lb_common::{NextHopVia, Reason};
use lb_tests::{
    netns::{self, Topology, run_in},
    packet::{Spec, TCP_ACK, TCP_SYN},
};
use lb_userspace::{
    dataplane::{
        BackendSpec, Dataplane, Forwarding, MapWriter, Options, Protocol, ServiceSpec, addr_words,
    },
    nexthop::Resolver,
};

const XDP_PASS: u32 = 2;
const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    pub fn name(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4",
            Fam::V6 => "ipv6",
        }
    }

    /// The bench service of the family (`services`).
    fn service(self) -> &'static str {
        match self {
            Fam::V4 => "bench",
            Fam::V6 => "bench6",
        }
    }
    fn addrs(self) -> (&'static str, &'static str) {
        match self {
            Fam::V4 => ("10.9.0.2", "10.9.0.1"),
            Fam::V6 => ("fd00::2", "fd00::1"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// TCP SYN: a new flow.
    Syn,
    /// TCP ACK with data: a packet of an established flow.
    Est,
    Udp,
    /// TCP to a port with no service: passed untouched.
    Other,
    /// ICMP "fragmentation needed" (IPv6: "packet too big") quoting a TCP
    /// reply of a service's flow: handed to the flow's backend.
    Icmp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Syn => "tcp_syn",
            Kind::Est => "tcp_established",
            Kind::Udp => "udp",
            Kind::Other => "non_service",
            Kind::Icmp => "icmp_frag_needed",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Kind::Syn => "tcp syn (new flow)",
            Kind::Est => "tcp established",
            Kind::Udp => "udp",
            Kind::Other => "non-service tcp (port 80)",
            Kind::Icmp => "icmp frag needed / packet too big",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Size {
    /// 64 bytes, or the smallest frame that holds the headers.
    Small,
    /// A full 1500-byte IP packet (1514-byte frame).
    Mtu,
}

/// Builds a frame of `kind` with the given source port.
pub fn frame(fam: Fam, kind: Kind, size: Size, sport: u16) -> Vec<u8> {
    if kind == Kind::Icmp {
        return icmp_frame(fam, size, sport);
    }
    let (src, dst) = fam.addrs();
    spec(fam, kind, size, (src, sport), dst).build()
}

/// The packet of `kind` from `src` (address, port) to port 443 of `dst`
/// (port 80 for `Other`), padded to a frame of `size`.
fn spec(fam: Fam, kind: Kind, size: Size, (src, sport): (&str, u16), dst: &str) -> Spec {
    let l3 = if fam == Fam::V4 { 20 } else { 40 };
    let l4 = if kind == Kind::Udp { 8 } else { 20 };
    let target: usize = match size {
        Size::Small => 64,
        Size::Mtu => 1514,
    };
    let pad = vec![0u8; target.saturating_sub(14 + l3 + l4)];
    match kind {
        Kind::Syn => Spec::tcp(src, dst, sport, 443, TCP_SYN),
        Kind::Est => Spec::tcp(src, dst, sport, 443, TCP_ACK),
        Kind::Udp => Spec::udp(src, dst, sport, 443),
        Kind::Other => Spec::tcp(src, dst, sport, 80, TCP_ACK),
        Kind::Icmp => unreachable!("built by icmp_frame"),
    }
    .payload(&pad)
}

/// A router's error about a full-size reply of the flow from port `sport`:
/// "fragmentation needed" (IPv4) or "packet too big" (IPv6). `Small` quotes
/// the IP header and 8 bytes of TCP (RFC 792's minimum), `Mtu` as much as
/// Linux routers quote (a 576-byte IPv4 / 1280-byte IPv6 error).
fn icmp_frame(fam: Fam, size: Size, sport: u16) -> Vec<u8> {
    let (client, service) = fam.addrs();
    let reply = Spec::tcp(service, client, 443, sport, TCP_ACK).payload(&[0; 1400]);
    let (router, kind, quote) = match (fam, size) {
        (Fam::V4, Size::Small) => ("10.9.5.1", (3, 4, 1300), 20 + 8),
        (Fam::V4, Size::Mtu) => ("10.9.5.1", (3, 4, 1300), 576 - 20 - 8),
        (Fam::V6, Size::Small) => ("fd00:5::1", (2, 0, 1300), 40 + 8),
        (Fam::V6, Size::Mtu) => ("fd00:5::1", (2, 0, 1300), 1280 - 40 - 8),
    };
    Spec::icmp_error(router, service, kind, &reply, quote).build()
}

/// The bench services: `n` backends, all on port 443 of distinct loopback
/// addresses (local mode rewrites only the port, so the frame comes out as
/// it went in), on `0.0.0.0:443` for IPv4 and `[::]:443` for IPv6 (a
/// wildcard serves one family).
fn services(n: usize) -> [ServiceSpec; 2] {
    let v4 = service(n);
    let v6 = ServiceSpec {
        name: Fam::V6.service().into(),
        listen: "[::]:443".parse().unwrap(),
        ..v4.clone()
    };
    [v4, v6]
}

fn service(n: usize) -> ServiceSpec {
    let addrs: Vec<String> = (0..n)
        .map(|i| format!("127.0.{}.{}:443", i / 250, i % 250 + 1))
        .collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    lb_tests::fixtures::service(Fam::V4.service(), "0.0.0.0:443", &addrs)
}

fn writer(n: usize, flow_table: u32) -> MapWriter {
    writer_reporting(n, flow_table, false)
}

/// [`writer`], the program loaded with or without pin reports.
fn writer_reporting(n: usize, flow_table: u32, pin_report: bool) -> MapWriter {
    writer_with(n, flow_table, pin_report, None)
}

/// [`writer_reporting`], with a flow hash (`None`: as a new data plane).
fn writer_with(
    n: usize,
    flow_table: u32,
    pin_report: bool,
    flow_hash: Option<lb_common::FlowHash>,
) -> MapWriter {
    let dp = Dataplane::load(Options {
        max_services: 2,
        flow_table_size: flow_table,
        // The bench fills the table through the program as fast as it can.
        flow_insert_rate: 0,
        pin_report,
        flow_hash,
        ..Options::default()
    })
    .expect("load the data plane");
    let mut w = MapWriter::new(dp);
    w.apply(&services(n)).expect("install the bench services");
    w
}

/// The per-packet cost of reporting a new pin (cluster pin sharing): a
/// sticky-slot SYN on two fresh programs with the same tables, one loaded
/// with `pin_report` and one without, each frame sent to both in turn
/// (repeat=1, the call's fixed cost subtracted). The ring is drained
/// between batches, outside the timing, so no report is dropped.
fn pin_report_pair(
    syn_template: &[u8],
    base_small: f64,
    overhead: f64,
    scale: &Scale,
    rows: &mut Vec<Row>,
) {
    let mut off = writer_reporting(3, scale.flow_table, false);
    let mut on = writer_reporting(3, scale.flow_table, true);
    off.apply(&services(4)).unwrap();
    on.apply(&services(4)).unwrap();
    let mut ring = on.dataplane_mut().take_pin_ring().expect("the pin ring");
    let frames: Vec<Vec<u8>> = flows(&off, 64, true, 6)
        .take(scale.insert_samples)
        .map(|(s, p)| v4_frame(syn_template, s, p))
        .collect();
    let (before_off, before_on) = (counts(&off), counts(&on));
    let mut samples_off = Vec::with_capacity(frames.len());
    let mut samples_on = Vec::with_capacity(frames.len());
    let mut reports = Vec::new();
    for batch in frames.chunks(2000) {
        for f in batch {
            samples_off.push(off.dataplane().bench_xdp(f, 1).unwrap().as_nanos() as f64);
            samples_on.push(on.dataplane().bench_xdp(f, 1).unwrap().as_nanos() as f64);
        }
        while ring.drain(&mut reports, 4096) > 0 {}
    }
    let n = frames.len() as u64;
    let e = Expect::of(Kind::Syn, true);
    prove(
        &before_off,
        &counts(&off),
        n,
        e,
        "sticky SYN insert, report off",
    );
    prove(
        &before_on,
        &counts(&on),
        n,
        e,
        "sticky SYN insert, report on",
    );
    let c = ring.counts().unwrap();
    assert_eq!(
        (
            reports.len() as u64,
            c[lb_common::PinReportStat::RingFull as usize]
        ),
        (n, 0),
        "every insert reported, none dropped"
    );
    for (slot, samples, what) in [
        (Slot::StickyInsertReportOff, &samples_off, "off"),
        (Slot::StickyInsertReportOn, &samples_on, "on"),
    ] {
        rows.push(Row {
            case: Case::new(
                Fam::V4,
                Traffic::Kind(Kind::Syn),
                syn_template.len(),
                4,
                slot,
            ),
            label: format!(
                "ipv4 tcp syn (new flow), sticky slot, inserts a flow, pin report {what}"
            ),
            ns: sys::median(samples) - overhead,
            baseline_ns: base_small,
            x_baseline: None,
            method: Method::Once,
            runs: n,
        });
    }
}

/// Makes `w` what a fresh load with `n` backends would be, without the
/// verifier's second or so per load: the services go and come back (fresh
/// ids and generations, every slot clean) and the flow table is emptied.
/// Counters are not reset; every case proves itself on their deltas.
fn reset(w: &mut MapWriter, n: usize) {
    w.apply(&[]).expect("remove the bench services");
    w.dataplane_mut().clear_flows();
    w.apply(&services(n)).expect("install the bench services");
}

/// What every measured run of a case must do.
#[derive(Clone, Copy)]
struct Expect {
    service: bool,
    new_flow: bool,
    action: u32,
    reason: Option<Reason>,
}

impl Expect {
    fn of(kind: Kind, new_flow: bool) -> Self {
        Expect {
            service: kind != Kind::Other,
            new_flow,
            action: XDP_PASS,
            reason: (kind == Kind::Other).then_some(Reason::NoService),
        }
    }
}

/// The data plane's counters at one moment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Counts {
    packets: u64,
    new_flows: u64,
    actions: [u64; 5],
    reasons: [u64; 16],
}

fn counts(w: &MapWriter) -> Counts {
    // IPv4 frames count on `bench`, IPv6 ones on `bench6` (absent in the
    // nat/dsr run).
    counts_of(w, &["bench", "bench6"])
}

/// The counters, with the service packets and new flows of the services
/// named `services` summed.
fn counts_of(w: &MapWriter, services: &[&str]) -> Counts {
    let dp = w.dataplane();
    let mut c = lb_common::Counters::default();
    for &name in services {
        if let Some(id) = w.service_id(name) {
            c.add(&dp.service_counters(id).unwrap());
        }
    }
    let mut reasons = [0u64; 16];
    for (i, r) in dp.reason_counts().unwrap().iter().enumerate() {
        reasons[i] = *r;
    }
    Counts {
        packets: c.packets,
        new_flows: c.new_flows,
        actions: dp.action_counts().unwrap(),
        reasons,
    }
}

/// Panics unless `runs` runs did exactly what `e` says.
fn prove(before: &Counts, after: &Counts, runs: u64, e: Expect, what: &str) {
    let per = |b: bool| if b { runs } else { 0 };
    assert_eq!(
        after.packets - before.packets,
        per(e.service),
        "{what}: service packets must advance by the runs"
    );
    assert_eq!(
        after.new_flows - before.new_flows,
        per(e.new_flow),
        "{what}: new flows must advance by the runs that open one"
    );
    for a in 0..5 {
        let want = if a as u32 == e.action { runs } else { 0 };
        assert_eq!(
            after.actions[a] - before.actions[a],
            want,
            "{what}: action {a} count"
        );
    }
    for r in 0..16 {
        let want = if e.reason.map(|x| x as usize) == Some(r) {
            runs
        } else {
            0
        };
        assert_eq!(
            after.reasons[r] - before.reasons[r],
            want,
            "{what}: drop reason {r} count"
        );
    }
}

/// One run outside the measurement: the frame must come back unchanged
/// with the expected action.
fn check_output(w: &MapWriter, frame: &[u8], e: Expect, what: &str) {
    check_output_is(w, frame, e, frame, what);
}

fn check_output_is(w: &MapWriter, frame: &[u8], e: Expect, want: &[u8], what: &str) {
    let (action, out) = w.dataplane().test_run_xdp(frame).unwrap();
    assert_eq!(action, e.action, "{what}: action");
    assert_eq!(out, want, "{what}: output frame");
}

pub struct Bench {
    repeat: u32,
    rounds: usize,
    baseline: Ebpf,
}

/// A measured case.
pub struct Row {
    pub case: Case,
    pub label: String,
    pub ns: f64,
    pub baseline_ns: f64,
    /// The median of the per-round ratios of a row measured against its
    /// own baseline ([`Measured`]); else `ns / baseline_ns`.
    pub x_baseline: Option<f64>,
    pub method: Method,
    pub runs: u64,
}

impl Row {
    /// A row measured by the repeat method against its own baseline.
    fn repeated(case: Case, label: String, m: Measured) -> Self {
        Row {
            case,
            label,
            ns: m.ns,
            baseline_ns: m.baseline_ns,
            x_baseline: Some(m.x_baseline),
            method: Method::Repeat,
            runs: m.runs,
        }
    }
}

impl Bench {
    fn new(repeat: u32, rounds: usize) -> Self {
        let mut baseline = Ebpf::load(crate::objects::BASELINE_OBJECT).expect("baseline object");
        let prog: &mut Xdp = baseline
            .program_mut("baseline")
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("baseline loads");
        let sink: &mut Xdp = baseline.program_mut("sink").unwrap().try_into().unwrap();
        sink.load().expect("sink loads");
        Bench {
            repeat,
            rounds,
            baseline,
        }
    }

    fn baseline_prog(&self) -> &Xdp {
        self.baseline
            .program("baseline")
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// One call of the baseline with `repeat` runs: mean ns per run. The
    /// output is checked: MACs swapped an odd number of times, or not.
    fn baseline_once(&self, frame: &[u8], repeat: u32) -> f64 {
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .baseline_prog()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .expect("baseline test run");
        assert_eq!(r.return_value, XDP_TX, "baseline must transmit");
        out.truncate(r.data_size_out as usize);
        let mut want = frame.to_vec();
        if repeat % 2 == 1 {
            want[0..6].copy_from_slice(&frame[6..12]);
            want[6..12].copy_from_slice(&frame[0..6]);
        }
        assert_eq!(out, want, "baseline output");
        r.duration.as_nanos() as f64
    }

    fn baseline(&self, frame: &[u8]) -> f64 {
        let v: Vec<f64> = (0..self.rounds)
            .map(|_| self.baseline_once(frame, self.repeat))
            .collect();
        sys::median(&v)
    }

    /// The test-run harness alone, per run: the `sink` program, which
    /// returns `XDP_DROP` without reading the frame. Every row pays it.
    fn harness(&self, frame: &[u8]) -> f64 {
        let sink: &Xdp = self.baseline.program("sink").unwrap().try_into().unwrap();
        let v: Vec<f64> = (0..self.rounds)
            .map(|_| {
                let r = sink
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat: self.repeat,
                        ..Default::default()
                    })
                    .expect("sink test run");
                assert_eq!(r.return_value, XDP_DROP, "the sink drops");
                r.duration.as_nanos() as f64
            })
            .collect();
        sys::median(&v)
    }

    /// Median over rounds of the mean ns per run, every round proven.
    fn lb(&self, w: &MapWriter, frame: &[u8], e: Expect, what: &str) -> Measured {
        self.lb_cycle(w, &[frame], e, what, &["bench", "bench6"])
    }

    /// [`Bench::lb`] for frames that go round a cycle: a run on each frame
    /// of `cycle` gives the next one, and a run on the last gives the first
    /// again, so the repeated runs on one buffer go round it (`repeat` is a
    /// multiple of its length). Every service that forwards one of them is
    /// named in `services`, whose counters together must advance by the
    /// runs.
    fn lb_cycle(
        &self,
        w: &MapWriter,
        cycle: &[&[u8]],
        e: Expect,
        what: &str,
        services: &[&str],
    ) -> Measured {
        self.lb_against(w, cycle, &floor_frame(cycle[0]), e, what, services)
    }

    /// [`Bench::lb_cycle`], each round after a round of the baseline
    /// program on `floor`: the row and its baseline see the machine in the
    /// same state, so their ratio holds when the machine slows down or
    /// speeds up between rows (it moves between levels here, for seconds
    /// at a time, whatever runs).
    fn lb_against(
        &self,
        w: &MapWriter,
        cycle: &[&[u8]],
        floor: &[u8],
        e: Expect,
        what: &str,
        services: &[&str],
    ) -> Measured {
        assert_eq!(
            self.repeat as usize % cycle.len(),
            0,
            "{what}: the runs must go round the cycle"
        );
        let check = || {
            for (i, f) in cycle.iter().enumerate() {
                check_output_is(w, f, e, cycle[(i + 1) % cycle.len()], what);
            }
        };
        check();
        let dp = w.dataplane();
        let mut samples = Vec::new();
        let mut floor_samples = Vec::new();
        let mut ratios = Vec::new();
        for _ in 0..self.rounds {
            let floor_ns = self.baseline_once(floor, self.repeat);
            let before = counts_of(w, services);
            let d = dp.bench_xdp(cycle[0], self.repeat).unwrap();
            let after = counts_of(w, services);
            prove(&before, &after, self.repeat as u64, e, what);
            let ns = d.as_nanos() as f64;
            samples.push(ns);
            floor_samples.push(floor_ns);
            ratios.push(ns / floor_ns);
        }
        check();
        Measured {
            ns: sys::median(&samples),
            baseline_ns: sys::median(&floor_samples),
            x_baseline: sys::median(&ratios),
            runs: self.repeat as u64 * self.rounds as u64,
        }
    }
}

/// A repeated row: its ns per run and its baseline's, measured in
/// alternating rounds (median of each), and the median of the rounds'
/// ratios (each round over the baseline round just before it).
#[derive(Clone, Copy)]
struct Measured {
    ns: f64,
    baseline_ns: f64,
    x_baseline: f64,
    /// Runs measured, all rounds.
    runs: u64,
}

/// The baseline's frame for a row's frame: the standard frame of its family
/// and size.
fn floor_frame(f: &[u8]) -> Vec<u8> {
    let p = lb_tests::packet::parse(f).expect("a bench frame parses");
    let fam = if p.dst.is_ipv6() { Fam::V6 } else { Fam::V4 };
    let size = if f.len() >= 1000 {
        Size::Mtu
    } else {
        Size::Small
    };
    frame(fam, Kind::Syn, size, 40000)
}

/// Rows of flows pinned in sticky slots: established, SYN (a new connection
/// on the pinned 4-tuple) and UDP, from the TCP flow `flows[0]` and the
/// UDP flow `flows[1]`.
fn pinned_rows(
    b: &Bench,
    w: &MapWriter,
    fam: Fam,
    flows: [(IpAddr, u16); 2],
    table: FlowTable,
    rows: &mut Vec<Row>,
) {
    for kind in [Kind::Est, Kind::Syn, Kind::Udp] {
        let (src, port) = flows[usize::from(kind == Kind::Udp)];
        let f = spec_frame(fam, kind, src, port);
        // The first run pins the flow (UDP has its own key). A SYN
        // counts as a new flow each time, pinned or not.
        w.dataplane().test_run_xdp(&f).unwrap();
        let label = format!("{} {}, sticky slot, pinned flow", fam.name(), kind.label());
        let measured = b.lb(w, &f, Expect::of(kind, kind == Kind::Syn), &label);
        rows.push(Row::repeated(
            Case::new(fam, Traffic::Kind(kind), f.len(), 4, Slot::StickyPinned).table(table),
            label,
            measured,
        ));
    }
}

/// 100 backend changes (a backend leaves or joins, weights change), then the
/// sweep the daemon runs once the changes are older than misses look back:
/// with no pin needing a previous backend every slot is clean again, and
/// packets cost what they cost before the changes.
fn steady_state(
    b: &Bench,
    w: &mut MapWriter,
    base_small: f64,
    overhead: f64,
    samples: usize,
    rows: &mut Vec<Row>,
) {
    reset(w, 10);
    let mut svc = service(10);
    // Established packets of many flows over the whole table, one run per
    // frame (a slot's cache line is cold more often than in a repeat).
    let template = frame(Fam::V4, Kind::Est, Size::Small, 1);
    let spread: Vec<Vec<u8>> = (0..samples)
        .map(|i| {
            let src = Ipv4Addr::new(10, 80 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            v4_frame(&template, src, 1024 + (i % 60_000) as u16)
        })
        .collect();
    let measure_spread = |w: &MapWriter, phase: &str, slot: Slot| {
        let e = Expect::of(Kind::Est, false);
        for f in spread.iter().take(16) {
            check_output(w, f, e, phase);
        }
        let before = counts(w);
        let ns: Vec<f64> = spread
            .iter()
            .map(|f| w.dataplane().bench_xdp(f, 1).unwrap().as_nanos() as f64)
            .collect();
        prove(&before, &counts(w), spread.len() as u64, e, phase);
        let label = format!("ipv4 tcp established, {samples} flows over all slots, {phase}");
        Row {
            case: Case::new(Fam::V4, Traffic::Kind(Kind::Est), template.len(), 10, slot),
            label,
            ns: sys::median(&ns) - overhead,
            baseline_ns: base_small,
            x_baseline: None,
            method: Method::Once,
            runs: spread.len() as u64,
        }
    };
    rows.push(measure_spread(w, "table never changed", Slot::CleanSpread));
    for i in 0..100usize {
        match i % 3 {
            0 => {
                svc.backends.pop();
            }
            1 => {
                let n = svc.backends.len() + i;
                let addr = format!("127.1.{}.{}:443", n / 250, n % 250 + 1);
                svc.backends
                    .push(BackendSpec::new(addr.parse().unwrap(), 100));
            }
            _ => {
                let k = i % svc.backends.len();
                svc.backends[k].weight = 50 + (i as u16 % 7) * 25;
            }
        }
        w.apply(std::slice::from_ref(&svc)).unwrap();
    }
    let id = w.service_id("bench").unwrap();
    let sticky = |w: &MapWriter| {
        let (_, t) = w.dataplane().active_table(id).unwrap();
        t.iter().filter(|s| s.is_sticky()).count()
    };
    let before = sticky(w);
    // A flow in a slot the changes made sticky, measured before the sweep
    // (pinned) and after it (clean).
    let (src, port) = flows(w, 70, true, 6).next().unwrap();
    let mut measure = |w: &MapWriter, phase: &str, slot: Slot| {
        for kind in [Kind::Est, Kind::Syn] {
            let f = v4_spec_frame(kind, src, port);
            w.dataplane().test_run_xdp(&f).unwrap();
            let label = format!("ipv4 {}, after 100 changes, {phase}", kind.label());
            let measured = b.lb(w, &f, Expect::of(kind, kind == Kind::Syn), &label);
            rows.push(Row::repeated(
                Case::new(Fam::V4, Traffic::Kind(kind), f.len(), 10, slot),
                label,
                measured,
            ));
        }
    };
    measure(w, "sticky slot, pinned", Slot::AfterChangesPinned);
    let counter = w.dataplane().flow_counter().unwrap();
    // The connections that needed a previous backend have ended and their
    // pins aged out: the sweep cleans every slot.
    w.dataplane_mut().clear_flows();
    let later = lb_userspace::dataplane::monotonic_secs() + lb_common::STICKY_MISS_SECS + 1;
    let plan = w.sweep_plan(later);
    let found = counter.walk(&plan);
    let report = w.finish_sweep(&plan, &found).unwrap();
    let after = sticky(w);
    println!(
        "after 100 changes: {before} sticky slots of {}; the sweep made {} clean, {after} left",
        lb_common::DEFAULT_MAGLEV_SIZE,
        report.slots_cleaned
    );
    assert_eq!(after, 0, "every slot is clean once no pin needs it");
    measure(w, "swept (clean)", Slot::AfterChangesSwept);
    rows.push(measure_spread(
        w,
        "after 100 changes, swept",
        Slot::AfterChangesSweptSpread,
    ));
}

/// A flow's Maglev slot in its family's service's active table, to the
/// family's service address: its backend and previous backend.
fn slot_of(
    hash: lb_common::FlowHash,
    table: &[lb_common::MaglevSlot],
    fam: Fam,
    src: IpAddr,
    sport: u16,
    proto: u8,
) -> (u32, u32) {
    let h = hash.hash(
        &addr_words(src),
        &addr_words(fam.addrs().1.parse().unwrap()),
        sport.to_be(),
        443u16.to_be(),
        proto,
    );
    let s = table[lb_common::maglev_slot(h, table.len() as u32) as usize];
    (s.backend, s.prev)
}

/// Distinct v4 flows of IP protocol `proto` (source address, source port)
/// from `first_net` (10.first_net.0.0 and up) whose slot is sticky
/// (`sticky`) or clean.
fn flows(
    w: &MapWriter,
    first_net: u8,
    sticky: bool,
    proto: u8,
) -> impl Iterator<Item = (Ipv4Addr, u16)> + '_ {
    flows_of(w, Fam::V4, first_net, sticky, proto).map(|(src, p)| match src {
        IpAddr::V4(src) => (src, p),
        IpAddr::V6(_) => unreachable!("v4 flows"),
    })
}

/// [`flows`] of either family: IPv6 sources are `fd00:first_net::host`.
fn flows_of(
    w: &MapWriter,
    fam: Fam,
    first_net: u8,
    sticky: bool,
    proto: u8,
) -> impl Iterator<Item = (IpAddr, u16)> + '_ {
    let id = w.service_id(fam.service()).unwrap();
    let (_, table) = w.dataplane().active_table(id).unwrap();
    (0u32..)
        .flat_map(move |host| {
            let src = match fam {
                Fam::V4 => IpAddr::V4(Ipv4Addr::new(
                    10,
                    first_net.wrapping_add((host >> 16) as u8),
                    (host >> 8) as u8,
                    host as u8,
                )),
                Fam::V6 => IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    u16::from(first_net),
                    0,
                    0,
                    0,
                    0,
                    (host >> 16) as u16,
                    host as u16,
                )),
            };
            (1024u16..=65535).step_by(7).map(move |p| (src, p))
        })
        .filter(move |(src, p)| {
            let (b, prev) = slot_of(w.dataplane().flow_hash(), table, fam, *src, *p, proto);
            (b != prev) == sticky
        })
}

/// A frame of a v4 flow with the given source; checksums are left as the
/// template had them (the data plane updates them, it does not verify them).
fn v4_frame(template: &[u8], src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut f = template.to_vec();
    f[26..30].copy_from_slice(&src.octets());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f
}

/// The first fragment (offset 0, more fragments) and a later one (offset
/// 64 bytes, no ports) of one UDP datagram to the service, 64-byte frames
/// (or the smallest that hold the headers). `dst` defaults to the family's
/// service address.
fn fragment_frames(fam: Fam, dst: Option<&str>, macs: Option<([u8; 6], [u8; 6])>) -> [Vec<u8>; 2] {
    let (src, vip) = fam.addrs();
    let l3 = if fam == Fam::V4 { 20 } else { 48 };
    let pad = vec![0u8; 64usize.saturating_sub(14 + l3 + 8)];
    let mut first = Spec::udp(src, dst.unwrap_or(vip), 40000, 443).payload(&pad);
    first.fragment = Some((0, true));
    first.frag_id = Some(0x4242);
    first.macs = macs;
    let mut later = first.clone();
    later.fragment = Some((8, false));
    [first.build(), later.build()]
}

fn v4_spec_frame(kind: Kind, src: Ipv4Addr, sport: u16) -> Vec<u8> {
    spec_frame(Fam::V4, kind, IpAddr::V4(src), sport)
}

/// A 64-byte (IPv4) or 74-byte (IPv6) frame of `kind` from `src`, `sport`
/// to the family's service address.
fn spec_frame(fam: Fam, kind: Kind, src: IpAddr, sport: u16) -> Vec<u8> {
    spec(
        fam,
        kind,
        Size::Small,
        (&src.to_string(), sport),
        fam.addrs().1,
    )
    .build()
}

pub fn run(scale: &Scale, report: &mut Report) {
    sys::pin_to_cpu(sys::nproc() - 1);
    let b = Bench::new(scale.repeat, scale.rounds);
    let mut rows: Vec<Row> = Vec::new();
    let mut baselines = Vec::new();
    let base_ns = |fam: Fam, size: Size, b: &Bench| b.baseline(&frame(fam, Kind::Syn, size, 40000));
    for fam in [Fam::V4, Fam::V6] {
        for size in [Size::Small, Size::Mtu] {
            let f = frame(fam, Kind::Syn, size, 40000);
            baselines.push((fam, size, f.len(), base_ns(fam, size, &b)));
        }
    }
    let harness_ns = b.harness(&frame(Fam::V4, Kind::Syn, Size::Small, 40000));
    let baseline_of = |fam: Fam, size: Size| {
        baselines
            .iter()
            .find(|(f, s, _, _)| *f == fam && *s == size)
            .unwrap()
            .3
    };

    // Traffic kinds, families and sizes, 3 backends, clean slots.
    let mut w = writer(3, scale.flow_table);
    for (name, xlated, verified) in w.dataplane().program_sizes() {
        println!(
            "program {name}: {xlated} instructions after the verifier's rewrites, {verified} verified"
        );
    }
    for fam in [Fam::V4, Fam::V6] {
        for size in [Size::Small, Size::Mtu] {
            for kind in [Kind::Syn, Kind::Est, Kind::Udp, Kind::Other, Kind::Icmp] {
                let f = frame(fam, kind, size, 40000);
                let e = Expect::of(kind, kind == Kind::Syn);
                let label = format!("{} {}", fam.name(), kind.label());
                // An ICMP error is not the size of the other frames: the
                // baseline runs on the same frame.
                let floor = if kind == Kind::Icmp {
                    f.clone()
                } else {
                    floor_frame(&f)
                };
                let measured = b.lb_against(&w, &[&f], &floor, e, &label, &["bench", "bench6"]);
                rows.push(Row::repeated(
                    Case::new(fam, Traffic::Kind(kind), f.len(), 3, Slot::Clean),
                    label,
                    measured,
                ));
            }
        }
    }
    // The same clean-slot packets hashed by murmur3, the hash of data
    // planes that started before the fast one.
    {
        let m = writer_with(
            3,
            scale.flow_table,
            false,
            Some(lb_common::FlowHash::Murmur3),
        );
        for (fam, kind) in [
            (Fam::V4, Kind::Syn),
            (Fam::V4, Kind::Est),
            (Fam::V4, Kind::Udp),
            (Fam::V6, Kind::Est),
        ] {
            let f = frame(fam, kind, Size::Small, 40000);
            let label = format!("{} {}, murmur3 flow hash", fam.name(), kind.label());
            let measured = b.lb(&m, &f, Expect::of(kind, kind == Kind::Syn), &label);
            rows.push(Row::repeated(
                Case::new(fam, Traffic::Kind(kind), f.len(), 3, Slot::CleanMurmur3),
                label,
                measured,
            ));
        }
    }
    quic_rows(&b, &mut w, &mut rows);
    // Fragments of a UDP datagram: the first records its pick in LB_FRAGS
    // (an LRU update on every run), a later one finds it there (an LRU
    // lookup) and goes where the first went. Both come out as they went in
    // (local mode, port-only backends), so both repeat.
    for fam in [Fam::V4, Fam::V6] {
        let [first, later] = fragment_frames(fam, None, None);
        let e = Expect::of(Kind::Udp, false);
        for (what, traffic, f) in [
            ("udp first fragment", Traffic::UdpFirstFragment, &first),
            ("udp later fragment", Traffic::UdpLaterFragment, &later),
        ] {
            let label = format!("{} {what}", fam.name());
            let measured = b.lb(&w, f, e, &label);
            rows.push(Row::repeated(
                Case::new(fam, traffic, f.len(), 3, Slot::Clean),
                label,
                measured,
            ));
        }
    }

    // Service size.
    for n in [100usize, 1000] {
        reset(&mut w, n);
        for kind in [Kind::Syn, Kind::Est] {
            let f = frame(Fam::V4, kind, Size::Small, 40000);
            let label = format!("ipv4 {}", kind.label());
            let measured = b.lb(&w, &f, Expect::of(kind, kind == Kind::Syn), &label);
            rows.push(Row::repeated(
                Case::new(Fam::V4, Traffic::Kind(kind), f.len(), n, Slot::Clean),
                label,
                measured,
            ));
        }
    }

    // The flow table: a fourth backend joins, so about a quarter of the
    // slots change and become sticky. Clean and sticky slots, with the
    // table nearly empty and nearly full.
    reset(&mut w, 3);
    w.apply(&services(4)).unwrap();
    let base_small = baseline_of(Fam::V4, Size::Small);
    // Fixed cost of a repeat=1 call, for the insert case.
    let syn_template = frame(Fam::V4, Kind::Syn, Size::Small, 40000);
    let b1: Vec<f64> = (0..scale.insert_samples)
        .map(|_| b.baseline_once(&syn_template, 1))
        .collect();
    let overhead = sys::median(&b1) - base_small;
    let mut notes = vec![format!(
        "fixed cost of one repeat=1 call (baseline at repeat=1 minus baseline at repeat={}): {} ns",
        scale.repeat,
        num(overhead)
    )];
    let mut sticky_iter = flows(&w, 64, true, 6);
    let mut sticky_udp = flows(&w, 32, true, 17);
    let mut clean_iter = flows(&w, 64, false, 6);
    let (clean_src, clean_port) = clean_iter.next().unwrap();
    // IPv6 flows are pinned in a table of their own (`LB_FLOWS`, 40-byte
    // keys), which the fill below leaves empty.
    let pinned6 = [6, 17].map(|proto| flows_of(&w, Fam::V6, 64, true, proto).next().unwrap());
    pinned_rows(&b, &w, Fam::V6, pinned6, FlowTable::Empty, &mut rows);
    for (fill, table) in [(0.0, FlowTable::Empty), (scale.fill, FlowTable::NearlyFull)] {
        let mut filled = 0usize;
        if fill > 0.0 {
            let target = (scale.flow_table as f64 * fill) as usize;
            let before = counts(&w);
            let t0 = std::time::Instant::now();
            let template = frame(Fam::V4, Kind::Syn, Size::Small, 1);
            for (src, port) in sticky_iter.by_ref().take(target) {
                w.dataplane()
                    .bench_xdp(&v4_frame(&template, src, port), 1)
                    .unwrap();
            }
            let after = counts(&w);
            filled = (after.new_flows - before.new_flows) as usize;
            assert_eq!(filled, target, "every fill packet opened a flow");
            let t_walk = std::time::Instant::now();
            let entries = w.dataplane().flow_count();
            let walk_ms = t_walk.elapsed().as_secs_f64() * 1e3;
            let mut counted = 0;
            let reads: Vec<f64> = (0..100)
                .map(|_| {
                    let t = std::time::Instant::now();
                    counted = w.dataplane().flow_entries().unwrap() as usize;
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            // Evictions before the table is full count only at a walk.
            assert!(
                (entries..=scale.flow_table as usize).contains(&counted),
                "counted {counted} entries, {entries} held"
            );
            let counters_ms = sys::median(&reads);
            report.figure(
                FigureId::FlowTableSize {
                    entries,
                    walk: true,
                },
                walk_ms,
            );
            report.figure(
                FigureId::FlowTableSize {
                    entries,
                    walk: false,
                },
                counters_ms,
            );
            notes.push(format!(
                "flow table size with {entries} entries: {counters_ms:.3} ms from the counters \
                 /metrics reads (median of 100 reads; they said {counted}), {walk_ms:.1} ms by \
                 a walk of the table"
            ));
            println!(
                "flow table filled with {filled} flows in {:.1} s: {entries} of {} entries in use",
                t0.elapsed().as_secs_f64(),
                scale.flow_table
            );
            notes.push(format!(
                "nearly full: {entries} of {} entries ({:.0}%), filled by {filled} SYNs of distinct flows in sticky slots through the program",
                scale.flow_table,
                100.0 * entries as f64 / scale.flow_table as f64
            ));
        }
        // Clean slot: no flow-table work whatever the table holds.
        for kind in [Kind::Syn, Kind::Est] {
            let f = v4_spec_frame(kind, clean_src, clean_port);
            let label = format!("ipv4 {}, clean slot", kind.label());
            let measured = b.lb(&w, &f, Expect::of(kind, kind == Kind::Syn), &label);
            rows.push(Row::repeated(
                Case::new(Fam::V4, Traffic::Kind(kind), f.len(), 4, Slot::Clean).table(table),
                label,
                measured,
            ));
        }
        // Sticky slot, flow pinned: one LRU lookup that hits.
        let (src, port) = sticky_iter.next().unwrap();
        let (usrc, uport) = sticky_udp.next().unwrap();
        let (src, usrc) = (IpAddr::V4(src), IpAddr::V4(usrc));
        pinned_rows(
            &b,
            &w,
            Fam::V4,
            [(src, port), (usrc, uport)],
            table,
            &mut rows,
        );
        // Sticky slot, new flow: every run inserts. One run per distinct
        // frame; the kernel's time for a repeat=1 call holds the same fixed
        // cost as the baseline's, which is subtracted.
        let frames: Vec<Vec<u8>> = sticky_iter
            .by_ref()
            .take(scale.insert_samples)
            .map(|(s, p)| v4_frame(&syn_template, s, p))
            .collect();
        let before = counts(&w);
        let samples: Vec<f64> = frames
            .iter()
            .map(|f| w.dataplane().bench_xdp(f, 1).unwrap().as_nanos() as f64)
            .collect();
        let after = counts(&w);
        prove(
            &before,
            &after,
            frames.len() as u64,
            Expect::of(Kind::Syn, true),
            "sticky SYN insert",
        );
        let label = "ipv4 tcp syn (new flow), sticky slot, inserts a flow".to_string();
        rows.push(Row {
            case: Case::new(
                Fam::V4,
                Traffic::Kind(Kind::Syn),
                syn_template.len(),
                4,
                Slot::StickyInsert,
            )
            .table(table),
            label,
            ns: sys::median(&samples) - overhead,
            baseline_ns: base_small,
            x_baseline: None,
            method: Method::Once,
            runs: frames.len() as u64,
        });
        let _ = filled;
    }
    pin_report_pair(&syn_template, base_small, overhead, scale, &mut rows);
    // Cross-check of the repeat=1 method on a case the repeat method also
    // measures: a clean-slot SYN.
    let f = v4_spec_frame(Kind::Syn, clean_src, clean_port);
    let before = counts(&w);
    let samples: Vec<f64> = (0..scale.insert_samples)
        .map(|_| w.dataplane().bench_xdp(&f, 1).unwrap().as_nanos() as f64)
        .collect();
    let after = counts(&w);
    prove(
        &before,
        &after,
        scale.insert_samples as u64,
        Expect::of(Kind::Syn, true),
        "clean SYN, repeat=1",
    );
    rows.push(Row {
        case: Case {
            cross_check: true,
            ..Case::new(Fam::V4, Traffic::Kind(Kind::Syn), f.len(), 4, Slot::Clean)
                .table(FlowTable::NearlyFull)
        },
        label: "ipv4 tcp syn (new flow), clean slot (repeat=1 method, cross-check)".into(),
        ns: sys::median(&samples) - overhead,
        baseline_ns: base_small,
        x_baseline: None,
        method: Method::Once,
        runs: scale.insert_samples as u64,
    });
    drop((sticky_iter, sticky_udp, clean_iter));
    steady_state(
        &b,
        &mut w,
        base_small,
        overhead,
        scale.insert_samples,
        &mut rows,
    );
    drop(w);
    sys::unpin();
    remote(&b, scale, base_small, overhead, &mut rows);

    let mut t = Table::new(
        format!(
            "Per-packet cost through BPF_PROG_TEST_RUN (median of {} rounds of {} runs)",
            scale.rounds, scale.repeat
        ),
        &[
            "case",
            "frame",
            "backends",
            "flow table",
            "ns/pkt",
            "baseline ns",
            "x baseline",
        ],
    );
    let mut json_rows = Vec::new();
    for &(fam, _, frame_bytes, ns) in &baselines {
        t.row(vec![
            format!("baseline: {} parse, swap MACs, XDP_TX", fam.name()),
            format!("{frame_bytes} B"),
            "-".into(),
            "-".into(),
            num(ns),
            num(ns),
            ratio(1.0),
        ]);
        report.figure(FigureId::PerPacketBaseline { fam, frame_bytes }, ns);
        json_rows.push(PerPacketRow {
            id: PerPacketId::Baseline { fam, frame_bytes },
            label: "baseline".into(),
            frame_bytes,
            ns,
            case: None,
        });
    }
    let clean = |kind: Kind| {
        rows.iter()
            .find(|r| r.case == Case::new(Fam::V4, Traffic::Kind(kind), 64, 3, Slot::Clean))
            .map_or(f64::NAN, |r| r.ns)
    };
    // The repeat=1 method against the repeat method on one case.
    let cross = rows.iter().find(|r| r.case.cross_check).and_then(|c| {
        let same = Case {
            cross_check: false,
            ..c.case
        };
        let r = rows.iter().find(|r| r.case == same)?;
        Some((c.ns, r.ns))
    });
    if let Some((once, repeated)) = cross {
        notes.push(format!(
            "the repeat=1 method's cross-check: a clean-slot SYN reads {} ns once per call \
             (fixed cost subtracted) and {} ns repeated; the rows measured once per call \
             (\"inserts a flow\", the later fragment, the spread rows) may read high by the \
             difference",
            num(once),
            num(repeated),
        ));
    }
    let work = |ns: f64| num((ns - harness_ns).max(0.0));
    notes.push(format!(
        "the test-run harness alone (a program that returns XDP_DROP at once, ipv4 64 B): {} ns \
         of every row; beyond it the baseline program works {} ns, an ipv4 established packet \
         in a clean slot {} ns and a SYN {} ns",
        num(harness_ns),
        work(base_small),
        work(clean(Kind::Est)),
        work(clean(Kind::Syn)),
    ));
    for r in rows {
        let c = r.case;
        let x_baseline = r.x_baseline.unwrap_or(r.ns / r.baseline_ns);
        t.row(vec![
            r.label.clone(),
            format!("{} B", c.frame_bytes),
            c.backends.to_string(),
            c.table.label().to_string(),
            num(r.ns),
            num(r.baseline_ns),
            ratio(x_baseline),
        ]);
        report.figure(FigureId::PerPacketNs(c), r.ns);
        report.figure(FigureId::PerPacketXBaseline(c), x_baseline);
        json_rows.push(PerPacketRow {
            id: PerPacketId::Case(c),
            label: r.label,
            frame_bytes: c.frame_bytes,
            ns: r.ns,
            case: Some(CaseDetail {
                backends: c.backends,
                flow_table: c.table,
                baseline_ns: r.baseline_ns,
                x_baseline,
                method: r.method,
                runs: r.runs,
            }),
        });
    }
    report.figure(FigureId::Repeat1Overhead, overhead.max(0.0));
    report.figure(FigureId::Harness, harness_ns);
    t.note(
        "every measured run is proven to take the path it claims: the service's packet and \
         new-flow counters, the action counter and the drop-reason counters advance by exactly \
         the number of runs, and a run before and after each measurement returns the frame \
         unchanged with the expected action (backends listen on the service port, so the \
         local-mode rewrite writes the bytes that were there)",
    );
    t.note(
        "icmp frag needed / packet too big: a router's error quoting a TCP reply of a service's \
         flow (IP header + 8 bytes of TCP in the small frame, a 576-byte IPv4 / 1280-byte IPv6 \
         error in the large one), handed to the flow's backend in local mode; its baseline is the \
         baseline program run on the same frame",
    );
    t.note(
        "clean slot: a Maglev slot that never changed, where the program does no flow-table \
         work; sticky slot: a slot whose backend changed (a 4th backend joined), where the LRU \
         flow table decides",
    );
    t.note(
        "flow hash: every row but the \"murmur3 flow hash\" ones runs the fast hash, which a \
         data plane new to its host gets; murmur3 is the hash of data planes and clusters that \
         started before it (dataplane.flow_hash)",
    );
    t.note(
        "\"inserts a flow\" cannot repeat on one buffer: it runs once per distinct frame \
         (repeat=1) and the fixed cost of such a call, measured on the baseline, is subtracted; \
         the repeat=1 cross-check row measures a case the repeat method measures too (see the \
         note on it below)",
    );
    t.note(
        "nat and dsr: backends on other hosts in a namespace with routes and permanent \
         neighbours; the next hop comes from the daemon's cache (LB_NEXTHOPS, filled and kept \
         fresh by its resolver), or from the kernel's FIB (bpf_fib_lookup) in the rows marked \
         \"FIB (no cached hop)\", where no entry is present; the test run's ingress is that \
         namespace's loopback, so both leave by XDP_REDIRECT; dsr repeats (only MACs change); \
         nat repeats too: a nat service on the backend's address sends the rewritten packet back \
         to the nat service's address, so the runs alternate between two whole nat forwards \
         (rewrite, checksums, next hop, MACs), both checked",
    );
    for n in notes {
        t.note(n);
    }
    report.sections.per_packet = json_rows;
    report.table(t);
}

const LB0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x13, 0x01];
const LBB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x13, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x13, 0x05];

/// `nat` and `dsr`: backends on other hosts, reached through the kernel's
/// FIB. The runs happen inside a namespace whose routes and (permanent)
/// neighbours make every lookup succeed. Without a context the test run's
/// ingress device is that namespace's loopback, so both modes leave by
/// `XDP_REDIRECT` towards the interface the FIB chose.
///
/// `dsr` changes only MACs: with the input already carrying the MACs the
/// FIB gives, every repeated run takes the same path. `nat` rewrites the
/// destination, so a repeated run would see a packet to the backend: a
/// return service on that backend's address (`nat` too) sends it back to
/// the nat service's address, and the repeated runs alternate between two
/// whole nat forwards ([`Bench::lb_cycle`]).
fn remote(b: &Bench, scale: &Scale, base_small: f64, overhead: f64, rows: &mut Vec<Row>) {
    let mut topo = Topology::new();
    let ns = topo.namespace("pp");
    let peer = topo.namespace("pp-peer");
    topo.veth(
        (&ns, "lb0", &["10.213.0.1/24"]),
        (&peer, "p0", &["10.213.0.2/24"]),
    );
    topo.veth(
        (&ns, "lbb", &["10.213.1.1/24"]),
        (&peer, "p1", &["10.213.1.2/24"]),
    );
    run_in(
        &ns,
        &[
            "ip",
            "link",
            "set",
            "lb0",
            "address",
            &netns::mac_string(LB0_MAC),
        ],
    );
    run_in(
        &ns,
        &[
            "ip",
            "link",
            "set",
            "lbb",
            "address",
            &netns::mac_string(LBB_MAC),
        ],
    );
    run_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for (addr, dev) in [
        ("10.213.1.5", "lbb"),
        ("10.213.1.6", "lbb"),
        ("10.213.1.7", "lbb"),
        ("10.213.0.7", "lb0"),
        ("10.213.0.8", "lb0"),
        ("10.213.0.9", "lb0"),
        // The nat service's address, as the return services' backend.
        (NAT_VIP, "lb0"),
    ] {
        netns::neighbour(&ns, addr, &netns::mac_string(PEER_MAC), dev, "permanent");
    }
    let spec = |name: &str, listen: &str, fwd: Forwarding, backends: &[&str]| ServiceSpec {
        when_all_down: Default::default(),
        name: name.into(),
        listen: listen.parse().unwrap(),
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        forwarding: fwd,
        backends: backends
            .iter()
            .map(|a| BackendSpec::new(a.parse().unwrap(), 100))
            .collect(),
    };
    let services = vec![
        spec(
            "bench",
            &format!("{DSR_VIP}:443"),
            Forwarding::Dsr,
            &["10.213.0.7:443", "10.213.0.8:443", "10.213.0.9:443"],
        ),
        spec(
            "nat",
            &format!("{NAT_VIP}:443"),
            Forwarding::Nat,
            &["10.213.1.5:8443", "10.213.1.6:8443", "10.213.1.7:8443"],
        ),
    ];
    let measured: Vec<Row> = std::thread::scope(|sc| {
        sc.spawn(|| {
            netns::enter(&ns);
            sys::pin_to_cpu(sys::nproc() - 1);
            let mut dp = Dataplane::load(Options {
                max_services: 8,
                flow_table_size: scale.flow_table,
                ..Options::default()
            })
            .expect("load the data plane");
            dp.sync_tx_ports().expect("redirect targets");
            let mut w = MapWriter::new(dp);
            if let Err(e) = w.apply(&services) {
                panic!("nat/dsr services: {e}");
            }
            let back = nat_return_services(&w);
            if let Err(e) = w.apply(&[services.clone(), back.clone()].concat()) {
                panic!("nat return services: {e}");
            }
            let mut nat_services = vec!["nat"];
            nat_services.extend(back.iter().map(|s| s.name.as_str()));
            let mut out = Vec::new();
            // The daemon's next-hop cache, filled by its resolver from the
            // namespace's tables and kept fresh (every 500 ms, as the
            // daemon does every second) while the cached rows run.
            let mut resolver = Resolver::open(w.dataplane()).expect("next-hop resolver");
            let remote = w.remote_backends();
            let filled = resolver.refresh(&remote).expect("next hops");
            assert_eq!(
                filled.cached,
                remote.len(),
                "every backend's next hop cached"
            );
            let fresh = AtomicBool::new(true);
            let via = |w: &MapWriter| w.dataplane().next_hop_counts().unwrap();
            std::thread::scope(|sc| {
                let refresher = sc.spawn(|| {
                    while fresh.load(Ordering::SeqCst) {
                        std::thread::sleep(std::time::Duration::from_millis(500));
                        resolver.refresh(&remote).expect("next hops");
                    }
                    resolver
                });
                // A row that fails its checks panics: the refresher must
                // stop then too, or the scope waits on it for ever.
                let _stop = StopOnDrop(&fresh);
                for kind in [Kind::Syn, Kind::Est, Kind::Udp] {
                    let before = via(&w);
                    out.push(dsr_row(b, &w, kind, false));
                    let after = via(&w);
                    assert!(
                        after[NextHopVia::Cache as usize] > before[NextHopVia::Cache as usize]
                            && after[NextHopVia::Fib as usize] == before[NextHopVia::Fib as usize],
                        "dsr {kind:?}: every run through the cache"
                    );
                }
                for kind in [Kind::Syn, Kind::Est, Kind::Udp] {
                    let before = via(&w);
                    out.push(nat_row(b, &w, kind, false, &nat_services));
                    let after = via(&w);
                    assert!(
                        after[NextHopVia::Cache as usize] > before[NextHopVia::Cache as usize]
                            && after[NextHopVia::Fib as usize] == before[NextHopVia::Fib as usize],
                        "nat {kind:?}: every run through the cache"
                    );
                }
                let nat_id = w.service_id("nat").unwrap();
                // A later fragment through nat: its first has been balanced; it
                // gets the backend's address and MACs (repeat=1: the address
                // changes).
                let [first, later] =
                    fragment_frames(Fam::V4, Some(NAT_VIP), Some((LB0_MAC, PEER_MAC)));
                let dp = w.dataplane();
                let (action, o) = dp.test_run_xdp(&first).unwrap();
                assert_eq!(action, XDP_REDIRECT, "nat first fragment: action");
                let to = lb_tests::packet::parse(&o).expect("nat output parses").dst;
                let (action, o) = dp.test_run_xdp(&later).unwrap();
                assert_eq!(action, XDP_REDIRECT, "nat later fragment: action");
                assert_eq!(
                    o,
                    lb_tests::packet::with_macs(
                        &lb_tests::packet::with_dst_addr(&later, to),
                        PEER_MAC,
                        LBB_MAC
                    ),
                    "nat later fragment: to the first's backend {to}"
                );
                let before = dp.service_counters(nat_id).unwrap().packets;
                let samples: Vec<f64> = (0..scale.insert_samples)
                    .map(|_| dp.bench_xdp(&later, 1).unwrap().as_nanos() as f64)
                    .collect();
                let n = scale.insert_samples as u64;
                assert_eq!(
                    dp.service_counters(nat_id).unwrap().packets - before,
                    n,
                    "nat later fragment: every run forwarded"
                );
                out.push(Row {
                    case: Case::new(
                        Fam::V4,
                        Traffic::UdpLaterFragment,
                        later.len(),
                        3,
                        Slot::Nat,
                    ),
                    label: "ipv4 udp later fragment, nat".into(),
                    ns: sys::median(&samples) - overhead,
                    baseline_ns: base_small,
                    x_baseline: None,
                    method: Method::Once,
                    runs: n,
                });
                fresh.store(false, Ordering::SeqCst);
                let mut resolver = refresher.join().unwrap();
                // Entries absent: every packet asks the FIB, as without
                // the cache.
                resolver.clear().expect("clearing next hops");
                let before = via(&w);
                out.push(dsr_row(b, &w, Kind::Est, true));
                out.push(nat_row(b, &w, Kind::Est, true, &nat_services));
                let after = via(&w);
                assert_eq!(
                    after[NextHopVia::Cache as usize],
                    before[NextHopVia::Cache as usize],
                    "FIB rows: no run through the cache"
                );
            });
            out
        })
        .join()
        .unwrap()
    });
    rows.extend(measured);
    drop(topo);
}

/// Clears its flag when dropped, by a panic's unwinding too.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A `dsr` row (the repeat method; the service named "bench" is the one
/// whose counters `counts` reads), through the cache or, with `fib`, with
/// no entry present.
fn dsr_row(b: &Bench, w: &MapWriter, kind: Kind, fib: bool) -> Row {
    let f = remote_frame(kind, DSR_VIP);
    let (slot, label) = if fib {
        (
            Slot::DsrFib,
            format!("ipv4 {}, dsr, FIB (no cached hop)", kind.label()),
        )
    } else {
        (Slot::Dsr, format!("ipv4 {}, dsr", kind.label()))
    };
    let e = Expect {
        action: XDP_REDIRECT,
        ..Expect::of(kind, kind == Kind::Syn)
    };
    let measured = b.lb(w, &f, e, &label);
    Row::repeated(
        Case::new(Fam::V4, Traffic::Kind(kind), f.len(), 3, slot),
        label,
        measured,
    )
}

/// The `nat` service's address.
const NAT_VIP: &str = "10.213.0.10";
/// The `dsr` service's address.
const DSR_VIP: &str = "10.213.0.20";

/// The 64-byte bench frame of `kind` from the client to `vip`, with the
/// MACs a packet leaving lb0 towards the peer gets: what dsr leaves as it
/// was, and what a nat return service's rewrite gives back.
fn remote_frame(kind: Kind, vip: &str) -> Vec<u8> {
    spec(Fam::V4, kind, Size::Small, ("10.213.0.2", 40000), vip)
        .with_macs(PEER_MAC, LB0_MAC)
        .build()
}

/// The services that send each `nat` bench frame's rewritten packet back
/// to [`NAT_VIP`]: one on each backend address the frames go to, for the
/// protocols of the frames that go there.
fn nat_return_services(w: &MapWriter) -> Vec<ServiceSpec> {
    let mut to: Vec<(std::net::SocketAddr, Vec<Protocol>)> = Vec::new();
    for kind in [Kind::Syn, Kind::Est, Kind::Udp] {
        let (action, o) = w
            .dataplane()
            .test_run_xdp(&remote_frame(kind, NAT_VIP))
            .unwrap();
        assert_eq!(action, XDP_REDIRECT, "nat {kind:?}: action");
        let p = lb_tests::packet::parse(&o).expect("nat output parses");
        let addr = std::net::SocketAddr::new(p.dst, p.dport);
        let proto = if kind == Kind::Udp {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        match to.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, ps)) if ps.contains(&proto) => {}
            Some((_, ps)) => ps.push(proto),
            None => to.push((addr, vec![proto])),
        }
    }
    to.into_iter()
        .enumerate()
        .map(|(i, (listen, protocols))| ServiceSpec {
            when_all_down: Default::default(),
            name: format!("nat-back-{i}"),
            listen,
            protocols,
            forwarding: Forwarding::Nat,
            backends: vec![BackendSpec::new(
                format!("{NAT_VIP}:443").parse().unwrap(),
                100,
            )],
        })
        .collect()
}

/// A `nat` row, the repeat method: the runs alternate between the `nat`
/// service's forward to a backend and a return service's forward back
/// (`services`: all of them), each a whole nat forward, both checked.
fn nat_row(b: &Bench, w: &MapWriter, kind: Kind, fib: bool, services: &[&str]) -> Row {
    let f = remote_frame(kind, NAT_VIP);
    let (action, o) = w.dataplane().test_run_xdp(&f).unwrap();
    assert_eq!(action, XDP_REDIRECT, "nat {kind:?}: action");
    let p = lb_tests::packet::parse(&o).expect("nat output parses");
    assert!(
        p.dport == 8443 && p.dst.to_string().starts_with("10.213.1."),
        "nat {kind:?}: rewritten to a backend, got {}:{}",
        p.dst,
        p.dport
    );
    assert_eq!(&o[0..12], &[PEER_MAC, LBB_MAC].concat()[..], "nat MACs");
    lb_tests::packet::verify_checksums(&o).expect("nat checksums");
    let (slot, label) = if fib {
        (
            Slot::NatFib,
            format!("ipv4 {}, nat, FIB (no cached hop)", kind.label()),
        )
    } else {
        (Slot::Nat, format!("ipv4 {}, nat", kind.label()))
    };
    let e = Expect {
        action: XDP_REDIRECT,
        ..Expect::of(kind, kind == Kind::Syn)
    };
    let measured = b.lb_cycle(w, &[&f, &o], e, &label, services);
    Row::repeated(
        Case::new(Fam::V4, Traffic::Kind(kind), f.len(), 3, slot),
        label,
        measured,
    )
}

/// QUIC-LB on a `bench` service like the plain `udp` rows' (3 backends): a long header (the 4-tuple pick after the
/// QUIC checks), then short headers whose CID names backend 2, in plaintext
/// and encrypted with each of the three decryption paths.
fn quic_rows(b: &Bench, w: &mut MapWriter, rows: &mut Vec<Row>) {
    use lb_common::quic::{CidConfig, CidMode};
    use lb_userspace::dataplane::{QuicSpec, QuicSpecs};
    // The shared data plane, as a fresh load would be; the other rows'
    // `bench` goes back to plain UDP after these.
    reset(w, 3);
    let svc = service(3);
    let key = [
        0x8f, 0x95, 0xf0, 0x92, 0x45, 0x76, 0x5f, 0x80, 0x25, 0x69, 0x34, 0xe5, 0x0c, 0x66, 0x20,
        0x7f,
    ];
    let cases = [
        (
            QuicCase::LongHeader,
            CidMode::Plaintext,
            2u8,
            8u8,
            "long header (4-tuple)",
        ),
        (
            QuicCase::Plaintext,
            CidMode::Plaintext,
            2,
            8,
            "short header, plaintext CID",
        ),
        (
            QuicCase::Encrypted1Pass,
            CidMode::Encrypted,
            8,
            8,
            "short header, encrypted CID, 1 AES pass (8+8)",
        ),
        (
            QuicCase::Encrypted3Pass,
            CidMode::Encrypted,
            3,
            4,
            "short header, encrypted CID, 3 AES passes (3+4)",
        ),
        (
            QuicCase::Encrypted4Pass,
            CidMode::Encrypted,
            10,
            5,
            "short header, encrypted CID, 4 AES passes (10+5)",
        ),
    ];
    for (case, mode, server_id_len, nonce_len, what) in cases {
        let cid = CidConfig {
            config_id: 1,
            server_id_len,
            nonce_len,
            mode,
            key,
        };
        let sid = |i: usize| {
            let mut v = vec![0u8; usize::from(server_id_len)];
            *v.last_mut().unwrap() = i as u8 + 1;
            v
        };
        let mut specs = QuicSpecs::new();
        specs.insert(
            "bench".into(),
            QuicSpec {
                cid,
                server_ids: svc
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.address, sid(i)))
                    .collect(),
            },
        );
        w.apply_quic(&specs).unwrap();
        let mut bytes = [0u8; 20];
        let n = cid
            .encode(&sid(1), &vec![0x5a; usize::from(nonce_len)], &mut bytes)
            .unwrap();
        let mut payload = vec![if case == QuicCase::LongHeader {
            0xc0
        } else {
            0x40
        }];
        payload.extend_from_slice(&bytes[..n]);
        payload.resize(64 - 14 - 20 - 8, 0x33);
        let f = Spec::udp("10.9.0.2", "10.9.0.1", 40000, 443)
            .payload(&payload)
            .build();
        let label = format!("ipv4 udp to a QUIC-LB service, {what}");
        let routes_before = w
            .dataplane()
            .quic_route_counts(w.service_id("bench").unwrap())
            .unwrap();
        let measured = b.lb(w, &f, Expect::of(Kind::Udp, false), &label);
        // Every run took the path the row names.
        let after = w
            .dataplane()
            .quic_route_counts(w.service_id("bench").unwrap())
            .unwrap();
        let route = if case == QuicCase::LongHeader {
            lb_common::quic::QuicRoute::LongHeader
        } else {
            lb_common::quic::QuicRoute::Cid
        } as usize;
        assert_eq!(
            after[route] - routes_before[route],
            b.repeat as u64 * b.rounds as u64 + 2,
            "{label}: every run routed by {route}"
        );
        rows.push(Row::repeated(
            Case::new(Fam::V4, Traffic::Quic(case), f.len(), 3, Slot::Clean),
            label,
            measured,
        ));
    }
    w.apply_quic(&QuicSpecs::new()).unwrap();
    reset(w, 3);
}
