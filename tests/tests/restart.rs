//! The daemon restarts (SIGTERM, which leaves the data plane running, or
//! killed with -9)
//! while traffic flows: the pinned data plane keeps forwarding, the next
//! daemon adopts it, and no connection fails or is reset. And a daemon
//! killed during a burst of API changes keeps every acknowledged change.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rstest::rstest;

use lb_tests::{
    daemon::{BpfFs, Lb, TempDir},
    netns::{self, Topology},
    servers::EchoName,
};

const API: &str = "127.0.0.1:9180";
const VIP: &str = "10.205.0.1:443";

struct Setup {
    /// `dataplane.xdp_mode`.
    mode: &'static str,
    _topo: Topology,
    lb_ns: String,
    client_ns: String,
    dir: TempDir,
    bpf: BpfFs,
}

fn setup(tag: &str) -> Setup {
    setup_in(tag, "native")
}

fn setup_in(tag: &str, mode: &'static str) -> Setup {
    let tag = &format!("{tag}-{mode}");
    let mut topo = Topology::new();
    let (lb_ns, client_ns) = topo.lb_and_client(205);
    Setup {
        mode,
        _topo: topo,
        lb_ns,
        client_ns,
        dir: TempDir::new(tag),
        bpf: BpfFs::mount(tag),
    }
}

impl Setup {
    fn config(&self) -> PathBuf {
        self.config_with_flows(65536)
    }

    fn config_with_flows(&self, flows: u32) -> PathBuf {
        self.config_in(self.mode, flows)
    }

