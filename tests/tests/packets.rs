//! Packet fixtures through `BPF_PROG_TEST_RUN` on the real eBPF object: these
//! bytes in, this action and these bytes out. Expected frames are built from
//! scratch with full checksums, so equality also proves the program's
//! incremental checksum updates.
use std::collections::HashMap;

use lb_common::{REASON_NAMES, Reason};
use lb_tests::packet::{self, Spec, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN};
use lb_userspace::dataplane::{
    AdminState, BackendSpec, Dataplane, Forwarding, MapWriter, Options, Protocol, ServiceSpec,
    addr_words,
};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

fn options() -> Options {
    Options {
        max_services: 4,
        flow_table_size: 65_536,
        ..Options::default()
    }
}

fn service(name: &str, listen: &str, backends: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        listen: listen.parse().unwrap(),
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        forwarding: Forwarding::Local,
        backends: backends
            .iter()
            .map(|b| BackendSpec::new(b.parse().unwrap(), 100))
            .collect(),
    }
}

fn writer(services: &[ServiceSpec]) -> MapWriter {
    lb_tests::require_root();
    let dp = Dataplane::load(options()).expect("the eBPF object loads and verifies");
    let mut w = MapWriter::new(dp);
    w.apply(services).expect("services apply");
    w
}

fn run(dp: &Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    dp.test_run_xdp(frame).expect("BPF_PROG_TEST_RUN")
}

/// The backend port the active Maglev table names for a frame's flow.
fn table_port(w: &MapWriter, svc: &ServiceSpec, frame: &[u8]) -> u16 {
    let p = packet::parse(frame).unwrap();
    let h = lb_common::flow_hash(
        &addr_words(p.src),
        &addr_words(p.dst),
        p.sport.to_be(),
        p.dport.to_be(),
        p.proto,
    );
    let id = w.service_id(&svc.name).unwrap();
    let (_, table) = w.dataplane().active_table(id).unwrap();
    let slot = table[(h % table.len() as u32) as usize];
    backend_port(w, svc, slot.backend)
}

fn backend_port(w: &MapWriter, svc: &ServiceSpec, id: u32) -> u16 {
    svc.backends
        .iter()
        .find(|b| w.backend_id(&svc.name, b.address) == Some(id))
        .map(|b| b.address.port())
        .unwrap_or_else(|| panic!("backend id {id} is not in service {}", svc.name))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
    let svc = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let w = writer(std::slice::from_ref(&svc));
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
        let port = table_port(&w, &svc, &input);
        *ports.entry(port).or_insert(0) += 1;
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
    let id = w.service_id("web").unwrap();
    let c = dp.service_counters(id).unwrap();
    assert_eq!(c.packets, runs);
    assert_eq!(c.bytes, bytes);
    // SYNs count as new flows; in a table that never changed nothing else does.
    assert_eq!(c.new_flows, 2 * 5);
    let mut per_backend = 0;
    for b in &svc.backends {
        let bc = dp
            .backend_counters(w.backend_id("web", b.address).unwrap())
            .unwrap();
        assert_eq!(
            bc.packets,
            2 * ports.get(&b.address.port()).copied().unwrap_or(0)
        );
        per_backend += bc.packets;
    }
    assert_eq!(per_backend, runs);
    assert_eq!(dp.action_counts().unwrap()[XDP_PASS as usize], runs);
    assert_eq!(dp.reason_counts().unwrap().iter().sum::<u64>(), 0);
    // Nothing in a table that never changed needs the flow table.
    assert_eq!(dp.flow_count(), 0);
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
        ("ipv4 later fragment", v4_frag.build(), Reason::Fragment),
        ("ipv6 later fragment", v6_frag.build(), Reason::Fragment),
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
    let any = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "[::1]:8002"]);
    let specific = service("api", "10.0.0.1:8443", &["10.0.0.9:9001"]);
    let specific6 = service("api6", "[fd00::1]:8443", &["[fd00::9]:9002"]);
    let w = writer(&[any, specific, specific6]);
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

