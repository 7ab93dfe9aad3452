//! The client other agents' peer servers are fetched with.
//!
//! A peer speaks the same OCI pull API as a registry, over plain HTTP on its peer port,
//! and only serves what it holds. The upstream registry is passed as `?ns=` so a peer
//! can look a tag up in its own cache. Nothing a peer sends is trusted: manifests by
//! digest are verified here, blobs by the store before they are committed.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clyde_types::{Digest, Membership, Reference, Registry, Repository, media};
use reqwest::{StatusCode, header};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore};

use crate::{BlobBody, Manifest, UpstreamError, blob_body, error_chain, range_header, read_manifest};

/// The peer server's answer header that says whether it holds a blob `complete` or
/// `arriving` ([`clyde_types::BlobState`]).
pub const BLOB_STATE_HEADER: &str = "clyde-blob-state";

/// The peer server's answer header that says when the tag it answered for was last
/// resolved from the upstream (Unix seconds).
pub const TAG_CHECKED_HEADER: &str = "clyde-tag-checked";

/// The peer server's path that lists the pinned images its node holds whole.
pub const PINS_PATH: &str = "/clyde/v1/pins";
/// Longest pins list read from a peer.
const MAX_PINS_BYTES: u64 = 4 << 20;

/// The peer server's path prefix for the piece hashes a member vouches for: the blob's
/// digest follows (`/clyde/v1/pieces/sha256:…`); the answer is
/// [`clyde_types::PieceHashes`]'s wire form. Served to members only.
pub const PIECES_PATH: &str = "/clyde/v1/pieces/";
/// Longest piece list read from a peer: a 2 TiB blob in 4 MiB pieces.
const MAX_PIECES_BYTES: u64 = 20 + (1 << 19) * 33;

/// A pinned image a node holds whole, as its peer server lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinnedImage {
    /// `registry/repository:tag`, or `registry/repository@digest` when no tag names it.
    pub reference: String,
    /// The image manifest's digest.
    pub digest: Digest,
    /// When `reference` is a tag that names this manifest: when the holder last resolved the
    /// tag from the upstream (Unix seconds).
    #[serde(default)]
    pub tag_checked_at: Option<u64>,
}

/// HTTP client for peer servers; cheap to clone.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    /// `https` when peers speak TLS.
    scheme: &'static str,
    /// Signs every request when the cluster has a secret.
    members: Option<Membership>,
}

