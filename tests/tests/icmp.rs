//! ICMP errors about balanced flows: "fragmentation needed" / "packet too
//! big", "destination unreachable" and "time exceeded" quote a reply the
//! service sent; the data plane hands them to the backend of the flow that
//! reply belongs to. Fixtures through `BPF_PROG_TEST_RUN` in `local` mode
//! (`nat` and `dsr`, which need a FIB, are in remote.rs), and a real stack
//! behind a router with a 1300-byte hop, where path-MTU discovery through
//! the balancer must work for downloads to complete.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_common::{REASON_NAMES, Reason};
use lb_tests::fixtures::{backend_port, five_backends, hex, service, slot_of, writer};
use lb_tests::{
    netns::{self, Topology, run_in},
    packet::{
        self, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_PORT_UNREACH, ICMP_TIME_EXCEEDED,
        ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_PORT_UNREACH, ICMPV6_TIME_EXCEEDED,
        Spec, TCP_ACK, TCP_SYN,
    },
};
use lb_userspace::dataplane::{
    AttachMode, BackendSpec, Dataplane, MapWriter, Options, ServiceSpec,
};

const XDP_PASS: u32 = 2;

/// The backend port the active Maglev table names for the flow `reply`
/// answers (the client's packets: source and destination swapped).
fn table_port(w: &MapWriter, svc: &ServiceSpec, reply: &Spec) -> u16 {
    let p = packet::parse(&reply.build()).unwrap();
    let slot = slot_of(w, svc, (p.dst, p.src), (p.dport, p.sport), p.proto);
    backend_port(w, svc, slot.backend)
}

/// The quoted source port of an ICMP error frame (one VLAN tag at most,
/// no IP options or extension headers on the error itself).
fn quoted_sport(frame: &[u8]) -> u16 {
    let l3 = if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    };
    let at = if frame[l3 - 2] == 0x86 {
        l3 + 40 + 8 + 40
    } else {
        l3 + 20 + 8 + ((frame[l3 + 20 + 8] & 0xf) as usize) * 4
    };
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// ICMP type, code and the word after the checksum.
type IcmpKind = (u8, u8, u32);

const FRAG_NEEDED: IcmpKind = (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1300);
const PORT_UNREACH: IcmpKind = (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0);
const HOST_UNREACH: IcmpKind = (ICMP_DEST_UNREACH, 1, 0);
const TTL_EXCEEDED: IcmpKind = (ICMP_TIME_EXCEEDED, 0, 0);
const TOO_BIG: IcmpKind = (ICMPV6_PACKET_TOO_BIG, 0, 1300);
const PORT_UNREACH6: IcmpKind = (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0);
const HOPS_EXCEEDED6: IcmpKind = (ICMPV6_TIME_EXCEEDED, 0, 0);

