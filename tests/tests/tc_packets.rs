//! The TC ingress program (`lb_tc_ingress`, the balancer in TC mode)
//! through `BPF_PROG_TEST_RUN` on the real object: the kernel builds a
//! socket buffer from each frame. Expected frames are built from scratch
//! with full checksums; each one is also run through `lb_xdp` on a data
//! plane of its own, and both programs must leave the same bytes.
use lb_common::Reason;
use lb_tests::fixtures::{backend_port, hex, service, slot_of, writer};
use lb_tests::packet::{self, Spec, TCP_ACK, TCP_PSH, TCP_SYN};
use lb_userspace::dataplane::{Forwarding, MapWriter, ServiceSpec};

const XDP_PASS: u32 = 2;
const XDP_DROP: u32 = 1;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

fn tc(w: &MapWriter, frame: &[u8]) -> (u32, Vec<u8>) {
    w.dataplane()
        .test_run_tc_ingress(frame)
        .expect("BPF_PROG_TEST_RUN of lb_tc_ingress")
}

fn xdp(w: &MapWriter, frame: &[u8]) -> (u32, Vec<u8>) {
    w.dataplane()
        .test_run_xdp(frame)
        .expect("BPF_PROG_TEST_RUN of lb_xdp")
}

fn table_port(w: &MapWriter, svc: &ServiceSpec, frame: &[u8]) -> u16 {
    let p = packet::parse(frame).unwrap();
    let slot = slot_of(w, svc, (p.src, p.dst), (p.sport, p.dport), p.proto);
    backend_port(w, svc, slot.backend)
}

fn services() -> Vec<ServiceSpec> {
    vec![
        service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]),
        service("web6", "[::]:443", &["[::1]:8001", "[::1]:8002"]),
        // Backends with an address of their own: the address changes too.
        service("api", "10.0.0.1:8443", &["10.0.0.9:9001"]),
        service("api6", "[fd00::1]:8443", &["[fd00::9]:9002"]),
    ]
}

fn reasons(w: &MapWriter) -> Vec<u64> {
    w.dataplane().reason_counts().unwrap().to_vec()
}

/// (name, frame, the backend address and port it must get, or `None`:
/// the table's port, same address)
type Case = (&'static str, Spec, Option<(&'static str, u16)>);

#[test]
fn tcp_and_udp_of_both_families_are_rewritten_in_place_and_go_up() {
    let svcs = services();
    let (w, twin) = (writer(&svcs), writer(&svcs));
    let (web, web6) = (&svcs[0], &svcs[1]);

    let mut udp_zero = Spec::udp("10.0.0.2", "10.0.0.1", 40004, 443).payload(b"quic?");
    udp_zero.udp_zero_checksum = true;
    let mut vlan = Spec::tcp("10.0.0.2", "10.0.0.1", 40002, 443, TCP_SYN);
    vlan.vlan = Some(100);
    let mut v4_opts = Spec::tcp("10.0.0.2", "10.0.0.1", 40001, 443, TCP_SYN);
    v4_opts.ip_options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0];
    let mut v6_ext = Spec::tcp("fd00::2", "fd00::1", 40003, 443, TCP_SYN);
    v6_ext.ext_headers = vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])];
    let big = vec![0x42; 1400];
    let cases: Vec<Case> = vec![
        (
            "ipv4 tcp syn",
            Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN),
            None,
        ),
        (
            "ipv6 tcp syn",
            Spec::tcp("fd00::2", "fd00::1", 40000, 443, TCP_SYN),
            None,
        ),
        (
            "ipv4 tcp data, 1400 bytes",
            Spec::tcp("10.0.0.2", "10.0.0.1", 40010, 443, TCP_ACK | TCP_PSH).payload(&big),
            None,
        ),
        (
            "ipv6 tcp data, 1400 bytes",
            Spec::tcp("fd00::2", "fd00::1", 40010, 443, TCP_ACK | TCP_PSH).payload(&big),
            None,
        ),
        (
            "ipv4 udp",
            Spec::udp("10.0.0.2", "10.0.0.1", 40000, 443).payload(b"hello"),
            None,
        ),
        (
            "ipv6 udp",
            Spec::udp("fd00::2", "fd00::1", 40000, 443).payload(b"hello"),
            None,
        ),
        ("ipv4 udp without checksum", udp_zero, None),
        ("vlan tag", vlan, None),
        ("ipv4 options", v4_opts, None),
        ("ipv6 extension headers", v6_ext, None),
        (
            "ipv4 tcp to a backend address",
            Spec::tcp("10.0.0.2", "10.0.0.1", 40020, 8443, TCP_SYN),
            Some(("10.0.0.9", 9001)),
        ),
        (
            "ipv4 udp to a backend address",
            Spec::udp("10.0.0.2", "10.0.0.1", 40021, 8443).payload(b"dgram"),
            Some(("10.0.0.9", 9001)),
        ),
        (
            "ipv6 tcp to a backend address",
            Spec::tcp("fd00::2", "fd00::1", 40022, 8443, TCP_ACK).payload(&big),
            Some(("fd00::9", 9002)),
        ),
        (
            "ipv6 udp to a backend address",
            Spec::udp("fd00::2", "fd00::1", 40023, 8443).payload(b"dgram"),
            Some(("fd00::9", 9002)),
        ),
    ];
    let mut bytes = 0;
    for (name, spec, to) in &cases {
        let input = spec.build();
        let want = match to {
            Some((addr, port)) => spec.clone().with_dst(addr, *port).build(),
            None => {
                let svc = if spec.dst.is_ipv6() { web6 } else { web };
                spec.clone().with_dport(table_port(&w, svc, &input)).build()
            }
        };
        let (verdict, out) = tc(&w, &input);
        assert_eq!(verdict, TC_ACT_OK, "{name}: verdict");
        assert_eq!(hex(&out), hex(&want), "{name}: frame (got, expected)");
        packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (action, xdp_out) = xdp(&twin, &input);
        assert_eq!(action, XDP_PASS, "{name}: lb_xdp's action");
        assert_eq!(hex(&out), hex(&xdp_out), "{name}: TC and XDP rewrite alike");
        bytes += input.len() as u64;
    }

    // Counted as lb_xdp counts: every packet forwarded, as passed.
    let dp = w.dataplane();
    let mut c = lb_common::Counters::default();
    for s in &svcs {
        c.add(&dp.service_counters(w.service_id(&s.name).unwrap()).unwrap());
    }
    assert_eq!(c.packets, cases.len() as u64);
    assert_eq!(c.bytes, bytes);
    let actions = dp.action_counts().unwrap();
    assert_eq!(actions[XDP_PASS as usize], cases.len() as u64);
    assert_eq!(reasons(&w).iter().sum::<u64>(), 0);
}

