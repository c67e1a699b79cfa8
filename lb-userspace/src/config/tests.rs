use std::{path::Path, time::Duration};

use super::*;
use crate::dataplane::{AdminState, AttachMode, Forwarding, Protocol};

const GOOD: &str = r#"
[dataplane]
interface = "eth0"
xdp_mode = "native"
flow_table_size = 1048576

[admin]
listen = "127.0.0.1:9180"

[[services]]
name = "web"
listen = "0.0.0.0:443"
protocols = ["tcp", "udp"]
forwarding = "local"
health = { kind = "http", path = "/healthz", interval = "2s", timeout = "1s", rise = 2, fall = 3 }
backends = [
  { address = "127.0.0.1:8001", weight = 100 },
  { address = "127.0.0.1:8002", weight = 50, state = "draining" },
]
"#;

fn err(text: &str) -> ConfigError {
    Config::parse(Path::new("lb.toml"), text).expect_err("config must be rejected")
}

/// A config of `services` services with `backends` backends each,
/// `[limits]` lines `limits` and `[dataplane]` lines `dataplane`.
fn sized(dataplane: &str, limits: &str, services: usize, backends: usize) -> String {
    let mut t = format!("[dataplane]\ninterface = \"eth0\"\n{dataplane}\n[limits]\n{limits}\n");
    for i in 0..services {
        t.push_str(&format!(
            "\n[[services]]\nname = \"s{i}\"\nlisten = \"0.0.0.0:{}\"\nbackends = [\n",
            1000 + i
        ));
        for j in 0..backends {
            t.push_str(&format!(
                "  {{ address = \"127.0.{i}.{}:{}\" }},\n",
                j + 1,
                2000 + i
            ));
        }
        t.push_str("]\n");
    }
    t
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn limits_default_to_what_the_maps_hold() {
    let c = Config::parse(Path::new("lb.toml"), GOOD).unwrap();
    assert_eq!(
        c.limits,
        Limits {
            max_services: 8,
            max_backends_per_service: 1024,
            max_backends: 8192
        }
    );
    assert_eq!(c.limits, Limits::default());
    // `dataplane.max_services` alone: the limit is the capacity.
    let c = Config::parse(Path::new("lb.toml"), &sized("max_services = 4", "", 4, 1)).unwrap();
    assert_eq!((c.limits.max_services, c.dataplane.max_services), (4, 4));
    // `limits.max_services` alone: the maps are sized to it.
    let c = Config::parse(Path::new("lb.toml"), &sized("", "max_services = 20", 20, 1)).unwrap();
    assert_eq!((c.limits.max_services, c.dataplane.max_services), (20, 20));
    // Both: the limit may be lower than the capacity.
    let c = Config::parse(
        Path::new("lb.toml"),
        &sized("max_services = 16", "max_services = 2", 2, 1),
    )
    .unwrap();
    assert_eq!((c.limits.max_services, c.dataplane.max_services), (2, 16));
    // A low total lowers the default per service with it.
    let c = Config::parse(Path::new("lb.toml"), &sized("", "max_backends = 10", 1, 10)).unwrap();
    assert_eq!(
        (c.limits.max_backends, c.limits.max_backends_per_service),
        (10, 10)
    );
}

#[test]
fn limits_never_exceed_the_maps() {
    for (dataplane, limits, field, says) in [
        (
            "max_services = 4",
            "max_services = 5",
            "limits.max_services",
            "more than dataplane.max_services = 4",
        ),
        (
            "",
            "max_services = 65",
            "limits.max_services",
            "out of range 1..=64",
        ),
        (
            "",
            "max_services = 0",
            "limits.max_services",
            "out of range",
        ),
        (
            "",
            "max_backends = 8193",
            "limits.max_backends",
            "out of range 1..=8192",
        ),
        (
            "",
            "max_backends = 0",
            "limits.max_backends",
            "out of range",
        ),
        (
            "",
            "max_backends = 100\nmax_backends_per_service = 101",
            "limits.max_backends_per_service",
            "more than limits.max_backends = 100",
        ),
        (
            "",
            "max_backends_per_service = 0",
            "limits.max_backends_per_service",
            "out of range",
        ),
        (
            "",
            "max_backends_per_service = 9000",
            "limits.max_backends_per_service",
            "more than limits.max_backends = 8192",
        ),
        ("", "colour = 1", "limits.colour", "unknown field"),
    ] {
        let text = sized(dataplane, limits, 1, 1);
        let e = err(&text);
        assert_eq!(e.field, field, "{limits}: {e}");
        assert!(e.message.contains(says), "{limits}: {e}");
        let key = field.rsplit('.').next().unwrap();
        let limits_at = line_of(&text, "[limits]");
        assert_eq!(
            e.position.map(|p| p.0),
            Some(
                limits_at
                    + line_of(
                        &text.lines().skip(limits_at).collect::<Vec<_>>().join("\n"),
                        &format!("{key} =")
                    )
            ),
            "{e}"
        );
    }
}

#[test]
fn a_file_over_a_limit_names_the_limit_and_the_first_item_past_it() {
    // Three services, two allowed: the third's header.
    let text = sized("", "max_services = 2", 3, 1);
    let e = err(&text);
    assert_eq!(e.field, "services[2]", "{e}");
    assert_eq!(
        e.position.map(|p| p.0),
        Some(line_of(&text, "name = \"s2\"") - 1),
        "{e}"
    );
    assert!(
        e.message
            .contains("3 services: more than limits.max_services = 2")
            && e.message.contains("[limits]"),
        "{e}"
    );
    // Three backends, two a service: the third backend's line.
    let text = sized("", "max_backends_per_service = 2", 2, 3);
    let e = err(&text);
    assert_eq!(e.field, "services[0].backends[2]", "{e}");
    assert_eq!(
        e.position.map(|p| p.0),
        Some(line_of(&text, "127.0.0.3:2000")),
        "{e}"
    );
    assert!(
        e.message.contains(
            "service \"s0\" has 3 backends: more than limits.max_backends_per_service = 2"
        ),
        "{e}"
    );
    // 3 x 3 backends, 7 in all: the one that makes 8.
    let text = sized("", "max_backends = 7", 3, 3);
    let e = err(&text);
    assert_eq!(e.field, "services[2].backends[1]", "{e}");
    assert_eq!(
        e.position.map(|p| p.0),
        Some(line_of(&text, "127.0.2.2:2002")),
        "{e}"
    );
    assert!(
        e.message
            .contains("9 backends in all services: more than limits.max_backends = 7"),
        "{e}"
    );
    // At each limit: valid.
    for (limits, services, backends) in [
        ("max_services = 2", 2, 1),
        ("max_backends_per_service = 3", 2, 3),
        ("max_backends = 9", 3, 3),
    ] {
        Config::parse(Path::new("lb.toml"), &sized("", limits, services, backends))
            .unwrap_or_else(|e| panic!("{limits}: {e}"));
    }
}

#[test]
fn check_limits_is_the_one_check_for_every_source() {
    let c = Config::parse(Path::new("lb.toml"), &sized("", "", 2, 2)).unwrap();
    let limits = Limits {
        max_services: 2,
        max_backends_per_service: 2,
        max_backends: 3,
    };
    // What the API, a reload and the state file hand it: more of
    // each, found by the same function check_services calls.
    let mut more = c.services.clone();
    more[1].backends.pop();
    assert_eq!(check_limits(&more, &limits), Ok(()));
    let mut third = more.clone();
    third.push(ServiceConfig {
        name: "s9".into(),
        backends: Vec::new(),
        ..more[0].clone()
    });
    let e = check_limits(&third, &limits).unwrap_err();
    assert_eq!((e.key, e.limit), ("limits.max_services", 2));
    assert_eq!(
        check_services(&third, &limits).unwrap_err().message,
        e.to_string()
    );
    let mut wide = more.clone();
    wide[1].backends.push(c.services[0].backends[0].clone());
    wide[1].backends[1].address = "127.0.1.9:2001".parse().unwrap();
    let e = check_limits(&wide, &limits).unwrap_err();
    assert_eq!((e.key, e.limit), ("limits.max_backends", 3), "{e}");
    wide[0].backends.pop();
    wide[1]
        .backends
        .push(ServiceConfig::clone(&c.services[1]).backends[0].clone());
    wide[1].backends[2].address = "127.0.1.8:2001".parse().unwrap();
    let e = check_limits(&wide, &limits).unwrap_err();
    assert_eq!(
        (e.key, e.limit),
        ("limits.max_backends_per_service", 2),
        "{e}"
    );
    assert_eq!(
        e.path,
        vec![
            Seg::Key("services".into()),
            Seg::Index(1),
            Seg::Key("backends".into()),
            Seg::Index(2)
        ]
    );
}

/// The README's example config, as an operator would paste it, is
/// valid and every knob it shows reaches the options.
#[test]
fn the_readme_example_is_valid() {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("cat > lb.toml <<'TOML'\n")
        .expect("the README's example config")
        + "cat > lb.toml <<'TOML'\n".len();
    let text = &readme[start..start + readme[start..].find("\nTOML\n").unwrap()];
    let c = Config::parse(Path::new("lb.toml"), text)
        .unwrap_or_else(|e| panic!("the README's example: {e}"));
    assert_eq!(c.dataplane.flow_insert_rate, 100_000);
    assert_eq!(c.dataplane.flow_table_size, 1_048_576);
    let c = Config::parse(
        Path::new("lb.toml"),
        &GOOD.replace("flow_table_size = 1048576", "flow_insert_rate = 0"),
    )
    .unwrap();
    assert_eq!(c.dataplane.flow_insert_rate, 0);
    let e = err(&GOOD.replace("flow_table_size = 1048576", "flow_insert_rate = -1"));
    assert!(e.to_string().contains("dataplane.flow_insert_rate"), "{e}");
}

#[test]
fn the_design_example_is_valid() {
    let c = Config::parse(Path::new("lb.toml"), GOOD).unwrap();
    assert_eq!(c.interface.as_deref(), Some("eth0"));
    assert_eq!(c.xdp_mode, AttachMode::Native);
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!(s.protocols, vec![Protocol::Tcp, Protocol::Udp]);
    assert_eq!(s.backends[1].state, AdminState::Draining);
    let h = s.health.as_ref().unwrap();
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (Duration::from_secs(2), Duration::from_secs(1), 2, 3)
    );
    // Round trip through the raw shape (what the API and state file use).
    let raw = RawService::from(s);
    assert_eq!(&service(&[], &raw).unwrap(), s);
}

