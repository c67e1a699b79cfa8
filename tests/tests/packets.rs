//! Packet fixtures through `BPF_PROG_TEST_RUN` on the real eBPF object: these
//! bytes in, this action and these bytes out. Expected frames are built from
//! scratch with full checksums, so equality also proves the program's
//! incremental checksum updates.
use std::collections::HashMap;

use lb_common::{FlowHash, REASON_NAMES, Reason};
use lb_tests::fixtures::{
    age_table, backend_port, client_flows, five_backends, flow_key, hex, options, restamp_table,
    service, slot_by, slot_of, writer,
};
use lb_tests::packet::{self, Spec, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN};
use lb_userspace::dataplane::{
    AdminState, BackendSpec, Dataplane, Family, MapWriter, Options, ServiceSpec,
};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

fn run(dp: &Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    dp.test_run_xdp(frame).expect("BPF_PROG_TEST_RUN")
}

/// The backend port the active Maglev table names for a frame's flow.
fn table_port(w: &MapWriter, svc: &ServiceSpec, frame: &[u8]) -> u16 {
    let p = packet::parse(frame).unwrap();
    let slot = slot_of(w, svc, (p.src, p.dst), (p.sport, p.dport), p.proto);
    backend_port(w, svc, slot.backend)
}

/// One fixture: bytes in, action and bytes out.
struct Fixture {
    name: String,
    input: Vec<u8>,
    action: u32,
    output: Vec<u8>,
}

fn check(dp: &Dataplane, fixtures: &[Fixture]) {
    for f in fixtures {
        let (action, out) = run(dp, &f.input);
        assert_eq!(action, f.action, "{}: action", f.name);
        assert_eq!(
            hex(&out),
            hex(&f.output),
            "{}: output bytes (got, expected)",
            f.name
        );
    }
}

fn reason(dp: &Dataplane, r: Reason) -> u64 {
    dp.reason_counts().unwrap()[r as usize]
}

#[test]
fn service_packets_are_rewritten_to_the_picked_backend() {
    // Wildcards are per family: IPv4 packets take `web`, IPv6 ones `web6`.
    let svc = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let svc6 = service("web6", "[::]:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let mut w = writer(&[svc.clone(), svc6.clone()]);
    let dp = w.dataplane();

    let mut v4_opts = Spec::tcp("10.0.0.2", "10.0.0.1", 40001, 443, TCP_SYN);
    v4_opts.ip_options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert, NOPs, end
    let mut vlan = Spec::tcp("10.0.0.2", "10.0.0.1", 40002, 443, TCP_SYN);
    vlan.vlan = Some(100);
    let mut v6_ext = Spec::tcp("fd00::2", "fd00::1", 40003, 443, TCP_SYN);
    v6_ext.ext_headers = vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])];
    let mut udp_zero = Spec::udp("10.0.0.2", "10.0.0.1", 40004, 443).payload(b"quic?");
    udp_zero.udp_zero_checksum = true;
    let mut v4_first_frag = Spec::udp("10.0.0.2", "10.0.0.1", 40005, 443).payload(&[7; 64]);
    v4_first_frag.fragment = Some((0, true));
    let mut v6_first_frag = Spec::udp("fd00::2", "fd00::1", 40006, 443).payload(&[7; 64]);
    v6_first_frag.fragment = Some((0, true));

    let specs = vec![
        (
            "ipv4 tcp syn",
            Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN),
        ),
        (
            "ipv6 tcp syn",
            Spec::tcp("fd00::2", "fd00::1", 40000, 443, TCP_SYN),
        ),
        (
            "ipv4 tcp data",
            Spec::tcp("10.0.0.2", "10.0.0.1", 40010, 443, TCP_ACK | TCP_PSH).payload(b"GET /"),
        ),
        (
            "ipv4 udp",
            Spec::udp("10.0.0.2", "10.0.0.1", 40000, 443).payload(b"hello"),
        ),
        (
            "ipv6 udp",
            Spec::udp("fd00::2", "fd00::1", 40000, 443).payload(b"hello"),
        ),
        ("ipv4 udp without checksum", udp_zero),
        ("ipv4 options", v4_opts),
        ("vlan tag", vlan),
        ("ipv6 extension headers", v6_ext),
        ("ipv4 first fragment", v4_first_frag),
        ("ipv6 first fragment", v6_first_frag),
    ];
    let mut fixtures = Vec::new();
    let mut ports = HashMap::new();
    for (name, spec) in &specs {
        let input = spec.build();
        let family = if packet::parse(&input).unwrap().dst.is_ipv6() {
            &svc6
        } else {
            &svc
        };
        let port = table_port(&w, family, &input);
        *ports.entry((family.name.clone(), port)).or_insert(0) += 1;
        fixtures.push(Fixture {
            name: name.to_string(),
            output: spec.clone().with_dport(port).build(),
            input,
            action: XDP_PASS,
        });
    }
    check(dp, &fixtures);
    for f in &fixtures {
        let (_, out) = run(dp, &f.input);
        packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{}: {e}", f.name));
    }

    // Every fixture ran twice; the counters say exactly that.
    let runs = 2 * fixtures.len() as u64;
    let bytes: u64 = 2 * fixtures.iter().map(|f| f.input.len() as u64).sum::<u64>();
    let mut c = lb_common::Counters::default();
    for name in ["web", "web6"] {
        let sc = dp.service_counters(w.service_id(name).unwrap()).unwrap();
        assert!(sc.packets > 0, "{name} took no packet");
        c.add(&sc);
    }
    assert_eq!(c.packets, runs);
    assert_eq!(c.bytes, bytes);
    // Each SYN counts as a new flow (5 ran twice); each UDP flow counts once
    // (ipv4, ipv6, without checksum and two first fragments: 5).
    assert_eq!(c.new_flows, 2 * 5 + 5);
    let mut per_backend = 0;
    for s in [&svc, &svc6] {
        for b in &s.backends {
            let bc = dp
                .backend_counters(w.backend_id(&s.name, b.address).unwrap())
                .unwrap();
            let key = (s.name.clone(), b.address.port());
            assert_eq!(bc.packets, 2 * ports.get(&key).copied().unwrap_or(0));
            per_backend += bc.packets;
        }
    }
    assert_eq!(per_backend, runs);
    assert_eq!(dp.action_counts().unwrap()[XDP_PASS as usize], runs);
    assert_eq!(dp.reason_counts().unwrap().iter().sum::<u64>(), 0);
    // Nothing in a table that never changed needs the flow table.
    assert_eq!(dp.flow_count(), 0);
    // What the writer does to an id it hands to a new backend: its counters
    // read zero on every CPU; the other backends keep theirs.
    let [a, b] = [0, 1].map(|i| w.backend_id(&svc.name, svc.backends[i].address).unwrap());
    let (first, second) = if dp.backend_counters(a).unwrap().packets > 0 {
        (a, b)
    } else {
        (b, a)
    };
    let kept = dp.backend_counters(second).unwrap();
    assert!(dp.backend_counters(first).unwrap().packets > 0);
    w.dataplane_mut().reset_backend_counters(first).unwrap();
    let dp = w.dataplane();
    assert_eq!(
        dp.backend_counters(first).unwrap(),
        lb_common::Counters::default()
    );
    assert_eq!(dp.backend_counters(second).unwrap(), kept);
}

