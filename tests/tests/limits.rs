//! `[limits]` against the real `lb`: with small limits, a change through the
//! API that would go past one (a backend past `max_backends_per_service`, a
//! service past `max_services`, a backend past `max_backends`) is answered
//! 409 naming the key and its value, and changes nothing: not the API's
//! view, not the state file, not the kernel maps. Removing one makes room
//! again. A reload of a file over a limit is refused, new limits apply with
//! a reload when what is in force fits them, a state file over a lowered
//! limit stops the start, and `lb validate` names the key, file and
//! line. (And `POST /stop` and `/reload` refuse fields they do not have.)
use std::{path::Path, time::Duration};

use aya::maps::{Array, Map, MapData};
use lb_common::{BackendEntry, ServiceEntry};
use lb_tests::{
    daemon::{BpfFs, Launch, Lb, TempDir, lb_cli, lb_validate},
    netns::Topology,
};
use rstest::rstest;
use serde_json::Value;

const API: &str = "127.0.0.1:9180";

/// The config of the daemon test: `web` with two backends, under `limits`.
fn config(pin: &Path, state: &Path, limits: &str, services: &str) -> String {
    format!(
        "[dataplane]\ninterface = \"lb0\"\nxdp_mode = \"native\"\nflow_table_size = 65536\n\
         max_services = 4\npin_path = {pin:?}\n\n[admin]\nlisten = \"{API}\"\n\
         state_file = {state:?}\n\n[limits]\n{limits}\n\
         [[services]]\nname = \"web\"\nlisten = \"0.0.0.0:443\"\nprotocols = [\"tcp\"]\n\
         backends = [{{ address = \"127.0.0.1:8001\" }}, {{ address = \"127.0.0.1:8002\" }}]\n\
         {services}",
        pin = pin.display().to_string(),
        state = state.display().to_string(),
    )
}