/// Every kind of error, both families, quotes long and as short as RFC 792
/// allows: the quote comes out naming the backend's port (and address, for
/// a backend with its own), every checksum as a from-scratch build has it,
/// the error itself still addressed to the service, passed to the stack.
#[test]
fn icmp_errors_about_a_flow_reach_its_local_backend() {
    // Wildcards serve one family each.
    let web = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let web6 = service("web6", "[::]:443", &["[::1]:8001", "[::1]:8002"]);
    let api = service("api", "10.0.0.1:8443", &["10.0.0.9:9001"]);
    let api6 = service("api6", "[fd00::1]:8443", &["[fd00::9]:9002"]);
    let w = writer(&[web.clone(), web6.clone(), api, api6]);
    let dp = w.dataplane();

    let big = vec![0x5a; 1400];
    let tcp4 = |cport| Spec::tcp("10.0.0.1", "10.0.0.2", 443, cport, TCP_ACK).payload(&big);
    let udp4 = |cport| Spec::udp("10.0.0.1", "10.0.0.2", 443, cport).payload(b"udp reply");
    let tcp6 = |cport| Spec::tcp("fd00::1", "fd00::2", 443, cport, TCP_ACK).payload(&big);
    let udp6 = |cport| Spec::udp("fd00::1", "fd00::2", 443, cport).payload(b"udp reply");
    let mut no_csum = udp4(40005);
    no_csum.udp_zero_checksum = true;
    // (name, error source, error destination, kind, reply quoted, quote
    // length)
    let wildcard: Vec<(&str, &str, &str, IcmpKind, Spec, usize)> = vec![
        (
            "ipv4 frag needed, tcp, 548 bytes quoted",
            "10.0.5.1",
            "10.0.0.1",
            FRAG_NEEDED,
            tcp4(40000),
            548,
        ),
        (
            "ipv4 frag needed, tcp, header + 8 bytes (tcp checksum not quoted)",
            "10.0.5.1",
            "10.0.0.1",
            FRAG_NEEDED,
            tcp4(40001),
            28,
        ),
        (
            "ipv4 port unreachable, udp, header + 8 bytes",
            "10.0.0.2",
            "10.0.0.1",
            PORT_UNREACH,
            udp4(40002),
            28,
        ),
        (
            "ipv4 host unreachable, tcp",
            "10.0.5.1",
            "10.0.0.1",
            HOST_UNREACH,
            tcp4(40003),
            100,
        ),
        (
            "ipv4 time exceeded, tcp",
            "10.0.5.1",
            "10.0.0.1",
            TTL_EXCEEDED,
            tcp4(40004),
            60,
        ),
        (
            "ipv4 frag needed, udp without checksum",
            "10.0.5.1",
            "10.0.0.1",
            FRAG_NEEDED,
            no_csum,
            1000,
        ),
        (
            "ipv6 packet too big, tcp, 1232 bytes quoted",
            "fd00:5::1",
            "fd00::1",
            TOO_BIG,
            tcp6(40010),
            1232,
        ),
        (
            "ipv6 packet too big, tcp, header + 8 bytes",
            "fd00:5::1",
            "fd00::1",
            TOO_BIG,
            tcp6(40011),
            48,
        ),
        (
            "ipv6 port unreachable, udp",
            "fd00::2",
            "fd00::1",
            PORT_UNREACH6,
            udp6(40012),
            1000,
        ),
        (
            "ipv6 hop limit exceeded, udp",
            "fd00:5::1",
            "fd00::1",
            HOPS_EXCEEDED6,
            udp6(40014),
            1000,
        ),
    ];
    let mut cases: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
    for (name, from, to, kind, reply, len) in &wildcard {
        let svc = if to.contains(':') { &web6 } else { &web };
        let port = table_port(&w, svc, reply);
        let at_backend = reply.clone().with_sport(port);
        cases.push((
            name.to_string(),
            Spec::icmp_error(from, to, *kind, reply, *len).build(),
            Spec::icmp_error(from, to, *kind, &at_backend, *len).build(),
        ));
    }
    // A VLAN tag on the error.
    let reply = tcp4(40020);
    let port = table_port(&w, &web, &reply);
    let mut tagged = Spec::icmp_error("10.0.5.1", "10.0.0.1", FRAG_NEEDED, &reply, 548);
    tagged.vlan = Some(7);
    let mut want = Spec::icmp_error(
        "10.0.5.1",
        "10.0.0.1",
        FRAG_NEEDED,
        &reply.clone().with_sport(port),
        548,
    );
    want.vlan = Some(7);
    cases.push((
        "vlan-tagged ipv4 frag needed".into(),
        tagged.build(),
        want.build(),
    ));
    let wildcard_runs = cases.len() as u64;
    // Backends with an address of their own: the quoted source address
    // becomes the backend's too.
    let own4 = Spec::tcp("10.0.0.1", "10.0.0.2", 8443, 40030, TCP_ACK).payload(&big);
    let own4_be = Spec::tcp("10.0.0.9", "10.0.0.2", 9001, 40030, TCP_ACK).payload(&big);
    let own6 = Spec::udp("fd00::1", "fd00::2", 8443, 40031).payload(&big);
    let own6_be = Spec::udp("fd00::9", "fd00::2", 9002, 40031).payload(&big);
    for (name, from, to, kind, reply, at_backend, len) in [
        (
            "ipv4 frag needed, backend with its own address",
            "10.0.5.1",
            "10.0.0.1",
            FRAG_NEEDED,
            &own4,
            &own4_be,
            548,
        ),
        (
            "ipv4 frag needed, backend with its own address, 8 bytes of tcp",
            "10.0.5.1",
            "10.0.0.1",
            FRAG_NEEDED,
            &own4,
            &own4_be,
            28,
        ),
        (
            "ipv6 packet too big, backend with its own address",
            "fd00:5::1",
            "fd00::1",
            TOO_BIG,
            &own6,
            &own6_be,
            1232,
        ),
    ] {
        cases.push((
            name.into(),
            Spec::icmp_error(from, to, kind, reply, len).build(),
            Spec::icmp_error(from, to, kind, at_backend, len).build(),
        ));
    }

    let mut ports = std::collections::HashSet::new();
    for (name, input, output) in &cases {
        assert_ne!(input, output, "{name}: the fixture must change something");
        let (action, out) = dp.test_run_xdp(input).expect("test run");
        assert_eq!(action, XDP_PASS, "{name}: action");
        assert_eq!(
            hex(&out),
            hex(output),
            "{name}: output bytes (got, expected)"
        );
        ports.insert(quoted_sport(&out));
    }
    println!(
        "{} ICMP errors rewritten to their flow's backend; backend ports seen: {ports:?}",
        cases.len()
    );
    assert_eq!(ports, [8001, 8002, 9001, 9002].into_iter().collect());

    // Counted as the service's packets, never as new flows; nothing pinned,
    // no reason counted.
    let mut c = dp.service_counters(w.service_id("web").unwrap()).unwrap();
    c.add(&dp.service_counters(w.service_id("web6").unwrap()).unwrap());
    assert_eq!(c.packets, wildcard_runs);
    assert_eq!(c.new_flows, 0);
    assert_eq!(dp.reason_counts().unwrap().iter().sum::<u64>(), 0);
    assert_eq!(dp.flow_count(), 0);
}

