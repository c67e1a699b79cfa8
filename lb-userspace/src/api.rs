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
    daemon::{ChangeError, Daemon, ServiceView},
    dataplane::AdminState,
};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
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
            ChangeError::Conflict(_) => StatusCode::CONFLICT,
            ChangeError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
            Err(rejection) => {
                let status = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                };
                Err(ApiError::new(status, rejection.body_text()))
            }
        }
    }
}

/// The body of `POST /reload` and `POST /stop`: none, or `{}` (what `lb`
/// sends). Fields are refused, not ignored: a client that believes it asked
/// for something (`{"keep_dataplane": true}`) must not get something else.
#[derive(Debug, Default, Deserialize)]
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
            .map_err(|r| {
                let status = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                };
                ApiError::new(status, r.body_text())
            })?;
        NoFields::parse(&bytes).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))
    }
}

/// The body of `PATCH /services/{name}/backends/{address}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    pub weight: Option<i64>,
    pub state: Option<String>,
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
        let state = match &self.state {
            Some(s) => Some(
                config::parse_state(&[Seg::Key("state".into())], Some(s))
                    .map_err(|e| e.in_body().to_string())?,
            ),
            None => None,
        };
        Ok(PatchChange { weight, state })
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

async fn status(State(d): State<Daemon>) -> Response {
    Json(d.status().await).into_response()
}

/// Slot shares and rates per backend, for the status page.
async fn stats(State(d): State<Daemon>) -> Response {
    Json(d.stats().await).into_response()
}

/// Re-reads the config file; 400 with the file, line and field when it is
/// invalid (nothing changes then).
async fn reload(State(d): State<Daemon>, _: NoFields) -> Result<Response, ApiError> {
    let report = d.reload().await?;
    Ok(Json(report).into_response())
}

/// Detaches the data plane, removes its pins, and ends the daemon.
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

async fn list_services(State(d): State<Daemon>) -> Response {
    Json(d.views().await).into_response()
}

async fn get_service(
    State(d): State<Daemon>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = view(&d, &name).await?;
    Ok(Json(v).into_response())
}

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
            Ok(match services.iter_mut().find(|s| s.name == key) {
                Some(s) => {
                    widens_networks(s, &svc)?;
                    *s = svc;
                    false
                }
                None => {
                    services.push(svc);
                    true
                }
            })
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
            .map(|n| n.to_string())
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
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

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

async fn list_backends(
    State(d): State<Daemon>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = view(&d, &name).await?;
    Ok(Json(v.backends).into_response())
}

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
        let name = key;
        let s = services
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| no_service(&name))?;
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
        let name = key;
        let s = services
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| no_service(&name))?;
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

