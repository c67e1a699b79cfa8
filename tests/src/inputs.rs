//! Bad input for the control plane: the config parser and the admin API's
//! request bodies. The checks say what must hold for any input (an error
//! that names its place and says something, or a value that survives the
//! round trip through the state file's shape); the generator makes inputs
//! from valid ones by mutation. Used by `tests/inputs.rs` (a bounded run in
//! CI) and by the cargo-fuzz targets in `tests/fuzz/` (which include this
//! file and `rng.rs` by path).
use std::path::Path;

use lb_userspace::{
    api::{BackendPatch, NoFields},
    config::{self, Config, Limits, RawBackend, RawService},
};
use serde_json::{Value, json};

use crate::rng::Rng;

/// The name configs are parsed under.
pub const FILE: &str = "fuzz.toml";

/// Checks `Config::parse` on `text`: an error names the file, a position
/// inside it and says something; a valid config's services survive the
/// round trip through `RawService` (what the API shows and the state file
/// keeps). Panics propagate: the caller catches them.
pub fn check_config(text: &str) -> Result<(), String> {
    match Config::parse(Path::new(FILE), text) {
        Err(e) => {
            if e.source != FILE {
                return Err(format!("the error names {:?}, not the file: {e}", e.source));
            }
            if e.message.trim().is_empty() {
                return Err(format!("the error says nothing: {e:?}"));
            }
            let Some((line, col)) = e.position else {
                return Err(format!("the error has no position: {e}"));
            };
            let lines: Vec<&str> = text.split('\n').collect();
            if line == 0 || line > lines.len() {
                return Err(format!(
                    "line {line} is outside the file ({} lines): {e}",
                    lines.len()
                ));
            }
            if col == 0 || col > lines[line - 1].len() + 1 {
                return Err(format!(
                    "column {col} is outside line {line} ({} bytes): {e}",
                    lines[line - 1].len()
                ));
            }
            let shown = e.to_string();
            if !shown.starts_with(&format!("{FILE}:{line}:{col}: ")) {
                return Err(format!(
                    "the error does not lead with file:line:col: {shown}"
                ));
            }
            Ok(())
        }
        Ok(c) => {
            for (i, s) in c.services.iter().enumerate() {
                let raw = RawService::from(s);
                match config::service(&[], &raw) {
                    Ok(back) if &back == s => {}
                    Ok(back) => {
                        return Err(format!(
                            "services[{i}] changes on its way through the state file: \
                             {s:?} came back as {back:?} (via {raw:?})"
                        ));
                    }
                    Err(e) => {
                        return Err(format!(
                            "services[{i}] is valid in the file but not once saved: {} \
                             (via {raw:?})",
                            e.in_body()
                        ));
                    }
                }
            }
            Ok(())
        }
    }
}

/// Which API body a JSON input is for: every route that reads a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Body {
    /// `PUT /services/{name}`
    Service,
    /// `POST /services/{name}/backends`
    Backend,
    /// `PATCH /services/{name}/backends/{address}`
    Patch,
    /// `POST /reload`
    Reload,
    /// `POST /stop`
    Stop,
}

impl Body {
    pub const ALL: [Body; 5] = [
        Body::Service,
        Body::Backend,
        Body::Patch,
        Body::Reload,
        Body::Stop,
    ];

    /// The route a fuzz input's first byte picks: `'0'` PUT service, `'1'`
    /// POST backend, `'2'` PATCH backend, `'3'` POST reload, `'4'` POST
    /// stop (any byte: its distance from `'0'`, modulo 5).
    pub fn from_byte(b: u8) -> Body {
        Body::ALL[usize::from(b.wrapping_sub(b'0')) % Body::ALL.len()]
    }

    /// The seed-file prefix of this route.
    pub fn byte(self) -> u8 {
        b'0' + Body::ALL.iter().position(|k| *k == self).unwrap() as u8
    }
}

fn body_error(e: config::FieldError) -> Result<(), String> {
    if e.message.trim().is_empty() {
        return Err(format!("the error says nothing: {e:?}"));
    }
    let shown = e.clone().in_body();
    if shown.position.is_some() || shown.to_string().trim().is_empty() {
        return Err(format!("a body error reads {shown:?}"));
    }
    Ok(())
}

