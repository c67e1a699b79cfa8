//! The configuration: TOML on disk, the same service shape as JSON in the
//! admin API and the state file. Everything is validated as a whole before
//! anything is applied; every error names the file, line and field.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{AdminState, AttachMode, Forwarding, Options, Protocol, WhenAllDown},
    health::{CheckKind, CheckSpec},
    maglev,
};

/// A configuration problem: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or "request body" for the API.
    pub source: String,
    /// 1-based line and column, when the input is a file.
    pub position: Option<(usize, usize)>,
    /// The field, as a path: `services[0].backends[1].weight`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A field error before it is placed in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: Vec<Seg>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

impl FieldError {
    fn new(path: &[Seg], message: impl Into<String>) -> Self {
        Self {
            path: path.to_vec(),
            message: message.into(),
        }
    }

    /// Places the error in a non-file input (an API request body).
    pub fn in_body(self) -> ConfigError {
        ConfigError {
            source: "request body".into(),
            position: None,
            field: path_string(&self.path),
            message: self.message,
        }
    }
}

fn key(path: &[Seg], k: &str) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Key(k.into()));
    p
}

fn index(path: &[Seg], i: usize) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Index(i));
    p
}

// ---------------------------------------------------------------------------
// The raw shapes, as written by people (TOML) and programs (JSON).

fn default_listen() -> String {
    "0.0.0.0:443".into()
}
fn default_protocols() -> Vec<String> {
    vec!["tcp".into(), "udp".into()]
}
fn default_forwarding() -> String {
    "local".into()
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
    pub xdp_mode: Option<String>,
    pub flow_table_size: Option<i64>,
    /// Flow-table inserts per CPU per second (0: no cap).
    pub flow_insert_rate: Option<i64>,
    pub maglev_table_size: Option<i64>,
    pub max_services: Option<i64>,
    pub pin_path: Option<String>,
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
    pub header_timeout: Option<String>,
    /// A connection idle this long is closed (default "60s").
    pub idle_timeout: Option<String>,
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
    #[schema(value_type = Vec<WireProtocol>, default = json!(["tcp"]))]
    pub protocols: Vec<String>,
    #[serde(default = "default_forwarding")]
    #[schema(value_type = WireForwarding, default = "local")]
    pub forwarding: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<RawHealth>,
    /// "keep_last" (default) or "refuse".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<WireWhenAllDown>)]
    pub when_all_down: Option<String>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// CIDRs this service's backends must lie in (besides `[policy]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_backend_networks: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Health)]
pub struct RawHealth {
    #[schema(value_type = WireHealthKind)]
    pub kind: String,
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
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "1s")]
    pub timeout: Option<String>,
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
    #[schema(value_type = Option<WireState>)]
    pub state: Option<String>,
}

/// The values the wire model's string fields take, for the API's OpenAPI
/// document (the fields stay strings, checked with errors that name them).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum WireProtocol {
    Tcp,
    Udp,
}

/// See [`WireProtocol`].
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum WireForwarding {
    Local,
    Nat,
    Dsr,
}

/// See [`WireProtocol`].
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum WireWhenAllDown {
    KeepLast,
    Refuse,
}

/// See [`WireProtocol`].
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum WireHealthKind {
    Tcp,
    Http,
    Https,
    Udp,
}

/// See [`WireProtocol`].
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum WireState {
    Active,
    Draining,
    Disabled,
}

// ---------------------------------------------------------------------------
// The validated shapes.

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub interface: Option<String>,
    pub xdp_mode: AttachMode,
    pub dataplane: Options,
    pub admin: AdminConfig,
    pub health_max_concurrent: usize,
    pub services: Vec<ServiceConfig>,
    /// `[policy]`.
    pub policy: Policy,
    /// `[limits]`.
    pub limits: Limits,
    /// Things that work but may hurt (e.g. a local backend port inside the
    /// host's ephemeral port range), placed in the file like errors.
    pub warnings: Vec<ConfigError>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The Unix socket: admin scope for whoever can open it (root, 0600).
    pub socket: PathBuf,
    /// The `admin` scope's token file.
    pub token_file: Option<PathBuf>,
    /// The `read` scope's token file.
    pub read_token_file: Option<PathBuf>,
    pub metrics_public: bool,
    /// Host names accepted in the Host header over TCP, besides IP
    /// literals and `localhost`; lower case.
    pub allowed_hosts: Vec<String>,
    /// Changes per second over all clients.
    pub change_rate: u32,
    /// Failed authentications per peer and minute before 429.
    pub auth_failures_per_minute: u32,
    /// Where API changes are kept across restarts.
    pub state_file: PathBuf,
    /// Bounds on the admin listener.
    pub limits: crate::admin::Limits,
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
/// Where the admin socket lives when neither the config nor systemd's
/// `RuntimeDirectory=` (`$RUNTIME_DIRECTORY`) says otherwise; the CLI
/// looks here by default.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/lb/lb.sock";

/// The admin socket of a config that names none: `lb.sock` in systemd's
/// runtime directory when it sets one, else [`DEFAULT_ADMIN_SOCKET`].
pub fn default_admin_socket() -> PathBuf {
    match std::env::var("RUNTIME_DIRECTORY") {
        Ok(dirs) if dirs.starts_with('/') => {
            let first = dirs.split(':').next().unwrap_or(&dirs);
            Path::new(first).join("lb.sock")
        }
        _ => PathBuf::from(DEFAULT_ADMIN_SOCKET),
    }
}
/// The directory of default state files (systemd's `StateDirectory=lb`
/// sets `$STATE_DIRECTORY` to it too).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lb";

