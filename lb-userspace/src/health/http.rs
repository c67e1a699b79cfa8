//! The HTTP/1.1 exchange of a health check, on hyper's client connection:
//! the request it sends and the status it judges.

use std::{error::Error as _, io, net::SocketAddr, pin::pin};

use http_body_util::Empty;
use hyper::{
    Request, Uri,
    client::conn::http1,
    header::{CONNECTION, HOST, HeaderValue, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::CheckError;

/// The most of an HTTP response head we read (hyper's smallest read buffer).
const MAX_RESPONSE_HEAD: usize = 8192;

/// A health check's request, validated once.
pub(super) struct HttpRequest {
    uri: Uri,
    host: HeaderValue,
}

pub(super) fn http_request(
    path: &str,
    host: Option<&str>,
    backend: SocketAddr,
) -> Result<HttpRequest, CheckError> {
    let path = if path.is_empty() { "/" } else { path };
    let bad_path = || {
        CheckError::InvalidCheck(format!(
            "HTTP path {path:?} contains spaces or control characters"
        ))
    };
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(bad_path());
    }
    let uri = Uri::try_from(path).map_err(|_| bad_path())?;
    let host = match host {
        Some(h) if h.is_empty() || h.bytes().any(|b| b.is_ascii_control() || b == b' ') => {
            return Err(CheckError::InvalidCheck(format!(
                "HTTP host {h:?} is empty or contains spaces or control characters"
            )));
        }
        Some(h) => h.to_owned(),
        None => backend.to_string(),
    };
    let host = HeaderValue::try_from(host.as_str()).map_err(|_| {
        CheckError::InvalidCheck(format!("HTTP host {host:?} is not a valid header value"))
    })?;
    Ok(HttpRequest { uri, host })
}

impl HttpRequest {
    fn build(&self) -> Request<Empty<&'static [u8]>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(USER_AGENT, HeaderValue::from_static("lb-health/1"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        request
    }
}

/// Sends the request and reads the response head to judge the status; the
/// body is never read.
pub(super) async fn http_exchange<S>(stream: S, request: &HttpRequest) -> Result<(), CheckError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::Builder::new()
        .title_case_headers(true)
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    // The connection is driven here rather than on a task of its own, so
    // nothing outlives the check's timeout.
    let mut conn = pin!(conn);
    let mut send = pin!(sender.send_request(request.build()));
    let response = tokio::select! {
        biased;
        response = &mut send => response,
        // The connection ends first when it failed: the request then holds
        // the reason.
        ended = &mut conn => {
            ended.map_err(http_error)?;
            send.await
        }
    }
    .map_err(http_error)?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(CheckError::BadStatus(status.as_u16()))
    }
}

/// hyper's errors in the check's terms. The backend's bytes are never part
/// of the reason: hyper's messages are fixed texts.
fn http_error(e: hyper::Error) -> CheckError {
    if e.is_parse_too_large() {
        return CheckError::BadResponse(format!(
            "the response head is larger than {MAX_RESPONSE_HEAD} bytes"
        ));
    }
    if e.is_parse() || e.is_parse_status() {
        return CheckError::BadResponse("the reply is not an HTTP/1.x response".to_owned());
    }
    if e.is_incomplete_message() {
        return CheckError::BadResponse(
            "connection closed before a complete response head".to_owned(),
        );
    }
    match e
        .source()
        .and_then(|cause| cause.downcast_ref::<io::Error>())
    {
        Some(io) => CheckError::Io(io::Error::new(io.kind(), io.to_string())),
        None => CheckError::BadResponse(e.to_string()),
    }
}
