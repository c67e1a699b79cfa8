//! Wire -> model: every rule a service, backend or health check must
//! follow, the rules that span services, `[policy]` and `[limits]`, in one
//! place for every source (file, reload, API, state file).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    duration::format_duration,
    errors::{FieldError, LimitError, Seg, index, key},
    model::{
        AddressRule, BackendConfig, Cidr, Limits, Policy, ServiceConfig, forbidden_backend_ip,
    },
    wire::{HealthKind, RawBackend, RawHealth, RawService},
};
use crate::{
    dataplane::{AttachMode, Forwarding, Protocol},
    health::{CheckKind, CheckSpec},
};

/// Health check timing when the service does not say.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

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

pub(super) fn networks(path: &[Seg], list: &[String]) -> Result<Vec<Cidr>, FieldError> {
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
        .map(ToString::to_string)
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

pub(super) fn socket_addr(path: &[Seg], s: &str) -> Result<SocketAddr, FieldError> {
    s.parse::<SocketAddr>().map_err(|_| {
        FieldError::new(
            path,
            format!(
                "{s:?} is not an address with a port (e.g. \"127.0.0.1:8001\" or \"[::1]:8001\")"
            ),
        )
    })
}

pub(super) fn int_in(path: &[Seg], v: i64, lo: i64, hi: i64) -> Result<i64, FieldError> {
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
    let state = raw.state.unwrap_or_default();
    Ok(BackendConfig {
        address,
        weight,
        state,
        server_id: match &raw.server_id {
            Some(s) => Some(
                super::quic::ServerId::parse(s)
                    .map_err(|m| FieldError::new(&key(path, "server_id"), m))?,
            ),
            None => None,
        },
    })
}

fn health(path: &[Seg], raw: &RawHealth) -> Result<CheckSpec, FieldError> {
    let interval = raw.interval.map_or(DEFAULT_INTERVAL, |d| d.0);
    let timeout = raw.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
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
                    format!("does not apply to {} checks", raw.kind.name()),
                ));
            }
        }
        Ok(())
    };
    let kind = match raw.kind {
        HealthKind::Tcp => {
            only(&[])?;
            CheckKind::Tcp
        }
        HealthKind::Http => {
            only(&["path", "host"])?;
            CheckKind::Http {
                path: http_path(&raw.path)?,
                host: raw.host.clone(),
            }
        }
        HealthKind::Https => {
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
        HealthKind::Udp => {
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
    for (i, &proto) in raw.protocols.iter().enumerate() {
        if protocols.contains(&proto) {
            return Err(FieldError::new(
                &index(&key(path, "protocols"), i),
                format!("{:?} is listed twice", proto.name()),
            ));
        }
        protocols.push(proto);
    }
    let forwarding = raw.forwarding;
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
    let when_all_down = raw.when_all_down.unwrap_or_default();
    let allowed_backend_networks = match &raw.allowed_backend_networks {
        Some(list) => networks(&key(path, "allowed_backend_networks"), list)?,
        None => Vec::new(),
    };
    let quic = match &raw.quic {
        Some(q) => Some(super::quic::quic(&key(path, "quic"), q, &protocols)?),
        None => None,
    };
    let mut backends = Vec::new();
    let mut seen = HashSet::new();
    for (i, b) in raw.backends.iter().enumerate() {
        let bp = index(&key(path, "backends"), i);
        let b = backend(&bp, b)?;
        super::quic::server_id(&bp, b.server_id.as_ref(), quic.as_ref())?;
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
        once(&mut seen, &bp, b.address)?;
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
    let s = ServiceConfig {
        name: raw.name.clone(),
        listen,
        protocols,
        forwarding,
        health,
        when_all_down,
        backends,
        allowed_backend_networks,
        quic,
    };
    super::quic::check_unique(path, &s)?;
    Ok(s)
}

/// A backend address listed once per service.
fn once(seen: &mut HashSet<SocketAddr>, at: &[Seg], address: SocketAddr) -> Result<(), FieldError> {
    if seen.insert(address) {
        return Ok(());
    }
    Err(FieldError::new(
        &key(at, "address"),
        format!("backend {address} is listed twice"),
    ))
}

/// What the rules across services read of a service: the model's
/// [`ServiceConfig`] and the map writer's `ServiceSpec` (which is built
/// from it) both answer, so both are checked by [`check_conflicts`].
pub trait ServiceShape {
    fn name(&self) -> &str;
    fn listen(&self) -> SocketAddr;
    fn protocols(&self) -> &[Protocol];
    fn forwarding(&self) -> Forwarding;
    fn backend_addresses(&self) -> impl Iterator<Item = SocketAddr> + '_;
}

/// Implements [`ServiceShape`] for a type with the fields of a service
/// (`name`, `listen`, `protocols`, `forwarding`, `backends[].address`).
macro_rules! service_shape {
    ($ty:ty) => {
        impl $crate::config::ServiceShape for $ty {
            fn name(&self) -> &str {
                &self.name
            }
            fn listen(&self) -> std::net::SocketAddr {
                self.listen
            }
            fn protocols(&self) -> &[$crate::dataplane::Protocol] {
                &self.protocols
            }
            fn forwarding(&self) -> $crate::dataplane::Forwarding {
                self.forwarding
            }
            fn backend_addresses(&self) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
                self.backends.iter().map(|b| b.address)
            }
        }
    };
}
pub(crate) use service_shape;

service_shape!(ServiceConfig);

/// Why a whole set of services was refused, by the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    Limits(LimitError),
    Conflict(FieldError),
    Policy(FieldError),
}

impl std::fmt::Display for SetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetError::Limits(e) => write!(f, "{e}"),
            SetError::Conflict(e) | SetError::Policy(e) => write!(f, "{}", e.clone().in_body()),
        }
    }
}

