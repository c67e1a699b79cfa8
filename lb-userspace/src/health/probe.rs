//! One probe: a check with its request and TLS setup prepared once, run
//! over TCP, HTTP(S) or UDP within the check's timeout.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::{
    CheckError, CheckKind,
    http::{HttpRequest, http_exchange, http_request},
    tls::{server_name, tls_config},
};

/// Largest UDP reply we accept in full (the largest possible datagram).
const MAX_DATAGRAM: usize = 65_535;

/// A check with everything that can be computed ahead of time done.
pub(super) enum Probe {
    Tcp,
    Http {
        request: HttpRequest,
    },
    Https {
        request: HttpRequest,
        tls: tokio_rustls::TlsConnector,
        server_name: ServerName<'static>,
    },
    Udp {
        payload: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

impl Probe {
    /// [`Probe::prepare`] on a blocking thread: it may read a CA file.
    pub(super) async fn prepare_off_runtime(
        kind: &CheckKind,
        backend: SocketAddr,
    ) -> Result<Probe, CheckError> {
        let kind = kind.clone();
        tokio::task::spawn_blocking(move || Probe::prepare(&kind, backend))
            .await
            .unwrap_or_else(|e| {
                Err(CheckError::InvalidCheck(format!(
                    "preparing the check failed: {e}"
                )))
            })
    }

    fn prepare(kind: &CheckKind, backend: SocketAddr) -> Result<Probe, CheckError> {
        Ok(match kind {
            CheckKind::Tcp => Probe::Tcp,
            CheckKind::Http { path, host } => Probe::Http {
                request: http_request(path, host.as_deref(), backend)?,
            },
            CheckKind::Https {
                path,
                host,
                sni,
                ca_file,
            } => Probe::Https {
                request: http_request(path, host.as_deref(), backend)?,
                tls: tokio_rustls::TlsConnector::from(tls_config(ca_file.as_deref())?),
                server_name: server_name(sni.as_deref(), host.as_deref(), backend)?,
            },
            CheckKind::Udp { payload, expect } => Probe::Udp {
                payload: payload.clone(),
                expect: expect.clone(),
            },
        })
    }

    /// One check; `source`, when set, is the address probes leave from.
    pub(super) async fn run(
        &self,
        backend: SocketAddr,
        timeout: Duration,
        source: Option<SocketAddr>,
    ) -> Result<(), CheckError> {
        tokio::time::timeout(timeout, self.exchange(backend, source))
            .await
            .unwrap_or(Err(CheckError::Timeout(timeout)))
    }

    async fn exchange(
        &self,
        backend: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<(), CheckError> {
        match self {
            Probe::Tcp => {
                tcp_connect(backend, source)
                    .await
                    .map_err(CheckError::connect)?;
                Ok(())
            }
            Probe::Http { request } => {
                let stream = connect(backend, source).await?;
                http_exchange(stream, request).await
            }
            Probe::Https {
                request,
                tls,
                server_name,
            } => {
                let stream = connect(backend, source).await?;
                let stream = tls
                    .connect(server_name.clone(), stream)
                    .await
                    .map_err(CheckError::Tls)?;
                http_exchange(stream, request).await
            }
            Probe::Udp { payload, expect } => {
                udp_exchange(backend, source, payload, expect.as_deref()).await
            }
        }
    }
}

pub(super) async fn tcp_connect(
    backend: SocketAddr,
    source: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect(backend).await;
    };
    let socket = if backend.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(src)?;
    socket.connect(backend).await
}

async fn connect(backend: SocketAddr, source: Option<SocketAddr>) -> Result<TcpStream, CheckError> {
    let stream = tcp_connect(backend, source)
        .await
        .map_err(CheckError::connect)?;
    // The request is one small write; send it at once.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn udp_exchange(
    backend: SocketAddr,
    source: Option<SocketAddr>,
    payload: &[u8],
    expect: Option<&[u8]>,
) -> Result<(), CheckError> {
    let local: SocketAddr = source.unwrap_or(match backend {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    });
    let socket = UdpSocket::bind(local).await.map_err(CheckError::Io)?;
    socket.connect(backend).await.map_err(CheckError::connect)?;
    // A connected socket reports an ICMP port unreachable as ECONNREFUSED.
    socket.send(payload).await.map_err(CheckError::datagram)?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = socket.recv(&mut buf).await.map_err(CheckError::datagram)?;
    match expect {
        Some(want) if !contains(&buf[..n], want) => Err(CheckError::UnexpectedReply),
        _ => Ok(()),
    }
}

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
