//! The commands that talk to a running daemon through its admin API:
//! `lb status`, `lb services ...`, `lb backends ...`, `lb reload`, `lb stop`.
//!
//! Exit codes: 0 done; 1 error (the daemon refused or failed: 401, 403,
//! 429, 5xx); 2 bad input (arguments, or the API answered 400, 404, 409,
//! 413); 3 the daemon cannot be reached.
use std::{
    fmt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use lb_userspace::{
    client::Endpoint,
    daemon::{BackendView, ReloadReport, ServiceView, StatusView},
};
use serde_json::{Value, json};

/// How a command failed, for its exit code.
#[derive(Debug)]
pub enum Failure {
    /// The API answered with an error status.
    Api { status: u16, message: String },
    /// No answer: the socket or address cannot be reached.
    Unreachable(String),
    /// The arguments make no sense.
    BadInput(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Api { status, message } => write!(f, "{status}: {message}"),
            Failure::Unreachable(m) | Failure::BadInput(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

/// The exit code of a failed command.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Failure>() {
        Some(
            Failure::Api {
                status: 400 | 404 | 409 | 413 | 422,
                ..
            }
            | Failure::BadInput(_),
        ) => 2,
        Some(Failure::Unreachable(_)) => 3,
        _ => 1,
    }
}

#[derive(Args, Clone, Debug)]
pub struct Client {
    /// The admin API over TCP, e.g. http://127.0.0.1:9180 (then requests
    /// need a token). Default: the admin socket when it exists, else
    /// http://127.0.0.1:9180.
    #[arg(long, env = "LB_API", conflicts_with = "socket")]
    api: Option<String>,
    /// The daemon's admin socket (admin scope, no token needed; default
    /// /run/lb/lb.sock).
    #[arg(long, env = "LB_SOCKET")]
    socket: Option<PathBuf>,
    /// Deprecated: a token on the command line shows in `ps`; use
    /// --token-file or LB_TOKEN.
    #[arg(long, hide = true)]
    token: Option<String>,
    /// File holding a token for the TCP listener (mode 0600, owned by root
    /// or you); or set LB_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    #[default]
    Text,
    /// The API's JSON, for scripts.
    Json,
}

#[derive(Args, Clone, Debug)]
pub struct Output {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// List the services with their backends and health.
    List {
        #[command(flatten)]
        client: Client,
        #[command(flatten)]
        out: Output,
    },
    /// Show one service.
    Show {
        name: String,
        #[command(flatten)]
        client: Client,
        #[command(flatten)]
        out: Output,
    },
    /// Add a service (refused if one has that name; the API's PUT replaces).
    Add {
        name: String,
        /// Service address, e.g. 0.0.0.0:443 or [::]:443.
        #[arg(long, required_unless_present = "json")]
        listen: Option<String>,
        /// tcp and/or udp (repeat the flag); default tcp.
        #[arg(long = "protocol", value_parser = ["tcp", "udp"])]
        protocols: Vec<String>,
        /// local, nat or dsr; default local.
        #[arg(long, value_parser = ["local", "nat", "dsr"])]
        forwarding: Option<String>,
        /// keep_last or refuse; default keep_last.
        #[arg(long, value_parser = ["keep_last", "refuse"])]
        when_all_down: Option<String>,
        /// A backend as ADDRESS or ADDRESS=WEIGHT (repeat the flag).
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// The whole service as the API's JSON body, from a file or `-` for
        /// stdin, instead of the flags.
        #[arg(long, conflicts_with_all = ["listen", "protocols", "forwarding", "when_all_down", "backends"])]
        json: Option<PathBuf>,
        #[command(flatten)]
        client: Client,
    },
    /// Remove a service; its flows stop being balanced.
    Remove {
        name: String,
        #[command(flatten)]
        client: Client,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// List a service's backends.
    List {
        /// Service name.
        #[arg(long, short)]
        service: String,
        #[command(flatten)]
        client: Client,
        #[command(flatten)]
        out: Output,
    },
    /// Add a backend to a service.
    Add {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 100)]
        weight: u16,
    },
    /// Remove a backend from a service.
    Remove {
        #[command(flatten)]
        target: Target,
    },
    /// Stop sending new flows to a backend; its open flows finish.
    Drain {
        #[command(flatten)]
        target: Target,
    },
    /// Take a backend out at once, open flows included (it stays
    /// configured; `activate` brings it back).
    Disable {
        #[command(flatten)]
        target: Target,
    },
    /// Put a drained or disabled backend back in service.
    Activate {
        #[command(flatten)]
        target: Target,
    },
    /// Change a backend's weight (0..=65535).
    Weight {
        #[command(flatten)]
        target: Target,
        weight: u16,
    },
}

#[derive(Args, Debug)]
pub struct Target {
    /// Service name.
    #[arg(long, short)]
    service: String,
    /// Backend address, e.g. 127.0.0.1:8001.
    address: String,
    #[command(flatten)]
    client: Client,
}

impl Client {
    fn token(&self) -> Result<Option<String>> {
        if let Some(p) = &self.token_file {
            return Ok(Some(read_token(p)?));
        }
        if let Some(t) = std::env::var("LB_TOKEN").ok().filter(|t| !t.is_empty()) {
            return Ok(Some(t));
        }
        if let Some(t) = &self.token {
            eprintln!(
                "warning: --token is deprecated (the token shows in `ps`); use --token-file or LB_TOKEN"
            );
            return Ok(Some(t.clone()));
        }
        Ok(None)
    }

    /// Where to send requests: --api, else --socket, else the default
    /// socket when it exists, else the default TCP address.
    fn endpoint(&self) -> Result<Endpoint> {
        if let Some(api) = &self.api {
            return Endpoint::parse(api)
                .map_err(|e| Failure::BadInput(format!("--api {e}")).into());
        }
        if let Some(s) = &self.socket {
            return Ok(Endpoint::Unix(s.clone()));
        }
        let default = lb_userspace::config::default_admin_socket();
        if default.exists() {
            return Ok(Endpoint::Unix(default));
        }
        Ok(Endpoint::Tcp(
            lb_userspace::config::DEFAULT_ADMIN_LISTEN.to_string(),
        ))
    }

    /// One API call; the answer's JSON, or a [`Failure`].
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let to = self.endpoint()?;
        // Tokens are for the TCP listener; the socket needs none.
        let token = match to {
            Endpoint::Tcp(_) => self.token()?,
            Endpoint::Unix(_) => None,
        };
        let body = body.map(|b| b.to_string());
        // Over the change rate (429), wait as told, for 10 s at most.
        let give_up = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            let answer = lb_userspace::client::request(
                &to,
                method,
                &format!("/api/v1{path}"),
                body.as_deref().map(str::as_bytes),
                token.as_deref(),
                Duration::from_secs(10),
            )
            .map_err(|e| {
                Failure::Unreachable(format!("cannot reach the admin API at {to}: {e}"))
            })?;
            let wait = Duration::from_secs(answer.retry_after.unwrap_or(1).max(1));
            if answer.status != 429 || Instant::now() + wait > give_up {
                break answer;
            }
            std::thread::sleep(wait);
        };
        let text = String::from_utf8_lossy(&answer.body);
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if answer.status >= 400 {
            let message = serde_json::from_value::<lb_userspace::api::ErrorBody>(value)
                .map_or_else(|_| text.trim().to_string(), |e| e.error);
            return Err(Failure::Api {
                status: answer.status,
                message: format!("{method} {path}: {message}"),
            }
            .into());
        }
        Ok(value)
    }
}