/// The state file of a config that names none: one per config file (its
/// name and a hash of its absolute path), under `$STATE_DIRECTORY` when
/// systemd sets it, else [`DEFAULT_STATE_DIR`]; two daemons with different
/// config files never share one.
pub fn default_state_file(config: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(config).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(config))
            .unwrap_or_else(|_| config.to_path_buf())
    });
    let dir = std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        // systemd may pass several, colon-separated: the first is ours.
        .and_then(|d| {
            let first = d.to_string_lossy().split(':').next()?.to_string();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let stem = abs
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "lb".into());
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = fnv1a(abs.as_os_str().as_encoded_bytes());
    dir.join(format!("{stem}-{:08x}.state.json", hash as u32))
}

/// The record of the maps pinned at `pin`, in the state file's directory.
pub fn record_path(state_file: &Path, pin: &Path) -> PathBuf {
    let dir = state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let hash = fnv1a(pin.as_os_str().as_encoded_bytes());
    dir.join(format!("dataplane-{:08x}.json", hash as u32))
}

/// Where versions before the per-pin record kept it.
pub fn legacy_record_path(state_file: &Path) -> PathBuf {
    state_file.with_extension("dataplane.json")
}

/// FNV-1a, 64 bits: a stable hash (unlike std's) for names and fingerprints.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
/// Maps and links are pinned here so the data plane outlives the daemon.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocols: Vec<Protocol>,
    pub forwarding: Forwarding,
    pub health: Option<CheckSpec>,
    pub when_all_down: WhenAllDown,
    pub backends: Vec<BackendConfig>,
    /// Networks the backends must lie in; empty: no such rule.
    pub allowed_backend_networks: Vec<Cidr>,
}

/// How many services and backends the daemon takes on, from `[limits]`.
/// Never more than the kernel maps hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Limits {
    pub max_services: usize,
    pub max_backends_per_service: usize,
    pub max_backends: usize,
}

/// `limits.max_backends_per_service` when the file does not set it.
pub const DEFAULT_MAX_BACKENDS_PER_SERVICE: usize = 1024;

impl Limits {
    /// The defaults for data plane options `opts`: as many services as its
    /// maps hold, as many backends as the backend map holds, 1024 a service.
    pub fn for_dataplane(opts: &Options) -> Limits {
        Limits {
            max_services: opts.max_services as usize,
            max_backends_per_service: DEFAULT_MAX_BACKENDS_PER_SERVICE,
            max_backends: lb_common::MAX_BACKENDS as usize,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::for_dataplane(&Options::default())
    }
}

/// A change that would take on more than `[limits]` allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what}: more than {key} = {limit}; remove some, or raise {key} in the config file's \
     [limits] and reload{note}"
)]
pub struct LimitError {
    /// The config key: `limits.max_services` and the like.
    pub key: &'static str,
    pub limit: usize,
    /// What is over the limit, counted: `3 services`.
    pub what: String,
    /// The first item past the limit.
    pub path: Vec<Seg>,
    /// What else bounds the key, if anything.
    pub note: &'static str,
}

/// The one check of `[limits]`, for every source of services.
pub fn check_limits(services: &[ServiceConfig], limits: &Limits) -> Result<(), LimitError> {
    let root = [Seg::Key("services".into())];
    if services.len() > limits.max_services {
        return Err(LimitError {
            key: "limits.max_services",
            limit: limits.max_services,
            what: format!("{} services", services.len()),
            path: index(&root, limits.max_services),
            note: " (at most dataplane.max_services, which sizes the kernel maps)",
        });
    }
    let mut total = 0;
    for (i, s) in services.iter().enumerate() {
        let bp = key(&index(&root, i), "backends");
        if s.backends.len() > limits.max_backends_per_service {
            return Err(LimitError {
                key: "limits.max_backends_per_service",
                limit: limits.max_backends_per_service,
                what: format!("service {:?} has {} backends", s.name, s.backends.len()),
                path: index(&bp, limits.max_backends_per_service),
                note: "",
            });
        }
        if total + s.backends.len() > limits.max_backends {
            return Err(LimitError {
                key: "limits.max_backends",
                limit: limits.max_backends,
                what: format!(
                    "{} backends in all services",
                    services.iter().map(|s| s.backends.len()).sum::<usize>()
                ),
                path: index(&bp, limits.max_backends - total),
                note: "",
            });
        }
        total += s.backends.len();
    }
    Ok(())
}

/// Rules for every service, from `[policy]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Networks every backend must lie in; empty: no such rule.
    pub allowed_backend_networks: Vec<Cidr>,
}