/// The checks a set of services made by the API (or read back from the
/// state file) must pass: `[limits]`, the rules between services, then
/// `[policy]`.
pub fn check_set(
    services: &[ServiceConfig],
    limits: &Limits,
    policy: &Policy,
) -> Result<(), SetError> {
    check_limits(services, limits).map_err(SetError::Limits)?;
    check_conflicts(services).map_err(SetError::Conflict)?;
    check_policy(services, policy).map_err(SetError::Policy)
}

/// TC mode (`xdp_mode = "tc"`, or what `auto` chose on a veth) runs
/// `local` services only: `nat` and `dsr` send frames back out or to
/// another interface (XDP_TX, redirects), which only the XDP program does.
pub fn check_attach<S: ServiceShape>(services: &[S], mode: AttachMode) -> Result<(), FieldError> {
    if mode != AttachMode::Tc {
        return Ok(());
    }
    let root = [Seg::Key("services".into())];
    for (i, s) in services.iter().enumerate() {
        if s.forwarding() != Forwarding::Local {
            return Err(FieldError::new(
                &key(&index(&root, i), "forwarding"),
                format!(
                    "service {:?}: forwarding = \"{}\" needs XDP, and the data plane is attached \
                     in TC mode (dataplane.xdp_mode = \"tc\", or \"auto\" on a veth with only \
                     local services); set xdp_mode = \"native\" (and restart) to run nat/dsr services",
                    s.name(),
                    s.forwarding().name()
                ),
            ));
        }
    }
    Ok(())
}

/// Rules that span services: `[limits]`, then [`check_conflicts`].
pub fn check_services(services: &[ServiceConfig], limits: &Limits) -> Result<(), FieldError> {
    check_limits(services, limits).map_err(|e| FieldError::new(&e.path, e.to_string()))?;
    check_conflicts(services)
}

/// Unique names and listeners, backends listed once per service, and
/// reverse translation that can tell replies apart: the one check for
/// every source of services and for the map writer.
pub fn check_conflicts<S: ServiceShape>(services: &[S]) -> Result<(), FieldError> {
    let root = [Seg::Key("services".into())];
    let mut names = HashMap::new();
    let mut listeners = HashMap::new();
    let mut reverse: HashMap<(u16, Protocol), (u16, &str)> = HashMap::new();
    // Replies of backends whose address is rewritten are found by backend
    // address, port and protocol (`LB_REV_ADDRS`): one service each.
    let mut reverse_addr: HashMap<(SocketAddr, Protocol), (SocketAddr, &str)> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        let sp = index(&root, i);
        let (name, listen, forwarding) = (s.name(), s.listen(), s.forwarding());
        if let Some(j) = names.insert(name, i) {
            return Err(FieldError::new(
                &key(&sp, "name"),
                format!("{name:?} is also the name of services[{j}]"),
            ));
        }
        let mut seen = HashSet::new();
        for (j, b) in s.backend_addresses().enumerate() {
            once(&mut seen, &index(&key(&sp, "backends"), j), b)?;
        }
        for p in s.protocols() {
            if let Some(j) = listeners.insert((listen, *p), i) {
                return Err(FieldError::new(
                    &key(&sp, "listen"),
                    format!("services[{j}] already listens on {listen} {p:?}"),
                ));
            }
            // Replies of dsr backends never come back through the balancer.
            if forwarding == Forwarding::Dsr {
                continue;
            }
            for (j, b) in s.backend_addresses().enumerate() {
                if crate::dataplane::rewrites_address(forwarding, listen, b) {
                    match reverse_addr.get(&(b, *p)) {
                        Some((other_listen, other)) if *other_listen != listen => {
                            return Err(FieldError::new(
                                &key(&index(&key(&sp, "backends"), j), "address"),
                                format!(
                                    "backend {b} ({p:?}) serves service {other:?} on \
                                     {other_listen} and service {name:?} on {listen}; replies \
                                     could not be told apart: give each service backends of its \
                                     own"
                                ),
                            ));
                        }
                        _ => {
                            reverse_addr.insert((b, *p), (listen, name));
                        }
                    }
                }
                let k = (b.port(), *p);
                match reverse.get(&k) {
                    Some((port, other)) if *port != listen.port() => {
                        return Err(FieldError::new(
                            &key(&sp, "backends"),
                            format!(
                                "backend port {} ({p:?}) also serves service {other:?} on port \
                                 {port}; replies could not be told apart: use another backend port",
                                b.port(),
                            ),
                        ));
                    }
                    _ => {
                        reverse.insert(k, (listen.port(), name));
                    }
                }
            }
        }
    }
    Ok(())
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