async fn delete_backend(
    State(d): State<Daemon>,
    Path((name, address)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let addr = parse_address(&address)?;
    d.change(move |services| {
        let s = services
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| no_service(&name))?;
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

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The OpenAPI 3 description of this API.
pub fn openapi_document() -> serde_json::Value {
    let error = json!({"$ref": "#/components/responses/Error"});
    let name =
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    let address = json!({"name": "address", "in": "path", "required": true,
        "description": "backend address, e.g. 127.0.0.1:8001 or [::1]:8001", "schema": {"type": "string"}});
    let json_body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let ok = |schema: serde_json::Value| json!({"description": "OK", "content": {"application/json": {"schema": schema}}});
    let service_ref = json!({"$ref": "#/components/schemas/ServiceView"});
    let backend_ref = json!({"$ref": "#/components/schemas/BackendView"});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "lb admin API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Over TCP: GETs need 'Authorization: Bearer <token>' with the read or admin token when a token is configured (/healthz always open, /metrics when metrics_public); changes need the admin token, and without one the TCP listener is read-only. The Unix socket (0600) has the admin scope."},
        "servers": [{"url": "/api/v1"}],
        "paths": {
            "/services": {"get": {"summary": "List services", "responses": {"200": ok(json!({"type": "array", "items": service_ref}))}}},
            "/services/{name}": {
                "parameters": [name],
                "get": {"summary": "One service", "responses": {"200": ok(service_ref.clone()), "404": error}},
                "put": {"summary": "Create or replace a service", "security": [{"bearer": []}], "requestBody": json_body("Service"),
                        "responses": {"200": ok(service_ref.clone()), "201": ok(service_ref.clone()), "400": error, "401": error, "409": error}},
                "delete": {"summary": "Remove a service", "security": [{"bearer": []}], "responses": {"204": {"description": "Removed"}, "401": error, "404": error}}
            },
            "/services/{name}/backends": {
                "parameters": [name],
                "get": {"summary": "A service's backends", "responses": {"200": ok(json!({"type": "array", "items": backend_ref})), "404": error}},
                "post": {"summary": "Add a backend", "security": [{"bearer": []}], "requestBody": json_body("Backend"),
                         "responses": {"201": ok(backend_ref.clone()), "400": error, "401": error, "404": error, "409": error}}
            },
            "/services/{name}/backends/{address}": {
                "parameters": [name, address],
                "get": {"summary": "One backend", "responses": {"200": ok(backend_ref.clone()), "404": error}},
                "patch": {"summary": "Change a backend's weight or state", "security": [{"bearer": []}], "requestBody": json_body("BackendPatch"),
                          "responses": {"200": ok(backend_ref.clone()), "400": error, "401": error, "404": error}},
                "delete": {"summary": "Remove a backend", "security": [{"bearer": []}], "responses": {"204": {"description": "Removed"}, "401": error, "404": error}}
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": ok(json!({"type": "object"})), "503": error}}},
            "/stats": {"get": {"summary": "Per backend: slots of the installed Maglev table, new flows, packets and bytes per second, and five minutes of them (one value per interval_seconds, oldest first)", "responses": {"200": ok(json!({"type": "object"}))}}},
            "/status": {"get": {"summary": "Where the services come from: config, state file, API changes dropped", "responses": {"200": ok(json!({"type": "object"}))}}},
            "/reload": {"post": {"summary": "Re-read the config file and apply it", "security": [{"bearer": []}], "responses": {"200": ok(json!({"type": "object"})), "400": error, "401": error, "409": error}}},
            "/stop": {"post": {"summary": "Detach the data plane, remove its pins and exit", "security": [{"bearer": []}], "responses": {"202": ok(json!({"type": "object"})), "400": error, "401": error}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "Error", "content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}},
            "schemas": {
                "Health": {"type": "object", "required": ["kind"], "additionalProperties": false, "properties": {
                    "kind": {"type": "string", "enum": ["tcp", "http", "https", "udp"]},
                    "path": {"type": "string"}, "host": {"type": "string"}, "sni": {"type": "string"}, "ca_file": {"type": "string"},
                    "payload": {"type": "string"}, "expect": {"type": "string"},
                    "interval": {"type": "string", "example": "2s"}, "timeout": {"type": "string", "example": "1s"},
                    "rise": {"type": "integer", "minimum": 1, "maximum": 100}, "fall": {"type": "integer", "minimum": 1, "maximum": 100}}},
                "Backend": {"type": "object", "required": ["address"], "additionalProperties": false, "properties": {
                    "address": {"type": "string"}, "weight": {"type": "integer", "minimum": 0, "maximum": 65535, "default": 100},
                    "state": {"type": "string", "enum": ["active", "draining", "disabled"]}}},
                "BackendPatch": {"type": "object", "additionalProperties": false, "properties": {
                    "weight": {"type": "integer", "minimum": 0, "maximum": 65535},
                    "state": {"type": "string", "enum": ["active", "draining", "disabled"]}}},
                "Service": {"type": "object", "additionalProperties": false, "properties": {
                    "name": {"type": "string"}, "listen": {"type": "string", "default": "0.0.0.0:443"},
                    "protocols": {"type": "array", "items": {"type": "string", "enum": ["tcp", "udp"]}},
                    "forwarding": {"type": "string", "enum": ["local", "nat", "dsr"]},
                    "health": {"$ref": "#/components/schemas/Health"},
                    "when_all_down": {"type": "string", "enum": ["keep_last", "refuse"], "default": "keep_last"},
                    "backends": {"type": "array", "items": {"$ref": "#/components/schemas/Backend"}}}},
                "BackendView": {"type": "object", "properties": {
                    "address": {"type": "string"}, "weight": {"type": "integer"}, "state": {"type": "string"},
                    "healthy": {"type": "boolean"}, "last_error": {"type": "string"}}},
                "ServiceView": {"type": "object", "properties": {
                    "name": {"type": "string"}, "listen": {"type": "string"},
                    "protocols": {"type": "array", "items": {"type": "string"}}, "forwarding": {"type": "string"},
                    "health": {"$ref": "#/components/schemas/Health"},
                    "when_all_down": {"type": "string"}, "fail_open": {"type": "boolean"},
                    "backends": {"type": "array", "items": {"$ref": "#/components/schemas/BackendView"}}}}
            }
        }
    })
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
        assert!(p(r#"{"state": "up"}"#).unwrap_err().contains("state"));
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
