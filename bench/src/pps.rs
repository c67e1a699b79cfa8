//! Packets per second through a program attached (native XDP) to a veth,
//! next to the baseline program attached the same way: on one core, and on
//! two (two generator threads, each feeding one queue of a two-queue veth).
//!
//! The traffic comes from `BPF_PROG_TEST_RUN` in live-frame mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`) in a generator namespace: the baseline
//! program runs there on each frame and returns `XDP_TX`, which the kernel
//! turns into a transmit out of the generator's veth; the frame arrives on
//! the peer in the device-under-test namespace, where the measured program
//! runs in the veth's NAPI poll. The kernel delivers each batch of 64
//! frames before the call goes on, on the calling thread's CPU (pinned), so
//! the call's time is one core's time for generating, carrying and
//! processing the frames; the generator's share is the same in every case.
//!
//! The balancer in local mode passes service packets up the stack
//! (`XDP_PASS`); the frames carry a destination MAC that is not the veth's,
//! so the stack drops them at IP input, right after building the socket
//! buffer. The baseline's `XDP_TX`, and the balancer's in `dsr` and `nat`
//! (to backends on the receiving veth's link), send them back to the
//! generator's veth, whose `sink` program drops them. Every delivered frame
//! is counted: the veth's receive
//! counter, and for the balancer its service counter too, which must equal
//! the number of frames sent.
use std::{
    process::Command,
    sync::{Arc, Mutex},
};

use crate::{
    Scale,
    report::{Report, Table, num, ratio},
    results::{FigureId, PpsCase, PpsRow},
    sys,
};
use aya::{
    Ebpf, TestRun, TestRunAttrs, TestRunOptions,
    programs::{Xdp, XdpMode},
};
use lb_common::NextHopVia;
use lb_tests::{
    netns::{self, Topology},
    packet::{Spec, TCP_ACK},
};
use lb_userspace::dataplane::{AttachMode, Dataplane, Forwarding, MapWriter, Options, ServiceSpec};
use lb_userspace::nexthop;

const BATCH: u32 = 64;

fn rx_packets(ns: &str, dev: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "-s", "link", "show", dev])
        .output()
        .expect("ip link show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0)
}

fn ifindex(dev: &str) -> u32 {
    let c = std::ffi::CString::new(dev).unwrap();
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no interface {dev}");
    i
}

/// Runs the generator: `frames` live frames of `frame` out of `dev`, on
/// the calling thread (which must be in the generator's namespace).
/// Returns the kernel's time per frame in ns.
fn generate(gen_prog: &Xdp, dev: &str, frame: &[u8], frames: u32) -> f64 {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex.
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex(dev), 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let r = gen_prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: frames,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..Default::default()
        })
        .expect("live-frame test run (kernel >= 5.18)");
    r.duration.as_nanos() as f64
}

/// The program under test on the receiving veth, as loaded.
enum Dut {
    /// Held so the program stays attached; dropping it detaches.
    Baseline(#[allow(dead_code)] Ebpf),
    /// The daemon's next-hop resolver runs beside it (for `dsr`/`nat`)
    /// until it is dropped.
    Lb(Arc<Mutex<MapWriter>>),
}

/// Which program a case runs on the receiving veth.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Program {
    Baseline,
    Lb(Forwarding),
}

/// Backends of the `dsr` and `nat` cases: on the receiving veth's own
/// link, so the balancer sends the frame back out of it with `XDP_TX`.
const LINK_BACKENDS: [(&str, [u8; 6]); 3] = [
    ("10.211.0.11", [0x02, 0, 0, 0, 0, 0xb1]),
    ("10.211.0.12", [0x02, 0, 0, 0, 0, 0xb2]),
    ("10.211.0.13", [0x02, 0, 0, 0, 0, 0xb3]),
];

fn service(forwarding: Forwarding) -> ServiceSpec {
    let link: Vec<String> = LINK_BACKENDS
        .iter()
        .map(|(a, _)| format!("{a}:443"))
        .collect();
    let backends: Vec<&str> = match forwarding {
        Forwarding::Local => vec!["127.0.0.1:443", "127.0.0.2:443", "127.0.0.3:443"],
        _ => link.iter().map(String::as_str).collect(),
    };
    lb_tests::fixtures::forwarded_service("bench", "0.0.0.0:443", forwarding, &backends)
}

struct Case {
    id: PpsCase,
    label: &'static str,
    program: Program,
    frame: Vec<u8>,
    /// Whether the balancer counts the frame as its service's.
    service: bool,
    /// Generator threads, each pinned to a core of its own, each feeding a
    /// receive queue of its own.
    cores: usize,
}