fn read_token(p: &Path) -> Result<String> {
    lb_userspace::files::read_secret(p).with_context(|| format!("token file {}", p.display()))
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn stop(client: &Client) -> Result<()> {
    let v = client.call("POST", "/stop", Some(json!({})))?;
    println!(
        "{}",
        typed::<lb_userspace::api::StopBody>("POST /stop", v)?.status
    );
    // Done when the API is gone (the daemon exits after detaching).
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if client.call("GET", "/healthz", None).is_err() {
            println!("stopped");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the daemon still answers 15 s after `lb stop`")
}

pub fn reload(client: &Client) -> Result<()> {
    let v = client.call("POST", "/reload", Some(json!({})))?;
    let r: ReloadReport = typed("POST /reload", v)?;
    if r.applied {
        println!("config reloaded: services changed and applied");
    } else {
        println!("config reloaded: services unchanged");
    }
    for d in &r.dropped_changes {
        println!("API change dropped (the config changed since it was made): {d}");
    }
    for n in &r.needs_restart {
        println!("note: {n}");
    }
    Ok(())
}

/// The API's JSON read as this lb's own types (the daemon's answer for
/// the same version), or a clear error.
fn typed<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).with_context(|| {
        format!(
            "the daemon's answer to {what} does not match this lb's API types (another version?)"
        )
    })
}