#[test]
fn each_wildcard_serves_its_own_family() {
    // `0.0.0.0:443` and `[::]:443` side by side: IPv4 clients reach only the
    // IPv4 service's backends, IPv6 clients only the IPv6 service's.
    let v4 = service("web4", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let v6 = service("web6", "[::]:443", &["[::1]:9001", "[::1]:9002"]);
    let w = writer(&[v4.clone(), v6.clone()]);
    let dp = w.dataplane();
    let mut fixtures = Vec::new();
    let mut seen: HashMap<u16, u32> = HashMap::new();
    for i in 0..64u16 {
        let specs = [
            (
                &v4,
                Spec::tcp(
                    &format!("10.1.0.{}", i + 1),
                    "10.0.0.1",
                    30000 + i,
                    443,
                    TCP_SYN,
                ),
            ),
            (
                &v4,
                Spec::udp(&format!("10.1.1.{}", i + 1), "10.0.0.1", 30000 + i, 443).payload(b"q"),
            ),
            (
                &v6,
                Spec::tcp(
                    &format!("fd00:1::{:x}", i + 1),
                    "fd00::1",
                    30000 + i,
                    443,
                    TCP_SYN,
                ),
            ),
            (
                &v6,
                Spec::udp(&format!("fd00:2::{:x}", i + 1), "fd00::1", 30000 + i, 443).payload(b"q"),
            ),
        ];
        for (svc, spec) in specs {
            let input = spec.build();
            let port = table_port(&w, svc, &input);
            *seen.entry(port).or_default() += 1;
            fixtures.push(Fixture {
                name: format!("{} flow {i} to {}", svc.name, port),
                output: spec.clone().with_dport(port).build(),
                input,
                action: XDP_PASS,
            });
        }
    }
    check(dp, &fixtures);
    // 128 packets a family, each family spread over its own two backends.
    assert_eq!(seen.values().sum::<u32>(), 256);
    assert_eq!(seen.get(&8001).unwrap() + seen.get(&8002).unwrap(), 128);
    assert_eq!(seen.get(&9001).unwrap() + seen.get(&9002).unwrap(), 128);
    for name in ["web4", "web6"] {
        let c = dp.service_counters(w.service_id(name).unwrap()).unwrap();
        assert_eq!(c.packets, 128, "{name}");
    }
    assert_eq!(dp.reason_counts().unwrap().iter().sum::<u64>(), 0);
}

/// Services on addresses of their own are found through `LB_ADDR_SLOTS`:
/// one alone in its slot by the array alone, two whose keys share a slot
/// through the hash map behind it. A restarted daemon adopts the slots with
/// the pins, and removing one of the two leaves the other found, now alone
/// in the slot.
#[test]
fn address_services_sharing_a_slot_each_find_their_own() {
    let (_bpf, _dir, opts) = pinned_options("addrslots");
    let key = |a: &str| lb_common::AddrKey {
        addr: lb_userspace::dataplane::addr_words(a.parse().unwrap()),
        port: 443,
        proto: lb_common::PROTO_TCP,
        _pad: 0,
    };
    // Two addresses of 10.0.x.y whose keys share a slot, by search.
    let mut by_slot: HashMap<u32, String> = HashMap::new();
    let (a, b) = (0..=255u32)
        .flat_map(|x| (1..=254u32).map(move |y| format!("10.0.{x}.{y}")))
        .find_map(|addr| {
            by_slot
                .insert(lb_common::addr_slot(&key(&addr)), addr.clone())
                .map(|other| (other, addr))
        })
        .unwrap();
    let c = (1..=254u32)
        .map(|y| format!("10.9.0.{y}"))
        .find(|c| !by_slot.contains_key(&lb_common::addr_slot(&key(c))))
        .unwrap();
    let svc =
        |name: &str, addr: &str, backend: &str| service(name, &format!("{addr}:443"), &[backend]);
    let services = vec![
        svc("a", &a, "127.0.0.1:8001"),
        svc("b", &b, "127.0.0.1:8002"),
        svc("c", &c, "127.0.0.1:8003"),
    ];
    let mut w = MapWriter::new(Dataplane::load(opts.clone()).unwrap());
    w.apply(&services).unwrap();
    let syn = |to: &str| Spec::tcp("10.1.0.2", to, 40000, 443, TCP_SYN);
    let to = |w: &MapWriter, addr: &str| {
        let (action, out) = run(w.dataplane(), &syn(addr).build());
        assert_eq!(action, XDP_PASS, "{addr}");
        packet::parse(&out).unwrap().dport
    };
    assert_eq!(
        [to(&w, &a), to(&w, &b), to(&w, &c)],
        [8001, 8002, 8003],
        "{a} and {b} share a slot, {c} has its own"
    );
    let slot = |w: &MapWriter, addr: &str| {
        let s = lb_common::addr_slot(&key(addr));
        let slots = w.dataplane().addr_slots().unwrap();
        slots.into_iter().find(|(i, _)| *i == s).map(|(_, e)| e)
    };
    assert_eq!(
        slot(&w, &a).map(|e| e.service),
        Some(lb_common::ADDR_SLOT_SHARED)
    );
    // The slot of `addr` holds its key alone, with service `name`.
    let alone = |w: &MapWriter, name: &str, addr: &str| {
        let service = w.service_id(name).unwrap() + 1;
        let want = lb_common::AddrSlot {
            key: key(addr),
            service,
        };
        assert_eq!(slot(w, addr), Some(want), "{addr} alone in its slot");
    };
    alone(&w, "c", &c);
    // Another address on the port, served by nobody: passed untouched.
    let frame = syn("10.9.9.9").build();
    assert_eq!(run(w.dataplane(), &frame), (XDP_PASS, frame.clone()));

    // A restart: the next daemon adopts the pinned slots as they are.
    let slots = w.dataplane().addr_slots().unwrap();
    w.dataplane_mut().shutdown(true);
    drop(w);
    let mut w = MapWriter::new(Dataplane::load(opts).unwrap());
    assert_eq!(w.dataplane().addr_slots().unwrap(), slots);
    w.apply(&services).unwrap();
    assert_eq!(w.dataplane().addr_slots().unwrap(), slots);
    assert_eq!(
        [to(&w, &a), to(&w, &b), to(&w, &c)],
        [8001, 8002, 8003],
        "after the restart"
    );

    w.apply(&services[1..]).unwrap();
    let frame = syn(&a).build();
    assert_eq!(
        run(w.dataplane(), &frame),
        (XDP_PASS, frame.clone()),
        "{a} after its service left"
    );
    assert_eq!([to(&w, &b), to(&w, &c)], [8002, 8003]);
    alone(&w, "b", &b);
    w.apply(&[]).unwrap();
    assert_eq!(w.dataplane().addr_slots().unwrap(), vec![]);
}

#[test]
fn a_wildcard_of_one_family_leaves_the_other_alone() {
    for (listen, other) in [
        (
            "0.0.0.0:443",
            [("fd00::2", "fd00::1"), ("fd00::3", "fd00::1")],
        ),
        (
            "[::]:443",
            [("10.0.0.2", "10.0.0.1"), ("10.0.0.3", "10.0.0.1")],
        ),
    ] {
        let w = writer(&[service("web", listen, &["127.0.0.1:8001"])]);
        let dp = w.dataplane();
        let fixtures: Vec<Fixture> = [
            Spec::tcp(other[0].0, other[0].1, 40000, 443, TCP_SYN),
            Spec::udp(other[1].0, other[1].1, 40001, 443).payload(b"hello"),
        ]
        .iter()
        .map(|spec| Fixture {
            name: format!("{listen}: {:?} to 443", spec.build().len()),
            input: spec.build(),
            action: XDP_PASS,
            output: spec.build(),
        })
        .collect();
        check(dp, &fixtures);
        assert_eq!(reason(dp, Reason::NoService), 2, "{listen}");
        assert_eq!(dp.service_counters(0).unwrap().packets, 0, "{listen}");
    }
}

#[test]
fn non_service_packets_pass_untouched() {
    let svc = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let w = writer(&[svc]);
    let dp = w.dataplane();

    let mut v4_frag = Spec::udp("10.0.0.2", "10.0.0.1", 40000, 443).payload(&[1; 32]);
    v4_frag.fragment = Some((8, false));
    let mut v6_frag = Spec::udp("fd00::2", "fd00::1", 40000, 443).payload(&[1; 32]);
    v6_frag.fragment = Some((8, true));
    let mut too_many_ext = Spec::tcp("fd00::2", "fd00::1", 40000, 443, TCP_SYN);
    too_many_ext.ext_headers = (0..5).map(|_| (60, vec![1, 4, 0, 0, 0, 0])).collect();
    let mut bad_version = Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN).build();
    bad_version[14] = 0x55;
    let mut bad_ihl = Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN).build();
    bad_ihl[14] = 0x44;
    let mut bad_doff = Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN).build();
    bad_doff[14 + 20 + 12] = 0x40;

    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "tcp to port 80",
            Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 80, TCP_SYN).build(),
            Reason::NoService,
        ),
        (
            "udp to port 53",
            Spec::udp("fd00::2", "fd00::1", 40000, 53).build(),
            Reason::NoService,
        ),
        (
            "tcp from port 443",
            Spec::tcp("10.0.0.2", "10.0.0.1", 443, 40000, TCP_SYN | TCP_ACK).build(),
            Reason::NoService,
        ),
        ("arp", packet::arp(), Reason::NotIp),
        (
            "icmp echo",
            Spec::new("10.0.0.2", "10.0.0.1", packet::L4::Icmp).build(),
            Reason::NotTcpUdp,
        ),
        (
            "icmpv6 echo",
            Spec::new("fd00::2", "fd00::1", packet::L4::Icmp).build(),
            Reason::NotTcpUdp,
        ),
        (
            "ipv4 later fragment",
            v4_frag.build(),
            Reason::FragmentUnknown,
        ),
        (
            "ipv6 later fragment",
            v6_frag.build(),
            Reason::FragmentUnknown,
        ),
        (
            "five ipv6 extension headers",
            too_many_ext.build(),
            Reason::ExtHeaders,
        ),
        ("ip version 5", bad_version, Reason::BadHeader),
        ("ihl 4", bad_ihl, Reason::BadHeader),
        ("tcp data offset 4", bad_doff, Reason::BadHeader),
    ];
    let fixtures: Vec<Fixture> = cases
        .iter()
        .map(|(name, input, _)| Fixture {
            name: name.to_string(),
            input: input.clone(),
            action: XDP_PASS,
            output: input.clone(),
        })
        .collect();
    check(dp, &fixtures);
    let counts = dp.reason_counts().unwrap();
    for (i, name) in REASON_NAMES.iter().enumerate() {
        let expected = cases.iter().filter(|c| c.2 as usize == i).count() as u64;
        assert_eq!(counts[i], expected, "reason {name}");
    }
    assert_eq!(dp.service_counters(0).unwrap().packets, 0);
}