/// Checks one request body the way the API handles it: JSON into the raw
/// shape, then validation. Errors must say something; what validates must
/// come back the same through the shape the API answers with.
pub fn check_body(kind: Body, text: &str) -> Result<(), String> {
    match kind {
        Body::Service => {
            let mut raw: RawService = match serde_json::from_str(text) {
                Ok(r) => r,
                Err(e) if e.to_string().trim().is_empty() => {
                    return Err("a JSON error says nothing".into());
                }
                Err(_) => return Ok(()),
            };
            // The API names a service by its path when the body does not.
            if raw.name.is_empty() {
                raw.name = "api".into();
            }
            match config::service(&[], &raw) {
                Err(e) => body_error(e),
                Ok(s) => {
                    // Cross-service rules on their own must not trip either.
                    if let Err(e) =
                        config::check_services(std::slice::from_ref(&s), &Limits::default())
                    {
                        body_error(e)?;
                    }
                    match config::service(&[], &RawService::from(&s)) {
                        Ok(back) if back == s => Ok(()),
                        other => Err(format!(
                            "a valid service changes through the API's shape: {s:?} came back as \
                             {other:?}"
                        )),
                    }
                }
            }
        }
        Body::Backend => {
            let raw: RawBackend = match serde_json::from_str(text) {
                Ok(r) => r,
                Err(_) => return Ok(()),
            };
            match config::backend(&[], &raw) {
                Err(e) => body_error(e),
                Ok(b) => match config::backend(&[], &RawBackend::from(&b)) {
                    Ok(back) if back == b => Ok(()),
                    other => Err(format!(
                        "a valid backend changes through the API's shape: {b:?} came back as \
                         {other:?}"
                    )),
                },
            }
        }
        Body::Patch => {
            let p: BackendPatch = match serde_json::from_str(text) {
                Ok(p) => p,
                Err(_) => return Ok(()),
            };
            match p.validate() {
                Err(m) if m.trim().is_empty() => Err(format!("a PATCH error says nothing: {p:?}")),
                Err(_) => Ok(()),
                Ok(c) => {
                    // What validates changes exactly what the body named.
                    if c.weight.map(i64::from) != p.weight
                        || c.state.is_some() != p.state.is_some()
                        || (c.weight, c.state) == (None, None)
                    {
                        return Err(format!("{p:?} validated as {c:?}"));
                    }
                    Ok(())
                }
            }
        }
        Body::Reload | Body::Stop => match NoFields::parse(text.as_bytes()) {
            Err(m) if m.trim().is_empty() => Err("a body error says nothing".into()),
            Err(_) => Ok(()),
            // Nothing but no body or an empty object gets through.
            Ok(NoFields {}) => match serde_json::from_str::<Value>(text) {
                _ if text.trim().is_empty() => Ok(()),
                Ok(Value::Object(m)) if m.is_empty() => Ok(()),
                // serde reads a struct from a JSON array too.
                Ok(Value::Array(a)) if a.is_empty() => Ok(()),
                other => Err(format!("{text:?} was taken as no fields ({other:?})")),
            },
        },
    }
}

/// Whether the API takes `text` as a `kind` body: the API's own types and
/// checks, all the way (for seeds, which must start inside them).
pub fn accept(kind: Body, text: &str) -> Result<(), String> {
    let json = |e: serde_json::Error| format!("not a {kind:?} body: {e}");
    match kind {
        Body::Service => {
            let mut raw: RawService = serde_json::from_str(text).map_err(json)?;
            if raw.name.is_empty() {
                raw.name = "api".into();
            }
            let s = config::service(&[], &raw).map_err(|e| e.in_body().to_string())?;
            config::check_services(std::slice::from_ref(&s), &Limits::default())
                .map_err(|e| e.in_body().to_string())
        }
        Body::Backend => {
            let raw: RawBackend = serde_json::from_str(text).map_err(json)?;
            config::backend(&[], &raw)
                .map(|_| ())
                .map_err(|e| e.in_body().to_string())
        }
        Body::Patch => {
            let p: BackendPatch = serde_json::from_str(text).map_err(json)?;
            p.validate().map(|_| ())
        }
        Body::Reload | Body::Stop => NoFields::parse(text.as_bytes()).map(|_| ()),
    }
}

// ---------------------------------------------------------------------------
// Valid inputs to start from.

pub const CONFIGS: [&str; 4] = [
    r#"
[dataplane]
interface = "eth0"
xdp_mode = "auto"
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
  { address = "127.0.0.1:8002", weight = 100 },
]
"#,
    "[dataplane]\ninterface = \"eth1\"\n[[services]]\nname = \"web\"\nbackends = [{ address = \"127.0.0.1:8001\" }]\n",
    r#"