/// `lb status`: the daemon (`GET /status`) and its services (`GET
/// /services`); as JSON, `{"daemon": ..., "services": [...]}`.
pub fn status(client: &Client, out: &Output) -> Result<()> {
    let st = client.call("GET", "/status", None);
    let services = client.call("GET", "/services", None)?;
    if out.output == Format::Json {
        return print_json(&json!({ "daemon": st.unwrap_or(Value::Null), "services": services }));
    }
    if let Ok(st) = st {
        let st: StatusView = typed("GET /status", st)?;
        println!(
            "config {} (services {}), state file {}",
            st.config,
            if st.api_changes {
                "with API changes"
            } else {
                "as in the file"
            },
            st.state_file,
        );
        println!(
            "attached: {}",
            match st.attach_mode {
                lb_userspace::dataplane::AttachMode::Tc =>
                    "TC ingress (socket buffers, GRO/GSO kept)",
                lb_userspace::dataplane::AttachMode::Native => "XDP, native",
                lb_userspace::dataplane::AttachMode::Skb => "XDP, generic",
                lb_userspace::dataplane::AttachMode::Auto =>
                    "XDP (native if the driver supports it)",
            }
        );
        if !st.flow_hash.is_empty() {
            println!("flow hash: {}", st.flow_hash);
        }
        let l = st.limits;
        println!(
            "limits: {} services, {} backends a service, {} backends in all",
            l.max_services, l.max_backends_per_service, l.max_backends
        );
        if !st.pins_outlive_daemon {
            println!(
                "WARNING: the pins die with the daemon; restarts are not hitless (see the log)"
            );
        }
        if let Some(e) = &st.last_reload_error {
            println!("last reload failed: {e}");
        }
        for d in &st.dropped_changes {
            println!("API change dropped (the config changed since it was made): {d}");
        }
        if let Some(c) = &st.cluster {
            println!(
                "cluster {} as node {}: etcd {}, services at revision {}",
                c.name,
                c.node,
                match (&c.connected, &c.endpoint) {
                    (true, Some(e)) => format!("connected ({e})"),
                    (true, None) => "connected".to_string(),
                    (false, _) => "UNREACHABLE (serving the last applied state)".to_string(),
                },
                c.revision
            );
            println!("  live nodes: {}", c.nodes.join(", "));
            if !c.synced {
                println!(
                    "  NOT SYNCED: etcd's services not taken since the daemon started; \
                     announcing nothing until they are"
                );
            }
            if !c.backends_down.is_empty() {
                println!(
                    "  out by the cluster's health rule (down on a majority of live nodes): {}",
                    c.backends_down.join(", ")
                );
            }
            if let Some(e) = &c.last_error {
                println!("  last cluster error: {e}");
            }
        }
        if let Some(p) = &st.pin_sync {
            println!(
                "pin sync on {}: peers [{}]; pins sent {}, received {}, inserted {}",
                p.listen,
                p.peers.join(", "),
                p.sent,
                p.received,
                p.inserted
            );
            let dropped: Vec<String> = p
                .dropped
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            if !dropped.is_empty() {
                println!("  dropped: {}", dropped.join(", "));
            }
            let j = &p.join;
            println!(
                "  join: {}{}{}, {} pins taken, {} requests{}; answered {} joins with {} pins",
                j.state,
                if j.peers.is_empty() {
                    String::new()
                } else {
                    format!(" from {}", j.peers.join(", "))
                },
                if j.missing.is_empty() {
                    String::new()
                } else {
                    format!(" (not {})", j.missing.join(", "))
                },
                j.pins,
                j.requests,
                j.took_ms
                    .map(|t| format!(", took {t} ms"))
                    .unwrap_or_default(),
                p.join_answers,
                p.join_pins_sent
            );
        }
    }
    let services: Vec<ServiceView> = typed("GET /services", services)?;
    for s in &services {
        print_service(s);
    }
    Ok(())
}

