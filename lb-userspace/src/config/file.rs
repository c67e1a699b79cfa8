//! A whole config file: TOML -> wire -> model, the `[dataplane]`,
//! `[admin]`, `[health]` and `[limits]` sections, errors placed at their
//! file position.

use std::path::{Path, PathBuf};

use super::{
    errors::{ConfigError, FieldError, Seg, index, key, path_string},
    model::{AdminConfig, ClusterConfig, Config, EtcdEndpoint, Limits, Policy},
    paths::{
        DEFAULT_ADMIN_LISTEN, DEFAULT_PIN_PATH, default_admin_socket, default_state_file,
        record_path,
    },
    spans::{Spans, serde_path},
    validate::{
        check_attach, check_policy, check_services, ephemeral_port_range, int_in,
        local_port_warnings, networks, service, socket_addr,
    },
    wire::{RawCluster, RawFile, RawLimits},
};
use crate::{dataplane::Options, maglev};

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
        let spans = Spans::new(text);
        let parsed = toml::Deserializer::parse(text)
            .map_err(|e| (Vec::new(), e))
            .and_then(|de| {
                serde_path_to_error::deserialize::<_, RawFile>(de)
                    .map_err(|e| (serde_path(e.path()), e.into_inner()))
            });
        let raw = parsed.map_err(|(at, e)| {
            let span = e.span();
            ConfigError {
                source: file.clone(),
                position: span.as_ref().map(|s| spans.line_col(s.start)),
                field: spans.field_of(at, span),
                message: e.message().trim().to_string(),
            }
        })?;
        let place = |fe: FieldError| ConfigError {
            source: file.clone(),
            position: Some(spans.line_col(spans.of(&fe.path).start)),
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
    let xdp_mode = dp.xdp_mode.unwrap_or_default();
    let mut opts = Options::default();
    if let Some(v) = dp.flow_table_size {
        opts.flow_table_size =
            int_in(&key(&dp_path, "flow_table_size"), v, 1024, 64 * 1024 * 1024)? as u32;
    }
    if let Some(v) = dp.flow_insert_rate {
        opts.flow_insert_rate =
            int_in(&key(&dp_path, "flow_insert_rate"), v, 0, 100_000_000)? as u32;
    }
    if let Some(name) = &dp.flow_hash {
        opts.flow_hash = Some(lb_common::FlowHash::from_name(name).ok_or_else(|| {
            FieldError::new(
                &key(&dp_path, "flow_hash"),
                format!("{name:?} is not a flow hash: \"fast\" or \"murmur3\""),
            )
        })?);
    }
    if let Some(v) = dp.maglev_table_size {
        let m = int_in(
            &key(&dp_path, "maglev_table_size"),
            v,
            3,
            i64::from(lb_common::MAX_MAGLEV_SIZE),
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
            i64::from(lb_common::MAX_SERVICES),
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
        .map_or_else(|| default_state_file(path), PathBuf::from);

    // The record of the pinned maps sits beside the state file (bpffs
    // holds no regular files), named after the pins: daemons of different
    // config files with the same pins (default state files all live in one
    // directory) read one record.
    opts.record_path = opts
        .pin_path
        .as_deref()
        .map(|pin| record_path(&state_file, pin));

    let defaults = crate::admin::Limits::default();
    let limits = crate::admin::Limits {
        max_connections: match raw.admin.max_connections {
            Some(v) => int_in(&key(&admin_path, "max_connections"), v, 4, 65536)? as usize,
            None => defaults.max_connections,
        },
        header_timeout: raw
            .admin
            .header_timeout
            .map_or(defaults.header_timeout, |d| d.0),
        idle_timeout: raw
            .admin
            .idle_timeout
            .map_or(defaults.idle_timeout, |d| d.0),
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
    check_attach(&services, xdp_mode)?;
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
    let bgp = super::bgp::parse(raw.bgp.as_ref())?;
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
        bgp,
        warnings: Vec::new(),
        cluster: raw.cluster.as_ref().map(parse_cluster).transpose()?,
    })
}

/// `[cluster]`: every key required but the TLS files; names safe in an
/// etcd key; endpoints `http(s)://host:port`.
fn parse_cluster(raw: &RawCluster) -> Result<ClusterConfig, FieldError> {
    let at = [Seg::Key("cluster".into())];
    let name_rule = |k: &str, v: &Option<String>| -> Result<String, FieldError> {
        let v = v.as_deref().ok_or_else(|| {
            FieldError::new(
                &key(&at, k),
                format!("cluster.{k} is required in [cluster]"),
            )
        })?;
        let ok = !v.is_empty()
            && v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            return Err(FieldError::new(
                &key(&at, k),
                format!(
                    "{v:?} is not a valid name: 1 to 63 characters of letters, digits, '-', '_' \
                     and '.'"
                ),
            ));
        }
        Ok(v.to_string())
    };
    let node = name_rule("node", &raw.node)?;
    let name = name_rule("name", &raw.name)?;
    let ep_path = key(&at, "etcd_endpoints");
    let list = raw.etcd_endpoints.as_deref().unwrap_or_default();
    if list.is_empty() {
        return Err(FieldError::new(
            &ep_path,
            "give at least one etcd endpoint, e.g. [\"http://10.0.0.1:2379\"]",
        ));
    }
    if list.len() > 16 {
        return Err(FieldError::new(&ep_path, "at most 16 etcd endpoints"));
    }
    let mut endpoints: Vec<EtcdEndpoint> = Vec::new();
    for (i, url) in list.iter().enumerate() {
        let ep = etcd_endpoint(url).map_err(|m| FieldError::new(&index(&ep_path, i), m))?;
        if endpoints.contains(&ep) {
            return Err(FieldError::new(
                &index(&ep_path, i),
                format!("{url:?} is listed twice"),
            ));
        }
        endpoints.push(ep);
    }
    let file = |k: &str, v: &Option<String>| -> Result<Option<PathBuf>, FieldError> {
        match v.as_deref() {
            Some("") => Err(FieldError::new(&key(&at, k), "empty path")),
            other => Ok(other.map(PathBuf::from)),
        }
    };
    let ca_file = file("ca_file", &raw.ca_file)?;
    let cert_file = file("cert_file", &raw.cert_file)?;
    let key_file = file("key_file", &raw.key_file)?;
    if cert_file.is_some() != key_file.is_some() {
        let missing = if cert_file.is_some() {
            "key_file"
        } else {
            "cert_file"
        };
        return Err(FieldError::new(
            &key(&at, missing),
            "cert_file and key_file go together (the client certificate and its key)",
        ));
    }
    let tls_files = ca_file.is_some() || cert_file.is_some();
    if tls_files && endpoints.iter().all(|e| !e.tls) {
        return Err(FieldError::new(
            &ep_path,
            "TLS files are set but no endpoint is https://: they would never be used",
        ));
    }
    let pin_sync = raw
        .pin_sync
        .as_ref()
        .map(|p| super::pin_sync::parse(&at, p))
        .transpose()?;
    Ok(ClusterConfig {
        endpoints,
        node,
        name,
        ca_file,
        cert_file,
        key_file,
        pin_sync,
    })
}

/// `http://host:port` or `https://host:port` (a trailing `/` allowed).
fn etcd_endpoint(url: &str) -> Result<EtcdEndpoint, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "{url:?} is not an etcd client URL: http://host:port or https://host:port"
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let bad =
        || format!("{url:?} is not an etcd client URL: http://host:port or https://host:port");
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(bad());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
        _ => {
            return Err(format!(
                "{url:?} names no port (etcd's client port is usually 2379)"
            ));
        }
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{url:?}: port out of range"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['[', ']', ' ']) {
        return Err(bad());
    }
    Ok(EtcdEndpoint {
        tls,
        authority: authority.to_string(),
        host: host.to_string(),
        port,
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
