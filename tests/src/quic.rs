//! Real QUIC (quinn) for the tests and the demo: a server whose connection
//! IDs can carry its QUIC-LB server id, and client connections that move to
//! a new local UDP port mid-transfer, as a NAT rebinding does.
//!
//! The protocol, one request per bidirectional stream (the client finishes
//! its side after the request): `who` is answered with `<name> <port>`, the
//! server's name and the client port it sees; `bytes <n>` with `n` bytes.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use lb_common::quic::{CidConfig, CidError, MAX_CID_LEN, MAX_NONCE_LEN};
use quinn::{
    ConnectionIdGenerator,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use quinn_proto::InvalidCid;
use rand::Rng as _;

use crate::{
    https::{Identity, Pki, SERVICE_NAME},
    topology::NsRuntime,
};

/// The ALPN both sides insist on.
pub const ALPN: &[u8] = b"lbt-quic";
/// Idle timeout of both sides: a connection whose path broke ends within
/// this, unless a stateless reset ends it sooner.
pub const IDLE: Duration = Duration::from_secs(3);
/// The client's per-stream receive window: small, so a long transfer needs
/// the client's flow-control updates all along (a transfer cannot be over
/// before the client moves).
const STREAM_WINDOW: u32 = 32 * 1024;
/// Longest request a server reads.
const MAX_REQUEST: usize = 64;

/// The QUIC-LB configuration of the tests and the demo: config id 1, a
/// 2-byte server id, an 8-byte nonce, plaintext.
pub fn plaintext_config() -> CidConfig {
    CidConfig {
        config_id: 1,
        server_id_len: 2,
        nonce_len: 8,
        mode: lb_common::quic::CidMode::Plaintext,
        key: [0; 16],
    }
}

/// [`plaintext_config`] as a service's `quic` table in the daemon's config.
pub const PLAINTEXT_TOML: &str =
    r#"{ config_id = 1, server_id_len = 2, nonce_len = 8, mode = "plaintext" }"#;

/// How a server makes its connection IDs.
#[derive(Clone)]
pub enum Cids {
    /// quinn's default: random bytes that tell a balancer nothing.
    Random,
    /// QUIC-LB: every CID carries this server id under this configuration.
    Lb(LbCids),
}

/// A quinn connection-ID generator for QUIC-LB: each CID is
/// `CidConfig::encode` of the server's id and a fresh random nonce.
#[derive(Clone, Debug)]
pub struct LbCids {
    config: CidConfig,
    server_id: Vec<u8>,
    /// CIDs handed to quinn, over every clone.
    issued: Arc<AtomicU64>,
}

impl LbCids {
    /// Fails if the configuration or the server id's length is not one
    /// QUIC-LB allows.
    pub fn new(config: CidConfig, server_id: &[u8]) -> Result<LbCids, CidError> {
        let cids = LbCids {
            config,
            server_id: server_id.to_vec(),
            issued: Arc::default(),
        };
        // One CID now, so a bad configuration fails here, not in quinn.
        cids.make()?;
        Ok(cids)
    }

    fn make(&self) -> Result<quinn::ConnectionId, CidError> {
        let mut nonce = [0u8; MAX_NONCE_LEN as usize];
        let nonce = &mut nonce[..usize::from(self.config.nonce_len)];
        rand::rng().fill_bytes(nonce);
        let mut out = [0u8; MAX_CID_LEN];
        let n = self.config.encode(&self.server_id, nonce, &mut out)?;
        Ok(quinn::ConnectionId::new(&out[..n]))
    }

    /// How many CIDs quinn took from this generator (and its clones).
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }

    /// The server id `cid` carries under this configuration.
    pub fn server_id_of(&self, cid: &[u8]) -> Result<Vec<u8>, CidError> {
        let mut sid = vec![0u8; usize::from(self.config.server_id_len)];
        self.config.decode(cid, &mut sid)?;
        Ok(sid)
    }
}

impl ConnectionIdGenerator for LbCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        self.issued.fetch_add(1, Ordering::Relaxed);
        // `new` made one already with the same configuration and id.
        self.make().expect("a QUIC-LB CID")
    }

    /// A CID that does not decode to this server's id was not made here:
    /// quinn drops its packet without a stateless reset.
    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), InvalidCid> {
        match self.server_id_of(cid) {
            Ok(sid) if sid == self.server_id => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.config.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Transport settings of both sides.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(IDLE.try_into().expect("a valid idle timeout")));
    t
}

/// What a [`QuicServer`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicStats {
    /// Handshakes completed.
    pub connections: u64,
    /// Requests received (a stream's request read in full).
    pub requests: u64,
    /// Connections that received a request from a second client address.
    pub migrated: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    migrated: AtomicU64,
}