/// A client's flow, a reply of it and the frag-needed error about that.
fn flow_reply_error(i: u16) -> (Spec, Spec, Vec<u8>) {
    let client = format!("10.1.{}.{}", i / 250, i % 250 + 1);
    let fwd = Spec::tcp(&client, "10.0.0.1", 20000 + i, 443, TCP_SYN);
    let reply = Spec::tcp("10.0.0.1", &client, 443, 20000 + i, TCP_ACK).payload(&[1; 600]);
    let err = Spec::icmp_error("10.0.5.1", "10.0.0.1", FRAG_NEEDED, &reply, 576 - 28).build();
    (fwd, reply, err)
}

fn send_errors(dp: &Dataplane, errors: &[Vec<u8>]) -> Vec<u16> {
    errors
        .iter()
        .map(|e| {
            let (action, out) = dp.test_run_xdp(e).unwrap();
            assert_eq!(action, XDP_PASS);
            quoted_sport(&out)
        })
        .collect()
}

/// Panics unless two per-flow backend lists agree, naming the first flow
/// that differs (not both lists: they are thousands long).
fn same(got: &[u16], want: &[u16], what: &str) {
    let differ: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{what}: {} of {} flows differ; flow {i}: {} instead of {}",
            differ.len(),
            want.len(),
            got[i],
            want[i]
        );
    }
}

fn send_flows(dp: &Dataplane, flows: &[Spec], flags: u8) -> Vec<u16> {
    flows
        .iter()
        .map(|f| {
            let (action, out) = dp
                .test_run_xdp(&f.clone().with_flags(flags).build())
                .unwrap();
            assert_eq!(action, XDP_PASS);
            packet::parse(&out).unwrap().dport
        })
        .collect()
}

