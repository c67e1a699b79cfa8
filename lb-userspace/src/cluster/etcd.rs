//! A small etcd v3 client over its gRPC gateway (JSON over HTTP/1.1, keys
//! and values base64): range, compare-and-swap txns and a streamed watch,
//! with failover between the configured members, over rustls when the
//! endpoints are `https://`.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes, client::conn::http1};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use serde_json::{Value, json};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::config::{ClusterConfig, EtcdEndpoint};

/// One request to one member, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);
/// The most of a response body read for a range or txn.
const MAX_BODY: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum EtcdError {
    #[error("{endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("etcd's answer is not what the v3 API gives: {0}")]
    Protocol(String),
    #[error("TLS setup for etcd: {0}")]
    Tls(String),
}

impl EtcdError {
    /// The member could not be reached or did not answer in time (another
    /// member may), as opposed to an answer we cannot use.
    fn is_transport(&self) -> bool {
        matches!(self, EtcdError::Endpoint { .. })
    }
}

/// A key as stored: its value and revisions.
#[derive(Clone, Debug, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
}

/// What a txn did: whether its compares held, the store's revision after
/// it, and (when they did not) the key as it is now.
#[derive(Debug)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: i64,
    pub current: Option<Kv>,
}

/// One watch message: the store's revision and the key changes in it
/// (`None` value: deleted).
#[derive(Debug)]
pub struct WatchEvent {
    pub revision: i64,
    pub changes: Vec<(Kv, bool)>,
}

pub struct Client {
    endpoints: Vec<EtcdEndpoint>,
    tls: Option<Arc<ClientConfig>>,
    /// The member that answered last: tried first next time.
    current: AtomicUsize,
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv(v: &Value) -> Result<Kv, EtcdError> {
    let dec = |f: &str| -> Result<Vec<u8>, EtcdError> {
        match v.get(f).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| EtcdError::Protocol(format!("{f} is not base64: {e}"))),
        }
    };
    Ok(Kv {
        key: String::from_utf8_lossy(&dec("key")?).into_owned(),
        value: dec("value")?,
        mod_revision: int(&v["mod_revision"]),
        create_revision: int(&v["create_revision"]),
    })
}