#[test]
fn truncated_frames_pass_untouched() {
    let svc = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let w = writer(&[svc]);
    let dp = w.dataplane();
    let mut v6 = Spec::udp("fd00::2", "fd00::1", 40000, 443).payload(b"0123456789");
    v6.ext_headers = vec![(0, vec![1, 4, 0, 0, 0, 0])];
    let mut vlan = Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN).payload(b"abcdef");
    vlan.vlan = Some(7);
    let bases = [
        Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 443, TCP_SYN)
            .payload(b"0123456789abcdef0123456789"),
        v6,
        vlan,
    ];
    let mut truncated = 0;
    for base in &bases {
        let full = base.build();
        for len in 0..=80usize.min(full.len() - 1) {
            let frame = &full[..len];
            match dp.test_run_xdp(frame) {
                // The kernel runs no XDP program on a frame shorter than an
                // Ethernet header; drivers drop such runts before XDP too.
                Err(_) if len < 14 => continue,
                Err(e) => panic!("length {len}: {e}"),
                Ok(_) if len < 14 => panic!("length {len}: the kernel ran a runt frame"),
                Ok((action, out)) => {
                    assert_eq!(action, XDP_PASS, "length {len}");
                    assert_eq!(out, frame, "length {len}: frame changed");
                    truncated += 1;
                }
            }
        }
    }
    assert_eq!(reason(dp, Reason::Truncated), truncated);
    assert_eq!(dp.service_counters(0).unwrap().packets, 0);
}

#[test]
fn replies_from_backends_leave_as_the_service() {
    // Wildcards are per family; one backend each, so every flow of the
    // forward direction maps to it and its replies are translated.
    let any = service("web", "0.0.0.0:443", &["127.0.0.1:8001"]);
    let any6 = service("web6", "[::]:443", &["[::1]:8002"]);
    let specific = service("api", "10.0.0.1:8443", &["10.0.0.9:9001"]);
    let specific6 = service("api6", "[fd00::1]:8443", &["[fd00::9]:9002"]);
    let w = writer(&[any, any6, specific, specific6]);
    let dp = w.dataplane();

    // Forward: a specific service's backend with its own address gets the
    // address rewritten too.
    let fwd = Spec::tcp("10.0.0.2", "10.0.0.1", 40000, 8443, TCP_SYN);
    let mut want = Spec::tcp("10.0.0.2", "10.0.0.9", 40000, 9001, TCP_SYN).build();
    let (action, out) = run(dp, &fwd.build());
    assert_eq!(action, XDP_PASS);
    assert_eq!(hex(&out), hex(&want), "ipv4 address rewrite");
    let fwd6 = Spec::udp("fd00::2", "fd00::1", 40000, 8443).payload(b"x");
    want = Spec::udp("fd00::2", "fd00::9", 40000, 9002)
        .payload(b"x")
        .build();
    let (_, out) = run(dp, &fwd6.build());
    assert_eq!(hex(&out), hex(&want), "ipv6 address rewrite");

    let cases = [
        (
            "tcp from a wildcard service's backend",
            Spec::tcp("10.0.0.1", "10.0.0.2", 8001, 40000, TCP_SYN | TCP_ACK),
            Spec::tcp("10.0.0.1", "10.0.0.2", 443, 40000, TCP_SYN | TCP_ACK),
        ),
        (
            "udp over ipv6 from a wildcard service's backend",
            Spec::udp("fd00::1", "fd00::2", 8002, 40000).payload(b"reply"),
            Spec::udp("fd00::1", "fd00::2", 443, 40000).payload(b"reply"),
        ),
        (
            "tcp from a backend with its own address",
            Spec::tcp("10.0.0.9", "10.0.0.2", 9001, 40000, TCP_ACK).payload(b"data"),
            Spec::tcp("10.0.0.1", "10.0.0.2", 8443, 40000, TCP_ACK).payload(b"data"),
        ),
        (
            "udp over ipv6 from a backend with its own address",
            Spec::udp("fd00::9", "fd00::2", 9002, 40000).payload(b"data"),
            Spec::udp("fd00::1", "fd00::2", 8443, 40000).payload(b"data"),
        ),
        (
            "not from a backend port",
            Spec::tcp("10.0.0.1", "10.0.0.2", 22, 40000, TCP_ACK),
            Spec::tcp("10.0.0.1", "10.0.0.2", 22, 40000, TCP_ACK),
        ),
    ];
    for (name, input, expected) in cases {
        let (action, out) = dp.test_run_tc(&input.build()).expect("tc test run");
        assert_eq!(action, TC_ACT_OK, "{name}");
        assert_eq!(hex(&out), hex(&expected.build()), "{name}");
        packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

fn backend_packets(w: &MapWriter, svc: &ServiceSpec, port: u16) -> u64 {
    let b = svc
        .backends
        .iter()
        .find(|b| b.address.port() == port)
        .expect("a backend of the service");
    let id = w.backend_id(&svc.name, b.address).unwrap();
    w.dataplane().backend_counters(id).unwrap().packets
}

#[test]
fn later_fragments_follow_their_first_in_local_mode() {
    // Wildcards are per family: one service for each.
    let web = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let web6 = service("web6", "[::]:443", &["[::1]:8001", "[::1]:8002"]);
    let api = service("api", "10.0.0.1:8443", &["10.0.0.9:9001"]);
    let api6 = service("api6", "[fd00::1]:8443", &["[fd00::9]:9002"]);
    let w = writer(&[web.clone(), web6.clone(), api.clone(), api6.clone()]);
    let dp = w.dataplane();

    // Backends that differ from the service in port only: a later fragment
    // has nothing to rewrite, and goes up counted for its first's backend.
    let mut sent: HashMap<(bool, u16), u64> = HashMap::new();
    for i in 0..16u16 {
        let (src, dst, svc) = if i % 2 == 0 {
            ("10.0.0.2", "10.0.0.1", &web)
        } else {
            ("fd00::2", "fd00::1", &web6)
        };
        let [first, a, b] = packet::udp_fragments(src, dst, 41000 + i, 443, 0x100 + i as u32);
        let input = first.build();
        let port = table_port(&w, svc, &input);
        let (action, out) = run(dp, &input);
        assert_eq!(action, XDP_PASS, "datagram {i}: first fragment");
        assert_eq!(
            hex(&out),
            hex(&first.clone().with_dport(port).build()),
            "datagram {i}: first fragment"
        );
        for (n, later) in [a, b].iter().enumerate() {
            let f = later.build();
            let (action, out) = run(dp, &f);
            assert_eq!(action, XDP_PASS, "datagram {i}: fragment {}", n + 1);
            assert_eq!(hex(&out), hex(&f), "datagram {i}: fragment {}", n + 1);
        }
        *sent.entry((i % 2 == 1, port)).or_default() += 3;
    }
    for (v6, svc) in [(false, &web), (true, &web6)] {
        for port in [8001, 8002] {
            let got = backend_packets(&w, svc, port);
            let want = sent.get(&(v6, port)).copied().unwrap_or(0);
            assert_eq!(
                got, want,
                "{} {port}: every fragment of its datagrams",
                svc.name
            );
        }
        let total: u64 = [8001, 8002]
            .iter()
            .map(|p| backend_packets(&w, svc, *p))
            .sum();
        assert!(total > 0, "{} got no datagram", svc.name);
    }
    println!("16 datagrams of 3 fragments by backend port: {sent:?}");

    // Backends with an address of their own: the later fragments get the
    // address (and for IPv4 a right header checksum), never the port.
    for (svc, src, dst, be, be_port) in [
        (&api, "10.0.0.2", "10.0.0.1", "10.0.0.9", 9001),
        (&api6, "fd00::2", "fd00::1", "fd00::9", 9002),
    ] {
        let [first, a, b] = packet::udp_fragments(src, dst, 42000, 8443, 0x77);
        let (action, out) = run(dp, &first.build());
        assert_eq!(action, XDP_PASS);
        let want = first.clone().with_dst(be, be_port).build();
        assert_eq!(hex(&out), hex(&want), "{}: first fragment", svc.name);
        packet::verify_checksums(&out).unwrap();
        for later in [a, b] {
            let f = later.build();
            let (action, out) = run(dp, &f);
            assert_eq!(action, XDP_PASS);
            let want = packet::with_dst_addr(&f, be.parse().unwrap());
            assert_eq!(hex(&out), hex(&want), "{}: later fragment", svc.name);
        }
        assert_eq!(backend_packets(&w, svc, be_port), 3, "{}", svc.name);
    }
    assert_eq!(dp.reason_counts().unwrap().iter().sum::<u64>(), 0);

    // Out of order: a later fragment before its first goes up untouched,
    // counted; once the first is balanced, the same fragment follows it.
    let [first, a, _] = packet::udp_fragments("10.0.0.3", "10.0.0.1", 43000, 8443, 0x9999);
    let f = a.build();
    let (action, out) = run(dp, &f);
    assert_eq!((action, hex(&out)), (XDP_PASS, hex(&f)), "before its first");
    assert_eq!(reason(dp, Reason::FragmentUnknown), 1);
    assert_eq!(backend_packets(&w, &api, 9001), 3);
    run(dp, &first.build());
    let (_, out) = run(dp, &f);
    assert_eq!(
        hex(&out),
        hex(&packet::with_dst_addr(&f, "10.0.0.9".parse().unwrap())),
        "after its first"
    );
    assert_eq!(backend_packets(&w, &api, 9001), 5);
    // Another datagram between the same hosts, and an IPv6 one, never seen.
    let [_, other, _] = packet::udp_fragments("10.0.0.3", "10.0.0.1", 43000, 8443, 0x999a);
    let [_, other6, _] = packet::udp_fragments("fd00::3", "fd00::1", 43000, 8443, 0x1234_5678);
    for f in [other.build(), other6.build()] {
        let (action, out) = run(dp, &f);
        assert_eq!((action, hex(&out)), (XDP_PASS, hex(&f)));
    }
    assert_eq!(reason(dp, Reason::FragmentUnknown), 3);
    assert_eq!(dp.reason_counts().unwrap().iter().sum::<u64>(), 3);
    assert_eq!(dp.drop_counts().unwrap().iter().sum::<u64>(), 0);
}

/// Sends `flows` packets with `flags` and returns the backend port each went to.
fn send(dp: &Dataplane, flows: &[Spec], flags: u8) -> Vec<u16> {
    flows
        .iter()
        .map(|f| {
            let (action, out) = run(dp, &f.clone().with_flags(flags).build());
            assert_eq!(action, XDP_PASS);
            packet::verify_checksums(&out).unwrap();
            packet::parse(&out).unwrap().dport
        })
        .collect()
}

#[test]
fn flows_keep_their_backend_when_the_table_changes() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let flows = client_flows(3000);
    let first = send(w.dataplane(), &flows, TCP_SYN);
    assert_eq!(send(w.dataplane(), &flows, TCP_ACK), first);
    for p in 8001..=8005 {
        assert!(first.contains(&p), "backend {p} got no flow");
    }
    assert_eq!(w.dataplane().flow_count(), 0);

    // Remove a neighbour of every backend: 8003.
    svc.backends.retain(|b| b.address.port() != 8003);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let after = send(w.dataplane(), &flows, TCP_ACK);
    let mut moved = 0;
    for (i, (a, b)) in first.iter().zip(&after).enumerate() {
        if *a == 8003 {
            assert_ne!(*b, 8003, "flow {i} still goes to the removed backend");
            moved += 1;
        } else {
            assert_eq!(a, b, "flow {i} changed backend");
        }
    }
    assert!(moved > 0);
    // Only flows in slots that changed were pinned.
    let pinned = w.dataplane().flow_count();
    assert!(
        pinned >= moved && pinned < flows.len(),
        "pinned {pinned}, moved {moved}"
    );

    // Add a backend: flows that sent packets since stay put, new flows follow
    // the new table.
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let again = send(w.dataplane(), &flows, TCP_ACK);
    assert_eq!(
        again, after,
        "established flows moved when a backend was added"
    );
    let fresh: Vec<Spec> = flows
        .iter()
        .map(|f| f.clone().with_sport(f.sport() + 10000))
        .collect();
    let fresh_ports = send(w.dataplane(), &fresh, TCP_SYN);
    for (f, port) in fresh.iter().zip(&fresh_ports) {
        assert_eq!(
            *port,
            table_port(&w, &svc, &f.build()),
            "a new flow ignored the table"
        );
    }
    assert!(
        fresh_ports.contains(&8006),
        "the new backend takes new flows"
    );
    // And keep going after more changes: weights, draining.
    svc.backends[0].weight = 300;
    svc.backends[1].state = AdminState::Draining;
    w.apply(std::slice::from_ref(&svc)).unwrap();
    assert_eq!(send(w.dataplane(), &flows, TCP_ACK), after);
    assert_eq!(send(w.dataplane(), &fresh, TCP_ACK), fresh_ports);
    let newest: Vec<Spec> = flows
        .iter()
        .map(|f| f.clone().with_sport(f.sport() + 20000))
        .collect();
    let drained = svc.backends[1].address.port();
    assert!(
        !send(w.dataplane(), &newest, TCP_SYN).contains(&drained),
        "a draining backend took a new flow"
    );
}

#[test]
fn flows_on_a_dead_backend_are_repicked() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let flows = client_flows(2000);
    send(w.dataplane(), &flows, TCP_SYN);
    // A change pins established flows in the slots it touched.
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let before = send(w.dataplane(), &flows, TCP_ACK);
    let pinned = w.dataplane().flow_count();
    assert!(pinned > 0);

    // 8002 fails its health checks: its flows go elsewhere, per the table.
    let dead = w.backend_id("web", svc.backends[1].address).unwrap();
    let generation = w.backend_generation(dead);
    svc.backends[1].healthy = false;
    w.apply(std::slice::from_ref(&svc)).unwrap();
    assert_ne!(
        w.backend_generation(dead),
        generation,
        "a backend that goes down gets a new generation, so its pins end"
    );
    let after = send(w.dataplane(), &flows, TCP_ACK);
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if *a == 8002 {
            assert_ne!(*b, 8002, "flow {i} still on the dead backend");
        } else {
            assert_eq!(a, b, "flow {i} moved though its backend lives");
        }
    }
    assert!(before.contains(&8002));
    let stale = w.dataplane().event_counts().unwrap()[lb_common::Event::PinStale as usize];
    assert!(stale > 0, "pins of the dead backend were not seen as stale");
}

