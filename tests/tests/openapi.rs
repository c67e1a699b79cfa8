//! The OpenAPI document against the real daemon: the document is valid
//! (every schema compiles against JSON Schema 2020-12, every `$ref`
//! resolves, every path parameter is declared), and every route, asked good
//! and bad questions over TCP with the read token, the admin token or none,
//! answers with a status the document lists for it and a body its schema
//! accepts.
use std::collections::{BTreeMap, BTreeSet};

use lb_tests::{
    daemon::{Lb, TempDir},
    netns::Topology,
};
use serde_json::{Value, json};

const API: &str = "127.0.0.1:9180";
const ADMIN: &str = "admin-5c1e9a7b3d";
const READ: &str = "read-8f2a6c4e0b";

/// Every `$ref` in `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// A validator for `schema`, whose `#/components/...` references resolve
/// in `doc`.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
        "allOf": [schema],
    });
    jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
}

/// The document is well formed: the checks a generator could get wrong.
fn check_document(doc: &Value) {
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    let mut all = Vec::new();
    refs(doc, &mut all);
    assert!(!all.is_empty());
    for r in &all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(schemas.contains_key(name), "$ref {r} resolves to nothing");
    }
    for (name, schema) in schemas {
        let _ = validator(doc, schema);
        assert!(!name.is_empty());
    }
    for (template, item) in doc["paths"].as_object().expect("paths") {
        let wanted: BTreeSet<&str> = template
            .split('{')
            .skip(1)
            .filter_map(|p| p.split_once('}').map(|(n, _)| n))
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path" && p["required"] == true)
                .filter_map(|p| p["name"].as_str())
                .collect();
            assert_eq!(declared, wanted, "{method} {template}: path parameters");
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {template} documents no success"
            );
            for (status, r) in responses {
                assert!(
                    r["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{method} {template} {status}: no description"
                );
            }
        }
    }
}

/// One question to the daemon.
struct Ask {
    method: &'static str,
    path: String,
    template: &'static str,
    body: Option<String>,
    token: Option<&'static str>,
    /// The status this question must get.
    want: u16,
}

fn ask(
    method: &'static str,
    path: impl Into<String>,
    template: &'static str,
    body: Option<&str>,
    token: Option<&'static str>,
    want: u16,
) -> Ask {
    Ask {
        method,
        path: path.into(),
        template,
        body: body.map(str::to_string),
        token,
        want,
    }
}

