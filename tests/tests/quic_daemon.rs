//! QUIC-LB through the real daemon: a `quic` service in the config file,
//! server ids configured or assigned (shown by the API, kept across a
//! restart that reorders the backends), UDP datagrams with short-header
//! CIDs reaching the backend they name from any client port over a veth,
//! the API refusing bad server ids, and the counters in `/metrics`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::UdpSocket,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_common::quic::{CidConfig, CidMode};
use lb_tests::{
    daemon::{Lb, TempDir},
    netns::{self, Topology},
};

const API: &str = "127.0.0.1:9180";

struct Setup {
    _topo: Topology,
    lb_ns: String,
    client_ns: String,
    dir: TempDir,
}

fn setup(tag: &str) -> Setup {
    let mut topo = Topology::new();
    let (lb_ns, client_ns) = topo.lb_and_client(202);
    Setup {
        _topo: topo,
        lb_ns,
        client_ns,
        dir: TempDir::new(tag),
    }
}

/// A UDP server in a namespace that answers every datagram with its name.
struct UdpName {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpName {
    fn start(ns: &str, port: u16, name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), name.to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = netns::spawn_in(ns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(name.as_bytes(), peer);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for UdpName {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Setup {
    fn config(&self, backends: &[(u16, Option<&str>)]) -> PathBuf {
        self.config_with(
            "quic = { config_id = 2, server_id_len = 2, nonce_len = 8 }",
            backends,
        )
    }

    fn config_with(&self, quic: &str, backends: &[(u16, Option<&str>)]) -> PathBuf {
        let backends: Vec<String> = backends
            .iter()
            .map(|(p, id)| match id {
                Some(id) => format!("{{ address = \"127.0.0.1:{p}\", server_id = \"{id}\" }}"),
                None => format!("{{ address = \"127.0.0.1:{p}\" }}"),
            })
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
state_file = {state:?}

[[services]]
name = "h3"
listen = "0.0.0.0:443"
protocols = ["udp"]
{quic}
backends = [{backends}]
"#,
            state = self.dir.path("state.json").display().to_string(),
            backends = backends.join(", "),
        );
        let path = self.dir.path("lb.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Sends one short-header packet carrying a CID for `server_id` from a
    /// fresh client socket (a new source port each time); the name of the
    /// backend that answered, from the service's address and port.
    fn ask(&self, server_id: Vec<u8>, n: u8) -> Result<String, String> {
        let cfg = CidConfig {
            config_id: 2,
            server_id_len: 2,
            nonce_len: 8,
            mode: CidMode::Plaintext,
            key: [0; 16],
        };
        self.ask_with(cfg, server_id, n)
    }

    fn ask_with(&self, cfg: CidConfig, server_id: Vec<u8>, n: u8) -> Result<String, String> {
        netns::within(&self.client_ns, move || {
            let nonce = vec![n; usize::from(cfg.nonce_len)];
            let mut cid = [0u8; 20];
            let len = cfg.encode(&server_id, &nonce, &mut cid).unwrap();
            let mut pkt = vec![0x40];
            pkt.extend_from_slice(&cid[..len]);
            pkt.extend_from_slice(&[0x33; 24]);
            let sock = UdpSocket::bind("10.202.0.2:0").map_err(|e| e.to_string())?;
            sock.connect("10.202.0.1:443").map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sock.send(&pkt).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let got = sock.recv(&mut buf).map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&buf[..got]).into_owned())
        })
    }
}

/// Server id (hex) by backend address, as the API shows them.
fn server_ids(lb: &Lb) -> BTreeMap<String, String> {
    let (status, v) = lb.get("/api/v1/services/h3");
    assert_eq!(status, 200, "{v}");
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["server_id"]
                    .as_str()
                    .expect("every backend shows its server id")
                    .to_string(),
            )
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn the_daemon_assigns_keeps_and_routes_by_server_ids() {
    let s = setup("quic-daemon");
    let _servers: Vec<UdpName> = [8001, 8002, 8003, 8004]
        .iter()
        .map(|p| UdpName::start(&s.lb_ns, *p, &format!("b{p}")))
        .collect();
    let cfg = s.config(&[(8001, Some("0a01")), (8002, None), (8003, None)]);
    let mut lb = Lb::start(&s.lb_ns, &cfg, API, &[]);
    let ids = server_ids(&lb);
    assert_eq!(ids["127.0.0.1:8001"], "0a01");
    let unique: BTreeSet<&String> = ids.values().collect();
    assert_eq!(unique.len(), 3, "{ids:?}");
    assert!(ids.values().all(|id| id.len() == 4), "{ids:?}");
    let (_, v) = lb.get("/api/v1/services/h3");
    assert_eq!(v["quic"]["config_id"], 2);
    assert_eq!(v["quic"]["mode"], "plaintext");
    // The OpenAPI document describes them.
    let (_, doc) = lb.get("/api/v1/openapi.json");
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("Quic", "server_id_len"),
        ("Service", "quic"),
        ("Backend", "server_id"),
        ("ServiceView", "quic"),
        ("BackendView", "server_id"),
        ("ServiceStats", "quic_packets"),
    ] {
        assert!(
            schemas[schema]["properties"][field].is_object(),
            "{schema}.{field} in {}",
            schemas[schema]
        );
    }

    // Every client port reaches the backend its CID names.
    let mut sent = 0u64;
    for (addr, id) in &ids {
        let want = format!("b{}", addr.rsplit(':').next().unwrap());
        for n in 0..15 {
            assert_eq!(s.ask(hex(id), n), Ok(want.clone()), "server id {id}");
            sent += 1;
        }
    }
    let (_, text) = lb.raw("GET", "/metrics", None, None);
    let line = format!("lb_quic_packets_total{{route=\"cid\",service=\"h3\"}} {sent}");
    assert!(text.contains(&line), "{line} not in:\n{text}");
    let (_, stats) = lb.get("/api/v1/stats");
    assert_eq!(stats["services"][0]["quic_packets"]["cid"], sent);
    let status = lb.cli(&["status"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains("QUIC-LB: config id 2") && out.contains("server id 0a01"),
        "{out}"
    );

    // The API checks server ids as the file does; nothing changes on 400.
    for (body, why) in [
        (
            r#"{"address": "127.0.0.1:8004", "server_id": "0a01"}"#,
            "also backends[0]",
        ),
        (
            r#"{"address": "127.0.0.1:8004", "server_id": "0a"}"#,
            "server_id_len is 2",
        ),
        (
            r#"{"address": "127.0.0.1:8004", "server_id": "xyz1"}"#,
            "hex",
        ),
    ] {
        let (status, v) = lb.call("POST", "/api/v1/services/h3/backends", Some(body), None);
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v.to_string().contains(why), "{body}: {v}");
    }
    assert_eq!(server_ids(&lb), ids);
    // A backend added without one gets a free id.
    let (status, v) = lb.call(
        "POST",
        "/api/v1/services/h3/backends",
        Some(r#"{"address": "127.0.0.1:8004"}"#),
        None,
    );
    assert_eq!(status, 201, "{v}");
    let added = v["server_id"].as_str().unwrap().to_string();
    assert!(!unique.contains(&added), "{added} is taken");
    assert_eq!(s.ask(hex(&added), 1), Ok("b8004".into()));
    lb.stop();

    // A restart with a backend listed first keeps every assigned id (the
    // state file holds them); the new backend gets one nobody holds.
    let cfg = s.config(&[
        (8004, None),
        (8001, Some("0a01")),
        (8002, None),
        (8003, None),
    ]);
    let lb = Lb::start(&s.lb_ns, &cfg, API, &[]);
    let after = server_ids(&lb);
    for (addr, id) in &ids {
        assert_eq!(&after[addr], id, "{addr} kept its server id");
    }
    let fresh = &after["127.0.0.1:8004"];
    assert!(!unique.contains(fresh), "{fresh} is taken");
    for (addr, id) in &after {
        let want = format!("b{}", addr.rsplit(':').next().unwrap());
        assert_eq!(s.ask(hex(id), 9), Ok(want), "after restart, {addr}");
    }
}

/// Encrypted CIDs through the daemon: the key from its file, the server
/// ids the daemon assigned, decrypted by the kernel program (four passes
/// here: 3-byte server id, 4-byte nonce; then single pass, 8 + 8).
#[test]
fn encrypted_cids_reach_their_backend_through_the_daemon() {
    let s = setup("quic-daemon-enc");
    let _servers: Vec<UdpName> = [8001, 8002, 8003]
        .iter()
        .map(|p| UdpName::start(&s.lb_ns, *p, &format!("b{p}")))
        .collect();
    let key_hex = "8f95f09245765f80256934e50c66207f";
    let key_file = s.dir.secret("quic.key", &format!("{key_hex}\n"));
    let key: [u8; 16] = hex(key_hex).try_into().unwrap();
    for (sid_len, nonce_len) in [(3u8, 4u8), (8, 8)] {
        let quic = format!(
            "quic = {{ config_id = 2, server_id_len = {sid_len}, nonce_len = {nonce_len}, \
             mode = \"encrypted\", key_file = {:?} }}",
            key_file.display().to_string()
        );
        let cfg = s.config_with(&quic, &[(8001, None), (8002, None), (8003, None)]);
        let mut lb = Lb::start(&s.lb_ns, &cfg, API, &[]);
        let (_, v) = lb.get("/api/v1/services/h3");
        assert_eq!(v["quic"]["mode"], "encrypted");
        let cid = CidConfig {
            config_id: 2,
            server_id_len: sid_len,
            nonce_len,
            mode: CidMode::Encrypted,
            key,
        };
        let ids = server_ids(&lb);
        for (addr, id) in &ids {
            assert_eq!(id.len(), 2 * usize::from(sid_len));
            let want = format!("b{}", addr.rsplit(':').next().unwrap());
            for n in 0..10 {
                assert_eq!(
                    s.ask_with(cid, hex(id), n),
                    Ok(want.clone()),
                    "{sid_len}+{nonce_len}: {id}"
                );
            }
        }
        let (_, stats) = lb.get("/api/v1/stats");
        assert_eq!(stats["services"][0]["quic_packets"]["cid"], 30, "{stats}");
        if sid_len == 8 {
            // A new key in the same file: `lb reload` applies it.
            let new_hex = "000102030405060708090a0b0c0d0e0f";
            std::fs::write(&key_file, format!("{new_hex}\n")).unwrap();
            let out = lb.cli(&["reload"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let rekeyed = CidConfig {
                key: hex(new_hex).try_into().unwrap(),
                ..cid
            };
            for (addr, id) in &ids {
                let want = format!("b{}", addr.rsplit(':').next().unwrap());
                for n in 0..10 {
                    assert_eq!(
                        s.ask_with(rekeyed, hex(id), n),
                        Ok(want.clone()),
                        "new key: {id}"
                    );
                }
            }
            // The old key's CIDs no longer name a server: the 4-tuple.
            let id = ids.values().next().unwrap();
            for n in 0..5 {
                assert!(s.ask_with(cid, hex(id), n).is_ok());
            }
            let (_, stats) = lb.get("/api/v1/stats");
            let q = &stats["services"][0]["quic_packets"];
            assert_eq!(q["cid"], 60, "{stats}");
            assert_eq!(q["unknown_server_id"], 5, "{stats}");
        }
        // The next round reads a state file of another server id length.
        lb.stop();
    }
}