fn print_service(s: &ServiceView) {
    println!(
        "{} {} {} ({})",
        s.name,
        s.listen,
        s.protocols
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join("+"),
        s.forwarding.name()
    );
    if let Some(q) = &s.quic {
        println!(
            "  QUIC-LB: config id {}, server id {} bytes, nonce {} bytes, {}",
            q.config_id,
            q.server_id_len,
            q.nonce_len,
            q.mode.unwrap_or_default().name()
        );
    }
    if let Some(fp) = &s.table_fingerprint {
        println!("  table fingerprint {fp}");
    }
    match (&s.cluster_fingerprint, &s.table_fingerprint) {
        (Some(c), Some(own)) if c == own => println!("  cluster's table: the same"),
        (Some(c), _) => println!("  cluster's table: {c} (DIFFERS from this node's)"),
        _ => {}
    }
    if let Some(a) = &s.announce {
        println!(
            "  BGP: {} ({})",
            if a.announced {
                "announced"
            } else {
                "NOT announced"
            },
            a.reason.name()
        );
    }
    if s.fail_open {
        println!(
            "  FAIL-OPEN: every backend failed its health checks; the last ones keep taking flows \
             (when_all_down = keep_last)"
        );
    }
    for b in &s.backends {
        print_backend(b);
    }
}

fn print_backend(b: &BackendView) {
    println!(
        "  {:<28} weight {:>5}  {:<9} {}{}",
        b.address,
        b.weight,
        b.state.name(),
        if b.healthy { "healthy" } else { "UNHEALTHY" },
        b.last_error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default(),
    );
    if let Some(id) = &b.server_id {
        println!("  {:<28} server id {id}", "");
    }
}

/// A `--backend` value: ADDRESS or ADDRESS=WEIGHT.
fn backend_arg(s: &str) -> Result<Value> {
    match s.split_once('=') {
        None => Ok(json!({ "address": s })),
        Some((addr, w)) => {
            let weight: u16 = w.parse().map_err(|_| {
                Failure::BadInput(format!("--backend {s}: the weight must be 0..=65535"))
            })?;
            Ok(json!({ "address": addr, "weight": weight }))
        }
    }
}

fn service_path(name: &str) -> String {
    format!("/services/{name}")
}

