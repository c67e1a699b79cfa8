//! The admin API locked down, against the real `lb` daemon in a namespace:
//! it listens on loopback and a 0600 socket unless told otherwise, refuses
//! to listen beyond loopback without a token, refuses every change without
//! the admin token, gives the read token reads only, checks the Host
//! header, limits failed authentications per peer and changes overall,
//! logs every change for audit, limits request bodies, and never shows the
//! token in its logs, metrics or answers. Requests are written by hand (raw HTTP/1.1), so every header,
//! body and framing is the test's choice.
use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_tests::{
    daemon::{Lb, TempDir, lb_binary},
    netns::{self, Topology},
};

const TOKEN: &str = "tok-7f3a9c1e5b2d4f6a8c0e";
const LB_ADDR: &str = "10.202.0.1";
const BODY_LIMIT: usize = 64 * 1024;

/// One raw HTTP/1.1 exchange from inside `ns`: (status, body); status 0
/// when the connection failed or closed without an answer.
fn request(
    ns: &str,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> (u16, String) {
    let (method, path) = (method.to_string(), path.to_string());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    netns::within(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {to}\r\n"));
        }
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let payload = match &body {
            Body::None => Vec::new(),
            Body::Json(b) => {
                head.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    b.len()
                ));
                b.clone().into_bytes()
            }
            Body::Chunked(b) => {
                head.push_str("Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n");
                let mut out = Vec::new();
                for c in b.as_bytes().chunks(4096) {
                    out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                out
            }
        };
        head.push_str("\r\n");
        // The server may answer (and close) before reading a body it
        // refuses; a failed write is not a failed test.
        let _ = s
            .write_all(head.as_bytes())
            .and_then(|_| s.write_all(&payload));
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
}

#[derive(Clone)]
enum Body {
    None,
    Json(String),
    Chunked(String),
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// `lb run` in a namespace with the log level of the test's choice, spoken
/// to with raw HTTP requests (chunked bodies, odd headers).
struct Daemon {
    lb: Lb,
    api: SocketAddr,
}

impl Daemon {
    fn start(ns: &str, config: &Path, api: SocketAddr, rust_log: &str) -> Daemon {
        Daemon {
            lb: Lb::start_logging(ns, config, &api.to_string(), &[], rust_log),
            api,
        }
    }

    fn log(&self) -> String {
        self.lb.log()
    }

    fn pid(&self) -> u32 {
        self.lb.pid()
    }

    fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Body) -> (u16, String) {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        request(&self.lb.ns, self.api, method, path, &headers, body)
    }

    /// A GET with the admin token (which no-token configs ignore).
    fn get(&self, path: &str) -> (u16, String) {
        self.call("GET", path, Some(&bearer(TOKEN)), Body::None)
    }

    fn services(&self) -> serde_json::Value {
        let (status, body) = self.get("/api/v1/services");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Resident memory of the daemon, KiB.
    fn rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        self.lb.stop();
    }
}

/// A balancer namespace and a client namespace joined by a veth, a scratch
/// directory, and (when this `lb` pins its data plane) a pin directory of
/// the test's own; all removed on drop.
struct Setup {
    _topo: Topology,
    lb_ns: String,
    client_ns: String,
    dir: TempDir,
    pin: Option<PathBuf>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(p) = &self.pin {
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn setup(tag: &str) -> Setup {
    lb_tests::require_root();
    let mut topo = Topology::new();
    let lb_ns = topo.namespace("lb");
    let client_ns = topo.namespace("cl");
    topo.veth(
        (&lb_ns, "lb0", &[&format!("{LB_ADDR}/24")]),
        (&client_ns, "cl0", &["10.202.0.2/24"]),
    );
    let dir = TempDir::new(tag);
    // A daemon that pins its data plane gets a pin directory no other test
    // uses; an older one, which knows no `pin_path`, gets none.
    let pin = PathBuf::from(format!("/sys/fs/bpf/lbt-{}-{tag}", std::process::id()));
    let probe = dir.path("probe.toml");
    fs::write(
        &probe,
        format!("[dataplane]\npin_path = {:?}\n", pin.display().to_string()),
    )
    .unwrap();
    let out = Command::new(lb_binary())
        .args(["validate", "--config"])
        .arg(&probe)
        .output()
        .unwrap();
    let knows_pins = !String::from_utf8_lossy(&out.stderr).contains("unknown field");
    Setup {
        _topo: topo,
        lb_ns,
        client_ns,
        dir,
        pin: knows_pins.then_some(pin),
    }
}

impl Setup {
    /// A config with one service; `admin` is the `[admin]` table's body
    /// (the state file is added).
    fn config(&self, admin: &str, token: bool) -> PathBuf {
        let token_line = if token {
            let p = self.dir.secret("token", &format!("{TOKEN}\n"));
            format!("token_file = {:?}\n", p.display().to_string())
        } else {
            String::new()
        };
        let pin_line = match &self.pin {
            Some(p) => format!("pin_path = {:?}\n", p.display().to_string()),
            None => String::new(),
        };
        let text = format!(
            "[dataplane]\ninterface = \"lb0\"\nxdp_mode = \"native\"\nflow_table_size = 65536\n\
             max_services = 4\n{pin_line}\n\
             [admin]\n{admin}\n{token_line}state_file = {state:?}\n\n\
             [[services]]\nname = \"web\"\nlisten = \"0.0.0.0:443\"\nprotocols = [\"tcp\"]\n\
             backends = [{{ address = \"127.0.0.1:8001\" }}, {{ address = \"127.0.0.1:8002\" }}]\n",
            state = self.dir.path("state.json").display().to_string(),
        );
        let path = self.dir.path("lb.toml");
        fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path, api: &str, rust_log: &str) -> Daemon {
        Daemon::start(&self.lb_ns, config, api.parse().unwrap(), rust_log)
    }
}

#[test]
fn the_api_listens_on_loopback_unless_told_otherwise() {
    let s = setup("default-listen");
    // No `listen` in [admin] at all.
    let lb = s.start(&s.config("", false), "127.0.0.1:9180", "info");
    let listening = netns::run_in(&s.lb_ns, &["ss", "-ltnH", "sport = :9180"]);
    let locals: Vec<&str> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        locals,
        ["127.0.0.1:9180"],
        "listening sockets:\n{listening}"
    );
    let outside: SocketAddr = format!("{LB_ADDR}:9180").parse().unwrap();
    assert_eq!(
        request(&s.client_ns, outside, "GET", "/healthz", &[], Body::None).0,
        0,
        "the API answered on the veth address"
    );
    // And on the admin socket, which only root may open.
    let meta = fs::symlink_metadata(&lb.lb.socket).expect("the admin socket");
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(meta.file_type().is_socket());
    assert_eq!(
        (meta.mode() & 0o777, meta.uid()),
        (0o600, 0),
        "socket mode and owner"
    );
    let dir = fs::metadata(lb.lb.socket.parent().unwrap()).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o700, "socket directory mode");
    assert_eq!(
        lb_tests::daemon::unix_http(&lb.lb.socket, "GET", "/api/v1/services", None).0,
        200
    );
}

