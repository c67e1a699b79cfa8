//! The next-hop cache of `nat` and `dsr` (`LB_NEXTHOPS`): packet fixtures
//! through `BPF_PROG_TEST_RUN` showing when the program takes the cached
//! hop and when it asks the FIB, the resolver against a namespace's real
//! routes and neighbours, and live traffic that must follow a backend's
//! MAC address and route changes within a second.
use lb_tests::wait_for;
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::{NextHop, NextHopVia};
use lb_tests::{
    fixtures::forwarded_service,
    netns::{self, Topology, run_in},
    packet::{self, Spec, TCP_ACK},
};
use lb_userspace::{
    dataplane::{AttachMode, Dataplane, Forwarding, MapWriter, Options, monotonic_secs},
    nexthop::{self, Resolver},
};

const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x29, 0x02];
const LB0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x21, 0x01];
const LBB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x22, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x23, 0x05];
const NEIGHBOUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x24, 0x07];
/// A MAC no table of the namespace holds: a frame leaving with it took
/// the cached hop, not the FIB's.
const CACHED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x2c, 0x0c];

fn ifindex(ns: &str, ifname: &str) -> u32 {
    run_in(ns, &["cat", &format!("/sys/class/net/{ifname}/ifindex")])
        .trim()
        .parse()
        .unwrap()
}

fn mac_of(ns: &str, ifname: &str) -> String {
    run_in(ns, &["cat", &format!("/sys/class/net/{ifname}/address")])
        .trim()
        .to_string()
}

fn counts(dp: &Dataplane) -> (u64, u64) {
    let c = dp.next_hop_counts().unwrap();
    (c[NextHopVia::Cache as usize], c[NextHopVia::Fib as usize])
}