/// A QUIC server on `addr` in the namespace of a runtime. Closed on drop.
pub struct QuicServer {
    pub name: String,
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
    counters: Arc<Counters>,
}

impl QuicServer {
    /// Binds `addr` and serves the module's protocol with `identity`'s
    /// certificate, issuing connection IDs as `cids` says.
    pub fn start(rt: &NsRuntime, addr: SocketAddr, identity: &Identity, cids: Cids) -> QuicServer {
        let name = identity.name.clone();
        let crypto = QuicServerConfig::try_from(identity.tls13_server_config(ALPN))
            .expect("a QUIC server TLS config");
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport()));
        let config = endpoint_config(cids);
        let endpoint = rt
            .run(async move {
                let socket = StdUdpSocket::bind(addr)?;
                quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
            })
            .unwrap_or_else(|e| panic!("QUIC server {name} cannot listen on {addr}: {e}"));
        let counters = Arc::new(Counters::default());
        let (ep, c, n) = (endpoint.clone(), counters.clone(), name.clone());
        rt.spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let (c, n) = (c.clone(), n.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        serve(conn, n, c).await;
                    }
                });
            }
        });
        QuicServer {
            name,
            addr,
            endpoint,
            counters,
        }
    }

    pub fn stats(&self) -> QuicStats {
        let c = &self.counters;
        QuicStats {
            connections: c.connections.load(Ordering::SeqCst),
            requests: c.requests.load(Ordering::SeqCst),
            migrated: c.migrated.load(Ordering::SeqCst),
        }
    }

    /// Closes every connection and stops accepting (as a stopped server).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"server closed");
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        self.close();
    }
}

fn endpoint_config(cids: Cids) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    if let Cids::Lb(lb) = cids {
        config.cid_generator(move || Box::new(lb.clone()));
    }
    config
}

/// Answers the requests of one connection until it ends.
async fn serve(conn: quinn::Connection, name: String, c: Arc<Counters>) {
    let first = conn.remote_address();
    let mut migrated = false;
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        // The address of the packet that opened the stream: after a client
        // moved, its new one.
        let peer = conn.remote_address();
        if peer != first && !migrated {
            migrated = true;
            c.migrated.fetch_add(1, Ordering::Relaxed);
        }
        let (name, c) = (name.clone(), c.clone());
        tokio::spawn(async move {
            let Ok(req) = recv.read_to_end(MAX_REQUEST).await else {
                return;
            };
            c.requests.fetch_add(1, Ordering::Relaxed);
            let req = String::from_utf8_lossy(&req);
            let words: Vec<&str> = req.split_whitespace().collect();
            let answered = match words[..] {
                ["who"] => send
                    .write_all(format!("{name} {}", peer.port()).as_bytes())
                    .await
                    .is_ok(),
                ["bytes", n] => match n.parse::<usize>() {
                    Ok(n) => write_bytes(&mut send, n).await.is_ok(),
                    Err(_) => false,
                },
                _ => false,
            };
            if !answered || send.finish().is_err() {
                let _ = send.reset(1u32.into());
            }
        });
    }
}

async fn write_bytes(send: &mut quinn::SendStream, mut n: usize) -> Result<(), quinn::WriteError> {
    let chunk = [0x5au8; 16 * 1024];
    while n > 0 {
        let k = n.min(chunk.len());
        send.write_all(&chunk[..k]).await?;
        n -= k;
    }
    Ok(())
}

/// Client settings shared by every connection a test opens: trusts the
/// test CA, asks for [`SERVICE_NAME`] (every backend's certificate holds it).
#[derive(Clone)]
pub struct QuicClient {
    config: quinn::ClientConfig,
}

/// A server's answer to `who`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    /// The client port the server saw.
    pub port: u16,
}

impl QuicClient {
    pub fn new(pki: &Pki) -> QuicClient {
        let crypto = QuicClientConfig::try_from(pki.tls13_client_config(ALPN))
            .expect("a QUIC client TLS config");
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut t = transport();
        t.stream_receive_window(STREAM_WINDOW.into());
        config.transport_config(Arc::new(t));
        QuicClient { config }
    }

    /// A new connection to `to` from an endpoint of its own on a fresh
    /// local port (so it can move alone). Run it on a runtime inside the
    /// client's namespace.
    pub async fn connect(&self, to: SocketAddr) -> anyhow::Result<QuicConn> {
        let endpoint = quinn::Endpoint::client(any_port(to))?;
        let conn = endpoint
            .connect_with(self.config.clone(), to, SERVICE_NAME)?
            .await
            .with_context(|| format!("QUIC handshake with {to}"))?;
        Ok(QuicConn { to, endpoint, conn })
    }
}