[dataplane]
interface = "lb0"
xdp_mode = "skb"
flow_table_size = 4096
maglev_table_size = 65537
max_services = 4

[admin]
listen = "[::1]:9180"
state_file = "/tmp/lb-fuzz-state-never-written.json"

[health]
max_concurrent = 64

[limits]
max_services = 3
max_backends_per_service = 2
max_backends = 3

[[services]]
name = "dns"
listen = "0.0.0.0:53"
protocols = ["udp"]
health = { kind = "udp", payload = "ping", expect = "pong", interval = "500ms", timeout = "200ms" }
backends = [{ address = "127.0.0.1:5353", weight = 0, state = "draining" }]

[[services]]
name = "api.v6"
listen = "[fd00::1]:8443"
protocols = ["tcp"]
health = { kind = "https", path = "/ready", host = "api.example:8443", sni = "api.example", interval = "1.5s", timeout = "750ms", rise = 1, fall = 1 }
backends = [
  { address = "[fd00::9]:9443", weight = 65535 },
  { address = "[::1]:9444", state = "disabled" },
]
"#,
    r#"
[dataplane]
interface = "eth0"

[[services]]
name = "gw"
listen = "10.0.0.10:443"
forwarding = "nat"
health = { kind = "tcp", interval = "1m", timeout = "10s", rise = 100, fall = 100 }
backends = [{ address = "10.0.1.5:8443" }, { address = "10.0.1.6:8443", weight = 7 }]

[[services]]
name = "direct"
listen = "10.0.0.11:443"
protocols = ["tcp"]
forwarding = "dsr"
backends = [{ address = "10.0.1.7:443" }]
"#,
];

pub fn service_bodies() -> Vec<Value> {
    vec![
        json!({"listen": "0.0.0.0:8443", "protocols": ["tcp"],
               "backends": [{"address": "127.0.0.1:9001", "weight": 10}]}),
        json!({"name": "api", "listen": "[::]:443", "protocols": ["tcp", "udp"], "forwarding": "local",
               "health": {"kind": "http", "path": "/h", "host": "x", "interval": "2s", "timeout": "1s", "rise": 2, "fall": 3},
               "backends": [{"address": "[::1]:9001"}, {"address": "127.0.0.1:9002", "weight": 0, "state": "draining"}]}),
        json!({"listen": "10.0.0.10:443", "forwarding": "nat",
               "health": {"kind": "udp", "payload": "ping", "interval": "250ms", "timeout": "100ms"},
               "backends": [{"address": "10.0.1.5:8443", "state": "disabled"}]}),
        json!({}),
    ]
}

pub fn backend_bodies() -> Vec<Value> {
    vec![
        json!({"address": "127.0.0.1:8003"}),
        json!({"address": "[fd00::5]:443", "weight": 65535, "state": "active"}),
        json!({"address": "127.0.0.1:8004", "weight": 0, "state": "disabled"}),
    ]
}

pub fn patch_bodies() -> Vec<Value> {
    vec![
        json!({"weight": 7}),
        json!({"state": "draining"}),
        json!({"weight": 0, "state": "active"}),
    ]
}

/// Bodies of `POST /reload` and `POST /stop`: the one `lb` sends, and
/// one that must be refused, not ignored.
pub fn no_field_bodies() -> Vec<Value> {
    vec![json!({}), json!({"keep_dataplane": true})]
}

/// The bodies mutations of `kind` start from.
pub fn bodies(kind: Body) -> Vec<Value> {
    match kind {
        Body::Service => service_bodies(),
        Body::Backend => backend_bodies(),
        Body::Patch => patch_bodies(),
        Body::Reload | Body::Stop => no_field_bodies(),
    }
}

// ---------------------------------------------------------------------------
// Mutation.

