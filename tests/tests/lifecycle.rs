//! The daemon's lifecycle through the real `lb` binary: restarts that keep
//! health verdicts (kill -9 and SIGTERM, hitless by default), `lb stop`,
//! config versus state file, reloads under traffic, one daemon per pin
//! path, pins private to a mount namespace, a bounded admin listener, and
//! the systemd notification protocol and unit.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{BpfFs, Launch, Lb, TempDir},
    netns::{self, Topology},
    servers::EchoName,
};
use serde_json::Value;

const API: &str = "127.0.0.1:9180";
const VIP: &str = "10.207.0.1:443";

struct Setup {
    _topo: Topology,
    lb_ns: String,
    client_ns: String,
    dir: TempDir,
    bpf: BpfFs,
}

fn setup(tag: &str) -> Setup {
    lb_tests::require_root();
    let mut topo = Topology::new();
    let (lb_ns, client_ns) = topo.lb_and_client(207);
    Setup {
        _topo: topo,
        lb_ns,
        client_ns,
        dir: TempDir::new(tag),
        bpf: BpfFs::mount(tag),
    }
}

/// What goes into a config file.
struct Conf<'a> {
    file: &'a str,
    backends: &'a [(u16, u16)],
    health: &'a str,
    /// `None`: the default pins on the test's bpffs.
    pin: Option<String>,
    /// `false`: no state_file line (the default, derived from the path).
    state_file: bool,
    api: &'a str,
}

impl Setup {
    fn pin(&self) -> PathBuf {
        self.bpf.0.join("lb")
    }

    fn write(&self, c: &Conf) -> PathBuf {
        let backends: Vec<String> = c
            .backends
            .iter()
            .map(|(p, w)| format!("{{ address = \"127.0.0.1:{p}\", weight = {w} }}"))
            .collect();
        let state = if c.state_file {
            format!(
                "state_file = {:?}\n",
                self.dir.path("state.json").display().to_string()
            )
        } else {
            String::new()
        };
        let text = format!(
            r#"[dataplane]
interface = "lb0"
xdp_mode = "native"
flow_table_size = 65536
max_services = 4
pin_path = "{pin}"

[admin]
listen = "{api}"
{state}
[[services]]
name = "web"
listen = "0.0.0.0:443"
protocols = ["tcp"]
health = {health}
backends = [{backends}]
"#,
            pin = c
                .pin
                .clone()
                .unwrap_or_else(|| self.pin().display().to_string()),
            api = c.api,
            health = c.health,
            backends = backends.join(", "),
        );
        let p = self.dir.path(c.file);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn config(&self, backends: &[(u16, u16)], health: &str) -> PathBuf {
        self.write(&Conf {
            file: "lb.toml",
            backends,
            health,
            pin: None,
            state_file: true,
            api: API,
        })
    }
}

const FAST_TCP: &str =
    r#"{ kind = "tcp", interval = "200ms", timeout = "100ms", rise = 2, fall = 2 }"#;

fn backends(lb: &Lb) -> HashMap<u16, Value> {
    let (status, v) = lb.get("/api/v1/services/web/backends");
    assert_eq!(status, 200, "{v}\n{}", lb.log());
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let a: SocketAddr = b["address"].as_str()?.parse().ok()?;
            Some((a.port(), b.clone()))
        })
        .collect()
}