#[test]
fn every_route_answers_as_the_openapi_document_says() {
    lb_tests::require_root();
    let mut topo = Topology::new();
    let lb_ns = topo.namespace("lb");
    let cl_ns = topo.namespace("cl");
    topo.veth(
        (&lb_ns, "lb0", &["10.219.0.1/24"]),
        (&cl_ns, "cl0", &["10.219.0.2/24"]),
    );
    let dir = TempDir::new("openapi");
    let secret = |name: &str, value: &str| dir.secret(name, value).display().to_string();
    let config = dir.path("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ninterface = \"lb0\"\nxdp_mode = \"native\"\nflow_table_size = 65536\n\
             max_services = 4\n\n[admin]\nlisten = \"{API}\"\nstate_file = {state:?}\n\
             token_file = {admin:?}\nread_token_file = {read:?}\n\n\
             [[services]]\nname = \"web\"\nlisten = \"0.0.0.0:443\"\nprotocols = [\"tcp\"]\n\
             backends = [{{ address = \"127.0.0.1:8001\" }}, {{ address = \"127.0.0.1:8002\" }}]\n",
            state = dir.path("state.json").display().to_string(),
            admin = secret("admin-token", ADMIN),
            read = secret("read-token", READ),
        ),
    )
    .unwrap();
    let lb = Lb::start(&lb_ns, &config, API, &[]);

    let (status, text) = lb.tcp("GET", "/api/v1/openapi.json", None, Some(READ));
    assert_eq!(status, 200, "{text}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    check_document(&doc);
    assert_eq!(doc, lb_userspace::api::openapi_document(), "served = built");
    // The validators below do reject what the schemas forbid.
    let backend = validator(&doc, &json!({"$ref": "#/components/schemas/BackendView"}));
    let good = json!({"address": "127.0.0.1:1", "weight": 1, "state": "active", "healthy": true});
    assert!(backend.is_valid(&good));
    for bad in [
        json!({"address": "127.0.0.1:1", "weight": 1, "state": "asleep", "healthy": true}),
        json!({"address": "127.0.0.1:1", "weight": -1, "state": "active", "healthy": true}),
        json!({"address": "127.0.0.1:1", "state": "active", "healthy": true}),
    ] {
        assert!(!backend.is_valid(&bad), "{bad}");
    }

    let svc = r#"{"listen": "0.0.0.0:8443", "protocols": ["tcp"], "backends": [{"address": "127.0.0.1:9001", "weight": 10}]}"#;
    let big = format!("{{\"listen\": \"{}\"}}", "x".repeat(70 * 1024));
    let (a, r) = (Some(ADMIN), Some(READ));
    let b = "/services/web/backends";
    let one = "/services/{name}/backends/{address}";
    let asks = vec![
        ask("GET", "/services", "/services", None, r, 200),
        ask("GET", "/services", "/services", None, None, 401),
        ask("GET", "/services", "/services", None, Some("wrong"), 401),
        ask("GET", "/services/web", "/services/{name}", None, r, 200),
        ask("GET", "/services/nope", "/services/{name}", None, a, 404),
        ask(
            "PUT",
            "/services/api",
            "/services/{name}",
            Some(svc),
            a,
            201,
        ),
        ask(
            "PUT",
            "/services/api",
            "/services/{name}",
            Some(svc),
            a,
            200,
        ),
        ask(
            "PUT",
            "/services/api",
            "/services/{name}",
            Some("{not json"),
            a,
            400,
        ),
        ask(
            "PUT",
            "/services/api",
            "/services/{name}",
            Some(r#"{"colour": 1}"#),
            a,
            400,
        ),
        ask(
            "PUT",
            "/services/api",
            "/services/{name}",
            Some(svc),
            r,
            403,
        ),
        ask(
            "PUT",
            "/services/api",
            "/services/{name}",
            Some(svc),
            None,
            401,
        ),
        ask(
            "PUT",
            "/services/other",
            "/services/{name}",
            Some(r#"{"listen": "0.0.0.0:443", "protocols": ["tcp"]}"#),
            a,
            409,
        ),
        ask(
            "PUT",
            "/services/api",
            "/services/{name}",
            Some(&big),
            a,
            413,
        ),
        ask("DELETE", "/services/nope", "/services/{name}", None, a, 404),
        ask("DELETE", "/services/api", "/services/{name}", None, a, 204),
        ask("GET", b, "/services/{name}/backends", None, r, 200),
        ask(
            "GET",
            "/services/nope/backends",
            "/services/{name}/backends",
            None,
            r,
            404,
        ),
        ask(
            "POST",
            b,
            "/services/{name}/backends",
            Some(r#"{"address": "127.0.0.1:8003", "weight": 7}"#),
            a,
            201,
        ),
        ask(
            "POST",
            b,
            "/services/{name}/backends",
            Some(r#"{"address": "127.0.0.1:8003"}"#),
            a,
            409,
        ),
        ask(
            "POST",
            b,
            "/services/{name}/backends",
            Some(r#"{"address": "nowhere"}"#),
            a,
            400,
        ),
        ask(
            "POST",
            "/services/nope/backends",
            "/services/{name}/backends",
            Some(r#"{"address": "127.0.0.1:8004"}"#),
            a,
            404,
        ),
        ask("GET", format!("{b}/127.0.0.1:8003"), one, None, r, 200),
        ask("GET", format!("{b}/127.0.0.1:9999"), one, None, r, 404),
        ask("GET", format!("{b}/not-an-address"), one, None, r, 400),
        ask(
            "PATCH",
            format!("{b}/127.0.0.1:8003"),
            one,
            Some(r#"{"weight": 5}"#),
            a,
            200,
        ),
        ask(
            "PATCH",
            format!("{b}/127.0.0.1:8003"),
            one,
            Some(r#"{"state": "draining"}"#),
            a,
            200,
        ),
        ask(
            "PATCH",
            format!("{b}/127.0.0.1:8003"),
            one,
            Some(r#"{"colour": 1}"#),
            a,
            400,
        ),
        ask(
            "PATCH",
            format!("{b}/127.0.0.1:9999"),
            one,
            Some(r#"{"weight": 5}"#),
            a,
            404,
        ),
        ask(
            "PATCH",
            format!("{b}/127.0.0.1:8003"),
            one,
            Some(r#"{"weight": 5}"#),
            r,
            403,
        ),
        ask("DELETE", format!("{b}/127.0.0.1:8003"), one, None, a, 204),
        ask("DELETE", format!("{b}/127.0.0.1:8003"), one, None, a, 404),
        ask("GET", "/status", "/status", None, r, 200),
        ask("GET", "/stats", "/stats", None, r, 200),
        ask("GET", "/stats", "/stats", None, None, 401),
        ask("POST", "/reload", "/reload", None, a, 200),
        ask("POST", "/reload", "/reload", Some("{}"), a, 200),
        ask("POST", "/reload", "/reload", Some(r#"{"x": 1}"#), a, 400),
        ask("POST", "/reload", "/reload", None, r, 403),
        ask("GET", "/healthz", "/healthz", None, None, 200),
        ask("GET", "/metrics", "/metrics", None, r, 200),
        ask("GET", "/metrics", "/metrics", None, None, 401),
        ask("GET", "/openapi.json", "/openapi.json", None, r, 200),
        ask("POST", "/stop", "/stop", Some(r#"{"x": 1}"#), a, 400),
        // Last: the daemon goes.
        ask("POST", "/stop", "/stop", Some("{}"), a, 202),
    ];
    let mut seen: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
    for q in &asks {
        let (status, text) = lb.tcp(
            q.method,
            &format!("/api/v1{}", q.path),
            q.body.as_deref(),
            q.token,
        );
        let what = format!(
            "{} {} ({:?})",
            q.method,
            q.path,
            q.body.as_deref().map(|b| &b[..b.len().min(60)])
        );
        assert_eq!(status, q.want, "{what}: {text}");
        let op = &doc["paths"][q.template][q.method.to_ascii_lowercase()];
        assert!(
            op.is_object(),
            "{what}: the document has no {} {}",
            q.method,
            q.template
        );
        let documented = &op["responses"][status.to_string()];
        assert!(
            documented.is_object(),
            "{what}: status {status} is not documented for it"
        );
        match documented["content"].as_object() {
            Some(content) if content.contains_key("application/json") => {
                let schema = &content["application/json"]["schema"];
                let body: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
                let v = validator(&doc, schema);
                let errors: Vec<String> = v.iter_errors(&body).map(|e| e.to_string()).collect();
                assert!(
                    errors.is_empty(),
                    "{what}: {status} body {body} against {schema}: {errors:?}"
                );
            }
            Some(content) => {
                assert!(content.contains_key("text/plain"), "{what}: {content:?}");
                assert!(text.contains("lb_"), "{what}");
            }
            None => assert!(
                text.is_empty(),
                "{what}: {status} documents no body but got {text}"
            ),
        }
        seen.entry((q.template.to_string(), q.method.to_ascii_lowercase()))
            .or_default()
            .insert(status);
    }
    // Every documented operation was asked, and answered with success.
    for (template, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let got = seen
                .get(&(template.clone(), method.clone()))
                .unwrap_or_else(|| panic!("{method} {template} was never asked"));
            assert!(
                got.iter().any(|s| (200..300).contains(s)),
                "{method} {template}: no success among {got:?}"
            );
        }
    }
    println!(
        "{} questions over {} operations: every status documented, every body valid",
        asks.len(),
        seen.len()
    );
}