/// A RST does not end a pin: an unverified RST may be spoofed, and a flow
/// it unpinned would move on its next packet (for a flow that began after a
/// change, to the slot's previous backend). Pins of closed flows age out.
#[test]
fn a_rst_does_not_unpin_a_flow() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    // Flows that begin after the change, in changed slots, pinned by SYN.
    let flows: Vec<Spec> = client_flows(3000)
        .into_iter()
        .filter(|f| sticky_slot(&w, &svc, f).is_some())
        .collect();
    assert!(flows.len() > 50, "too few flows in changed slots");
    let pinned = send(w.dataplane(), &flows, TCP_SYN);
    let pins = w.dataplane().flow_count();
    send(w.dataplane(), &flows, TCP_RST | TCP_ACK);
    assert_eq!(w.dataplane().flow_count(), pins, "a RST removed pins");
    assert_eq!(
        send(w.dataplane(), &flows, TCP_ACK),
        pinned,
        "flows moved after a (possibly spoofed) RST"
    );
}

/// The flows whose slot in the active table is sticky (changed).
fn in_changed(w: &MapWriter, svc: &ServiceSpec, flows: &[Spec]) -> Vec<Spec> {
    flows
        .iter()
        .filter(|f| sticky_slot(w, svc, f).is_some())
        .cloned()
        .collect()
}

/// The slot of a flow in the active table, if it is sticky (changed).
fn sticky_slot(w: &MapWriter, svc: &ServiceSpec, f: &Spec) -> Option<lb_common::MaglevSlot> {
    let p = packet::parse(&f.build()).unwrap();
    let slot = slot_of(w, svc, (p.src, p.dst), (p.sport, p.dport), p.proto);
    slot.is_sticky().then_some(slot)
}