/// An IP network: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || {
            format!(
                "{s:?} is not a network; write e.g. \"10.0.0.0/8\", \"fd00::/8\" or one address"
            )
        };
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && p.len() <= 3 => {
                p.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
            None => max,
        };
        if prefix > max {
            return Err(format!("{s:?}: the prefix length is at most {max}"));
        }
        let c = Cidr { addr, prefix };
        if c.masked(addr) != addr {
            return Err(format!(
                "{s:?} has host bits set; the network is {}/{prefix}",
                c.masked(addr)
            ));
        }
        Ok(c)
    }

    fn masked(&self, ip: std::net::IpAddr) -> std::net::IpAddr {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn networks(path: &[Seg], list: &[String]) -> Result<Vec<Cidr>, FieldError> {
    if list.is_empty() {
        return Err(FieldError::new(
            path,
            "list at least one network, or leave the field out to allow any",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, n)| Cidr::parse(n.trim()).map_err(|m| FieldError::new(&index(path, i), m)))
        .collect()
}

fn list_networks(n: &[Cidr]) -> String {
    n.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `[policy]` rules over all services' backends (the per-service list
/// is checked by [`service`]).
pub fn check_policy(services: &[ServiceConfig], policy: &Policy) -> Result<(), FieldError> {
    if policy.allowed_backend_networks.is_empty() {
        return Ok(());
    }
    let root = [Seg::Key("services".into())];
    for (i, s) in services.iter().enumerate() {
        for (j, b) in s.backends.iter().enumerate() {
            if !policy
                .allowed_backend_networks
                .iter()
                .any(|c| c.contains(b.address.ip()))
            {
                return Err(FieldError::new(
                    &key(&index(&key(&index(&root, i), "backends"), j), "address"),
                    format!(
                        "{} (service {:?}) is outside policy.allowed_backend_networks \
                         (rule: allowed_backend_networks): {}",
                        b.address,
                        s.name,
                        list_networks(&policy.allowed_backend_networks)
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u16,
    pub state: AdminState,
}

// ---------------------------------------------------------------------------
// Parsing helpers.

/// "2s", "500ms", "1.5s", "1m", "100us".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit; write e.g. \"2s\" or \"500ms\""))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. \"2s\" or \"500ms\""))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}; use us, ms, s, m or h"
            ));
        }
    };
    // Whole microseconds, so `format_duration` writes back exactly this.
    let micros = (secs * 1e6).round();
    if !micros.is_finite() || micros < 1.0 {
        return Err(format!("{s:?} must be at least 1us"));
    }
    if micros > MAX_DURATION.as_micros() as f64 {
        return Err(format!("{s:?} is too long; at most 24h"));
    }
    Ok(Duration::from_micros(micros as u64))
}

/// Longest duration a config takes (health intervals and timeouts).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The shortest exact form: whole seconds, milliseconds or microseconds.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

fn socket_addr(path: &[Seg], s: &str) -> Result<SocketAddr, FieldError> {
    s.parse::<SocketAddr>().map_err(|_| {
        FieldError::new(
            path,
            format!(
                "{s:?} is not an address with a port (e.g. \"127.0.0.1:8001\" or \"[::1]:8001\")"
            ),
        )
    })
}

fn int_in(path: &[Seg], v: i64, lo: i64, hi: i64) -> Result<i64, FieldError> {
    if v < lo || v > hi {
        return Err(FieldError::new(
            path,
            format!("{v} is out of range {lo}..={hi}"),
        ));
    }
    Ok(v)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

pub fn parse_state(path: &[Seg], s: Option<&str>) -> Result<AdminState, FieldError> {
    match s.unwrap_or("active") {
        "active" => Ok(AdminState::Active),
        "draining" => Ok(AdminState::Draining),
        "disabled" => Ok(AdminState::Disabled),
        other => Err(FieldError::new(
            path,
            format!("unknown state {other:?}; use active, draining or disabled"),
        )),
    }
}

pub fn state_name(s: AdminState) -> &'static str {
    match s {
        AdminState::Active => "active",
        AdminState::Draining => "draining",
        AdminState::Disabled => "disabled",
    }
}

/// The backend address policy: addresses no service may send traffic to,
/// whatever its forwarding mode (loopback, allowed only with `local`
/// forwarding, is checked per service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRule {
    Unspecified,
    Broadcast,
    Multicast,
    LinkLocal,
    Ipv4Mapped,
    Loopback,
}

impl AddressRule {
    /// The name errors and the README use.
    pub fn name(self) -> &'static str {
        match self {
            AddressRule::Unspecified => "unspecified",
            AddressRule::Broadcast => "broadcast",
            AddressRule::Multicast => "multicast",
            AddressRule::LinkLocal => "link-local",
            AddressRule::Ipv4Mapped => "ipv4-mapped",
            AddressRule::Loopback => "loopback",
        }
    }

    fn why(self) -> &'static str {
        match self {
            AddressRule::Unspecified => "0.0.0.0 and :: name no host",
            AddressRule::Broadcast => "255.255.255.255 reaches every host on the link",
            AddressRule::Multicast => "224.0.0.0/4 and ff00::/8 reach groups, not one host",
            AddressRule::LinkLocal => {
                "169.254.0.0/16 (incl. the cloud metadata service 169.254.169.254) and \
                 fe80::/10 belong to the link, not to a backend"
            }
            AddressRule::Ipv4Mapped => {
                "::ffff:0:0/96 hides an IPv4 address; write the IPv4 address itself"
            }
            AddressRule::Loopback => {
                "127.0.0.0/8 and ::1 are this host; only forwarding = \"local\" may use them"
            }
        }
    }
}

/// The rule that forbids `ip` as a backend in every mode, if any.
pub fn forbidden_backend_ip(ip: std::net::IpAddr) -> Option<AddressRule> {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                Some(AddressRule::Unspecified)
            } else if v4.is_broadcast() {
                Some(AddressRule::Broadcast)
            } else if v4.is_multicast() {
                Some(AddressRule::Multicast)
            } else if v4.is_link_local() {
                Some(AddressRule::LinkLocal)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some(AddressRule::Unspecified)
            } else if v6.is_multicast() {
                Some(AddressRule::Multicast)
            } else if v6.is_unicast_link_local() {
                Some(AddressRule::LinkLocal)
            } else if v6.to_ipv4_mapped().is_some() {
                Some(AddressRule::Ipv4Mapped)
            } else {
                None
            }
        }
    }
}

/// Validates one backend of a service.
pub fn backend(path: &[Seg], raw: &RawBackend) -> Result<BackendConfig, FieldError> {
    let address = socket_addr(&key(path, "address"), &raw.address)?;
    if address.port() == 0 {
        return Err(FieldError::new(
            &key(path, "address"),
            "port 0 is not a port",
        ));
    }
    if let Some(rule) = forbidden_backend_ip(address.ip()) {
        return Err(FieldError::new(
            &key(path, "address"),
            format!(
                "{} cannot be a backend address (rule: {}): {}",
                address.ip(),
                rule.name(),
                rule.why()
            ),
        ));
    }
    let weight = int_in(&key(path, "weight"), raw.weight, 0, 65535)? as u16;
    let state = parse_state(&key(path, "state"), raw.state.as_deref())?;
    Ok(BackendConfig {
        address,
        weight,
        state,
    })
}