/// What the kernel holds: every service entry and every backend entry.
fn kernel_maps(pin: &Path) -> Vec<String> {
    let maps = pin.join("maps");
    let open = |name: &str| {
        let data = MapData::from_pin(maps.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        Map::Array(data)
    };
    let services: Array<_, ServiceEntry> =
        Array::try_from(open(lb_common::maps::SERVICES)).unwrap();
    let backends: Array<_, BackendEntry> =
        Array::try_from(open(lb_common::maps::BACKENDS)).unwrap();
    let mut out = Vec::new();
    for (i, e) in services.iter().enumerate() {
        let e = e.unwrap();
        out.push(format!(
            "service {i}: table {} of {} fwd {} gen {}",
            e.active, e.table_size, e.forwarding, e.generation
        ));
    }
    for (i, e) in backends.iter().enumerate() {
        let e = e.unwrap();
        if e.generation != 0 || e.port != 0 {
            out.push(format!(
                "backend {i}: port {} state {} service {} gen {}",
                e.port, e.state, e.service, e.generation
            ));
        }
    }
    out
}

/// What an operator sees of the daemon's services: the API, the state file
/// and the kernel maps.
#[derive(Debug, PartialEq)]
struct Seen {
    api: Value,
    state: Option<String>,
    kernel: Vec<String>,
}

fn seen(lb: &Lb, state: &Path, pin: &Path) -> Seen {
    let (status, mut api) = lb.get("/api/v1/services");
    assert_eq!(status, 200, "{api}");
    // Health changes on its own; what is compared is what the change
    // could have touched.
    for s in api.as_array_mut().unwrap() {
        for b in s["backends"].as_array_mut().unwrap() {
            b.as_object_mut().unwrap().remove("healthy");
            b.as_object_mut().unwrap().remove("last_error");
        }
        s.as_object_mut().unwrap().remove("fail_open");
    }
    Seen {
        api,
        state: std::fs::read_to_string(state).ok(),
        kernel: kernel_maps(pin),
    }
}

fn names(lb: &Lb) -> Vec<(String, usize)> {
    let (_, v) = lb.get("/api/v1/services");
    let mut out: Vec<(String, usize)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["backends"].as_array().unwrap().len(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn api_changes_past_a_limit_get_409_naming_it_and_change_nothing() {
    lb_tests::require_root();
    let mut topo = Topology::new();
    let lb_ns = topo.namespace("lb");
    let cl_ns = topo.namespace("cl");
    topo.veth(
        (&lb_ns, "lb0", &["10.217.0.1/24"]),
        (&cl_ns, "cl0", &["10.217.0.2/24"]),
    );
    let bpf = BpfFs::mount("limits");
    let pin = bpf.0.join("lb");
    let dir = TempDir::new("limits-api");
    let state = dir.path("state.json");
    let path = dir.path("lb.toml");
    let limits = "max_services = 2\nmax_backends_per_service = 2\nmax_backends = 3\n";
    std::fs::write(&path, config(&pin, &state, limits, "")).unwrap();
    let mut lb = Lb::start(&lb_ns, &path, API, &[]);

    // Refused, with 409 and a message that names the limit, its value and
    // where to raise it; nothing an operator can see moves.
    let refused = |lb: &Lb, method: &str, route: &str, body: &str, says: &[&str]| {
        let before = seen(lb, &state, &pin);
        let (status, answer) = lb.call(method, route, Some(body), None);
        let msg = answer["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, 409, "{method} {route}: {answer}");
        for s in says {
            assert!(
                msg.contains(s),
                "{method} {route}: {msg:?} does not say {s:?}"
            );
        }
        assert!(msg.contains("[limits]"), "{msg}");
        assert_eq!(
            seen(lb, &state, &pin),
            before,
            "{method} {route} changed something"
        );
        msg
    };
    let added = |lb: &Lb, method: &str, route: &str, body: &str| {
        let before = seen(lb, &state, &pin);
        let (status, answer) = lb.call(method, route, Some(body), None);
        assert_eq!(status, 201, "{method} {route}: {answer}");
        let after = seen(lb, &state, &pin);
        assert!(
            after.api != before.api && after.state != before.state && after.kernel != before.kernel,
            "{method} {route}: a change that is taken shows in the API, the state file and the maps"
        );
    };

    // 1. A third backend for `web`: past max_backends_per_service = 2.
    let msg = refused(
        &lb,
        "POST",
        "/api/v1/services/web/backends",
        r#"{"address": "127.0.0.1:8003"}"#,
        &[
            "service \"web\" has 3 backends",
            "limits.max_backends_per_service = 2",
        ],
    );
    println!("past max_backends_per_service: 409 {msg}");
    // The same through PUT of the whole service.
    refused(
        &lb,
        "PUT",
        "/api/v1/services/web",
        r#"{"listen": "0.0.0.0:443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:8001"}, {"address": "127.0.0.1:8002"}, {"address": "127.0.0.1:8003"}]}"#,
        &["limits.max_backends_per_service = 2"],
    );

    // A second service with one backend fits: 2 services, 3 backends.
    added(
        &lb,
        "PUT",
        "/api/v1/services/api",
        r#"{"listen": "0.0.0.0:8443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:9001"}]}"#,
    );

    // 2. A third service, even an empty one: past max_services = 2.
    let msg = refused(
        &lb,
        "PUT",
        "/api/v1/services/third",
        r#"{"listen": "0.0.0.0:9443", "protocols": ["tcp"], "backends": []}"#,
        &["3 services", "limits.max_services = 2"],
    );
    println!("past max_services: 409 {msg}");

    // 3. A fourth backend in all: past max_backends = 3 (api would have
    //    2, within its own limit).
    let msg = refused(
        &lb,
        "POST",
        "/api/v1/services/api/backends",
        r#"{"address": "127.0.0.1:9002"}"#,
        &["4 backends in all services", "limits.max_backends = 3"],
    );
    println!("past max_backends: 409 {msg}");
    assert_eq!(names(&lb), vec![("api".into(), 1), ("web".into(), 2)]);

    // Removing one makes room again.
    let (status, v) = lb.call(
        "DELETE",
        "/api/v1/services/web/backends/127.0.0.1:8002",
        None,
        None,
    );
    assert_eq!(status, 204, "{v}");
    added(
        &lb,
        "POST",
        "/api/v1/services/api/backends",
        r#"{"address": "127.0.0.1:9002"}"#,
    );
    let (status, v) = lb.call("DELETE", "/api/v1/services/api", None, None);
    assert_eq!(status, 204, "{v}");
    added(
        &lb,
        "PUT",
        "/api/v1/services/third",
        r#"{"listen": "0.0.0.0:9443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:9101"}]}"#,
    );
    assert_eq!(names(&lb), vec![("third".into(), 1), ("web".into(), 1)]);

    // A reload of a file past a limit is refused whole, naming file, line
    // and key.
    let before = seen(&lb, &state, &pin);
    let over = "[[services]]\nname = \"a\"\nlisten = \"0.0.0.0:1001\"\nprotocols = [\"tcp\"]\n\
                backends = [{ address = \"127.0.0.1:7001\" }]\n\
                [[services]]\nname = \"b\"\nlisten = \"0.0.0.0:1002\"\nprotocols = [\"tcp\"]\n\
                backends = [{ address = \"127.0.0.1:7002\" }]\n";
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, config(&pin, &state, limits, over)).unwrap();
    let (status, v) = lb.call("POST", "/api/v1/reload", None, None);
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(status, 400, "{v}");
    assert!(
        msg.contains(&format!("{}:", path.display()))
            && msg.contains("services[2]")
            && msg.contains("limits.max_services = 2"),
        "{msg}"
    );
    assert_eq!(
        seen(&lb, &state, &pin),
        before,
        "a refused reload changed something"
    );
    println!("reload past max_services: 400 {msg}");
    std::fs::write(&path, &good).unwrap();

    // New limits apply with a reload when the services in force (the
    // file's and the API's) fit them: lowered below those, refused whole;
    // raised, they make room at once.
    let status_limits = |lb: &Lb| lb.get("/api/v1/status").1["limits"].clone();
    let was = status_limits(&lb);
    assert_eq!(was["max_services"], 2, "{was}");
    let out = lb_cli(&lb_ns, &["status", "--api", &format!("http://{API}")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("limits: 2 services, 2 backends a service, 3 backends in all"),
        "{text}"
    );
    let with = |limits: &str| std::fs::write(&path, config(&pin, &state, limits, "")).unwrap();
    with("max_services = 1\nmax_backends_per_service = 2\nmax_backends = 3\n");
    let (status, v) = lb.call("POST", "/api/v1/reload", None, None);
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(status, 400, "{v}");
    assert!(
        msg.contains("do not fit the new limits")
            && msg.contains("2 services: more than limits.max_services = 1"),
        "{msg}"
    );
    assert_eq!(status_limits(&lb), was);
    assert_eq!(
        seen(&lb, &state, &pin),
        before,
        "a refused reload changed something"
    );
    println!("reload lowering max_services below the services in force: 400 {msg}");
    with("max_services = 3\nmax_backends_per_service = 2\nmax_backends = 4\n");
    let (status, v) = lb.call("POST", "/api/v1/reload", None, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(status_limits(&lb)["max_services"], 3);
    added(
        &lb,
        "PUT",
        "/api/v1/services/fourth",
        r#"{"listen": "0.0.0.0:9444", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:9201"}]}"#,
    );
    let (status, v) = lb.call("DELETE", "/api/v1/services/fourth", None, None);
    assert_eq!(status, 204, "{v}");
    std::fs::write(&path, &good).unwrap();
    let (status, v) = lb.call("POST", "/api/v1/reload", None, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(status_limits(&lb), was);

    // Routes without a body refuse fields rather than ignore them: a stop
    // that names an option it does not have must not stop.
    for (route, body) in [
        ("/api/v1/stop", r#"{"keep_dataplane": true}"#),
        ("/api/v1/reload", r#"{"force": true}"#),
        ("/api/v1/stop", "null"),
    ] {
        let (status, v) = lb.call("POST", route, Some(body), None);
        assert_eq!(status, 400, "{route} {body}: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("no body, or {}"),
            "{v}"
        );
    }
    let (status, v) = lb.call("POST", "/api/v1/reload", Some("{}"), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(lb.get("/healthz").0, 200, "the daemon stopped");

    // The state file at start: a lowered limit the saved changes do not
    // fit stops the start, naming the key.
    lb.stop();
    std::fs::write(
        &path,
        config(
            &pin,
            &state,
            "max_services = 1\nmax_backends_per_service = 2\nmax_backends = 3\n",
            "",
        ),
    )
    .unwrap();
    let mut refused_start = Lb::spawn(&lb_ns, &path, API, &[], &Launch::default());
    let status = refused_start
        .wait_exit(Duration::from_secs(20))
        .expect("lb must refuse to start");
    let log = refused_start.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("state file") && log.contains("2 services: more than limits.max_services = 1"),
        "{log}"
    );
    println!("start with a state file past max_services: refused");
    // Back within the limits, it starts with the saved changes.
    std::fs::write(&path, &good).unwrap();
    let mut lb = Lb::start(&lb_ns, &path, API, &[]);
    assert_eq!(names(&lb), vec![("third".into(), 1), ("web".into(), 1)]);
    lb.stop();
}

/// A service `s<n>` with `backends` backends, as a config file holds it
/// (6 lines and one per backend).
fn limits_service(n: usize, backends: usize) -> String {
    let list: Vec<String> = (0..backends)
        .map(|j| format!("{{ address = \"127.0.{n}.{}:{}\" }}", j + 1, 2000 + n))
        .collect();
    format!(
        "[[services]]\nname = \"s{n}\"\nlisten = \"0.0.0.0:{}\"\nbackends = [\n  {}\n]\n",
        1000 + n,
        list.join(",\n  ")
    )
}

#[rstest]
// The third's [[services]]: 6 lines of head, 6 a service.
#[case::max_services("max_services = 2", &[1, 1, 1], "limits.max_services = 2", "services[2]", 6 + 2 * 6 + 1)]
#[case::max_backends_per_service(
    "max_backends_per_service = 2",
    &[3],
    "limits.max_backends_per_service = 2",
    "services[0].backends[2]",
    6 + 7
)]
#[case::max_backends("max_backends = 3", &[2, 2], "limits.max_backends = 3", "services[1].backends[1]", 6 + 7 + 6)]
#[case::past_the_dataplane(
    "max_services = 9",
    &[],
    "more than dataplane.max_services = 4",
    "limits.max_services",
    5
)]
fn validate_names_the_limit_a_file_goes_past(
    #[case] limits: &str,
    #[case] backends: &[usize],
    #[case] key: &str,
    #[case] field: &str,
    #[case] line: usize,
) {
    let dir = TempDir::new("limits-validate");
    let path = dir.path("lb.toml");
    let services: String = backends
        .iter()
        .enumerate()
        .map(|(n, b)| limits_service(n, *b))
        .collect();
    std::fs::write(
        &path,
        format!(
            "[dataplane]\ninterface = \"eth0\"\nmax_services = 4\n[limits]\n{limits}\n\n{services}"
        ),
    )
    .unwrap();
    let (code, err) = lb_validate(&path);
    assert_eq!(code, Some(2), "{limits}: {err}");
    assert!(
        err.contains(&format!("{}:{line}:", path.display()))
            && err.contains(field)
            && err.contains(key),
        "{limits}: want line {line}, {field}, {key}: {err}"
    );
}

#[test]
fn validate_takes_a_file_at_the_limits() {
    let dir = TempDir::new("limits-validate");
    let path = dir.path("lb.toml");
    std::fs::write(
        &path,
        format!(
            "[dataplane]\ninterface = \"eth0\"\n[limits]\nmax_services = 2\nmax_backends = 3\n\
             max_backends_per_service = 2\n{}{}",
            limits_service(0, 2),
            limits_service(1, 1)
        ),
    )
    .unwrap();
    let (code, err) = lb_validate(&path);
    assert_eq!(code, Some(0), "{err}");
}