/// The one edge of keeping no flow entries in unchanged slots, pinned down: a
/// flow that sends nothing while its slot changes twice follows the slot's
/// previous backend, not its original one. A flow that sent a packet
/// between the changes stays.
#[test]
fn a_flow_idle_through_two_changes_of_its_slot_moves() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let flows = client_flows(4000);
    let original = send(w.dataplane(), &flows, TCP_SYN);

    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let mid: Vec<u16> = flows
        .iter()
        .map(|f| table_port(&w, &svc, &f.build()))
        .collect();
    // Half of the flows speak between the changes.
    let talkers: Vec<Spec> = flows.iter().step_by(2).cloned().collect();
    send(w.dataplane(), &talkers, TCP_ACK);

    svc.backends
        .push(BackendSpec::new("127.0.0.1:8007".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let end: Vec<u16> = flows
        .iter()
        .map(|f| table_port(&w, &svc, &f.build()))
        .collect();
    let now = send(w.dataplane(), &flows, TCP_ACK);

    let mut edge = 0;
    for i in 0..flows.len() {
        let twice = original[i] != mid[i] && mid[i] != end[i];
        if i % 2 == 0 {
            assert_eq!(
                now[i], original[i],
                "flow {i} spoke between changes yet moved"
            );
        } else if twice {
            assert_eq!(now[i], mid[i], "flow {i}: idle through two changes");
            edge += 1;
        } else {
            assert_eq!(now[i], original[i], "flow {i} moved");
        }
    }
    assert!(
        edge > 0,
        "no flow saw its slot change twice; the test proves nothing"
    );
}

trait SpecPorts {
    fn sport(&self) -> u16;
}

impl SpecPorts for Spec {
    fn sport(&self) -> u16 {
        match self.l4 {
            packet::L4::Tcp { sport, .. } | packet::L4::Udp { sport, .. } => sport,
            packet::L4::Icmp | packet::L4::IcmpError { .. } => 0,
        }
    }
}

#[test]
fn udp_flows_stick_to_their_backend() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let flows: Vec<Spec> = client_flows(2000)
        .into_iter()
        .map(|f| Spec::udp(&f.src.to_string(), "10.0.0.1", f.sport(), 443).payload(b"q"))
        .collect();
    let first = send(w.dataplane(), &flows, 0);
    assert_eq!(send(w.dataplane(), &flows, 0), first);
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    assert_eq!(
        send(w.dataplane(), &flows, 0),
        first,
        "udp flows moved when a backend was added"
    );
}

/// UDP has no SYN: a flow whose hash the program has not seen is new and
/// takes a changed slot's current backend at once; a flow seen before the
/// change with no pin yet stays on the previous backend within
/// `UDP_AFFINITY_SECS` of the change, and follows the current backend after
/// it (by then a miss is more likely an evicted pin).
#[test]
fn new_udp_flows_reach_an_added_backend_at_once() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let udp = |sport: u16| Spec::udp("10.1.0.1", "10.0.0.1", sport, 443).payload(b"q");
    let known: Vec<Spec> = (30000..34000).map(udp).collect();
    let first = send(w.dataplane(), &known, 0);
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let id = w.service_id("web").unwrap();
    let table: Vec<lb_common::MaglevSlot> = w.dataplane().active_table(id).unwrap().1.to_vec();
    // Flows seen before the change stay where they were.
    assert_eq!(send(w.dataplane(), &known, 0), first);
    // New flows in changed slots take the current backend: the new one.
    let fresh = in_changed(&w, &svc, &(40000..44000).map(udp).collect::<Vec<_>>());
    assert!(fresh.len() > 50, "too few flows in changed slots");
    let ports = send(w.dataplane(), &fresh, 0);
    for (f, port) in fresh.iter().zip(&ports) {
        assert_eq!(
            *port,
            backend_port(&w, &svc, sticky_slot(&w, &svc, f).unwrap().backend)
        );
    }
    assert!(
        ports.contains(&8006),
        "the added backend got no new UDP flow"
    );

    // Known flows silent until the change is older than the window follow
    // the current backend (the documented edge).
    let silent: Vec<Spec> = (50000..54000).map(udp).collect();
    w.dataplane_mut().clear_flows();
    let silent_first = {
        // Seen before the change: install the old (clean) table, send, and
        // put the changed one back, aged.
        let clean: Vec<lb_common::MaglevSlot> = table
            .iter()
            .map(|s| lb_common::MaglevSlot::clean(s.prev))
            .collect();
        w.dataplane_mut()
            .install_table(id, &clean, lb_common::FWD_LOCAL)
            .unwrap();
        send(w.dataplane(), &silent, 0)
    };
    let aged: Vec<lb_common::MaglevSlot> = table
        .iter()
        .map(|s| lb_common::MaglevSlot {
            changed: s.changed.wrapping_sub(lb_common::UDP_AFFINITY_SECS + 1),
            ..*s
        })
        .collect();
    w.dataplane_mut()
        .install_table(id, &aged, lb_common::FWD_LOCAL)
        .unwrap();
    for (i, f) in silent.iter().enumerate() {
        let Some(slot) = sticky_slot(&w, &svc, f) else {
            continue;
        };
        assert_eq!(silent_first[i], backend_port(&w, &svc, slot.prev));
        assert_eq!(
            send(w.dataplane(), std::slice::from_ref(f), 0)[0],
            backend_port(&w, &svc, slot.backend)
        );
    }
}

/// Draining keeps UDP flows exactly as it keeps TCP flows: every flow on the
/// drained backend stays there (pinned on its first packet after the
/// drain), also long after the change; new flows never go there.
#[test]
fn a_draining_backend_keeps_its_udp_flows() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let udp = |sport: u16| Spec::udp("10.1.0.2", "10.0.0.1", sport, 443).payload(b"q");
    let flows: Vec<Spec> = (20000..24000).map(udp).collect();
    let first = send(w.dataplane(), &flows, 0);
    assert!(first.contains(&8002));
    svc.backends[1].state = AdminState::Draining;
    w.apply(std::slice::from_ref(&svc)).unwrap();
    assert_eq!(
        send(w.dataplane(), &flows, 0),
        first,
        "UDP flows moved on drain"
    );
    // Long after the drain, the pins hold.
    age_table(&mut w, "web", lb_common::STICKY_MISS_SECS + 1);
    assert_eq!(
        send(w.dataplane(), &flows, 0),
        first,
        "UDP flows moved later"
    );
    let fresh: Vec<Spec> = (40000..44000).map(udp).collect();
    assert!(
        !send(w.dataplane(), &fresh, 0).contains(&8002),
        "a draining backend took a new UDP flow"
    );
}

/// A client that reuses a port after its connection to a drained backend
/// closed opens a new connection on the same 4-tuple, with the old pin
/// still in the flow table: its SYN goes by the table, never to the
/// draining backend, while the old connections there keep their pins.
#[test]
fn a_new_connection_on_the_port_of_a_drained_backends_flow_goes_by_the_table() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let flows = client_flows(3000);
    let first = send(w.dataplane(), &flows, TCP_SYN);
    assert_eq!(send(w.dataplane(), &flows, TCP_ACK), first);
    svc.backends[1].state = AdminState::Draining;
    w.apply(std::slice::from_ref(&svc)).unwrap();
    // The drained backend's connections go on, and are pinned there.
    assert_eq!(
        send(w.dataplane(), &flows, TCP_ACK),
        first,
        "flows moved on drain"
    );
    let on_drained: Vec<Spec> = flows
        .iter()
        .zip(&first)
        .filter(|(_, p)| **p == 8002)
        .map(|(f, _)| f.clone())
        .collect();
    assert!(on_drained.len() > 100, "{} flows on 8002", on_drained.len());
    let (reused, kept) = on_drained.split_at(on_drained.len() / 2);
    // Half of those clients open a new connection from the same port.
    let again = send(w.dataplane(), reused, TCP_SYN);
    for (f, port) in reused.iter().zip(&again) {
        assert_ne!(*port, 8002, "a new connection went to the draining backend");
        assert_eq!(*port, table_port(&w, &svc, &f.build()), "not by the table");
    }
    // Its next packets follow it; the other half stays on 8002.
    assert_eq!(send(w.dataplane(), reused, TCP_ACK), again);
    assert!(
        send(w.dataplane(), kept, TCP_ACK)
            .iter()
            .all(|p| *p == 8002)
    );
    println!(
        "{} connections on the drained backend; {} new ones on reused ports went by the table, {} old ones stayed",
        on_drained.len(),
        reused.len(),
        kept.len()
    );
}