/// (what is wrong, the config, the field and line the error must name,
/// and words the message must contain)
#[test]
fn bad_files_name_file_line_and_field() {
    let with = |from: &str, to: &str| GOOD.replacen(from, to, 1);
    let cases: Vec<(&str, String, &str, usize, &str)> = vec![
        (
            "toml syntax",
            with("xdp_mode = \"native\"", "xdp_mode = native"),
            "dataplane.xdp_mode",
            4,
            "invalid",
        ),
        (
            "unknown field",
            with("flow_table_size", "flow_tabel_size"),
            "dataplane.flow_tabel_size",
            5,
            "unknown field",
        ),
        (
            "bad xdp mode",
            with("\"native\"", "\"turbo\""),
            "dataplane.xdp_mode",
            4,
            "turbo",
        ),
        (
            "small flow table",
            with("1048576", "10"),
            "dataplane.flow_table_size",
            5,
            "out of range",
        ),
        (
            "bad admin address",
            with("127.0.0.1:9180", "localhost"),
            "admin.listen",
            8,
            "not an address",
        ),
        (
            "bad service name",
            with("name = \"web\"", "name = \"w e b\""),
            "services[0].name",
            11,
            "service name",
        ),
        (
            "listen without port",
            with("0.0.0.0:443", "0.0.0.0"),
            "services[0].listen",
            12,
            "port",
        ),
        (
            "unknown protocol",
            with("[\"tcp\", \"udp\"]", "[\"tcp\", \"sctp\"]"),
            "services[0].protocols[1]",
            13,
            "sctp",
        ),
        (
            "unknown forwarding",
            with("\"local\"", "\"tunnel\""),
            "services[0].forwarding",
            14,
            "tunnel",
        ),
        (
            "bad health kind",
            with("kind = \"http\"", "kind = \"icmp\""),
            "services[0].health.kind",
            15,
            "icmp",
        ),
        (
            "bad interval",
            with("interval = \"2s\"", "interval = \"2 fortnights\""),
            "services[0].health.interval",
            15,
            "unit",
        ),
        (
            "timeout over interval",
            with("timeout = \"1s\"", "timeout = \"5s\""),
            "services[0].health.timeout",
            15,
            "longer",
        ),
        (
            "zero rise",
            with("rise = 2", "rise = 0"),
            "services[0].health.rise",
            15,
            "out of range",
        ),
        (
            "weight too big",
            with("weight = 50", "weight = 70000"),
            "services[0].backends[1].weight",
            18,
            "65535",
        ),
        (
            "negative weight",
            with("weight = 100", "weight = -1"),
            "services[0].backends[0].weight",
            17,
            "out of range",
        ),
        (
            "bad backend",
            with("127.0.0.1:8002", "127.0.0.1"),
            "services[0].backends[1].address",
            18,
            "port",
        ),
        (
            "duplicate backend",
            with("127.0.0.1:8002", "127.0.0.1:8001"),
            "services[0].backends[1].address",
            18,
            "twice",
        ),
        (
            "bad state",
            with("\"draining\"", "\"sleeping\""),
            "services[0].backends[1].state",
            18,
            "sleeping",
        ),
        (
            "path without slash",
            with("/healthz", "healthz"),
            "services[0].health.path",
            15,
            "start with /",
        ),
        (
            "unknown table",
            GOOD.replace("[dataplane]\n", "[unused]\n"),
            "unused",
            2,
            "unknown field",
        ),
    ];
    assert!(cases.len() >= 10);
    for (what, text, field, line, words) in cases {
        let e = err(&text);
        assert_eq!(e.source, "lb.toml", "{what}: {e}");
        assert_eq!(e.field, field, "{what}: {e}");
        assert_eq!(e.position.map(|p| p.0), Some(line), "{what}: {e}");
        assert!(e.message.contains(words), "{what}: {e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("lb.toml:{line}:")),
            "{what}: {shown}"
        );
    }
}