fn health(path: &[Seg], raw: &RawHealth) -> Result<CheckSpec, FieldError> {
    let dur = |field: &str, v: &Option<String>, default: &str| {
        parse_duration(v.as_deref().unwrap_or(default))
            .map_err(|m| FieldError::new(&key(path, field), m))
    };
    let interval = dur("interval", &raw.interval, "2s")?;
    let timeout = dur("timeout", &raw.timeout, "1s")?;
    if timeout > interval {
        return Err(FieldError::new(
            &key(path, "timeout"),
            format!(
                "timeout {} is longer than interval {}; checks would overlap",
                format_duration(timeout),
                format_duration(interval)
            ),
        ));
    }
    let rise = int_in(&key(path, "rise"), raw.rise.unwrap_or(2), 1, 100)? as u32;
    let fall = int_in(&key(path, "fall"), raw.fall.unwrap_or(3), 1, 100)? as u32;
    let http_path = |p: &Option<String>| -> Result<String, FieldError> {
        let p = p.clone().unwrap_or_else(|| "/".into());
        if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(FieldError::new(
                &key(path, "path"),
                format!("{p:?} must start with / and hold no spaces"),
            ));
        }
        Ok(p)
    };
    let only = |allowed: &[&str]| -> Result<(), FieldError> {
        for (name, set) in [
            ("path", raw.path.is_some()),
            ("host", raw.host.is_some()),
            ("sni", raw.sni.is_some()),
            ("ca_file", raw.ca_file.is_some()),
            ("payload", raw.payload.is_some()),
            ("expect", raw.expect.is_some()),
        ] {
            if set && !allowed.contains(&name) {
                return Err(FieldError::new(
                    &key(path, name),
                    format!("does not apply to {} checks", raw.kind),
                ));
            }
        }
        Ok(())
    };
    let kind = match raw.kind.as_str() {
        "tcp" => {
            only(&[])?;
            CheckKind::Tcp
        }
        "http" => {
            only(&["path", "host"])?;
            CheckKind::Http {
                path: http_path(&raw.path)?,
                host: raw.host.clone(),
            }
        }
        "https" => {
            only(&["path", "host", "sni", "ca_file"])?;
            if let Some(ca) = &raw.ca_file
                && let Err(e) =
                    crate::files::check_regular(Path::new(ca), crate::health::MAX_CA_FILE)
            {
                return Err(FieldError::new(
                    &key(path, "ca_file"),
                    format!("{ca:?} {e}"),
                ));
            }
            CheckKind::Https {
                path: http_path(&raw.path)?,
                host: raw.host.clone(),
                sni: raw.sni.clone(),
                ca_file: raw.ca_file.as_ref().map(PathBuf::from),
            }
        }
        "udp" => {
            only(&["payload", "expect"])?;
            let payload = raw.payload.clone().ok_or_else(|| {
                FieldError::new(&key(path, "payload"), "udp checks need a payload to send")
            })?;
            if payload.is_empty() {
                return Err(FieldError::new(&key(path, "payload"), "must not be empty"));
            }
            CheckKind::Udp {
                payload: payload.into_bytes(),
                expect: raw.expect.clone().map(String::into_bytes),
            }
        }
        other => {
            return Err(FieldError::new(
                &key(path, "kind"),
                format!("unknown check kind {other:?}; use tcp, http, https or udp"),
            ));
        }
    };
    Ok(CheckSpec {
        kind,
        interval,
        timeout,
        rise,
        fall,
    })
}