/// What a miss means. Connections opened before a change have no pin; ones
/// opened after it are pinned by their SYN. When the LRU has evicted every
/// pin, a miss in a changed slot goes to the slot's previous backend while
/// the change is younger than `TCP_MISS_PREV_SECS` (right for the old
/// connections, wrong for the new ones) and to its current backend after
/// (the other way round). The figures are printed for the README.
#[test]
fn misses_follow_the_age_of_the_change() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let flows = client_flows(4000);
    let (old, new): (Vec<Spec>, Vec<Spec>) =
        flows.iter().cloned().partition(|f| f.sport() % 2 == 0);
    let old_ports = send(w.dataplane(), &old, TCP_SYN);
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let new_ports = send(w.dataplane(), &new, TCP_SYN);
    let right = |w: &mut MapWriter, flows: &[Spec], want: &[u16]| -> (usize, usize) {
        w.dataplane_mut().clear_flows();
        let got = send(w.dataplane(), flows, TCP_ACK);
        let idx: Vec<usize> = (0..flows.len())
            .filter(|i| sticky_slot(w, &svc, &flows[*i]).is_some())
            .collect();
        let ok = idx.iter().filter(|i| got[**i] == want[**i]).count();
        (ok, idx.len())
    };
    let young_old = right(&mut w, &old, &old_ports);
    let young_new = right(&mut w, &new, &new_ports);
    // A change stamped a second ahead of the program's clock is young too:
    // a CPU's cached second lags the daemon's clock by up to a tick, and
    // the difference must not wrap to "four billion seconds ago".
    let ahead = lb_userspace::dataplane::monotonic_secs() + 1;
    restamp_table(&mut w, "web", |_| ahead);
    assert_eq!(
        right(&mut w, &old, &old_ports),
        young_old,
        "change stamped a second ahead: old connections moved"
    );
    age_table(&mut w, "web", 1 + lb_common::TCP_MISS_PREV_SECS + 1);
    let aged_old = right(&mut w, &old, &old_ports);
    let aged_new = right(&mut w, &new, &new_ports);
    println!(
        "misses in changed slots, pins evicted: change younger than {} s: {}/{} older \
         connections and {}/{} newer ones stay; older: {}/{} and {}/{}",
        lb_common::TCP_MISS_PREV_SECS,
        young_old.0,
        young_old.1,
        young_new.0,
        young_new.1,
        aged_old.0,
        aged_old.1,
        aged_new.0,
        aged_new.1
    );
    assert!(
        young_old.1 > 20 && young_new.1 > 20,
        "too few flows in changed slots"
    );
    assert_eq!(
        young_old.0, young_old.1,
        "young change: old connections moved"
    );
    assert_eq!(
        young_new.0, 0,
        "young change: a miss went to the current backend"
    );
    assert_eq!(aged_new.0, aged_new.1, "old change: new connections moved");
    assert_eq!(
        aged_old.0, 0,
        "old change: a miss went to the previous backend"
    );
}

/// A flood of new flows in changed slots cannot churn the flow table: each
/// CPU inserts at most `flow_insert_rate` pins a second; the rest are
/// forwarded to the slot's current backend unpinned and counted.
#[test]
fn flow_inserts_are_capped_per_cpu() {
    lb_tests::require_root();
    let mut svc = five_backends();
    let dp = Dataplane::load(Options {
        flow_insert_rate: 100,
        ..options()
    })
    .expect("the eBPF object loads and verifies");
    let mut w = MapWriter::new(dp);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let flows: Vec<Spec> = client_flows(6000)
        .into_iter()
        .filter(|f| sticky_slot(&w, &svc, f).is_some())
        .take(600)
        .collect();
    assert_eq!(flows.len(), 600);
    let ports = send(w.dataplane(), &flows, TCP_SYN);
    for (f, port) in flows.iter().zip(&ports) {
        assert_eq!(
            *port,
            table_port(&w, &svc, &f.build()),
            "a refused flow was misrouted"
        );
    }
    let events = w.dataplane().event_counts().unwrap();
    let (inserted, refused) = (
        events[lb_common::Event::PinInserted as usize],
        events[lb_common::Event::PinRefused as usize],
    );
    // The 600 SYNs may straddle a second boundary: at most two seconds' worth.
    assert!(inserted <= 200, "{inserted} inserts over a cap of 100/s");
    assert_eq!(inserted + refused, 600);
    assert_eq!(w.dataplane().flow_count() as u64, inserted);
}

/// UDP new flows are counted once each, in clean and changed slots alike.
#[test]
fn udp_new_flows_are_counted_once() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let udp = |sport: u16| Spec::udp("10.1.0.3", "10.0.0.1", sport, 443).payload(b"q");
    let flows: Vec<Spec> = (20000..21000).map(udp).collect();
    let total = |w: &MapWriter| -> u64 {
        let id = w.service_id("web").unwrap();
        w.dataplane().service_counters(id).unwrap().new_flows
    };
    for _ in 0..3 {
        send(w.dataplane(), &flows, 0);
    }
    assert_eq!(total(&w), 1000, "clean slots");
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    send(w.dataplane(), &flows, 0);
    assert_eq!(total(&w), 1000, "known flows in changed slots are not new");
    let fresh: Vec<Spec> = (30000..30500).map(udp).collect();
    send(w.dataplane(), &fresh, 0);
    send(w.dataplane(), &fresh, 0);
    assert_eq!(total(&w), 1500);
}

/// After any number of changes a slot becomes clean again once its change
/// is older than misses look back and no live pin needs its previous
/// backend; slots whose pins still name another backend stay sticky, and
/// pins of backends gone down are removed.
#[test]
fn sticky_slots_become_clean_once_no_pin_needs_them() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let flows = client_flows(4000);
    send(w.dataplane(), &flows, TCP_SYN);
    for port in 8006..8016 {
        svc.backends.push(BackendSpec::new(
            format!("127.0.0.1:{port}").parse().unwrap(),
            100,
        ));
        w.apply(std::slice::from_ref(&svc)).unwrap();
    }
    // A quarter of the old connections speak: pinned to their old backend.
    let talkers: Vec<Spec> = flows.iter().step_by(4).cloned().collect();
    let talker_ports = send(w.dataplane(), &talkers, TCP_ACK);
    let id = w.service_id("web").unwrap();
    let sticky_count = |w: &MapWriter| {
        let (_, t) = w.dataplane().active_table(id).unwrap();
        t.iter().filter(|s| s.is_sticky()).count()
    };
    let before = sticky_count(&w);
    assert!(before > 1000, "{before} changed slots");
    let counter = w.dataplane().flow_counter().unwrap();
    // Too young: nothing to do.
    let now = lb_userspace::dataplane::monotonic_secs();
    assert!(w.sweep_plan(now).candidates.is_empty());
    let later = now + lb_common::STICKY_MISS_SECS + 1;
    let plan = w.sweep_plan(later);
    let found = counter.walk(&plan);
    let report = w.finish_sweep(&plan, &found).unwrap();
    let after = sticky_count(&w);
    assert_eq!(report.slots_cleaned, before - after);
    assert_eq!(after, found.needed.len());
    assert!(
        after > 0 && after < before / 2,
        "{before} -> {after} changed slots"
    );
    // Every connection still reaches its backend.
    assert_eq!(send(w.dataplane(), &talkers, TCP_ACK), talker_ports);
    // A backend goes down: its pins are stale and the next sweep ends them.
    let victim = talker_ports[0];
    let pinned_on_victim = talkers
        .iter()
        .zip(&talker_ports)
        .filter(|(f, p)| **p == victim && sticky_slot(&w, &svc, f).is_some())
        .count();
    let pins_before = w.dataplane().flow_count();
    svc.backends.retain(|b| b.address.port() != victim);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let plan = w.sweep_plan(later + lb_common::STICKY_MISS_SECS + 1);
    let found = counter.walk(&plan);
    let report = w.finish_sweep(&plan, &found).unwrap();
    assert!(pinned_on_victim > 0);
    assert!(
        report.stale_pins_removed >= pinned_on_victim,
        "{report:?}, {pinned_on_victim} pins on {victim}"
    );
    assert_eq!(
        w.dataplane().flow_count(),
        pins_before - report.stale_pins_removed
    );
}

