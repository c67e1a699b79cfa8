//! Packets per second on one core through a program attached (native XDP)
//! to a veth, next to the baseline program attached the same way.
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
//! buffer. The baseline's `XDP_TX` sends them back to the generator's veth,
//! which drops them. Every delivered frame is counted: the veth's receive
//! counter, and for the balancer its service counter too, which must equal
//! the number of frames sent.
use std::process::Command;

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
use lb_tests::{
    netns::{self, Topology},
    packet::{Spec, TCP_ACK},
};
use lb_userspace::dataplane::{AttachMode, Dataplane, MapWriter, Options, ServiceSpec};

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

/// The program under test on the receiving veth.
enum Dut {
    /// Held so the program stays attached; dropping it detaches.
    Baseline(#[allow(dead_code)] Ebpf),
    Lb(Box<MapWriter>),
}

fn service() -> ServiceSpec {
    lb_tests::fixtures::service(
        "bench",
        "0.0.0.0:443",
        &["127.0.0.1:443", "127.0.0.2:443", "127.0.0.3:443"],
    )
}

struct Case {
    id: PpsCase,
    label: &'static str,
    lb: bool,
    frame: Vec<u8>,
    /// Whether the balancer counts the frame as its service's.
    service: bool,
}

pub fn run(scale: &Scale, report: &mut Report) {
    let mut topo = Topology::new();
    let gen_ns = topo.namespace("gen");
    let dut_ns = topo.namespace("dut");
    // No IPv6 chatter (router and neighbour solicitations) on the link.
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
    topo.veth(
        (&gen_ns, "g0", &["10.211.0.2/24"]),
        (&dut_ns, "d0", &["10.211.0.1/24"]),
    );
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
    let cases = vec![
        Case {
            id: PpsCase::BaselineUdp,
            label: "baseline attached: parse, swap MACs, XDP_TX",
            lb: false,
            frame: udp.clone(),
            service: false,
        },
        Case {
            id: PpsCase::LbUdp,
            label: "lb attached: udp to the service (rewrite, XDP_PASS)",
            lb: true,
            frame: udp,
            service: true,
        },
        Case {
            id: PpsCase::LbTcpEstablished,
            label: "lb attached: tcp established (rewrite, XDP_PASS)",
            lb: true,
            frame: est,
            service: true,
        },
        Case {
            id: PpsCase::LbNonService,
            label: "lb attached: non-service udp (XDP_PASS untouched)",
            lb: true,
            frame: other,
            service: false,
        },
    ];

    let mut gen_ebpf = Ebpf::load(crate::objects::BASELINE_OBJECT).expect("baseline object");
    let gen_prog: &mut Xdp = gen_ebpf
        .program_mut("baseline")
        .unwrap()
        .try_into()
        .unwrap();
    gen_prog.load().unwrap();
    let gen_prog: &Xdp = gen_ebpf.program("baseline").unwrap().try_into().unwrap();

    let mut rows = Vec::new();
    let mut dut: Option<Dut> = None;
    for case in &cases {
        // Attach the program under test (inside its namespace: the attach
        // and the detach on drop talk netlink there).
        let want_lb = case.lb;
        let have_lb = matches!(dut, Some(Dut::Lb(_)));
        if dut.is_none() || want_lb != have_lb {
            if let Some(old) = dut.take() {
                netns::within(&dut_ns, move || drop(old));
            }
            dut = Some(netns::within(&dut_ns, move || attach(want_lb)));
        }
        let mut pps_samples = Vec::new();
        let mut ns_samples = Vec::new();
        let mut delivered_total = 0u64;
        let mut sent_total = 0u64;
        for _ in 0..scale.pps_rounds {
            let rx_before = rx_packets(&dut_ns, "d0");
            let svc_before = lb_packets(dut.as_ref().unwrap());
            let frame = case.frame.clone();
            let frames = scale.pps_frames;
            let gen_ns2 = gen_ns.clone();
            let ns_per_frame = std::thread::scope(|s| {
                s.spawn(|| {
                    netns::enter(&gen_ns2);
                    sys::pin_to_cpu(sys::nproc() - 1);
                    generate(gen_prog, "g0", &frame, frames)
                })
                .join()
                .unwrap()
            });
            let delivered = rx_packets(&dut_ns, "d0") - rx_before;
            let svc = lb_packets(dut.as_ref().unwrap()) - svc_before;
            if case.service {
                assert_eq!(
                    svc, frames as u64,
                    "{}: every frame sent took the service path",
                    case.label
                );
            } else if case.lb {
                assert_eq!(svc, 0, "{}: no frame counted for the service", case.label);
            }
            assert!(
                delivered * 100 >= frames as u64 * 99,
                "{}: only {delivered} of {frames} frames arrived",
                case.label
            );
            // The receive counter may hold a stray packet of the link's own.
            let delivered = delivered.min(frames as u64);
            let seconds = ns_per_frame * frames as f64 / 1e9;
            pps_samples.push(delivered as f64 / seconds);
            ns_samples.push(seconds * 1e9 / delivered as f64);
            delivered_total += delivered;
            sent_total += frames as u64;
        }
        rows.push((
            case,
            sys::median(&pps_samples),
            sys::median(&ns_samples),
            delivered_total,
            sent_total,
        ));
    }
    if let Some(old) = dut.take() {
        netns::within(&dut_ns, move || drop(old));
    }
    drop(topo);

    let base_pps = rows[0].1;
    let base_ns = rows[0].2;
    let mut t = Table::new(
        format!(
            "Packets per second on one core, native XDP on a veth, live frames ({} rounds of {} frames, median)",
            scale.pps_rounds, scale.pps_frames
        ),
        &[
            "program and traffic",
            "Mpps",
            "ns/pkt",
            "x baseline ns",
            "+ns vs baseline",
            "delivered",
        ],
    );
    let mut json_rows = Vec::new();
    for (case, pps, ns, delivered, sent) in &rows {
        t.row(vec![
            case.label.to_string(),
            format!("{:.2}", pps / 1e6),
            num(*ns),
            ratio(ns / base_ns),
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
        "ns/pkt is one core's time per frame for the whole chain: the generator program and \
         transmit (the same in every row), the veth hand-over and the program under test with \
         what its action costs (XDP_TX back to the generator's veth for the baseline; a socket \
         buffer and the IP layer's drop for XDP_PASS)",
    );
    t.note(
        "every frame sent arrived (veth receive counter), and for service traffic the balancer's \
         service counter advanced by exactly the frames delivered",
    );
    report.sections.pps = json_rows;
    report.table(t);
}

fn lb_packets(dut: &Dut) -> u64 {
    match dut {
        Dut::Lb(w) => {
            let id = w.service_id("bench").unwrap();
            w.dataplane().service_counters(id).unwrap().packets
        }
        Dut::Baseline(_) => 0,
    }
}

/// Loads and attaches the program under test to `d0` of the calling
/// thread's namespace.
fn attach(lb: bool) -> Dut {
    if lb {
        let dp = Dataplane::load(Options {
            max_services: 2,
            flow_table_size: 65_536,
            ..Options::default()
        })
        .expect("load the data plane");
        let mut w = MapWriter::new(dp);
        w.apply(&[service()]).unwrap();
        w.dataplane_mut()
            .attach("d0", AttachMode::Native)
            .expect("attach lb to d0 (native)");
        Dut::Lb(Box::new(w))
    } else {
        let mut ebpf = Ebpf::load(crate::objects::BASELINE_OBJECT).expect("baseline object");
        let prog: &mut Xdp = ebpf.program_mut("baseline").unwrap().try_into().unwrap();
        prog.load().unwrap();
        prog.attach("d0", XdpMode::Driver)
            .expect("attach the baseline to d0 (native)");
        Dut::Baseline(ebpf)
    }
}
