//! The status page: one HTML page, its script and its style sheet, compiled
//! into the binary (no CDN, no external fonts: hosts may have no internet).
//! The assets carry no data, so they are served without a token (see
//! [`crate::access`]); the page's script reads the JSON API with the token
//! the operator types into it.
use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

pub const INDEX_HTML: &str = include_str!("ui/index.html");
pub const APP_JS: &str = include_str!("ui/app.js");
pub const APP_CSS: &str = include_str!("ui/app.css");

/// The paths of the assets: GETs of these need no token.
pub const ASSET_PATHS: [&str; 3] = ["/", "/ui/app.js", "/ui/app.css"];

/// Only the page's own script and style, and only its own API: an injected
/// string in a backend's health error can run nothing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