fn client_flows(n: u16) -> Vec<Spec> {
    (0..n)
        .map(|i| {
            let src = format!("10.1.{}.{}", i / 250, i % 250 + 1);
            Spec::tcp(&src, "10.0.0.1", 20000 + i, 443, TCP_SYN)
        })
        .collect()
}

fn five_backends() -> ServiceSpec {
    service(
        "web",
        "0.0.0.0:443",
        &[
            "127.0.0.1:8001",
            "127.0.0.1:8002",
            "127.0.0.1:8003",
            "127.0.0.1:8004",
            "127.0.0.1:8005",
        ],
    )
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
fn flows_on_a_dead_backend_are_repicked_and_rst_unpins() {
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
    svc.backends[1].healthy = false;
    let report = w.apply(std::slice::from_ref(&svc)).unwrap();
    let after = send(w.dataplane(), &flows, TCP_ACK);
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if *a == 8002 {
            assert_ne!(*b, 8002, "flow {i} still on the dead backend");
        } else {
            assert_eq!(a, b, "flow {i} moved though its backend lives");
        }
    }
    assert!(before.contains(&8002));
    let purged_before = report.flows_purged;
    assert!(purged_before > 0 || !before.contains(&8002));

    // RST ends a pinned flow.
    let count = w.dataplane().flow_count();
    assert!(count > 0);
    send(w.dataplane(), &flows, TCP_RST | TCP_ACK);
    assert_eq!(
        w.dataplane().flow_count(),
        0,
        "RST left pinned flows behind"
    );
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

/// UDP has no SYN: right after a change, a flow with no entry in a changed
/// slot is taken for an old one and stays on the slot's previous backend;
/// once the change is `UDP_AFFINITY_SECS` old, such flows are new and take
/// the slot's current backend, so a backend added for UDP gets its share.
#[test]
fn new_udp_flows_reach_an_added_backend_once_the_change_is_old() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let id = w.service_id("web").unwrap();
    let table: Vec<lb_common::MaglevSlot> = w.dataplane().active_table(id).unwrap().1.to_vec();
    let udp = |sport: u16| Spec::udp("10.1.0.1", "10.0.0.1", sport, 443).payload(b"q");
    let slot_of = |spec: &Spec| {
        let p = packet::parse(&spec.build()).unwrap();
        let h = lb_common::flow_hash(
            &addr_words(p.src),
            &addr_words(p.dst),
            p.sport.to_be(),
            p.dport.to_be(),
            p.proto,
        );
        table[(h % table.len() as u32) as usize]
    };
    // Fresh change: new flows in changed slots stay on the old backend.
    let fresh: Vec<Spec> = (30000..32000)
        .map(udp)
        .filter(|f| slot_of(f).backend != slot_of(f).prev)
        .collect();
    assert!(
        fresh.len() > 50,
        "too few flows in changed slots: {}",
        fresh.len()
    );
    for (f, port) in fresh.iter().zip(send(w.dataplane(), &fresh, 0)) {
        assert_eq!(port, backend_port(&w, &svc, slot_of(f).prev));
    }
    // The same table, its changes made older than the affinity window.
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
    let later: Vec<Spec> = (40000..42000)
        .map(udp)
        .filter(|f| slot_of(f).backend != slot_of(f).prev)
        .collect();
    let ports = send(w.dataplane(), &later, 0);
    for (f, port) in later.iter().zip(&ports) {
        assert_eq!(*port, backend_port(&w, &svc, slot_of(f).backend));
    }
    assert!(
        ports.contains(&8006),
        "the added backend got no new UDP flow"
    );
    // Flows pinned while the change was fresh keep their backend.
    for (f, port) in fresh.iter().zip(send(w.dataplane(), &fresh, 0)) {
        assert_eq!(port, backend_port(&w, &svc, slot_of(f).prev));
    }
}
