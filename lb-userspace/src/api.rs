//! The admin API (JSON over HTTP, base `/api/v1`) and `/metrics`. Who may
//! call what is decided in [`crate::access`]; every error is
//! `{"error": "..."}` with 400, 401, 404, 409 (413 for oversized bodies).
use std::net::SocketAddr;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRequest, Path, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;

use crate::{
    access::Access,
    config::{self, RawBackend, RawService, Seg},
    daemon::{BackendView, ChangeError, Daemon, ReloadReport, ServiceView, StatsView, StatusView},
    dataplane::AdminState,
};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match e {
            ChangeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
            ChangeError::Conflict(_) | ChangeError::Raced(_) => StatusCode::CONFLICT,
            ChangeError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ChangeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

/// A JSON body whose every rejection is a JSON error.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(body_rejected(r.status(), r.body_text())),
        }
    }
}

/// A body the extractor refused: 413 when too large, else 400.
fn body_rejected(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, text)
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, text)
    }
}

/// The body of `POST /reload` and `POST /stop`: none, or `{}` (what `lb`
/// sends). Fields are refused, not ignored: a client that believes it asked
/// for something (`{"keep_dataplane": true}`) must not get something else.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

impl NoFields {
    /// Reads a body of a route that takes no fields.
    pub fn parse(body: &[u8]) -> Result<NoFields, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(NoFields {});
        }
        serde_json::from_slice(body).map_err(|e| format!("this route takes no body, or {{}}: {e}"))
    }
}

impl<S: Send + Sync> FromRequest<S> for NoFields {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| body_rejected(r.status(), r.body_text()))?;
        NoFields::parse(&bytes).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))
    }
}

/// The body of `PATCH /services/{name}/backends/{address}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    #[schema(minimum = 0, maximum = 65535)]
    pub weight: Option<i64>,
    pub state: Option<AdminState>,
}

/// What a valid [`BackendPatch`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchChange {
    pub weight: Option<u16>,
    pub state: Option<AdminState>,
}

impl BackendPatch {
    /// Checks the fields; the error is the API's 400 message.
    pub fn validate(&self) -> Result<PatchChange, String> {
        if self.weight.is_none() && self.state.is_none() {
            return Err("give weight, state or both".into());
        }
        let weight = match self.weight {
            Some(w) if !(0..=65535).contains(&w) => {
                return Err(format!("weight: {w} is out of range 0..=65535"));
            }
            w => w.map(|w| w as u16),
        };
        Ok(PatchChange {
            weight,
            state: self.state,
        })
    }
}

pub fn router(daemon: Daemon) -> Router {
    let v1 = Router::new()
        .route("/services", get(list_services))
        .route(
            "/services/{name}",
            get(get_service).put(put_service).delete(delete_service),
        )
        .route(
            "/services/{name}/backends",
            get(list_backends).post(add_backend),
        )
        .route(
            "/services/{name}/backends/{address}",
            get(get_backend).patch(patch_backend).delete(delete_backend),
        )
        .route("/status", get(status))
        .route("/stats", get(stats))
        .route("/reload", axum::routing::post(reload))
        .route("/stop", axum::routing::post(stop))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi));
    Router::new()
        .nest("/api/v1", v1)
        .route("/", get(crate::ui::index))
        .route("/ui/app.js", get(crate::ui::app_js))
        .route("/ui/app.css", get(crate::ui::app_css))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; see /api/v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(
            (
                std::sync::Arc::new(Access::new(
                    daemon.admin_config(),
                    daemon.token(),
                    daemon.read_token(),
                )),
                daemon.clone(),
            ),
            crate::access::guard,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(daemon)
}

/// One service as the API shows it, or 404.
async fn view(d: &Daemon, name: &str) -> Result<ServiceView, ChangeError> {
    d.views()
        .await
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| no_service(name))
}

/// The service `name` of `services`, to change, or 404.
fn service_mut<'a>(
    services: &'a mut [config::ServiceConfig],
    name: &str,
) -> Result<&'a mut config::ServiceConfig, ChangeError> {
    services
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| no_service(name))
}

fn no_service(name: &str) -> ChangeError {
    ChangeError::NotFound(format!("no service {name:?}"))
}

fn parse_address(s: &str) -> Result<SocketAddr, ApiError> {
    s.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{s:?} is not a backend address such as 127.0.0.1:8001 or [::1]:8001"),
        )
    })
}

