//! The reconcile loop through the real `lb` binary: health verdicts that
//! arrive together are installed together (50 backends dying at once cost
//! a few table installs, not 50), and a client that hangs up in the middle
//! of a change leaves the state file, the API and the kernel agreeing.
use std::{
    collections::BTreeSet,
    io::Write,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    netns,
    servers::{self, EchoName},
    topology::{API, LogOnPanic, Metrics, ServiceConf, Site, TOKEN, backends},
};
use serde_json::Value;

const DYING: u16 = 50;
const FIRST_PORT: u16 = 21000;
const SURVIVOR: u16 = 21100;

fn metric(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    m.0.get(&(name.to_string(), l)).copied().unwrap_or(0.0)
}

#[test]
fn fifty_backends_dying_at_once_cost_a_few_installs() {
    lb_tests::require_root();
    let site = Site::new("rcl-batch");
    // The dying backends: bare listeners (a tcp check only connects),
    // stopped all at once by aborting their tasks.
    let listeners: Vec<_> = (0..DYING)
        .map(|i| {
            let port = FIRST_PORT + i;
            site.servers.spawn(async move {
                let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap_or_else(|e| panic!("bind {port}: {e}"));
                loop {
                    let _ = l.accept().await;
                }
            })
        })
        .collect();
    // Local forwarding keeps the service address: bound to every address.
    let survivor = EchoName::start(
        &site.lb_ns,
        format!("0.0.0.0:{SURVIVOR}").parse().unwrap(),
        "survivor",
    );
    let mut ports: Vec<(u16, u16)> = (0..DYING).map(|i| (FIRST_PORT + i, 100)).collect();
    ports.push((SURVIVOR, 100));
    let mut svc = ServiceConf::tcp(&ports);
    svc.health = Some(
        r#"{ kind = "tcp", interval = "200ms", timeout = "100ms", rise = 1, fall = 2 }"#.into(),
    );
    let lb = site.start_lb(&svc);
    let _log = LogOnPanic(&lb);
    // Let every backend pass its first checks.
    std::thread::sleep(Duration::from_millis(800));
    let all = backends(&lb);
    assert_eq!(all.len(), usize::from(DYING) + 1);
    assert!(
        all.values().all(|b| b["healthy"] == Value::Bool(true)),
        "{all:?}"
    );
    let before = Metrics::scrape(&lb);

    for l in &listeners {
        l.abort();
    }
    let killed = Instant::now();
    let out_after = loop {
        let b = backends(&lb);
        let down = b
            .values()
            .filter(|b| b["healthy"] == Value::Bool(false))
            .count();
        if down == usize::from(DYING) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "{down} of {DYING} backends out after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever was still coming has come.
    std::thread::sleep(Duration::from_millis(1000));
    let after = Metrics::scrape(&lb);
    let web = [("service", "web")];
    let installs = metric(&after, "lb_table_installs_total", &web)
        - metric(&before, "lb_table_installs_total", &web);
    let rebuilds = metric(&after, "lb_maglev_rebuild_seconds_count", &[])
        - metric(&before, "lb_maglev_rebuild_seconds_count", &[]);
    let batches = metric(&after, "lb_health_batches_total", &[])
        - metric(&before, "lb_health_batches_total", &[]);
    let count = metric(&after, "lb_health_verdict_to_install_seconds_count", &[])
        - metric(&before, "lb_health_verdict_to_install_seconds_count", &[]);
    let sum = metric(&after, "lb_health_verdict_to_install_seconds_sum", &[])
        - metric(&before, "lb_health_verdict_to_install_seconds_sum", &[]);
    println!(
        "{DYING} backends killed: all out of the API after {out_after:?}; {installs} table \
         installs ({rebuilds} Maglev rebuilds) in {batches} batches for {count} verdicts; verdict to install {:.1} ms on average",
        if count > 0.0 { sum / count * 1e3 } else { 0.0 }
    );
    assert_eq!(count, f64::from(DYING), "one verdict per dead backend");
    assert!(
        (1.0..=3.0).contains(&installs),
        "{installs} table installs for {DYING} deaths (want 1 to 3)"
    );
    assert_eq!(
        metric(&after, "lb_reconcile_errors_total", &[]),
        0.0,
        "no failed install"
    );
    // The kernel's table holds the survivor only: every new connection
    // reaches it.
    let vip = site.v4();
    let answers: Vec<Result<String, String>> = netns::within(&site.client_ns, move || {
        (0..20).map(|_| servers::ask(vip)).collect()
    });
    assert!(
        answers.iter().all(|a| a.as_deref() == Ok("survivor")),
        "{answers:?}"
    );
    drop(survivor);
}

/// Sends a POST adding `port` to `web` and hangs up `wait` after it,
/// before the answer.
fn post_and_hang_up(ns: &str, port: u16, wait: Duration) {
    let api: SocketAddr = API.parse().unwrap();
    netns::within(ns, move || {
        let body = format!(r#"{{"address": "127.0.0.1:{port}", "weight": 100}}"#);
        let req = format!(
            "POST /api/v1/services/web/backends HTTP/1.1\r\nHost: {API}\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(2)).expect("connect");
        s.write_all(req.as_bytes()).expect("send");
        std::thread::sleep(wait);
        drop(s);
    });
}

/// The `web` backends the state file holds (the config's when it records
/// no change, or when there is no file yet: nothing changed).
fn saved_backends(path: &std::path::Path, config: &BTreeSet<String>) -> Option<BTreeSet<String>> {
    if !path.exists() {
        return Some(config.clone());
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let services = v
        .get("changed")
        .filter(|c| !c.is_null())
        .or(v.get("base"))?;
    let web = services.as_array()?.iter().find(|s| s["name"] == "web")?;
    Some(
        web["backends"]
            .as_array()?
            .iter()
            .filter_map(|b| b["address"].as_str().map(str::to_string))
            .collect(),
    )
}

fn api_backends(lb: &lb_tests::daemon::Lb) -> BTreeSet<String> {
    backends(lb)
        .values()
        .filter_map(|b| b["address"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_client_hanging_up_mid_change_leaves_state_api_and_kernel_equal() {
    lb_tests::require_root();
    let site = Site::new("rcl-hangup");
    let lb = site.start_lb(&ServiceConf::tcp(&[(22000, 100)]));
    let _log = LogOnPanic(&lb);
    let state = site.dir.path("state.json");
    assert!(!state.exists());
    let config: BTreeSet<String> = ["127.0.0.1:22000".to_string()].into();
    const ROUNDS: u16 = 40;
    let mut settle_max = Duration::ZERO;
    for i in 0..ROUNDS {
        let port = 22001 + i;
        // Hang up at different points: before, during and after the work.
        post_and_hang_up(
            &site.lb_ns,
            port,
            Duration::from_micros(u64::from(i % 8) * 700),
        );
        let start = Instant::now();
        loop {
            let api = api_backends(&lb);
            let saved = saved_backends(&state, &config);
            if saved.as_ref() == Some(&api) {
                settle_max = settle_max.max(start.elapsed());
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "round {i}: the state file and the API disagree for 3 s:\nstate {saved:?}\napi   {api:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let api = api_backends(&lb);
    // Changes whose request reached the daemon happened whole though
    // nobody got their answer; the others not at all.
    let applied = api.len() - 1;
    assert!(applied > 0, "no POST reached the daemon: {api:?}");
    // The kernel: every backend the API lists has an entry in the kernel's
    // backend map (its counters are read from there).
    let m = Metrics::scrape(&lb);
    let kernel: BTreeSet<String> =
        m.0.keys()
            .filter(|(name, _)| name == "lb_packets_total")
            .filter_map(|(_, labels)| {
                labels
                    .iter()
                    .find(|(k, _)| k == "backend")
                    .map(|(_, v)| v.clone())
            })
            .collect();
    assert_eq!(kernel, api);
    // And no change that did not happen reached the kernel: one table
    // install at start, one per change applied.
    let installs = metric(&m, "lb_table_installs_total", &[("service", "web")]);
    assert_eq!(installs, (applied + 1) as f64, "table installs");
    println!(
        "{ROUNDS} POSTs hung up on: {applied} applied whole, the rest not at all; state file \
         equal to the API within {settle_max:?} each time"
    );
}
