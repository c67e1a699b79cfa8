//! Who may do what on the admin API, and the audit trail of changes.
//!
//! - The Unix socket (0600, root's) has the `admin` scope: whoever can open
//!   it is root or the daemon's own user already. Peers of another user
//!   are refused all the same.
//! - Over TCP, a request needs a bearer token: the `read` token for GETs,
//!   the `admin` token for GETs and changes. `/healthz` is always open,
//!   `/metrics` when `metrics_public` is set. With no token configured at
//!   all (allowed only on loopback), GETs are open and changes are refused:
//!   the TCP listener is then read-only, and changes go through the socket.
//!   The status page's static assets (`/`, `/ui/app.js`, `/ui/app.css`)
//!   carry no data and are open to GET; the page reads the API with a
//!   token typed into it.
//! - The Host header must be an IP literal, `localhost` or a configured
//!   name, so a web page whose name resolves to 127.0.0.1 cannot drive the
//!   API from a browser (DNS rebinding).
//! - Failed authentications are limited per peer (per /64 for IPv6), and
//!   changes are limited over all clients, both with 429 and Retry-After.
//! - Every change is logged (target `lb::audit`) with its caller's scope,
//!   peer, route and body, never a token, and counted in
//!   `lb_api_changes_total{result}`.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tracing::{info, warn};

use crate::{admin::Peer, config::AdminConfig, daemon::Daemon};

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    Admin,
}

/// Peers whose failed authentications are remembered at most; past it the
/// oldest windows are forgotten first.
const MAX_TRACKED_PEERS: usize = 16_384;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Longest body summary in the audit log.
const AUDIT_BODY_CHARS: usize = 400;

pub struct Access {
    admin_token: Option<String>,
    read_token: Option<String>,
    metrics_public: bool,
    allowed_hosts: Vec<String>,
    socket: std::path::PathBuf,
    failures_per_minute: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    changes: Mutex<Bucket>,
    /// The daemon's effective user id: socket peers must be it or root.
    euid: u32,
}

/// A token bucket: `rate` per second, holding at most `2 * rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Bucket {
            rate,
            tokens: 2.0 * rate,
            last: Instant::now(),
        }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// A refusal: status, metric reason and message.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    fn into_response(self) -> Response {
        let mut r = crate::api::ApiError::new(self.status, self.message).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// Compares without an early exit, so timing says nothing about the token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// The peer's key for failure counting: the address, or its /64 for IPv6
/// (one host usually holds a whole /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        }
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// Whether `host` (a Host header value) names this API without help from
/// DNS: an IP literal or `localhost`, with or without a port, or a name in
/// `allowed`.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    if allowed.contains(&host) {
        return true;
    }
    // Strip a port: "[::1]:9180", "127.0.0.1:9180", "localhost:9180".
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, tail)) if tail.is_empty() || valid_port(tail) => inner.to_string(),
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) if !n.contains(':') && valid_port(&format!(":{p}")) => n.to_string(),
            Some(_) if host.parse::<std::net::Ipv6Addr>().is_ok() => host.clone(),
            Some(_) => return false,
            None => host.clone(),
        }
    };
    name == "localhost" || name.parse::<IpAddr>().is_ok() || allowed.contains(&name)
}

fn valid_port(tail: &str) -> bool {
    tail.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok())
}

/// The body of a change as the audit log shows it: printable, one line,
/// bounded.
fn summary(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut space = false;
    for c in text.chars() {
        if out.chars().count() >= AUDIT_BODY_CHARS {
            out.push('…');
            break;
        }
        if c.is_whitespace() || c.is_control() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
    }
    out
}

/// The `lb_api_changes_total` result of a change's answer.
fn result_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        429 => "rate_limited",
        400..=499 => "invalid",
        _ => "failed",
    }
}

impl Access {
    pub fn new(config: &AdminConfig, admin_token: Option<&str>, read_token: Option<&str>) -> Self {
        Access {
            admin_token: admin_token.map(str::to_owned),
            read_token: read_token.map(str::to_owned),
            metrics_public: config.metrics_public,
            allowed_hosts: config.allowed_hosts.clone(),
            socket: config.socket.clone(),
            failures_per_minute: config.auth_failures_per_minute.max(1),
            failures: Mutex::new(HashMap::new()),
            changes: Mutex::new(Bucket::new(config.change_rate)),
            euid: rustix::process::geteuid().as_raw(),
        }
    }

    fn any_token(&self) -> bool {
        self.admin_token.is_some() || self.read_token.is_some()
    }

    /// The scope a bearer token grants, if any.
    fn scope_of(&self, given: &str) -> Option<Scope> {
        // Both compared, so timing does not tell which one exists.
        let admin = self
            .admin_token
            .as_deref()
            .is_some_and(|t| constant_time_eq(given.as_bytes(), t.as_bytes()));
        let read = self
            .read_token
            .as_deref()
            .is_some_and(|t| constant_time_eq(given.as_bytes(), t.as_bytes()));
        if admin {
            Some(Scope::Admin)
        } else if read {
            Some(Scope::Read)
        } else {
            None
        }
    }

