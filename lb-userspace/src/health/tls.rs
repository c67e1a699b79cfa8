//! TLS for HTTPS checks: the client config (a CA file, or any certificate
//! when none is given) and the server name sent as SNI.

use std::{net::SocketAddr, path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::CheckError;

/// SNI: `sni`, else `host` without its port, else the backend IP (which
/// rustls does not send as SNI, but verifies against when a CA is given).
pub(super) fn server_name(
    sni: Option<&str>,
    host: Option<&str>,
    backend: SocketAddr,
) -> Result<ServerName<'static>, CheckError> {
    let name = match (sni, host) {
        (Some(sni), _) => sni,
        (None, Some(host)) => strip_port(host),
        (None, None) => return Ok(ServerName::IpAddress(backend.ip().into())),
    };
    ServerName::try_from(name.to_owned())
        .map_err(|_| CheckError::InvalidCheck(format!("{name:?} is not a valid TLS server name")))
}

/// `example.com:8443` → `example.com`, `[::1]:443` → `::1`.
pub(super) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

pub(super) fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, CheckError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CheckError::InvalidCheck(format!("TLS setup failed: {e}")))?;
    let mut config = match ca_file {
        Some(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { algorithms }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, CheckError> {
    crate::files::read_ca_roots(path).map_err(|reason| CheckError::CaFile {
        path: path.to_owned(),
        reason,
    })
}

/// Accepts any server certificate (health checks of backends with
/// self-signed certificates), while still checking that the server holds
/// the certificate's key.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