/// Port 0 of the unspecified address of `to`'s family.
fn any_port(to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// One client connection with an endpoint of its own. Its methods run on a
/// runtime inside the client's namespace (a rebind binds a socket there).
pub struct QuicConn {
    to: SocketAddr,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl QuicConn {
    /// The local UDP port the connection now sends from.
    pub fn local_port(&self) -> u16 {
        self.endpoint.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Sends `req` on a new stream and returns the stream to read from.
    async fn request(&self, req: &str) -> anyhow::Result<quinn::RecvStream> {
        let (mut send, recv) = self.conn.open_bi().await.context("open a stream")?;
        send.write_all(req.as_bytes())
            .await
            .context("send the request")?;
        send.finish().context("finish the request")?;
        Ok(recv)
    }

    /// Which server answers, and the client port it sees.
    pub async fn who(&self) -> anyhow::Result<Who> {
        let mut recv = self.request("who").await?;
        let reply = recv
            .read_to_end(256)
            .await
            .context("read the answer to who")?;
        let reply = String::from_utf8_lossy(&reply);
        let Some((name, port)) = reply.rsplit_once(' ') else {
            bail!("a malformed answer to who: {reply:?}");
        };
        Ok(Who {
            name: name.to_string(),
            port: port.parse().context("the port in the answer to who")?,
        })
    }

    /// Reads `n` bytes from the server; after the first `rebind_after` of
    /// them, if given, moves to a new local port (mid-transfer: the rest
    /// needs the client's flow-control updates from the new port).
    pub async fn fetch(&self, n: usize, rebind_after: Option<usize>) -> anyhow::Result<()> {
        let mut recv = self.request(&format!("bytes {n}")).await?;
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let mut rebind_after = rebind_after;
        loop {
            if rebind_after.is_some_and(|k| got >= k) {
                rebind_after = None;
                self.rebind()?;
            }
            match recv
                .read(&mut buf)
                .await
                .with_context(|| format!("read after {got} of {n} bytes"))?
            {
                Some(k) => got += k,
                None => break,
            }
        }
        if got != n {
            bail!("got {got} bytes of {n}");
        }
        Ok(())
    }

    /// Moves the connection to a fresh socket on a new local port: the
    /// balancer sees a new 4-tuple. Returns the new port.
    pub fn rebind(&self) -> anyhow::Result<u16> {
        let socket = StdUdpSocket::bind(any_port(self.to)).context("bind a new socket")?;
        let port = socket.local_addr()?.port();
        self.endpoint.rebind(socket).context("rebind")?;
        Ok(port)
    }

    /// Why the connection ended, if it did.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.conn.close_reason()
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

impl Drop for QuicConn {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use lb_common::quic::CidMode;

    use super::*;

    fn config(mode: CidMode) -> CidConfig {
        CidConfig {
            config_id: 2,
            server_id_len: 3,
            nonce_len: 6,
            mode,
            key: *b"0123456789abcdef",
        }
    }

    #[test]
    fn generated_cids_carry_the_server_id_and_fresh_nonces() {
        for mode in [CidMode::Plaintext, CidMode::Encrypted] {
            let mut ours = LbCids::new(config(mode), &[0x0a, 0x0b, 0x0c]).unwrap();
            let theirs = LbCids::new(config(mode), &[0x0a, 0x0b, 0x0d]).unwrap();
            let cids: Vec<quinn::ConnectionId> = (0..64).map(|_| ours.generate_cid()).collect();
            for cid in &cids {
                assert_eq!(cid.len(), 10, "{mode:?}");
                assert_eq!(cid[0] >> 5, 2, "{mode:?}: config id bits");
                assert_eq!(ours.server_id_of(cid).unwrap(), [0x0a, 0x0b, 0x0c]);
                assert!(ours.validate(cid).is_ok());
                assert!(theirs.validate(cid).is_err(), "{mode:?}: {cid:?}");
            }
            let distinct: std::collections::HashSet<&[u8]> = cids.iter().map(|c| &c[..]).collect();
            assert_eq!(distinct.len(), cids.len(), "{mode:?}: repeated CIDs");
            // Another configuration's and unroutable CIDs are not ours.
            let mut other = [0u8; 10];
            other[0] = 3 << 5;
            assert!(ours.validate(&quinn::ConnectionId::new(&other)).is_err());
            other[0] = 0b111 << 5;
            assert!(ours.validate(&quinn::ConnectionId::new(&other)).is_err());
        }
    }

    #[test]
    fn a_server_id_of_the_wrong_length_is_refused() {
        let err = LbCids::new(config(CidMode::Plaintext), &[1, 2]).unwrap_err();
        assert_eq!(err, CidError::ServerIdLen { len: 2, need: 3 });
    }
}