fn tls_config(cfg: &ClusterConfig) -> Result<Arc<ClientConfig>, EtcdError> {
    let tls = |m: String| EtcdError::Tls(m);
    let read = |p: &std::path::Path| {
        crate::files::read_regular(p, 1 << 20).map_err(|e| tls(format!("{}: {e}", p.display())))
    };
    let Some(ca) = &cfg.ca_file else {
        return Err(tls(
            "https:// endpoints need cluster.ca_file (the CA of etcd's server certificates)".into(),
        ));
    };
    let roots =
        crate::files::read_ca_roots(ca).map_err(|e| tls(format!("{}: {e}", ca.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls(format!("{}: {e}", cert.display())))?;
            if certs.is_empty() {
                return Err(tls(format!("{}: no PEM CERTIFICATE found", cert.display())));
            }
            let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| tls(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Client {
    /// Reads the TLS files (when an endpoint is `https://`).
    pub fn new(cfg: &ClusterConfig) -> Result<Client, EtcdError> {
        let tls = if cfg.endpoints.iter().any(|e| e.tls) {
            Some(tls_config(cfg)?)
        } else {
            None
        };
        Ok(Client {
            endpoints: cfg.endpoints.clone(),
            tls,
            current: AtomicUsize::new(0),
        })
    }

    /// Sends `body` to `path` on member `i`; the response once its head
    /// arrived (within `REQUEST_TIMEOUT`).
    async fn send(
        &self,
        i: usize,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, EtcdError> {
        let ep = &self.endpoints[i];
        let fail = |reason: String| EtcdError::Endpoint {
            endpoint: ep.to_string(),
            reason,
        };
        let exchange = async {
            let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
                .await
                .map_err(|e| fail(format!("connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = match (&self.tls, ep.tls) {
                (Some(tls), true) => {
                    let name = ServerName::try_from(ep.host.clone())
                        .map_err(|e| fail(format!("server name: {e}")))?;
                    let s = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| fail(format!("TLS: {e}")))?;
                    Box::new(s)
                }
                _ => Box::new(tcp),
            };
            let (mut sender, conn) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| fail(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = Request::post(path)
                .header(hyper::header::HOST, ep.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| fail(e.to_string()))?;
            sender
                .send_request(req)
                .await
                .map_err(|e| fail(e.to_string()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    /// One unary call on member `i`: the JSON answer.
    async fn call_on(&self, i: usize, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let ep = self.endpoints[i].to_string();
        let resp = self.send(i, path, body).await?;
        let status = resp.status();
        let collected = tokio::time::timeout(
            REQUEST_TIMEOUT,
            http_body_util::Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| EtcdError::Endpoint {
            endpoint: ep.clone(),
            reason: "the answer stalled".into(),
        })?
        .map_err(|e| EtcdError::Endpoint {
            endpoint: ep.clone(),
            reason: e.to_string(),
        })?
        .to_bytes();
        if !status.is_success() {
            let body = String::from_utf8_lossy(&collected).into_owned();
            // No leader, or the member is starting: another may answer.
            if status.is_server_error() {
                return Err(EtcdError::Endpoint {
                    endpoint: ep,
                    reason: format!("{status}: {body}"),
                });
            }
            return Err(EtcdError::Status {
                status: status.as_u16(),
                body,
            });
        }
        serde_json::from_slice(&collected).map_err(|e| EtcdError::Protocol(e.to_string()))
    }

    /// A unary call on the member that answered last, then on the others.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut reasons = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            match self.call_on(i, path, body).await {
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if e.is_transport() => reasons.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        Err(EtcdError::Unreachable(reasons.join("; ")))
    }

    /// The member tried first.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.endpoints.len()
    }

    pub fn endpoint_name(&self, i: usize) -> String {
        self.endpoints[i].to_string()
    }

    /// `key` (linearizable read), with the store's revision.
    pub async fn get(&self, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        let v = self
            .call("/v3/kv/range", &json!({ "key": b64(key.as_bytes()) }))
            .await?;
        Self::range_answer(&v)
    }

    /// [`Client::get`] on member `i` only (the one a watch streams from).
    pub async fn get_on(&self, i: usize, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        let v = self
            .call_on(i, "/v3/kv/range", &json!({ "key": b64(key.as_bytes()) }))
            .await?;
        Self::range_answer(&v)
    }

    /// Every key under `prefix`, on member `i`.
    pub async fn list_on(&self, i: usize, prefix: &str) -> Result<Vec<Kv>, EtcdError> {
        let body = json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)) });
        let v = self.call_on(i, "/v3/kv/range", &body).await?;
        v.get("kvs")
            .and_then(Value::as_array)
            .map_or_else(|| Ok(Vec::new()), |kvs| kvs.iter().map(kv).collect())
    }

    /// A lease of `ttl_secs`: its id.
    pub async fn grant(&self, ttl_secs: u64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", &json!({ "TTL": ttl_secs.to_string() }))
            .await?;
        match int(&v["ID"]) {
            0 => Err(EtcdError::Protocol(format!("no lease in {v}"))),
            id => Ok(id),
        }
    }

    /// Renews lease `id` once; false when it is gone (expired).
    pub async fn keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let i = self.current();
        let ep = self.endpoints[i].to_string();
        let resp = self
            .send(i, "/v3/lease/keepalive", &json!({ "ID": id.to_string() }))
            .await?;
        if !resp.status().is_success() {
            return Err(EtcdError::Endpoint {
                endpoint: ep,
                reason: format!("lease keepalive answered {}", resp.status()),
            });
        }
        // A stream: its first message is the answer.
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        let first = async {
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(d) = frame.into_data() {
                    buf.extend_from_slice(&d);
                    let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                    if let Some(Ok(v)) = it.next() {
                        return Some(v);
                    }
                }
            }
            None
        };
        let v = tokio::time::timeout(REQUEST_TIMEOUT, first)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| EtcdError::Endpoint {
                endpoint: ep,
                reason: "no lease keepalive answer".into(),
            })?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    /// Puts `value` at `key` attached to lease `lease`.
    pub async fn put_leased(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let body = json!({
            "key": b64(key.as_bytes()), "value": b64(value), "lease": lease.to_string(),
        });
        self.call("/v3/kv/put", &body).await.map(|_| ())
    }

    fn range_answer(v: &Value) -> Result<(Option<Kv>, i64), EtcdError> {
        let revision = int(&v["header"]["revision"]);
        let kv = match v.get("kvs").and_then(Value::as_array) {
            Some(kvs) if !kvs.is_empty() => Some(kv(&kvs[0])?),
            _ => None,
        };
        Ok((kv, revision))
    }

    /// Puts `value` at `key` if the key's mod revision is `expect` (0: the
    /// key does not exist); else reads it back, in the same txn.
    pub async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        expect: i64,
    ) -> Result<TxnResult, EtcdError> {
        let k = b64(key.as_bytes());
        let compare = if expect == 0 {
            json!({ "key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
        } else {
            json!({ "key": k, "target": "MOD", "result": "EQUAL", "mod_revision": expect.to_string() })
        };
        let body = json!({
            "compare": [compare],
            "success": [{ "request_put": { "key": k, "value": b64(value) } }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let v = self.call("/v3/kv/txn", &body).await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let revision = int(&v["header"]["revision"]);
        let current = if succeeded {
            None
        } else {
            v["responses"]
                .as_array()
                .and_then(|r| r.first())
                .and_then(|r| r["response_range"]["kvs"].as_array())
                .and_then(|kvs| kvs.first())
                .map(kv)
                .transpose()?
        };
        Ok(TxnResult {
            succeeded,
            revision,
            current,
        })
    }

    /// Watches `key` from `start` on member `i`: calls `on_event` for each
    /// change; returns when the stream ends or fails (the caller resyncs).
    pub async fn watch_on(
        &self,
        i: usize,
        key: &str,
        start: i64,
        mut on_event: impl FnMut(WatchEvent),
    ) -> Result<(), EtcdError> {
        let ep = self.endpoints[i].to_string();
        let mut body = json!({ "create_request": {
            "key": b64(key.as_bytes()),
            "start_revision": start.to_string(),
        }});
        // A key ending in '/' is a prefix: every key under it.
        if key.ends_with('/') {
            body["create_request"]["range_end"] = Value::String(b64(&prefix_end(key)));
        }
        let resp = self.send(i, "/v3/watch", &body).await?;
        if !resp.status().is_success() {
            return Err(EtcdError::Status {
                status: resp.status().as_u16(),
                body: String::new(),
            });
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let lost = |reason: String| EtcdError::Endpoint {
            endpoint: ep.clone(),
            reason,
        };
        loop {
            let Some(frame) = body.frame().await else {
                return Err(lost("the watch stream ended".into()));
            };
            let frame = frame.map_err(|e| lost(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            if buf.len() > MAX_BODY {
                return Err(EtcdError::Protocol("a watch message over 16 MiB".into()));
            }
            // The gateway writes one JSON object per message.
            let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            let mut used = 0;
            while let Some(Ok(msg)) = stream.next() {
                used = stream.byte_offset();
                let r = &msg["result"];
                if msg.get("error").is_some()
                    || r.get("canceled").and_then(Value::as_bool) == Some(true)
                {
                    return Err(EtcdError::Protocol(format!(
                        "the watch was cancelled: {msg}"
                    )));
                }
                let events = r["events"].as_array().cloned().unwrap_or_default();
                if events.is_empty() {
                    continue;
                }
                let mut changes = Vec::new();
                for e in &events {
                    let deleted = e["type"].as_str() == Some("DELETE");
                    changes.push((kv(&e["kv"])?, deleted));
                }
                on_event(WatchEvent {
                    revision: int(&r["header"]["revision"]),
                    changes,
                });
            }
            buf.drain(..used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_decodes_the_gateway_form() {
        let v = json!({"key": "L2xiL2Evc2VydmljZXM=", "value": "W10=",
                       "mod_revision": "7", "create_revision": "3"});
        let kv = kv(&v).unwrap();
        assert_eq!(kv.key, "/lb/a/services");
        assert_eq!(kv.value, b"[]");
        assert_eq!((kv.mod_revision, kv.create_revision), (7, 3));
    }
}