pub fn services(cmd: ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::List { client, out } => {
            let v = client.call("GET", "/services", None)?;
            if out.output == Format::Json {
                return print_json(&v);
            }
            for s in &typed::<Vec<ServiceView>>("GET /services", v)? {
                print_service(s);
            }
            Ok(())
        }
        ServiceCmd::Show { name, client, out } => {
            let v = client.call("GET", &service_path(&name), None)?;
            if out.output == Format::Json {
                return print_json(&v);
            }
            print_service(&typed("GET /services/{name}", v)?);
            Ok(())
        }
        ServiceCmd::Add {
            name,
            listen,
            protocols,
            forwarding,
            when_all_down,
            backends,
            json,
            client,
        } => {
            let body = if let Some(p) = json {
                let text = if p.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&p)
                        .map_err(|e| Failure::BadInput(format!("{}: {e}", p.display())))?
                };
                serde_json::from_str::<Value>(&text)
                    .map_err(|e| Failure::BadInput(format!("{}: {e}", p.display())))?
            } else {
                let mut body = json!({
                    "listen": listen.ok_or_else(|| anyhow!("--listen is required"))?,
                    "protocols": if protocols.is_empty() { vec!["tcp".to_string()] } else { protocols },
                    "backends": backends.iter().map(|b| backend_arg(b)).collect::<Result<Vec<_>>>()?,
                });
                if let Some(f) = forwarding {
                    body["forwarding"] = json!(f);
                }
                if let Some(w) = when_all_down {
                    body["when_all_down"] = json!(w);
                }
                body
            };
            match client.call("GET", &service_path(&name), None) {
                Ok(_) => {
                    return Err(Failure::Api {
                        status: 409,
                        message: format!(
                            "service {name:?} exists; remove it first, or PUT \
                             /api/v1/services/{name} to replace it"
                        ),
                    }
                    .into());
                }
                Err(e)
                    if matches!(
                        e.downcast_ref::<Failure>(),
                        Some(Failure::Api { status: 404, .. })
                    ) => {}
                Err(e) => return Err(e),
            }
            client.call("PUT", &service_path(&name), Some(body))?;
            println!("service {name}: added");
            Ok(())
        }
        ServiceCmd::Remove { name, client } => {
            client.call("DELETE", &service_path(&name), None)?;
            println!("service {name}: removed");
            Ok(())
        }
    }
}

pub fn backends(cmd: BackendCmd) -> Result<()> {
    let path = |t: &Target| format!("/services/{}/backends/{}", t.service, t.address);
    let patch = |t: &Target, body: Value| t.client.call("PATCH", &path(t), Some(body));
    let (t, result) = match &cmd {
        BackendCmd::List {
            service,
            client,
            out,
        } => {
            let v = client.call("GET", &format!("/services/{service}/backends"), None)?;
            if out.output == Format::Json {
                return print_json(&v);
            }
            for b in &typed::<Vec<BackendView>>("GET /services/{name}/backends", v)? {
                print_backend(b);
            }
            return Ok(());
        }
        BackendCmd::Add { target, weight } => (
            target,
            target.client.call(
                "POST",
                &format!("/services/{}/backends", target.service),
                Some(json!({"address": target.address, "weight": weight})),
            ),
        ),
        BackendCmd::Remove { target } => {
            (target, target.client.call("DELETE", &path(target), None))
        }
        BackendCmd::Drain { target } => (target, patch(target, json!({"state": "draining"}))),
        BackendCmd::Disable { target } => (target, patch(target, json!({"state": "disabled"}))),
        BackendCmd::Activate { target } => (target, patch(target, json!({"state": "active"}))),
        BackendCmd::Weight { target, weight } => (target, patch(target, json!({"weight": weight}))),
    };
    result?;
    println!("{} {}: done", t.service, t.address);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_failure() {
        let api = |status| {
            anyhow::Error::from(Failure::Api {
                status,
                message: String::new(),
            })
        };
        for (e, want) in [
            (api(400), 2),
            (api(404), 2),
            (api(409), 2),
            (api(413), 2),
            (api(401), 1),
            (api(403), 1),
            (api(429), 1),
            (api(500), 1),
            (Failure::Unreachable(String::new()).into(), 3),
            (Failure::BadInput(String::new()).into(), 2),
            (anyhow!("other"), 1),
        ] {
            assert_eq!(exit_code(&e), want, "{e:?}");
        }
    }

    #[test]
    fn backend_arguments_take_an_optional_weight() {
        assert_eq!(
            backend_arg("127.0.0.1:8001").unwrap(),
            json!({"address": "127.0.0.1:8001"})
        );
        assert_eq!(
            backend_arg("[::1]:8001=50").unwrap(),
            json!({"address": "[::1]:8001", "weight": 50})
        );
        assert!(backend_arg("127.0.0.1:8001=x").is_err());
        assert!(backend_arg("127.0.0.1:8001=70000").is_err());
    }
}