impl PeerClient {
    /// A client that gives up connecting after `connect_timeout` (a dead peer is skipped
    /// fast) and on a body silent for `read_timeout` (a stalled peer is replaced); over
    /// mutual TLS when `tls` is given; signing every request as a member when `members` is.
    pub fn new(
        connect_timeout: Duration,
        read_timeout: Duration,
        tls: Option<&PeerTls>,
        members: Option<Membership>,
    ) -> Result<Self, UpstreamError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .tcp_nodelay(true)
            .no_proxy()
            .http1_only();
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls(client_tls(tls)?);
        }
        let http = builder.build().map_err(|e| UpstreamError::Config("peers".into(), error_chain(&e)))?;
        Ok(Self { http, scheme: if tls.is_some() { "https" } else { "http" }, members })
    }

    /// A request for `/v2/<repository>/<what>?ns=<registry>` on `peer`, signed when members sign.
    fn request(
        &self,
        method: reqwest::Method,
        peer: SocketAddr,
        registry: &Registry,
        repository: &Repository,
        what: &str,
    ) -> reqwest::RequestBuilder {
        self.signed(method, peer, &format!("/v2/{repository}/{what}?ns={}", registry.as_str()))
    }

    /// A request for `path` on `peer`, signed when members sign.
    fn signed(&self, method: reqwest::Method, peer: SocketAddr, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method.clone(), format!("{}://{peer}{path}", self.scheme));
        match &self.members {
            Some(m) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                req.header(header::AUTHORIZATION, m.authorization(method.as_str(), path, now))
            }
            None => req,
        }
    }

    async fn send(&self, peer: SocketAddr, req: reqwest::RequestBuilder) -> Result<reqwest::Response, UpstreamError> {
        let resp = req
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable { registry: format!("peer {peer}"), reason: error_chain(&e) })?;
        match resp.status() {
            s if s.is_success() => Ok(resp),
            StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
            s => Err(UpstreamError::Status { status: s.as_u16(), url: resp.url().to_string() }),
        }
    }

    /// The size of a blob a peer holds, by `HEAD`.
    pub async fn head_blob(
        &self,
        peer: SocketAddr,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<u64, UpstreamError> {
        let req = self.request(reqwest::Method::HEAD, peer, registry, repository, &format!("blobs/{digest}"));
        let resp = self.send(peer, req).await?;
        crate::content_length(resp.headers())
            .ok_or_else(|| UpstreamError::Protocol(format!("peer {peer}: blob HEAD without Content-Length")))
    }

    /// Whether a peer holds a blob complete (and verified), by `HEAD`: its peer server says
    /// so in [`BLOB_STATE_HEADER`]; a blob still arriving there is not complete.
    pub async fn holds_complete(
        &self,
        peer: SocketAddr,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<bool, UpstreamError> {
        let req = self.request(reqwest::Method::HEAD, peer, registry, repository, &format!("blobs/{digest}"));
        let resp = self.send(peer, req).await?;
        let state = resp.headers().get(BLOB_STATE_HEADER).and_then(|v| clyde_types::BlobState::parse(v.as_bytes()));
        Ok(state == Some(clyde_types::BlobState::Complete))
    }

    /// Streams a blob, or the part `range` of it, from a peer.
    pub async fn get_blob(
        &self,
        peer: SocketAddr,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<BlobBody, UpstreamError> {
        let mut req = self.request(reqwest::Method::GET, peer, registry, repository, &format!("blobs/{digest}"));
        if let Some(r) = &range {
            req = req.header(header::RANGE, range_header(r));
        }
        let resp = self.send(peer, req).await?;
        blob_body(resp, range, format!("peer {peer}"))
    }

    /// A manifest from a peer's cache; verified when `reference` is a digest.
    pub async fn get_manifest(
        &self,
        peer: SocketAddr,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Manifest, UpstreamError> {
        let resp = self.manifest_response(peer, registry, repository, reference, accept).await?;
        read_manifest(resp, reference, &format!("peer {peer}")).await
    }

    /// A peer's answer to `GET /v2/<repository>/manifests/<reference>`.
    async fn manifest_response(
        &self,
        peer: SocketAddr,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let req = self
            .request(reqwest::Method::GET, peer, registry, repository, &format!("manifests/{reference}"))
            .header(header::ACCEPT, media::upstream_accept(accept));
        self.send(peer, req).await
    }

    /// The pinned images a peer holds whole.
    pub async fn get_pins(&self, peer: SocketAddr) -> Result<Vec<PinnedImage>, UpstreamError> {
        let resp = self.send(peer, self.signed(reqwest::Method::GET, peer, PINS_PATH)).await?;
        let body = crate::read_bounded(resp, MAX_PINS_BYTES, &format!("peer {peer}")).await?;
        serde_json::from_slice(&body).map_err(|e| UpstreamError::Protocol(format!("peer {peer}: bad pins list: {e}")))
    }

    /// The piece hashes a peer vouches for (its wire form, checked by the caller against
    /// the blob's trusted size).
    pub async fn get_pieces(&self, peer: SocketAddr, digest: &Digest) -> Result<Vec<u8>, UpstreamError> {
        let path = format!("{PIECES_PATH}{digest}");
        let resp = self.send(peer, self.signed(reqwest::Method::GET, peer, &path)).await?;
        crate::read_bounded(resp, MAX_PIECES_BYTES, &format!("peer {peer}")).await
    }

    /// Where a peer's cache says a tag points, and when it last resolved the tag from the
    /// upstream; a peer that does not say when answers nothing usable.
    pub async fn get_tag(
        &self,
        peer: SocketAddr,
        registry: &Registry,
        repository: &Repository,
        tag: &str,
        accept: Option<&str>,
    ) -> Result<(Manifest, u64), UpstreamError> {
        let reference = Reference::Tag(tag.to_string());
        let resp = self.manifest_response(peer, registry, repository, &reference, accept).await?;
        let checked = resp.headers().get(TAG_CHECKED_HEADER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let Some(checked) = checked else {
            return Err(UpstreamError::Protocol(format!("peer {peer}: a tag without {TAG_CHECKED_HEADER}")));
        };
        Ok((read_manifest(resp, &reference, &format!("peer {peer}")).await?, checked))
    }
}

/// TLS between agents, the same on every node: each peer port serves `cert` and requires a
/// client certificate signed by `ca`; each agent fetching from a peer presents `cert` and
/// checks the peer's certificate against `ca`, for `server_name` or else the peer's IP.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTls {
    /// PEM certificate chain of this agent (server and client use: both key usages).
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificates that sign every agent's certificate.
    pub ca: PathBuf,
    /// The name peers' certificates are checked for (one certificate for all nodes, e.g.
    /// `clyde-peer`); default: the address dialed.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn tls_error(what: &str, path: &Path, e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Tls(format!("{what} {}: {e}", path.display()))
}

/// Certificates from a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error("cannot read certificates from", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error("bad certificate in", path, e))?;
    if certs.is_empty() {
        return Err(tls_error("no certificate in", path, "expected PEM CERTIFICATE blocks"));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, UpstreamError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_error("cannot read a private key from", path, e))
}

/// A trust store of the CA certificates in a PEM file.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, UpstreamError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| tls_error("unusable CA certificate in", path, e))?;
    }
    Ok(Arc::new(roots))
}

/// Checks a peer's chain against the cluster CA, for a fixed name when one is configured.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: Option<ServerName<'static>>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.name.as_ref().unwrap_or(server_name);
        self.inner.verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn client_tls(tls: &PeerTls) -> Result<rustls::ClientConfig, UpstreamError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let bad = |e: &dyn std::fmt::Display| UpstreamError::Tls(format!("[peer_tls]: {e}"));
    let inner = WebPkiServerVerifier::builder_with_provider(read_roots(&tls.ca)?, provider.clone())
        .build()
        .map_err(|e| bad(&e))?;
    let name = match &tls.server_name {
        Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| bad(&format!("server_name {n:?}: {e}")))?),
        None => None,
    };
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier { inner, name }))
        .with_client_auth_cert(read_certs(&tls.cert)?, read_key(&tls.key)?)
        .map_err(|e| bad(&format!("cert and key: {e}")))
}
