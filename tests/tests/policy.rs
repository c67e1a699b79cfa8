//! The backend address policy against the real `lb`: `lb validate` names
//! the file, line, field and rule of a forbidden backend, and the admin API
//! answers 400 naming the rule for backends the policy forbids (link-local,
//! broadcast, IPv4-mapped, outside `[policy] allowed_backend_networks`,
//! outside a service's own list, widening that list) while backends inside
//! are added.

use lb_tests::{
    daemon::{Lb, TempDir, lb_validate},
    netns::Topology,
};
use rstest::rstest;
use serde_json::Value;

const API: &str = "127.0.0.1:9180";

#[rstest]
#[case::link_local("169.254.169.254:80", "", "link-local")]
#[case::broadcast("255.255.255.255:443", "", "broadcast")]
#[case::ipv4_mapped("[::ffff:127.0.0.1]:8001", "", "ipv4-mapped")]
#[case::outside_the_policy(
    "192.0.2.7:443",
    "[policy]\nallowed_backend_networks = [\"127.0.0.0/8\"]\n",
    "allowed_backend_networks"
)]
fn validate_names_the_rule_of_a_forbidden_backend(
    #[case] backend: &str,
    #[case] policy: &str,
    #[case] rule: &str,
) {
    let dir = TempDir::new("policy-validate");
    let path = dir.path("bad.toml");
    std::fs::write(
        &path,
        format!(
            "[dataplane]\ninterface = \"eth0\"\n{policy}[[services]]\nname = \"web\"\nbackends = [\n  {{ address = \"127.0.0.1:8001\" }},\n  {{ address = \"{backend}\" }},\n]\n"
        ),
    )
    .unwrap();
    let line = 7 + policy.lines().count();
    let (code, err) = lb_validate(&path);
    assert_eq!(code, Some(2), "{backend}: {err}");
    assert!(
        err.contains(&format!("{}:{line}:", path.display()))
            && err.contains("services[0].backends[1].address")
            && err.contains(&format!("(rule: {rule})")),
        "{backend}: {err}"
    );
}

#[test]
fn the_api_refuses_backends_the_policy_forbids_with_400_naming_the_rule() {
    lb_tests::require_root();
    let mut topo = Topology::new();
    let lb_ns = topo.namespace("lb");
    let cl_ns = topo.namespace("cl");
    topo.veth(
        (&lb_ns, "lb0", &["10.203.0.1/24"]),
        (&cl_ns, "cl0", &["10.203.0.2/24"]),
    );
    let dir = TempDir::new("policy-api");
    let config = dir.path("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ninterface = \"lb0\"\nxdp_mode = \"native\"\nflow_table_size = 65536\n\
             max_services = 4\n\n[admin]\nlisten = \"{API}\"\nstate_file = {state:?}\n\n\
             [policy]\nallowed_backend_networks = [\"127.0.0.0/8\", \"10.203.0.0/24\"]\n\n\
             [[services]]\nname = \"web\"\nlisten = \"0.0.0.0:443\"\nprotocols = [\"tcp\"]\n\
             allowed_backend_networks = [\"127.0.0.0/8\", \"10.203.0.0/25\"]\n\
             backends = [{{ address = \"127.0.0.1:8001\" }}]\n",
            state = dir.path("state.json").display().to_string(),
        ),
    )
    .unwrap();
    let lb = Lb::start(&lb_ns, &config, API, &[]);
    let add = |address: &str| {
        lb.call(
            "POST",
            "/api/v1/services/web/backends",
            Some(&format!("{{\"address\": \"{address}\"}}")),
            None,
        )
    };
    for (address, rule) in [
        ("169.254.169.254:80", "link-local"),
        ("[fe80::1]:443", "link-local"),
        ("255.255.255.255:443", "broadcast"),
        ("224.0.0.5:443", "multicast"),
        ("0.0.0.0:443", "unspecified"),
        ("[::ffff:127.0.0.1]:8001", "ipv4-mapped"),
        // Inside [policy]'s list, outside the service's.
        ("10.203.0.200:443", "allowed_backend_networks"),
        // Outside both.
        ("192.0.2.7:443", "allowed_backend_networks"),
    ] {
        let (status, body) = add(address);
        assert_eq!(status, 400, "{address}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains(&format!("(rule: {rule})")), "{address}: {msg}");
    }
    // Inside both lists: added.
    let (status, body) = add("10.203.0.5:443");
    assert_eq!(status, 201, "{body}");
    // A service the API makes is bound by [policy] too.
    let (status, body) = lb.call(
        "PUT",
        "/api/v1/services/api",
        Some(r#"{"listen": "0.0.0.0:8443", "protocols": ["tcp"], "backends": [{"address": "192.0.2.9:9443"}]}"#),
        None,
    );
    assert_eq!(status, 400, "{body}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("policy.allowed_backend_networks")
            && msg.contains("(rule: allowed_backend_networks)"),
        "{msg}"
    );
    // The API cannot widen a service's own list.
    let (status, body) = lb.call(
        "PUT",
        "/api/v1/services/web",
        Some(r#"{"listen": "0.0.0.0:443", "protocols": ["tcp"], "allowed_backend_networks": ["10.203.0.0/24", "127.0.0.0/8"], "backends": [{"address": "127.0.0.1:8001"}, {"address": "10.203.0.200:443"}]}"#),
        None,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("widen"),
        "{body}"
    );
    // Nothing refused got in.
    let (status, body) = lb.get("/api/v1/services/web/backends");
    assert_eq!(status, 200);
    let mut got: Vec<String> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|b: &Value| b["address"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, vec!["10.203.0.5:443", "127.0.0.1:8001"]);
    let (status, _) = lb.get("/api/v1/services/api");
    assert_eq!(status, 404);
}
