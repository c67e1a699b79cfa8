//! The control plane: Maglev table builds, the share of flows a backend
//! change moves (with the flow table, through the real program; without
//! it, from the tables), the time from a backend's death to the new table
//! in the real daemon, the table installs for 50 simultaneous deaths, and
//! the daemon's memory under a stream of API changes.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Lb, TempDir},
    netns::Topology,
    packet::{Spec, TCP_ACK},
    servers::EchoName,
};
use lb_userspace::{
    dataplane::{
        BackendSpec, Dataplane, Forwarding, MapWriter, Options, Protocol, ServiceSpec, addr_words,
    },
    maglev,
};
use serde_json::Value;

use crate::{
    Scale,
    report::{Report, Table, num},
    results::{
        Change, DaemonMetric, DaemonRow, FigureId, FlowsMovedRow, MaglevBuildRow, MaglevSkewRow,
        Weights,
    },
    sys,
};

pub fn run(scale: &Scale, report: &mut Report) {
    maglev_builds(scale, report);
    flow_moves(scale, report);
    daemon(scale, report);
}

fn entries(n: usize) -> Vec<maglev::Entry> {
    (0..n)
        .map(|i| maglev::Entry {
            name: format!("10.{}.{}.{}:443", i / 65536, (i / 256) % 256, i % 256),
            id: i as u32,
            weight: 100,
        })
        .collect()
}

fn maglev_builds(scale: &Scale, report: &mut Report) {
    let mut t = Table::new(
        format!(
            "Maglev table build (lb_userspace::maglev::build, median of {})",
            scale.maglev_reps
        ),
        &[
            "backends",
            "M = 65537, ms",
            "M >= 100 x backends",
            "ms",
            "slots per backend (min..max, M = 65537)",
        ],
    );
    let mut rows = Vec::new();
    for n in [10usize, 100, 1000, 5000] {
        let e = entries(n);
        let time = |m: u32| build_ms(&e, m, scale.maglev_reps);
        let default_ms = time(lb_common::DEFAULT_MAGLEV_SIZE);
        let big_m = maglev::next_prime((100 * n as u32).max(lb_common::DEFAULT_MAGLEV_SIZE));
        let big_ms = time(big_m);
        let counts = maglev::slot_counts(&maglev::build(&e, lb_common::DEFAULT_MAGLEV_SIZE));
        let (min, max) = (
            counts.values().min().copied().unwrap_or(0),
            counts.values().max().copied().unwrap_or(0),
        );
        t.row(vec![
            n.to_string(),
            num(default_ms),
            big_m.to_string(),
            num(big_ms),
            format!("{min}..{max}"),
        ]);
        report.figure(
            FigureId::MaglevBuild {
                backends: n,
                m: None,
            },
            default_ms,
        );
        report.figure(
            FigureId::MaglevBuild {
                backends: n,
                m: Some(big_m),
            },
            big_ms,
        );
        rows.push(MaglevBuildRow {
            backends: n,
            m: lb_common::DEFAULT_MAGLEV_SIZE,
            ms: default_ms,
            big_m,
            big_m_ms: big_ms,
            min_slots: min,
            max_slots: max,
        });
    }
    t.note("one thread; the daemon builds off its async runtime and then flips one word");
    report.sections.maglev_build = rows;
    report.table(t);
    maglev_skew(scale, report);
}

/// The worst weights a service can have: one backend at 65535 and the rest
/// at 1 (the old pass-by-pass build took ~n * M turns for these), next to
/// weights spread over 1..=65535 and all equal.
fn maglev_skew(scale: &Scale, report: &mut Report) {
    let mut t = Table::new(
        format!(
            "Maglev build for skewed weights, 5,000 backends, M = 65537 (median of {}; must stay under 50 ms)",
            scale.maglev_reps
        ),
        &["weights", "ms", "steps"],
    );
    let n = 5000usize;
    let m = lb_common::DEFAULT_MAGLEV_SIZE;
    let mut rows = Vec::new();
    for weights in Weights::ALL {
        let e: Vec<maglev::Entry> = entries(n)
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e.weight = weights.of(i);
                e
            })
            .collect();
        let ms = build_ms(&e, m, scale.maglev_reps);
        let steps = maglev::build_counted(&e, m).1;
        t.row(vec![weights.name().to_string(), num(ms), steps.to_string()]);
        report.figure(FigureId::MaglevSkew(weights), ms);
        rows.push(MaglevSkewRow {
            weights,
            backends: n,
            m,
            ms,
            steps,
        });
    }
    t.note("steps: turns plus permutation probes; they do not grow with the ratio of weights");
    report.sections.maglev_skew = rows;
    report.table(t);
}