#[test]
fn non_service_and_truncated_frames_pass_untouched() {
    let svcs = services();
    let w = writer(&svcs);
    let non_service = [
        (
            "tcp to another port",
            Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 80, TCP_SYN).build(),
            Reason::NoService,
        ),
        (
            "udp to another address's 8443",
            Spec::udp("10.0.0.2", "10.0.0.7", 40000, 8443).build(),
            Reason::NoService,
        ),
        (
            "ipv6 tcp to another port",
            Spec::tcp("fd00::2", "fd00::1", 40000, 22, TCP_SYN).build(),
            Reason::NoService,
        ),
        ("arp", packet::arp(), Reason::NotIp),
        (
            "icmp echo",
            Spec::new("10.0.0.2", "10.0.0.1", packet::L4::Icmp).build(),
            Reason::NotTcpUdp,
        ),
    ];
    for (name, frame, reason) in &non_service {
        let before = reasons(&w)[*reason as usize];
        let (verdict, out) = tc(&w, frame);
        assert_eq!(verdict, TC_ACT_OK, "{name}");
        assert_eq!(hex(&out), hex(frame), "{name}: untouched");
        assert_eq!(
            reasons(&w)[*reason as usize],
            before + 1,
            "{name}: {reason:?}"
        );
    }

    // Cut anywhere inside the headers, or the IP length past the frame's
    // end: up the stack untouched, counted `truncated`.
    let full = Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN)
        .payload(b"0123456789abcdef")
        .build();
    let full6 = Spec::udp("fd00::2", "fd00::1", 40000, 443)
        .payload(b"0123456789")
        .build();
    let mut truncated = 0;
    for base in [&full, &full6] {
        for len in 14..base.len() {
            let frame = &base[..len];
            let (verdict, out) = match w.dataplane().test_run_tc_ingress(frame) {
                Ok(r) => r,
                // The kernel builds no socket buffer for an IP frame shorter
                // than its IP header; the stack drops such frames first.
                Err(_) if len < 14 + if base == &full { 20 } else { 40 } => continue,
                Err(e) => panic!("length {len}: {e}"),
            };
            assert_eq!(verdict, TC_ACT_OK, "length {len}");
            assert_eq!(hex(&out), hex(frame), "length {len}: untouched");
            truncated += 1;
        }
    }
    assert_eq!(reasons(&w)[Reason::Truncated as usize], truncated);
    for s in &svcs {
        let id = w.service_id(&s.name).unwrap();
        assert_eq!(w.dataplane().service_counters(id).unwrap().packets, 0);
    }
}