/// In slots whose backend changed, an error goes where the flow's next
/// packet would: to the pinned backend, or for an unpinned established
/// flow to the slot's previous backend, not the table's current one. It
/// pins nothing itself.
#[test]
fn icmp_errors_follow_pinned_and_established_flows_through_table_changes() {
    let mut svc = five_backends();
    let mut w = writer(std::slice::from_ref(&svc));
    let mut flows = Vec::new();
    let mut replies = Vec::new();
    let mut errors = Vec::new();
    for i in 0..3000 {
        let (f, r, e) = flow_reply_error(i);
        flows.push(f);
        replies.push(r);
        errors.push(e);
    }
    let original = send_flows(w.dataplane(), &flows, TCP_SYN);
    same(
        &send_errors(w.dataplane(), &errors),
        &original,
        "errors, fresh table",
    );

    svc.backends
        .push(BackendSpec::new("127.0.0.1:8006".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let mid: Vec<u16> = replies.iter().map(|r| table_port(&w, &svc, r)).collect();
    let moved = (0..flows.len()).filter(|&i| mid[i] != original[i]).count();
    assert!(moved > 0, "no slot changed; the test proves nothing");
    // Unpinned established flows in changed slots stay on their backend;
    // so do errors about them, without pinning anything.
    let errs = send_errors(w.dataplane(), &errors);
    assert_eq!(w.dataplane().flow_count(), 0, "an ICMP error pinned a flow");
    same(&errs, &original, "errors about established, unpinned flows");
    // The flows' own packets agree (and pin).
    same(
        &send_flows(w.dataplane(), &flows, TCP_ACK),
        &original,
        "the flows' own packets",
    );
    let pinned = w.dataplane().flow_count();
    assert!(pinned >= moved, "pinned {pinned}, moved {moved}");

    // Another change: a flow whose slot changed twice is kept only by its
    // pin; errors read the pins.
    svc.backends
        .push(BackendSpec::new("127.0.0.1:8007".parse().unwrap(), 100));
    w.apply(std::slice::from_ref(&svc)).unwrap();
    let end: Vec<u16> = replies.iter().map(|r| table_port(&w, &svc, r)).collect();
    let twice = (0..flows.len())
        .filter(|&i| mid[i] != original[i] && end[i] != mid[i])
        .count();
    assert!(twice > 0, "no slot changed twice; the pins prove nothing");
    same(
        &send_errors(w.dataplane(), &errors),
        &original,
        "errors about pinned flows",
    );
    same(
        &send_flows(w.dataplane(), &flows, TCP_ACK),
        &original,
        "pinned flows",
    );
    let id = w.service_id("web").unwrap();
    let c = w.dataplane().service_counters(id).unwrap();
    assert_eq!(
        c.new_flows,
        flows.len() as u64,
        "only the SYNs are new flows"
    );
    println!(
        "{} flows: {moved} in slots the first change moved, {twice} of them moved again by the second; \
         {pinned} pinned by their own packets, none by errors; every ICMP error followed its flow",
        flows.len()
    );
}

/// Errors that cannot be matched to a service's flow pass untouched, each
/// with its reason: quotes cut short or malformed (`icmp_bad_quote`), quotes
/// of other traffic (`icmp_unmatched`); other ICMP stays `not_tcp_udp`.
#[test]
fn unmatched_or_malformed_icmp_errors_pass_untouched() {
    let w = writer(&[service(
        "web",
        "0.0.0.0:443",
        &["127.0.0.1:8001", "127.0.0.1:8002"],
    )]);
    let dp = w.dataplane();
    let reply4 = Spec::tcp("10.0.0.1", "10.0.0.2", 443, 40000, TCP_ACK).payload(&[3; 300]);
    let reply6 = Spec::udp("fd00::1", "fd00::2", 443, 40000).payload(&[3; 300]);
    let err4 = |len| Spec::icmp_error("10.0.5.1", "10.0.0.1", FRAG_NEEDED, &reply4, len).build();
    let err6 = |len| Spec::icmp_error("fd00:5::1", "fd00::1", TOO_BIG, &reply6, len).build();
    let quoted4 = 14 + 20 + 8;
    let mut ihl4 = err4(548);
    ihl4[quoted4] = 0x44;
    let mut v6_in_v4 = err4(548);
    v6_in_v4[quoted4] = 0x65;
    let mut later_fragment = reply4.clone();
    later_fragment.fragment = Some((100, true));
    let mut v4_in_v6 = err6(548);
    v4_in_v6[14 + 40 + 8] = 0x45;
    let mut frag6 = reply6.clone();
    frag6.fragment = Some((100, false));
    let mut ext6 = reply6.clone();
    ext6.ext_headers = vec![(60, vec![1, 4, 0, 0, 0, 0])];
    let mut redirect = err4(548);
    redirect[14 + 20] = 5; // ICMP redirect: not an error about a flow

    let bad = Reason::IcmpBadQuote;
    let unmatched = Reason::IcmpUnmatched;
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        ("ipv4 quote cut inside the ip header", err4(16), bad),
        ("ipv4 quote with 4 bytes of tcp", err4(24), bad),
        ("ipv4 quote with ihl 4", ihl4, bad),
        ("ipv4 error quoting an ipv6 header", v6_in_v4, bad),
        (
            "ipv4 quote of a later fragment",
            Spec::icmp_error("10.0.5.1", "10.0.0.1", FRAG_NEEDED, &later_fragment, 100).build(),
            bad,
        ),
        ("ipv6 quote cut inside the ip header", err6(30), bad),
        ("ipv6 quote with 4 bytes of udp", err6(44), bad),
        ("ipv6 error quoting an ipv4 header", v4_in_v6, bad),
        (
            "ipv6 quote with a fragment header (not walked)",
            Spec::icmp_error("fd00:5::1", "fd00::1", TOO_BIG, &frag6, 100).build(),
            unmatched,
        ),
        (
            "ipv4 quote of a reply from port 22",
            Spec::icmp_error(
                "10.0.5.1",
                "10.0.0.1",
                FRAG_NEEDED,
                &reply4.clone().with_sport(22),
                548,
            )
            .build(),
            unmatched,
        ),
        (
            "ipv4 quote of a packet to port 443 elsewhere (this host as a client)",
            Spec::icmp_error(
                "10.0.5.1",
                "10.0.0.1",
                FRAG_NEEDED,
                &Spec::tcp("10.0.0.1", "10.0.0.2", 40000, 443, TCP_SYN),
                548,
            )
            .build(),
            unmatched,
        ),
        (
            "ipv4 quote of an echo reply",
            Spec::icmp_error(
                "10.0.5.1",
                "10.0.0.1",
                FRAG_NEEDED,
                &Spec::new("10.0.0.1", "10.0.0.2", packet::L4::Icmp),
                548,
            )
            .build(),
            unmatched,
        ),
        (
            "ipv6 quote of a reply from port 53",
            Spec::icmp_error(
                "fd00:5::1",
                "fd00::1",
                TOO_BIG,
                &reply6.clone().with_sport(53),
                548,
            )
            .build(),
            unmatched,
        ),
        (
            "ipv6 quote with an extension header (not walked)",
            Spec::icmp_error("fd00:5::1", "fd00::1", TOO_BIG, &ext6, 548).build(),
            unmatched,
        ),
        ("ipv4 redirect", redirect, Reason::NotTcpUdp),
        (
            "ipv4 echo request",
            Spec::new("10.0.0.2", "10.0.0.1", packet::L4::Icmp).build(),
            Reason::NotTcpUdp,
        ),
        (
            "ipv6 echo request",
            Spec::new("fd00::2", "fd00::1", packet::L4::Icmp).build(),
            Reason::NotTcpUdp,
        ),
    ];
    for (name, input, _) in &cases {
        let (action, out) = dp.test_run_xdp(input).expect("test run");
        assert_eq!(action, XDP_PASS, "{name}: action");
        assert_eq!(hex(&out), hex(input), "{name}: frame changed");
    }
    let counts = dp.reason_counts().unwrap();
    for (i, name) in REASON_NAMES.iter().enumerate() {
        let expected = cases.iter().filter(|c| c.2 as usize == i).count() as u64;
        assert_eq!(counts[i], expected, "reason {name}");
    }
    assert_eq!(dp.service_counters(0).unwrap().packets, 0);
}

const BODY: usize = 2 << 20;

/// Plain TCP backends: every connection gets `BODY` bytes after its first
/// read, then the server closes it. Stops (and joins) on drop.
struct BulkServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    accept: Option<thread::JoinHandle<()>>,
}