/// Values that have broken parsers before: edges of every range, units and
/// addresses of every shape.
const TOML_VALUES: [&str; 58] = [
    "0",
    "-1",
    "1",
    "3",
    "1023",
    "1024",
    "65535",
    "65536",
    "67108864",
    "67108865",
    "2147483647",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "1e400",
    "nan",
    "inf",
    "1.5",
    "0x10",
    "1_000",
    "true",
    "[]",
    "{}",
    "[1, \"a\"]",
    "{ address = \"127.0.0.1:1\" }",
    "\"\"",
    "\" \"",
    "\"0s\"",
    "\"500us\"",
    "\"0.5us\"",
    "\"1.5ms\"",
    "\"1.0000001s\"",
    "\"99999999999999999999s\"",
    "\"18446744073709551616ms\"",
    "\"1e3s\"",
    "\"-1s\"",
    "\".s\"",
    "\"1.5.5s\"",
    "\"2h\"",
    "\"127.0.0.1:0\"",
    "\"[::1]:443\"",
    "\"[fe80::1%2]:443\"",
    "\"[::ffff:10.0.0.1]:443\"",
    "\"0.0.0.0:443\"",
    "\"224.0.0.1:80\"",
    "\"localhost:80\"",
    "\"a b\"",
    "\"/healthz\"",
    "\"healthz\"",
    "\"sctp\"",
    "\"dsr\"",
    "\"nat\"",
    "\"icmp\"",
    "\"disabled\"",
    "\"\\u0000\"",
    "\"é💥\"",
    "'''\nmulti\nline'''",
];

const TOML_KEYS: [&str; 26] = [
    "interface",
    "xdp_mode",
    "flow_table_size",
    "maglev_table_size",
    "max_services",
    "max_backends_per_service",
    "max_backends",
    "listen",
    "token_file",
    "state_file",
    "max_concurrent",
    "name",
    "protocols",
    "forwarding",
    "health",
    "backends",
    "address",
    "weight",
    "state",
    "kind",
    "path",
    "interval",
    "timeout",
    "rise",
    "fall",
    "colour",
];

const TOML_SNIPPETS: [&str; 13] = [
    "\n[[services]]\nname = \"x\"\nbackends = [{ address = \"127.0.0.1:9\" }]\n",
    "\n[[services]]\nname = \"web\"\n",
    "\n[dataplane]\n",
    "\n[admin]\nlisten = \"0.0.0.0:9180\"\n",
    "\n[health]\nmax_concurrent = 0\n",
    "\n[unknown]\n",
    "\n[limits]\nmax_services = 1\nmax_backends_per_service = 1\nmax_backends = 1\n",
    "[[services.backends]]\naddress = \"127.0.0.1:1\"\n",
    "\"",
    "[",
    "{",
    "\n# comment\n",
    "\r\n",
];

fn char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One mutation of config text: values, keys, lines, bytes.
fn mutate_text(r: &mut Rng, s: &mut String) {
    if s.is_empty() {
        s.push_str(CONFIGS[r.below(CONFIGS.len())]);
        return;
    }
    let at = char_boundary(s, r.below(s.len() + 1));
    match r.below(10) {
        // Replace the value on a random `key = value` line.
        0..=2 => {
            let lines: Vec<&str> = s.split('\n').collect();
            let eq: Vec<usize> = (0..lines.len())
                .filter(|i| lines[*i].contains('='))
                .collect();
            if eq.is_empty() {
                return;
            }
            let i = *r.pick(&eq);
            let (k, v) = lines[i].split_once('=').unwrap();
            // Inside an inline table, replace one of its values instead.
            let new = if v.contains(", ") && r.one_in(2) {
                let parts: Vec<&str> = v.split(", ").collect();
                let j = r.below(parts.len());
                let mut parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
                if let Some((pk, _)) = parts[j].clone().split_once('=') {
                    parts[j] = format!("{pk}= {}", r.pick(&TOML_VALUES));
                }
                format!("{k}={}", parts.join(", "))
            } else {
                format!("{k}= {}", r.pick(&TOML_VALUES))
            };
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            out[i] = new;
            *s = out.join("\n");
        }
        // Rename a key.
        3 => {
            let key = *r.pick(&TOML_KEYS);
            if let Some(pos) = s[at..].find(" =") {
                let start = s[..at + pos]
                    .rfind(['\n', '{', ',', ' '])
                    .map_or(0, |p| p + 1);
                s.replace_range(start..at + pos, key);
            }
        }
        // Lines: delete, duplicate, swap.
        4 => {
            let mut lines: Vec<String> = s.split('\n').map(String::from).collect();
            let i = r.below(lines.len());
            match r.below(3) {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                _ => {
                    let j = r.below(lines.len());
                    lines.swap(i, j);
                }
            }
            *s = lines.join("\n");
        }
        5 => s.insert_str(at, TOML_SNIPPETS[r.below(TOML_SNIPPETS.len())]),
        // Cut: a range, or everything after a point.
        6 => {
            if r.one_in(3) {
                s.truncate(at);
            } else {
                let end = char_boundary(s, (at + r.below(40)).min(s.len()));
                s.replace_range(at..end, "");
            }
        }
        // Characters TOML cares about, and ones it should not.
        7 => {
            let c = *r.pick(&[
                '[', ']', '{', '}', '=', '"', '\'', ',', '.', '\n', '#', '\\', ' ', '\t', '\0',
                'é', '💥', '\u{feff}', '\u{7f}', '1', 'a',
            ]);
            s.insert(at, c);
        }
        // Duplicate a chunk elsewhere.
        8 => {
            let end = char_boundary(s, (at + r.below(80)).min(s.len()));
            let chunk = s[at..end].to_string();
            let to = char_boundary(s, r.below(s.len() + 1));
            s.insert_str(to, &chunk);
        }
        // A byte flip, kept only if the text stays UTF-8.
        _ => {
            let mut b = s.as_bytes().to_vec();
            let i = r.below(b.len());
            b[i] ^= 1 << r.below(8);
            if let Ok(t) = String::from_utf8(b) {
                *s = t;
            }
        }
    }
}