fn service(ports: &[u16]) -> ServiceSpec {
    ServiceSpec {
        when_all_down: Default::default(),
        name: "bench".into(),
        listen: "0.0.0.0:443".parse().unwrap(),
        protocols: vec![Protocol::Tcp],
        forwarding: Forwarding::Local,
        backends: ports
            .iter()
            .map(|p| BackendSpec::new(format!("127.0.0.1:{p}").parse().unwrap(), 100))
            .collect(),
    }
}

/// Distinct established-TCP flows from a fixed pseudo-random sequence.
fn random_flows(n: usize) -> Vec<(Ipv4Addr, u16)> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let src = Ipv4Addr::from(0x0a00_0000 | (x as u32 & 0x00ff_ffff));
        let port = 1024 + ((x >> 32) as u16 % 64000);
        if seen.insert((src, port)) {
            out.push((src, port));
        }
    }
    out
}

/// The backend port each flow's established packet goes to now.
fn ports_now(w: &MapWriter, frames: &[Vec<u8>]) -> Vec<u16> {
    frames
        .iter()
        .map(|f| {
            let (action, out) = w.dataplane().test_run_xdp(f).unwrap();
            assert_eq!(action, 2, "a local-mode service packet is passed up");
            u16::from_be_bytes([out[36], out[37]])
        })
        .collect()
}

/// The backend port each flow's slot holds in the active table (what a
/// balancer without a flow table would pick).
fn ports_from_table(w: &MapWriter, flows: &[(Ipv4Addr, u16)], ports: &[u16]) -> Vec<u16> {
    let id = w.service_id("bench").unwrap();
    let (_, table) = w.dataplane().active_table(id).unwrap();
    let port_of = |backend: u32| {
        ports
            .iter()
            .find(|p| {
                w.backend_id("bench", format!("127.0.0.1:{p}").parse().unwrap()) == Some(backend)
            })
            .copied()
            .unwrap_or(0)
    };
    flows
        .iter()
        .map(|(src, sport)| {
            let h = w.dataplane().flow_hash().hash(
                &addr_words((*src).into()),
                &addr_words("10.9.0.1".parse().unwrap()),
                sport.to_be(),
                443u16.to_be(),
                6,
            );
            port_of(table[lb_common::maglev_slot(h, table.len() as u32) as usize].backend)
        })
        .collect()
}