#[utoipa::path(get, path = "/healthz", tag = "daemon", responses((status = 200, description = "The daemon's loops are alive and the data plane is attached", body = HealthzBody), (status = 503, description = "A loop died or is stuck, or the interface is gone", body = HealthzBody)))]
async fn healthz(State(d): State<Daemon>) -> Response {
    if !d.attached() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unhealthy",
                "error": "the interface the data plane is attached to is gone; it is attached again when it comes back"
            })),
        )
            .into_response();
    }
    if d.alive(std::time::Duration::from_secs(2)).await {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unhealthy", "error": "a daemon loop died or its state is stuck" })),
        )
            .into_response()
    }
}

#[utoipa::path(get, path = "/status", tag = "daemon", responses((status = 200, description = "Where the services come from, limits, reloads", body = StatusView), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn status(State(d): State<Daemon>) -> Response {
    Json(d.status().await).into_response()
}

/// Slot shares and rates per backend, for the status page.
#[utoipa::path(get, path = "/stats", tag = "daemon", responses((status = 200, description = "Per backend: slots of the installed Maglev table, and new flows, packets and bytes per second over the last interval with five minutes of them (one value per interval_seconds, oldest first)", body = StatsView), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn stats(State(d): State<Daemon>) -> Response {
    Json(d.stats().await).into_response()
}

/// Re-reads the config file; 400 with the file, line and field when it is
/// invalid (nothing changes then).
#[utoipa::path(post, path = "/reload", tag = "daemon", request_body(content = Option<NoFields>, description = "None, or {}"), responses((status = 200, description = "Reloaded (or refused with 400, nothing changed)", body = ReloadReport), (status = 400, description = "Bad input, or Host header not accepted", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP)", body = ErrorBody), (status = 403, description = "The read token, or TCP without an admin token configured", body = ErrorBody), (status = 409, description = "Conflicts with another service or backend, or past a limit", body = ErrorBody), (status = 413, description = "Body over 64 KiB", body = ErrorBody), (status = 429, description = "Over admin.change_rate, or too many failed authentications", body = ErrorBody), (status = 500, description = "The kernel maps could not be written (after retries)", body = ErrorBody)))]
async fn reload(State(d): State<Daemon>, _: NoFields) -> Result<Response, ApiError> {
    let report = d.reload().await?;
    Ok(Json(report).into_response())
}

/// Detaches the data plane, removes its pins, and ends the daemon.
#[utoipa::path(post, path = "/stop", tag = "daemon", request_body(content = Option<NoFields>, description = "None, or {}"), responses((status = 202, description = "Detaching, unpinning and exiting", body = StopBody), (status = 400, description = "Bad input, or Host header not accepted", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP)", body = ErrorBody), (status = 403, description = "The read token, or TCP without an admin token configured", body = ErrorBody), (status = 409, description = "Conflicts with another service or backend, or past a limit", body = ErrorBody), (status = 413, description = "Body over 64 KiB", body = ErrorBody), (status = 429, description = "Over admin.change_rate, or too many failed authentications", body = ErrorBody), (status = 500, description = "The kernel maps could not be written (after retries)", body = ErrorBody)))]
async fn stop(State(d): State<Daemon>, _: NoFields) -> Response {
    // A moment for this answer to reach the client before the listener
    // closes.
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        d.request_stop();
    });
    (
        StatusCode::ACCEPTED,
        Json(json!({ "status": "stopping: detaching the data plane and removing its pins" })),
    )
        .into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "daemon", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn metrics(State(d): State<Daemon>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        d.metrics_text().await,
    )
        .into_response()
}

#[utoipa::path(get, path = "/services", tag = "services", responses((status = 200, description = "Every service", body = [ServiceView]), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn list_services(State(d): State<Daemon>) -> Response {
    Json(d.views().await).into_response()
}

#[utoipa::path(get, path = "/services/{name}", tag = "services", params(("name" = String, Path, description = "Service name")), responses((status = 200, description = "The service", body = ServiceView), (status = 404, description = "No such service", body = ErrorBody), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn get_service(
    State(d): State<Daemon>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = view(&d, &name).await?;
    Ok(Json(v).into_response())
}