/// IPv4 flows are pinned in `LB_FLOWS4`, under 16-byte keys, and IPv6 ones
/// in `LB_FLOWS`: each family's pins are found under the flow's one
/// `FlowKey`, counted in its own table's size, and swept from its own
/// table, and flows of both keep their backends through changes.
#[test]
fn each_family_pins_its_flows_in_its_own_table() {
    let mut v4 = five_backends();
    let v6_backends: Vec<String> = (9001..=9005).map(|p| format!("[::1]:{p}")).collect();
    let v6_refs: Vec<&str> = v6_backends.iter().map(String::as_str).collect();
    let mut v6 = service("web6", "[::]:443", &v6_refs);
    let mut w = writer(&[v4.clone(), v6.clone()]);
    let flows4 = client_flows(2000);
    let flows6: Vec<Spec> = (0..2000u16)
        .map(|i| {
            Spec::tcp(
                &format!("fd00:1::{:x}", i + 1),
                "fd00::1",
                20000 + i,
                443,
                TCP_SYN,
            )
        })
        .collect();
    let first4 = send(w.dataplane(), &flows4, TCP_SYN);
    let first6 = send(w.dataplane(), &flows6, TCP_SYN);
    assert_eq!(w.dataplane().flow_count(), 0, "clean slots pin nothing");

    // A sixth backend each; every connection speaks, and those in changed
    // slots are pinned to the backend they had.
    v4.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    v6.backends
        .push(BackendSpec::new("[::1]:9006".parse().unwrap(), 100));
    w.apply(&[v4.clone(), v6.clone()]).unwrap();
    assert_eq!(send(w.dataplane(), &flows4, TCP_ACK), first4);
    assert_eq!(send(w.dataplane(), &flows6, TCP_ACK), first6);
    let sticky = |svc: &ServiceSpec, flows: &[Spec], first: &[u16]| -> Vec<(Spec, u16)> {
        flows
            .iter()
            .zip(first)
            .filter(|(f, _)| sticky_slot(&w, svc, f).is_some())
            .map(|(f, p)| (f.clone(), *p))
            .collect()
    };
    let pinned4 = sticky(&v4, &flows4, &first4);
    let pinned6 = sticky(&v6, &flows6, &first6);
    assert!(
        pinned4.len() > 100 && pinned6.len() > 100,
        "{} and {} flows in changed slots",
        pinned4.len(),
        pinned6.len()
    );
    let dp = w.dataplane();
    assert_eq!(
        dp.flow_entries_of(Family::V4).unwrap(),
        pinned4.len() as u64
    );
    assert_eq!(
        dp.flow_entries_of(Family::V6).unwrap(),
        pinned6.len() as u64
    );
    assert_eq!(dp.flow_count(), pinned4.len() + pinned6.len());
    for (name, host, pinned) in [("web", "127.0.0.1", &pinned4), ("web6", "[::1]", &pinned6)] {
        for (f, port) in pinned {
            let pin = dp
                .flow_pin(&flow_key(f))
                .expect("a pin under the flow's key");
            let want = w.backend_id(name, format!("{host}:{port}").parse().unwrap());
            assert_eq!(Some(pin.backend), want, "{f:?} pinned elsewhere");
        }
    }

    // A backend of each goes down: the sweep ends the pins on it, in each
    // family's table, and counts them there.
    let gone =
        |pinned: &[(Spec, u16)], port: u16| pinned.iter().filter(|(_, p)| *p == port).count();
    let (gone4, gone6) = (gone(&pinned4, 8001), gone(&pinned6, 9001));
    assert!(gone4 > 0 && gone6 > 0);
    v4.backends.retain(|b| b.address.port() != 8001);
    v6.backends.retain(|b| b.address.port() != 9001);
    w.apply(&[v4.clone(), v6.clone()]).unwrap();
    let counter = w.dataplane().flow_counter().unwrap();
    let later = lb_userspace::dataplane::monotonic_secs() + lb_common::STICKY_MISS_SECS + 1;
    let plan = w.sweep_plan(later);
    let found = counter.walk(&plan);
    let report = w.finish_sweep(&plan, &found).unwrap();
    assert_eq!(report.stale_pins_removed, gone4 + gone6, "{report:?}");
    let dp = w.dataplane();
    for (family, left) in [
        (Family::V4, pinned4.len() - gone4),
        (Family::V6, pinned6.len() - gone6),
    ] {
        assert_eq!(
            dp.flow_entries_of(family).unwrap(),
            left as u64,
            "{family:?}"
        );
        assert_eq!(counter.count(family).unwrap(), left as u64, "{family:?}");
    }
    assert_eq!(
        dp.flow_count(),
        pinned4.len() - gone4 + pinned6.len() - gone6
    );
    // Flows on the backends that stayed keep them.
    for (pinned, dead) in [(&pinned4, 8001), (&pinned6, 9001)] {
        let live: Vec<&(Spec, u16)> = pinned.iter().filter(|(_, p)| *p != dead).collect();
        let specs: Vec<Spec> = live.iter().map(|(f, _)| f.clone()).collect();
        let ports: Vec<u16> = live.iter().map(|(_, p)| *p).collect();
        assert_eq!(send(w.dataplane(), &specs, TCP_ACK), ports);
    }
}

/// Replies are translated back only for flows the program balanced: a
/// packet from a backend port that answers no balanced flow (the host's own
/// connection from that port) leaves untouched.
#[test]
fn only_replies_of_balanced_flows_are_translated() {
    let svc = five_backends();
    let w = writer(std::slice::from_ref(&svc));
    let dp = w.dataplane();
    let mut translated = 0;
    let mut untouched = 0;
    for cport in 40000..40200 {
        let fwd = Spec::tcp("10.0.0.2", "10.0.0.1", cport, 443, TCP_ACK);
        let balanced = table_port(&w, &svc, &fwd.build());
        for port in [8001, 8002] {
            let reply = Spec::tcp("10.0.0.1", "10.0.0.2", port, cport, TCP_ACK).payload(b"r");
            let (action, out) = dp.test_run_tc(&reply.build()).unwrap();
            assert_eq!(action, TC_ACT_OK);
            if port == balanced {
                let want = Spec::tcp("10.0.0.1", "10.0.0.2", 443, cport, TCP_ACK).payload(b"r");
                assert_eq!(hex(&out), hex(&want.build()), "reply of a balanced flow");
                translated += 1;
            } else {
                assert_eq!(
                    hex(&out),
                    hex(&reply.build()),
                    "not a reply of a balanced flow"
                );
                untouched += 1;
            }
        }
    }
    assert!(translated > 10 && untouched > 100);
}

/// A backend that leaves the service still has the replies of its flows
/// translated while their slots remember it: a reply on its way when the
/// table changed reaches the client as the service's. Untranslated, the
/// client drops it as a packet from a port it never spoke to, and then
/// waits for an answer that never comes (a reload under traffic showed it).
#[test]
fn replies_of_a_removed_backend_still_leave_as_the_service() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let fwd = |cport| Spec::tcp("10.0.0.2", "10.0.0.1", cport, 443, TCP_ACK).build();
    let (held, other): (Vec<u16>, Vec<u16>) =
        (40000..40400).partition(|c| table_port(&w, &svc, &fwd(*c)) == 8003);
    assert!(held.len() > 20 && other.len() > 200, "{}", held.len());

    svc.backends.retain(|b| b.address.port() != 8003);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let dp = w.dataplane();
    let reply = |port, cport| Spec::tcp("10.0.0.1", "10.0.0.2", port, cport, TCP_ACK).payload(b"r");
    for &cport in &held {
        let (action, out) = dp.test_run_tc(&reply(8003, cport).build()).unwrap();
        assert_eq!(action, TC_ACT_OK);
        assert_eq!(
            hex(&out),
            hex(&reply(443, cport).build()),
            "a reply of flow {cport}, which the removed backend held"
        );
    }
    // The removed backend's port answers no other flow.
    for &cport in &other {
        let input = reply(8003, cport).build();
        let (_, out) = dp.test_run_tc(&input).unwrap();
        assert_eq!(hex(&out), hex(&input), "flow {cport} was never on 8003");
    }
}

/// Options that pin the data plane in a bpffs of the test's own, with the
/// record in a directory of its own; both go when the first two are dropped.
fn pinned_options(tag: &str) -> (lb_tests::daemon::BpfFs, lb_tests::daemon::TempDir, Options) {
    lb_tests::require_root();
    let bpf = lb_tests::daemon::BpfFs::mount(tag);
    let dir = lb_tests::daemon::TempDir::new(tag);
    let opts = Options {
        pin_path: Some(bpf.0.join("lb")),
        record_path: Some(dir.path("record.json")),
        ..options()
    };
    (bpf, dir, opts)
}