fn share_changed(a: &[u16], b: &[u16]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

fn flow_moves(scale: &Scale, report: &mut Report) {
    let mut t = Table::new(
        format!(
            "Flows that change backend when one backend leaves or joins ({} established flows)",
            scale.share_flows
        ),
        &[
            "backends",
            "change",
            "least possible without state",
            "without flow table (Maglev alone)",
            "with flow table (through the program)",
        ],
    );
    let flows = random_flows(scale.share_flows);
    let frames: Vec<Vec<u8>> = flows
        .iter()
        .map(|(src, p)| Spec::tcp(&src.to_string(), "10.9.0.1", *p, 443, TCP_ACK).build())
        .collect();
    let mut rows = Vec::new();
    // One load for every case (the verifier takes a second or more): each
    // starts as a fresh one would, its service new (every slot clean) and
    // the flow table empty.
    let dp = Dataplane::load(Options {
        max_services: 2,
        flow_table_size: (scale.share_flows as u32 * 2).max(65_536),
        ..Options::default()
    })
    .expect("load the data plane");
    let mut w = MapWriter::new(dp);
    for n in [10usize, 100] {
        let ports: Vec<u16> = (0..n as u16).map(|i| 10000 + i).collect();
        for change in [Change::Remove, Change::Add] {
            w.apply(&[]).unwrap();
            w.dataplane_mut().clear_flows();
            w.apply(&[service(&ports)]).unwrap();
            let before = ports_now(&w, &frames);
            let table_before = ports_from_table(&w, &flows, &ports);
            assert_eq!(before, table_before, "the program follows the table");
            // Removing: the flows on the removed backend must move. Adding:
            // a balancer without state must give the new backend its share.
            let (after_ports, ideal) = if change == Change::Remove {
                let on_removed = before.iter().filter(|p| **p == ports[0]).count();
                (ports[1..].to_vec(), on_removed as f64 / before.len() as f64)
            } else {
                let mut p = ports.clone();
                p.push(10000 + n as u16);
                (p, 1.0 / (n + 1) as f64)
            };
            w.apply(&[service(&after_ports)]).unwrap();
            let all_ports: Vec<u16> = (0..=n as u16).map(|i| 10000 + i).collect();
            let stateless = share_changed(&before, &ports_from_table(&w, &flows, &all_ports));
            let stateful = share_changed(&before, &ports_now(&w, &frames));
            t.row(vec![
                n.to_string(),
                if change == Change::Remove {
                    "one removed".to_string()
                } else {
                    "one added".to_string()
                },
                format!("{:.2}%", ideal * 100.0),
                format!("{:.2}%", stateless * 100.0),
                format!("{:.2}%", stateful * 100.0),
            ]);
            let moved = |flow_table| FigureId::FlowsMoved {
                backends: n,
                change,
                flow_table,
            };
            report.figure(moved(false), stateless);
            report.figure(moved(true), stateful);
            rows.push(FlowsMovedRow {
                backends: n,
                change,
                ideal,
                without_flow_table: stateless,
                with_flow_table: stateful,
            });
        }
    }
    t.note(
        "with the flow table: each flow's established packet through BPF_PROG_TEST_RUN before \
         and after the change; only flows on a removed backend may move; without: the flows' \
         slots in the old and new tables; least possible: the flows that were on the removed \
         backend, or the new backend's fair share",
    );
    report.sections.flows_moved = rows;
    report.table(t);
}

fn daemon(scale: &Scale, report: &mut Report) {
    let mut topo = Topology::new();
    let lb_ns = topo.namespace("ctl-lb");
    let cl_ns = topo.namespace("ctl-cl");
    // The daemon attaches to the veth; nothing is sent through it here.
    topo.veth(
        (&lb_ns, "lb0", &["10.212.0.1/24"]),
        (&cl_ns, "cl0", &["10.212.0.2/24"]),
    );
    let dir = TempDir::new("bench-ctl");
    let api = "127.0.0.1:9180";
    let write_config = |name: &str, health: &str, ports: &[u16]| {
        let backends: Vec<String> = ports
            .iter()
            .map(|p| format!("{{ address = \"127.0.0.1:{p}\" }}"))
            .collect();
        let text = format!(
            "[dataplane]\ninterface = \"lb0\"\nxdp_mode = \"native\"\nflow_table_size = 65536\nmax_services = 4\n\n\
             [admin]\nlisten = \"{api}\"\nstate_file = {state:?}\nchange_rate = 100000\n\n\
             [[services]]\nname = \"web\"\nlisten = \"0.0.0.0:443\"\nprotocols = [\"tcp\"]\n{health}\nbackends = [{}]\n",
            backends.join(", "),
            state = dir
                .path(&format!("{name}-state.json"))
                .display()
                .to_string(),
        );
        let path = dir.path(&format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };

    // Backend death to new table, then 50 simultaneous deaths, on one
    // daemon (each start loads and verifies the data plane): 8001 stays,
    // 8002 dies and comes back, 8101.. are the 50 that die at once.
    let health =
        r#"health = { kind = "tcp", interval = "200ms", timeout = "100ms", rise = 2, fall = 2 }"#;
    let keep = EchoName::start(&lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let mut doomed = Some(EchoName::start(
        &lb_ns,
        "0.0.0.0:8002".parse().unwrap(),
        "8002",
    ));
    let fifty = Fifty::listen(&lb_ns);
    let mut ports = vec![8001, 8002];
    ports.extend(fifty.ports());
    let lb = Lb::start(
        &lb_ns,
        &write_config("health", health, &ports),
        api,
        &["--reset-state"],
    );
    let healthy = |lb: &Lb| {
        lb.get("/api/v1/services/web/backends/127.0.0.1:8002").1["healthy"] == Value::Bool(true)
    };
    let wait = |lb: &Lb, want: bool| {
        let t0 = Instant::now();
        while healthy(lb) != want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "backend never turned {want}:\n{}",
                lb.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        t0.elapsed()
    };
    wait(&lb, true);
    let mut deaths = Vec::new();
    for _ in 0..scale.death_trials {
        drop(doomed.take());
        deaths.push(wait(&lb, false).as_secs_f64() * 1e3);
        doomed = Some(EchoName::start(
            &lb_ns,
            "0.0.0.0:8002".parse().unwrap(),
            "8002",
        ));
        wait(&lb, true);
    }

    // 50 simultaneous deaths: table installs, and verdict to install.
    let deaths50 = simultaneous_deaths(&lb, fifty, ports.len());
    drop(lb);
    drop((keep, doomed));

    // Memory, idle and under API changes.
    let ports: Vec<u16> = (8001..8011).collect();
    let mut lb = Lb::start(
        &lb_ns,
        &write_config("api", "", &ports),
        api,
        &["--reset-state"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid = lb.pid();
    let (idle_rss, _) = sys::rss_kib(pid).expect("daemon status");
    let n = scale.api_changes;
    // Through the admin socket, as the CLI goes; the config lifts
    // admin.change_rate so the write path, not the limiter, is measured.
    let socket = lb.socket.clone();
    let t0 = Instant::now();
    let (ok, failed) = {
        let (mut ok, mut failed) = (0u64, 0u64);
        for i in 0..n {
            let addr: SocketAddr = format!("127.0.0.1:{}", 8001 + (i % 10)).parse().unwrap();
            let body = format!("{{\"weight\": {}}}", 50 + (i / 10) % 100);
            let (status, _) = lb_tests::daemon::unix_http(
                &socket,
                "PATCH",
                &format!("/api/v1/services/web/backends/{addr}"),
                Some(&body),
            );
            if status == 200 {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        (ok, failed)
    };
    let secs = t0.elapsed().as_secs_f64();
    let (after_rss, peak_rss) = sys::rss_kib(pid).expect("daemon status");
    assert!(
        failed == 0,
        "{failed} of {n} API changes failed:\n{}",
        lb.log()
    );
    lb.stop();
    drop(topo);

    let mut t = Table::new("Daemon", &["figure", "value"]);
    let death_med = sys::median(&deaths);
    let death_max = deaths.iter().cloned().fold(0.0, f64::max);
    t.row(vec![
        format!(
            "backend death to new table, ms (health: tcp, interval 200ms, timeout 100ms, fall 2; median of {})",
            deaths.len()
        ),
        num(death_med),
    ]);
    t.row(vec!["  the slowest of them, ms".into(), num(death_max)]);
    t.row(vec![
        format!(
            "table installs for {} simultaneous backend deaths (of {} backends)",
            deaths50.dead, deaths50.of
        ),
        num(deaths50.installs),
    ]);
    t.row(vec![
        "  time until all are out (API), ms".into(),
        num(deaths50.all_out_ms),
    ]);
    t.row(vec![
        "  verdict to table install, mean ms (batching waits up to 250 ms)".into(),
        num(deaths50.verdict_to_install_ms),
    ]);
    t.row(vec![
        "daemon RSS idle, MiB".into(),
        format!("{:.1}", idle_rss as f64 / 1024.0),
    ]);
    t.row(vec![
        format!("daemon RSS after {ok} API changes (PATCH weight), MiB"),
        format!("{:.1}", after_rss as f64 / 1024.0),
    ]);
    t.row(vec![
        "  peak RSS (VmHWM), MiB".into(),
        format!("{:.1}", peak_rss as f64 / 1024.0),
    ]);
    t.row(vec![
        "API changes per second (each rebuilds a table and writes the state file)".into(),
        num(ok as f64 / secs),
    ]);
    t.note(
        "death: a backend's listener closes; the time runs until the API reports it unhealthy, \
         which the daemon does in the step that installs the table without it",
    );
    use DaemonMetric as D;
    for (id, value) in [
        (D::DeathToTableMedianMs, death_med),
        (D::DeathToTableMaxMs, death_max),
        (D::Deaths50TableInstalls, deaths50.installs),
        (D::Deaths50AllOutMs, deaths50.all_out_ms),
        (
            D::Deaths50VerdictToInstallMs,
            deaths50.verdict_to_install_ms,
        ),
        (D::RssIdleMib, idle_rss as f64 / 1024.0),
        (D::RssAfterApiChangesMib, after_rss as f64 / 1024.0),
        (D::RssPeakMib, peak_rss as f64 / 1024.0),
        (D::ApiChangesPerS, ok as f64 / secs),
    ] {
        report.figure(FigureId::Daemon(id), value);
    }
    report.sections.daemon = vec![DaemonRow {
        death_to_table_ms: deaths,
        death_median_ms: death_med,
        rss_idle_kib: idle_rss,
        rss_after_kib: after_rss,
        rss_peak_kib: peak_rss,
        api_changes: ok,
        api_seconds: secs,
    }];
    report.table(t);
}

struct Deaths {
    dead: usize,
    of: usize,
    installs: f64,
    all_out_ms: f64,
    verdict_to_install_ms: f64,
}

/// 50 backends that die at once: bare listeners (a tcp check only
/// connects) on ports 8101...
struct Fifty {
    _servers: lb_tests::topology::NsRuntime,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl Fifty {
    const DEAD: u16 = 50;

    fn listen(lb_ns: &str) -> Fifty {
        let servers = lb_tests::topology::NsRuntime::new(lb_ns, 1);
        let listeners = (0..Self::DEAD)
            .map(|i| {
                servers.spawn(async move {
                    let l = tokio::net::TcpListener::bind(("127.0.0.1", 8101 + i))
                        .await
                        .expect("bind");
                    loop {
                        let _ = l.accept().await;
                    }
                })
            })
            .collect();
        Fifty {
            _servers: servers,
            listeners,
        }
    }

    fn ports(&self) -> impl Iterator<Item = u16> {
        (0..Self::DEAD).map(|i| 8101 + i)
    }
}

/// The 50 listeners close at once; `of` backends in all, the others up.
fn simultaneous_deaths(lb: &Lb, fifty: Fifty, of: usize) -> Deaths {
    let dead = usize::from(Fifty::DEAD);
    let scrape =
        |lb: &Lb| lb_tests::topology::Metrics::parse(&lb.raw("GET", "/metrics", None, None).1);
    let value = |m: &lb_tests::topology::Metrics, name: &str, labels: Vec<(String, String)>| {
        m.0.get(&(name.to_string(), labels)).copied().unwrap_or(0.0)
    };
    let web = || vec![("service".to_string(), "web".to_string())];
    let count = |lb: &Lb, healthy: bool| {
        lb.get("/api/v1/services/web/backends")
            .1
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|b| b["healthy"] == Value::Bool(healthy))
                    .count()
            })
            .unwrap_or(0)
    };
    // Every backend has passed its checks (rise 2 at 200 ms).
    let t0 = Instant::now();
    while count(lb, true) < of {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not every backend up after 10 s:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = scrape(lb);
    for l in &fifty.listeners {
        l.abort();
    }
    let t0 = Instant::now();
    while count(lb, false) < dead {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not every backend out after 10 s:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_out_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The last install is done (the API reports a backend out in the step
    // that installs the table); its metrics follow within the batch.
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(lb);
    let delta = |name: &str, labels: Vec<(String, String)>| {
        value(&after, name, labels.clone()) - value(&before, name, labels)
    };
    let installs = delta("lb_table_installs_total", web());
    let count = delta("lb_health_verdict_to_install_seconds_count", vec![]);
    let sum = delta("lb_health_verdict_to_install_seconds_sum", vec![]);
    drop(fifty);
    Deaths {
        dead,
        of,
        installs,
        all_out_ms,
        verdict_to_install_ms: if count > 0.0 { sum / count * 1e3 } else { 0.0 },
    }
}

/// Median milliseconds of `reps` Maglev builds of `entries` into `m` slots.
fn build_ms(entries: &[maglev::Entry], m: u32, reps: usize) -> f64 {
    let v: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            let table = maglev::build(entries, m);
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(table);
            ms
        })
        .collect();
    sys::median(&v)
}