/// Validates one service on its own (cross-service rules are in
/// [`check_services`]).
pub fn service(path: &[Seg], raw: &RawService) -> Result<ServiceConfig, FieldError> {
    if !valid_name(&raw.name) {
        return Err(FieldError::new(
            &key(path, "name"),
            format!(
                "{:?} is not a service name: use 1-64 letters, digits, '-', '_' or '.'",
                raw.name
            ),
        ));
    }
    let listen = socket_addr(&key(path, "listen"), &raw.listen)?;
    if listen.port() == 0 {
        return Err(FieldError::new(
            &key(path, "listen"),
            "port 0 is not a port",
        ));
    }
    if raw.protocols.is_empty() {
        return Err(FieldError::new(
            &key(path, "protocols"),
            "list at least one of \"tcp\", \"udp\"",
        ));
    }
    let mut protocols = Vec::new();
    for (i, p) in raw.protocols.iter().enumerate() {
        let proto = match p.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(FieldError::new(
                    &index(&key(path, "protocols"), i),
                    format!("unknown protocol {other:?}; use tcp or udp"),
                ));
            }
        };
        if protocols.contains(&proto) {
            return Err(FieldError::new(
                &index(&key(path, "protocols"), i),
                format!("{p:?} is listed twice"),
            ));
        }
        protocols.push(proto);
    }
    let forwarding = match raw.forwarding.as_str() {
        "local" => Forwarding::Local,
        "nat" => Forwarding::Nat,
        "dsr" => Forwarding::Dsr,
        other => {
            return Err(FieldError::new(
                &key(path, "forwarding"),
                format!("unknown forwarding {other:?}; use local, nat or dsr"),
            ));
        }
    };
    if forwarding != Forwarding::Local && listen.ip().is_unspecified() {
        return Err(FieldError::new(
            &key(path, "listen"),
            format!(
                "{} needs the service's own address (e.g. \"10.0.0.10:443\"), not {}: {}",
                forwarding.name(),
                listen.ip(),
                if forwarding == Forwarding::Nat {
                    "replies are translated back to it"
                } else {
                    "backends hold it on their loopback"
                }
            ),
        ));
    }
    let health = match &raw.health {
        Some(h) => Some(health(&key(path, "health"), h)?),
        None => None,
    };
    let when_all_down = match raw.when_all_down.as_deref().unwrap_or("keep_last") {
        "keep_last" => WhenAllDown::KeepLast,
        "refuse" => WhenAllDown::Refuse,
        other => {
            return Err(FieldError::new(
                &key(path, "when_all_down"),
                format!("unknown policy {other:?}; use keep_last or refuse"),
            ));
        }
    };
    let allowed_backend_networks = match &raw.allowed_backend_networks {
        Some(list) => networks(&key(path, "allowed_backend_networks"), list)?,
        None => Vec::new(),
    };
    let mut backends = Vec::new();
    let mut seen = HashSet::new();
    for (i, b) in raw.backends.iter().enumerate() {
        let bp = index(&key(path, "backends"), i);
        let b = backend(&bp, b)?;
        if !allowed_backend_networks.is_empty()
            && !allowed_backend_networks
                .iter()
                .any(|c| c.contains(b.address.ip()))
        {
            return Err(FieldError::new(
                &key(&bp, "address"),
                format!(
                    "{} is outside the service's allowed_backend_networks \
                     (rule: allowed_backend_networks): {}",
                    b.address,
                    list_networks(&allowed_backend_networks)
                ),
            ));
        }
        if !seen.insert(b.address) {
            return Err(FieldError::new(
                &key(&bp, "address"),
                format!("backend {} is listed twice", b.address),
            ));
        }
        if forwarding != Forwarding::Local {
            let mode = forwarding.name();
            if b.address.ip().is_loopback() {
                return Err(FieldError::new(
                    &key(&bp, "address"),
                    format!(
                        "{mode} backends are other hosts; {} is this host's loopback \
                         (rule: {}; use forwarding = \"local\")",
                        b.address,
                        AddressRule::Loopback.name()
                    ),
                ));
            }
            if b.address.is_ipv4() != listen.is_ipv4() {
                return Err(FieldError::new(
                    &key(&bp, "address"),
                    format!(
                        "{mode} cannot translate between IP versions: backend {} for service {listen}",
                        b.address
                    ),
                ));
            }
            if forwarding == Forwarding::Dsr && b.address.port() != listen.port() {
                return Err(FieldError::new(
                    &key(&bp, "address"),
                    format!(
                        "dsr does not rewrite ports: backend {} must listen on the service port {}",
                        b.address,
                        listen.port()
                    ),
                ));
            }
        }
        if b.address.is_ipv4() != listen.is_ipv4()
            && !listen.ip().is_unspecified()
            && !b.address.ip().is_loopback()
        {
            return Err(FieldError::new(
                &key(&bp, "address"),
                format!(
                    "backend {} and service {} are of different IP versions",
                    b.address, listen
                ),
            ));
        }
        backends.push(b);
    }
    Ok(ServiceConfig {
        name: raw.name.clone(),
        listen,
        protocols,
        forwarding,
        health,
        when_all_down,
        backends,
        allowed_backend_networks,
    })
}

