//! The Grafana dashboard (`packaging/grafana/lb.json`) and the alert rules
//! (`packaging/prometheus/lb-alerts.yml`) against a real Prometheus (Debian's
//! `prometheus`) scraping a running `lb` with its read token: every
//! dashboard query, with its template variables set to values Prometheus
//! found, returns series; every alert rule loads with `for`, a severity and
//! its annotations, and each side of its comparison returns series. Then
//! the real conditions: a dead backend makes `LbBackendDown` (and nothing
//! else) pending; all backends dead, `LbServiceAllBackendsDown` and
//! `LbServiceFailOpen` instead; the interface deleted, `LbDataplaneDetached`
//! too; the daemon stopped, `LbDown` alone. `promtool check rules` and `promtool test rules` pass and test
//! every alert firing and not firing.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Lb, TempDir},
    netns,
    topology::{API, LB_IF, LogOnPanic, Site, TOKEN, change, wait_health},
};
use serde_json::Value;

/// Prometheus' own listener, inside the balancer's namespace.
const PROM: &str = "127.0.0.1:19090";
const READ_TOKEN: &str = "obs-read-token";
/// Ports of the backends that answer; the third has no server.
const LIVE: [u16; 2] = [8001, 8002];
const DEAD: u16 = 8003;

const ALERTS: [&str; 7] = [
    "LbDown",
    "LbDataplaneDetached",
    "LbServiceAllBackendsDown",
    "LbServiceFailOpen",
    "LbBackendDown",
    "LbFlowTableNearlyFull",
    "LbReconcileStuck",
];

/// What the issue asks the dashboard to show, by the metric each shows.
const DASHBOARD_METRICS: [&str; 16] = [
    "lb_packets_total",
    "lb_bytes_total",
    "lb_new_flows_total",
    "lb_backend_up",
    "lb_health_checks_total",
    "lb_passed_total",
    "lb_dropped_total",
    "lb_xdp_actions_total",
    "lb_flow_table_entries",
    "lb_flow_table_capacity",
    "lb_maglev_rebuild_seconds_bucket",
    "lb_health_verdict_to_install_seconds_bucket",
    "lb_reconcile_stalled_seconds",
    "lb_reconcile_pending",
    "lb_service_fail_open",
    "lb_dataplane_attached",
];

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("packaging")
}

fn require_tool(name: &str) {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{name}` is missing: `cargo xtask setup` installs it (Debian package prometheus)"
    );
}

/// `prometheus` in a namespace with a scratch config and TSDB; killed and
/// its directory removed on drop, also when the test panics.
struct Prometheus {
    ns: String,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Prometheus {
    fn start(ns: &str, config: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let cfg = dir.path("prometheus.yml");
        fs::write(&cfg, config).unwrap();
        let log = dir.path("prometheus.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "prometheus"])
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("data").display()
            ))
            .arg(format!("--web.listen-address={PROM}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            ns: ns.to_string(),
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>?<params>` from inside the namespace: the JSON
    /// answer, or Null when Prometheus cannot be reached.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let url = format!("http://{PROM}/api/v1/{path}");
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        netns::within(&self.ns, move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let mut req = agent.get(&url);
            for (k, v) in &params {
                req = req.query(k, v);
            }
            req.call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null)
        })
    }

    /// An instant query: the series it returns; panics when Prometheus
    /// refuses the expression.
    fn query(&self, expr: &str) -> Vec<Value> {
        let v = self.api("query", &[("query", expr)]);
        assert_eq!(
            v["status"],
            "success",
            "query {expr:?} failed: {v}\n{}",
            self.log()
        );
        match v["data"]["resultType"].as_str() {
            Some("vector" | "matrix") => {
                v["data"]["result"].as_array().cloned().unwrap_or_default()
            }
            other => panic!("query {expr:?} returned {other:?}, not series"),
        }
    }

    /// Queries `expr` until it returns series or `deadline` passes.
    fn series(&self, expr: &str, deadline: Instant) -> Vec<Value> {
        loop {
            let r = self.query(expr);
            if !r.is_empty() || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            lb_tests::daemon::terminate(c);
        }
    }
}