#[utoipa::path(put, path = "/services/{name}", tag = "services", params(("name" = String, Path, description = "Service name")), request_body = RawService, responses((status = 200, description = "Replaced", body = ServiceView), (status = 201, description = "Created", body = ServiceView), (status = 400, description = "Bad input, or Host header not accepted", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP)", body = ErrorBody), (status = 403, description = "The read token, or TCP without an admin token configured", body = ErrorBody), (status = 409, description = "Conflicts with another service or backend, or past a limit", body = ErrorBody), (status = 413, description = "Body over 64 KiB", body = ErrorBody), (status = 429, description = "Over admin.change_rate, or too many failed authentications", body = ErrorBody), (status = 500, description = "The kernel maps could not be written (after retries)", body = ErrorBody), (status = 503, description = "[cluster]: etcd unreachable, nothing changed", body = ErrorBody)))]
async fn put_service(
    State(d): State<Daemon>,
    Path(name): Path<String>,
    Body(mut raw): Body<RawService>,
) -> Result<Response, ApiError> {
    if raw.name.is_empty() {
        raw.name = name.clone();
    } else if raw.name != name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body names service {:?} but the path {name:?}",
                raw.name
            ),
        ));
    }
    let svc = config::service(&[], &raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.in_body().to_string()))?;
    let key = name.clone();
    let created = d
        .change(move |services| {
            Ok(
                if let Some(s) = services.iter_mut().find(|s| s.name == key) {
                    widens_networks(s, &svc)?;
                    *s = svc.clone();
                    false
                } else {
                    services.push(svc.clone());
                    true
                },
            )
        })
        .await?;
    let view = d.views().await.into_iter().find(|s| s.name == name);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// The API may narrow a service's `allowed_backend_networks`, never widen
