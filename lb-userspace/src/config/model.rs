//! The domain model: a validated config, its services and backends,
//! `[limits]`, `[policy]` and its networks, and the backend address rules.
//! Built only by `validate` and `file`.

use std::{fmt, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::errors::ConfigError;
use crate::{
    dataplane::{AdminState, AttachMode, Forwarding, Options, Protocol, WhenAllDown},
    health::CheckSpec,
};

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
    /// `[bgp]`: announce service addresses through BIRD (None: never).
    pub bgp: Option<super::bgp::BgpConfig>,
    /// Things that work but may hurt (e.g. a local backend port inside the
    /// host's ephemeral port range), placed in the file like errors.
    pub warnings: Vec<ConfigError>,
    /// `[cluster]`: the services' desired state is shared in etcd.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub endpoints: Vec<EtcdEndpoint>,
    pub node: String,
    pub name: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Flow pins of changed slots shared with the other nodes.
    pub pin_sync: Option<super::pin_sync::PinSyncConfig>,
}

/// One etcd member's client URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    pub tls: bool,
    /// `host:port`, what the connection and the Host header use.
    pub authority: String,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for EtcdEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

impl ClusterConfig {
    /// The prefix of every key of this cluster.
    pub fn prefix(&self) -> String {
        format!("/lb/{}/", self.name)
    }
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
    /// QUIC-LB: route UDP short-header packets by the server id in their CID.
    pub quic: Option<super::quic::QuicConfig>,
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
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u16,
    pub state: AdminState,
    /// QUIC-LB server id as configured (the daemon assigns one when absent).
    pub server_id: Option<super::quic::ServerId>,
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

    pub(super) fn why(self) -> &'static str {
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
