//! The `lb` daemon as an operator runs it: a config file, the data plane
//! attached to a veth in a namespace, the admin API over HTTP, health
//! checks against real servers, and a restart that keeps API changes.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Lb, TempDir, lb_binary},
    netns::{self, Topology},
    servers::EchoName,
};
use serde_json::Value;

const API: &str = "127.0.0.1:9180";
const TOKEN: &str = "s3cret-token";

struct Setup {
    _topo: Topology,
    lb_ns: String,
    client_ns: String,
    dir: TempDir,
}

fn setup(tag: &str) -> Setup {
    let mut topo = Topology::new();
    let (lb_ns, client_ns) = topo.lb_and_client(201);
    Setup {
        _topo: topo,
        lb_ns,
        client_ns,
        dir: TempDir::new(tag),
    }
}

impl Setup {
    fn config(&self, token: bool, health: &str, backends: &[u16]) -> PathBuf {
        let token_line = if token {
            let p = self.dir.secret("token", &format!("{TOKEN}\n"));
            format!("token_file = {:?}\n", p.display().to_string())
        } else {
            String::new()
        };
        let backends: Vec<String> = backends
            .iter()
            .map(|p| format!("{{ address = \"127.0.0.1:{p}\" }}"))
            .collect();
        let text = format!(
            r#"
[dataplane]
interface = "lb0"
xdp_mode = "native"
flow_table_size = 65536
max_services = 4

[admin]
listen = "{API}"
{token_line}state_file = {state:?}

[[services]]
name = "web"
listen = "0.0.0.0:443"
protocols = ["tcp"]
{health}
backends = [{backends}]
"#,
            state = self.dir.path("state.json").display().to_string(),
            backends = backends.join(", "),
        );
        let path = self.dir.path("lb.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path) -> Lb {
        Lb::start(&self.lb_ns, config, API, &[])
    }

    /// `n` connections from the client to port 443; the backend that
    /// answered each.
    fn connect(&self, n: usize) -> Vec<Result<String, String>> {
        netns::within(&self.client_ns, move || {
            (0..n)
                .map(|_| {
                    let to: SocketAddr = "10.201.0.1:443".parse().unwrap();
                    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                        .map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    s.write_all(b"hi\n").map_err(|e| e.to_string())?;
                    let mut line = String::new();
                    BufReader::new(s)
                        .read_line(&mut line)
                        .map_err(|e| e.to_string())?;
                    Ok(line.trim().to_string())
                })
                .collect()
        })
    }
}

/// (method, path, body, token, expected status)
type BadRequest<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, u16);

fn services(lb: &Lb) -> Value {
    let (status, v) = lb.get("/api/v1/services");
    assert_eq!(status, 200);
    v
}