/// or drop it: that takes the config file.
fn widens_networks(
    old: &config::ServiceConfig,
    new: &config::ServiceConfig,
) -> Result<(), ChangeError> {
    if old.allowed_backend_networks.is_empty() {
        return Ok(());
    }
    let wider = if new.allowed_backend_networks.is_empty() {
        Some("(none)".to_string())
    } else {
        new.allowed_backend_networks
            .iter()
            .find(|n| !old.allowed_backend_networks.iter().any(|o| o.covers(n)))
            .map(ToString::to_string)
    };
    match wider {
        None => Ok(()),
        Some(n) => Err(ChangeError::Invalid(format!(
            "request body: allowed_backend_networks: {n} would widen service {:?}'s \
             allowed_backend_networks {} (rule: allowed_backend_networks); \
             the API may only narrow them, the config file may change them",
            old.name,
            old.allowed_backend_networks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[utoipa::path(delete, path = "/services/{name}", tag = "services", params(("name" = String, Path, description = "Service name")), responses((status = 204, description = "Removed"), (status = 404, description = "No such service", body = ErrorBody), (status = 400, description = "Bad input, or Host header not accepted", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP)", body = ErrorBody), (status = 403, description = "The read token, or TCP without an admin token configured", body = ErrorBody), (status = 409, description = "Conflicts with another service or backend, or past a limit", body = ErrorBody), (status = 413, description = "Body over 64 KiB", body = ErrorBody), (status = 429, description = "Over admin.change_rate, or too many failed authentications", body = ErrorBody), (status = 500, description = "The kernel maps could not be written (after retries)", body = ErrorBody), (status = 503, description = "[cluster]: etcd unreachable, nothing changed", body = ErrorBody)))]
async fn delete_service(
    State(d): State<Daemon>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    d.change(move |services| {
        let before = services.len();
        services.retain(|s| s.name != name);
        if services.len() == before {
            return Err(no_service(&name));
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/services/{name}/backends", tag = "backends", params(("name" = String, Path, description = "Service name")), responses((status = 200, description = "The service's backends", body = [BackendView]), (status = 404, description = "No such service", body = ErrorBody), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn list_backends(
    State(d): State<Daemon>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = view(&d, &name).await?;
    Ok(Json(v.backends).into_response())
}

#[utoipa::path(get, path = "/services/{name}/backends/{address}", tag = "backends", params(("name" = String, Path, description = "Service name"), ("address" = String, Path, description = "Backend address, e.g. 127.0.0.1:8001 or [::1]:8001")), responses((status = 200, description = "The backend", body = BackendView), (status = 404, description = "No such service or backend", body = ErrorBody), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn get_backend(
    State(d): State<Daemon>,
    Path((name, address)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let addr = parse_address(&address)?;
    let v = view(&d, &name).await?;
    let b = v
        .backends
        .into_iter()
        .find(|b| b.address == addr.to_string())
        .ok_or_else(|| ChangeError::NotFound(format!("service {name:?} has no backend {addr}")))?;
    Ok(Json(b).into_response())
}

#[utoipa::path(post, path = "/services/{name}/backends", tag = "backends", params(("name" = String, Path, description = "Service name")), request_body = RawBackend, responses((status = 201, description = "Added", body = BackendView), (status = 404, description = "No such service", body = ErrorBody), (status = 400, description = "Bad input, or Host header not accepted", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP)", body = ErrorBody), (status = 403, description = "The read token, or TCP without an admin token configured", body = ErrorBody), (status = 409, description = "Conflicts with another service or backend, or past a limit", body = ErrorBody), (status = 413, description = "Body over 64 KiB", body = ErrorBody), (status = 429, description = "Over admin.change_rate, or too many failed authentications", body = ErrorBody), (status = 500, description = "The kernel maps could not be written (after retries)", body = ErrorBody), (status = 503, description = "[cluster]: etcd unreachable, nothing changed", body = ErrorBody)))]
async fn add_backend(
    State(d): State<Daemon>,
    Path(name): Path<String>,
    Body(raw): Body<RawBackend>,
) -> Result<Response, ApiError> {
    let b = config::backend(&[], &raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.in_body().to_string()))?;
    let addr = b.address;
    let key = name.clone();
    d.change(move |services| {
        let name = &key;
        let s = service_mut(services, name)?;
        if s.backends.iter().any(|x| x.address == b.address) {
            return Err(ChangeError::Conflict(format!(
                "service {name:?} already has backend {}; PATCH it instead",
                b.address
            )));
        }
        let mut raw_s = RawService::from(&*s);
        raw_s.backends.push(RawBackend::from(&b));
        // Re-validate the service as a whole (address families and the like).
        *s = config::service(&[Seg::Key("service".into())], &raw_s)
            .map_err(|e| ChangeError::Invalid(e.in_body().to_string()))?;
        Ok(())
    })
    .await?;
    let view = d
        .views()
        .await
        .into_iter()
        .find(|s| s.name == name)
        .and_then(|s| {
            s.backends
                .into_iter()
                .find(|x| x.address == addr.to_string())
        });
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(patch, path = "/services/{name}/backends/{address}", tag = "backends", params(("name" = String, Path, description = "Service name"), ("address" = String, Path, description = "Backend address, e.g. 127.0.0.1:8001 or [::1]:8001")), request_body = BackendPatch, responses((status = 200, description = "Changed", body = BackendView), (status = 404, description = "No such service or backend", body = ErrorBody), (status = 400, description = "Bad input, or Host header not accepted", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP)", body = ErrorBody), (status = 403, description = "The read token, or TCP without an admin token configured", body = ErrorBody), (status = 409, description = "Conflicts with another service or backend, or past a limit", body = ErrorBody), (status = 413, description = "Body over 64 KiB", body = ErrorBody), (status = 429, description = "Over admin.change_rate, or too many failed authentications", body = ErrorBody), (status = 500, description = "The kernel maps could not be written (after retries)", body = ErrorBody), (status = 503, description = "[cluster]: etcd unreachable, nothing changed", body = ErrorBody)))]
async fn patch_backend(
    State(d): State<Daemon>,
    Path((name, address)): Path<(String, String)>,
    Body(patch): Body<BackendPatch>,
) -> Result<Response, ApiError> {
    let addr = parse_address(&address)?;
    let PatchChange { weight, state } = patch
        .validate()
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))?;
    let key = name.clone();
    d.change(move |services| {
        let name = &key;
        let s = service_mut(services, name)?;
        let b = s
            .backends
            .iter_mut()
            .find(|b| b.address == addr)
            .ok_or_else(|| {
                ChangeError::NotFound(format!("service {name:?} has no backend {addr}"))
            })?;
        if let Some(w) = weight {
            b.weight = w;
        }
        if let Some(st) = state {
            b.state = st;
        }
        Ok(())
    })
    .await?;
    get_backend(State(d), Path((name, address))).await
}

#[utoipa::path(delete, path = "/services/{name}/backends/{address}", tag = "backends", params(("name" = String, Path, description = "Service name"), ("address" = String, Path, description = "Backend address, e.g. 127.0.0.1:8001 or [::1]:8001")), responses((status = 204, description = "Removed"), (status = 404, description = "No such service or backend", body = ErrorBody), (status = 400, description = "Bad input, or Host header not accepted", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP)", body = ErrorBody), (status = 403, description = "The read token, or TCP without an admin token configured", body = ErrorBody), (status = 409, description = "Conflicts with another service or backend, or past a limit", body = ErrorBody), (status = 413, description = "Body over 64 KiB", body = ErrorBody), (status = 429, description = "Over admin.change_rate, or too many failed authentications", body = ErrorBody), (status = 500, description = "The kernel maps could not be written (after retries)", body = ErrorBody), (status = 503, description = "[cluster]: etcd unreachable, nothing changed", body = ErrorBody)))]
async fn delete_backend(
    State(d): State<Daemon>,
    Path((name, address)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let addr = parse_address(&address)?;
    d.change(move |services| {
        let s = service_mut(services, &name)?;
        let before = s.backends.len();
        s.backends.retain(|b| b.address != addr);
        if s.backends.len() == before {
            return Err(ChangeError::NotFound(format!(
                "service {name:?} has no backend {addr}"
            )));
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/openapi.json", tag = "daemon", responses((status = 200, description = "This document", body = Object), (status = 400, description = "Host header not accepted (TCP)", body = ErrorBody), (status = 401, description = "Missing or wrong token (TCP, when tokens are configured)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this peer", body = ErrorBody)))]
async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The error body of every failed request.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// What `/healthz` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HealthzBody {
    #[schema(example = "ok")]
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `POST /stop` answers.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct StopBody {
    pub status: String,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "lb admin API",
        description = "Over TCP: GETs need 'Authorization: Bearer <token>' with the read or admin token when a token is configured (/healthz always open, /metrics when metrics_public); changes need the admin token, and without one the TCP listener is read-only. The Unix socket (0600) has the admin scope. /healthz and /metrics are also served at the root. A method a route does not take gets 405, an unknown route 404, both with an ErrorBody."
    ),
    servers((url = "/api/v1")),
    paths(
        list_services, get_service, put_service, delete_service,
        list_backends, add_backend, get_backend, patch_backend, delete_backend,
        status, reload, stop, healthz, metrics, openapi, stats
    ),
    components(schemas(ErrorBody, HealthzBody, StopBody)),
    modifiers(&Bearer),
    security(("bearer" = []))
)]
struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

/// The OpenAPI document, derived from the handlers and the wire types.
pub fn openapi_document() -> serde_json::Value {
    serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_without_a_body_take_none_or_an_empty_object() {
        for ok in ["", " \r\n", "{}", " { } "] {
            assert!(NoFields::parse(ok.as_bytes()).is_ok(), "{ok:?}");
        }
        for bad in [r#"{"keep_dataplane": true}"#, "null", "x", "{", "\"\"", "1"] {
            let e = NoFields::parse(bad.as_bytes()).unwrap_err();
            assert!(
                e.starts_with("this route takes no body, or {}: "),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn a_patch_names_what_it_changes() {
        let p = |json: &str| {
            serde_json::from_str::<BackendPatch>(json)
                .unwrap()
                .validate()
        };
        assert_eq!(
            p(r#"{"weight": 7, "state": "draining"}"#),
            Ok(PatchChange {
                weight: Some(7),
                state: Some(AdminState::Draining)
            })
        );
        assert_eq!(p("{}"), Err("give weight, state or both".into()));
        assert_eq!(
            p(r#"{"weight": 65536}"#),
            Err("weight: 65536 is out of range 0..=65535".into())
        );
        // An unknown state is the JSON's error: serde names it and the choices.
        let e = serde_json::from_str::<BackendPatch>(r#"{"state": "up"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `up`, expected one of `active`, `draining`, `disabled`"),
            "{e}"
        );
        assert!(serde_json::from_str::<BackendPatch>(r#"{"colour": 1}"#).is_err());
    }

    #[test]
    fn openapi_lists_every_route() {
        let doc = openapi_document();
        for p in [
            "/services",
            "/services/{name}",
            "/services/{name}/backends",
            "/services/{name}/backends/{address}",
            "/healthz",
            "/metrics",
            "/status",
            "/stats",
            "/reload",
            "/stop",
        ] {
            assert!(doc["paths"][p].is_object(), "{p}");
        }
    }
}