/// The daemon's config: one service on the site's two live backends and a
/// dead one, TCP health checks, an admin and a read token.
fn config(site: &Site) -> PathBuf {
    let private = |name: &str, text: &str| site.dir.secret(name, text).display().to_string();
    let token = private("token", TOKEN);
    let read_token = private("read-token", READ_TOKEN);
    let backends: Vec<String> = LIVE
        .iter()
        .chain(&[DEAD])
        .map(|p| format!("{{ address = \"127.0.0.1:{p}\" }}"))
        .collect();
    let text = format!(
        r#"[dataplane]
interface = "{LB_IF}"
xdp_mode = "native"
flow_table_size = 65536
max_services = 4

[admin]
listen = "{API}"
token_file = {token:?}
read_token_file = {read_token:?}
state_file = {state:?}

[[services]]
name = "web"
listen = "0.0.0.0:443"
protocols = ["tcp"]
forwarding = "local"
health = {{ kind = "tcp", interval = "200ms", timeout = "100ms", rise = 2, fall = 2 }}
backends = [{backends}]
"#,
        state = site.dir.path("state.json").display().to_string(),
        backends = backends.join(", "),
    );
    let path = site.dir.path("lb.toml");
    fs::write(&path, text).unwrap();
    path
}

/// Prometheus' config: the daemon scraped every second with the read
/// token (job `lb`, what the rules expect), the alert rules evaluated every
/// second. (No job without a token: its 401s would soon have the daemon
/// refuse the peer 127.0.0.1 altogether, `auth_failures_per_minute`.)
fn prometheus_config(read_token: &Path) -> String {
    format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules:?}
scrape_configs:
  - job_name: lb
    authorization:
      credentials_file: {read_token:?}
    static_configs:
      - targets: ["{API}"]
"#,
        rules = packaging()
            .join("prometheus/lb-alerts.yml")
            .display()
            .to_string(),
        read_token = read_token.display().to_string(),
    )
}

