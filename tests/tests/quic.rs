//! QUIC end to end: real quinn clients in one namespace, the `lb` daemon
//! (local forwarding) and quinn servers on ports of the balancer's
//! namespace, UDP 443. The servers issue QUIC-LB connection IDs with the
//! server ids the daemon shows; clients move to new local ports mid-transfer
//! and must keep their backend.
use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::Duration};

use rstest::rstest;

use lb_common::quic::{CidConfig, CidMode};
use lb_tests::{
    netns::Topology,
    quic::{Cids, LbCids, PLAINTEXT_TOML, QuicClient, QuicConn, QuicServer, Who, plaintext_config},
    topology::{self, LogOnPanic, NsRuntime, ServiceConf, Site, server_ids},
};

/// One test at a time: each measures shares or survival on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    lb_tests::require_root();
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The QUIC pieces alone, client straight to server in one namespace: a
/// transfer survives the client's move to a new port, and the server sees
/// the new port, with quinn's CIDs and with QUIC-LB ones.
#[rstest]
#[case::random_cids(false)]
#[case::quic_lb_cids(true)]
fn quinn_alone_survives_a_rebind_mid_transfer(#[case] lb_cids: bool) {
    let _serial = serial();
    let mut topo = Topology::new();
    let ns = topo.namespace("quic");
    let rt = NsRuntime::new(&ns, 2);
    let pki = lb_tests::https::Pki::new();
    let identity = pki.issue("backend-9001.test");
    let generator = LbCids::new(plaintext_config(), &[0x12, 0x34]).unwrap();
    let server = QuicServer::start(
        &rt,
        "127.0.0.1:9001".parse().unwrap(),
        &identity,
        if lb_cids {
            Cids::Lb(generator.clone())
        } else {
            Cids::Random
        },
    );
    let client = QuicClient::new(&pki);
    let to = server.addr;
    let (before, after, first_port, moved_port) = rt.run(async move {
        let conn = client.connect(to).await.unwrap();
        let before = conn.who().await.unwrap();
        let first_port = conn.local_port();
        tokio::time::timeout(
            Duration::from_secs(10),
            conn.fetch(1 << 20, Some(128 << 10)),
        )
        .await
        .expect("the transfer ends")
        .unwrap();
        let moved_port = conn.local_port();
        let after = conn.who().await.unwrap();
        (before, after, first_port, moved_port)
    });
    assert_eq!(before.name, "backend-9001.test");
    assert_eq!(before.port, first_port);
    assert_ne!(moved_port, first_port, "the client did not move");
    assert_eq!(after.name, before.name);
    assert_eq!(after.port, moved_port, "the server did not see the move");
    let stats = server.stats();
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert_eq!(stats.migrated, 1, "{stats:?}");
    assert_eq!(stats.requests, 3, "{stats:?}");
    // The handshake's CID and the spares quinn offers: all QUIC-LB ones.
    assert_eq!(generator.issued() > 1, lb_cids, "{}", generator.issued());
}

/// Bytes each migrating connection reads, and after how many it moves.
const FETCH: usize = 512 << 10;
const REBIND_AFTER: usize = 64 << 10;
/// Longest a connection may take to move and answer (a broken one ends in
/// the idle timeout, 3 s).
const MOVE_LIMIT: Duration = Duration::from_secs(15);

/// How the servers make their CIDs and the balancer reads them.
#[derive(Clone, Copy, Debug)]
enum Scheme {
    /// Config id 1, a 2-byte server id, an 8-byte nonce, in the clear.
    Plaintext,
    /// The same lengths, encrypted: the draft's four-pass scheme.
    FourPass,
    /// A 4-byte server id and a 12-byte nonce, encrypted: one AES block.
    SinglePass,
}

/// The AES key of the encrypted schemes.
const KEY: [u8; 16] = *b"lb-e2e-quic-key!";

impl Scheme {
    fn config(self) -> CidConfig {
        let (server_id_len, nonce_len, mode) = match self {
            Scheme::Plaintext => return plaintext_config(),
            Scheme::FourPass => (2, 8, CidMode::Encrypted),
            Scheme::SinglePass => (4, 12, CidMode::Encrypted),
        };
        CidConfig {
            config_id: 1,
            server_id_len,
            nonce_len,
            mode,
            key: KEY,
        }
    }