fn wait_healthy(lb: &Lb, port: u16, healthy: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if backends(lb).get(&port).and_then(|b| b["healthy"].as_bool()) == Some(healthy) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "backend {port} not healthy={healthy} within {within:?}:\n{}",
            lb.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn exchange(s: &mut TcpStream, r: &mut BufReader<TcpStream>) -> Result<String, String> {
    s.write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(line.trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// One new connection with one exchange: the answering backend's name.
fn one_connection(to: SocketAddr) -> Result<String, String> {
    let mut c =
        TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    exchange(&mut c, &mut r)
}

/// New connections one after another from the client namespace until
/// stopped: (names of answering backends with counts, failures).
struct NewConnections {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Tally>>,
}

/// Answers by backend name, and failures.
type Tally = (HashMap<String, u64>, Vec<String>);

impl NewConnections {
    fn start(ns: &str, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let to: SocketAddr = VIP.parse().unwrap();
        let handle = netns::spawn_in(ns, move || {
            let (mut names, mut failures) = (HashMap::new(), Vec::new());
            let deadline = Instant::now() + Duration::from_secs(180);
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && n < 100_000 {
                n += 1;
                let t = Instant::now();
                match one_connection(to) {
                    Ok(name) => *names.entry(name).or_insert(0) += 1,
                    Err(e) => failures.push(format!("connection {n}: {e}")),
                }
                let took = t.elapsed();
                if took > Duration::from_millis(200) {
                    println!("slow connection {n}: {took:?}");
                }
                thread::sleep(pause);
            }
            (names, failures)
        });
        NewConnections {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for NewConnections {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A backend known down stays out of the table across `kill -9` and
/// SIGTERM restarts: no new connection is refused by it; it comes back
/// once its checks pass `rise` times.
#[test]
fn known_down_backends_stay_out_across_restarts() {
    let s = setup("verdicts");
    let _up = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    // 8002 has nothing listening: every connection to it is refused.
    let config = s.config(&[(8001, 100), (8002, 100)], FAST_TCP);
    let mut lb = Lb::start(&s.lb_ns, &config, API, &[]);
    wait_healthy(&lb, 8002, false, Duration::from_secs(5));

    let traffic = NewConnections::start(&s.client_ns, Duration::from_millis(10));
    thread::sleep(Duration::from_millis(200));
    let mut lost = Vec::new();
    for i in 0..6 {
        if i < 3 {
            lb.kill();
        } else {
            assert!(lb.stop().success(), "SIGTERM:\n{}", lb.log());
        }
        thread::sleep(Duration::from_millis(100));
        lb = Lb::start(&s.lb_ns, &config, API, &[]);
        assert!(lb.log().contains("adopted"), "restart {i}:\n{}", lb.log());
        // Known down from the first answer on, not after `fall` checks.
        if backends(&lb)[&8002]["healthy"] != false {
            lost.push(i);
        }
        thread::sleep(Duration::from_millis(400));
    }
    let (names, failures) = traffic.finish();
    let total: u64 = names.values().sum();
    println!(
        "6 restarts (3 kill -9, 3 SIGTERM) with 8002 known down: {total} new connections ok, {} refused or failed; verdict lost at restarts {lost:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(lost.is_empty(), "the verdict was lost at restarts {lost:?}");
    assert!(total > 100, "too few connections: {total}");

    // Checks passing `rise` times bring it back.
    let _back = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let took = wait_healthy(&lb, 8002, true, Duration::from_secs(5));
    println!("8002 healthy again {took:?} after it started listening (rise 2, interval 200ms)");
}

/// A backend re-activated after `disabled`, or whose health check a PUT
/// removed, gets a fresh verdict at once instead of a stale one.
#[test]
fn reactivated_backends_get_a_fresh_verdict() {
    let s = setup("fresh");
    let _up = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    // Slow checks: "at once" cannot be a lucky periodic check.
    let slow = r#"{ kind = "tcp", interval = "2s", timeout = "200ms", rise = 3, fall = 1 }"#;
    let config = s.config(&[(8001, 100), (8002, 100)], slow);
    let lb = Lb::start(&s.lb_ns, &config, API, &["--reset-state"]);
    wait_healthy(&lb, 8002, false, Duration::from_secs(6));
    let patch = |state: &str| {
        let (st, v) = lb.call(
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8002",
            Some(&format!("{{\"state\": \"{state}\"}}")),
            None,
        );
        assert_eq!(st, 200, "{v}\n{}", lb.log());
    };
    patch("disabled");
    let _back = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    patch("active");
    let took = wait_healthy(&lb, 8002, true, Duration::from_millis(1500));
    println!("re-activated backend healthy {took:?} after the PATCH (interval 2s, rise 3)");
    let to: SocketAddr = VIP.parse().unwrap();
    let names: Vec<String> = netns::within(&s.client_ns, move || {
        (0..40).filter_map(|_| one_connection(to).ok()).collect()
    });
    assert!(
        names.iter().any(|n| n == "8002"),
        "8002 gets no connections: {names:?}"
    );

    // Down again; back up, and a PUT that changes the check: the new check
    // decides at once, not after `rise` rounds of it.
    drop(_back);
    wait_healthy(&lb, 8002, false, Duration::from_secs(6));
    let _back = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let changed = r#"{"name": "web", "listen": "0.0.0.0:443", "protocols": ["tcp"], "health": {"kind": "tcp", "interval": "3s", "timeout": "200ms", "rise": 3, "fall": 1}, "backends": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"}]}"#;
    let (st, v) = lb.call("PUT", "/api/v1/services/web", Some(changed), None);
    assert_eq!(st, 200, "{v}");
    let took = wait_healthy(&lb, 8002, true, Duration::from_millis(1500));
    println!("healthy {took:?} after a PUT changed its check (interval 3s, rise 3)");

    // Down again, then a PUT that drops the health check: no check, no
    // stale "down".
    drop(_back);
    wait_healthy(&lb, 8002, false, Duration::from_secs(8));
    let body = r#"{"name": "web", "listen": "0.0.0.0:443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"}]}"#;
    let (st, v) = lb.call("PUT", "/api/v1/services/web", Some(body), None);
    assert_eq!(st, 200, "{v}");
    wait_healthy(&lb, 8002, true, Duration::from_millis(500));
}

/// SIGTERM (what `systemctl restart` sends) leaves the data plane running:
/// a long download survives three SIGTERM restarts. `lb stop` detaches,
/// unpins and ends the daemon.
#[test]
fn sigterm_restarts_keep_a_long_download_and_lb_stop_removes_everything() {
    let s = setup("hitless");
    let config = s.config(&[(8001, 100)], FAST_TCP);
    let mut lb = Lb::start(&s.lb_ns, &config, API, &[]);

    // The download: a backend streaming 16 KiB every 2 ms to one client
    // connection for as long as it is read.
    let streamer = Streamer::start(&s.lb_ns, 8001);
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, to) = (stop.clone(), VIP.parse::<SocketAddr>().unwrap());
    let download = netns::spawn_in(&s.client_ns, move || {
        let mut c =
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.write_all(b"GET\n").map_err(|e| e.to_string())?;
        let (mut bytes, deadline) = (0u64, Instant::now() + Duration::from_secs(60));
        let mut buf = vec![0u8; 65536];
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            match c.read(&mut buf) {
                Ok(0) => return Err(format!("closed after {bytes} bytes")),
                Ok(n) => bytes += n as u64,
                Err(e) => return Err(format!("after {bytes} bytes: {e}")),
            }
        }
        Ok::<u64, String>(bytes)
    });
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for i in 0..3 {
        assert!(lb.stop().success(), "SIGTERM {i}:\n{}", lb.log());
        assert!(
            lb.log().contains("leaving the data plane running"),
            "{}",
            lb.log()
        );
        thread::sleep(Duration::from_millis(300));
        lb = Lb::start(&s.lb_ns, &config, API, &[]);
        assert!(lb.log().contains("adopted"), "restart {i}:\n{}", lb.log());
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let bytes = download.join().unwrap().expect("the download broke");
    drop(streamer);
    println!(
        "one download, {:.1} MiB over {:?}, through 3 SIGTERM restarts: unbroken",
        bytes as f64 / (1 << 20) as f64,
        started.elapsed()
    );
    assert!(bytes > 1 << 20, "only {bytes} bytes arrived");

    // `--keep-dataplane` still parses, with a deprecation line.
    assert!(lb.stop().success());
    let mut lb = Lb::start(&s.lb_ns, &config, API, &["--keep-dataplane"]);
    assert!(lb.log().contains("deprecated"), "{}", lb.log());

    let out = lb.cli(&["stop"]);
    assert!(
        out.status.success(),
        "lb stop: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = lb
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon did not exit after lb stop");
    assert!(status.success(), "{status}:\n{}", lb.log());
    assert!(lb.log().contains("detached and unpinned"), "{}", lb.log());
    if s.pin().exists() {
        let left = netns::run(&["find", s.pin().to_str().unwrap()]);
        panic!("pins left after lb stop:\n{left}");
    }
    let link = netns::run_in(&s.lb_ns, &["ip", "link", "show", "lb0"]);
    assert!(
        !link.contains("xdp"),
        "XDP still attached after lb stop: {link}"
    );
    let to: SocketAddr = VIP.parse().unwrap();
    let r = netns::within(&s.client_ns, move || one_connection(to));
    assert!(r.is_err(), "the service still answers after lb stop: {r:?}");
}

/// A TCP server in a namespace that, once a client sends a line, streams
/// 16 KiB every 2 ms to it until the client goes or the server is dropped.
struct Streamer {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Streamer {
    fn start(ns: &str, port: u16) -> Streamer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = netns::spawn_in(ns, move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let mut workers = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let flag = flag.clone();
                        workers.push(thread::spawn(move || {
                            c.set_nonblocking(false).unwrap();
                            // Health checks connect and close: wait for a line.
                            let mut line = [0u8; 4];
                            if c.read_exact(&mut line).is_err() {
                                return;
                            }
                            c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                            let chunk = vec![b'x'; 16 * 1024];
                            while !flag.load(Ordering::Relaxed) {
                                if c.write_all(&chunk).is_err() {
                                    return;
                                }
                                thread::sleep(Duration::from_millis(2));
                            }
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        ready_rx.recv().unwrap();
        Streamer {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn status(lb: &Lb) -> Value {
    let (st, v) = lb.get("/api/v1/status");
    assert_eq!(st, 200, "{v}\n{}", lb.log());
    v
}

fn weight(lb: &Lb, port: u16) -> u64 {
    backends(lb)[&port]["weight"].as_u64().unwrap()
}

fn set_weight(lb: &Lb, port: u16, w: u16) {
    let (st, v) = lb.call(
        "PATCH",
        &format!("/api/v1/services/web/backends/127.0.0.1:{port}"),
        Some(&format!("{{\"weight\": {w}}}")),
        None,
    );
    assert_eq!(st, 200, "{v}\n{}", lb.log());
}

/// API changes come back after a restart on the same config; a config edit
/// wins over them and says which were dropped; `--reset-state` resets for
/// good.
#[test]
fn the_config_wins_over_api_changes_made_on_another_config() {
    let s = setup("cfgstate");
    let config = s.config(&[(8001, 100), (8002, 100)], FAST_TCP);
    let mut lb = Lb::start(&s.lb_ns, &config, API, &[]);
    set_weight(&lb, 8001, 7);
    assert!(lb.stop().success());
    let mut lb2 = Lb::start(&s.lb_ns, &config, API, &[]);
    assert_eq!(weight(&lb2, 8001), 7, "API change lost on the same config");
    assert_eq!(status(&lb2)["api_changes"], true);
    assert_eq!(status(&lb2)["dropped_changes"], serde_json::json!([]));
    assert!(lb2.stop().success());

    // The config changes: it wins, and the dropped change is named.
    s.config(&[(8001, 100), (8002, 100), (8003, 100)], FAST_TCP);
    lb = Lb::start(&s.lb_ns, &config, API, &[]);
    assert_eq!(weight(&lb, 8001), 100, "the edited config did not win");
    assert!(backends(&lb).contains_key(&8003));
    let st = status(&lb);
    println!("status after a config edit: {st}");
    let dropped = st["dropped_changes"].to_string();
    assert!(dropped.contains("127.0.0.1:8001 weight 100 -> 7"), "{st}");
    assert!(lb.log().contains("API change dropped"), "{}", lb.log());
    let out = lb.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("API change dropped") && text.contains("weight 100 -> 7"),
        "{text}"
    );
    // Dropped for good: the next restart does not bring it back.
    assert!(lb.stop().success());
    lb = Lb::start(&s.lb_ns, &config, API, &[]);
    assert_eq!(weight(&lb, 8001), 100);

    // --reset-state really resets.
    set_weight(&lb, 8002, 9);
    assert!(lb.stop().success());
    lb = Lb::start(&s.lb_ns, &config, API, &["--reset-state"]);
    assert_eq!(weight(&lb, 8002), 100);
    assert!(lb.stop().success());
    lb = Lb::start(&s.lb_ns, &config, API, &[]);
    assert_eq!(
        weight(&lb, 8002),
        100,
        "--reset-state: the old change came back"
    );
    assert!(lb.stop().success());
}

/// Without `state_file`, each config file gets a state file of its own
/// (under `$STATE_DIRECTORY`, as systemd sets it).
#[test]
fn default_state_files_are_per_config() {
    let s = setup("defstate");
    let state_dir = s.dir.path("var-lib-lb");
    let launch = Launch {
        env: vec![("STATE_DIRECTORY".into(), state_dir.display().to_string())],
        ..Launch::default()
    };
    let mut files = Vec::new();
    for name in ["a.toml", "b.toml"] {
        let config = s.write(&Conf {
            file: name,
            backends: &[(8001, 100)],
            health: FAST_TCP,
            pin: None,
            state_file: false,
            api: API,
        });
        let mut lb = Lb::start_with(&s.lb_ns, &config, API, &[], &launch);
        set_weight(&lb, 8001, if name == "a.toml" { 3 } else { 4 });
        files.push(status(&lb)["state_file"].as_str().unwrap().to_string());
        assert!(lb.stop().success());
    }
    println!("default state files: {files:?}");
    assert_ne!(files[0], files[1]);
    for f in &files {
        assert!(Path::new(f).starts_with(&state_dir), "{f}");
        assert!(Path::new(f).exists(), "{f}");
    }
    // Each config kept its own change.
    let lb = Lb::start_with(&s.lb_ns, &s.dir.path("a.toml"), API, &[], &launch);
    assert_eq!(weight(&lb, 8001), 3);
}

/// SIGHUP, `POST /api/v1/reload` and `lb reload` re-read the config and
/// apply the difference under traffic; an invalid file changes nothing.
/// A backend drained, then removed, costs no connection; one removed while
/// busy costs at most the connection open on it, which is reset at once
/// (none is left waiting for a reply).
#[test]
fn reloads_apply_the_difference_under_traffic() {
    let s = setup("reload");
    let _servers: Vec<EchoName> = [8001u16, 8002, 8003, 8004]
        .iter()
        .map(|p| {
            EchoName::start(
                &s.lb_ns,
                format!("0.0.0.0:{p}").parse().unwrap(),
                &p.to_string(),
            )
        })
        .collect();
    let config = s.config(&[(8001, 100), (8002, 100), (8003, 100)], FAST_TCP);
    let mut lb = Lb::start(&s.lb_ns, &config, API, &["--reset-state"]);
    let traffic = NewConnections::start(&s.client_ns, Duration::from_millis(5));
    thread::sleep(Duration::from_millis(500));

    // 8004 added, 8002 re-weighted, 8003 drained; by SIGHUP.
    s.config(
        &[(8001, 100), (8002, 50), (8003, 100), (8004, 100)],
        FAST_TCP,
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let drained = text.replace(
        r#""127.0.0.1:8003", weight = 100 }"#,
        r#""127.0.0.1:8003", weight = 100, state = "draining" }"#,
    );
    assert_ne!(drained, text);
    std::fs::write(&config, drained).unwrap();
    reload_by_sighup(&lb, |b| b.contains_key(&8004));
    let b = backends(&lb);
    assert_eq!(b[&8002]["weight"], 50);
    assert_eq!(b[&8003]["state"], "draining");
    thread::sleep(Duration::from_millis(500));
    // The drained 8003 removed.
    s.config(&[(8001, 100), (8002, 50), (8004, 100)], FAST_TCP);
    reload_by_sighup(&lb, |b| !b.contains_key(&8003));
    thread::sleep(Duration::from_millis(500));
    let (names, failures) = traffic.finish();
    println!(
        "reloads under traffic (drain, then remove): answers by backend {names:?}, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "failures: {failures:?}");
    // After the reloads: new connections by the new weights, none to 8003.
    let to: SocketAddr = VIP.parse().unwrap();
    let after: Vec<String> = netns::within(&s.client_ns, move || {
        (0..300).map(|_| one_connection(to).unwrap()).collect()
    });
    let count = |n: &str| after.iter().filter(|x| *x == n).count();
    println!(
        "300 connections after the reloads: 8001 {}, 8002 {}, 8003 {}, 8004 {}",
        count("8001"),
        count("8002"),
        count("8003"),
        count("8004")
    );
    assert_eq!(
        count("8003"),
        0,
        "the removed backend still gets new connections"
    );
    assert!(count("8004") >= 60, "8004 gets too few: {after:?}");
    assert!(
        count("8002") < count("8001"),
        "8002 not re-weighted: {after:?}"
    );

    // A busy backend removed at once, without a drain: out now, open
    // connections too. The loop keeps one connection open at a time, so
    // at most one is cut, by a reset; an untranslated reply (the client
    // drops it and waits) would show as a timeout here.
    let traffic = NewConnections::start(&s.client_ns, Duration::from_millis(5));
    thread::sleep(Duration::from_millis(500));
    s.config(&[(8001, 100), (8002, 50)], FAST_TCP);
    reload_by_sighup(&lb, |b| !b.contains_key(&8004));
    thread::sleep(Duration::from_millis(500));
    let (names, failures) = traffic.finish();
    println!("busy backend removed: answers by backend {names:?}, failures {failures:?}");
    assert!(
        failures.len() <= 1
            && failures
                .iter()
                .all(|f| f.contains("reset by peer") || f.contains("Broken pipe")),
        "failures: {failures:?}"
    );
    assert!(names.contains_key("8004") && names.contains_key("8001"));
    assert!(lb_pid_alive(&lb), "SIGHUP ended the daemon:\n{}", lb.log());

    // An invalid file: 400 naming line and field, nothing changes.
    let before = lb.get("/api/v1/services").1;
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("weight = 50", "weight = 70000")).unwrap();
    let (st, v) = lb.call("POST", "/api/v1/reload", None, None);
    println!("invalid reload: {st} {v}");
    assert_eq!(st, 400, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("lb.toml:") && err.contains("weight"), "{err}");
    assert_eq!(
        lb.get("/api/v1/services").1,
        before,
        "an invalid reload changed something"
    );
    lb.signal(libc::SIGHUP);
    thread::sleep(Duration::from_millis(500));
    assert!(lb.log().contains("reload refused"), "{}", lb.log());
    assert_eq!(lb.get("/api/v1/services").1, before);
    let out = lb.cli(&["reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight"));

    // `lb reload` applies a valid one.
    std::fs::write(&config, text.replace("weight = 50", "weight = 60")).unwrap();
    let out = lb.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(weight(&lb, 8002), 60);
    assert!(lb.stop().success());
}

/// Sends SIGHUP and waits until the backends the API shows pass `applied`.
fn reload_by_sighup(lb: &Lb, applied: impl Fn(&HashMap<u16, Value>) -> bool) {
    lb.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !applied(&backends(lb)) {
        assert!(
            Instant::now() < deadline,
            "SIGHUP applied nothing:\n{}",
            lb.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn lb_pid_alive(lb: &Lb) -> bool {
    rustix::process::Pid::from_raw(lb.pid() as i32)
        .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok())
}

/// A second `lb run` on the same pins exits 2 and touches nothing; an
/// admin port in use fails before anything is attached.
#[test]
fn one_daemon_per_pin_path() {
    let s = setup("lock");
    let _a = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let config = s.config(&[(8001, 100)], FAST_TCP);
    let lb = Lb::start(&s.lb_ns, &config, API, &[]);
    let other = s.write(&Conf {
        file: "second.toml",
        backends: &[(8001, 100)],
        health: FAST_TCP,
        pin: None,
        state_file: true,
        api: "127.0.0.1:9181",
    });
    let mut second = Lb::spawn(&s.lb_ns, &other, "127.0.0.1:9181", &[], &Launch::default());
    let status = second
        .wait_exit(Duration::from_secs(10))
        .expect("the second daemon did not exit");
    println!("second daemon: {status}: {}", second.log().trim());
    assert_eq!(status.code(), Some(2), "{}", second.log());
    assert!(
        second.log().contains("another lb daemon"),
        "{}",
        second.log()
    );
    assert_eq!(lb.get("/healthz").0, 200);
    let to: SocketAddr = VIP.parse().unwrap();
    assert!(netns::within(&s.client_ns, move || one_connection(to)).is_ok());

    // Admin port in use: fails fast, before attaching (a fresh interface
    // in a namespace of its own).
    let mut topo = Topology::new();
    let ns = topo.namespace("port");
    let peer = topo.namespace("portpeer");
    topo.veth(
        (&ns, "lb0", &["10.207.1.1/24"]),
        (&peer, "cl0", &["10.207.1.2/24"]),
    );
    let busy = netns::within(&ns, || std::net::TcpListener::bind(API).unwrap());
    let bpf2 = BpfFs::mount("lock2");
    let cfg3 = s.write(&Conf {
        file: "third.toml",
        backends: &[(8001, 100)],
        health: FAST_TCP,
        pin: Some(bpf2.0.join("lb").display().to_string()),
        state_file: false,
        api: API,
    });
    let started = Instant::now();
    let mut third = Lb::spawn(&ns, &cfg3, API, &[], &Launch::default());
    let st = third
        .wait_exit(Duration::from_secs(10))
        .expect("did not fail");
    println!("admin port in use: {st} after {:?}", started.elapsed());
    assert!(!st.success());
    assert!(third.log().contains("cannot listen"), "{}", third.log());
    let link = netns::run_in(&ns, &["ip", "link", "show", "lb0"]);
    assert!(
        !link.contains("xdp"),
        "attached although the port was in use: {link}"
    );
    drop(busy);
}

/// Pins on a bpf filesystem only the daemon's mount namespace sees (here
/// one the daemon mounts at /sys/fs/bpf inside `ip netns exec`) are
/// detected and reported; pins on a shared bpffs are not.
#[test]
fn pins_private_to_the_daemon_are_reported() {
    let s = setup("private");
    let private = s.write(&Conf {
        file: "private.toml",
        backends: &[(8001, 100)],
        health: FAST_TCP,
        pin: Some(format!("/sys/fs/bpf/lbt-{}-private", std::process::id())),
        state_file: true,
        api: API,
    });
    let mut lb = Lb::start(&s.lb_ns, &private, API, &["--reset-state"]);
    assert!(
        lb.log().contains("only this daemon's mount namespace sees"),
        "no warning:\n{}",
        lb.log()
    );
    assert_eq!(status(&lb)["pins_outlive_daemon"], false);
    assert!(lb.stop().success());

    let shared = s.config(&[(8001, 100)], FAST_TCP);
    let mut lb = Lb::start(&s.lb_ns, &shared, API, &["--reset-state"]);
    assert!(!lb.log().contains("mount namespace sees"), "{}", lb.log());
    assert_eq!(status(&lb)["pins_outlive_daemon"], true);
    assert!(lb.stop().success());
}

fn raise_own_nofile(to: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = Some(lim.maximum.map_or(to, |max| to.min(max)));
    let _ = setrlimit(Resource::Nofile, lim);
}

fn checks_total(lb: &Lb) -> f64 {
    let (_, text) = lb.raw("GET", "/metrics", None, None);
    text.lines()
        .filter(|l| l.starts_with("lb_health_checks_total{") && l.contains("result=\"success\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A Unix stream connection to `path` that never blocks: `None` when the
/// listener's backlog is full or the socket is gone.
fn unix_connect_nonblocking(path: &Path) -> Option<std::os::unix::net::UnixStream> {
    use rustix::net::{
        AddressFamily, SocketAddrUnix, SocketFlags, SocketType, connect, socket_with,
    };
    let addr = SocketAddrUnix::new(path).ok()?;
    let fd = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK,
        None,
    )
    .ok()?;
    connect(&fd, &addr).ok()?;
    Some(fd.into())
}

/// How many of `conns` the daemon still holds open.
fn still_open<C>(conns: &[C], read: impl Fn(&C) -> std::io::Result<usize>) -> usize {
    conns
        .iter()
        .filter(|c| matches!(read(c), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count()
}

/// While `lb` holds a flood of idle connections: /healthz over TCP and the
/// socket, `lb status` on the socket, and health checks all still work.
fn still_serving(lb: &Lb, what: &str) {
    let before = checks_total(lb);
    let t = Instant::now();
    let (st_tcp, _) = lb.tcp("GET", "/healthz", None, None);
    let healthz_tcp = t.elapsed();
    let t = Instant::now();
    let (st_unix, _) = lb.get("/healthz");
    let healthz_unix = t.elapsed();
    let t = Instant::now();
    let cli = lb.cli(&["status"]);
    let cli_time = t.elapsed();
    thread::sleep(Duration::from_millis(1500));
    let after = checks_total(lb);
    let healthy = backends(lb)[&8001]["healthy"].as_bool();
    println!(
        "{what}: /healthz {st_tcp} over TCP in {healthz_tcp:?}, {st_unix} over the socket in \
         {healthz_unix:?}; lb status in {cli_time:?}; {} successful checks in 1.5 s; 8001 \
         healthy={healthy:?}",
        after - before
    );
    assert_eq!((st_tcp, st_unix), (200, 200), "{what}: {}", lb.log());
    assert!(
        healthz_tcp < Duration::from_secs(2) && healthz_unix < Duration::from_secs(2),
        "{what}"
    );
    assert!(
        cli.status.success() && String::from_utf8_lossy(&cli.stdout).contains("127.0.0.1:8001"),
        "{what}: lb status on the socket: {cli:?}"
    );
    assert!(
        after - before >= 3.0,
        "{what}: health checks stalled:\n{}",
        lb.log()
    );
    assert_eq!(healthy, Some(true), "{what}: {}", lb.log());
}

/// 10,000 idle connections to the admin port, and then 10,000 to the admin
/// socket (the daemon started with a soft open-file limit of 512; the test
/// holds one flood at a time, its own hard limit being 20,000), stop
/// neither `/healthz` answering on either, nor health checks running, nor
/// the CLI on the socket; each listener keeps at most its cap open.
#[test]
fn idle_admin_connections_do_not_starve_the_daemon() {
    const FLOOD: usize = 10_000;
    let s = setup("idle");
    raise_own_nofile(FLOOD as u64 + 2048);
    let _a = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let config = s.config(&[(8001, 100)], FAST_TCP);
    let launch = Launch {
        prefix: vec!["prlimit".into(), "--nofile=512:20000".into()],
        ..Launch::default()
    };
    let lb = Lb::start_with(&s.lb_ns, &config, API, &["--reset-state"], &launch);
    let api: SocketAddr = API.parse().unwrap();
    let t0 = Instant::now();
    let tcp = netns::within(&s.lb_ns, move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        (0..FLOOD)
            .take_while(|_| Instant::now() < deadline)
            .filter_map(|_| TcpStream::connect_timeout(&api, Duration::from_secs(3)).ok())
            .collect::<Vec<_>>()
    });
    let took = t0.elapsed();
    assert_eq!(
        tcp.len(),
        FLOOD,
        "only {} idle TCP connections made in 60 s:\n{}",
        tcp.len(),
        lb.log()
    );
    still_serving(
        &lb,
        &format!("{FLOOD} idle TCP connections (made in {took:?})"),
    );
    let open = still_open(&tcp, |c| {
        c.set_nonblocking(true)?;
        (&*c).read(&mut [0u8; 1])
    });
    println!("{open} of them still open");
    assert!(open <= 260, "{open} idle TCP connections held open");
    drop(tcp);

    let t0 = Instant::now();
    let mut unix = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while unix.len() < FLOOD && Instant::now() < deadline {
        match unix_connect_nonblocking(&lb.socket) {
            Some(c) => unix.push(c),
            // The backlog is full: let the daemon accept.
            None => thread::sleep(Duration::from_millis(1)),
        }
    }
    let took = t0.elapsed();
    assert_eq!(
        unix.len(),
        FLOOD,
        "only {} idle socket connections made in 60 s",
        unix.len()
    );
    still_serving(
        &lb,
        &format!("{FLOOD} idle socket connections (made in {took:?})"),
    );
    let open = still_open(&unix, |c| (&*c).read(&mut [0u8; 1]));
    println!("{open} of them still open");
    assert!(open <= 260, "{open} idle socket connections held open");
}

/// Waits up to `within` for the server to close `c`; how long it took.
fn closed_within(c: &TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < within {
        match (&*c).read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// When the server closed each of `conns` (polled together), from now.
fn close_times(conns: &[&TcpStream], within: Duration) -> Vec<Option<Duration>> {
    let start = Instant::now();
    let mut out = vec![None; conns.len()];
    for c in conns {
        c.set_nonblocking(true).unwrap();
    }
    let mut buf = [0u8; 4096];
    while start.elapsed() < within && out.iter().any(Option::is_none) {
        for (i, c) in conns.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            match (&**c).read(&mut buf) {
                Ok(0) => out[i] = Some(start.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => out[i] = Some(start.elapsed()),
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    out
}

/// `admin.header_timeout` and `admin.idle_timeout` close slow and idle
/// clients; `admin.max_connections` caps open connections.
#[test]
fn admin_timeouts_close_slow_and_idle_clients() {
    let s = setup("admin-timeouts");
    let config = s.config(&[(8001, 100)], FAST_TCP);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[admin]\n",
        "[admin]\nheader_timeout = \"1s\"\nidle_timeout = \"1s\"\nmax_connections = 8\n",
    );
    std::fs::write(&config, text).unwrap();
    let lb = Lb::start(&s.lb_ns, &config, API, &["--reset-state"]);
    let api: SocketAddr = API.parse().unwrap();
    let (idle, slow, kept) = netns::within(&s.lb_ns, move || {
        let idle = TcpStream::connect(api).unwrap();
        // Headers dripped one byte every 200 ms never finish.
        let slow = TcpStream::connect(api).unwrap();
        let mut w = slow.try_clone().unwrap();
        let drip = thread::spawn(move || {
            w.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").ok();
            for _ in 0..20 {
                thread::sleep(Duration::from_millis(200));
                if w.write_all(b"X").is_err() {
                    break;
                }
            }
        });
        // One answered request, then idle on a kept-alive connection.
        let mut kept = TcpStream::connect(api).unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        kept.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(kept.read(&mut buf).unwrap() > 0);
        let t = close_times(&[&idle, &slow, &kept], Duration::from_secs(5));
        drip.join().unwrap();
        (t[0], t[1], t[2])
    });
    println!(
        "closed after: idle {idle:?}, dripped headers {slow:?}, kept-alive idle {kept:?} (timeouts 1s)"
    );
    for (what, t) in [
        ("idle", idle),
        ("dripped headers", slow),
        ("kept-alive", kept),
    ] {
        let t = t.unwrap_or_else(|| panic!("{what} connection still open after 5 s"));
        assert!(
            t >= Duration::from_millis(700),
            "{what} closed too early: {t:?}"
        );
    }
    // The cap: 20 idle connections, at most 8 stay open, /healthz answers.
    let conns = netns::within(&s.lb_ns, move || {
        (0..20)
            .map(|_| TcpStream::connect(api).unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(lb.get("/healthz").0, 200);
    thread::sleep(Duration::from_millis(200));
    let open = conns
        .iter()
        .filter(|c| closed_within(c, Duration::from_millis(60)).is_none())
        .count();
    println!("20 idle connections with max_connections = 8: {open} open");
    assert!(open <= 8, "{open} open");
}

/// The notification protocol over a real NOTIFY_SOCKET: READY after
/// attach, WATCHDOG at half of WATCHDOG_USEC, RELOADING then READY around
/// a SIGHUP, STOPPING on SIGTERM.
#[test]
fn systemd_notifications() {
    let s = setup("notify");
    let sock_path = s.dir.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let msgs = Arc::new(Mutex::new(Vec::<(Duration, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let reader = {
        let (msgs, stop) = (msgs.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let m = String::from_utf8_lossy(&buf[..n]).to_string();
                    msgs.lock().unwrap().push((started.elapsed(), m));
                }
            }
        })
    };
    let config = s.config(&[(8001, 100)], FAST_TCP);
    let launch = Launch {
        env: vec![
            ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        ..Launch::default()
    };
    let mut lb = Lb::start_with(&s.lb_ns, &config, API, &["--reset-state"], &launch);
    let served = started.elapsed();
    thread::sleep(Duration::from_millis(1000));
    lb.signal(libc::SIGHUP);
    thread::sleep(Duration::from_millis(500));
    assert!(lb.stop().success());
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let msgs = msgs.lock().unwrap();
    let kinds: Vec<&str> = msgs
        .iter()
        .map(|(_, m)| m.lines().next().unwrap_or(""))
        .collect();
    println!("notifications: {kinds:?}");
    let first = |k: &str| kinds.iter().position(|m| *m == k);
    let ready = first("READY=1").expect("no READY=1");
    assert!(
        msgs[ready].0 <= served + Duration::from_millis(50),
        "READY after the API answered? {msgs:?}"
    );
    let watchdogs = kinds.iter().filter(|m| **m == "WATCHDOG=1").count();
    assert!(
        watchdogs >= 4,
        "{watchdogs} WATCHDOG=1 in ~1.8 s at 200 ms: {kinds:?}"
    );
    let reloading = first("RELOADING=1").expect("no RELOADING=1");
    assert!(reloading > ready);
    assert!(
        msgs[reloading].1.contains("MONOTONIC_USEC="),
        "{}",
        msgs[reloading].1
    );
    assert!(
        kinds[reloading..].contains(&"READY=1"),
        "no READY=1 after the reload: {kinds:?}"
    );
    let stopping = first("STOPPING=1").expect("no STOPPING=1");
    assert!(stopping > reloading);
}

/// The shipped unit passes `systemd-analyze verify` (skipped, saying so,
/// where that command does not exist).
#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/lb.service");
    let text = std::fs::read_to_string(&unit).expect("packaging/lb.service");
    for needed in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "StateDirectory=lb",
        "RuntimeDirectory=lb",
        "KillSignal=SIGTERM",
    ] {
        assert!(text.contains(needed), "lb.service lacks {needed}");
    }
    let Ok(probe) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        println!("systemd-analyze not found: `systemd-analyze verify` SKIPPED");
        return;
    };
    assert!(probe.status.success());
    // Verified against the binary this test built, at the unit's path.
    let dir = TempDir::new("unit");
    let lb = lb_tests::daemon::lb_binary();
    let fixed = text.replace("/usr/bin/lb", lb.to_str().unwrap());
    let path = dir.path("lb.service");
    std::fs::write(&path, fixed).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("systemd-analyze verify: {} {}", out.status, err.trim());
    let own: Vec<&str> = err.lines().filter(|l| l.contains("lb.service")).collect();
    assert!(
        out.status.success() && own.is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}