/// Rules that span services: unique names and listeners, reverse
/// translation that can tell replies apart, and `[limits]`.
pub fn check_services(services: &[ServiceConfig], limits: &Limits) -> Result<(), FieldError> {
    check_limits(services, limits).map_err(|e| FieldError::new(&e.path, e.to_string()))?;
    let root = [Seg::Key("services".into())];
    let mut names = HashMap::new();
    let mut listeners = HashMap::new();
    let mut reverse: HashMap<(u16, Protocol), (u16, &str)> = HashMap::new();
    // Replies of backends whose address is rewritten are found by backend
    // address, port and protocol (`LB_REV_ADDRS`): one service each.
    let mut reverse_addr: HashMap<(SocketAddr, Protocol), (SocketAddr, &str)> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        let sp = index(&root, i);
        if let Some(j) = names.insert(s.name.as_str(), i) {
            return Err(FieldError::new(
                &key(&sp, "name"),
                format!("{:?} is also the name of services[{j}]", s.name),
            ));
        }
        for p in &s.protocols {
            if let Some(j) = listeners.insert((s.listen, *p), i) {
                return Err(FieldError::new(
                    &key(&sp, "listen"),
                    format!("services[{j}] already listens on {} {:?}", s.listen, p),
                ));
            }
            // Replies of dsr backends never come back through the balancer.
            let translated = if s.forwarding == Forwarding::Dsr {
                &[][..]
            } else {
                &s.backends[..]
            };
            for (j, b) in translated.iter().enumerate() {
                if rewrites_address(s, b.address) {
                    match reverse_addr.get(&(b.address, *p)) {
                        Some((listen, other)) if *listen != s.listen => {
                            return Err(FieldError::new(
                                &key(&index(&key(&sp, "backends"), j), "address"),
                                format!(
                                    "backend {} ({:?}) serves service {other:?} on {listen} and \
                                     service {:?} on {}; replies could not be told apart: \
                                     give each service backends of its own",
                                    b.address, p, s.name, s.listen
                                ),
                            ));
                        }
                        _ => {
                            reverse_addr.insert((b.address, *p), (s.listen, s.name.as_str()));
                        }
                    }
                }
                let k = (b.address.port(), *p);
                match reverse.get(&k) {
                    Some((port, other)) if *port != s.listen.port() => {
                        return Err(FieldError::new(
                            &key(&sp, "backends"),
                            format!(
                                "backend port {} ({:?}) also serves service {other:?} on port \
                                 {port}; replies could not be told apart: use another backend port",
                                b.address.port(),
                                p
                            ),
                        ));
                    }
                    _ => {
                        reverse.insert(k, (s.listen.port(), s.name.as_str()));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether the data plane rewrites the destination address of packets to
/// this backend (and so translates its replies back by backend address);
/// the same rule as the map writer's.
fn rewrites_address(s: &ServiceConfig, backend: SocketAddr) -> bool {
    crate::dataplane::rewrites_address(s.forwarding, s.listen, backend)
}

impl From<&ServiceConfig> for RawService {
    fn from(s: &ServiceConfig) -> Self {
        RawService {
            name: s.name.clone(),
            listen: s.listen.to_string(),
            protocols: s
                .protocols
                .iter()
                .map(|p| match p {
                    Protocol::Tcp => "tcp".into(),
                    Protocol::Udp => "udp".into(),
                })
                .collect(),
            forwarding: s.forwarding.name().into(),
            health: s.health.as_ref().map(RawHealth::from),
            when_all_down: Some(s.when_all_down.name().into()),
            backends: s.backends.iter().map(RawBackend::from).collect(),
            allowed_backend_networks: (!s.allowed_backend_networks.is_empty()).then(|| {
                s.allowed_backend_networks
                    .iter()
                    .map(|c| c.to_string())
                    .collect()
            }),
        }
    }
}

impl From<&BackendConfig> for RawBackend {
    fn from(b: &BackendConfig) -> Self {
        RawBackend {
            address: b.address.to_string(),
            weight: b.weight as i64,
            state: Some(state_name(b.state).into()),
        }
    }
}

impl From<&CheckSpec> for RawHealth {
    fn from(c: &CheckSpec) -> Self {
        let mut h = RawHealth {
            kind: String::new(),
            path: None,
            host: None,
            sni: None,
            ca_file: None,
            payload: None,
            expect: None,
            interval: Some(format_duration(c.interval)),
            timeout: Some(format_duration(c.timeout)),
            rise: Some(c.rise as i64),
            fall: Some(c.fall as i64),
        };
        match &c.kind {
            CheckKind::Tcp => h.kind = "tcp".into(),
            CheckKind::Http { path, host } => {
                h.kind = "http".into();
                h.path = Some(path.clone());
                h.host = host.clone();
            }
            CheckKind::Https {
                path,
                host,
                sni,
                ca_file,
            } => {
                h.kind = "https".into();
                h.path = Some(path.clone());
                h.host = host.clone();
                h.sni = sni.clone();
                h.ca_file = ca_file.as_ref().map(|p| p.display().to_string());
            }
            CheckKind::Udp { payload, expect } => {
                h.kind = "udp".into();
                h.payload = Some(String::from_utf8_lossy(payload).into_owned());
                h.expect = expect
                    .as_ref()
                    .map(|e| String::from_utf8_lossy(e).into_owned());
            }
        }
        h
    }
}

// ---------------------------------------------------------------------------
// Whole files.

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: path.display().to_string(),
            position: None,
            field: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates configuration text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let span = e.span();
            ConfigError {
                source: file.clone(),
                position: span.as_ref().map(|s| line_col(text, s.start)),
                field: span
                    .map(|s| {
                        let p = path_at(text, s.start);
                        if p.is_empty() {
                            field_by_line(text, s.start)
                        } else {
                            path_string(&p)
                        }
                    })
                    .unwrap_or_default(),
                message: e.message().trim().to_string(),
            }
        })?;
        let place = |fe: FieldError| ConfigError {
            source: file.clone(),
            position: span_of(text, &fe.path).map(|s| line_col(text, s.start)),
            field: path_string(&fe.path),
            message: fe.message,
        };
        let mut config = validate(path, &raw).map_err(place)?;
        config.warnings = local_port_warnings(&config.services, ephemeral_port_range())
            .into_iter()
            .map(place)
            .collect();
        Ok(config)
    }
}

fn validate(path: &Path, raw: &RawFile) -> Result<Config, FieldError> {
    let dp_path = [Seg::Key("dataplane".into())];
    let dp = raw.dataplane.clone().ok_or_else(|| {
        FieldError::new(
            &[],
            "the [dataplane] table is missing; it names the interface",
        )
    })?;
    let interface = match dp.interface {
        Some(i) if i.is_empty() || i.len() > 15 || i.contains(['/', ' ', ':']) => {
            return Err(FieldError::new(
                &key(&dp_path, "interface"),
                format!("{i:?} is not an interface name"),
            ));
        }
        i => i,
    };
    let xdp_mode = match dp.xdp_mode.as_deref().unwrap_or("auto") {
        "auto" => AttachMode::Auto,
        "native" => AttachMode::Native,
        "skb" => AttachMode::Skb,
        other => {
            return Err(FieldError::new(
                &key(&dp_path, "xdp_mode"),
                format!("unknown mode {other:?}; use auto, native or skb"),
            ));
        }
    };
    let mut opts = Options::default();
    if let Some(v) = dp.flow_table_size {
        opts.flow_table_size =
            int_in(&key(&dp_path, "flow_table_size"), v, 1024, 64 * 1024 * 1024)? as u32;
    }
    if let Some(v) = dp.flow_insert_rate {
        opts.flow_insert_rate =
            int_in(&key(&dp_path, "flow_insert_rate"), v, 0, 100_000_000)? as u32;
    }
    if let Some(v) = dp.maglev_table_size {
        let m = int_in(
            &key(&dp_path, "maglev_table_size"),
            v,
            3,
            lb_common::MAX_MAGLEV_SIZE as i64,
        )? as u32;
        maglev::check_size(m)
            .map_err(|e| FieldError::new(&key(&dp_path, "maglev_table_size"), e.to_string()))?;
        opts.maglev_size = m;
    }
    if let Some(v) = dp.max_services {
        opts.max_services = int_in(
            &key(&dp_path, "max_services"),
            v,
            1,
            lb_common::MAX_SERVICES as i64,
        )? as u32;
    }
    let work_limits = parse_limits(&raw.limits, dp.max_services.is_some(), &mut opts)?;
    let pin = dp.pin_path.unwrap_or_else(|| DEFAULT_PIN_PATH.into());
    if !pin.starts_with('/') || pin.len() < 2 {
        return Err(FieldError::new(
            &key(&dp_path, "pin_path"),
            format!("{pin:?} must be an absolute directory on a bpf filesystem"),
        ));
    }
    opts.pin_path = Some(PathBuf::from(pin));
    opts.validate()
        .map_err(|e| FieldError::new(&dp_path, e.to_string()))?;

    let admin_path = [Seg::Key("admin".into())];
    let listen_s = raw
        .admin
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.into());
    let listen = socket_addr(&key(&admin_path, "listen"), &listen_s)?;
    let secret_file = |field: &str, v: &Option<String>| -> Result<Option<PathBuf>, FieldError> {
        let Some(t) = v.as_ref().map(PathBuf::from) else {
            return Ok(None);
        };
        crate::files::read_secret(&t).map_err(|e| {
            FieldError::new(&key(&admin_path, field), format!("{}: {e}", t.display()))
        })?;
        Ok(Some(t))
    };
    let token_file = secret_file("token_file", &raw.admin.token_file)?;
    let read_token_file = secret_file("read_token_file", &raw.admin.read_token_file)?;
    if token_file.is_some() && token_file == read_token_file {
        return Err(FieldError::new(
            &key(&admin_path, "read_token_file"),
            "the read and admin tokens must be different files",
        ));
    }
    if !listen.ip().is_loopback() && token_file.is_none() && read_token_file.is_none() {
        return Err(FieldError::new(
            &key(&admin_path, "listen"),
            format!(
                "the admin API on {listen} would be reachable beyond this host without a token: \
                 set admin.token_file (admin scope) and/or admin.read_token_file (read scope), \
                 or listen on 127.0.0.1 and use the Unix socket"
            ),
        ));
    }
    let socket = match &raw.admin.socket {
        Some(s) if s.starts_with('/') && !s.ends_with('/') => PathBuf::from(s),
        Some(s) => {
            return Err(FieldError::new(
                &key(&admin_path, "socket"),
                format!("{s:?} must be an absolute file path, e.g. \"/run/lb/lb.sock\""),
            ));
        }
        None => default_admin_socket(),
    };
    let mut allowed_hosts = Vec::new();
    for (i, h) in raw.admin.allowed_hosts.iter().flatten().enumerate() {
        let h = h.trim().to_ascii_lowercase();
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !ok {
            return Err(FieldError::new(
                &index(&key(&admin_path, "allowed_hosts"), i),
                format!("{h:?} is not a host name (letters, digits, '.', '-', optional :port)"),
            ));
        }
        allowed_hosts.push(h);
    }
    let change_rate = int_in(
        &key(&admin_path, "change_rate"),
        raw.admin.change_rate.unwrap_or(50),
        1,
        100_000,
    )? as u32;
    let auth_failures_per_minute = int_in(
        &key(&admin_path, "auth_failures_per_minute"),
        raw.admin.auth_failures_per_minute.unwrap_or(10),
        1,
        100_000,
    )? as u32;
    let state_file = raw
        .admin
        .state_file
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| default_state_file(path));

    // The record of the pinned maps sits beside the state file (bpffs
    // holds no regular files), named after the pins: daemons of different
    // config files with the same pins (default state files all live in one
    // directory) read one record.
    opts.record_path = opts
        .pin_path
        .as_deref()
        .map(|pin| record_path(&state_file, pin));

    let defaults = crate::admin::Limits::default();
    let admin_dur = |field: &str, v: &Option<String>, default: Duration| match v {
        Some(v) => parse_duration(v).map_err(|m| FieldError::new(&key(&admin_path, field), m)),
        None => Ok(default),
    };
    let limits = crate::admin::Limits {
        max_connections: match raw.admin.max_connections {
            Some(v) => int_in(&key(&admin_path, "max_connections"), v, 4, 65536)? as usize,
            None => defaults.max_connections,
        },
        header_timeout: admin_dur(
            "header_timeout",
            &raw.admin.header_timeout,
            defaults.header_timeout,
        )?,
        idle_timeout: admin_dur(
            "idle_timeout",
            &raw.admin.idle_timeout,
            defaults.idle_timeout,
        )?,
    };

    let health_max_concurrent = int_in(
        &[Seg::Key("health".into()), Seg::Key("max_concurrent".into())],
        raw.health.max_concurrent.unwrap_or(256),
        1,
        65536,
    )? as usize;

    let mut services = Vec::new();
    for (i, s) in raw.services.iter().enumerate() {
        services.push(service(&index(&[Seg::Key("services".into())], i), s)?);
    }
    check_services(&services, &work_limits)?;
    let policy = Policy {
        allowed_backend_networks: match &raw.policy.allowed_backend_networks {
            Some(list) => networks(
                &[
                    Seg::Key("policy".into()),
                    Seg::Key("allowed_backend_networks".into()),
                ],
                list,
            )?,
            None => Vec::new(),
        },
    };
    check_policy(&services, &policy)?;
    Ok(Config {
        path: path.to_path_buf(),
        interface,
        xdp_mode,
        dataplane: opts,
        admin: AdminConfig {
            listen,
            socket,
            token_file,
            read_token_file,
            metrics_public: raw.admin.metrics_public.unwrap_or(false),
            allowed_hosts,
            change_rate,
            auth_failures_per_minute,
            state_file,
            limits,
        },
        health_max_concurrent,
        services,
        policy,
        limits: work_limits,
        warnings: Vec::new(),
    })
}