    /// Whether `ip` used up its failed authentications: how long until it
    /// may try again.
    fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, count) = map.get(&peer_key(ip))?;
        let left = FAILURE_WINDOW.checked_sub(now.saturating_duration_since(*start))?;
        (*count >= self.failures_per_minute).then_some(left)
    }

    fn failed(&self, ip: IpAddr, now: Instant) {
        let mut map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_TRACKED_PEERS {
            map.retain(|_, (start, _)| now.saturating_duration_since(*start) < FAILURE_WINDOW);
            while map.len() >= MAX_TRACKED_PEERS {
                let Some(oldest) = map.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k) else {
                    break;
                };
                map.remove(&oldest);
            }
        }
        let e = map.entry(peer_key(ip)).or_insert((now, 0));
        if now.saturating_duration_since(e.0) >= FAILURE_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }

    /// Decides a request from `peer`: the caller's scope, or why not.
    fn check(&self, peer: &Peer, req: &Request, change: bool) -> Result<Option<Scope>, Refusal> {
        let path = req.uri().path();
        let ip = match peer {
            Peer::Unix { uid, .. } => {
                if *uid != 0 && *uid != self.euid {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "peer",
                        format!("uid {uid} may not use the admin socket"),
                    ));
                }
                return Ok(Some(Scope::Admin));
            }
            Peer::Tcp(addr) => addr.ip(),
        };
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !host_allowed(host, &self.allowed_hosts) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "host",
                format!(
                    "Host {:?} is not accepted: use an IP address or localhost, or add the name to \
                     admin.allowed_hosts",
                    summary(host.as_bytes())
                ),
            ));
        }
        // The status page's assets carry no data: a browser cannot add a
        // token to a page load. Its script then reads the API with one.
        let asset = matches!(*req.method(), Method::GET | Method::HEAD)
            && crate::ui::ASSET_PATHS.contains(&path);
        let open = !change
            && (path == "/healthz"
                || asset
                || path == "/api/v1/healthz"
                || !self.any_token()
                || (self.metrics_public && (path == "/metrics" || path == "/api/v1/metrics")));
        if open {
            return Ok(None);
        }
        if change && self.admin_token.is_none() {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "tcp_read_only",
                format!(
                    "the TCP listener is read-only without an admin token: use the Unix socket {} \
                     (the lb CLI's default), or set admin.token_file",
                    self.socket.display()
                ),
            ));
        }
        let now = Instant::now();
        if let Some(left) = self.blocked(ip, now) {
            let mut r = Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many failed authentications from this address; try again later",
            );
            r.retry_after = Some(left);
            return Err(r);
        }
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The scheme is case-insensitive (RFC 9110); the token is not.
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token);
        let scope = match given {
            None => {
                self.failed(ip, now);
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "no_token",
                    if change {
                        "this change needs 'Authorization: Bearer <token>' with the admin token"
                    } else {
                        "this needs 'Authorization: Bearer <token>' with the read or admin token"
                    },
                ));
            }
            Some(t) => {
                if let Some(s) = self.scope_of(t) {
                    s
                } else {
                    self.failed(ip, now);
                    return Err(Refusal::new(
                        StatusCode::UNAUTHORIZED,
                        "bad_token",
                        "the bearer token is not valid",
                    ));
                }
            }
        };
        if change && scope == Scope::Read {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "read_scope",
                "the read token cannot change anything; use the admin token",
            ));
        }
        Ok(Some(scope))
    }

    fn take_change(&self) -> Result<(), Refusal> {
        let mut b = self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.take(Instant::now()).map_err(|wait| {
            let mut r = Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} changes per second (admin.change_rate); try again shortly",
                    b.rate
                ),
            );
            r.retry_after = Some(wait);
            r
        })
    }
}

fn caller(peer: &Peer, scope: Option<Scope>) -> String {
    match (peer, scope) {
        (Peer::Unix { .. }, _) => format!("socket ({peer})"),
        (_, Some(Scope::Admin)) => format!("admin token from {peer}"),
        (_, Some(Scope::Read)) => format!("read token from {peer}"),
        (_, None) => format!("no token from {peer}"),
    }
}