/// Index of the first top-level (outside brackets and strings) match of
/// `pick` in `expr`: `pick(rest)` gives the length of the operator that
/// starts `rest`, if one does.
fn top_level(expr: &str, pick: impl Fn(&str, &str) -> Option<usize>) -> Option<(usize, usize)> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in expr.char_indices() {
        match quote {
            Some(q) => {
                if c == q && prev != '\\' {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' | '`' => quote = Some(c),
                '(' | '{' | '[' => depth += 1,
                ')' | '}' | ']' => depth -= 1,
                _ if depth == 0 => {
                    if let Some(n) = pick(&expr[..i], &expr[i..]) {
                        return Some((i, n));
                    }
                }
                _ => {}
            },
        }
        prev = c;
    }
    None
}

/// Strips whole-expression parentheses and the vector-matching modifiers
/// (`bool`, `on(...)`, `ignoring(...)`, `group_left(...)`, `group_right(...)`)
/// that start the right-hand side of a binary operator.
fn strip(mut e: &str) -> &str {
    loop {
        e = e.trim();
        let before = e;
        for word in ["bool", "on", "ignoring", "group_left", "group_right"] {
            if let Some(rest) = e.strip_prefix(word)
                && rest.starts_with(|c: char| c.is_whitespace() || c == '(')
            {
                let rest = rest.trim_start();
                e = match rest.strip_prefix('(') {
                    // The label list ends at the first ')'.
                    Some(r) if word != "bool" => &r[r.find(')').map_or(0, |i| i + 1)..],
                    _ => rest,
                };
            }
        }
        // Outer parentheses that enclose everything (not `(a) + (b)`).
        if e.starts_with('(') && e.ends_with(')') && balanced(&e[1..e.len() - 1]) {
            e = &e[1..e.len() - 1];
        }
        if e == before {
            return e;
        }
    }
}

fn balanced(e: &str) -> bool {
    let mut depth = 0i32;
    for c in e.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

/// The parts of an alert expression that must return series on a healthy
/// daemon: both sides of every top-level `or`/`and`/`unless` and of every
/// comparison, thresholds (number literals) left out.
fn operands(expr: &str) -> Vec<String> {
    let e = strip(expr);
    let set_op = top_level(e, |before, rest| {
        ["or", "and", "unless"].iter().find_map(|w| {
            let after = rest.strip_prefix(w)?;
            (before.ends_with(|c: char| c.is_whitespace() || c == ')')
                && after.starts_with(|c: char| c.is_whitespace() || c == '('))
            .then_some(w.len())
        })
    });
    let cmp = || {
        top_level(e, |_, rest| {
            ["==", "!=", ">=", "<=", ">", "<"]
                .iter()
                .find(|op| rest.starts_with(**op))
                .map(|op| op.len())
        })
    };
    match set_op.or_else(cmp) {
        Some((i, n)) => {
            let mut out = operands(&e[..i]);
            out.extend(operands(&e[i + n..]));
            out
        }
        None if e.parse::<f64>().is_ok() => Vec::new(),
        None => vec![e.to_string()],
    }
}

#[test]
fn alert_expressions_split_at_their_comparisons() {
    assert_eq!(operands("lb_backend_up == 0"), ["lb_backend_up"]);
    assert_eq!(
        operands("lb_flow_table_entries / lb_flow_table_capacity > 0.9"),
        ["lb_flow_table_entries / lb_flow_table_capacity"]
    );
    assert_eq!(operands(r#"up{job="lb"} == 0"#), [r#"up{job="lb"}"#]);
    assert_eq!(
        operands(
            "lb_backend_up == 0 unless on(job, instance, service) \
             (max by(job, instance, service) (lb_backend_up) == 0)"
        ),
        [
            "lb_backend_up",
            "max by(job, instance, service) (lb_backend_up)"
        ]
    );
    assert_eq!(
        operands(r#"rate(x{a!="b>c"}[5m]) > bool 1"#),
        [r#"rate(x{a!="b>c"}[5m])"#]
    );
    assert_eq!(operands("(a or b) >= 3"), ["a", "b"]);
    assert!(operands("1 > 0").is_empty());
}

/// Grafana's template variables of the dashboard, in order: (name, query).
fn variables(dash: &Value) -> Vec<(String, String)> {
    dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .or(v["definition"].as_str())
                .expect("variable query");
            (v["name"].as_str().unwrap().to_string(), q.to_string())
        })
        .collect()
}

/// `$name`, `${name}` and Grafana's interval variables replaced.
fn substitute(expr: &str, values: &BTreeMap<String, String>) -> String {
    let mut e = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    for (name, value) in values {
        e = e
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    e
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

fn check_dashboard_shape(dash: &Value) {
    assert!(
        dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    assert!(
        dash["__inputs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS input"
    );
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "no DS_PROMETHEUS datasource variable"
    );
    for name in ["service", "backend"] {
        assert!(
            vars.iter().any(|v| v["name"] == name
                && v["type"] == "query"
                && v["definition"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("label_values("))),
            "no {name} variable from label_values"
        );
    }
    let mut ids = BTreeSet::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "id of {title}"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "gridPos of {title}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}");
        }
    }
    let all: String = panels(dash)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for m in DASHBOARD_METRICS {
        assert!(all.contains(m), "no panel shows {m}");
    }
}

/// Each alert of the unit-test file is tested firing (a non-empty
/// `exp_alerts`) and not firing (`exp_alerts: []`).
fn check_unit_tests_cover_every_alert(text: &str) {
    let mut cases: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.strip_prefix("alertname:") else {
            continue;
        };
        let exp = lines[i + 1..]
            .iter()
            .find_map(|l| l.strip_prefix("exp_alerts:"))
            .expect("exp_alerts after alertname");
        let e = cases.entry(name.trim()).or_default();
        if exp.trim() == "[]" {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
    }
    for a in ALERTS {
        let (firing, quiet) = cases.get(a).copied().unwrap_or_default();
        assert!(
            firing > 0 && quiet > 0,
            "{a}: {firing} firing and {quiet} not-firing cases in lb-alerts.test.yml"
        );
    }
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(packaging().join("prometheus"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    require_tool("promtool");
    promtool(&["check", "rules", "lb-alerts.yml"]);
    promtool(&["test", "rules", "lb-alerts.test.yml"]);
    let tests = fs::read_to_string(packaging().join("prometheus/lb-alerts.test.yml")).unwrap();
    check_unit_tests_cover_every_alert(&tests);
}

/// Waits until the alerts Prometheus has pending or firing are exactly
/// `want`: (alert name, the label that tells them apart, its value).
/// Returns how long that took; panics after 10 s with what it saw.
fn wait_alerts(prom: &Prometheus, want: &[(&str, &str, &str)]) -> Duration {
    let start = Instant::now();
    let want: BTreeSet<(String, String)> = want
        .iter()
        .map(|(name, label, value)| (name.to_string(), format!("{label}={value}")))
        .collect();
    loop {
        let v = prom.api("alerts", &[]);
        let alerts = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
        let got: BTreeSet<(String, String)> = alerts
            .iter()
            .map(|a| {
                let name = a["labels"]["alertname"].as_str().unwrap_or("").to_string();
                let which = ["backend", "service"]
                    .into_iter()
                    .find_map(|l| Some(format!("{l}={}", a["labels"][l].as_str()?)))
                    .unwrap_or_else(|| "=".to_string());
                (name, which)
            })
            .collect();
        if got == want {
            // Within 10 s none of them waited out its `for`.
            for a in &alerts {
                assert_eq!(a["state"], "pending", "{a}");
            }
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "alerts {got:?}, want {want:?}:\n{v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_evaluates_every_dashboard_and_alert_query_against_a_running_lb() {
    lb_tests::require_root();
    require_tool("prometheus");
    let started = Instant::now();
    let dash: Value =
        serde_json::from_str(&fs::read_to_string(packaging().join("grafana/lb.json")).unwrap())
            .expect("lb.json is JSON");
    check_dashboard_shape(&dash);

    let site = Site::new("obs");
    let backends: Vec<_> = LIVE.iter().map(|&p| site.backend(p)).collect();
    let lb = Lb::start(&site.lb_ns, &config(&site), API, &["--reset-state"]);
    let _log = LogOnPanic(&lb);
    wait_health(&lb, DEAD, false, Duration::from_secs(5));

    // Traffic through the balancer, an API change and a refused request,
    // so the counters of each exist.
    let tls = site.tls.clone();
    let to = site.v4();
    let replies = site.client.run(async move {
        let mut out = Vec::new();
        for _ in 0..20 {
            out.push(tls.get(to, "/", None).await);
        }
        out
    });
    let failed: Vec<_> = replies.iter().filter(|r| r.is_err()).collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    change(
        &lb,
        "PATCH",
        "/api/v1/services/web/backends/127.0.0.1:8002",
        Some(r#"{"weight": 150}"#),
        200,
    );
    // Without the read token there are no metrics over TCP.
    assert_eq!(lb.tcp("GET", "/metrics", None, None).0, 401);

    let prom = Prometheus::start(
        &site.lb_ns,
        &prometheus_config(&site.dir.path("read-token")),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let target = loop {
        let v = prom.api("targets", &[]);
        let target = v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["labels"]["job"] == "lb")
            .cloned()
            .unwrap_or(Value::Null);
        if target["health"] == "up" {
            break target;
        }
        assert!(
            Instant::now() < deadline,
            "the scrape targets did not come up: {v}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let up_after = started.elapsed();
    assert_eq!(target["labels"]["instance"], API);

    // Template variables take the first value Prometheus knows for them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for (name, query) in variables(&dash) {
        let query = substitute(&query, &values);
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: {query:?} is not label_values(...)"));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        let found = loop {
            let v = prom.api(
                &format!("label/{}/values", label.trim()),
                &[("match[]", selector.trim())],
            );
            let found: Vec<String> = v["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            if !found.is_empty() || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let value = found
            .first()
            .unwrap_or_else(|| panic!("variable {name}: {query:?} found no values"))
            .clone();
        values.insert(name, value);
    }
    assert_eq!(values["instance"], API);
    assert_eq!(values["service"], "web");
    assert!(values["backend"].starts_with("127.0.0.1:800"), "{values:?}");

    // Every dashboard query returns series (rate() needs two scrapes: the
    // first queries wait for them).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut empty = Vec::new();
    let mut queries = 0;
    for p in panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = substitute(t["expr"].as_str().unwrap(), &values);
            assert!(!expr.contains('$'), "unsubstituted variable in {expr:?}");
            queries += 1;
            if prom.series(&expr, deadline).is_empty() {
                empty.push(format!("{}: {expr}", p["title"]));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without series:\n{}",
        empty.join("\n")
    );

    // The rules Prometheus loaded: every alert, each with `for`, a
    // severity and both annotations.
    let rules = prom.api("rules", &[]);
    let loaded: Vec<Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["type"] == "alerting")
        .collect();
    let names: BTreeSet<&str> = loaded.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ALERTS.into_iter().collect(), "{rules}");
    let mut operand_queries = 0;
    let mut empty = Vec::new();
    for r in &loaded {
        let name = r["name"].as_str().unwrap();
        assert!(
            r["duration"].as_f64().unwrap_or(0.0) > 0.0,
            "{name}: no for"
        );
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "{name}: severity {}",
            r["labels"]
        );
        for a in ["summary", "description"] {
            assert!(
                r["annotations"][a].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: no {a}"
            );
        }
        let expr = r["query"].as_str().unwrap();
        // The whole expression is valid (it fires or not, below)...
        prom.query(expr);
        // ...and, thresholds left out, each side of it has data.
        let parts = operands(expr);
        assert!(!parts.is_empty(), "{name}: nothing to evaluate in {expr:?}");
        for part in parts {
            operand_queries += 1;
            if prom.series(&part, deadline).is_empty() {
                empty.push(format!("{name}: {part}"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "alert expressions without series:\n{}",
        empty.join("\n")
    );

    // The dead backend, and only it, makes an alert pending (LbBackendDown
    // waits 2m before it fires).
    let dead = format!("127.0.0.1:{DEAD}");
    let t = wait_alerts(&prom, &[("LbBackendDown", "backend", &dead)]);
    eprintln!(
        "LbBackendDown pending {:.1}s after the rules were read",
        t.as_secs_f64()
    );

    // Every backend down: the service fails open, and the two service
    // alerts replace the one of the backend.
    for b in &backends {
        b.kill();
    }
    let t = wait_alerts(
        &prom,
        &[
            ("LbServiceAllBackendsDown", "service", "web"),
            ("LbServiceFailOpen", "service", "web"),
        ],
    );
    eprintln!(
        "service alerts pending {:.1}s after the backends died",
        t.as_secs_f64()
    );
    assert_eq!(lb.get("/api/v1/services/web").1["fail_open"], true);

    // The interface goes away: the data plane is detached.
    netns::run_in(&site.lb_ns, &["ip", "link", "del", LB_IF]);
    let t = wait_alerts(
        &prom,
        &[
            ("LbServiceAllBackendsDown", "service", "web"),
            ("LbServiceFailOpen", "service", "web"),
            ("LbDataplaneDetached", "", ""),
        ],
    );
    eprintln!(
        "LbDataplaneDetached pending {:.1}s after the interface went",
        t.as_secs_f64()
    );

    // The daemon stops: its series go stale, and only LbDown is left.
    lb.signal(libc::SIGTERM);
    let t = wait_alerts(&prom, &[("LbDown", "", "")]);
    eprintln!("LbDown pending {:.1}s after SIGTERM", t.as_secs_f64());

    eprintln!(
        "{queries} dashboard queries and {operand_queries} alert operands of {} rules returned \
         series; targets up after {:.1}s, all done in {:.1}s",
        loaded.len(),
        up_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