/// `[limits]`, bounded by what the kernel maps hold. `dataplane.max_services`
/// sizes the maps; without it, the maps are sized to `limits.max_services`.
fn parse_limits(
    raw: &RawLimits,
    capacity_set: bool,
    opts: &mut Options,
) -> Result<Limits, FieldError> {
    let lp = [Seg::Key("limits".into())];
    let mut limits = Limits::for_dataplane(opts);
    if let Some(v) = raw.max_services {
        let k = key(&lp, "max_services");
        if capacity_set && v > i64::from(opts.max_services) {
            return Err(FieldError::new(
                &k,
                format!(
                    "{v} is more than dataplane.max_services = {}, the services the kernel maps \
                     are sized for; raise dataplane.max_services (or leave it out: it then \
                     follows limits.max_services)",
                    opts.max_services
                ),
            ));
        }
        limits.max_services = int_in(&k, v, 1, i64::from(lb_common::MAX_SERVICES))? as usize;
        if !capacity_set {
            opts.max_services = limits.max_services as u32;
        }
    }
    if let Some(v) = raw.max_backends {
        limits.max_backends = int_in(
            &key(&lp, "max_backends"),
            v,
            1,
            i64::from(lb_common::MAX_BACKENDS),
        )? as usize;
    }
    match raw.max_backends_per_service {
        Some(v) => {
            let k = key(&lp, "max_backends_per_service");
            if v > limits.max_backends as i64 {
                return Err(FieldError::new(
                    &k,
                    format!(
                        "{v} is more than limits.max_backends = {}",
                        limits.max_backends
                    ),
                ));
            }
            limits.max_backends_per_service =
                int_in(&k, v, 1, limits.max_backends as i64)? as usize;
        }
        None => {
            limits.max_backends_per_service =
                limits.max_backends_per_service.min(limits.max_backends);
        }
    }
    Ok(limits)
}