#[test]
fn listening_beyond_loopback_needs_a_token() {
    let s = setup("beyond");
    let outside = format!("{LB_ADDR}:9180");
    let api: SocketAddr = outside.parse().unwrap();
    // Without a token, `lb validate` and `lb run` refuse, naming the key,
    // and nothing listens.
    for listen in [outside.as_str(), "0.0.0.0:9180", "[::]:9180"] {
        let config = s.config(&format!("listen = {listen:?}"), false);
        for cmd in ["validate", "run"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &s.lb_ns])
                .arg(lb_binary())
                .args([cmd, "--config"])
                .arg(&config)
                .env("RUNTIME_DIRECTORY", s.dir.path("run"))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{cmd} with listen {listen}: {err}"
            );
            assert!(
                err.contains("admin.listen") && err.contains("without a token"),
                "{cmd} with listen {listen}: {err}"
            );
        }
        let (status, _) = request(&s.client_ns, api, "GET", "/healthz", &[], Body::None);
        assert_eq!(status, 0, "something answered for listen {listen}");
    }
    // With a token it starts, and from the client only the token opens it.
    let mut lb = s.start(
        &s.config(&format!("listen = {outside:?}"), true),
        &outside,
        "info",
    );
    let t = bearer(TOKEN);
    let ask = |method: &str, path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        request(&s.client_ns, api, method, path, &headers, Body::None).0
    };
    assert_eq!(ask("GET", "/healthz", None), 200, "liveness stays open");
    assert_eq!(ask("GET", "/api/v1/services", None), 401);
    assert_eq!(ask("GET", "/metrics", None), 401);
    assert_eq!(ask("GET", "/api/v1/services", Some(&t)), 200);
    assert_eq!(ask("DELETE", "/api/v1/services/web", None), 401);
    assert_eq!(ask("DELETE", "/api/v1/services/web", Some(&t)), 204);
    lb.stop();
    // Loopback needs none.
    let _ = fs::remove_file(s.dir.path("state.json"));
    let mut lb = s.start(
        &s.config("listen = \"[::1]:9180\"", false),
        "[::1]:9180",
        "info",
    );
    assert_eq!(lb.get("/api/v1/services").0, 200);
    lb.stop();
}