impl BulkServer {
    fn start(ns: &str, port: u16) -> Self {
        let listener = netns::within(ns, move || {
            let l = TcpListener::bind(("::", port)).expect("bind a backend port");
            l.set_nonblocking(true).unwrap();
            l
        });
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), served.clone());
        let accept = thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let n = n.clone();
                        conns.push(thread::spawn(move || {
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                            c.set_write_timeout(Some(Duration::from_secs(25))).unwrap();
                            let mut req = [0u8; 64];
                            if c.read(&mut req).is_err() {
                                return;
                            }
                            if c.write_all(&vec![b'x'; BODY]).is_ok() {
                                n.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = c.shutdown(std::net::Shutdown::Both);
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        BulkServer {
            stop,
            served,
            accept: Some(accept),
        }
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// One download from `to`: the bytes received before EOF or `limit`.
fn download(to: SocketAddr, limit: Duration) -> (usize, Duration) {
    let t0 = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        return (0, t0.elapsed());
    };
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    if s.write_all(b"GET\n").is_err() {
        return (0, t0.elapsed());
    }
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => break,
        }
    }
    (got, t0.elapsed())
}

/// A counter from /proc/net/snmp (`Icmp: OutDestUnreachs`) or snmp6.
fn snmp(ns: &str, file: &str, name: &str) -> u64 {
    let text = run_in(ns, &["cat", file]);
    if file.ends_with("snmp6") {
        return text
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name)).then(|| it.next().unwrap().parse().unwrap())
            })
            .unwrap_or(0);
    }
    let (group, field) = name.split_once(':').unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{group}:")))
        .collect();
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    let i = names.iter().position(|n| *n == field).unwrap();
    values[i].parse().unwrap()
}