    /// The service's `quic` table; an encrypted one's key file is written
    /// to the site's scratch directory.
    fn toml(self, site: &Site) -> String {
        let c = self.config();
        if c.mode == CidMode::Plaintext {
            return PLAINTEXT_TOML.to_string();
        }
        let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
        let key = site.dir.secret("quic.key", &format!("{hex}\n"));
        format!(
            "{{ config_id = {}, server_id_len = {}, nonce_len = {}, mode = \"encrypted\", \
             key_file = {:?} }}",
            c.config_id,
            c.server_id_len,
            c.nonce_len,
            key.display().to_string()
        )
    }
}

/// Service `web`: UDP 443 to `weights` (port, weight), with QUIC-LB when
/// `quic` (a `quic` table) is given.
fn service(weights: &[(u16, u16)], quic: Option<String>) -> ServiceConf {
    let mut svc = ServiceConf::tcp(weights);
    svc.protocols = vec!["udp"];
    svc.quic = quic;
    svc
}

/// A QUIC server on `0.0.0.0:port` of the balancer's namespace, named
/// `backend-<port>.test`, issuing plaintext CIDs with `server_id`.
fn quic_backend(site: &Site, port: u16, server_id: &[u8]) -> QuicServer {
    quic_backend_with(site, port, plaintext_config(), server_id)
}

/// [`quic_backend`] with CIDs of `config`.
fn quic_backend_with(site: &Site, port: u16, config: CidConfig, server_id: &[u8]) -> QuicServer {
    quic_backend_on(
        site,
        SocketAddr::from(([0, 0, 0, 0], port)),
        config,
        server_id,
    )
}

/// [`quic_backend_with`] bound to `addr`.
fn quic_backend_on(
    site: &Site,
    addr: SocketAddr,
    config: CidConfig,
    server_id: &[u8],
) -> QuicServer {
    let identity = site.pki.issue(&Site::backend_name(addr.port()));
    let cids = LbCids::new(config, server_id).expect("a valid server id");
    QuicServer::start(&site.servers, addr, &identity, Cids::Lb(cids))
}

/// `n` new connections to the service, `at_once` at a time, each asked who
/// serves it. Panics on a failed handshake or answer.
fn connect(site: &Site, client: &QuicClient, n: usize, at_once: usize) -> Vec<(QuicConn, Who)> {
    connect_to(site, site.v4(), client, n, at_once)
}

/// [`connect`] to `to` (the service's IPv4 or IPv6 address).
fn connect_to(
    site: &Site,
    to: SocketAddr,
    client: &QuicClient,
    n: usize,
    at_once: usize,
) -> Vec<(QuicConn, Who)> {
    let client = client.clone();
    site.client.run(async move {
        let mut out = Vec::new();
        let mut i = 0;
        while i < n {
            let batch: Vec<_> = (i..n.min(i + at_once))
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let conn =
                            tokio::time::timeout(Duration::from_secs(10), client.connect(to))
                                .await
                                .expect("a handshake within 10 s")
                                .expect("a handshake");
                        let who = conn.who().await.expect("an answer to who");
                        assert_eq!(who.port, conn.local_port(), "the server sees another port");
                        (conn, who)
                    })
                })
                .collect();
            for t in batch {
                out.push(t.await.unwrap());
            }
            i += at_once;
        }
        out
    })
}

/// How one connection fared through its move (the reasons are read through
/// `Debug`, in failure messages).
#[derive(Debug)]
#[allow(dead_code)]
enum Moved {
    /// Transfer done, and the same server answered from the new port.
    Kept,
    /// Another server answered (the connection was not the one moved).
    Other(String),
    Broke(String),
}