/// Every route and method that changes something.
fn changes() -> Vec<(&'static str, &'static str, Body)> {
    let svc = r#"{"listen": "0.0.0.0:8443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:9001"}]}"#;
    vec![
        (
            "PUT",
            "/api/v1/services/web",
            Body::Json(svc.replace("8443", "443")),
        ),
        ("PUT", "/api/v1/services/api", Body::Json(svc.into())),
        ("DELETE", "/api/v1/services/web", Body::None),
        (
            "POST",
            "/api/v1/services/web/backends",
            Body::Json(r#"{"address": "127.0.0.1:8003"}"#.into()),
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Body::Json(r#"{"weight": 1}"#.into()),
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Body::Json(r#"{"state": "disabled"}"#.into()),
        ),
        (
            "DELETE",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            Body::None,
        ),
        // Lifecycle: re-reading the config, removing the balancer.
        ("POST", "/api/v1/reload", Body::None),
        ("POST", "/api/v1/stop", Body::None),
        // Routes that take no change must not let one through either.
        ("POST", "/api/v1/services", Body::Json(svc.into())),
        ("DELETE", "/api/v1/services", Body::None),
        (
            "PUT",
            "/api/v1/services/web/backends",
            Body::Json("[]".into()),
        ),
        ("POST", "/api/v1/healthz", Body::None),
        ("POST", "/metrics", Body::None),
        ("DELETE", "/no/such/route", Body::None),
    ]
}

/// Authorization headers that are not the token. (Trailing spaces are not
/// among them: HTTP strips them from every header value.)
fn wrong_credentials() -> Vec<Option<String>> {
    let mut near = TOKEN.to_string();
    near.pop();
    near.push('X');
    vec![
        None,
        Some(String::new()),
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some(bearer("wrong")),
        Some(bearer(&near)),
        Some(bearer(&TOKEN[..TOKEN.len() - 1])),
        Some(bearer(&format!("{TOKEN}x"))),
        Some(bearer(&TOKEN.to_uppercase())),
        Some(TOKEN.into()),
        Some(format!("Basic {TOKEN}")),
        Some(format!("Bearer  {TOKEN}")),
    ]
}

#[test]
fn every_change_without_the_token_is_refused() {
    let s = setup("auth");
    // Hundreds of failures from one peer: the per-peer limit is another test's.
    let lb = s.start(
        &s.config("auth_failures_per_minute = 100000", true),
        "127.0.0.1:9180",
        "info",
    );
    let before = lb.services();
    let mut refused = 0;
    for (method, path, body) in changes() {
        for auth in wrong_credentials() {
            let (status, text) = lb.call(method, path, auth.as_deref(), body.clone());
            assert_eq!(
                status, 401,
                "{method} {path} with Authorization {auth:?}: {text}"
            );
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            assert!(v["error"].is_string(), "{method} {path}: {text}");
            refused += 1;
        }
        // The token in the query string is not the header.
        let (status, _) = lb.call(method, &format!("{path}?token={TOKEN}"), None, body.clone());
        assert_eq!(status, 401, "{method} {path}?token=");
    }
    assert_eq!(lb.services(), before, "a refused change changed something");
    assert!(
        !s.dir.path("state.json").exists(),
        "a refused change wrote the state file"
    );
    // Reads need no token; with it, every real change goes through.
    let t = bearer(TOKEN);
    for (method, path, body, want) in [
        ("PUT", "/api/v1/services/api", changes()[1].2.clone(), 201),
        (
            "POST",
            "/api/v1/services/web/backends",
            changes()[3].2.clone(),
            201,
        ),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            changes()[4].2.clone(),
            200,
        ),
        (
            "DELETE",
            "/api/v1/services/web/backends/127.0.0.1:8003",
            Body::None,
            204,
        ),
        ("DELETE", "/api/v1/services/api", Body::None, 204),
    ] {
        let (status, text) = lb.call(method, path, Some(&t), body);
        assert_eq!(status, want, "{method} {path} with the token: {text}");
    }
    println!("{refused} changes without the right token refused with 401");
}

#[test]
fn request_bodies_over_64_kib_are_refused() {
    let s = setup("limit");
    let mut lb = s.start(&s.config("", true), "127.0.0.1:9180", "info");
    let t = bearer(TOKEN);
    let before = lb.services();
    // A valid body padded with spaces to exactly `n` bytes.
    let padded = |json: &str, n: usize| format!("{json}{}", " ".repeat(n - json.len()));
    let svc = r#"{"listen": "0.0.0.0:8443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:9001"}]}"#;
    let backend = r#"{"address": "127.0.0.1:8003"}"#;
    let patch = r#"{"weight": 5}"#;
    let routes = [
        ("PUT", "/api/v1/services/api", svc),
        ("POST", "/api/v1/services/web/backends", backend),
        (
            "PATCH",
            "/api/v1/services/web/backends/127.0.0.1:8001",
            patch,
        ),
    ];
    for (method, path, json) in routes {
        for body in [
            Body::Json(padded(json, BODY_LIMIT + 1)),
            Body::Json(padded(json, 4 * BODY_LIMIT)),
            Body::Chunked(padded(json, 2 * BODY_LIMIT)),
        ] {
            let (status, text) = lb.call(method, path, Some(&t), body);
            assert_eq!(status, 413, "{method} {path}: {text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            assert!(v["error"].is_string(), "{method} {path}: {text}");
        }
    }
    assert_eq!(lb.services(), before, "an oversized body changed something");
    // At the limit, a body is read and applied.
    for ((method, path, json), want) in routes.iter().zip([201, 201, 200]) {
        let (status, text) = lb.call(method, path, Some(&t), Body::Json(padded(json, BODY_LIMIT)));
        assert_eq!(status, want, "{method} {path} at the limit: {text}");
    }
    // Without the token, a huge body is refused before it is read, and the
    // daemon neither falls over nor keeps the memory.
    let rss = lb.rss_kib();
    for _ in 0..5 {
        let (status, _) = lb.call(
            "PUT",
            "/api/v1/services/big",
            None,
            Body::Json(padded(svc, 16 << 20)),
        );
        assert!(
            status == 401 || status == 0,
            "unauthenticated 16 MiB body: {status}"
        );
    }
    assert_eq!(lb.get("/healthz").0, 200);
    let grown = lb.rss_kib().saturating_sub(rss);
    println!("daemon VmRSS {rss} KiB, grew {grown} KiB after five refused 16 MiB bodies");
    assert!(grown < 32 * 1024, "the daemon grew by {grown} KiB");
    lb.stop();
}

#[test]
fn the_token_never_shows_in_logs_metrics_or_answers() {
    let s = setup("secret");
    let config = s.config("auth_failures_per_minute = 100000", true);
    let t = bearer(TOKEN);
    let wrong = wrong_credentials();
    for level in ["debug", "trace"] {
        let _ = fs::remove_file(s.dir.path("state.json"));
        let mut lb = s.start(&config, "127.0.0.1:9180", level);
        let mut seen = String::new();
        // Refused changes, with every wrong credential.
        for auth in &wrong {
            let (status, body) = lb.call(
                "PATCH",
                "/api/v1/services/web/backends/127.0.0.1:8001",
                auth.as_deref(),
                Body::Json(r#"{"weight": 3}"#.into()),
            );
            assert_eq!(status, 401);
            seen.push_str(&body);
        }
        // Accepted ones, and ones that fail after the token was accepted.
        for (method, path, body) in [
            ("PUT", "/api/v1/services/api", changes()[1].2.clone()),
            (
                "PUT",
                "/api/v1/services/bad",
                Body::Json("{not json".into()),
            ),
            (
                "PATCH",
                "/api/v1/services/web/backends/127.0.0.1:8001",
                changes()[4].2.clone(),
            ),
            ("DELETE", "/api/v1/services/nope", Body::None),
            ("DELETE", "/api/v1/services/api", Body::None),
        ] {
            let (status, body) = lb.call(method, path, Some(&t), body);
            assert_ne!(status, 401, "{method} {path}: {body}");
            seen.push_str(&body);
        }
        for path in [
            "/metrics",
            "/api/v1/metrics",
            "/api/v1/services",
            "/api/v1/openapi.json",
            "/healthz",
        ] {
            let (status, body) = lb.get(path);
            assert_eq!(status, 200, "{path}");
            seen.push_str(&body);
        }
        lb.stop();
        let log = lb.log();
        let state = fs::read_to_string(s.dir.path("state.json")).unwrap_or_default();
        assert!(log.len() > 1000, "the {level} log is nearly empty:\n{log}");
        for (what, text) in [
            ("log", &log),
            ("answers and metrics", &seen),
            ("state file", &state),
        ] {
            assert!(
                !text.contains(TOKEN),
                "the token shows in the {what} at RUST_LOG={level}"
            );
            // Nor do the near misses, which would give most of it away.
            assert!(
                !text.contains(&TOKEN[..TOKEN.len() - 1]),
                "part of the token shows in the {what} at RUST_LOG={level}"
            );
        }
        println!(
            "RUST_LOG={level}: {} log lines ({} at debug, {} at trace), {} bytes of answers and \
             metrics, state file of {} bytes: no token",
            log.lines().count(),
            log.lines().filter(|l| l.contains("DEBUG")).count(),
            log.lines().filter(|l| l.contains("TRACE")).count(),
            seen.len(),
            state.len()
        );
    }
}

/// Files: `lb validate` (and so `lb run`) refuses a token file others can
/// read, naming `chmod 600`, and a `ca_file` that is `/proc/kmsg` or a FIFO;
/// the state file and the record the daemon writes are 0600, with no
/// temporary file left beside them; the CLI still takes the hidden
/// `--token` but warns that it shows in `ps`.
#[test]
fn secret_and_written_files_are_private_and_odd_ca_files_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = setup("files");
    let validate = |config: &Path| {
        let out = Command::new(lb_binary())
            .args(["validate", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let config = s.config("", true);
    let token = s.dir.path("token");
    assert!(validate(&config).0, "{}", validate(&config).1);
    for mode in [0o644, 0o640, 0o604] {
        fs::set_permissions(&token, fs::Permissions::from_mode(mode)).unwrap();
        let (ok, out) = validate(&config);
        assert!(
            !ok && out.contains("token_file") && out.contains("chmod 600"),
            "mode {mode:o}: {out}"
        );
    }
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();

    let fifo = s.dir.path("ca.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let text = fs::read_to_string(&config).unwrap();
    for (ca, want) in [
        ("/proc/kmsg".to_string(), "procfs"),
        (fifo.display().to_string(), "not a regular file"),
    ] {
        let bad = s.dir.path("ca.toml");
        fs::write(
            &bad,
            text.replace(
                "protocols = [\"tcp\"]\n",
                &format!(
                    "protocols = [\"tcp\"]\nhealth = {{ kind = \"https\", ca_file = {ca:?} }}\n"
                ),
            ),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let (ok, out) = validate(&bad);
        assert!(
            !ok && out.contains("ca_file") && out.contains(want),
            "{ca}: {out}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{ca}");
    }

    let _ = fs::remove_file(s.dir.path("state.json"));
    let mut lb = s.start(&config, "127.0.0.1:9180", "info");
    let (status, body) = lb.call(
        "PATCH",
        "/api/v1/services/web/backends/127.0.0.1:8001",
        Some(&bearer(TOKEN)),
        Body::Json(r#"{"weight": 3}"#.into()),
    );
    assert!((200..300).contains(&status), "{status} {body}");
    // The CLI: the deprecated --token still works, with a warning.
    let out = Command::new("ip")
        .args(["netns", "exec", &s.lb_ns])
        .arg(lb_binary())
        .args([
            "backends",
            "weight",
            "--service",
            "web",
            "127.0.0.1:8001",
            "4",
        ])
        .args(["--token", TOKEN])
        .env_remove("LB_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("--token is deprecated"),
        "{err}"
    );
    // The pin directory the daemon created (and locks) and its maps
    // directory are 0700 (seen through the daemon's root: `ip netns exec`
    // gives it a mount namespace of its own).
    if let Some(pin) = &s.pin {
        let root = PathBuf::from(format!("/proc/{}/root", lb.pid()));
        let pin = root.join(pin.strip_prefix("/").unwrap());
        for d in [pin.clone(), pin.join("maps")] {
            let mode = fs::metadata(&d).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        }
    }
    lb.stop();
    let mut written = Vec::new();
    for e in fs::read_dir(s.dir.path("state.json").parent().unwrap()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "temporary file left: {name}");
        if name == "state.json" || name.starts_with("dataplane-") {
            let mode = e.metadata().unwrap().mode() & 0o777;
            written.push((name, mode));
        }
    }
    assert!(
        written.iter().any(|(n, _)| n == "state.json"),
        "{written:?}"
    );
    for (name, mode) in &written {
        assert_eq!(*mode, 0o600, "{name} is {mode:o}");
    }
}

/// Health-check replies are not echoed to readers: a backend whose answer
/// is not HTTP (a made-up secret and terminal escapes) shows in the API and
/// in `lb status` only as a short, printable reason without its bytes.
#[test]
fn health_check_replies_are_not_echoed_to_readers() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    const LEAK: &str = "SECRET-leak-8c1f";
    let s = setup("echo");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let backend = netns::spawn_in(&s.lb_ns, move || {
        let listener = std::net::TcpListener::bind("127.0.0.1:8001").unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 512];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(format!("{LEAK}\x1b[2J\x07 not http\r\n").as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let config = s.config("", false);
    let text = fs::read_to_string(&config).unwrap().replace(
        "protocols = [\"tcp\"]\n",
        "protocols = [\"tcp\"]\nhealth = { kind = \"http\", interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }\n",
    );
    fs::write(&config, text).unwrap();
    let mut lb = s.start(&config, "127.0.0.1:9180", "info");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let (status, body) = lb.get("/api/v1/services/web/backends/127.0.0.1:8001");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if let Some(e) = v["last_error"].as_str() {
            break e.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failure shown: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reason.contains("malformed HTTP response"), "{reason}");
    assert!(!reason.contains(LEAK), "{reason}");
    assert!(
        reason.len() <= 160 && reason.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
        "{reason:?}"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &s.lb_ns])
        .arg(lb_binary())
        .arg("status")
        .output()
        .unwrap();
    let shown =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && shown.contains("malformed"),
        "{shown}"
    );
    assert!(!shown.contains(LEAK), "{shown}");
    assert!(!lb.log().contains(LEAK), "{}", lb.log());
    lb.stop();
    stop.store(true, Ordering::SeqCst);
    backend.join().unwrap();
}

/// A second private token file beside the first: the `[admin]` lines that
/// configure it as the read token.
const READ_TOKEN: &str = "read-2b8e6d0f4a1c3e5b7d9f";

fn read_token_line(s: &Setup) -> String {
    let p = s.dir.secret("read-token", &format!("{READ_TOKEN}\n"));
    format!("read_token_file = {:?}", p.display().to_string())
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_read_token_reads_the_admin_token_changes_and_metrics_may_be_public() {
    let s = setup("scopes");
    let read = bearer(READ_TOKEN);
    let admin = bearer(TOKEN);
    let patch = || Body::Json(r#"{"weight": 7}"#.into());
    let backend = "/api/v1/services/web/backends/127.0.0.1:8001";
    for public in [false, true] {
        let _ = fs::remove_file(s.dir.path("state.json"));
        let admin_lines = format!("{}\nmetrics_public = {public}", read_token_line(&s));
        let mut lb = s.start(&s.config(&admin_lines, true), "127.0.0.1:9180", "info");
        // No token: liveness only, and metrics when public.
        for (path, want) in [
            ("/healthz", 200),
            ("/api/v1/healthz", 200),
            ("/api/v1/services", 401),
            (backend, 401),
            ("/api/v1/status", 401),
            ("/api/v1/openapi.json", 401),
            ("/metrics", if public { 200 } else { 401 }),
            ("/api/v1/metrics", if public { 200 } else { 401 }),
        ] {
            assert_eq!(
                lb.call("GET", path, None, Body::None).0,
                want,
                "GET {path}, public {public}"
            );
        }
        // The read token reads everything and changes nothing.
        for path in ["/api/v1/services", backend, "/api/v1/status", "/metrics"] {
            assert_eq!(
                lb.call("GET", path, Some(&read), Body::None).0,
                200,
                "{path}"
            );
        }
        for (method, path, body) in changes() {
            let (status, text) = lb.call(method, path, Some(&read), body);
            assert_eq!(status, 403, "{method} {path} with the read token: {text}");
            assert!(text.contains("read token"), "{text}");
        }
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&lb.get(backend).1).unwrap()["weight"],
            100
        );
        // The admin token does both.
        assert_eq!(lb.call("PATCH", backend, Some(&admin), patch()).0, 200);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&lb.get(backend).1).unwrap()["weight"],
            7
        );
        let (_, m) = lb.call("GET", "/metrics", Some(&admin), Body::None);
        assert_eq!(
            metric(&m, "lb_api_refused_total{reason=\"read_scope\"}"),
            changes().len() as f64
        );
        assert_eq!(metric(&m, "lb_api_changes_total{result=\"ok\"}"), 1.0);
        lb.stop();
    }
}

#[test]
fn host_headers_must_name_this_api() {
    let s = setup("host");
    let mut lb = s.start(
        &s.config(
            &format!("allowed_hosts = [\"lb.internal\"]\n{}", read_token_line(&s)),
            true,
        ),
        "127.0.0.1:9180",
        "info",
    );
    let api: SocketAddr = "127.0.0.1:9180".parse().unwrap();
    let admin = bearer(TOKEN);
    let ask = |method: &str, host: &str, body: Body| {
        request(
            &s.lb_ns,
            api,
            method,
            "/api/v1/services/web/backends/127.0.0.1:8001",
            &[("Host", host), ("Authorization", admin.as_str())],
            body,
        )
    };
    // Names that only DNS could point here: refused even with the token.
    for host in [
        "evil.example",
        "evil.example:9180",
        "127.0.0.1.evil.example",
        "localhost.evil.example:9180",
        "lb.internal.evil.example",
    ] {
        for (method, body) in [
            ("GET", Body::None),
            ("PATCH", Body::Json(r#"{"weight": 9}"#.into())),
        ] {
            let (status, text) = ask(method, host, body);
            assert_eq!(status, 400, "{method} with Host {host}: {text}");
            assert!(text.contains("allowed_hosts"), "{text}");
        }
    }
    // A request with no Host header at all (HTTP/1.0 style) is refused too.
    let (status, _) = request(
        &s.lb_ns,
        api,
        "GET",
        "/api/v1/services",
        &[("Host", ""), ("Authorization", admin.as_str())],
        Body::None,
    );
    assert_eq!(status, 400);
    let v: serde_json::Value =
        serde_json::from_str(&lb.get("/api/v1/services/web/backends/127.0.0.1:8001").1).unwrap();
    assert_eq!(v["weight"], 100, "a refused Host changed something");
    // IP literals, localhost and listed names pass.
    for host in [
        "127.0.0.1:9180",
        "127.0.0.1",
        "localhost:9180",
        "LOCALHOST",
        "lb.internal",
        "lb.internal:9180",
        "[::1]:9180",
    ] {
        assert_eq!(ask("GET", host, Body::None).0, 200, "Host {host}");
    }
    assert_eq!(
        ask(
            "PATCH",
            "lb.internal:9180",
            Body::Json(r#"{"weight": 9}"#.into())
        )
        .0,
        200
    );
    let (_, m) = lb.call("GET", "/metrics", Some(&admin), Body::None);
    assert_eq!(metric(&m, "lb_api_refused_total{reason=\"host\"}"), 11.0);
    lb.stop();
}

#[test]
fn failed_authentications_are_limited_per_peer() {
    let s = setup("authlimit");
    let outside = format!("{LB_ADDR}:9180");
    let api: SocketAddr = outside.parse().unwrap();
    let mut lb = s.start(
        &s.config(
            &format!("listen = {outside:?}\nauth_failures_per_minute = 5"),
            true,
        ),
        &outside,
        "info",
    );
    let admin = bearer(TOKEN);
    let ask = |ns: &str, auth: &str| {
        request(
            ns,
            api,
            "GET",
            "/api/v1/services",
            &[("Authorization", auth)],
            Body::None,
        )
        .0
    };
    // The client guesses: five failures, then 429 whatever it sends, the
    // right token included, with a Retry-After.
    let guesses: Vec<u16> = (0..5)
        .map(|i| ask(&s.client_ns, &bearer(&format!("guess{i}"))))
        .collect();
    assert_eq!(guesses, [401; 5]);
    assert_eq!(ask(&s.client_ns, &bearer("guess5")), 429);
    assert_eq!(ask(&s.client_ns, &admin), 429, "a blocked peer is blocked");
    let (status, text) = netns::within(&s.client_ns, move || {
        let mut st = TcpStream::connect(api).unwrap();
        st.write_all(format!("GET /api/v1/services HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut raw = String::new();
        let _ = st.read_to_string(&mut raw);
        (raw.get(9..12).unwrap_or("").to_string(), raw)
    });
    assert_eq!(status, "429");
    let retry: u64 = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {text}"));
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Another peer (the balancer's own address) is not affected, nor is
    // the socket.
    assert_eq!(ask(&s.lb_ns, &admin), 200, "another peer");
    assert_eq!(
        lb_tests::daemon::unix_http(&lb.lb.socket, "GET", "/api/v1/services", None).0,
        200
    );
    // From the balancer's namespace, another peer.
    let (_, m) = lb.call("GET", "/metrics", Some(&admin), Body::None);
    assert_eq!(
        metric(&m, "lb_api_refused_total{reason=\"bad_token\"}"),
        5.0
    );
    assert_eq!(
        metric(&m, "lb_api_refused_total{reason=\"rate_limited\"}"),
        3.0
    );
    lb.stop();
}

#[test]
fn changes_are_rate_limited_and_every_one_is_audited() {
    let s = setup("audit");
    let mut lb = s.start(&s.config("change_rate = 5", true), "127.0.0.1:9180", "info");
    let socket = lb.lb.socket.clone();
    let path = "/api/v1/services/web/backends/127.0.0.1:8001";
    // 30 changes at once through the socket, each on its own connection:
    // the burst (twice the rate) passes, the rest get 429 with
    // Retry-After, and nothing else. The limit is taken as a request
    // arrives, before the change is applied; the bucket refills at the
    // rate meanwhile, so what passes is bounded by the burst plus the rate
    // over the time the 30 took (a loaded machine takes longer).
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let socket = &socket;
        let sent: Vec<_> = (0..30)
            .map(|i| {
                scope.spawn(move || {
                    lb_tests::daemon::unix_http(
                        socket,
                        "PATCH",
                        path,
                        Some(&format!("{{\"weight\": {}}}", 10 + i)),
                    )
                    .0
                })
            })
            .collect();
        sent.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let took = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + limited, 30, "{statuses:?}");
    let allowed = 10 + (5.0 * took).ceil() as usize + 1;
    assert!(
        (10..=allowed).contains(&ok) && limited >= 1,
        "{ok} passed, 10 to {allowed} allowed in {took:.2} s: {statuses:?}"
    );
    // A second later, changes pass again; reads were never limited.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        lb_tests::daemon::unix_http(&socket, "PATCH", path, Some(r#"{"weight": 77}"#)).0,
        200
    );
    for _ in 0..50 {
        assert_eq!(
            lb_tests::daemon::unix_http(&socket, "GET", path, None).0,
            200
        );
    }
    // One over TCP with the admin token, one refused for its token.
    assert_eq!(
        lb.call(
            "PATCH",
            path,
            Some(&bearer(TOKEN)),
            Body::Json(r#"{"weight": 78}"#.into())
        )
        .0,
        200
    );
    assert_eq!(
        lb.call(
            "PATCH",
            path,
            Some(&bearer("nope")),
            Body::Json(r#"{"weight": 79}"#.into())
        )
        .0,
        401
    );
    let (_, m) = lb.call("GET", "/metrics", Some(&bearer(TOKEN)), Body::None);
    assert_eq!(
        metric(&m, "lb_api_changes_total{result=\"ok\"}"),
        (ok + 2) as f64
    );
    assert_eq!(
        metric(&m, "lb_api_changes_total{result=\"rate_limited\"}"),
        limited as f64
    );
    assert_eq!(
        metric(&m, "lb_api_changes_total{result=\"unauthorized\"}"),
        1.0
    );
    lb.stop();
    // The audit trail: each applied change with its caller, route and
    // body; the refused ones with their reason; never a token.
    let log = lb.log();
    let applied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("API change applied"))
        .collect();
    assert_eq!(applied.len(), ok + 2, "{log}");
    let socket_lines = applied
        .iter()
        .filter(|l| l.contains("socket (unix socket uid 0 pid"))
        .count();
    assert_eq!(socket_lines, ok + 1, "{log}");
    assert!(
        applied
            .iter()
            .any(|l| l.contains("weight\": 77") && l.contains(path) && l.contains("PATCH")),
        "{log}"
    );
    assert!(
        applied
            .iter()
            .any(|l| l.contains("admin token from 127.0.0.1:") && l.contains("weight\": 78")),
        "{log}"
    );
    let refused = log
        .lines()
        .filter(|l| l.contains("API change refused"))
        .count();
    assert_eq!(refused, limited + 1, "{log}");
    assert!(
        log.lines()
            .filter(|l| l.contains("lb::audit"))
            .all(|l| l.contains("INFO") || l.contains("WARN"))
    );
    assert!(!log.contains(TOKEN));
}

#[test]
fn the_cli_waits_out_the_change_rate() {
    let s = setup("cli-rate");
    let mut lb = s.start(
        &s.config("change_rate = 1", false),
        "127.0.0.1:9180",
        "info",
    );
    let path = "/api/v1/services/web/backends/127.0.0.1:8001";
    let statuses: Vec<u16> = (0..3)
        .map(|w| {
            lb_tests::daemon::unix_http(
                &lb.lb.socket,
                "PATCH",
                path,
                Some(&format!("{{\"weight\": {}}}", w + 1)),
            )
            .0
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
    // The bucket is empty: the CLI is told to retry and does.
    let t = std::time::Instant::now();
    let out = lb.lb.cli(&[
        "backends",
        "weight",
        "--service",
        "web",
        "127.0.0.1:8001",
        "55",
    ]);
    let took = t.elapsed();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&lb.get(path).1).unwrap();
    assert_eq!(v["weight"], 55);
    println!("lb backends weight over an empty change bucket: done in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    lb.stop();
}

/// The capability lines of a `/proc/.../status`: (name, mask) for
/// Effective, permitted and bounding sets hold exactly `kept`; inheritable
/// and ambient nothing.
fn assert_only_kept(masks: &[(&str, u64)], kept: u64, who: &str, log: &str) {
    for &(name, mask) in masks {
        let want = match name {
            "CapInh" | "CapAmb" => 0,
            _ => kept,
        };
        assert_eq!(
            mask,
            want,
            "{who}: {name} {mask:016x} = [{}], expected {want:016x} = [{}]\n{log}",
            lb_userspace::privs::mask_names(mask),
            lb_userspace::privs::mask_names(want),
        );
    }
}

/// `CapInh`..`CapAmb`, and `NoNewPrivs`.
fn cap_lines(status: &str) -> (Vec<(&str, u64)>, Option<&str>) {
    let masks = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
        .iter()
        .map(|name| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or_else(|| panic!("no {name} in:\n{status}"));
            (*name, u64::from_str_radix(hex.trim(), 16).unwrap())
        })
        .collect();
    let nnp = status
        .lines()
        .find_map(|l| l.strip_prefix("NoNewPrivs:"))
        .map(str::trim);
    (masks, nnp)
}

/// The daemon's map named `name`, found through its own descriptors
/// (`/proc/<pid>/fdinfo` shows each map's id), so other tests' maps of the
/// same name are never read.
fn daemon_map(pid: u32, name: &str) -> aya::maps::MapData {
    let mut ids = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let text = fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    for id in &ids {
        let Ok(map) = aya::maps::MapData::from_id(*id) else {
            continue;
        };
        if map
            .info()
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_owned))
            == Some(name.into())
        {
            return map;
        }
    }
    panic!("the daemon (pid {pid}) holds no map {name} among map ids {ids:?}");
}

/// After loading and attaching, `lb run` keeps CAP_BPF and CAP_NET_ADMIN
/// only (of what it was given), in the effective, permitted and bounding
/// sets of every thread, nothing inheritable or ambient, no_new_privs set;
/// and with only those it still applies an API change to the kernel map
/// and detaches and unpins on `lb stop`.
#[test]
fn the_daemon_keeps_only_cap_bpf_and_cap_net_admin() {
    lb_tests::require_root();
    use lb_userspace::privs::mask_names;
    let s = setup("caps");
    let config = s.config("", false);
    let mut lb = s.start(&config, "127.0.0.1:9180", "info");
    let pid = lb.pid();

    // What it should keep: CAP_BPF (CAP_SYS_ADMIN before 5.8) and
    // CAP_NET_ADMIN, of what this test (its parent) holds.
    let last_cap: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let bpf = if last_cap >= 39 { 1u64 << 39 } else { 1 << 21 };
    let my_status = fs::read_to_string("/proc/self/status").unwrap();
    let (mine, _) = cap_lines(&my_status);
    let my_prm = mine.iter().find(|(n, _)| *n == "CapPrm").unwrap().1;
    let kept = (bpf | 1 << 12) & my_prm;
    assert_ne!(kept, 0, "this test holds neither CAP_BPF nor CAP_NET_ADMIN");

    let mut threads = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that ended since the listing
        };
        threads += 1;
        let tid = task.file_name().to_string_lossy().into_owned();
        let (masks, nnp) = cap_lines(&status);
        assert_only_kept(&masks, kept, &format!("thread {tid}"), &lb.log());
        assert_eq!(nnp, Some("1"), "thread {tid}: NoNewPrivs\n{}", lb.log());
    }
    println!(
        "{threads} threads of lb (pid {pid}) hold CapEff = CapPrm = CapBnd = {kept:016x} [{}], \
         CapInh = CapAmb = 0, NoNewPrivs 1",
        mask_names(kept)
    );
    assert!(
        lb.log().contains("capabilities dropped") && lb.log().contains("CAP_BPF"),
        "{}",
        lb.log()
    );

    // An API change (through the admin socket) reaches the kernel map.
    let (status, body) = lb_tests::daemon::unix_http(
        &lb.lb.socket,
        "POST",
        "/api/v1/services/web/backends",
        Some(r#"{"address": "127.0.0.1:8003", "weight": 100}"#),
    );
    assert!(status == 200 || status == 201, "{status}: {body}");
    let backends: aya::maps::Array<_, lb_common::BackendEntry> = aya::maps::Array::try_from(
        aya::maps::Map::Array(daemon_map(pid, lb_common::maps::BACKENDS)),
    )
    .unwrap();
    let found: Vec<_> = backends
        .iter()
        .filter_map(Result::ok)
        .filter(|e| {
            e.port == 8003
                && lb_userspace::dataplane::words_addr(&e.addr)
                    == "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "LB_BACKENDS entries for 127.0.0.1:8003: {found:?}"
    );
    println!(
        "added 127.0.0.1:8003 through the API: in LB_BACKENDS as {:?}",
        found[0]
    );

    // `lb stop` detaches and unpins with only those capabilities.
    let out = lb.lb.cli(&["stop"]);
    assert!(
        out.status.success(),
        "lb stop: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let exit = lb
        .lb
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon did not exit after lb stop");
    let log = lb.log();
    assert!(exit.success(), "{exit}:\n{log}");
    assert!(log.contains("detached and unpinned"), "{log}");
    assert!(
        !log.contains("ERROR") && !log.contains("Operation not permitted"),
        "{log}"
    );
    let link = netns::run_in(&s.lb_ns, &["ip", "link", "show", "lb0"]);
    assert!(
        !link.contains("xdp"),
        "XDP still attached after lb stop: {link}"
    );
}

/// The capabilities packaging/lb.service gives (`CapabilityBoundingSet`),
/// as `setpriv` names them, without `except`.
fn unit_capabilities(except: &str) -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/lb.service");
    let text = fs::read_to_string(&unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in packaging/lb.service");
    line.split_whitespace()
        .filter(|c| *c != except)
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// `lb run` limited to the capabilities packaging/lb.service gives (the
/// bounding set of a root process, as systemd sets it) loads, attaches and
/// then keeps CAP_BPF and CAP_NET_ADMIN; without the unit's CAP_SETPCAP it
/// cannot empty the bounding set, so it refuses to start, attaching nothing.
#[test]
fn the_units_capabilities_are_enough_and_cap_setpcap_is_needed() {
    lb_tests::require_root();
    let s = setup("unit-caps");
    let config = s.config("", false);
    let launch = |except: &str| lb_tests::daemon::Launch {
        prefix: vec![
            "setpriv".into(),
            "--bounding-set".into(),
            format!("-all,+{}", unit_capabilities(except).join(",+")),
        ],
        rust_log: "info".into(),
        ..Default::default()
    };
    println!("unit capabilities: {:?}", unit_capabilities(""));

    let mut lb = Lb::start_with(&s.lb_ns, &config, "127.0.0.1:9180", &[], &launch(""));
    let status = fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    let (masks, _) = cap_lines(&status);
    let kept = (1u64 << 39) | (1 << 12);
    assert_only_kept(&masks, kept, "the daemon", &lb.log());
    let link = netns::run_in(&s.lb_ns, &["ip", "link", "show", "lb0"]);
    assert!(link.contains("xdp"), "not attached: {link}\n{}", lb.log());
    // SIGTERM: the next start adopts the pins.
    assert!(lb.stop().success(), "{}", lb.log());
    drop(lb);

    let mut lb = Lb::spawn(
        &s.lb_ns,
        &config,
        "127.0.0.1:9180",
        &[],
        &launch("CAP_SETPCAP"),
    );
    let exit = lb
        .wait_exit(Duration::from_secs(20))
        .expect("lb without CAP_SETPCAP did not exit");
    let log = lb.log();
    println!("without CAP_SETPCAP: {exit}: {}", log.trim());
    assert!(!exit.success(), "{log}");
    assert!(
        log.contains("CAP_SETPCAP") && log.contains("nothing was attached"),
        "{log}"
    );
}