/// A config to try: a valid one with one to five mutations.
pub fn config_case(r: &mut Rng) -> String {
    let mut s = r.pick(&CONFIGS).to_string();
    for _ in 0..r.range(1, 6) {
        mutate_text(r, &mut s);
    }
    s
}

fn json_value(r: &mut Rng) -> Value {
    match r.below(24) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(0),
        3 => json!(-1),
        4 => json!(65535),
        5 => json!(65536),
        6 => json!(i64::MAX),
        7 => json!(u64::MAX),
        8 => json!(1.5),
        9 => json!(-0.0),
        10 => json!(1e300),
        11 => json!([]),
        12 => json!({}),
        13 => json!([1, "x", null]),
        14 => json!({"address": "127.0.0.1:1"}),
        15 => json!("x".repeat(r.range(0, 300))),
        _ => {
            // Strings that mean something somewhere.
            let s = *r.pick(&[
                "",
                " ",
                "0.0.0.0:443",
                "[::]:443",
                "127.0.0.1:0",
                "[::1]:65535",
                "1.2.3.4",
                "[fe80::1%eth0]:443",
                "[::ffff:10.0.0.1]:443",
                "224.0.0.1:443",
                "tcp",
                "udp",
                "sctp",
                "local",
                "nat",
                "dsr",
                "http",
                "https",
                "udp",
                "tcp",
                "active",
                "draining",
                "disabled",
                "2s",
                "500us",
                "0.5us",
                "1.5ms",
                "99999999999999999999s",
                "18446744073709551616ms",
                "0s",
                "/",
                "/a b",
                "a\r\nb",
                "é💥",
                "\u{0}",
            ]);
            json!(s)
        }
    }
}

const JSON_KEYS: [&str; 20] = [
    "name",
    "listen",
    "protocols",
    "forwarding",
    "health",
    "backends",
    "address",
    "weight",
    "state",
    "kind",
    "path",
    "host",
    "sni",
    "ca_file",
    "payload",
    "expect",
    "interval",
    "timeout",
    "rise",
    "fall",
];

/// Replaces, removes or adds one node somewhere in the tree.
fn mutate_json(r: &mut Rng, v: &mut Value, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() && (depth < 3 && !r.one_in(3)) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = r.pick(&keys).clone();
            match r.below(6) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert(r.pick(&JSON_KEYS).to_string(), json_value(r));
                }
                2 => {
                    m.insert("colour".into(), json_value(r));
                }
                _ => mutate_json(r, m.get_mut(&k).unwrap(), depth + 1),
            }
        }
        Value::Array(a) if !a.is_empty() && (depth < 3 && !r.one_in(3)) => {
            let i = r.below(a.len());
            match r.below(4) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let dup = a[i].clone();
                    a.push(dup);
                }
                _ => mutate_json(r, &mut a[i], depth + 1),
            }
        }
        _ => *v = json_value(r),
    }
}

/// A request body to try: a valid one, mutated as a tree and sometimes
/// as text.
pub fn body_case(r: &mut Rng) -> (Body, String) {
    let kind = Body::ALL[r.below(Body::ALL.len())];
    let mut v = r.pick(&bodies(kind)).clone();
    for _ in 0..r.range(1, 4) {
        mutate_json(r, &mut v, 0);
    }
    let mut text = v.to_string();
    if r.one_in(5) {
        mutate_text(r, &mut text);
    }
    (kind, text)
}