    fn config_in(&self, mode: &str, flows: u32) -> PathBuf {
        let text = format!(
            r#"
[dataplane]
interface = "lb0"
xdp_mode = "{mode}"
flow_table_size = {flows}
max_services = 4
pin_path = "{pin}"

[admin]
# The crash test bursts changes as fast as the daemon takes them.
change_rate = 100000
listen = "{API}"
state_file = {state:?}

[[services]]
name = "web"
listen = "0.0.0.0:443"
protocols = ["tcp"]
health = {{ kind = "tcp", interval = "500ms", timeout = "200ms" }}
backends = [{{ address = "127.0.0.1:8001", weight = 100 }}, {{ address = "127.0.0.1:8002", weight = 50 }}]
"#,
            pin = self.bpf.0.join("lb").display(),
            state = self.dir.path("state.json").display().to_string(),
        );
        let p = self.dir.path("lb.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn exchange(s: &mut TcpStream, r: &mut BufReader<TcpStream>) -> Result<(), String> {
    s.write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[rstest]
#[case::xdp("native")]
#[case::tc("tc")]
fn restarts_and_crashes_drop_no_connection(#[case] mode: &'static str) {
    let s = setup_in("restart", mode);
    let _servers = [
        EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001"),
        EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002"),
    ];
    let config = s.config();
    let mut lb = Lb::start(&s.lb_ns, &config, API, &[]);
    let before = lb.get("/api/v1/services").1;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let new_ok = Arc::new(AtomicU64::new(0));
    let long_ok = Arc::new(AtomicU64::new(0));
    let to: SocketAddr = VIP.parse().unwrap();
    // Long-lived connections: one exchange every 20 ms each.
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (stop, failures, ok) = (stop.clone(), failures.clone(), long_ok.clone());
        workers.push(netns::spawn_in(&s.client_ns, move || {
            let mut conn =
                TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("long connection");
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match exchange(&mut conn, &mut reader) {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.lock().unwrap().push(format!("long-lived: {e}"));
                        return;
                    }
                };
                thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // New connections, one after another, each a full exchange.
    {
        let (stop, failures, ok) = (stop.clone(), failures.clone(), new_ok.clone());
        workers.push(netns::spawn_in(&s.client_ns, move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 100_000 {
                n += 1;
                let r = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                    .map_err(|e| e.to_string())
                    .and_then(|mut c| {
                        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut reader = BufReader::new(c.try_clone().unwrap());
                        exchange(&mut c, &mut reader)
                    });
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("new connection {n}: {e}"));
                        0
                    }
                };
                thread::sleep(Duration::from_millis(5));
            }
        }));
    }

    thread::sleep(Duration::from_millis(300));
    let mut restarts = 0;
    for i in 0..10 {
        if i % 2 == 0 {
            assert!(lb.stop().success(), "SIGTERM:\n{}", lb.log());
        } else {
            lb.kill();
        }
        // No daemon at all for a moment: the pinned programs carry on.
        thread::sleep(Duration::from_millis(150));
        lb = Lb::start(&s.lb_ns, &config, API, &[]);
        restarts += 1;
        assert!(
            lb.log().contains("adopted"),
            "restart {i} did not adopt the data plane:\n{}",
            lb.log()
        );
        // Exactly one ingress link, of the configured mode, stays pinned.
        let links = s.bpf.0.join("lb").join("links");
        let (on, off) = if mode == "tc" {
            ("tc_ingress", "xdp")
        } else {
            ("xdp", "tc_ingress")
        };
        assert!(
            links.join(on).exists() && !links.join(off).exists(),
            "restart {i}: pinned links {:?}",
            std::fs::read_dir(&links)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    println!(
        "{restarts} restarts (5 SIGTERM, 5 kill -9); {} new connections and {} long-lived exchanges ok; {} failures",
        new_ok.load(Ordering::Relaxed),
        long_ok.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "failures: {failures:?}");
    assert!(new_ok.load(Ordering::Relaxed) > 100);
    assert_eq!(
        lb.get("/api/v1/services").1,
        before,
        "services changed across restarts"
    );
    // `lb stop` detaches and unpins everything.
    let out = lb.cli(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lb.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        lb.log()
    );
    let pin = s.bpf.0.join("lb");
    if pin.exists() {
        let left = lb_tests::netns::run(&["find", pin.to_str().unwrap()]);
        panic!("pins left after lb stop:\n{left}");
    }
}

#[test]
fn a_crash_during_api_changes_keeps_every_acknowledged_change() {
    let s = setup("crash-api");
    let config = s.config();
    let mut lb = Lb::start(&s.lb_ns, &config, API, &[]);
    let mut next = 1u64;
    for round in 0..5 {
        let acked = Arc::new(AtomicU64::new(0));
        let attempted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let socket = lb.socket.clone();
        let (a, t, st) = (acked.clone(), attempted.clone(), stop.clone());
        let start = next;
        // Weights only go up, so the last acknowledged one tells whether
        // any acknowledged change was lost.
        let burst = thread::spawn(move || {
            let mut w = start;
            while !st.load(Ordering::Relaxed) && w < start + 5000 {
                t.store(w, Ordering::SeqCst);
                let (status, _) = lb_tests::daemon::unix_http(
                    &socket,
                    "PATCH",
                    "/api/v1/services/web/backends/127.0.0.1:8001",
                    Some(&format!("{{\"weight\": {w}}}")),
                );
                if (200..300).contains(&status) {
                    a.store(w, Ordering::SeqCst);
                }
                w += 1;
            }
            w
        });
        thread::sleep(Duration::from_millis(150 + 97 * round));
        // A loaded machine may not have acknowledged one yet: the kill
        // must land among acknowledged changes.
        let first = std::time::Instant::now();
        while acked.load(Ordering::SeqCst) == 0 && first.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        lb.kill();
        stop.store(true, Ordering::Relaxed);
        next = burst.join().unwrap() + 1;
        let (acked, attempted) = (
            acked.load(Ordering::SeqCst),
            attempted.load(Ordering::SeqCst),
        );
        assert!(
            acked > 0,
            "round {round}: no change was acknowledged before the kill"
        );
        lb = Lb::start(&s.lb_ns, &config, API, &[]);
        let weight = lb.get("/api/v1/services/web/backends/127.0.0.1:8001").1["weight"]
            .as_u64()
            .unwrap();
        println!(
            "round {round}: last acknowledged weight {acked}, last attempted {attempted}, after restart {weight}"
        );
        assert!(
            weight >= acked && weight <= attempted,
            "round {round}: weight {weight} after restart; acknowledged {acked}, attempted {attempted}"
        );
    }
    assert!(lb.stop().success());
}

#[test]
fn a_pinned_data_plane_of_another_layout_is_replaced() {
    let s = setup("relayout");
    let _server = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let _server2 = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let mut lb = Lb::start(&s.lb_ns, &s.config(), API, &[]);
    assert!(lb.stop().success());
    // Another flow table size: the pinned maps cannot be reused.
    let mut lb = Lb::start(&s.lb_ns, &s.config_with_flows(131072), API, &[]);
    assert!(lb.log().contains("another layout"), "{}", lb.log());
    let ok = (0..20).filter(|_| one_exchange(&s).is_ok()).count();
    assert_eq!(ok, 20, "connections through the replaced data plane");
    let retired: Vec<_> = std::fs::read_dir(s.bpf.0.join("lb"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("retired"))
        .collect();
    assert!(retired.is_empty(), "old maps left behind: {retired:?}");
    assert!(lb.stop().success());
}

/// One exchange on a new connection to the service, from the client side.
fn one_exchange(s: &Setup) -> Result<(), String> {
    let to: SocketAddr = VIP.parse().unwrap();
    netns::within(&s.client_ns, move || {
        let mut c =
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut reader = BufReader::new(c.try_clone().unwrap());
        exchange(&mut c, &mut reader)
    })
}

/// The ingress links pinned now (`xdp`, `tc_ingress`), and whether the
/// interface has an XDP program.
fn ingress(s: &Setup) -> (bool, bool, bool) {
    let links = s.bpf.0.join("lb").join("links");
    let shown = lb_tests::netns::run(&["ip", "-n", &s.lb_ns, "-d", "link", "show", "lb0"]);
    (
        links.join("xdp").exists(),
        links.join("tc_ingress").exists(),
        shown.contains("prog/xdp"),
    )
}

/// `auto` on a veth with only local services attaches TC ingress and says
/// why; a `nat` service is then refused (409, naming TC mode); restarts
/// that change the mode swap the pinned ingress link, and connections work
/// in each mode.
#[test]
fn auto_picks_tc_on_a_veth_and_restarts_switch_modes() {
    let s = setup_in("modes", "auto");
    let _servers = [
        EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001"),
        EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002"),
    ];
    let mut lb = Lb::start(&s.lb_ns, &s.config(), API, &[]);
    assert!(
        lb.log()
            .contains("attach mode: a veth with only local services"),
        "{}",
        lb.log()
    );
    assert_eq!(lb.get("/api/v1/status").1["attach_mode"], "tc");
    // A data plane new to the host: the fast hash, kept by every restart.
    assert_eq!(lb.get("/api/v1/status").1["flow_hash"], "fast");
    assert_eq!(ingress(&s), (false, true, false), "auto: TC only");
    one_exchange(&s).expect("a connection through TC ingress");

    let nat = r#"{"listen": "10.205.0.1:8443", "protocols": ["tcp"], "forwarding": "nat", "backends": [{"address": "10.205.0.50:8443"}]}"#;
    let (status, body) = lb.call("PUT", "/api/v1/services/far", Some(nat), None);
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("TC mode"), "{body}");

    for (mode, want) in [
        ("native", (true, false, true)),
        ("tc", (false, true, false)),
    ] {
        assert!(lb.stop().success(), "{}", lb.log());
        lb = Lb::start(&s.lb_ns, &s.config_in(mode, 65536), API, &[]);
        assert_eq!(lb.get("/api/v1/status").1["attach_mode"], mode);
        assert_eq!(lb.get("/api/v1/status").1["flow_hash"], "fast");
        assert_eq!(
            ingress(&s),
            want,
            "{mode}: pinned xdp, tc_ingress, XDP on lb0"
        );
        one_exchange(&s).unwrap_or_else(|e| panic!("{mode}: {e}\n{}", lb.log()));
    }
    let out = lb.cli(&["stop"]);
    assert!(out.status.success());
    lb.wait_exit(Duration::from_secs(10));
}

/// Pins of a build whose object had fewer maps (one added since, as
/// `LB_FLOW_COUNT` was): some maps pinned but not all cannot be adopted,
/// whatever the record says, and are replaced.
#[test]
fn a_pinned_data_plane_missing_a_map_is_replaced() {
    let s = setup("partpins");
    let _server = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let _server2 = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let mut lb = Lb::start(&s.lb_ns, &s.config(), API, &[]);
    assert!(lb.stop().success());
    let missing = s.bpf.0.join("lb/maps").join(lb_common::maps::FLOW_COUNT);
    std::fs::remove_file(&missing).expect("the flow count map was pinned");
    let mut lb = Lb::start(&s.lb_ns, &s.config(), API, &[]);
    assert!(lb.log().contains("another layout"), "{}", lb.log());
    let ok = (0..20).filter(|_| one_exchange(&s).is_ok()).count();
    assert_eq!(ok, 20, "connections through the replaced data plane");
    assert!(missing.exists(), "the new data plane pins every map");
    assert!(lb.stop().success());
}
