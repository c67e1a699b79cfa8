//! QUIC end to end: real quinn clients in one namespace, the `lb` daemon
//! (local forwarding) and quinn servers on ports of the balancer's
//! namespace, UDP 443. The servers issue QUIC-LB connection IDs with the
//! server ids the daemon shows; clients move to new local ports mid-transfer
//! and must keep their backend.
use std::{sync::Mutex, time::Duration};

use rstest::rstest;

use lb_common::quic::{CidConfig, CidMode};
use lb_tests::{
    netns::Topology,
    quic::{Cids, LbCids, QuicClient, QuicServer},
    topology::NsRuntime,
};

/// One test at a time: each measures shares or survival on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    lb_tests::require_root();
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A QUIC-LB configuration of the tests (plaintext).
fn plaintext() -> CidConfig {
    CidConfig {
        config_id: 1,
        server_id_len: 2,
        nonce_len: 8,
        mode: CidMode::Plaintext,
        key: [0; 16],
    }
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
    let generator = LbCids::new(plaintext(), &[0x12, 0x34]).unwrap();
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