/// The access check and audit, as an axum middleware.
pub async fn guard(
    State((access, daemon)): State<(Arc<Access>, Daemon)>,
    req: Request,
    next: Next,
) -> Response {
    let change = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    // Requests that did not come through the admin loop (none do today)
    // are treated as an unknown TCP peer: tokens needed.
    let peer = req
        .extensions()
        .get::<Peer>()
        .cloned()
        .unwrap_or(Peer::Tcp(std::net::SocketAddr::from(([0, 0, 0, 0], 0))));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let scope = match access.check(&peer, &req, change) {
        Ok(s) => s,
        Err(r) => {
            daemon.metrics().api_refused(r.reason);
            if change {
                daemon.metrics().api_change(result_of(r.status));
                warn!(target: "lb::audit", peer = %peer, %method, path, reason = r.reason, "API change refused");
            }
            return r.into_response();
        }
    };
    if !change {
        return next.run(req).await;
    }
    if let Err(r) = access.take_change() {
        // Read the (bounded) body of this authorized caller first, so the
        // answer is not lost to a reset of a connection closed unread.
        let _ = axum::body::to_bytes(req.into_body(), crate::api::BODY_LIMIT).await;
        daemon.metrics().api_refused(r.reason);
        daemon.metrics().api_change("rate_limited");
        warn!(target: "lb::audit", caller = %caller(&peer, scope), %method, path, "API change refused: over admin.change_rate");
        return r.into_response();
    }
    // The body, kept for the audit line (the API's own limit applies).
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, crate::api::BODY_LIMIT).await else {
        daemon.metrics().api_change("invalid");
        return Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            format!(
                "the request body is larger than {} bytes or broken",
                crate::api::BODY_LIMIT
            ),
        )
        .into_response();
    };
    let what = summary(&bytes);
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let result = result_of(resp.status());
    daemon.metrics().api_change(result);
    let who = caller(&peer, scope);
    if result == "ok" {
        info!(target: "lb::audit", caller = %who, %method, path, body = %what, status = resp.status().as_u16(), "API change applied");
    } else {
        info!(target: "lb::audit", caller = %who, %method, path, body = %what, status = resp.status().as_u16(), result, "API change not applied");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn hosts_without_dns_pass_and_names_need_listing() {
        let allowed = vec!["lb.internal".to_string(), "lb.internal:9180".to_string()];
        for ok in [
            "127.0.0.1:9180",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:9180",
            "[::1]",
            "::1",
            "localhost",
            "LOCALHOST:9180",
            "lb.internal",
            "lb.internal:9180",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok} should pass");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9180",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "[::1]x",
            "127.0.0.1:99999",
            "127.0.0.1:",
            "lb.internal.evil",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad} should be refused");
        }
    }

    #[test]
    fn the_change_bucket_refills_at_its_rate() {
        let mut b = Bucket::new(10);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(101), "{wait:?}");
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn audit_summaries_are_one_bounded_line() {
        assert_eq!(
            summary(b"{\n  \"weight\": 5,\r\n\t\"x\":\x1b[31m 1}"),
            "{ \"weight\": 5, \"x\": [31m 1}"
        );
        let long = vec![b'a'; 5000];
        assert_eq!(summary(&long).chars().count(), AUDIT_BODY_CHARS + 1);
    }

    #[test]
    fn the_status_page_assets_are_open_to_get_and_nothing_else_is() {
        let config = AdminConfig {
            listen: "127.0.0.1:9180".parse().unwrap(),
            socket: "/run/lb/lb.sock".into(),
            token_file: None,
            read_token_file: None,
            metrics_public: false,
            allowed_hosts: Vec::new(),
            change_rate: 10,
            auth_failures_per_minute: 1000,
            state_file: "/nonexistent".into(),
            limits: Default::default(),
        };
        let access = Access::new(&config, Some("admin-secret"), Some("read-secret"));
        let peer = Peer::Tcp("127.0.0.1:40000".parse().unwrap());
        let req = |method: &str, path: &str, host: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap()
        };
        let host = "127.0.0.1:9180";
        for path in ["/", "/ui/app.js", "/ui/app.css"] {
            for method in ["GET", "HEAD"] {
                assert_eq!(
                    access.check(&peer, &req(method, path, host), false).ok(),
                    Some(None),
                    "{method} {path}"
                );
            }
            // A change to an asset path still needs the admin token.
            let r = access
                .check(&peer, &req("POST", path, host), true)
                .err()
                .unwrap();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "POST {path}");
            // The Host check still applies (DNS rebinding).
            let r = access
                .check(&peer, &req("GET", path, "evil.example"), false)
                .err()
                .unwrap();
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{path} with a foreign Host"
            );
        }
        for path in [
            "/api/v1/services",
            "/api/v1/stats",
            "/ui/",
            "/ui/other.js",
            "/index.html",
        ] {
            let r = access
                .check(&peer, &req("GET", path, host), false)
                .err()
                .unwrap();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        }
    }

    #[test]
    fn ipv6_peers_count_by_their_64() {
        let a: IpAddr = "fd00:1:2:3::1".parse().unwrap();
        let b: IpAddr = "fd00:1:2:3:ffff::9".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        let m: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(peer_key(m), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