/// The host's `net.ipv4.ip_local_port_range` (it applies to IPv6 too), or
/// `None` when it cannot be read.
pub fn ephemeral_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// Local backends whose port lies in the ephemeral range `range`: the TC
/// egress program rewrites every packet leaving from a backend port, so the
/// host's own outgoing connections that happen to get that source port
/// would leave with the service port instead.
pub fn local_port_warnings(
    services: &[ServiceConfig],
    range: Option<(u16, u16)>,
) -> Vec<FieldError> {
    let Some((lo, hi)) = range else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, s) in services.iter().enumerate() {
        if s.forwarding != Forwarding::Local {
            continue;
        }
        for (j, b) in s.backends.iter().enumerate() {
            let port = b.address.port();
            if (lo..=hi).contains(&port) {
                let path = key(
                    &index(
                        &key(&index(&[Seg::Key("services".into())], i), "backends"),
                        j,
                    ),
                    "address",
                );
                out.push(FieldError::new(
                    &path,
                    format!(
                        "local backend port {port} (service {:?}) is inside \
                         net.ipv4.ip_local_port_range {lo}-{hi}: the host's own outgoing \
                         connections from that port would have their replies rewritten; \
                         use a port outside the range or reserve it with \
                         net.ipv4.ip_local_reserved_ports",
                        s.name
                    ),
                ));
            }
        }
    }
    out
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// The span of the value at `path` in a TOML document.
fn span_of(text: &str, path: &[Seg]) -> Option<Range<usize>> {
    let doc = toml::de::DeTable::parse_recoverable(text).0;
    let mut span = doc.span();
    let mut value = toml::de::DeValue::Table(doc.into_inner());
    for seg in path {
        let next = match (&value, seg) {
            (toml::de::DeValue::Table(t), Seg::Key(k)) => t
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                .map(|(key, v)| (key.span(), v.clone())),
            (toml::de::DeValue::Array(a), Seg::Index(i)) => {
                a.get(*i).map(|v| (v.span(), v.clone()))
            }
            _ => None,
        };
        let Some((key_span, v)) = next else { break };
        // Point at the key for tables, at the value otherwise.
        span = if matches!(v.get_ref(), toml::de::DeValue::Table(_)) {
            key_span
        } else {
            v.span()
        };
        value = v.into_inner();
    }
    Some(span)
}

/// For text too broken to parse: the `key =` on the line of `offset`, under
/// the nearest `[table]` or `[[array]]` header above it.
fn field_by_line(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    });
    let mut table = String::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let n = arrays.entry(name.trim().to_string()).or_insert(0);
            table = format!("{}[{}]", name.trim(), *n);
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = name.trim().to_string();
        }
    }
    match (table.is_empty(), key) {
        (_, None) => table,
        (true, Some(k)) => k.to_string(),
        (false, Some(k)) => format!("{table}.{k}"),
    }
}

/// The deepest field whose value holds `offset`.
fn path_at(text: &str, offset: usize) -> Vec<Seg> {
    let doc = toml::de::DeTable::parse_recoverable(text).0;
    let mut path = Vec::new();
    let mut value = toml::de::DeValue::Table(doc.into_inner());
    loop {
        let next = match &value {
            toml::de::DeValue::Table(t) => t.iter().find_map(|(k, v)| {
                let s = v.span();
                let ks = k.span();
                ((s.start <= offset && offset < s.end) || (ks.start <= offset && offset < ks.end))
                    .then(|| (Seg::Key(k.get_ref().to_string()), v.clone()))
            }),
            toml::de::DeValue::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
                let s = v.span();
                (s.start <= offset && offset < s.end).then(|| (Seg::Index(i), v.clone()))
            }),
            _ => None,
        };
        match next {
            Some((seg, v)) => {
                path.push(seg);
                value = v.into_inner();
            }
            None => return path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c =
            Config::parse(Path::new("lb.toml"), &sized("", "max_services = 20", 20, 1)).unwrap();
        assert_eq!((c.limits.max_services, c.dataplane.max_services), (20, 20));
        // Both: the limit may be lower than the capacity.
        let c = Config::parse(
            Path::new("lb.toml"),
            &sized("max_services = 16", "max_services = 2", 2, 1),
        )
        .unwrap();
        assert_eq!((c.limits.max_services, c.dataplane.max_services), (2, 16));
        // A low total lowers the default per service with it.
        let c =
            Config::parse(Path::new("lb.toml"), &sized("", "max_backends = 10", 1, 10)).unwrap();
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
        let ok = |t: String| {
            Config::parse(Path::new("lb.toml"), &t).unwrap_or_else(|e| panic!("{e}\n{t}"))
        };
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
}
