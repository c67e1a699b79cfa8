//! Backends on other hosts: `nat` and `dsr`, IPv4 and IPv6. Packet fixtures
//! through `BPF_PROG_TEST_RUN` with a real FIB (routes and neighbours of a
//! namespace the test builds), then real connections through namespaces
//! standing in for client, balancer and backend hosts: HTTPS with a
//! certificate of its own on each backend host, passed through untouched.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use lb_common::Reason;
use lb_tests::{
    fixtures::forwarded_service,
    https::{Backend, ClientTls, Pki},
    netns::{self, Topology, run_in},
    packet::{self, Spec, TCP_ACK, TCP_SYN},
    topology::NsRuntime,
};
use lb_userspace::dataplane::{AttachMode, Dataplane, Forwarding, MapWriter, Options, ServiceSpec};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x09, 0x02];
const LB0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const LBB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x03, 0x05];
const NEIGHBOUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x04, 0x07];
const BACKEND2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x03, 0x06];

fn forwarding_on(ns: &str) {
    run_in(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    run_in(ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
}

fn ifindex(ns: &str, ifname: &str) -> u32 {
    run_in(ns, &["cat", &format!("/sys/class/net/{ifname}/ifindex")])
        .trim()
        .parse()
        .unwrap()
}

/// The balancer's namespace for fixtures with a real FIB: the client's
/// segment on `lb0` (a `dsr` neighbour `.7` there), the backend network on
/// `lbb` (backends `.5` and `.6`), every neighbour permanent, forwarding on.
fn fib_lab() -> (Topology, String) {
    let mut topo = Topology::new();
    let lb = topo.namespace("lb");
    let client = topo.namespace("cl");
    let backend = topo.namespace("be");
    topo.veth(
        (&lb, "lb0", &["10.203.0.1/24", "fd00:203::1/64"]),
        (&client, "cl0", &["10.203.0.2/24", "fd00:203::2/64"]),
    );
    topo.veth(
        (&lb, "lbb", &["10.203.1.1/24", "fd00:203:1::1/64"]),
        (&backend, "eth0", &["10.203.1.5/24", "fd00:203:1::5/64"]),
    );
    for (dev, m) in [("lb0", LB0_MAC), ("lbb", LBB_MAC)] {
        run_in(
            &lb,
            &["ip", "link", "set", dev, "address", &netns::mac_string(m)],
        );
    }
    for (addr, m, dev) in [
        ("10.203.1.5", BACKEND_MAC, "lbb"),
        ("fd00:203:1::5", BACKEND_MAC, "lbb"),
        ("10.203.1.6", BACKEND2_MAC, "lbb"),
        ("fd00:203:1::6", BACKEND2_MAC, "lbb"),
        ("10.203.0.7", NEIGHBOUR_MAC, "lb0"),
        ("fd00:203::7", NEIGHBOUR_MAC, "lb0"),
    ] {
        netns::neighbour(&lb, addr, &netns::mac_string(m), dev, "permanent");
    }
    forwarding_on(&lb);
    (topo, lb)
}

/// A data plane loaded in `ns`, redirecting to every interface there now.
fn fib_writer(ns: &str, services: Vec<ServiceSpec>) -> MapWriter {
    netns::within(ns, move || {
        let mut dp = Dataplane::load(Options {
            max_services: 16,
            flow_table_size: 4096,
            ..Options::default()
        })
        .expect("load");
        dp.sync_tx_ports().expect("redirect targets");
        let mut w = MapWriter::new(dp);
        w.apply(&services).expect("apply");
        w
    })
}

/// Frames in, exact frames and actions out, with the FIB of a namespace in
/// which the backend network hangs off a second interface (`nat` redirects
/// there) and a `dsr` backend shares the client's segment (`XDP_TX`).
#[test]
fn nat_and_dsr_fixtures_with_a_real_fib() {
    let (_topo, lb) = fib_lab();
    let services = vec![
        forwarded_service(
            "nat4",
            "10.203.0.10:443",
            Forwarding::Nat,
            &["10.203.1.5:8443"],
        ),
        forwarded_service(
            "nat6",
            "[fd00:203::10]:443",
            Forwarding::Nat,
            &["[fd00:203:1::5]:8443"],
        ),
        forwarded_service(
            "dsr4",
            "10.203.0.20:443",
            Forwarding::Dsr,
            &["10.203.0.7:443"],
        ),
        forwarded_service(
            "dsr6",
            "[fd00:203::20]:443",
            Forwarding::Dsr,
            &["[fd00:203::7]:443"],
        ),
        // A backend on the backend network with no neighbour entry.
        forwarded_service(
            "miss",
            "10.203.0.30:443",
            Forwarding::Nat,
            &["10.203.1.99:443"],
        ),
    ];
    let w = fib_writer(&lb, services);
    let lb_ns = lb.clone();
    netns::within(&lb, move || {
        let dp = w.dataplane();
        let lb0 = ifindex(&lb_ns, "lb0");
        let from_client = |s: Spec| s.with_macs(LB0_MAC, CLIENT_MAC);
        let cases: Vec<(&str, Spec, u32, Spec)> = vec![
            (
                "nat ipv4 tcp: address and port rewritten, redirected to the backend side",
                from_client(Spec::tcp("10.203.0.2", "10.203.0.10", 40000, 443, TCP_SYN)),
                XDP_REDIRECT,
                Spec::tcp("10.203.0.2", "10.203.1.5", 40000, 8443, TCP_SYN)
                    .with_macs(BACKEND_MAC, LBB_MAC),
            ),
            (
                "nat ipv6 udp",
                from_client(Spec::udp("fd00:203::2", "fd00:203::10", 40000, 443).payload(b"quic")),
                XDP_REDIRECT,
                Spec::udp("fd00:203::2", "fd00:203:1::5", 40000, 8443)
                    .payload(b"quic")
                    .with_macs(BACKEND_MAC, LBB_MAC),
            ),
            (
                "dsr ipv4: only MACs change, out the way it came",
                from_client(
                    Spec::tcp("10.203.0.2", "10.203.0.20", 40000, 443, TCP_ACK).payload(b"x"),
                ),
                XDP_TX,
                Spec::tcp("10.203.0.2", "10.203.0.20", 40000, 443, TCP_ACK)
                    .payload(b"x")
                    .with_macs(NEIGHBOUR_MAC, LB0_MAC),
            ),
            (
                "dsr ipv6",
                from_client(Spec::tcp(
                    "fd00:203::2",
                    "fd00:203::20",
                    40000,
                    443,
                    TCP_SYN,
                )),
                XDP_TX,
                Spec::tcp("fd00:203::2", "fd00:203::20", 40000, 443, TCP_SYN)
                    .with_macs(NEIGHBOUR_MAC, LB0_MAC),
            ),
        ];
        for (name, input, action, output) in &cases {
            let (got, out) = dp.test_run_xdp_on(&input.build(), lb0).expect("test run");
            assert_eq!(got, *action, "{name}: action");
            assert_eq!(out, output.build(), "{name}: bytes");
            packet::verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["nat4", "nat6", "dsr4", "dsr6"] {
            let c = dp.service_counters(w.service_id(name).unwrap()).unwrap();
            assert_eq!(c.packets, 1, "{name} counted");
        }

        // Replies from nat backends are translated back on egress; dsr
        // backends answer clients themselves, so nothing maps their port.
        let replies = [
            (
                Spec::tcp("10.203.1.5", "10.203.0.2", 8443, 40000, TCP_SYN | TCP_ACK),
                Spec::tcp("10.203.0.10", "10.203.0.2", 443, 40000, TCP_SYN | TCP_ACK),
            ),
            (
                Spec::udp("fd00:203:1::5", "fd00:203::2", 8443, 40000).payload(b"r"),
                Spec::udp("fd00:203::10", "fd00:203::2", 443, 40000).payload(b"r"),
            ),
            (
                Spec::tcp("10.203.0.7", "10.203.0.2", 443, 40000, TCP_ACK),
                Spec::tcp("10.203.0.7", "10.203.0.2", 443, 40000, TCP_ACK),
            ),
        ];
        for (input, output) in replies {
            let (_, out) = dp.test_run_tc(&input.build()).unwrap();
            assert_eq!(out, output.build());
            packet::verify_checksums(&out).unwrap();
        }

        // ICMP errors about the flows above, quoting the replies the
        // clients could not take: `nat` addresses the error and its quote
        // to the backend, `dsr` changes only MACs; both route like the
        // flow's own packets.
        let before: Vec<lb_common::Counters> = ["nat4", "nat6", "dsr4", "dsr6", "miss"]
            .iter()
            .map(|n| dp.service_counters(w.service_id(n).unwrap()).unwrap())
            .collect();
        let frag = (packet::ICMP_DEST_UNREACH, packet::ICMP_FRAG_NEEDED, 1300u32);
        let too_big = (packet::ICMPV6_PACKET_TOO_BIG, 0u8, 1300u32);
        let big = vec![0x42u8; 1400];
        let tcp = |src: &str, sport: u16| {
            Spec::tcp(src, "10.203.0.2", sport, 40000, TCP_ACK).payload(&big)
        };
        let udp6 =
            |src: &str, sport: u16| Spec::udp(src, "fd00:203::2", sport, 40000).payload(&big);
        let err = |from: &str, to: &str, kind, quoted: &Spec, len| {
            Spec::icmp_error(from, to, kind, quoted, len)
        };
        // A frag-needed error about the nat4 flow, `quoted` bytes of its
        // reply quoted: the error and its quote move to the backend.
        let nat4_frag_needed = |name, quoted| {
            (
                name,
                from_client(err(
                    "10.203.0.2",
                    "10.203.0.10",
                    frag,
                    &tcp("10.203.0.10", 443),
                    quoted,
                )),
                XDP_REDIRECT,
                err(
                    "10.203.0.2",
                    "10.203.1.5",
                    frag,
                    &tcp("10.203.1.5", 8443),
                    quoted,
                )
                .with_macs(BACKEND_MAC, LBB_MAC),
            )
        };
        let icmp: Vec<(&str, Spec, u32, Spec)> = vec![
            nat4_frag_needed(
                "nat ipv4 frag needed: error and quote name the backend, redirected",
                548,
            ),
            nat4_frag_needed("nat ipv4 frag needed, 8 bytes of tcp quoted", 28),
            (
                "nat ipv6 packet too big (the pseudo-header's destination changes too)",
                from_client(err(
                    "fd00:203::2",
                    "fd00:203::10",
                    too_big,
                    &udp6("fd00:203::10", 443),
                    1232,
                )),
                XDP_REDIRECT,
                err(
                    "fd00:203::2",
                    "fd00:203:1::5",
                    too_big,
                    &udp6("fd00:203:1::5", 8443),
                    1232,
                )
                .with_macs(BACKEND_MAC, LBB_MAC),
            ),
            (
                "dsr ipv4 frag needed: only MACs change",
                from_client(err(
                    "10.203.0.2",
                    "10.203.0.20",
                    frag,
                    &tcp("10.203.0.20", 443),
                    548,
                )),
                XDP_TX,
                err(
                    "10.203.0.2",
                    "10.203.0.20",
                    frag,
                    &tcp("10.203.0.20", 443),
                    548,
                )
                .with_macs(NEIGHBOUR_MAC, LB0_MAC),
            ),
            (
                "dsr ipv6 packet too big",
                from_client(err(
                    "fd00:203::2",
                    "fd00:203::20",
                    too_big,
                    &udp6("fd00:203::20", 443),
                    1232,
                )),
                XDP_TX,
                err(
                    "fd00:203::2",
                    "fd00:203::20",
                    too_big,
                    &udp6("fd00:203::20", 443),
                    1232,
                )
                .with_macs(NEIGHBOUR_MAC, LB0_MAC),
            ),
            (
                "nat error, backend without a neighbour: rewritten, passed to the stack",
                from_client(err(
                    "10.203.0.2",
                    "10.203.0.30",
                    frag,
                    &tcp("10.203.0.30", 443),
                    548,
                )),
                XDP_PASS,
                from_client(err(
                    "10.203.0.2",
                    "10.203.1.99",
                    frag,
                    &tcp("10.203.1.99", 443),
                    548,
                )),
            ),
        ];
        for (name, input, action, output) in &icmp {
            let input = input.build();
            let (got, out) = dp.test_run_xdp_on(&input, lb0).expect("test run");
            assert_eq!(got, *action, "{name}: action");
            assert_eq!(out, output.build(), "{name}: bytes");
        }
        // Passed for lack of a neighbour: not counted as forwarded.
        assert_eq!(dp.reason_counts().unwrap()[Reason::FibNoNeigh as usize], 1);
        let per_service = [2, 1, 1, 1, 0];
        for (i, n) in ["nat4", "nat6", "dsr4", "dsr6", "miss"].iter().enumerate() {
            let c = dp.service_counters(w.service_id(n).unwrap()).unwrap();
            assert_eq!(
                c.packets - before[i].packets,
                per_service[i],
                "{n}: errors counted"
            );
            assert_eq!(
                c.new_flows, before[i].new_flows,
                "{n}: an error is no new flow"
            );
        }
        assert_eq!(dp.flow_count(), 0, "an error pinned a flow");
    });
}

/// The data plane attached to `iface` in namespace `ns`, serving `services`.
fn balancer(ns: &str, iface: &'static str, services: Vec<ServiceSpec>) -> MapWriter {
    netns::within(ns, move || {
        let mut dp = Dataplane::load(Options {
            max_services: 4,
            flow_table_size: 4096,
            ..Options::default()
        })
        .unwrap();
        dp.attach(iface, AttachMode::Native).expect("attach");
        let mut w = MapWriter::new(dp);
        w.apply(&services).unwrap();
        w
    })
}

/// Real HTTPS backends, one per backend host (each on a runtime inside its
/// host's namespace) with a certificate of its own from a CA made for the
/// test, and a client in the client's namespace that trusts only that CA
/// and names the backend from the certificate it sees. Fields drop in
/// order: the client, the backends (stopped), their runtimes.
struct Https {
    client: NsRuntime,
    tls: ClientTls,
    backends: Vec<Backend>,
    _hosts: Vec<NsRuntime>,
}

impl Https {
    /// A backend named `<name>.test` on `[::]:port` (dual stack) of each
    /// `(name, namespace)` host.
    fn start(client_ns: &str, hosts: &[(&str, &str)], port: u16) -> Https {
        let pki = Pki::new();
        let tls = pki.client(&[]);
        let mut runtimes = Vec::new();
        let mut backends = Vec::new();
        for &(name, ns) in hosts {
            let rt = NsRuntime::new(ns, 1);
            let identity = pki.issue(&format!("{name}.test"));
            tls.learn(&identity);
            backends.push(Backend::start(&rt, port, identity));
            runtimes.push(rt);
        }
        Https {
            client: NsRuntime::new(client_ns, 2),
            tls,
            backends,
            _hosts: runtimes,
        }
    }

    /// `n` HTTPS GETs to `to`, each over a new connection, 4 at a time.
    /// Every one must succeed and be answered by the backend whose
    /// certificate the client saw (TLS passed through, not terminated), and
    /// each backend must count exactly the connections and requests the
    /// client got from it. Returns the answers by backend.
    fn spread(&self, what: &str, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
        const WORKERS: usize = 4;
        let before: Vec<_> = self.backends.iter().map(Backend::stats).collect();
        let tls = self.tls.clone();
        let results = self
            .client
            .run(async move { tls.get_many(to, n, WORKERS).await });
        assert_eq!(results.len(), n);
        let failures: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|f| f.to_string()))
            .collect();
        assert!(
            failures.is_empty(),
            "{what} {to}: {} of {n} HTTPS requests failed: {failures:?}",
            failures.len()
        );
        let mut per: BTreeMap<String, usize> =
            self.backends.iter().map(|b| (b.name.clone(), 0)).collect();
        for r in results.iter().flatten() {
            assert_eq!(
                r.cert, r.body,
                "{what} {to}: the certificate seen vs the backend that answered"
            );
            *per.get_mut(&r.cert).expect("a backend of this test") += 1;
        }
        let mut line = format!("{what} {to}: {n} HTTPS requests, all answered;");
        for (b, was) in self.backends.iter().zip(before) {
            let now = b.stats();
            let got = per[&b.name] as u64;
            line += &format!(
                " {} {got} (accepted {}, completed {})",
                b.name,
                now.accepted - was.accepted,
                now.requests - was.requests
            );
            assert_eq!(now.accepted - was.accepted, got, "{what} {to}: {}", b.name);
            assert_eq!(now.requests - was.requests, got, "{what} {to}: {}", b.name);
            assert_eq!(now.errors, 0, "{what} {to}: {:?}", b.last_error());
            assert!(got > 0, "{what} {to}: {} served nothing: {per:?}", b.name);
        }
        println!("{line}");
        per
    }
}

/// A client on a veth hands its frames over with the TCP/UDP checksum only
/// half done (TX checksum offload). A real client's NIC finishes it; so must
/// this one, or frames that XDP redirects to another interface (where no
/// one finishes it) arrive broken.
fn full_checksums(ns: &str, ifname: &str) {
    run_in(ns, &["ethtool", "-K", ifname, "tx", "off"]);
}

/// Client, balancer and two backend hosts, each a namespace: the balancer
/// holds the service addresses, forwards IP, and the backends route back
/// through it. (topology, balancer, client, backend 1, backend 2)
fn nat_lab() -> (Topology, String, String, String, String) {
    let mut topo = Topology::new();
    let lb = topo.namespace("lb");
    let client = topo.namespace("cl");
    let b1 = topo.namespace("b1");
    let b2 = topo.namespace("b2");
    topo.veth(
        (
            &lb,
            "lb0",
            &[
                "10.203.0.1/24",
                "10.203.0.10/24",
                "fd00:203::1/64",
                "fd00:203::10/64",
            ],
        ),
        (&client, "cl0", &["10.203.0.2/24", "fd00:203::2/64"]),
    );
    topo.veth(
        (&lb, "lbb1", &["10.203.1.1/24", "fd00:203:1::1/64"]),
        (&b1, "eth0", &["10.203.1.2/24", "fd00:203:1::2/64"]),
    );
    topo.veth(
        (&lb, "lbb2", &["10.203.2.1/24", "fd00:203:2::1/64"]),
        (&b2, "eth0", &["10.203.2.2/24", "fd00:203:2::2/64"]),
    );
    forwarding_on(&lb);
    full_checksums(&client, "cl0");
    for (ns, gw4, gw6) in [
        (&b1, "10.203.1.1", "fd00:203:1::1"),
        (&b2, "10.203.2.1", "fd00:203:2::1"),
    ] {
        run_in(ns, &["ip", "route", "add", "default", "via", gw4]);
        run_in(ns, &["ip", "-6", "route", "add", "default", "via", gw6]);
        // A veth receives XDP-redirected frames only with NAPI on.
        run_in(ns, &["ethtool", "-K", "eth0", "gro", "on"]);
    }
    (topo, lb, client, b1, b2)
}

/// Client, balancer and two backend hosts, each a namespace; the backends
/// route back through the balancer.
#[test]
fn nat_spreads_connections_over_backend_hosts_v4_and_v6() {
    let (_topo, lb, client, b1, b2) = nat_lab();
    let https = Https::start(&client, &[("b1", &b1), ("b2", &b2)], 8443);
    let services = vec![
        forwarded_service(
            "web4",
            "10.203.0.10:443",
            Forwarding::Nat,
            &["10.203.1.2:8443", "10.203.2.2:8443"],
        ),
        forwarded_service(
            "web6",
            "[fd00:203::10]:443",
            Forwarding::Nat,
            &["[fd00:203:1::2]:8443", "[fd00:203:2::2]:8443"],
        ),
    ];
    let writer = balancer(&lb, "lb0", services);
    for vip in ["10.203.0.10:443", "[fd00:203::10]:443"] {
        https.spread("nat", vip.parse().unwrap(), 40);
    }
    // The client's address is preserved: the backends saw only the client.
    let client_addrs: Vec<IpAddr> = ["10.203.0.2", "fd00:203::2"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    for b in &https.backends {
        let mut peers: Vec<IpAddr> = b.peers().into_iter().collect();
        peers.sort();
        assert_eq!(peers, client_addrs, "{}: the peers it saw", b.name);
    }
    let dp = writer.dataplane();
    let redirected = dp.action_counts().unwrap()[XDP_REDIRECT as usize];
    assert!(redirected > 0, "nothing went through XDP_REDIRECT");
}

/// One L2 segment (a bridge in its own namespace): client, balancer and two
/// backends that hold the service address on their loopback. Replies must
/// reach the client from the backends' MACs, never the balancer's.
#[test]
fn dsr_replies_bypass_the_balancer_v4_and_v6() {
    let mut topo = Topology::new();
    let sw = topo.namespace("sw");
    let lb = topo.namespace("lb");
    let client = topo.namespace("cl");
    let b1 = topo.namespace("b1");
    let b2 = topo.namespace("b2");
    run_in(&sw, &["ip", "link", "add", "br0", "type", "bridge"]);
    run_in(&sw, &["ip", "link", "set", "br0", "up"]);
    let hosts = [
        (&client, "swc", "10.204.0.2/24", "fd00:204::2/64"),
        (&lb, "swl", "10.204.0.1/24", "fd00:204::1/64"),
        (&b1, "sw1", "10.204.0.11/24", "fd00:204::11/64"),
        (&b2, "sw2", "10.204.0.12/24", "fd00:204::12/64"),
    ];
    for (ns, port, v4, v6) in hosts {
        topo.veth((&sw, port, &[]), (ns, "eth0", &[v4, v6]));
        run_in(&sw, &["ip", "link", "set", port, "master", "br0"]);
    }
    full_checksums(&client, "eth0");
    // A veth delivers XDP_TX frames to its peer only when the peer runs an
    // XDP program itself (GRO is not enough for XDP_TX here): give the
    // switch port one that passes everything (no services).
    let _port_program = netns::within(&sw, || {
        let mut dp = Dataplane::load(Options {
            max_services: 1,
            maglev_size: 251,
            flow_table_size: 1024,
            ..Options::default()
        })
        .unwrap();
        dp.attach("swl", AttachMode::Native)
            .expect("attach to the switch port");
        dp
    });
    run_in(
        &lb,
        &["ip", "addr", "add", "10.204.0.100/24", "dev", "eth0"],
    );
    run_in(
        &lb,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:204::100/64",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    forwarding_on(&lb);
    for ns in [&b1, &b2] {
        run_in(ns, &["ip", "addr", "add", "10.204.0.100/32", "dev", "lo"]);
        run_in(
            ns,
            &["ip", "-6", "addr", "add", "fd00:204::100/128", "dev", "lo"],
        );
        run_in(ns, &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"]);
        run_in(ns, &["sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"]);
    }
    let https = Https::start(&client, &[("b1", &b1), ("b2", &b2)], 443);
    let services = vec![
        forwarded_service(
            "web4",
            "10.204.0.100:443",
            Forwarding::Dsr,
            &["10.204.0.11:443", "10.204.0.12:443"],
        ),
        forwarded_service(
            "web6",
            "[fd00:204::100]:443",
            Forwarding::Dsr,
            &["[fd00:204::11]:443", "[fd00:204::12]:443"],
        ),
    ];
    let writer = balancer(&lb, "eth0", services);
    // The backends' MACs, as the kernel would learn them from traffic.
    let mut backend_macs = HashMap::new();
    for (host, ns, v4, v6) in [
        ("b1", &b1, "10.204.0.11", "fd00:204::11"),
        ("b2", &b2, "10.204.0.12", "fd00:204::12"),
    ] {
        let m = run_in(ns, &["cat", "/sys/class/net/eth0/address"])
            .trim()
            .to_string();
        backend_macs.insert(m.clone(), (host, 0usize));
        for addr in [v4, v6] {
            netns::neighbour(&lb, addr, &m, "eth0", "reachable");
        }
    }
    let lb_mac = run_in(&lb, &["cat", "/sys/class/net/eth0/address"])
        .trim()
        .to_string();
    let capture = lb_tests::capture::Capture::start(&client, "eth0");
    let mut requests = 0;
    for vip in ["10.204.0.100:443", "[fd00:204::100]:443"] {
        requests += https
            .spread("dsr", vip.parse().unwrap(), 40)
            .values()
            .sum::<usize>();
    }
    let frames = capture.stop();
    let replies: Vec<_> = frames
        .iter()
        .filter_map(|f| packet::parse(f).map(|p| (f, p)))
        .filter(|(_, p)| {
            p.sport == 443
                && (p.src.to_string() == "10.204.0.100" || p.src.to_string() == "fd00:204::100")
        })
        .collect();
    // At least a SYN-ACK and the TLS server flight per connection.
    assert!(
        replies.len() >= 2 * requests,
        "saw only {} replies from the service address for {requests} connections",
        replies.len()
    );
    for (f, p) in &replies {
        let src_mac = netns::mac_string(f[6..12].try_into().unwrap());
        assert_ne!(
            src_mac, lb_mac,
            "a reply from {} came through the balancer",
            p.src
        );
        backend_macs
            .get_mut(&src_mac)
            .unwrap_or_else(|| panic!("a reply from {} came from {src_mac}", p.src))
            .1 += 1;
    }
    println!(
        "dsr: {} replies from the service address, by source MAC: {backend_macs:?}",
        replies.len()
    );
    assert!(
        backend_macs.values().all(|&(_, n)| n > 0),
        "replies from each backend's MAC: {backend_macs:?}"
    );
    let tx = writer.dataplane().action_counts().unwrap()[XDP_TX as usize];
    assert!(tx > 0, "nothing went out with XDP_TX");
}

/// Fragmented UDP datagrams through `nat` (two backend hosts) and `dsr`,
/// IPv4 and IPv6: the first fragment is balanced, the later ones (no ports)
/// go to the same backend, with only what applies to a fragment changed
/// (`nat`: destination address and MACs; `dsr`: MACs).
#[test]
fn later_fragments_follow_their_first_in_nat_and_dsr() {
    let (_topo, lb) = fib_lab();
    let services = vec![
        forwarded_service(
            "nat4",
            "10.203.0.10:443",
            Forwarding::Nat,
            &["10.203.1.5:8443", "10.203.1.6:8443"],
        ),
        forwarded_service(
            "nat6",
            "[fd00:203::10]:443",
            Forwarding::Nat,
            &["[fd00:203:1::5]:8443", "[fd00:203:1::6]:8443"],
        ),
        forwarded_service(
            "dsr4",
            "10.203.0.20:443",
            Forwarding::Dsr,
            &["10.203.0.7:443"],
        ),
        forwarded_service(
            "dsr6",
            "[fd00:203::20]:443",
            Forwarding::Dsr,
            &["[fd00:203::7]:443"],
        ),
    ];
    let w = fib_writer(&lb, services);
    let lb_ns = lb.clone();
    netns::within(&lb, move || {
        let dp = w.dataplane();
        let lb0 = ifindex(&lb_ns, "lb0");
        let backend_mac: HashMap<IpAddr, [u8; 6]> = [
            ("10.203.1.5", BACKEND_MAC),
            ("fd00:203:1::5", BACKEND_MAC),
            ("10.203.1.6", BACKEND2_MAC),
            ("fd00:203:1::6", BACKEND2_MAC),
        ]
        .into_iter()
        .map(|(a, m)| (a.parse().unwrap(), m))
        .collect();
        let from_client = |s: &Spec| s.clone().with_macs(LB0_MAC, CLIENT_MAC).build();
        let mut per_backend: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for i in 0..24u16 {
            let (src, vip) = if i % 2 == 0 {
                ("10.203.0.2", "10.203.0.10")
            } else {
                ("fd00:203::2", "fd00:203::10")
            };
            let [first, a, b] = packet::udp_fragments(src, vip, 41000 + i, 443, 0x200 + i as u32);
            let (action, out) = dp.test_run_xdp_on(&from_client(&first), lb0).unwrap();
            assert_eq!(action, XDP_REDIRECT, "datagram {i}: first fragment");
            let be = packet::parse(&out).unwrap().dst;
            let mac = backend_mac[&be];
            let want = first
                .clone()
                .with_dst(&be.to_string(), 8443)
                .with_macs(mac, LBB_MAC)
                .build();
            assert_eq!(out, want, "datagram {i}: first fragment");
            for (n, later) in [a, b].iter().enumerate() {
                let f = from_client(later);
                let (action, out) = dp.test_run_xdp_on(&f, lb0).unwrap();
                assert_eq!(action, XDP_REDIRECT, "datagram {i}: fragment {}", n + 1);
                let want = packet::with_macs(&packet::with_dst_addr(&f, be), mac, LBB_MAC);
                assert_eq!(out, want, "datagram {i}: fragment {} to {be}", n + 1);
            }
            *per_backend.entry(be).or_default() += 3;
        }
        println!("nat: 24 datagrams of 3 fragments, fragments by backend: {per_backend:?}");
        assert_eq!(per_backend.len(), 4, "every backend got datagrams");
        for (name, addr) in [
            ("nat4", "10.203.1.5:8443"),
            ("nat4", "10.203.1.6:8443"),
            ("nat6", "[fd00:203:1::5]:8443"),
            ("nat6", "[fd00:203:1::6]:8443"),
        ] {
            let sa: SocketAddr = addr.parse().unwrap();
            let id = w.backend_id(name, sa).unwrap();
            let c = dp.backend_counters(id).unwrap();
            assert_eq!(c.packets, per_backend[&sa.ip()], "{name} {addr}");
        }

        for (src, vip) in [
            ("10.203.0.2", "10.203.0.20"),
            ("fd00:203::2", "fd00:203::20"),
        ] {
            for f in packet::udp_fragments(src, vip, 42000, 443, 0x300) {
                let input = from_client(&f);
                let (action, out) = dp.test_run_xdp_on(&input, lb0).unwrap();
                assert_eq!(action, XDP_TX, "dsr {vip}");
                assert_eq!(out, packet::with_macs(&input, NEIGHBOUR_MAC, LB0_MAC));
            }
        }
        for name in ["dsr4", "dsr6"] {
            let c = dp.service_counters(w.service_id(name).unwrap()).unwrap();
            assert_eq!(c.packets, 3, "{name}: every fragment forwarded");
        }
        assert_eq!(dp.reason_counts().unwrap().iter().sum::<u64>(), 0);
        assert_eq!(dp.drop_counts().unwrap().iter().sum::<u64>(), 0);
    });
}

/// Which counter a fixture's packet bumps.
enum Counted {
    Passed(Reason),
    Dropped(Reason),
    Forwarded,
}

/// Every way `nat` and `dsr` can fail to forward, with a real FIB: the
/// action, the bytes (unchanged wherever nothing may be rewritten) and the
/// pass or drop counter of its own reason; none counted as forwarded.
#[test]
fn nat_and_dsr_failures_are_dropped_or_passed_by_reason() {
    let (mut topo, lb) = fib_lab();
    for route in [
        &["ip", "route", "add", "blackhole", "10.251.0.0/24"][..],
        &["ip", "route", "add", "unreachable", "10.252.0.0/24"],
        &["ip", "route", "add", "prohibit", "10.254.0.0/24"],
        &["ip", "-6", "route", "add", "blackhole", "fd00:251::/64"],
        &[
            "ip",
            "route",
            "add",
            "10.253.0.0/24",
            "via",
            "10.203.1.5",
            "dev",
            "lbb",
            "mtu",
            "lock",
            "1280",
        ],
    ] {
        run_in(&lb, route);
    }
    let nat =
        |name: &str, vip: &str, be: &str| forwarded_service(name, vip, Forwarding::Nat, &[be]);
    let dsr =
        |name: &str, vip: &str, be: &str| forwarded_service(name, vip, Forwarding::Dsr, &[be]);
    let services = vec![
        nat("ok_nat", "10.203.0.10:443", "10.203.1.5:8443"),
        dsr("ok_dsr", "10.203.0.20:443", "10.203.0.7:443"),
        // In a connected network, no neighbour entry.
        nat("nn_nat", "10.203.0.30:443", "10.203.1.99:8443"),
        nat("nn_nat6", "[fd00:203::30]:443", "[fd00:203:1::99]:8443"),
        dsr("nn_dsr", "10.203.0.31:443", "10.203.0.99:443"),
        // No route at all (the namespace has no default route).
        nat("noroute", "10.203.0.32:443", "10.250.0.5:443"),
        nat("blackhole", "10.203.0.33:443", "10.251.0.5:443"),
        nat("unreach", "10.203.0.34:443", "10.252.0.5:443"),
        dsr("blackhole6", "[fd00:203::35]:443", "[fd00:251::5]:443"),
        nat("mtu", "10.203.0.36:443", "10.253.0.5:443"),
        nat("prohibit", "10.203.0.39:443", "10.254.0.5:443"),
        // Behind an interface that appears after the redirect map was filled.
        nat("notx_nat", "10.203.0.37:443", "10.203.5.5:443"),
        dsr("notx_dsr", "10.203.0.38:443", "10.203.5.6:443"),
    ];
    let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let w = fib_writer(&lb, services);
    let x = topo.namespace("x");
    topo.veth((&lb, "lbx", &["10.203.5.1/24"]), (&x, "eth0", &[]));
    for addr in ["10.203.5.5", "10.203.5.6"] {
        netns::neighbour(
            &lb,
            addr,
            &netns::mac_string(BACKEND_MAC),
            "lbx",
            "permanent",
        );
    }
    let lb_ns = lb.clone();
    netns::within(&lb, move || {
        let dp = w.dataplane();
        let lb0 = ifindex(&lb_ns, "lb0");
        let c = |s: Spec| s.with_macs(LB0_MAC, CLIENT_MAC);
        let syn = |dst: &str| c(Spec::tcp("10.203.0.2", dst, 40000, 443, TCP_SYN));
        let tagged = |dst: &str| {
            let mut s = syn(dst);
            s.vlan = Some(100);
            s
        };
        let big = c(Spec::udp("10.203.0.2", "10.203.0.36", 40000, 443).payload(&[9; 1400]));
        // (name, input, action, output or None for "unchanged", counter)
        let cases: Vec<(&str, Spec, u32, Option<Spec>, Counted)> = vec![
            (
                "nat, no neighbour: rewritten, passed for the stack to resolve",
                syn("10.203.0.30"),
                XDP_PASS,
                Some(c(Spec::tcp(
                    "10.203.0.2",
                    "10.203.1.99",
                    40000,
                    8443,
                    TCP_SYN,
                ))),
                Counted::Passed(Reason::FibNoNeigh),
            ),
            (
                "nat ipv6, no neighbour",
                c(Spec::udp("fd00:203::2", "fd00:203::30", 40000, 443).payload(b"q")),
                XDP_PASS,
                Some(c(
                    Spec::udp("fd00:203::2", "fd00:203:1::99", 40000, 8443).payload(b"q")
                )),
                Counted::Passed(Reason::FibNoNeigh),
            ),
            (
                "dsr, no neighbour: dropped (passed, the stack would answer it)",
                syn("10.203.0.31"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::FibNoNeigh),
            ),
            (
                "no route",
                syn("10.203.0.32"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::FibFail),
            ),
            (
                "blackhole",
                syn("10.203.0.33"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::FibFail),
            ),
            (
                "unreachable",
                syn("10.203.0.34"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::FibFail),
            ),
            (
                "prohibit",
                syn("10.203.0.39"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::FibFail),
            ),
            (
                "dsr ipv6 blackhole",
                c(Spec::tcp(
                    "fd00:203::2",
                    "fd00:203::35",
                    40000,
                    443,
                    TCP_SYN,
                )),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::FibFail),
            ),
            (
                "larger than the route's MTU (fragmentation needed)",
                big,
                XDP_DROP,
                None,
                Counted::Dropped(Reason::FibFail),
            ),
            (
                "nat, egress not in the redirect map",
                syn("10.203.0.37"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::NoTxPort),
            ),
            (
                "dsr, egress not in the redirect map",
                syn("10.203.0.38"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::NoTxPort),
            ),
            (
                "nat, VLAN tag",
                tagged("10.203.0.10"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::VlanTagged),
            ),
            (
                "dsr, VLAN tag",
                tagged("10.203.0.20"),
                XDP_DROP,
                None,
                Counted::Dropped(Reason::VlanTagged),
            ),
            // The same services untagged: they work.
            (
                "nat, untagged",
                syn("10.203.0.10"),
                XDP_REDIRECT,
                Some(
                    Spec::tcp("10.203.0.2", "10.203.1.5", 40000, 8443, TCP_SYN)
                        .with_macs(BACKEND_MAC, LBB_MAC),
                ),
                Counted::Forwarded,
            ),
            (
                "dsr, untagged",
                syn("10.203.0.20"),
                XDP_TX,
                Some(
                    Spec::tcp("10.203.0.2", "10.203.0.20", 40000, 443, TCP_SYN)
                        .with_macs(NEIGHBOUR_MAC, LB0_MAC),
                ),
                Counted::Forwarded,
            ),
        ];
        let mut passed = [0u64; lb_common::REASON_COUNT as usize];
        let mut dropped = [0u64; lb_common::REASON_COUNT as usize];
        for (name, input, action, output, counted) in &cases {
            let input = input.build();
            let (got, out) = dp.test_run_xdp_on(&input, lb0).expect("test run");
            assert_eq!(got, *action, "{name}: action");
            let want = output.as_ref().map(Spec::build).unwrap_or(input.clone());
            assert_eq!(out, want, "{name}: bytes");
            match counted {
                Counted::Passed(r) => passed[*r as usize] += 1,
                Counted::Dropped(r) => dropped[*r as usize] += 1,
                Counted::Forwarded => {}
            }
            assert_eq!(
                dp.reason_counts().unwrap(),
                passed,
                "{name}: passed counters"
            );
            assert_eq!(
                dp.drop_counts().unwrap(),
                dropped,
                "{name}: dropped counters"
            );
        }
        println!("passed by reason: {passed:?}\ndropped by reason: {dropped:?}");
        for name in &names {
            let c = dp.service_counters(w.service_id(name).unwrap()).unwrap();
            let want = u64::from(name.starts_with("ok_"));
            assert_eq!(c.packets, want, "{name}: counted as forwarded");
        }
        let actions = dp.action_counts().unwrap();
        assert_eq!(actions[XDP_DROP as usize], 11);
        assert_eq!(actions[XDP_PASS as usize], 2);
    });
}

/// Large UDP datagrams (3000 bytes, fragmented by the client's stack at
/// MTU 1500) to a `nat` service, IPv4 and IPv6, through real stacks: every
/// datagram reaches a backend's socket whole, from the client's address,
/// on the backend the first fragment's flow maps to in the Maglev table,
/// so every datagram of a flow lands on one backend.
#[test]
fn nat_delivers_fragmented_udp_datagrams_whole_v4_and_v6() {
    const FLOWS: usize = 16;
    const PER_FLOW: usize = 3;
    const SIZE: usize = 3000;
    let (_topo, lb, client, b1, b2) = nat_lab();
    let services = vec![
        forwarded_service(
            "udp4",
            "10.203.0.10:443",
            Forwarding::Nat,
            &["10.203.1.2:8443", "10.203.2.2:8443"],
        ),
        forwarded_service(
            "udp6",
            "[fd00:203::10]:443",
            Forwarding::Nat,
            &["[fd00:203:1::2]:8443", "[fd00:203:2::2]:8443"],
        ),
    ];
    let writer = balancer(&lb, "lb0", services.clone());
    // Neighbours known beforehand, or the first datagrams meet the FIB
    // without them (passed to the stack, which forwards them itself).
    for (ns, dev, a4, a6) in [
        (&b1, "lbb1", "10.203.1.2", "fd00:203:1::2"),
        (&b2, "lbb2", "10.203.2.2", "fd00:203:2::2"),
    ] {
        let mac = run_in(ns, &["cat", "/sys/class/net/eth0/address"])
            .trim()
            .to_string();
        for addr in [a4, a6] {
            netns::neighbour(&lb, addr, &mac, dev, "permanent");
        }
    }

    // One dual-stack socket per backend host, read on its own thread until
    // every datagram has arrived or 20 s passed.
    let total = 2 * FLOWS * PER_FLOW;
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let receivers: Vec<_> = [("b1", &b1), ("b2", &b2)]
        .into_iter()
        .map(|(host, ns)| {
            let sock = netns::within(ns, || std::net::UdpSocket::bind("[::]:8443").unwrap());
            sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
                .unwrap();
            let got = got.clone();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 65536];
                while got.load(std::sync::atomic::Ordering::SeqCst) < total
                    && std::time::Instant::now() < deadline
                {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                        seen.push((peer, buf[..n].to_vec()));
                        got.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                (host, seen)
            })
        })
        .collect();

    // Flows: one client socket each, PER_FLOW datagrams, each tagged with
    // its flow and sequence number and filled to SIZE bytes.
    let flows: Vec<SocketAddr> = netns::within(&client, move || {
        let mut locals = Vec::new();
        for f in 0..2 * FLOWS {
            let (bind, vip) = if f < FLOWS {
                ("10.203.0.2:0", "10.203.0.10:443")
            } else {
                ("[fd00:203::2]:0", "[fd00:203::10]:443")
            };
            let s = std::net::UdpSocket::bind(bind).unwrap();
            for seq in 0..PER_FLOW {
                let mut d = vec![(f * 7 + seq) as u8; SIZE];
                d[0] = f as u8;
                d[1] = seq as u8;
                s.send_to(&d, vip).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            locals.push(s.local_addr().unwrap());
        }
        locals
    });
    let mut by_flow: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    let results: Vec<_> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    for (host, seen) in &results {
        for (peer, d) in seen {
            let f = d[0] as usize;
            assert_eq!(d.len(), SIZE, "{host}: datagram of flow {f} arrived whole");
            let mut want = vec![(f * 7 + d[1] as usize) as u8; SIZE];
            want[0] = d[0];
            want[1] = d[1];
            assert!(*d == want, "{host}: datagram {f}/{} intact", d[1]);
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            assert_eq!(peer, flows[f], "{host}: the client's address and port");
            by_flow.entry(f).or_default().push(host);
        }
    }
    let received: usize = results.iter().map(|(_, s)| s.len()).sum();
    assert_eq!(received, total, "datagrams received: {by_flow:?}");

    // The backend the first fragment's flow maps to in the active table.
    let dp = writer.dataplane();
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for (f, local) in flows.iter().enumerate() {
        let (svc, vip): (&ServiceSpec, SocketAddr) = if f < FLOWS {
            (&services[0], "10.203.0.10:443".parse().unwrap())
        } else {
            (&services[1], "[fd00:203::10]:443".parse().unwrap())
        };
        let h = dp.flow_hash().hash(
            &lb_userspace::dataplane::addr_words(local.ip()),
            &lb_userspace::dataplane::addr_words(vip.ip()),
            local.port().to_be(),
            vip.port().to_be(),
            lb_common::PROTO_UDP,
        );
        let id = writer.service_id(&svc.name).unwrap();
        let (_, table) = dp.active_table(id).unwrap();
        let backend = table[lb_common::maglev_slot(h, table.len() as u32) as usize].backend;
        let addr = svc
            .backends
            .iter()
            .find(|b| writer.backend_id(&svc.name, b.address) == Some(backend))
            .unwrap()
            .address;
        let on_b1 = ["10.203.1.2", "fd00:203:1::2"].contains(&addr.ip().to_string().as_str());
        let host = if on_b1 { "b1" } else { "b2" };
        assert_eq!(
            by_flow[&f],
            vec![host; PER_FLOW],
            "flow {f} from {local}: every datagram on {addr}"
        );
        *per_host.entry(host).or_default() += 1;
    }
    let passed = dp.reason_counts().unwrap();
    let redirected = dp.action_counts().unwrap()[XDP_REDIRECT as usize];
    println!(
        "nat fragments: {received} datagrams of {SIZE} bytes in {} flows, flows by backend \
         host {per_host:?}; XDP_REDIRECT {redirected}; fragment_unknown {}",
        flows.len(),
        passed[Reason::FragmentUnknown as usize]
    );
    assert_eq!(per_host.len(), 2, "both backend hosts got flows");
    assert_eq!(passed[Reason::FragmentUnknown as usize], 0);
    // Three fragments per datagram, every one redirected.
    assert!(redirected >= 3 * total as u64, "redirected {redirected}");
}
