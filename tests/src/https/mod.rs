//! The one HTTPS stack of the tests: real HTTPS (and UDP echo) backends and
//! an HTTPS client, both hyper over tokio-rustls. Certificates come from a CA
//! made at test time, one per backend, so the client can tell from the
//! certificate alone which backend it reached: proof that the balancer
//! passes TLS through instead of terminating it.

mod client;
mod server;

pub use client::{
    ClientStream, ClientTls, Connection, Failure, Reply, RequestBody, Stage, Stream, StreamRun,
    UdpFlow, empty, request, send, send_on,
};
pub use server::{Backend, BackendStats};

use std::{error::Error as _, io, sync::Arc};

use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use std::sync::Mutex;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

/// The name every backend certificate carries besides its own, and the SNI
/// the client sends: what a public service name would be.
pub const SERVICE_NAME: &str = "lb.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority made for one test, and the backend identities it
/// signs.
pub struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: CertificateDer<'static>,
    ca_pem: String,
}

/// One backend's certificate and key.
#[derive(Clone)]
pub struct Identity {
    /// The certificate's common name, e.g. `backend-8001.test`.
    pub name: String,
    pub cert: CertificateDer<'static>,
    key: Arc<Vec<u8>>,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lb test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        Pki {
            ca: cert.der().clone(),
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// The CA certificate in PEM, for `curl --cacert`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A TLS 1.3 client config (what QUIC needs) that trusts only this CA,
    /// with `alpn`, for the QUIC clients of [`crate::quic`].
    pub(crate) fn tls13_client_config(&self, alpn: &[u8]) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .expect("CA certificate as a root");
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }

    /// A certificate for `name` (its CN and first SAN), also valid for
    /// [`SERVICE_NAME`].
    pub fn issue(&self, name: &str) -> Identity {
        let key = rcgen::KeyPair::generate().expect("backend key");
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string(), SERVICE_NAME.to_string()])
                .expect("backend params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("backend certificate");
        Identity {
            name: name.to_string(),
            cert: cert.der().clone(),
            key: Arc::new(key.serialize_der()),
        }
    }

    /// A client that trusts only this CA and names each certificate it
    /// sees by the identities given.
    pub fn client(&self, identities: &[&Identity]) -> ClientTls {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .expect("CA certificate as a root");
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection shows its certificate: no session resumption.
        config.resumption = Resumption::disabled();
        ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            names: Arc::new(Mutex::new(
                identities
                    .iter()
                    .map(|i| (i.cert.to_vec(), i.name.clone()))
                    .collect(),
            )),
        }
    }
}

impl Identity {
    /// A TLS 1.3 server config (what QUIC needs) with `alpn`, for the QUIC
    /// servers of [`crate::quic`].
    pub(crate) fn tls13_server_config(&self, alpn: &[u8]) -> ServerConfig {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.as_ref().clone()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .expect("backend certificate and key");
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.as_ref().clone()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .expect("backend certificate and key");
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }
}

/// Waits until the flag turns true (or its sender is gone).
async fn until(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// A hyper error as the I/O error under it, so callers can tell a reset or
/// a cut connection (`UnexpectedEof`) from other failures.
pub fn hyper_io(e: hyper::Error) -> io::Error {
    if let Some(io) = e.source().and_then(|s| s.downcast_ref::<io::Error>()) {
        return io::Error::new(io.kind(), e.to_string());
    }
    if e.is_incomplete_message() || e.is_canceled() {
        return io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string());
    }
    io::Error::other(e.to_string())
}

/// A body read line by line (`\n`-terminated; a last unterminated line is
/// returned as is).
struct Lines {
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl Lines {
    fn new(body: Incoming) -> Lines {
        Lines {
            body,
            buf: BytesMut::new(),
            done: false,
        }
    }

    async fn next(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(end + 1);
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let line = self.buf.split();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(frame) => {
                    if let Ok(data) = frame.map_err(hyper_io)?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
