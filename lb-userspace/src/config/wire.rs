//! The wire model: the serde shapes of the config file (TOML), the API's
//! request bodies and the state file (JSON), and the model written back
//! into them. Closed sets of values are enums, so the parser and the
//! OpenAPI document (utoipa) read the same types.

use serde::{Deserialize, Serialize};

use super::{
    duration::WireDuration,
    model::{BackendConfig, ServiceConfig},
};
pub use crate::dataplane::{AdminState, AttachMode, Forwarding, Protocol, WhenAllDown};
use crate::health::{CheckKind, CheckSpec};

fn default_listen() -> String {
    "0.0.0.0:443".into()
}
fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tcp, Protocol::Udp]
}
fn default_weight() -> i64 {
    100
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub dataplane: Option<RawDataplane>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub health: RawHealthGlobal,
    #[serde(default)]
    pub services: Vec<RawService>,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub limits: RawLimits,
    pub bgp: Option<super::bgp::RawBgp>,
    /// `[cluster]`: the services live in etcd, shared by several nodes.
    pub cluster: Option<RawCluster>,
}

/// `[cluster]`: the etcd cluster holding the services' desired state.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `http://host:port` or `https://host:port`, one per etcd member.
    pub etcd_endpoints: Option<Vec<String>>,
    /// This node's name, unique in the cluster.
    pub node: Option<String>,
    /// The cluster's name: its keys live under `/lb/<name>/`.
    pub name: Option<String>,
    /// CA certificates (PEM) that etcd's server certificates must chain to.
    pub ca_file: Option<String>,
    /// Client certificate (PEM) and its key, for etcd's client auth.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// Flow pins shared with the other nodes (`{ listen, key_file }`).
    pub pin_sync: Option<super::pin_sync::RawPinSync>,
}

/// `[limits]`: how much the daemon takes on, from any source (config file,
/// reload, state file, API).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Services at most (default and upper bound: `dataplane.max_services`;
    /// when that is not set, it follows this).
    pub max_services: Option<i64>,
    /// Backends in one service at most (default 1024).
    pub max_backends_per_service: Option<i64>,
    /// Backends of all services together at most (default 8192).
    pub max_backends: Option<i64>,
}

/// `[policy]`: rules every service's backends must follow, whether they
/// come from the file or the API.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// CIDRs every backend address must lie in (none: any address the
    /// address policy allows).
    pub allowed_backend_networks: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataplane {
    pub interface: Option<String>,
    pub xdp_mode: Option<AttachMode>,
    pub flow_table_size: Option<i64>,
    /// Flow-table inserts per CPU per second (0: no cap).
    pub flow_insert_rate: Option<i64>,
    pub maglev_table_size: Option<i64>,
    pub max_services: Option<i64>,
    pub pin_path: Option<String>,
    /// `fast` or `murmur3` (see `lb_common::FlowHash`).
    pub flow_hash: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    /// The admin Unix socket (default `$RUNTIME_DIRECTORY/lb.sock`, else
    /// `/run/lb/lb.sock`).
    pub socket: Option<String>,
    /// The `admin` scope's token (changes and reads over TCP).
    pub token_file: Option<String>,
    /// The `read` scope's token (GETs over TCP).
    pub read_token_file: Option<String>,
    /// `/metrics` needs no token over TCP (default false).
    pub metrics_public: Option<bool>,
    /// Host header values accepted over TCP besides IP literals and
    /// `localhost` (DNS rebinding guard).
    pub allowed_hosts: Option<Vec<String>>,
    /// Changes accepted per second over all clients (bursts of twice that).
    pub change_rate: Option<i64>,
    /// Failed authentications a peer may make per minute before it gets 429.
    pub auth_failures_per_minute: Option<i64>,
    pub state_file: Option<String>,
    /// Open admin connections at most (default 256).
    pub max_connections: Option<i64>,
    /// A request's headers must arrive within this (default "10s").
    pub header_timeout: Option<WireDuration>,
    /// A connection idle this long is closed (default "60s").
    pub idle_timeout: Option<WireDuration>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthGlobal {
    pub max_concurrent: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Service)]
pub struct RawService {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_protocols")]
    #[schema(default = json!(["tcp", "udp"]))]
    pub protocols: Vec<Protocol>,
    #[serde(default)]
    #[schema(default = "local")]
    pub forwarding: Forwarding,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<RawHealth>,
    /// "keep_last" (default) or "refuse".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_all_down: Option<WhenAllDown>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// CIDRs this service's backends must lie in (besides `[policy]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_backend_networks: Option<Vec<String>>,
    /// QUIC-LB: UDP short-header packets go to the backend whose server id
    /// their destination connection ID carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<RawQuic>,
}