#[test]
fn cross_service_conflicts_are_rejected() {
    let two = format!(
        "{GOOD}\n[[services]]\nname = \"web\"\nbackends = [{{ address = \"127.0.0.1:9001\" }}]\n"
    );
    let e = err(&two);
    assert_eq!(e.field, "services[1].name");
    assert!(e.message.contains("also the name"), "{e}");
    let same_listen = format!(
        "{GOOD}\n[[services]]\nname = \"api\"\nprotocols = [\"udp\"]\nbackends = [{{ address = \"127.0.0.1:9001\" }}]\n"
    );
    let e = err(&same_listen);
    assert_eq!(e.field, "services[1].listen");
    let shared_port = format!(
        "{GOOD}\n[[services]]\nname = \"api\"\nlisten = \"0.0.0.0:8443\"\nbackends = [{{ address = \"127.0.0.1:8001\" }}]\n"
    );
    let e = err(&shared_port);
    assert_eq!(e.field, "services[1].backends");
    assert!(e.message.contains("told apart"), "{e}");
}

#[test]
fn services_on_different_addresses_cannot_share_a_translated_backend() {
    let svc = |name: &str, listen: &str, fwd: &str, backend: &str| {
        format!(
            "\n[[services]]\nname = \"{name}\"\nlisten = \"{listen}\"\nforwarding = \"{fwd}\"\n\
             backends = [\n  {{ address = \"{backend}\" }},\n]\n"
        )
    };
    let head = "[dataplane]\ninterface = \"eth0\"\n";
    let text = format!(
        "{head}{}{}",
        svc("a", "10.0.0.10:443", "nat", "10.0.1.5:8443"),
        svc("b", "10.0.0.11:443", "nat", "10.0.1.5:8443")
    );
    let e = err(&text);
    assert_eq!(e.field, "services[1].backends[0].address", "{e}");
    // The line of b's backend.
    assert_eq!(e.position.map(|p| p.0), Some(17), "{e}");
    for part in [
        "10.0.1.5:8443",
        "\"a\"",
        "\"b\"",
        "10.0.0.10:443",
        "10.0.0.11:443",
    ] {
        assert!(e.message.contains(part), "{part}: {e}");
    }
    // Local services with their own addresses and backends on other
    // hosts are translated the same way.
    let text = format!(
        "{head}{}{}",
        svc("a", "10.0.0.10:443", "local", "10.0.1.5:8443"),
        svc("b", "10.0.0.11:443", "nat", "10.0.1.5:8443")
    );
    assert_eq!(err(&text).field, "services[1].backends[0].address");
    // Allowed: the same address and port (one service per protocol),
    // another backend port, dsr (replies never come back), wildcards.
    for text in [
        format!(
            "{head}{}{}",
            svc("a", "10.0.0.10:443", "nat", "10.0.1.5:8443"),
            svc("b", "10.0.0.11:443", "nat", "10.0.1.5:8444")
        ),
        format!(
            "{head}{}{}",
            svc("a", "10.0.0.10:443", "dsr", "10.0.1.5:443"),
            svc("b", "10.0.0.11:443", "dsr", "10.0.1.5:443")
        ),
        format!(
            "{head}{}{}",
            svc("a", "0.0.0.0:443", "local", "127.0.0.1:8443"),
            svc("b", "10.0.0.11:443", "local", "127.0.0.1:8443")
        ),
    ] {
        Config::parse(Path::new("lb.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}

/// Every rule of the backend address policy, in a file (file, line and
/// field named) and in an API body (field named), with the rule's name.
#[test]
fn backend_address_policy_names_the_rule() {
    let file = |fwd: &str, listen: &str, backend: &str| {
        let first = if listen.starts_with('[') {
            "[fd00:1::1]:443"
        } else {
            "10.0.1.1:443"
        };
        format!(
            "[dataplane]\ninterface = \"eth0\"\n[[services]]\nname = \"x\"\nforwarding = \"{fwd}\"\nlisten = \"{listen}\"\nbackends = [\n  {{ address = \"{first}\" }},\n  {{ address = \"{backend}\" }},\n]\n"
        )
    };
    let cases = [
        ("0.0.0.0:443", "0.0.0.0:443", "unspecified"),
        ("[::]:443", "[::]:443", "unspecified"),
        ("255.255.255.255:443", "0.0.0.0:443", "broadcast"),
        ("224.0.0.1:443", "0.0.0.0:443", "multicast"),
        ("239.255.255.250:443", "0.0.0.0:443", "multicast"),
        ("[ff02::1]:443", "[::]:443", "multicast"),
        ("169.254.169.254:80", "0.0.0.0:443", "link-local"),
        ("169.254.0.1:443", "0.0.0.0:443", "link-local"),
        ("[fe80::1]:443", "[::]:443", "link-local"),
        ("[febf::1]:443", "[::]:443", "link-local"),
        ("[::ffff:127.0.0.1]:443", "[::]:443", "ipv4-mapped"),
        ("[::ffff:10.0.0.1]:443", "[::]:443", "ipv4-mapped"),
    ];
    for (backend, listen, rule) in cases {
        let e = err(&file("local", listen, backend));
        assert_eq!(e.source, "lb.toml", "{backend}");
        assert_eq!(e.field, "services[0].backends[1].address", "{backend}");
        assert_eq!(e.position.map(|p| p.0), Some(9), "{backend}: {e}");
        assert!(
            e.message.contains(&format!("(rule: {rule})")),
            "{backend}: {e}"
        );
        // The API's backend body goes through the same check.
        let raw = RawBackend {
            address: backend.into(),
            weight: 1,
            state: None,
            server_id: None,
        };
        let api = super::backend(&[], &raw).unwrap_err().in_body().to_string();
        assert_eq!(
            api,
            format!("request body: address: {}", e.message),
            "{backend}"
        );
    }
    // Loopback: only for local forwarding.
    for (fwd, listen, b) in [
        ("nat", "10.0.0.10:443", "127.0.0.1:443"),
        ("nat", "10.0.0.10:443", "127.0.0.2:443"),
        ("dsr", "[fd00::10]:443", "[::1]:443"),
    ] {
        let e = err(&file(fwd, listen, b));
        assert_eq!(e.field, "services[0].backends[1].address");
        assert!(e.message.contains("(rule: loopback"), "{b}: {e}");
    }
    // Neighbours of the forbidden ranges stay allowed.
    for (fwd, listen, b) in [
        ("local", "0.0.0.0:443", "127.0.0.1:443"),
        ("local", "[::]:443", "[::1]:443"),
        ("local", "0.0.0.0:443", "169.253.255.255:443"),
        ("local", "0.0.0.0:443", "169.255.0.1:443"),
        ("local", "0.0.0.0:443", "223.255.255.255:443"),
        ("local", "0.0.0.0:443", "255.255.255.254:443"),
        ("nat", "[fd00::10]:443", "[fec0::1]:443"),
        ("nat", "[fd00::10]:443", "[::fffe:a00:1]:443"),
    ] {
        Config::parse(Path::new("lb.toml"), &file(fwd, listen, b))
            .unwrap_or_else(|e| panic!("{b}: {e}"));
    }
}

#[test]
fn cidrs_parse_and_contain() {
    let c = |s: &str| Cidr::parse(s).unwrap();
    assert!(c("10.0.0.0/8").contains("10.255.1.2".parse().unwrap()));
    assert!(!c("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
    assert!(c("0.0.0.0/0").contains("192.0.2.1".parse().unwrap()));
    assert!(!c("0.0.0.0/0").contains("fd00::1".parse().unwrap()));
    assert!(c("fd00::/8").contains("fd12::5".parse().unwrap()));
    assert!(!c("fd00::/8").contains("fe00::5".parse().unwrap()));
    assert!(c("10.0.1.5").contains("10.0.1.5".parse().unwrap()));
    assert!(!c("10.0.1.5").contains("10.0.1.6".parse().unwrap()));
    assert!(c("10.0.0.0/8").covers(&c("10.1.0.0/16")));
    assert!(!c("10.1.0.0/16").covers(&c("10.0.0.0/8")));
    for bad in [
        "10.0.0.1/8",
        "10.0.0.0/33",
        "fd00::/129",
        "10.0.0.0/",
        "x/8",
        "10.0.0.0/+8",
    ] {
        assert!(Cidr::parse(bad).is_err(), "{bad}");
    }
    assert!(
        Cidr::parse("10.0.0.1/8")
            .unwrap_err()
            .contains("10.0.0.0/8")
    );
}

/// `allowed_backend_networks`, per service and in `[policy]`: backends
/// outside are rejected with file, line, field and the rule's name.
#[test]
fn allowed_backend_networks_bind_every_backend() {
    let file = |policy: &str, service: &str| {
        format!(
            "[dataplane]\ninterface = \"eth0\"\n{policy}\n[[services]]\nname = \"x\"\nlisten = \"10.0.0.10:443\"\nforwarding = \"nat\"\n{service}\nbackends = [\n  {{ address = \"10.0.1.1:443\" }},\n  {{ address = \"10.0.2.1:443\" }},\n]\n"
        )
    };
    let ok =
        |t: String| Config::parse(Path::new("lb.toml"), &t).unwrap_or_else(|e| panic!("{e}\n{t}"));
    let c = ok(file("", ""));
    assert!(c.policy.allowed_backend_networks.is_empty());
    let c = ok(file(
        "[policy]\nallowed_backend_networks = [\"10.0.0.0/16\", \"fd00::/8\"]",
        "allowed_backend_networks = [\"10.0.1.0/24\", \"10.0.2.1\"]",
    ));
    assert_eq!(c.policy.allowed_backend_networks.len(), 2);
    assert_eq!(c.services[0].allowed_backend_networks.len(), 2);
    // Round trip through the raw shape the API and the state file use.
    let raw = RawService::from(&c.services[0]);
    assert_eq!(
        raw.allowed_backend_networks,
        Some(vec!["10.0.1.0/24".into(), "10.0.2.1/32".into()])
    );
    assert_eq!(&service(&[], &raw).unwrap(), &c.services[0]);

    let e = err(&file("", "allowed_backend_networks = [\"10.0.1.0/24\"]"));
    assert_eq!(e.field, "services[0].backends[1].address");
    assert_eq!(e.position.map(|p| p.0), Some(11), "{e}");
    assert!(
        e.message.contains("(rule: allowed_backend_networks)"),
        "{e}"
    );
    assert!(e.message.contains("10.0.1.0/24"), "{e}");

    let e = err(&file(
        "[policy]\nallowed_backend_networks = [\"10.0.1.0/24\"]",
        "",
    ));
    assert_eq!(e.field, "services[0].backends[1].address");
    assert_eq!(e.position.map(|p| p.0), Some(12), "{e}");
    assert!(e.message.contains("policy.allowed_backend_networks"), "{e}");
    assert!(
        e.message.contains("(rule: allowed_backend_networks)"),
        "{e}"
    );

    let e = err(&file(
        "[policy]\nallowed_backend_networks = [\"10.0.0.1/8\"]",
        "",
    ));
    assert_eq!(e.field, "policy.allowed_backend_networks[0]");
    assert_eq!(e.position.map(|p| p.0), Some(4), "{e}");
    let e = err(&file("", "allowed_backend_networks = []"));
    assert_eq!(e.field, "services[0].allowed_backend_networks");

    // The global list binds services the API makes too.
    let policy = Policy {
        allowed_backend_networks: vec![Cidr::parse("10.0.1.0/24").unwrap()],
    };
    let mut services = ok(file("", "")).services;
    assert!(check_policy(&services, &policy).is_err());
    services[0].backends.truncate(1);
    assert_eq!(check_policy(&services, &policy), Ok(()));
}

#[test]
fn nat_and_dsr_mixes_that_cannot_work_are_rejected() {
    let svc = |fwd: &str, listen: &str, backend: &str| {
        format!(
            "[dataplane]\ninterface = \"eth0\"\n[[services]]\nname = \"x\"\nforwarding = \"{fwd}\"\nlisten = \"{listen}\"\nbackends = [{{ address = \"{backend}\" }}]\n"
        )
    };
    let ok = |t: String| Config::parse(Path::new("lb.toml"), &t).unwrap();
    assert_eq!(
        ok(svc("nat", "10.0.0.10:443", "10.0.1.5:8443")).services[0].forwarding,
        Forwarding::Nat
    );
    assert_eq!(
        ok(svc("dsr", "[fd00::10]:443", "[fd00:1::5]:443")).services[0].forwarding,
        Forwarding::Dsr
    );
    let cases = [
        (
            svc("dsr", "10.0.0.10:443", "10.0.1.5:8443"),
            "services[0].backends[0].address",
            "dsr does not rewrite ports",
        ),
        (
            svc("nat", "0.0.0.0:443", "10.0.1.5:443"),
            "services[0].listen",
            "own address",
        ),
        (
            svc("dsr", "[::]:443", "[fd00::5]:443"),
            "services[0].listen",
            "own address",
        ),
        (
            svc("nat", "10.0.0.10:443", "127.0.0.1:443"),
            "services[0].backends[0].address",
            "loopback",
        ),
        (
            svc("nat", "10.0.0.10:443", "[fd00::5]:443"),
            "services[0].backends[0].address",
            "IP versions",
        ),
    ];
    for (text, field, words) in cases {
        let e = err(&text);
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(words), "{e}");
        assert_eq!(
            e.position.map(|p| p.0),
            Some(if field.ends_with("listen") { 6 } else { 7 }),
            "{e}"
        );
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("0.1us").is_err());
    assert_eq!(format_duration(parse_duration("500us").unwrap()), "500us");
    assert_eq!(format_duration(parse_duration("1.5ms").unwrap()), "1500us");
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("1e30s").is_err());
    assert!(parse_duration("99999999999999999999999h").is_err());
    assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(format_duration(Duration::from_secs(3)), "3s");
}

#[test]
fn token_file_must_be_readable_and_not_empty() {
    let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "  \n").unwrap();
    let text = GOOD.replace(
        "listen = \"127.0.0.1:9180\"",
        &format!(
            "listen = \"127.0.0.1:9180\"\ntoken_file = {:?}",
            empty.display().to_string()
        ),
    );
    // Readable by others: refused, naming the fix.
    let e = err(&text);
    assert_eq!(e.field, "admin.token_file");
    assert!(e.message.contains("chmod 600"), "{}", e.message);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = err(&text);
    assert_eq!(e.field, "admin.token_file");
    assert!(e.message.contains("empty"), "{}", e.message);
    let missing = GOOD.replace(
        "listen = \"127.0.0.1:9180\"",
        "listen = \"127.0.0.1:9180\"\ntoken_file = \"/nonexistent/token\"",
    );
    assert_eq!(err(&missing).field, "admin.token_file");
    std::fs::remove_dir_all(&dir).unwrap();
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Arbitrary text never panics the parser, and every error it
        /// gives names the file.
        #[test]
        fn any_text_gives_a_config_or_an_error(text in "\\PC{0,400}") {
            if let Err(e) = Config::parse(Path::new("x.toml"), &text) {
                prop_assert_eq!(e.source, "x.toml");
            }
        }

        /// Mutating one byte of a good file never panics and any error
        /// points inside the file.
        #[test]
        fn mutated_files_fail_cleanly(pos in 0usize..600, byte in any::<u8>()) {
            let mut bytes = GOOD.as_bytes().to_vec();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            if let Ok(text) = String::from_utf8(bytes)
                && let Err(e) = Config::parse(Path::new("x.toml"), &text)
                && let Some((line, _)) = e.position
            {
                prop_assert!(line >= 1 && line <= text.lines().count() + 1);
            }
        }
    }
}

/// The wire enums' errors: serde names the bad value and the ones it
/// takes, in the file (with field and line) and in JSON bodies.
#[test]
fn wire_enums_name_the_value_and_the_choices() {
    let with = |from: &str, to: &str| GOOD.replacen(from, to, 1);
    for (text, field, line, words) in [
        (
            with("[\"tcp\", \"udp\"]", "[\"tcp\", \"sctp\"]"),
            "services[0].protocols[1]",
            13,
            "unknown variant `sctp`, expected `tcp` or `udp`",
        ),
        (
            with("\"native\"", "\"turbo\""),
            "dataplane.xdp_mode",
            4,
            "unknown variant `turbo`, expected one of `auto`, `native`, `skb`",
        ),
        (
            with("forwarding = \"local\"", "forwarding = \"tunnel\""),
            "services[0].forwarding",
            14,
            "expected one of `local`, `nat`, `dsr`",
        ),
        (
            with("kind = \"http\"", "kind = \"icmp\""),
            "services[0].health.kind",
            15,
            "expected one of `tcp`, `http`, `https`, `udp`",
        ),
        (
            with("\"draining\"", "\"sleeping\""),
            "services[0].backends[1].state",
            18,
            "expected one of `active`, `draining`, `disabled`",
        ),
        (
            with("forwarding = \"local\"", "when_all_down = \"panic\""),
            "services[0].when_all_down",
            14,
            "expected `refuse` or `keep_last`",
        ),
        (
            with("interval = \"2s\"", "interval = \"2\""),
            "services[0].health.interval",
            15,
            "\"2\" has no unit",
        ),
    ] {
        let e = err(&text);
        assert_eq!(
            (e.field.as_str(), e.position.map(|p| p.0)),
            (field, Some(line)),
            "{e}"
        );
        assert!(e.message.contains(words), "{e}");
    }
    let e = serde_json::from_str::<RawBackend>(r#"{"address": "127.0.0.1:1", "state": "asleep"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown variant `asleep`"), "{e}");
    let e = serde_json::from_str::<RawHealth>(r#"{"kind": "tcp", "interval": "1.5"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"1.5\" has no unit"), "{e}");
}

/// The state file and the API write what they wrote before the wire
/// enums (the state file's fingerprint hashes this text).
#[test]
fn the_wire_form_of_a_service_is_unchanged() {
    let c = Config::parse(Path::new("lb.toml"), GOOD).unwrap();
    let json = serde_json::to_string(&RawService::from(&c.services[0])).unwrap();
    assert_eq!(
        json,
        r#"{"name":"web","listen":"0.0.0.0:443","protocols":["tcp","udp"],"forwarding":"local","health":{"kind":"http","path":"/healthz","interval":"2s","timeout":"1s","rise":2,"fall":3},"when_all_down":"keep_last","backends":[{"address":"127.0.0.1:8001","weight":100,"state":"active"},{"address":"127.0.0.1:8002","weight":50,"state":"draining"}]}"#
    );
    let back: RawService = serde_json::from_str(&json).unwrap();
    assert_eq!(&service(&[], &back).unwrap(), &c.services[0]);
}

#[test]
fn tc_mode_takes_local_services_only() {
    let tc = GOOD.replacen("\"native\"", "\"tc\"", 1);
    let c = Config::parse(Path::new("lb.toml"), &tc).unwrap();
    assert_eq!(c.xdp_mode, AttachMode::Tc);
    let nat = tc
        .replacen("forwarding = \"local\"", "forwarding = \"nat\"", 1)
        .replacen("0.0.0.0:443", "10.0.0.1:443", 1)
        .replace("127.0.0.1:800", "10.0.9.2:800");
    let e = err(&nat);
    let text = e.to_string();
    assert!(text.contains("services[0].forwarding"), "{text}");
    assert!(
        text.contains("TC mode") && text.contains("xdp_mode = \"native\""),
        "{text}"
    );
    // The same services are fine in XDP mode.
    Config::parse(
        Path::new("lb.toml"),
        &nat.replacen("\"tc\"", "\"native\"", 1),
    )
    .unwrap();
}

#[test]
fn bgp_section_defaults_and_errors() {
    let base = "[dataplane]\ninterface = \"eth0\"\n";
    let c = Config::parse(Path::new("/x/lb.toml"), base).unwrap();
    assert_eq!(c.bgp, None);
    let c = Config::parse(Path::new("/x/lb.toml"), &format!("{base}[bgp]\n")).unwrap();
    let bgp = c.bgp.unwrap();
    assert_eq!(bgp.bird_socket, Path::new("/run/bird/bird.ctl"));
    assert_eq!(bgp.include_file, Path::new("/etc/bird/lb-routes.conf"));
    assert_eq!(bgp.interface, "lb-announce");
    for (line, field, says) in [
        (
            "bird_socket = \"bird.ctl\"",
            "bgp.bird_socket",
            "absolute file path",
        ),
        (
            "include_file = \"/etc/bird/\"",
            "bgp.include_file",
            "absolute file path",
        ),
        (
            "interface = \"a-name-far-too-long\"",
            "bgp.interface",
            "1 to 15",
        ),
        (
            "interface = \"has space\"",
            "bgp.interface",
            "usable interface name",
        ),
        ("peer = \"x\"", "peer", "unknown field"),
    ] {
        let text = format!("{base}[bgp]\n{line}\n");
        let e = Config::parse(Path::new("/x/lb.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field) && e.contains(says), "{line}: {e}");
        assert!(e.contains(":4:"), "{line}: error placed on its line: {e}");
    }
}

#[test]
fn pin_sync_defaults_and_errors() {
    let base = "[dataplane]\ninterface = \"eth0\"\n[cluster]\netcd_endpoints = [\"http://10.0.0.1:2379\"]\nnode = \"a\"\nname = \"c\"\n";
    let c = Config::parse(Path::new("/x/lb.toml"), base).unwrap();
    assert_eq!(c.cluster.unwrap().pin_sync, None);
    let good = "pin_sync = { listen = \"10.0.0.1:7946\", key_file = \"/etc/lb/pinsync.key\" }";
    let c = Config::parse(Path::new("/x/lb.toml"), &format!("{base}{good}\n")).unwrap();
    let p = c.cluster.unwrap().pin_sync.unwrap();
    assert_eq!(p.listen, "10.0.0.1:7946".parse().unwrap());
    assert_eq!(p.key_file, Path::new("/etc/lb/pinsync.key"));
    assert_eq!(p.max_pins_per_second, pin_sync::DEFAULT_MAX_PINS_PER_SECOND);
    for (line, field, says) in [
        (
            "pin_sync = { key_file = \"/k\" }",
            "cluster.pin_sync.listen",
            "required",
        ),
        (
            "pin_sync = { listen = \"0.0.0.0:7946\", key_file = \"/k\" }",
            "cluster.pin_sync.listen",
            "specific address",
        ),
        (
            "pin_sync = { listen = \"10.0.0.1\", key_file = \"/k\" }",
            "cluster.pin_sync.listen",
            "not an ip:port",
        ),
        (
            "pin_sync = { listen = \"10.0.0.1:7946\" }",
            "cluster.pin_sync.key_file",
            "required",
        ),
        (
            "pin_sync = { listen = \"10.0.0.1:7946\", key_file = \"k\" }",
            "cluster.pin_sync.key_file",
            "absolute file path",
        ),
        (
            "pin_sync = { listen = \"10.0.0.1:7946\", key_file = \"/k\", max_pins_per_second = 0 }",
            "cluster.pin_sync.max_pins_per_second",
            "out of range",
        ),
        (
            "pin_sync = { listen = \"10.0.0.1:7946\", key_file = \"/k\", peers = [] }",
            "peers",
            "unknown field",
        ),
    ] {
        let text = format!("{base}{line}\n");
        let e = Config::parse(Path::new("/x/lb.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field) && e.contains(says), "{line}: {e}");
        assert!(e.contains(":7:"), "{line}: error placed on its line: {e}");
    }
}

#[test]
fn the_flow_hash_is_named_or_left_to_the_data_plane() {
    let c = Config::parse(Path::new("lb.toml"), GOOD).unwrap();
    assert_eq!(c.dataplane.flow_hash, None, "unset: chosen at load");
    for (name, want) in [
        ("fast", lb_common::FlowHash::Fast),
        ("murmur3", lb_common::FlowHash::Murmur3),
    ] {
        let text = GOOD.replace(
            "flow_table_size = 1048576",
            &format!("flow_table_size = 1048576\nflow_hash = \"{name}\""),
        );
        let c = Config::parse(Path::new("lb.toml"), &text).unwrap();
        assert_eq!(c.dataplane.flow_hash, Some(want));
    }
    let e = err(&GOOD.replace(
        "flow_table_size = 1048576",
        "flow_table_size = 1048576\nflow_hash = \"jhash\"",
    ));
    let message = e.to_string();
    assert!(
        message.contains("dataplane.flow_hash") && message.contains("\"fast\" or \"murmur3\""),
        "{message}"
    );
}