#[test]
fn validate_names_file_line_and_field_and_exits_2() {
    let dir = TempDir::new("validate");
    let good = dir.path("good.toml");
    std::fs::write(
        &good,
        "[dataplane]\ninterface = \"eth0\"\n[[services]]\nname = \"web\"\nbackends = [{ address = \"127.0.0.1:8001\" }]\n",
    )
    .unwrap();
    let out = Command::new(lb_binary())
        .args(["validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        "[dataplane]\ninterface = \"eth0\"\n[[services]]\nname = \"web\"\nbackends = [{ address = \"127.0.0.1:8001\", weight = 99999 }]\n",
    )
    .unwrap();
    let out = Command::new(lb_binary())
        .args(["validate", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:5:", bad.display()))
            && err.contains("services[0].backends[0].weight"),
        "{err}"
    );
    // `lb run` refuses the same file before touching anything.
    let out = Command::new(lb_binary())
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_api_route_with_good_and_bad_input_and_a_token() {
    lb_tests::require_root();
    let s = setup("api");
    let _servers = [
        EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001"),
        EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002"),
    ];
    let lb = s.start(&s.config(true, "", &[8001, 8002]));
    let t = Some(TOKEN);

    // Reads need no token.
    for path in [
        "/healthz",
        "/api/v1/healthz",
        "/api/v1/services",
        "/api/v1/services/web",
        "/api/v1/services/web/backends",
        "/api/v1/services/web/backends/127.0.0.1:8001",
        "/api/v1/openapi.json",
    ] {
        assert_eq!(lb.get(path).0, 200, "{path}");
    }
    let (status, text) = lb.raw("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    assert!(text.contains("lb_backend_up"));
    assert_eq!(lb.get("/api/v1/openapi.json").1["openapi"], "3.1.0");
    assert_eq!(lb.get("/api/v1/services/nope").0, 404);
    assert_eq!(
        lb.get("/api/v1/services/web/backends/127.0.0.1:9999").0,
        404
    );
    assert_eq!(
        lb.get("/api/v1/services/web/backends/not-an-address").0,
        400
    );
    let (status, body) = lb.get("/no/such/route");
    assert_eq!((status, body["error"].is_string()), (404, true));

    let before = services(&lb);
    let svc = r#"{"listen": "0.0.0.0:8443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:9001", "weight": 10}]}"#;
    // Every bad request: its status, a JSON error, and nothing changed.
    let big = format!("{{\"listen\": \"{}\"}}", "x".repeat(70 * 1024));
    let bad: Vec<BadRequest> = vec![
        ("PUT", "/api/v1/services/api", Some(svc), None, 401),
        ("PUT", "/api/v1/services/api", Some(svc), Some("wrong"), 401),
        ("DELETE", "/api/v1/services/web", None, None, 401),
        (
            "POST",
            "/api/v1/services/web/backends",
            Some(r#"{"address": "127.0.0.1:8003"}"#),
            None,
            401,
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Some(r#"{"weight": 1}"#),
            Some("Bearer"),
            401,
        ),
        ("PUT", "/api/v1/services/api", Some("{not json"), t, 400),
        (
            "PUT",
            "/api/v1/services/api",
            Some(r#"{"listen": "0.0.0.0:8443", "colour": "blue"}"#),
            t,
            400,
        ),
        (
            "PUT",
            "/api/v1/services/api",
            Some(r#"{"name": "other", "listen": "0.0.0.0:8443"}"#),
            t,
            400,
        ),
        (
            "PUT",
            "/api/v1/services/api",
            Some(r#"{"listen": "0.0.0.0:8443", "backends": [{"address": "nowhere"}]}"#),
            t,
            400,
        ),
        ("PUT", "/api/v1/services/bad%20name", Some(svc), t, 400),
        (
            "PUT",
            "/api/v1/services/api",
            Some(r#"{"listen": "0.0.0.0:443", "protocols": ["tcp"]}"#),
            t,
            409,
        ),
        ("PUT", "/api/v1/services/api", Some(&big), t, 413),
        (
            "POST",
            "/api/v1/services/web/backends",
            Some(r#"{"address": "127.0.0.1:8001"}"#),
            t,
            409,
        ),
        (
            "POST",
            "/api/v1/services/web/backends",
            Some(r#"{"address": "127.0.0.1"}"#),
            t,
            400,
        ),
        (
            "POST",
            "/api/v1/services/web/backends",
            Some(r#"{"address": "127.0.0.1:8003", "weight": 65536}"#),
            t,
            400,
        ),
        (
            "POST",
            "/api/v1/services/nope/backends",
            Some(r#"{"address": "127.0.0.1:8003"}"#),
            t,
            404,
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Some(r#"{"weight": 70000}"#),
            t,
            400,
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Some(r#"{"state": "asleep"}"#),
            t,
            400,
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Some("{}"),
            t,
            400,
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:9999",
            Some(r#"{"weight": 1}"#),
            t,
            404,
        ),
        (
            "DELETE",
            "/api/v1/services/web/backends/127.0.0.1:9999",
            None,
            t,
            404,
        ),
        ("DELETE", "/api/v1/services/nope", None, t, 404),
    ];
    for (method, path, body, token, want) in &bad {
        // Over TCP, where tokens count (the socket needs none).
        let (status, text) = lb.tcp(method, path, *body, *token);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert_eq!(status, *want, "{method} {path} {body:?}: {v}");
        assert!(v["error"].is_string(), "{method} {path}: error body {v}");
        assert_eq!(services(&lb), before, "{method} {path} changed something");
    }

    // And the good ones.
    let (status, v) = lb.call("PUT", "/api/v1/services/api", Some(svc), t);
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["backends"][0]["weight"], 10);
    assert_eq!(lb.call("PUT", "/api/v1/services/api", Some(svc), t).0, 200);
    let (status, v) = lb.call(
        "POST",
        "/api/v1/services/web/backends",
        Some(r#"{"address": "127.0.0.1:8003", "weight": 5}"#),
        t,
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["address"], "127.0.0.1:8003");
    let (status, v) = lb.call(
        "PATCH",
        "/api/v1/services/web/backends/127.0.0.1:8003",
        Some(r#"{"weight": 7, "state": "draining"}"#),
        t,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["weight"].as_u64(), v["state"].as_str()),
        (Some(7), Some("draining"))
    );
    assert_eq!(
        lb.call(
            "DELETE",
            "/api/v1/services/web/backends/127.0.0.1:8003",
            None,
            t
        )
        .0,
        204
    );
    assert_eq!(lb.call("DELETE", "/api/v1/services/api", None, t).0, 204);
    assert_eq!(services(&lb), before);
    // Traffic still flows after all that.
    assert!(s.connect(10).iter().all(|r| r.is_ok()));
}

#[test]
fn without_a_token_tcp_is_read_only_and_the_socket_changes() {
    lb_tests::require_root();
    let s = setup("notoken");
    let lb = s.start(&s.config(false, "", &[8001]));
    let patch = Some(r#"{"weight": 3}"#);
    let path = "/api/v1/services/web/backends/127.0.0.1:8001";
    // Over TCP: reads are open, changes refused with a pointer to the socket.
    assert_eq!(lb.tcp("GET", path, None, None).0, 200);
    let (status, text) = lb.tcp("PATCH", path, patch, None);
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("read-only") && text.contains(&lb.socket.display().to_string()),
        "{text}"
    );
    assert_eq!(lb.get(path).1["weight"], 100, "nothing changed");
    // Through the socket, the change needs no header.
    let (status, v) = lb.call("PATCH", path, patch, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["weight"], 3);
}

#[test]
fn api_changes_survive_a_restart() {
    lb_tests::require_root();
    let s = setup("restart");
    let config = s.config(true, "", &[8001, 8002]);
    let mut lb = s.start(&config);
    let t = Some(TOKEN);
    assert_eq!(
        lb.call(
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Some(r#"{"weight": 42}"#),
            t
        )
        .0,
        200
    );
    assert_eq!(
        lb.call(
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8002",
            Some(r#"{"state": "disabled"}"#),
            t
        )
        .0,
        200
    );
    assert_eq!(
        lb.call(
            "POST",
            "/api/v1/services/web/backends",
            Some(r#"{"address": "127.0.0.1:8003", "weight": 9}"#),
            t
        )
        .0,
        201
    );
    let (status, _) = lb.call(
        "PUT",
        "/api/v1/services/dns",
        Some(r#"{"listen": "0.0.0.0:53", "protocols": ["udp"], "health": {"kind": "udp", "payload": "ping", "interval": "5s"}, "backends": [{"address": "127.0.0.1:5353"}]}"#),
        t,
    );
    assert_eq!(status, 201);
    let before = services(&lb);
    assert!(lb.stop().success(), "SIGTERM exit:\n{}", lb.log());
    let lb = s.start(&config);
    assert_eq!(services(&lb), before, "restart lost changes:\n{}", lb.log());
    assert!(
        lb.log()
            .contains("re-applying the changes made through the API on this config"),
        "{}",
        lb.log()
    );
}

fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(labels)
                || l.starts_with(&format!("{name} ")) && labels.is_empty()
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_match_the_traffic_sent() {
    lb_tests::require_root();
    let s = setup("metrics");
    let servers = [
        EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001"),
        EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002"),
    ];
    let lb = s.start(&s.config(false, "", &[8001, 8002]));
    let results = s.connect(50);
    let mut per: HashMap<String, u64> = HashMap::new();
    for r in &results {
        *per.entry(r.clone().expect("connection")).or_default() += 1;
    }
    let (status, text) = lb.raw("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    for (port, server) in [("8001", &servers[0]), ("8002", &servers[1])] {
        let labels = format!("backend=\"127.0.0.1:{port}\",service=\"web\"");
        let flows = metric(&text, "lb_new_flows_total", &labels)
            .unwrap_or_else(|| panic!("no flows metric for {port}:\n{text}"));
        assert_eq!(
            flows as u64,
            per.get(port).copied().unwrap_or(0),
            "new flows to {port}"
        );
        assert_eq!(
            flows as u64,
            server.served(),
            "flows to {port} vs requests it served"
        );
        let packets = metric(&text, "lb_packets_total", &labels).unwrap();
        // SYN, ACK, data, FIN/ACK... at least three packets per connection.
        assert!(
            packets >= 3.0 * flows,
            "{port}: {packets} packets for {flows} flows"
        );
        assert!(metric(&text, "lb_bytes_total", &labels).unwrap() >= packets * 54.0);
        assert_eq!(metric(&text, "lb_backend_up", &labels), Some(1.0));
        assert_eq!(metric(&text, "lb_backend_weight", &labels), Some(100.0));
    }
    assert!(metric(&text, "lb_xdp_actions_total", "action=\"pass\"").unwrap() >= 150.0);
    assert!(
        metric(&text, "lb_maglev_rebuild_seconds_count", "").unwrap() >= 1.0,
        "{text}"
    );
    // The exposition is valid for Prometheus' own checker.
    if let Ok(out) = promtool(&text) {
        assert!(
            out.status.success(),
            "promtool check metrics: {}",
            String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)
        );
    } else {
        panic!("promtool is missing: `cargo xtask setup` installs it (Debian package prometheus)");
    }
}

fn promtool(text: &str) -> std::io::Result<std::process::Output> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(text.as_bytes())?;
    child.wait_with_output()
}

#[test]
fn a_dead_backend_leaves_the_table_and_comes_back() {
    lb_tests::require_root();
    let s = setup("health");
    let health =
        r#"health = { kind = "tcp", interval = "200ms", timeout = "100ms", rise = 2, fall = 2 }"#;
    let keep = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let doomed = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let lb = s.start(&s.config(false, health, &[8001, 8002]));
    let both: Vec<String> = s.connect(30).into_iter().map(|r| r.unwrap()).collect();
    assert!(both.contains(&"8002".to_string()) && both.contains(&"8001".to_string()));

    let healthy = |lb: &Lb, port: u16| -> bool {
        lb.get(&format!("/api/v1/services/web/backends/127.0.0.1:{port}"))
            .1["healthy"]
            == Value::Bool(true)
    };
    drop(doomed);
    let died = Instant::now();
    while healthy(&lb, 8002) {
        assert!(
            died.elapsed() < Duration::from_secs(5),
            "8002 never marked down:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let detected = died.elapsed();
    // fall x interval plus one check's timeout, and the table is in.
    assert!(
        detected <= Duration::from_millis(2 * 200 + 100 + 1000),
        "took {detected:?}"
    );
    println!(
        "backend death to table installed: {} ms",
        detected.as_millis()
    );
    let after: Vec<Result<String, String>> = s.connect(30);
    assert!(
        after.iter().all(|r| r.as_deref() == Ok("8001")),
        "{after:?}"
    );
    let (_, text) = lb.raw("GET", "/metrics", None, None);
    assert_eq!(
        metric(&text, "lb_backend_up", "backend=\"127.0.0.1:8002\""),
        Some(0.0)
    );
    assert!(
        metric(
            &text,
            "lb_health_checks_total",
            "backend=\"127.0.0.1:8002\",result=\"failure\""
        )
        .unwrap_or(0.0)
            >= 2.0
    );

    let _back = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let revived = Instant::now();
    while !healthy(&lb, 8002) {
        assert!(
            revived.elapsed() < Duration::from_secs(5),
            "8002 never came back:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let again: Vec<String> = s.connect(30).into_iter().map(|r| r.unwrap()).collect();
    assert!(
        again.contains(&"8002".to_string()),
        "8002 takes flows again"
    );
    drop(keep);
}

#[test]
fn the_cli_changes_backends_through_the_api() {
    lb_tests::require_root();
    let s = setup("cli");
    let lb = s.start(&s.config(true, "", &[8001]));
    let token_file = s.dir.path("token");
    let cli = |args: &[&str], token: Option<&str>| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &s.lb_ns])
            .arg(lb_binary())
            .args(args);
        c.env_remove("LB_TOKEN");
        if let Some(t) = token {
            c.env("LB_TOKEN", t);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let tf = token_file.display().to_string();
    let (ok, out) = cli(
        &[
            "backends",
            "add",
            "--service",
            "web",
            "127.0.0.1:8003",
            "--weight",
            "50",
        ],
        Some(TOKEN),
    );
    assert!(ok, "{out}");
    let (ok, out) = cli(
        &[
            "backends",
            "weight",
            "--service",
            "web",
            "127.0.0.1:8003",
            "200",
            "--token-file",
            &tf,
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, out) = cli(
        &["backends", "drain", "--service", "web", "127.0.0.1:8003"],
        Some(TOKEN),
    );
    assert!(ok, "{out}");
    let b = lb.get("/api/v1/services/web/backends/127.0.0.1:8003").1;
    assert_eq!(
        (b["weight"].as_u64(), b["state"].as_str()),
        (Some(200), Some("draining"))
    );
    // Reads over TCP need the token too.
    let (ok, out) = cli(&["status"], Some(TOKEN));
    assert!(
        ok && out.contains("127.0.0.1:8003") && out.contains("draining"),
        "{out}"
    );
    let (ok, out) = cli(&["status"], None);
    assert!(!ok && out.contains("401"), "{out}");
    // Through the admin socket no token is needed.
    let socket = lb.socket.display().to_string();
    let (ok, out) = cli(&["status", "--socket", &socket], None);
    assert!(
        ok && out.contains("127.0.0.1:8003") && out.contains("draining"),
        "{out}"
    );
    // Without the token the API refuses, and the CLI says why.
    let (ok, out) = cli(
        &["backends", "remove", "--service", "web", "127.0.0.1:8003"],
        None,
    );
    assert!(!ok && out.contains("401"), "{out}");
    let (ok, out) = cli(
        &["backends", "activate", "--service", "web", "127.0.0.1:8003"],
        Some(TOKEN),
    );
    assert!(ok, "{out}");
    let (ok, out) = cli(
        &["backends", "remove", "--service", "web", "127.0.0.1:8003"],
        Some(TOKEN),
    );
    assert!(ok, "{out}");
    assert_eq!(
        lb.get("/api/v1/services/web/backends/127.0.0.1:8003").0,
        404
    );
    let (ok, out) = cli(
        &["backends", "remove", "--service", "web", "127.0.0.1:8003"],
        Some(TOKEN),
    );
    assert!(!ok && out.contains("404"), "{out}");
}

#[test]
fn two_services_on_different_addresses_cannot_share_a_nat_backend() {
    lb_tests::require_root();
    let s = setup("revaddr");
    // `lb validate` names the file, the line and both services.
    let conflict = s.dir.path("conflict.toml");
    std::fs::write(
        &conflict,
        "[dataplane]\ninterface = \"eth0\"\n\
         [[services]]\nname = \"a\"\nlisten = \"10.201.0.10:443\"\nforwarding = \"nat\"\nbackends = [{ address = \"10.201.0.50:8443\" }]\n\
         [[services]]\nname = \"b\"\nlisten = \"10.201.0.11:443\"\nforwarding = \"nat\"\nbackends = [{ address = \"10.201.0.50:8443\" }]\n",
    )
    .unwrap();
    let out = Command::new(lb_binary())
        .args(["validate", "--config"])
        .arg(&conflict)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{}:12:", conflict.display()))
            && err.contains("services[1].backends[0].address")
            && err.contains("\"a\"")
            && err.contains("\"b\"")
            && err.contains("10.201.0.50:8443"),
        "{err}"
    );

    // The API refuses the same through both of its paths, and changes nothing.
    let lb = s.start(&s.config(true, "", &[8001]));
    let t = Some(TOKEN);
    let a = r#"{"listen": "10.201.0.10:443", "protocols": ["tcp"], "forwarding": "nat", "backends": [{"address": "10.201.0.50:8443"}]}"#;
    let (status, v) = lb.call("PUT", "/api/v1/services/a", Some(a), t);
    assert!(status == 200 || status == 201, "{status} {v}");
    let b = r#"{"listen": "10.201.0.11:443", "protocols": ["tcp"], "forwarding": "nat", "backends": [{"address": "10.201.0.50:8443"}]}"#;
    let before = services(&lb);
    let (status, v) = lb.call("PUT", "/api/v1/services/b", Some(b), t);
    assert_eq!(status, 409, "{v}");
    let msg = v["error"].as_str().unwrap_or_default().to_string();
    for part in ["\"a\"", "\"b\"", "10.201.0.50:8443"] {
        assert!(msg.contains(part), "{part} not in {msg:?}");
    }
    assert_eq!(services(&lb), before);
    // A service of its own is fine; adding the shared backend to it is not.
    let b_own = b.replace("10.201.0.50:8443", "10.201.0.51:8443");
    let (status, v) = lb.call("PUT", "/api/v1/services/b", Some(&b_own), t);
    assert!(status == 200 || status == 201, "{status} {v}");
    let before = services(&lb);
    let (status, v) = lb.call(
        "POST",
        "/api/v1/services/b/backends",
        Some(r#"{"address": "10.201.0.50:8443"}"#),
        t,
    );
    assert_eq!(status, 409, "{v}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("\"a\"") && msg.contains("\"b\"") && msg.contains("10.201.0.50:8443"),
        "{msg}"
    );
    assert_eq!(services(&lb), before);
}

#[test]
fn validate_warns_about_a_local_backend_port_in_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let mut it = range.split_whitespace().map(|w| w.parse::<u16>().unwrap());
    let (lo, hi) = (it.next().unwrap(), it.next().unwrap());
    let inside = lo + (hi - lo) / 2;
    let outside = if lo > 1025 { lo - 1 } else { hi + 1 };
    let dir = TempDir::new("ephemeral");
    let file = dir.path("lb.toml");
    std::fs::write(
        &file,
        format!(
            "[dataplane]\ninterface = \"eth0\"\n[[services]]\nname = \"web\"\nbackends = [\n  \
             {{ address = \"127.0.0.1:{outside}\" }},\n  {{ address = \"127.0.0.1:{inside}\" }},\n]\n"
        ),
    )
    .unwrap();
    let out = Command::new(lb_binary())
        .args(["validate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning is not an error: {err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    let w = warnings[0];
    for part in [
        format!("{}:7:", file.display()),
        "services[0].backends[1].address".to_string(),
        format!("port {inside}"),
        format!("ip_local_port_range {lo}-{hi}"),
    ] {
        assert!(w.contains(&part), "{part:?} not in {w:?}");
    }
    println!("lb validate: {w}");
}

/// Waits (at most 5 s) until the API says backend `port` of `web` is
/// (un)healthy.
fn wait_healthy(lb: &Lb, port: u16, healthy: bool) {
    let start = Instant::now();
    while lb
        .get(&format!("/api/v1/services/web/backends/127.0.0.1:{port}"))
        .1["healthy"]
        != Value::Bool(healthy)
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{port} never healthy={healthy}:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fail_open_metric(lb: &Lb) -> Option<f64> {
    let (_, text) = lb.raw("GET", "/metrics", None, None);
    metric(&text, "lb_service_fail_open", "service=\"web\"")
}

#[test]
fn when_every_backend_fails_the_last_ones_keep_taking_connections() {
    lb_tests::require_root();
    let s = setup("failopen");
    // Down after one failed check, up only after 50 good ones (5 s): the
    // servers can come back while the checker still says down.
    let health =
        r#"health = { kind = "tcp", interval = "100ms", timeout = "100ms", rise = 50, fall = 1 }"#;
    let first = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let last = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let lb = s.start(&s.config(false, health, &[8001, 8002]));
    assert_eq!(services(&lb)[0]["when_all_down"], "keep_last");
    assert_eq!(services(&lb)[0]["fail_open"], false);
    assert_eq!(fail_open_metric(&lb), Some(0.0));

    drop(first);
    wait_healthy(&lb, 8001, false);
    assert_eq!(services(&lb)[0]["fail_open"], false, "8002 is still up");
    drop(last);
    wait_healthy(&lb, 8002, false);
    // Every backend is down: the service fails open on 8002, the last one up.
    assert_eq!(services(&lb)[0]["fail_open"], true, "{}", lb.log());
    assert_eq!(fail_open_metric(&lb), Some(1.0));
    let status = lb.cli(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.contains("FAIL-OPEN"), "{status}");

    // Both servers come back; the checker has not seen 50 good checks yet.
    let _first = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let _last = EchoName::start(&s.lb_ns, "0.0.0.0:8002".parse().unwrap(), "8002");
    let answers: Vec<Result<String, String>> = s.connect(20);
    assert!(
        answers.iter().all(|r| r.as_deref() == Ok("8002")),
        "every connection reaches 8002, the last backend up: {answers:?}"
    );
    assert_eq!(
        services(&lb)[0]["fail_open"],
        true,
        "still no healthy backend"
    );
    println!("fail-open: 20 of 20 connections reached 8002 while every backend was marked down");

    // A healthy backend ends it: the table is built from the healthy ones.
    let start = Instant::now();
    while services(&lb)[0]["fail_open"] != false {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", lb.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "fail-open ended {:?} after the servers came back",
        start.elapsed()
    );
    assert_eq!(fail_open_metric(&lb), Some(0.0));
}

#[test]
fn with_refuse_a_service_whose_backends_all_failed_refuses_connections() {
    lb_tests::require_root();
    let s = setup("refuse");
    let health = "health = { kind = \"tcp\", interval = \"100ms\", timeout = \"100ms\", rise = 50, fall = 1 }\n\
                  when_all_down = \"refuse\"";
    let only = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let lb = s.start(&s.config(false, health, &[8001]));
    assert_eq!(services(&lb)[0]["when_all_down"], "refuse");
    drop(only);
    wait_healthy(&lb, 8001, false);
    let _back = EchoName::start(&s.lb_ns, "0.0.0.0:8001".parse().unwrap(), "8001");
    let answers = s.connect(10);
    assert!(
        answers.iter().all(|r| r.is_err()),
        "no connection reaches a backend marked down: {answers:?}"
    );
    assert_eq!(services(&lb)[0]["fail_open"], false);
    assert_eq!(fail_open_metric(&lb), Some(0.0));
}

/// Polls `cond` every 10 ms for at most `within`; how long it took.
fn within(within: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn interfaces_added_after_attach_become_redirect_targets() {
    lb_tests::require_root();
    let s = setup("links");
    let lb = s.start(&s.config(false, "", &[8001]));
    let attached = |lb: &Lb| {
        let (_, text) = lb.raw("GET", "/metrics", None, None);
        metric(&text, "lb_dataplane_attached", "")
    };
    assert_eq!(attached(&lb), Some(1.0));

    // A veth pair appears in the balancer's namespace after attach.
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["-n", &s.lb_ns])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    ip(&[
        "link", "add", "late0", "type", "veth", "peer", "name", "late1",
    ]);
    let took = within(Duration::from_secs(1), || {
        let log = lb.log();
        ["late0", "late1"].iter().all(|n| {
            log.lines()
                .any(|l| l.contains("it is a redirect target") && l.contains(n))
        })
    });
    let took = took.unwrap_or_else(|| panic!("late0/late1 not synced within 1 s:\n{}", lb.log()));
    println!("links: a new veth pair became a redirect target {took:?} after it appeared");

    ip(&["link", "del", "late0"]);
    within(Duration::from_secs(1), || {
        lb.log()
            .lines()
            .any(|l| l.contains("interface removed") && l.contains("late0"))
    })
    .unwrap_or_else(|| panic!("late0's removal not logged:\n{}", lb.log()));
    assert_eq!(attached(&lb), Some(1.0));

    // The attached interface goes: an error, and the metric and /healthz
    // say so.
    ip(&["link", "del", "lb0"]);
    within(Duration::from_secs(1), || attached(&lb) == Some(0.0))
        .unwrap_or_else(|| panic!("lb_dataplane_attached still 1:\n{}", lb.log()));
    assert!(
        lb.log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("attached to is gone") && l.contains("lb0")),
        "{}",
        lb.log()
    );
    let (status, body) = lb.raw("GET", "/healthz", None, None);
    assert_eq!(status, 503, "/healthz with the interface gone: {body}");

    // It comes back (a new interface of the same name): attached again.
    ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lbx"]);
    ip(&["link", "set", "lb0", "up"]);
    ip(&["link", "set", "lbx", "up"]);
    let took = within(Duration::from_secs(2), || attached(&lb) == Some(1.0))
        .unwrap_or_else(|| panic!("not attached again:\n{}", lb.log()));
    let link = Command::new("ip")
        .args(["-n", &s.lb_ns, "link", "show", "lb0"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("xdp"),
        "no XDP program on the new lb0: {link}"
    );
    let (status, body) = lb.raw("GET", "/healthz", None, None);
    assert_eq!(status, 200, "/healthz once attached again: {body}");
    println!("links: lb0 came back and was attached again after {took:?}");
}

#[test]
fn dsr_health_checks_do_not_leave_from_the_service_address() {
    lb_tests::require_root();
    let mut topo = Topology::new();
    let lb_ns = topo.namespace("lb");
    let be = topo.namespace("be");
    topo.veth(
        (&lb_ns, "lb0", &["fd00:205::1/64"]),
        (&be, "eth0", &["fd00:205::11/64"]),
    );
    // dsr: the balancer holds the service address (added last, so the
    // kernel prefers it as a source), the backend holds it on `lo`.
    netns::run_in(
        &lb_ns,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:205::100/64",
            "dev",
            "lb0",
            "nodad",
        ],
    );
    netns::run_in(
        &be,
        &["ip", "-6", "addr", "add", "fd00:205::100/128", "dev", "lo"],
    );
    // Neighbours known up front: a fresh veth loses the first solicitation,
    // and the retry (1 s) is slower than the checks below.
    let mac = |ns: &str, dev: &str| {
        netns::run_in(ns, &["cat", &format!("/sys/class/net/{dev}/address")])
            .trim()
            .to_string()
    };
    netns::neighbour(
        &lb_ns,
        "fd00:205::11",
        &mac(&be, "eth0"),
        "lb0",
        "reachable",
    );
    netns::neighbour(&be, "fd00:205::1", &mac(&lb_ns, "lb0"), "eth0", "reachable");
    let backend: SocketAddr = "[fd00:205::11]:443".parse().unwrap();
    let preferred = netns::within(&lb_ns, move || {
        lb_userspace::source::kernel_source(backend).unwrap()
    });
    assert_eq!(
        preferred.to_string(),
        "fd00:205::100",
        "the test needs the service address as the preferred source"
    );
    let _server = EchoName::start(&be, "[::]:443".parse().unwrap(), "b1");

    let dir = TempDir::new("dsr-health");
    let config = dir.path("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ninterface = \"lb0\"\nxdp_mode = \"native\"\nflow_table_size = 65536\nmax_services = 4\n\
             [admin]\nlisten = \"{API}\"\nstate_file = {:?}\n\
             [[services]]\nname = \"web\"\nlisten = \"[fd00:205::100]:443\"\nprotocols = [\"tcp\"]\nforwarding = \"dsr\"\n\
             health = {{ kind = \"tcp\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 2 }}\n\
             backends = [{{ address = \"[fd00:205::11]:443\" }}]\n",
            dir.path("state.json").display().to_string()
        ),
    )
    .unwrap();
    let lb = Lb::start(&lb_ns, &config, API, &[]);
    let label = "backend=\"[fd00:205::11]:443\",result=";
    let count = |result: &str| {
        let (_, text) = lb.raw("GET", "/metrics", None, None);
        metric(
            &text,
            "lb_health_checks_total",
            &format!("{label}\"{result}\""),
        )
        .unwrap_or(0.0)
    };
    let start = Instant::now();
    while count("success") + count("failure") + count("timeout") < 5.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", lb.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, failed) = (count("success"), count("failure") + count("timeout"));
    println!("dsr over IPv6: {ok} checks passed, {failed} failed");
    assert_eq!(failed, 0.0, "checks failed:\n{}", lb.log());
    assert_eq!(
        lb.get("/api/v1/services/web/backends/[fd00:205::11]:443").1["healthy"],
        Value::Bool(true)
    );
    assert!(
        lb.log()
            .lines()
            .any(|l| l.contains("leave from another address") && l.contains("fd00:205::1")),
        "{}",
        lb.log()
    );
}

/// The CLI for scripts: `-o json` prints the API's own JSON, `lb services`
/// lists, shows, adds and removes, `lb backends disable` takes a backend
/// out, and the exit code says what went wrong: 2 bad input, 3 unreachable,
/// 1 refused. Completions and the man page come from the same definitions.
#[test]
fn the_cli_scripts_with_json_and_exit_codes() {
    lb_tests::require_root();
    let s = setup("cli-json");
    let lb = s.start(&s.config(false, "", &[8001, 8002]));
    let run = |args: &[&str]| {
        let out = lb.cli(args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json = |args: &[&str]| -> Value {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "lb {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("lb {args:?}: {e}: {out}"))
    };
    // Read commands print exactly what the API answers.
    assert_eq!(
        json(&["services", "list", "-o", "json"]),
        lb.get("/api/v1/services").1
    );
    assert_eq!(
        json(&["services", "show", "web", "-o", "json"]),
        lb.get("/api/v1/services/web").1
    );
    assert_eq!(
        json(&["backends", "list", "-s", "web", "--output", "json"]),
        lb.get("/api/v1/services/web/backends").1
    );
    let st = json(&["status", "-o", "json"]);
    assert_eq!(st["services"], lb.get("/api/v1/services").1);
    assert_eq!(st["daemon"], lb.get("/api/v1/status").1);

    // Services: add with flags, add again (exists: 2), disable a backend,
    // remove, remove again (404: 2).
    let (code, out, err) = run(&[
        "services",
        "add",
        "api",
        "--listen",
        "0.0.0.0:8443",
        "--protocol",
        "tcp",
        "--backend",
        "127.0.0.1:9001=10",
        "--backend",
        "127.0.0.1:9002",
        "--when-all-down",
        "refuse",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let api = lb.get("/api/v1/services/api").1;
    let weights: Vec<u64> = api["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(
        (weights, api["when_all_down"].as_str()),
        (vec![10, 100], Some("refuse"))
    );
    let (code, _, err) = run(&["services", "add", "api", "--listen", "0.0.0.0:8444"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exists"), "{err}");
    assert_eq!(
        lb.get("/api/v1/services/api").1,
        api,
        "a refused add changed the service"
    );
    let (code, _, err) = run(&["backends", "disable", "-s", "api", "127.0.0.1:9001"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        lb.get("/api/v1/services/api/backends/127.0.0.1:9001").1["state"],
        "disabled"
    );
    // The whole service from a JSON file.
    let body = s.dir.path("dns.json");
    std::fs::write(&body, r#"{"listen": "0.0.0.0:53", "protocols": ["udp"], "backends": [{"address": "127.0.0.1:5353"}]}"#).unwrap();
    let (code, _, err) = run(&["services", "add", "dns", "--json", body.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        lb.get("/api/v1/services/dns").1["protocols"],
        serde_json::json!(["udp"])
    );
    for name in ["api", "dns"] {
        assert_eq!(run(&["services", "remove", name]).0, 0);
        assert_eq!(lb.get(&format!("/api/v1/services/{name}")).0, 404);
    }

    // Exit codes.
    for (args, want) in [
        (vec!["services", "remove", "api"], 2),
        (vec!["services", "show", "nope"], 2),
        (vec!["backends", "add", "-s", "web", "not-an-address"], 2),
        (vec!["backends", "add", "-s", "web", "127.0.0.1:8001"], 2),
        (
            vec![
                "services",
                "add",
                "x",
                "--listen",
                "0.0.0.0:9443",
                "--backend",
                "127.0.0.1:1=99999",
            ],
            2,
        ),
        (vec!["services", "add"], 2),
        (vec!["backends", "frobnicate"], 2),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, want, "lb {args:?}: {err}");
        assert!(!err.is_empty(), "lb {args:?} said nothing");
    }
    // Unreachable: a socket or address with nobody behind it.
    for args in [
        vec!["status", "--socket", "/nonexistent/lb.sock"],
        vec!["services", "list", "--api", "http://127.0.0.1:1"],
    ] {
        let out = lb_tests::daemon::lb_cli(&s.lb_ns, &args);
        assert_eq!(out.status.code(), Some(3), "lb {args:?}: {out:?}");
    }
    // Refused: a change over the read-only TCP listener.
    let out = lb_tests::daemon::lb_cli(
        &s.lb_ns,
        &[
            "backends",
            "drain",
            "-s",
            "web",
            "127.0.0.1:8001",
            "--api",
            &format!("http://{API}"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );
    assert_eq!(
        lb.get("/api/v1/services").1,
        st["services"],
        "nothing changed on web"
    );

    // Completions and the man page.
    let bash = lb_tests::daemon::lb_cli(&s.lb_ns, &["completions", "bash"]);
    let bash = String::from_utf8_lossy(&bash.stdout);
    assert!(
        bash.contains("complete -F _lb") && bash.contains("disable"),
        "{bash}"
    );
    for shell in ["zsh", "fish"] {
        let out = lb_tests::daemon::lb_cli(&s.lb_ns, &["completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
    }
    let man = lb_tests::daemon::lb_cli(&s.lb_ns, &["man"]);
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.contains(".TH lb 1") && man.contains(".TH lb-services") && man.contains("EXIT STATUS"),
        "{man}"
    );
}
