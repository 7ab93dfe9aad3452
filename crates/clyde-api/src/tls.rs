//! TLS on the mirror and peer ports: a certificate and key, and optionally a CA whose
//! client certificates are required (mutual TLS).

use std::path::PathBuf;
use std::sync::Arc;

use clyde_upstream::peer::{read_certs, read_key, read_roots};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// TLS for a listening port (`[mirror_tls]` in the config file).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain served to clients.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificates: when set, clients must present a certificate they signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Reads the files and builds the acceptor; any unreadable or mismatched file is an
    /// error that names it.
    pub fn acceptor(&self) -> Result<TlsAcceptor, clyde_upstream::UpstreamError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let bad = |e: &dyn std::fmt::Display| clyde_upstream::UpstreamError::Tls(e.to_string());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?;
        let builder = match &self.client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(read_roots(ca)?, provider).build().map_err(|e| bad(&e))?,
            ),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(read_certs(&self.cert)?, read_key(&self.key)?)
            .map_err(|e| bad(&format!("{} and {}: {e}", self.cert.display(), self.key.display())))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}