#[test]
fn later_fragments_follow_their_first() {
    let svcs = services();
    let w = writer(&svcs);
    let (web, web6, api, api6) = (&svcs[0], &svcs[1], &svcs[2], &svcs[3]);

    for (i, (src, dst, svc)) in [("10.0.0.2", "10.0.0.1", web), ("fd00::2", "fd00::1", web6)]
        .into_iter()
        .enumerate()
    {
        let [first, a, b] = packet::udp_fragments(src, dst, 41000, 443, 0x100 + i as u32);
        let input = first.build();
        let port = table_port(&w, svc, &input);
        let (verdict, out) = tc(&w, &input);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(hex(&out), hex(&first.clone().with_dport(port).build()));
        // Same address: nothing to change in a later fragment.
        for later in [a, b] {
            let f = later.build();
            assert_eq!(tc(&w, &f), (TC_ACT_OK, f.clone()), "{}", svc.name);
        }
        let id = w.service_id(&svc.name).unwrap();
        assert_eq!(w.dataplane().service_counters(id).unwrap().packets, 3);
    }
    for (svc, src, dst, be, be_port) in [
        (api, "10.0.0.2", "10.0.0.1", "10.0.0.9", 9001),
        (api6, "fd00::2", "fd00::1", "fd00::9", 9002),
    ] {
        let [first, a, b] = packet::udp_fragments(src, dst, 42000, 8443, 0x77);
        // A later fragment before its first: untouched, `fragment_unknown`.
        let early = a.build();
        assert_eq!(tc(&w, &early), (TC_ACT_OK, early.clone()), "{}", svc.name);
        let (verdict, out) = tc(&w, &first.build());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(hex(&out), hex(&first.clone().with_dst(be, be_port).build()));
        for later in [a, b] {
            let f = later.build();
            let want = packet::with_dst_addr(&f, be.parse().unwrap());
            let (verdict, out) = tc(&w, &f);
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(hex(&out), hex(&want), "{}: later fragment", svc.name);
        }
    }
    assert_eq!(reasons(&w)[Reason::FragmentUnknown as usize], 2);
    assert_eq!(reasons(&w).iter().sum::<u64>(), 2);
}

#[test]
fn an_icmp_error_about_a_flow_reaches_its_backend_as_in_xdp() {
    let svcs = services();
    let (w, twin) = (writer(&svcs), writer(&svcs));
    let big = vec![0x5a; 1400];
    let reply = Spec::tcp("10.0.0.1", "10.0.0.2", 8443, 40000, TCP_ACK).payload(&big);
    let reply6 = Spec::udp("fd00::1", "fd00::2", 443, 40001).payload(b"udp reply");
    for (name, err) in [
        (
            "ipv4 frag needed, backend address",
            Spec::icmp_error("10.0.5.1", "10.0.0.1", (3, 4, 1300), &reply, 548),
        ),
        (
            "ipv6 port unreachable",
            Spec::icmp_error("fd00::2", "fd00::1", (1, 4, 0), &reply6, 100),
        ),
    ] {
        let input = err.build();
        let (verdict, out) = tc(&w, &input);
        let (action, want) = xdp(&twin, &input);
        assert_eq!((verdict, action), (TC_ACT_OK, XDP_PASS), "{name}");
        assert_ne!(hex(&want), hex(&input), "{name}: lb_xdp rewrote the quote");
        assert_eq!(hex(&out), hex(&want), "{name}: same rewrite as lb_xdp");
    }
    assert_eq!(reasons(&w).iter().sum::<u64>(), 0);
}

/// `nat`/`dsr` services never run in TC mode (the daemon refuses them); if
/// one is in the maps anyway, its packets are dropped, not passed to the
/// service address on this host.
#[test]
fn a_nat_service_packet_is_dropped_in_tc_mode() {
    let nat = lb_tests::fixtures::forwarded_service(
        "far",
        "10.0.0.1:443",
        Forwarding::Nat,
        &["10.9.0.2:8443"],
    );
    let w = writer(&[nat]);
    let f = Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN).build();
    assert_eq!(tc(&w, &f), (TC_ACT_SHOT, f.clone()));
    let drops = w.dataplane().drop_counts().unwrap();
    assert_eq!(drops[Reason::NoBackend as usize], 1);
    assert_eq!(w.dataplane().action_counts().unwrap()[XDP_DROP as usize], 1);
}