/// A service's QUIC-LB configuration (draft-ietf-quic-load-balancers).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Quic)]
pub struct RawQuic {
    /// The CID's config rotation bits, 0..=6 (7 marks unroutable CIDs).
    #[schema(minimum = 0, maximum = 6)]
    pub config_id: i64,
    /// Bytes of server id after the CID's first octet, 1..=15.
    #[schema(minimum = 1, maximum = 15)]
    pub server_id_len: i64,
    /// Bytes of nonce after the server id, 4..=18; with server_id_len at most 19.
    #[schema(minimum = 4, maximum = 18)]
    pub nonce_len: i64,
    /// "plaintext" (default) or "encrypted".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<super::quic::QuicMode>,
    /// Encrypted mode: a file holding the 16-byte AES key as 32 hex digits
    /// (mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Health)]
pub struct RawHealth {
    pub kind: HealthKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "2s")]
    pub interval: Option<WireDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "1s")]
    pub timeout: Option<WireDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Backend)]
pub struct RawBackend {
    pub address: String,
    #[serde(default = "default_weight")]
    #[schema(minimum = 0, maximum = 65535, default = 100)]
    pub weight: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
    /// QUIC-LB server id, hex (server_id_len bytes); assigned by the daemon
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "0a01")]
    pub server_id: Option<String>,
}

/// What a health check sends: the kind's own fields (`path`, `payload`,
/// ...) are checked against it in `validate`, which names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
    Https,
    Udp,
}

impl HealthKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Https => "https",
            Self::Udp => "udp",
        }
    }
}

impl From<&ServiceConfig> for RawService {
    fn from(s: &ServiceConfig) -> Self {
        RawService {
            name: s.name.clone(),
            listen: s.listen.to_string(),
            protocols: s.protocols.clone(),
            forwarding: s.forwarding,
            health: s.health.as_ref().map(RawHealth::from),
            when_all_down: Some(s.when_all_down),
            backends: s.backends.iter().map(RawBackend::from).collect(),
            allowed_backend_networks: (!s.allowed_backend_networks.is_empty()).then(|| {
                s.allowed_backend_networks
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            }),
            quic: s.quic.as_ref().map(|q| RawQuic {
                config_id: i64::from(q.cid.config_id),
                server_id_len: i64::from(q.cid.server_id_len),
                nonce_len: i64::from(q.cid.nonce_len),
                mode: Some(match q.cid.mode {
                    lb_common::quic::CidMode::Plaintext => super::quic::QuicMode::Plaintext,
                    lb_common::quic::CidMode::Encrypted => super::quic::QuicMode::Encrypted,
                }),
                key_file: q.key_file.as_ref().map(|p| p.display().to_string()),
            }),
        }
    }
}

impl From<&BackendConfig> for RawBackend {
    fn from(b: &BackendConfig) -> Self {
        RawBackend {
            address: b.address.to_string(),
            weight: i64::from(b.weight),
            state: Some(b.state),
            server_id: b.server_id.as_ref().map(ToString::to_string),
        }
    }
}

impl From<&CheckSpec> for RawHealth {
    fn from(c: &CheckSpec) -> Self {
        let mut h = RawHealth {
            kind: HealthKind::Tcp,
            path: None,
            host: None,
            sni: None,
            ca_file: None,
            payload: None,
            expect: None,
            interval: Some(WireDuration(c.interval)),
            timeout: Some(WireDuration(c.timeout)),
            rise: Some(i64::from(c.rise)),
            fall: Some(i64::from(c.fall)),
        };
        match &c.kind {
            CheckKind::Tcp => h.kind = HealthKind::Tcp,
            CheckKind::Http { path, host } => {
                h.kind = HealthKind::Http;
                h.path = Some(path.clone());
                h.host = host.clone();
            }
            CheckKind::Https {
                path,
                host,
                sni,
                ca_file,
            } => {
                h.kind = HealthKind::Https;
                h.path = Some(path.clone());
                h.host = host.clone();
                h.sni = sni.clone();
                h.ca_file = ca_file.as_ref().map(|p| p.display().to_string());
            }
            CheckKind::Udp { payload, expect } => {
                h.kind = HealthKind::Udp;
                h.payload = Some(String::from_utf8_lossy(payload).into_owned());
                h.expect = expect
                    .as_ref()
                    .map(|e| String::from_utf8_lossy(e).into_owned());
            }
        }
        h
    }
}