/// client --(MTU 1300 hop)-- router -- balancer (local mode, backends on
/// ports of its own host). The backends send full 1500-byte segments (the
/// client's MSS), the router answers with "fragmentation needed" / "packet
/// too big" to the service address, and only if the balancer hands those
/// to the backend's socket do downloads of 2 MB complete. Without it
/// (today's main) none does: the segments are dropped at the router for
/// ever.
#[test]
fn path_mtu_discovery_works_through_the_balancer_v4_and_v6() {
    let mut topo = Topology::new();
    let client = topo.namespace("cl");
    let router = topo.namespace("rt");
    let lb = topo.namespace("lb");
    topo.veth(
        (&client, "cl0", &["10.210.0.2/24", "fd00:210::2/64"]),
        (&router, "rt0", &["10.210.0.1/24", "fd00:210::1/64"]),
    );
    topo.veth(
        (&router, "rt1", &["10.211.0.1/24", "fd00:211::1/64"]),
        (&lb, "lb0", &["10.211.0.2/24", "fd00:211::2/64"]),
    );
    run_in(&router, &["ip", "link", "set", "rt0", "mtu", "1300"]);
    run_in(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    run_in(
        &router,
        &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
    );
    for (ns, gw4, gw6) in [
        (&client, "10.210.0.1", "fd00:210::1"),
        (&lb, "10.211.0.1", "fd00:211::1"),
    ] {
        run_in(ns, &["ip", "route", "add", "default", "via", gw4]);
        run_in(ns, &["ip", "-6", "route", "add", "default", "via", gw6]);
    }
    let servers = [BulkServer::start(&lb, 8001), BulkServer::start(&lb, 8002)];
    let spec = service("web", "0.0.0.0:443", &["127.0.0.1:8001", "127.0.0.1:8002"]);
    let spec6 = service("web6", "[::]:443", &["[::1]:8001", "[::1]:8002"]);
    let writer: MapWriter = netns::within(&lb, move || {
        let mut dp = Dataplane::load(Options {
            max_services: 2,
            flow_table_size: 4096,
            ..Options::default()
        })
        .expect("load");
        dp.attach("lb0", AttachMode::Native).expect("attach");
        let mut w = MapWriter::new(dp);
        w.apply(&[spec, spec6]).expect("apply");
        w
    });
    let icmp_before = (
        snmp(&router, "/proc/net/snmp", "Icmp:OutDestUnreachs"),
        snmp(&router, "/proc/net/snmp6", "Icmp6OutPktTooBigs"),
    );

    let mut failures = Vec::new();
    for to in ["10.211.0.2:443", "[fd00:211::2]:443"] {
        let to: SocketAddr = to.parse().unwrap();
        for i in 0..2 {
            let (got, took) = netns::within(&client, move || download(to, Duration::from_secs(20)));
            println!("download {i} from {to}: {got} of {BODY} bytes in {took:.2?}");
            if got != BODY {
                failures.push(format!("{to} #{i}: {got} of {BODY} bytes in {took:.2?}"));
            }
        }
    }
    let icmp = (
        snmp(&router, "/proc/net/snmp", "Icmp:OutDestUnreachs") - icmp_before.0,
        snmp(&router, "/proc/net/snmp6", "Icmp6OutPktTooBigs") - icmp_before.1,
    );
    let served: u64 = servers
        .iter()
        .map(|s| s.served.load(Ordering::Relaxed))
        .sum();
    let route4 = run_in(&lb, &["ip", "route", "get", "10.210.0.2"]);
    let route6 = run_in(&lb, &["ip", "-6", "route", "get", "fd00:210::2"]);
    println!(
        "router sent {} frag-needed and {} packet-too-big; backends completed {served} bodies; \
         balancer's routes to the client: {} / {}",
        icmp.0,
        icmp.1,
        route4.trim(),
        route6.trim()
    );
    assert!(failures.is_empty(), "downloads failed: {failures:?}");
    // The path really needed PMTU discovery, and the backends learnt it.
    assert!(icmp.0 > 0 && icmp.1 > 0, "the router sent no ICMP errors");
    assert!(
        route4.contains("mtu 1300"),
        "ipv4 path MTU not learnt: {route4}"
    );
    assert!(
        route6.contains("mtu 1300"),
        "ipv6 path MTU not learnt: {route6}"
    );
    drop(writer);
    drop(servers);
}