/// Backend ids are reused lowest first after a restart (the new daemon knows
/// only the ids of services that still exist). A pin made for the earlier
/// holder of an id must not match the new holder: it names the same service
/// id and backend id, but not the generation.
#[test]
fn a_reused_backend_id_never_matches_old_pins() {
    let (_bpf, _dir, opts) = pinned_options("reuse");
    let flows = client_flows(3000);
    let old_ids: Vec<u32>;
    {
        // The first daemon: service a, changed, with flows pinned in it.
        let mut a = five_backends();
        a.name = "a".into();
        let mut w = MapWriter::new(Dataplane::load(opts.clone()).unwrap());
        w.apply(std::slice::from_ref(&a)).unwrap();
        a.backends
            .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
        w.apply(std::slice::from_ref(&a)).unwrap();
        send(w.dataplane(), &flows, TCP_SYN);
        assert!(w.dataplane().flow_count() > 100);
        old_ids = a
            .backends
            .iter()
            .map(|b| w.backend_id("a", b.address).unwrap())
            .collect();
        // Service a goes; its pins stay in the LRU.
        w.apply(&[]).unwrap();
        w.dataplane_mut().shutdown(true);
    }
    // The next daemon adopts the pinned maps; service b takes the same ids.
    let mut b = service(
        "b",
        "0.0.0.0:443",
        &[
            "127.0.0.1:9001",
            "127.0.0.1:9002",
            "127.0.0.1:9003",
            "127.0.0.1:9004",
            "127.0.0.1:9005",
        ],
    );
    let mut w = MapWriter::new(Dataplane::load(opts).unwrap());
    assert!(
        w.dataplane().flow_count() > 100,
        "the old pins are still there"
    );
    w.apply(std::slice::from_ref(&b)).unwrap();
    b.backends
        .push(BackendSpec::new("127.0.0.1:9006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&b)).unwrap();
    let new_ids: Vec<u32> = b
        .backends
        .iter()
        .map(|x| w.backend_id("b", x.address).unwrap())
        .collect();
    assert!(
        new_ids.iter().any(|i| old_ids.contains(i)),
        "no id was reused ({old_ids:?} then {new_ids:?}); the test proves nothing"
    );
    // Every old flow is a miss in b's changed slots (previous backend) or
    // follows a clean slot: none follows a pin of service a.
    let ports = send(w.dataplane(), &flows, TCP_ACK);
    let mut misses = 0;
    for (f, port) in flows.iter().zip(&ports) {
        let want = match sticky_slot(&w, &b, f) {
            Some(slot) => {
                misses += 1;
                backend_port(&w, &b, slot.prev)
            }
            None => table_port(&w, &b, &f.build()),
        };
        assert_eq!(*port, want, "a flow followed a stale pin");
    }
    assert!(misses > 50);
    let stale = w.dataplane().event_counts().unwrap()[lb_common::Event::PinStale as usize];
    assert!(stale > 0, "no old pin was met");
}

#[test]
fn when_every_backend_fails_the_last_ones_keep_their_flows() {
    let mut svc = service(
        "web",
        "0.0.0.0:443",
        &["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"],
    );
    let mut w = writer(std::slice::from_ref(&svc));
    let flows = client_flows(1500);
    send(w.dataplane(), &flows, TCP_SYN);
    // 8001 fails: 8002 and 8003 are the last ones up.
    svc.backends[0].healthy = false;
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let mid = send(w.dataplane(), &flows, TCP_ACK);
    assert!(!w.fail_open("web"));
    assert!(mid.contains(&8002) && mid.contains(&8003) && !mid.contains(&8001));
    let pinned = w.dataplane().flow_count();

    // Both fail too: the service fails open on them, and nothing changes in
    // the data plane (no table, no purge): every flow stays where it was.
    svc.backends[1].healthy = false;
    svc.backends[2].healthy = false;
    let report = w.apply(std::slice::from_ref(&svc)).unwrap();
    assert!(w.fail_open("web"));
    assert_eq!(report.tables_installed, 0);
    assert_eq!(send(w.dataplane(), &flows, TCP_ACK), mid);
    assert_eq!(w.dataplane().flow_count(), pinned);
    // New connections too reach the last ones (not 8001, down before).
    let fresh: Vec<Spec> = (0..200u16)
        .map(|i| {
            Spec::tcp(
                &format!("10.9.0.{}", i % 250 + 1),
                "10.0.0.1",
                50000 + i,
                443,
                TCP_SYN,
            )
        })
        .collect();
    let ports = send(w.dataplane(), &fresh, TCP_SYN);
    assert!(ports.iter().all(|p| *p == 8002 || *p == 8003), "{ports:?}");

    // The operator's choices are not undone: draining 8003 leaves 8002.
    svc.backends[2].state = AdminState::Draining;
    w.apply(std::slice::from_ref(&svc)).unwrap();
    assert!(w.fail_open("web"));
    let ports = send(w.dataplane(), &fresh, TCP_SYN);
    assert!(ports.iter().all(|p| *p == 8002), "{ports:?}");
    svc.backends[2].state = AdminState::Active;
    w.apply(std::slice::from_ref(&svc)).unwrap();

    // 8001 and 8002 recover: the table is built from them; 8002's flows
    // (pinned or not) stay on it, 8003's move.
    svc.backends[0].healthy = true;
    svc.backends[1].healthy = true;
    w.apply(std::slice::from_ref(&svc)).unwrap();
    assert!(!w.fail_open("web"));
    let after = send(w.dataplane(), &flows, TCP_ACK);
    let mut kept = 0;
    for (i, (a, b)) in mid.iter().zip(&after).enumerate() {
        if *a == 8002 {
            assert_eq!(*b, 8002, "flow {i} left 8002, which stayed up");
            kept += 1;
        } else {
            assert_ne!(*b, 8003, "flow {i} still on 8003, which is down");
        }
    }
    println!("fail-open: {kept} flows on 8002 kept through fail-open and recovery");

    // With `refuse` the same failure leaves no backend.
    svc.when_all_down = lb_userspace::dataplane::WhenAllDown::Refuse;
    svc.backends.iter_mut().for_each(|b| b.healthy = false);
    w.apply(std::slice::from_ref(&svc)).unwrap();
    assert!(!w.fail_open("web"));
    let (action, out) = run(w.dataplane(), &fresh[0].build());
    assert_eq!((action, out), (XDP_PASS, fresh[0].build()));
    assert!(reason(w.dataplane(), Reason::NoBackend) > 0);
}

/// The backend port each of `flows` goes to by `hash` over the active table.
fn ports_by_hash(w: &MapWriter, svc: &ServiceSpec, flows: &[Spec], hash: FlowHash) -> Vec<u16> {
    flows
        .iter()
        .map(|f| {
            let p = packet::parse(&f.build()).unwrap();
            let slot = slot_by(hash, w, svc, (p.src, p.dst), (p.sport, p.dport), p.proto);
            backend_port(w, svc, slot.backend)
        })
        .collect()
}

/// Which hash the program runs: the configured one; else, on pins, the one
/// their record names (a record of a release before the choice names
/// none: murmur3); else fast. Every packet goes where that hash and the
/// table say, and the two hashes disagree for most flows, so the check
/// tells them apart.
#[test]
fn the_program_hashes_flows_by_the_chosen_function() {
    let svc = five_backends();
    let flows = client_flows(500);
    let expect = |w: &MapWriter, hash: FlowHash, what: &str| {
        assert_eq!(w.dataplane().flow_hash(), hash, "{what}");
        let want = ports_by_hash(w, &svc, &flows, hash);
        let other = match hash {
            FlowHash::Fast => FlowHash::Murmur3,
            FlowHash::Murmur3 => FlowHash::Fast,
        };
        let differ = want
            .iter()
            .zip(ports_by_hash(w, &svc, &flows, other))
            .filter(|(a, b)| **a != *b)
            .count();
        assert!(
            differ > 300,
            "{what}: the hashes differ for {differ} of 500 flows"
        );
        assert_eq!(send(w.dataplane(), &flows, TCP_SYN), want, "{what}: SYNs");
        assert_eq!(
            send(w.dataplane(), &flows, TCP_ACK),
            want,
            "{what}: established"
        );
    };
    // No pins, nothing configured: fast. Configured: that one.
    let w = writer(std::slice::from_ref(&svc));
    expect(&w, FlowHash::Fast, "default");
    for hash in [FlowHash::Murmur3, FlowHash::Fast] {
        let opts = Options {
            flow_hash: Some(hash),
            ..options()
        };
        let mut w = MapWriter::new(Dataplane::load(opts).unwrap());
        w.apply(std::slice::from_ref(&svc)).unwrap();
        expect(&w, hash, "configured");
    }

    // On pins. Each daemon loads, installs the service, checks the hash
    // and ends, leaving the data plane (or, `keep` false, detaching it).
    let (bpf, dir, opts) = pinned_options("flowhash");
    let record = dir.path("record.json");
    let daemon = |opts: &Options, hash: FlowHash, what: &str, keep: bool| {
        let mut w = MapWriter::new(Dataplane::load(opts.clone()).unwrap());
        w.apply(std::slice::from_ref(&svc)).unwrap();
        expect(&w, hash, what);
        w.dataplane_mut().shutdown(keep);
    };
    // A data plane new to the host gets fast and records it; a restart that
    // configures nothing keeps it.
    daemon(&opts, FlowHash::Fast, "fresh pins", true);
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains("\"flow_hash\": \"fast\""), "{text}");
    daemon(&opts, FlowHash::Fast, "adopted, recorded fast", true);
    // A record written by a release before the choice (no flow_hash): the
    // data plane it left ran murmur3, and keeps it.
    let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
    old.as_object_mut().unwrap().remove("flow_hash");
    std::fs::write(&record, serde_json::to_vec(&old).unwrap()).unwrap();
    daemon(
        &opts,
        FlowHash::Murmur3,
        "record of an earlier release",
        true,
    );
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains("\"flow_hash\": \"murmur3\""), "{text}");
    // After a reboot the pins are gone and the record (a regular file) is
    // not: the next data plane hashes as the one before it.
    std::fs::remove_dir_all(bpf.0.join("lb")).unwrap();
    daemon(&opts, FlowHash::Murmur3, "after a reboot", true);
    // Told otherwise, the daemon switches (and warns that flows move) and
    // records it; detached, pins and record are gone.
    let told = Options {
        flow_hash: Some(FlowHash::Fast),
        ..opts.clone()
    };
    daemon(&told, FlowHash::Fast, "configured over the record", false);
    assert!(!record.exists());
}
