//! The client other agents' peer servers are fetched with.
//!
//! A peer speaks the same OCI pull API as a registry, over plain HTTP on its peer port,
//! and only serves what it holds. The upstream registry is passed as `?ns=` so a peer
//! can look a tag up in its own cache. Nothing a peer sends is trusted: manifests by
//! digest are verified here, blobs by the store before they are committed.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use clyde_types::{Digest, Reference, Registry, Repository, media};
use reqwest::{StatusCode, header};

use crate::{BlobBody, Manifest, UpstreamError, blob_body, error_chain, range_header, read_manifest};

/// HTTP client for peer servers; cheap to clone.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
}

impl PeerClient {
    /// A client that gives up connecting after `connect_timeout` (a dead peer is skipped
    /// fast) and on a body silent for `read_timeout` (a stalled peer is replaced).
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .tcp_nodelay(true)
            .no_proxy()
            .http1_only()
            .build()
            .map_err(|e| UpstreamError::Config("peers".into(), error_chain(&e)))?;
        Ok(Self { http })
    }

    fn url(peer: SocketAddr, registry: &Registry, repository: &Repository, what: &str) -> String {
        format!("http://{peer}/v2/{repository}/{what}?ns={}", registry.as_str())
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
        let req = self.http.head(Self::url(peer, registry, repository, &format!("blobs/{digest}")));
        let resp = self.send(peer, req).await?;
        crate::content_length(resp.headers())
            .ok_or_else(|| UpstreamError::Protocol(format!("peer {peer}: blob HEAD without Content-Length")))
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
        let mut req = self.http.get(Self::url(peer, registry, repository, &format!("blobs/{digest}")));
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
        let req = self
            .http
            .get(Self::url(peer, registry, repository, &format!("manifests/{reference}")))
            .header(header::ACCEPT, media::upstream_accept(accept));
        let resp = self.send(peer, req).await?;
        read_manifest(resp, reference, &format!("peer {peer}")).await
    }
}