/// A veth pair with two queues each way (so two cores can each feed one),
/// addressed like `Topology::veth`.
fn veth_two_queues(gen_ns: &str, dut_ns: &str) {
    netns::run(&[
        "ip",
        "link",
        "add",
        "name",
        "g0",
        "netns",
        gen_ns,
        "numtxqueues",
        "2",
        "numrxqueues",
        "2",
        "type",
        "veth",
        "peer",
        "name",
        "d0",
        "netns",
        dut_ns,
        "numtxqueues",
        "2",
        "numrxqueues",
        "2",
    ]);
    for (ns, dev, addr) in [
        (gen_ns, "g0", "10.211.0.2/24"),
        (dut_ns, "d0", "10.211.0.1/24"),
    ] {
        netns::run_in(ns, &["ip", "addr", "add", addr, "dev", dev]);
        netns::run_in(ns, &["ip", "link", "set", dev, "up"]);
    }
}

pub fn run(scale: &Scale, report: &mut Report) {
    let mut topo = Topology::new();
    let gen_ns = topo.namespace("gen");
    let dut_ns = topo.namespace("dut");
    // No IPv6 chatter (router and neighbour solicitations) on the link;
    // forwarding on, as `bpf_fib_lookup` requires of the ingress device.
    for ns in [&gen_ns, &dut_ns] {
        for k in ["all", "default"] {
            netns::run_in(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{k}.disable_ipv6=1"),
                ],
            );
        }
    }
    netns::run_in(&dut_ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    veth_two_queues(&gen_ns, &dut_ns);
    for (addr, mac) in LINK_BACKENDS {
        netns::neighbour(&dut_ns, addr, &netns::mac_string(mac), "d0", "permanent");
    }
    // Neither MAC is the receiving veth's: the stack drops what is passed
    // to it at IP input.
    let macs = ([0x02, 0, 0, 0, 0, 0xa1], [0x02, 0, 0, 0, 0, 0xa2]);
    let udp = Spec::udp("10.9.0.2", "10.9.0.1", 40000, 443)
        .payload(&[0; 22])
        .with_macs(macs.0, macs.1)
        .build();
    let est = Spec::tcp("10.9.0.2", "10.9.0.1", 40000, 443, TCP_ACK)
        .payload(&[0; 10])
        .with_macs(macs.0, macs.1)
        .build();
    let other = Spec::udp("10.9.0.2", "10.9.0.1", 40000, 4443)
        .payload(&[0; 22])
        .with_macs(macs.0, macs.1)
        .build();
    let case = |id, label, program, frame: &Vec<u8>, service, cores| Case {
        id,
        label,
        program,
        frame: frame.clone(),
        service,
        cores,
    };
    let (local, dsr, nat) = (
        Program::Lb(Forwarding::Local),
        Program::Lb(Forwarding::Dsr),
        Program::Lb(Forwarding::Nat),
    );
    let cases = vec![
        case(
            PpsCase::BaselineUdp,
            "baseline attached: parse, swap MACs, XDP_TX",
            Program::Baseline,
            &udp,
            false,
            1,
        ),
        case(
            PpsCase::LbUdp,
            "lb attached: udp to the service (rewrite, XDP_PASS)",
            local,
            &udp,
            true,
            1,
        ),
        case(
            PpsCase::LbTcpEstablished,
            "lb attached: tcp established (rewrite, XDP_PASS)",
            local,
            &est,
            true,
            1,
        ),
        case(
            PpsCase::LbNonService,
            "lb attached: non-service udp (XDP_PASS untouched)",
            local,
            &other,
            false,
            1,
        ),
        case(
            PpsCase::LbDsrUdp,
            "lb attached: udp to a dsr service (MACs, XDP_TX)",
            dsr,
            &udp,
            true,
            1,
        ),
        case(
            PpsCase::LbNatUdp,
            "lb attached: udp to a nat service (rewrite, MACs, XDP_TX)",
            nat,
            &udp,
            true,
            1,
        ),
        case(
            PpsCase::BaselineUdp2Cores,
            "baseline attached, 2 cores",
            Program::Baseline,
            &udp,
            false,
            2,
        ),
        case(
            PpsCase::LbDsrUdp2Cores,
            "lb attached: udp to a dsr service, 2 cores",
            dsr,
            &udp,
            true,
            2,
        ),
    ];
    // Cores the machine does not have are not measured.
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|c| c.cores <= sys::nproc())
        .collect();

    let mut gen_ebpf = Ebpf::load(crate::objects::BASELINE_OBJECT).expect("baseline object");
    let gen_prog: &mut Xdp = gen_ebpf
        .program_mut("baseline")
        .unwrap()
        .try_into()
        .unwrap();
    gen_prog.load().unwrap();
    // The generator's veth takes the frames sent back to it with XDP_TX
    // (a veth delivers XDP_TX only to a peer running XDP) and drops them.
    let sink = netns::within(&gen_ns, || {
        let mut ebpf = Ebpf::load(crate::objects::BASELINE_OBJECT).expect("baseline object");
        let prog: &mut Xdp = ebpf.program_mut("sink").unwrap().try_into().unwrap();
        prog.load().unwrap();
        prog.attach("g0", XdpMode::Driver)
            .expect("attach the sink to g0 (native)");
        ebpf
    });
    let gen_prog: &Xdp = gen_ebpf.program("baseline").unwrap().try_into().unwrap();

    let mut rows = Vec::new();
    let mut dut: Option<(Program, Dut)> = None;
    // The baseline cases first, then the balancer's: it is loaded and
    // attached once (the verifier takes a second or more per load) and
    // only its service changes between forwarding modes. The table keeps
    // the cases' order.
    let mut order: Vec<&Case> = cases.iter().collect();
    order.sort_by_key(|c| c.program != Program::Baseline);
    for case in order {
        // Attach the program under test (inside its namespace: the attach
        // and the detach on drop talk netlink there).
        match (dut.as_ref(), case.program) {
            (Some((old, _)), new) if *old == new => {}
            (Some((Program::Lb(_), Dut::Lb(w))), Program::Lb(forwarding)) => {
                let w = w.clone();
                netns::within(&dut_ns, move || serve(&w, forwarding));
                dut.as_mut().unwrap().0 = case.program;
            }
            _ => {
                if let Some((_, old)) = dut.take() {
                    netns::within(&dut_ns, move || drop(old));
                }
                let program = case.program;
                dut = Some((program, netns::within(&dut_ns, move || attach(program))));
            }
        }
        let attached = &dut.as_ref().unwrap().1;
        let mut pps_samples = Vec::new();
        let mut ns_samples = Vec::new();
        let mut delivered_total = 0u64;
        let mut sent_total = 0u64;
        for _ in 0..scale.pps_rounds {
            let rx_before = rx_packets(&dut_ns, "d0");
            let svc_before = lb_packets(attached);
            let frames = scale.pps_frames;
            // Each generator thread on a core of its own, the last ones
            // first (the bench's own thread runs on core 0 by default).
            let seconds = std::thread::scope(|s| {
                let threads: Vec<_> = (0..case.cores)
                    .map(|i| {
                        let (frame, gen_ns) = (&case.frame, &gen_ns);
                        s.spawn(move || {
                            netns::enter(gen_ns);
                            sys::pin_to_cpu(sys::nproc() - 1 - i);
                            generate(gen_prog, "g0", frame, frames) * frames as f64 / 1e9
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().unwrap())
                    .fold(0.0, f64::max)
            });
            let sent = frames as u64 * case.cores as u64;
            let delivered = rx_packets(&dut_ns, "d0") - rx_before;
            let (svc, cached) = lb_packets(attached);
            let (svc, cached) = (svc - svc_before.0, cached - svc_before.1);
            if matches!(case.program, Program::Lb(Forwarding::Dsr | Forwarding::Nat)) {
                assert_eq!(
                    cached, sent,
                    "{}: every frame took the cached next hop",
                    case.label
                );
            }
            if case.service {
                assert_eq!(
                    svc, sent,
                    "{}: every frame sent took the service path",
                    case.label
                );
            } else if matches!(case.program, Program::Lb(_)) {
                assert_eq!(svc, 0, "{}: no frame counted for the service", case.label);
            }
            assert!(
                delivered * 100 >= sent * 99,
                "{}: only {delivered} of {sent} frames arrived",
                case.label
            );
            // The receive counter may hold a stray packet of the link's own.
            let delivered = delivered.min(sent);
            pps_samples.push(delivered as f64 / seconds);
            // Core time per frame: with two cores, both were busy.
            ns_samples.push(seconds * 1e9 * case.cores as f64 / delivered as f64);
            delivered_total += delivered;
            sent_total += sent;
        }
        rows.push((
            case,
            sys::median(&pps_samples),
            sys::median(&ns_samples),
            delivered_total,
            sent_total,
        ));
    }
    if let Some((_, old)) = dut.take() {
        netns::within(&dut_ns, move || drop(old));
    }
    netns::within(&gen_ns, move || drop(sink));
    drop(topo);
    rows.sort_by_key(|r| cases.iter().position(|c| std::ptr::eq(c, r.0)));

    // Each row against the baseline on as many cores.
    let baseline = |cores: usize| {
        rows.iter()
            .find(|r| r.0.program == Program::Baseline && r.0.cores == cores)
            .map_or((f64::NAN, f64::NAN), |r| (r.1, r.2))
    };
    let mut t = Table::new(
        format!(
            "Packets per second, native XDP on a veth, live frames ({} rounds of {} frames per core, median)",
            scale.pps_rounds, scale.pps_frames
        ),
        &[
            "program and traffic",
            "Mpps",
            "x baseline rate",
            "ns/pkt (core time)",
            "+ns vs baseline",
            "delivered",
        ],
    );
    let mut json_rows = Vec::new();
    for (case, pps, ns, delivered, sent) in &rows {
        let (base_pps, base_ns) = baseline(case.cores);
        t.row(vec![
            case.label.to_string(),
            format!("{:.2}", pps / 1e6),
            ratio(pps / base_pps),
            num(*ns),
            num(ns - base_ns),
            format!("{delivered}/{sent}"),
        ]);
        report.figure(FigureId::Pps(case.id), *pps);
        report.figure(FigureId::PpsNs(case.id), *ns);
        json_rows.push(PpsRow {
            id: case.id,
            label: case.label,
            pps: *pps,
            ns_per_packet: *ns,
            x_baseline_pps: pps / base_pps,
            delivered: *delivered,
            sent: *sent,
        });
    }
    t.note(
        "ns/pkt is core time per frame for the whole chain: the generator program and transmit \
         (the same in every row), the veth hand-over and the program under test with what its \
         action costs (XDP_TX back to the generator's veth, where a program drops it, for the \
         baseline, dsr and nat; a socket buffer and the IP layer's drop for XDP_PASS)",
    );
    let rate = |id: PpsCase| rows.iter().find(|r| r.0.id == id).map_or(f64::NAN, |r| r.1);
    t.note(format!(
        "two cores against one: baseline {}, lb dsr {} (each core runs its own generator \
         thread and the receive queue it feeds)",
        ratio(rate(PpsCase::BaselineUdp2Cores) / rate(PpsCase::BaselineUdp)),
        ratio(rate(PpsCase::LbDsrUdp2Cores) / rate(PpsCase::LbDsrUdp)),
    ));
    t.note(
        "every frame sent arrived (veth receive counter), and for service traffic the balancer's \
         service counter advanced by exactly the frames delivered",
    );
    report.sections.pps = json_rows;
    report.table(t);
}

/// The service's forwarded packets, and the next hops taken from the
/// daemon's cache.
fn lb_packets(dut: &Dut) -> (u64, u64) {
    match dut {
        Dut::Lb(w) => {
            let w = w.lock().unwrap();
            let id = w.service_id("bench").unwrap();
            let dp = w.dataplane();
            (
                dp.service_counters(id).unwrap().packets,
                dp.next_hop_counts().unwrap()[NextHopVia::Cache as usize],
            )
        }
        Dut::Baseline(_) => (0, 0),
    }
}

/// Loads and attaches the program under test to `d0` of the calling
/// thread's namespace.
fn attach(program: Program) -> Dut {
    match program {
        Program::Lb(forwarding) => {
            let dp = Dataplane::load(Options {
                max_services: 2,
                flow_table_size: 65_536,
                ..Options::default()
            })
            .expect("load the data plane");
            let mut w = MapWriter::new(dp);
            w.dataplane_mut()
                .attach("d0", AttachMode::Native)
                .expect("attach lb to d0 (native)");
            let w = Arc::new(Mutex::new(w));
            serve(&w, forwarding);
            // As the daemon does: next hops kept fresh by the resolver's
            // thread while the traffic runs.
            nexthop::spawn(Arc::downgrade(&w)).expect("next-hop resolver");
            Dut::Lb(w)
        }
        Program::Baseline => {
            let mut ebpf = Ebpf::load(crate::objects::BASELINE_OBJECT).expect("baseline object");
            let prog: &mut Xdp = ebpf.program_mut("baseline").unwrap().try_into().unwrap();
            prog.load().unwrap();
            prog.attach("d0", XdpMode::Driver)
                .expect("attach the baseline to d0 (native)");
            Dut::Baseline(ebpf)
        }
    }
}

/// Makes the attached balancer serve only the bench service with
/// `forwarding`, as a fresh load would (new service, every slot clean, an
/// empty flow table), with its next hops resolved from the calling
/// thread's namespace before any traffic.
fn serve(w: &Mutex<MapWriter>, forwarding: Forwarding) {
    let mut w = w.lock().unwrap();
    w.apply(&[]).unwrap();
    w.dataplane_mut().clear_flows();
    w.apply(&[service(forwarding)]).unwrap();
    let remote = w.remote_backends();
    let mut resolver = nexthop::Resolver::open(w.dataplane()).expect("next-hop resolver");
    let filled = resolver.refresh(&remote).expect("next hops");
    assert_eq!(filled.cached, remote.len(), "every next hop cached");
}