/// Frames with a cache entry present, stale, of another generation or too
/// small an MTU; then the resolver's own entries from the namespace's
/// tables, and an id that changes hands losing its entry.
#[test]
fn the_program_takes_a_fresh_cached_hop_of_the_backends_generation() {
    let mut topo = Topology::new();
    let lb = topo.namespace("lb");
    let client = topo.namespace("cl");
    let backend = topo.namespace("be");
    topo.veth(
        (&lb, "lb0", &["10.206.0.1/24"]),
        (&client, "cl0", &["10.206.0.2/24"]),
    );
    topo.veth(
        (&lb, "lbb", &["10.206.1.1/24"]),
        (&backend, "eth0", &["10.206.1.5/24"]),
    );
    for (dev, m) in [("lb0", LB0_MAC), ("lbb", LBB_MAC)] {
        run_in(
            &lb,
            &["ip", "link", "set", dev, "address", &netns::mac_string(m)],
        );
    }
    for (addr, m, dev) in [
        ("10.206.1.5", BACKEND_MAC, "lbb"),
        ("10.206.0.7", NEIGHBOUR_MAC, "lb0"),
    ] {
        netns::neighbour(&lb, addr, &netns::mac_string(m), dev, "permanent");
    }
    run_in(&lb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let lb0 = ifindex(&lb, "lb0");
    let lbb = ifindex(&lb, "lbb");
    let services = vec![
        forwarded_service(
            "nat4",
            "10.206.0.10:443",
            Forwarding::Nat,
            &["10.206.1.5:8443"],
        ),
        forwarded_service(
            "dsr4",
            "10.206.0.20:443",
            Forwarding::Dsr,
            &["10.206.0.7:443"],
        ),
    ];
    let lb_ns = lb.clone();
    netns::within(&lb, move || {
        let mut dp = Dataplane::load(Options {
            max_services: 4,
            flow_table_size: 4096,
            ..Options::default()
        })
        .expect("load");
        dp.sync_tx_ports().expect("redirect targets");
        let mut w = MapWriter::new(dp);
        w.apply(&services).expect("apply");
        let nat_id = w
            .backend_id("nat4", "10.206.1.5:8443".parse().unwrap())
            .unwrap();
        let dsr_id = w
            .backend_id("dsr4", "10.206.0.7:443".parse().unwrap())
            .unwrap();
        let nat_gen = w.backend_generation(nat_id);
        let mut hops = w.dataplane().next_hop_writer().unwrap();
        let dp = w.dataplane();

        let nat_in = Spec::tcp("10.206.0.2", "10.206.0.10", 40000, 443, TCP_ACK)
            .payload(b"x")
            .with_macs(LB0_MAC, CLIENT_MAC)
            .build();
        let nat_out = |dmac, smac| {
            Spec::tcp("10.206.0.2", "10.206.1.5", 40000, 8443, TCP_ACK)
                .payload(b"x")
                .with_macs(dmac, smac)
                .build()
        };
        let run = |name: &str, want_dmac, want_smac, via: NextHopVia| {
            let before = counts(dp);
            let (action, out) = dp.test_run_xdp_on(&nat_in, lb0).expect("test run");
            assert_eq!(action, XDP_REDIRECT, "{name}: action");
            assert_eq!(out, nat_out(want_dmac, want_smac), "{name}: bytes");
            packet::verify_checksums(&out).unwrap();
            let after = counts(dp);
            let want = match via {
                NextHopVia::Cache => (before.0 + 1, before.1),
                NextHopVia::Fib => (before.0, before.1 + 1),
            };
            assert_eq!(after, want, "{name}: (cache, fib) counters");
        };
        run(
            "no entry: the FIB's hop",
            BACKEND_MAC,
            LBB_MAC,
            NextHopVia::Fib,
        );

        let now = monotonic_secs();
        let entry = NextHop {
            ifindex: lbb,
            generation: nat_gen,
            resolved: now,
            mtu: 1500,
            smac: LBB_MAC,
            dmac: CACHED_MAC,
        };
        hops.set(nat_id, &entry).unwrap();
        run(
            "fresh entry of this generation: its MACs, no FIB lookup",
            CACHED_MAC,
            LBB_MAC,
            NextHopVia::Cache,
        );
        // The daemon's stamp may be a second ahead of the program's clock
        // (a CPU's cached second lags by up to a tick): still fresh.
        hops.set(
            nat_id,
            &NextHop {
                resolved: monotonic_secs() + 1,
                ..entry
            },
        )
        .unwrap();
        run(
            "entry stamped a second ahead of the program's clock",
            CACHED_MAC,
            LBB_MAC,
            NextHopVia::Cache,
        );
        for (name, e) in [
            (
                "entry of another generation (the id's earlier holder)",
                NextHop {
                    generation: nat_gen.wrapping_add(1),
                    ..entry
                },
            ),
            (
                "stale entry (the daemon stopped refreshing it)",
                NextHop {
                    resolved: now - lb_common::NEXTHOP_FRESH_SECS - 2,
                    ..entry
                },
            ),
            (
                "packet longer than the entry's MTU: the FIB decides",
                NextHop { mtu: 40, ..entry },
            ),
            ("empty entry", NextHop::default()),
        ] {
            hops.set(nat_id, &e).unwrap();
            run(name, BACKEND_MAC, LBB_MAC, NextHopVia::Fib);
        }

        // dsr: only MACs change, out the way it came.
        let dsr_in = Spec::tcp("10.206.0.2", "10.206.0.20", 40000, 443, TCP_ACK)
            .payload(b"y")
            .with_macs(LB0_MAC, CLIENT_MAC);
        hops.set(
            dsr_id,
            &NextHop {
                ifindex: lb0,
                generation: w.backend_generation(dsr_id),
                resolved: monotonic_secs(),
                mtu: 1500,
                smac: LB0_MAC,
                dmac: CACHED_MAC,
            },
        )
        .unwrap();
        let (action, out) = dp.test_run_xdp_on(&dsr_in.clone().build(), lb0).unwrap();
        assert_eq!(action, XDP_TX, "dsr cached: action");
        assert_eq!(
            out,
            dsr_in.clone().with_macs(CACHED_MAC, LB0_MAC).build(),
            "dsr cached: bytes"
        );

        // The resolver fills both entries from the namespace's tables.
        let mut resolver = Resolver::open(dp).unwrap();
        let remote = w.remote_backends();
        assert_eq!(remote.len(), 2, "{remote:?}");
        let report = resolver.refresh(&remote).unwrap();
        assert_eq!((report.cached, report.uncached), (2, 0));
        let got = dp.next_hop(nat_id).unwrap();
        assert_eq!(
            (got.ifindex, got.generation, got.smac, got.dmac, got.mtu),
            (lbb, nat_gen, LBB_MAC, BACKEND_MAC, 1500),
            "the resolver's nat entry"
        );
        assert!(monotonic_secs() - got.resolved <= 1);
        let got = dp.next_hop(dsr_id).unwrap();
        assert_eq!(
            (got.ifindex, got.smac, got.dmac),
            (lb0, LB0_MAC, NEIGHBOUR_MAC),
            "the resolver's dsr entry"
        );
        run("resolved entry", BACKEND_MAC, LBB_MAC, NextHopVia::Cache);
        let (action, out) = dp.test_run_xdp_on(&dsr_in.clone().build(), lb0).unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(out, dsr_in.with_macs(NEIGHBOUR_MAC, LB0_MAC).build());

        // The neighbour goes: the entry goes with it (the FIB then passes
        // the packet to the stack to resolve it).
        run_in(&lb_ns, &["ip", "neigh", "del", "10.206.1.5", "dev", "lbb"]);
        let report = resolver.refresh(&remote).unwrap();
        assert_eq!((report.cached, report.uncached), (1, 1));
        assert_eq!(dp.next_hop(nat_id).unwrap(), NextHop::default());

        // The backend leaves: its id's entry is cleared by the map writer.
        let _ = resolver.refresh(&remote).unwrap();
        assert_ne!(dp.next_hop(dsr_id).unwrap().ifindex, 0);
        drop(hops);
        let only_nat = vec![services_nat()];
        w.apply(&only_nat).unwrap();
        assert_eq!(
            w.dataplane().next_hop(dsr_id).unwrap(),
            NextHop::default(),
            "a removed backend's entry"
        );
    });
    drop(topo);
}

fn services_nat() -> lb_userspace::dataplane::ServiceSpec {
    forwarded_service(
        "nat4",
        "10.206.0.10:443",
        Forwarding::Nat,
        &["10.206.1.5:8443"],
    )
}

/// A client sending numbered UDP datagrams every few milliseconds, and a
/// backend socket recording which arrived; each side keeps the times.
struct Traffic {
    sent: Arc<Mutex<Vec<Instant>>>,
    received: Arc<Mutex<Vec<u32>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(client: &str, backend: &str, to: SocketAddr, port: u16) -> Traffic {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sock = netns::within(backend, move || UdpSocket::bind(("0.0.0.0", port)).unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (r, s) = (received.clone(), stop.clone());
        let rx = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, _)) = sock.recv_from(&mut buf)
                    && n >= 4
                {
                    r.lock()
                        .unwrap()
                        .push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                }
            }
        });
        let (t, s) = (sent.clone(), stop.clone());
        let tx = netns::spawn_in(client, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut seq = 0u32;
            // Bounded: at most 200 datagrams a second, for at most 60 s.
            while !s.load(Ordering::SeqCst) && seq < 12_000 {
                t.lock().unwrap().push(Instant::now());
                let _ = sock.send_to(&seq.to_be_bytes(), to);
                seq += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Traffic {
            sent,
            received,
            stop,
            threads: vec![rx, tx],
        }
    }

    /// How long after `at` the first datagram sent at or after it that
    /// arrived was sent (None: none arrived yet).
    fn recovered_after(&self, at: Instant) -> Option<Duration> {
        let sent = self.sent.lock().unwrap();
        let received = self.received.lock().unwrap();
        received
            .iter()
            .filter_map(|&seq| sent.get(seq as usize).copied())
            .filter(|t| *t >= at)
            .min()
            .map(|t| t - at)
    }

    fn received(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

/// Makes `change` under traffic; returns how long after it began the
/// first datagram sent once it was done (and delivered) was sent: the
/// longest packets can have stopped reaching the backend.
fn outage(traffic: &Traffic, what: &str, change: impl FnOnce()) -> Duration {
    let start = Instant::now();
    change();
    let done = Instant::now();
    wait_for(
        &format!("packets after {what}"),
        Duration::from_secs(5),
        || traffic.recovered_after(done).is_some(),
    );
    traffic.recovered_after(done).unwrap() + (done - start)
}

/// Client, balancer and a backend host reached over two links. Under
/// steady UDP traffic through `nat` (frames leaving with the cached hop),
/// the backend host changes its MAC address (announced, so the balancer's
/// neighbour entry follows), then the balancer's route to it moves to the
/// other link; each time packets reach the backend again within a second,
/// through the cache, and the entry holds the new values.
#[test]
fn next_hops_follow_mac_and_route_changes_under_traffic() {
    let mut topo = Topology::new();
    let lb = topo.namespace("lb");
    let client = topo.namespace("cl");
    let b1 = topo.namespace("b1");
    topo.veth(
        (&lb, "lb0", &["10.207.0.1/24", "10.207.0.10/24"]),
        (&client, "cl0", &["10.207.0.2/24"]),
    );
    topo.veth(
        (&lb, "lbb1", &["10.207.1.1/24"]),
        (&b1, "eth0", &["10.207.1.2/24"]),
    );
    topo.veth(
        (&lb, "lbb2", &["10.207.2.1/24"]),
        (&b1, "eth1", &["10.207.2.2/24"]),
    );
    // The backend's address lives on its loopback, reached over either link.
    run_in(&b1, &["ip", "addr", "add", "10.207.9.2/32", "dev", "lo"]);
    run_in(&b1, &["ip", "route", "add", "default", "via", "10.207.1.1"]);
    for k in ["all", "default", "eth0", "eth1"] {
        run_in(
            &b1,
            &["sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")],
        );
    }
    // A new MAC address is announced (gratuitous ARP), as hosts do.
    run_in(&b1, &["sysctl", "-qw", "net.ipv4.conf.eth0.arp_notify=1"]);
    for dev in ["eth0", "eth1"] {
        // A veth receives XDP-redirected frames only with NAPI on.
        run_in(&b1, &["ethtool", "-K", dev, "gro", "on"]);
    }
    run_in(&client, &["ethtool", "-K", "cl0", "tx", "off"]);
    run_in(&lb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    run_in(
        &lb,
        &["ip", "route", "add", "10.207.9.2/32", "via", "10.207.1.2"],
    );
    let lbb1 = ifindex(&lb, "lbb1");
    let lbb2 = ifindex(&lb, "lbb2");
    let services = vec![forwarded_service(
        "web",
        "10.207.0.10:443",
        Forwarding::Nat,
        &["10.207.9.2:8443"],
    )];
    let writer = netns::within(&lb, move || {
        let mut dp = Dataplane::load(Options {
            max_services: 4,
            flow_table_size: 4096,
            ..Options::default()
        })
        .unwrap();
        dp.attach("lb0", AttachMode::Native).expect("attach");
        let mut w = MapWriter::new(dp);
        w.apply(&services).unwrap();
        let w = Arc::new(Mutex::new(w));
        nexthop::spawn(Arc::downgrade(&w)).expect("the resolver starts");
        w
    });
    let id = writer
        .lock()
        .unwrap()
        .backend_id("web", "10.207.9.2:8443".parse().unwrap())
        .unwrap();
    let entry = || writer.lock().unwrap().dataplane().next_hop(id).unwrap();
    let cache_count = || counts(writer.lock().unwrap().dataplane()).0;
    let traffic = Traffic::start(&client, &b1, "10.207.0.10:443".parse().unwrap(), 8443);

    // The first packets find no neighbour (the stack resolves it); then
    // the entry fills and packets take it.
    let mac0 = mac_of(&b1, "eth0");
    wait_for("the first entry", Duration::from_secs(5), || {
        let e = entry();
        e.ifindex == lbb1 && netns::mac_string(e.dmac) == mac0
    });
    let c = cache_count();
    wait_for("packets through the cache", Duration::from_secs(2), || {
        cache_count() > c + 20
    });

    // The backend host's MAC changes.
    let new_mac = "02:00:00:00:2f:01";
    let gap = outage(&traffic, "the MAC change", || {
        run_in(
            &b1,
            &["ip", "link", "set", "dev", "eth0", "address", new_mac],
        );
    });
    let filled = wait_for("the entry's new MAC", Duration::from_secs(1), || {
        netns::mac_string(entry().dmac) == new_mac
    });
    println!(
        "MAC change: packets reached the backend again {gap:?} after it began; entry {:?} \
         after {filled:?}",
        entry()
    );
    assert!(gap <= Duration::from_secs(1), "MAC change: {gap:?}");
    let c = cache_count();
    wait_for(
        "packets through the cache again",
        Duration::from_secs(1),
        || cache_count() > c + 20,
    );

    // The route moves to the other link, whose neighbour is not known yet
    // (the stack forwards and resolves it, then the entry fills); the old
    // link stops carrying the backend's traffic (its end on the backend
    // host goes down).
    let gap = outage(&traffic, "the route change", || {
        run_in(
            &lb,
            &[
                "ip",
                "route",
                "replace",
                "10.207.9.2/32",
                "via",
                "10.207.2.2",
            ],
        );
        run_in(&b1, &["ip", "link", "set", "eth0", "down"]);
    });
    let mac1 = mac_of(&b1, "eth1");
    let filled = wait_for(
        "the entry after the route change",
        Duration::from_secs(2),
        || {
            let e = entry();
            e.ifindex == lbb2 && netns::mac_string(e.dmac) == mac1
        },
    );
    println!(
        "route change: packets reached the backend again {gap:?} after it began; entry {:?} \
         after {filled:?}",
        entry()
    );
    assert!(gap <= Duration::from_secs(1), "route change: {gap:?}");
    let c = cache_count();
    wait_for(
        "packets through the cache again",
        Duration::from_secs(1),
        || cache_count() > c + 20,
    );
    let received = traffic.received();
    let sent = traffic.sent.lock().unwrap().len();
    let (dp_stats, via) = {
        let w = writer.lock().unwrap();
        let dp = w.dataplane();
        (dp.action_counts().unwrap(), dp.next_hop_counts().unwrap())
    };
    traffic.stop();
    println!(
        "sent {sent}, received {received}; actions {dp_stats:?}, next hops (cache, fib) {via:?}"
    );
    // Lost: the first packets' ARP, and those in flight during each change.
    assert!(
        received > 50 && received + 50 > sent,
        "sent {sent}, received {received}"
    );
    assert!(
        via[NextHopVia::Cache as usize] > 50,
        "most packets took the cached hop: {via:?}"
    );
    drop(writer);
    drop(topo);
}