/// Every connection reads [`FETCH`] bytes, moves to a new local port after
/// [`REBIND_AFTER`] of them, and asks who serves it: all at once.
fn migrate(site: &Site, conns: Vec<(QuicConn, Who)>) -> Vec<(QuicConn, Who, Moved)> {
    site.client.run(async move {
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|(conn, who)| {
                tokio::spawn(async move {
                    let first_port = conn.local_port();
                    let moved = tokio::time::timeout(MOVE_LIMIT, async {
                        conn.fetch(FETCH, Some(REBIND_AFTER)).await?;
                        conn.who().await
                    })
                    .await;
                    let outcome = match moved {
                        Err(_) => Moved::Broke(format!("still moving after {MOVE_LIMIT:?}")),
                        Ok(Err(e)) => Moved::Broke(format!("{e:#}")),
                        Ok(Ok(now)) if now.name != who.name => Moved::Other(now.name),
                        Ok(Ok(now)) => {
                            assert_ne!(conn.local_port(), first_port, "the client did not move");
                            assert_eq!(now.port, conn.local_port(), "the server missed the move");
                            Moved::Kept
                        }
                    };
                    (conn, who, outcome)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

/// `lb_quic_packets_total{service="web",route}` (None: no such series).
fn quic_packets(lb: &lb_tests::daemon::Lb, route: &str) -> Option<u64> {
    let labels = vec![
        ("route".to_string(), route.to_string()),
        ("service".to_string(), "web".to_string()),
    ];
    topology::Metrics::scrape(lb)
        .0
        .get(&("lb_quic_packets_total".to_string(), labels))
        .map(|v| *v as u64)
}

fn count_by_name(conns: &[(QuicConn, Who)]) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for (_, who) in conns {
        *by.entry(who.name.clone()).or_default() += 1;
    }
    by
}

/// (1) New QUIC connections on UDP 443 follow the weights 1:2:1.
#[test]
fn quic_connections_follow_the_weights() {
    let _serial = serial();
    let site = Site::new("quic-weights");
    let weights = [(8001, 100), (8002, 200), (8003, 100)];
    let lb = site.start_lb(&service(&weights, Some(PLAINTEXT_TOML.into())));
    let _log = LogOnPanic(&lb);
    let ids = server_ids(&lb);
    let _servers: Vec<QuicServer> = weights
        .iter()
        .map(|&(p, _)| quic_backend(&site, p, &ids[&p]))
        .collect();
    let client = QuicClient::new(&site.pki);

    // 300 connections, one stream each: 75/150/75 expected, a standard
    // deviation of 7.5/8.7/7.5; equal shares would put 100 on 8002.
    const N: usize = 300;
    let conns = connect(&site, &client, N, 20);
    let by = count_by_name(&conns);
    println!("connections per backend: {by:?}");
    let total_weight: usize = weights.iter().map(|&(_, w)| usize::from(w)).sum();
    for (port, w) in weights {
        let want = N * usize::from(w) / total_weight;
        let got = by.get(&Site::backend_name(port)).copied().unwrap_or(0);
        assert!(
            got.abs_diff(want) <= 30,
            "backend {port} (weight {w}) took {got} of {N} connections, want {want} ± 30: {by:?}"
        );
    }
    assert_eq!(by.values().sum::<usize>(), N);
}

/// (2) 50 connections each move to a new local port mid-transfer. With
/// QUIC-LB every one keeps its server; with the same service balanced by
/// the 4-tuple only, a move lands on another server (which drops the
/// foreign CID's packets) unless the new port hashes to the old one.
/// The same with encrypted CIDs (both AES schemes of the draft), and
/// with the program attached at TC ingress (plaintext: that program has no
/// decryption).
#[rstest]
#[case::plaintext("native", Some(Scheme::Plaintext))]
#[case::four_pass("native", Some(Scheme::FourPass))]
#[case::single_pass("native", Some(Scheme::SinglePass))]
#[case::tc_plaintext("tc", Some(Scheme::Plaintext))]
#[case::four_tuple_only("native", None)]
fn connections_keep_their_backend_through_a_migration(
    #[case] mode: &'static str,
    #[case] scheme: Option<Scheme>,
) {
    let _serial = serial();
    let cid_routing = scheme.is_some();
    let tag = scheme.map_or("off".to_string(), |s| format!("{s:?}").to_lowercase());
    let site = Site::with_mode(&format!("quic-move-{tag}"), mode);
    let weights = [(8001, 100), (8002, 100), (8003, 100)];
    let lb = site.start_lb(&service(&weights, scheme.map(|s| s.toml(&site))));
    let _log = LogOnPanic(&lb);
    // Without QUIC-LB the daemon assigns no ids; the servers issue QUIC-LB
    // CIDs all the same, so only the balancer differs between the cases.
    let ids = if cid_routing {
        server_ids(&lb)
    } else {
        weights
            .iter()
            .map(|&(p, _)| (p, p.to_be_bytes().to_vec()))
            .collect()
    };
    let config = scheme.unwrap_or(Scheme::Plaintext).config();
    let servers: Vec<QuicServer> = weights
        .iter()
        .map(|&(p, _)| quic_backend_with(&site, p, config, &ids[&p]))
        .collect();
    let client = QuicClient::new(&site.pki);

    const N: usize = 50;
    let conns = connect(&site, &client, N, 10);
    let by = count_by_name(&conns);
    assert!(by.len() >= 2, "all connections on one backend: {by:?}");
    let by_cid_before = quic_packets(&lb, "cid");
    let moved = migrate(&site, conns);
    let kept = moved
        .iter()
        .filter(|(_, _, m)| matches!(m, Moved::Kept))
        .count();
    let broke: Vec<&Moved> = moved
        .iter()
        .map(|(_, _, m)| m)
        .filter(|m| !matches!(m, Moved::Kept))
        .collect();
    println!(
        "{mode} {scheme:?}: {kept} of {N} connections kept their backend through a \
         move; {} broke (first: {:?})",
        broke.len(),
        broke.first()
    );
    // A server sees the new port of exactly the connections that kept it.
    let migrated: u64 = servers.iter().map(|s| s.stats().migrated).sum();
    assert_eq!(migrated, kept as u64, "the servers saw {migrated} moves");
    let by_cid = quic_packets(&lb, "cid");
    println!("packets routed by CID: {by_cid_before:?} before the moves, {by_cid:?} after");
    if cid_routing {
        assert_eq!(kept, N, "connections lost in the move: {broke:?}");
        // Short-header packets (most of the transfer) went by their CID.
        let moved_by_cid = by_cid.unwrap() - by_cid_before.unwrap();
        assert!(
            moved_by_cid >= N as u64 * 10,
            "{moved_by_cid} packets by CID"
        );
    } else {
        assert_eq!(by_cid, None, "a service without quic has no QUIC counters");
        // Equal weights: a move stays on its server with odds 1/3, so 33
        // of 50 break on average (standard deviation 3.3).
        assert!(
            broke.len() >= 15,
            "only {} of {N} broke without CID routing: {broke:?}",
            broke.len()
        );
    }
}

/// Over IPv6 too: `web6` on `[::]:443` with the same backends, each with a
/// configured server id (one id per server for both services); servers on
/// `[::]:port` take both families.
#[test]
fn ipv6_connections_keep_their_backend_through_a_migration() {
    let _serial = serial();
    let site = Site::new("quic-move-v6");
    let mut svc = service(
        &[(8001, 100), (8002, 100), (8003, 100)],
        Some(PLAINTEXT_TOML.into()),
    );
    let ids: [&'static str; 3] = ["0a01", "0a02", "0a03"];
    for (b, id) in svc.backends.iter_mut().zip(ids) {
        b.server_id = Some(id);
    }
    let lb = site.start_lb_dual(&svc);
    let _log = LogOnPanic(&lb);
    let shown = server_ids(&lb);
    assert_eq!(shown[&8002], [0x0a, 0x02], "{shown:?}");
    let servers: Vec<QuicServer> = [8001u16, 8002, 8003]
        .iter()
        .map(|&p| {
            let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, p));
            quic_backend_on(&site, addr, plaintext_config(), &shown[&p])
        })
        .collect();
    let client = QuicClient::new(&site.pki);
    const N: usize = 24;
    let conns = connect_to(&site, site.v6(), &client, N, 12);
    let by = count_by_name(&conns);
    assert!(by.len() >= 2, "all connections on one backend: {by:?}");
    let moved = migrate(&site, conns);
    for (_, who, m) in &moved {
        assert!(matches!(m, Moved::Kept), "{}: {m:?}", who.name);
    }
    let migrated: u64 = servers.iter().map(|s| s.stats().migrated).sum();
    assert_eq!(migrated, N as u64);
    let labels = vec![
        ("route".to_string(), "cid".to_string()),
        ("service".to_string(), "web6".to_string()),
    ];
    let by_cid = topology::Metrics::scrape(&lb)
        .0
        .get(&("lb_quic_packets_total".to_string(), labels))
        .copied()
        .unwrap_or(0.0);
    assert!(by_cid >= (N * 10) as f64, "web6: {by_cid} packets by CID");
}

/// The ids the API shows are the ones the servers must use: the daemon
/// assigns distinct ids of `server_id_len` bytes and keeps a configured
/// one; servers that swap theirs lose every connection right after the
/// handshake (the handshake's long headers go by the 4-tuple, the first
/// short header by its CID to the id's owner, which drops it).
#[test]
fn servers_must_issue_the_server_ids_the_api_shows() {
    let _serial = serial();
    let site = Site::new("quic-ids");
    let mut svc = service(
        &[(8001, 100), (8002, 100), (8003, 100)],
        Some(PLAINTEXT_TOML.into()),
    );
    svc.backends[2].server_id = Some("beef");
    let lb = site.start_lb(&svc);
    let _log = LogOnPanic(&lb);
    let ids = server_ids(&lb);
    assert_eq!(ids[&8003], [0xbe, 0xef], "the configured id: {ids:?}");
    for (port, id) in &ids {
        assert_eq!(id.len(), 2, "backend {port}: {id:02x?}");
    }
    let distinct: std::collections::HashSet<&Vec<u8>> = ids.values().collect();
    assert_eq!(distinct.len(), 3, "ids not unique: {ids:?}");

    // 8001 and 8002 swap their ids; 8003 keeps its own.
    let servers = [
        quic_backend(&site, 8001, &ids[&8002]),
        quic_backend(&site, 8002, &ids[&8001]),
        quic_backend(&site, 8003, &ids[&8003]),
    ];
    let client = QuicClient::new(&site.pki);
    let to = site.v4();
    const N: usize = 24;
    let answers: Vec<Option<String>> = site.client.run(async move {
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let conn = client.connect(to).await.ok()?;
                    let who = conn.who().await.ok()?;
                    Some(who.name)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let stats: Vec<_> = servers
        .iter()
        .map(|s| (s.name.clone(), s.stats()))
        .collect();
    println!("answers: {answers:?}\nservers: {stats:?}");
    for (name, st) in &stats {
        assert!(st.connections > 0, "no handshake reached {name}: {stats:?}");
        if *name == Site::backend_name(8003) {
            assert_eq!(
                st.requests, st.connections,
                "{name} uses its own id: {stats:?}"
            );
        } else {
            assert_eq!(st.requests, 0, "{name} uses another's id: {stats:?}");
        }
    }
    let answered: Vec<&String> = answers.iter().flatten().collect();
    assert_eq!(answered.len() as u64, stats[2].1.connections, "{answers:?}");
    assert!(answered.iter().all(|n| **n == Site::backend_name(8003)));
}

/// (3) A backend joins and one leaves while connections are open: those on
/// the other backends keep them through a move after the change, and the
/// new backend's connections (with the id the daemon gave it) move too.
#[test]
fn a_backend_change_keeps_the_others_connections_through_a_migration() {
    let _serial = serial();
    let site = Site::new("quic-change");
    let weights = [(8001, 100), (8002, 100), (8003, 100)];
    let lb = site.start_lb(&service(&weights, Some(PLAINTEXT_TOML.into())));
    let _log = LogOnPanic(&lb);
    let ids = server_ids(&lb);
    let mut servers: HashMap<u16, QuicServer> = weights
        .iter()
        .map(|&(p, _)| (p, quic_backend(&site, p, &ids[&p])))
        .collect();
    let client = QuicClient::new(&site.pki);
    let conns = connect(&site, &client, 30, 10);

    topology::change(
        &lb,
        "DELETE",
        "/api/v1/services/web/backends/127.0.0.1:8003",
        None,
        204,
    );
    servers.remove(&8003);
    topology::change(
        &lb,
        "POST",
        "/api/v1/services/web/backends",
        Some(r#"{"address": "127.0.0.1:8004", "weight": 100}"#),
        201,
    );
    let ids = server_ids(&lb);
    assert!(!ids.contains_key(&8003), "{ids:?}");
    servers.insert(8004, quic_backend(&site, 8004, &ids[&8004]));

    // The connections of the backends that stayed move, and stay.
    let gone = Site::backend_name(8003);
    let (stay, _lost): (Vec<_>, Vec<_>) = conns.into_iter().partition(|(_, w)| w.name != gone);
    assert!(!stay.is_empty());
    for (_, who, m) in &migrate(&site, stay) {
        assert!(matches!(m, Moved::Kept), "{}: {m:?}", who.name);
    }
    // New connections reach the new backend, never the removed one, and
    // they move too.
    let fresh = connect(&site, &client, 30, 10);
    let by = count_by_name(&fresh);
    assert!(!by.contains_key(&gone), "{by:?}");
    assert!(by.contains_key(&Site::backend_name(8004)), "{by:?}");
    for (_, who, m) in &migrate(&site, fresh) {
        assert!(matches!(m, Moved::Kept), "{}: {m:?}", who.name);
    }
}
