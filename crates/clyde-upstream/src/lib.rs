//! Clyde's client for upstream registries.
//!
//! One `reqwest` client per configured registry (its own TLS settings), anonymous or basic
//! access, the bearer-token challenge flow with tokens cached per scope until they expire,
//! and retries with backoff on connection errors and `5xx` answers (only before any body
//! byte was handed out, so a retry never duplicates bytes).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::single_range_in_vec_init))]

mod access;
mod auth;
mod config;
pub mod peer;

use std::collections::HashMap;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clyde_types::{Digest, Reference, Registry, Repository, media};
use futures_util::{Stream, StreamExt};
use reqwest::{Method, StatusCode, header};

pub use access::{ClientCheck, Object};
pub use config::{AuthConfig, RegistryConfig, TlsConfig, UpstreamConfig};
pub use peer::{BLOB_STATE_HEADER, PIECES_PATH, PINS_PATH, PeerClient, PeerTls, PinnedImage, TAG_CHECKED_HEADER};

/// What went wrong talking to an upstream; decides the mirror's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream registry has no such content")]
    NotFound,
    #[error("the upstream registry refused our credentials ({0}); check [registries.auth] in the config")]
    Unauthorized(String),
    #[error("the upstream registry {registry} is unreachable: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("the upstream registry answered {status} for {url}")]
    Status { status: u16, url: String },
    #[error("the upstream registry sent something unexpected: {0}")]
    Protocol(String),
    #[error("the upstream registry's manifest is larger than {0} bytes")]
    TooLarge(u64),
    #[error("registry {0} is misconfigured: {1}")]
    Config(String, String),
    #[error("TLS settings are unusable: {0}")]
    Tls(String),
}

impl UpstreamError {
    /// Whether another attempt at the same upstream might succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
            || matches!(self, Self::Status { status, .. } if *status >= 500 || *status == 429 || *status == 408)
    }
}

/// A byte stream from an upstream.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// The answer to a manifest `HEAD`.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

/// A manifest as the upstream sent it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// A blob body (or part of it) from an upstream.
pub struct BlobBody {
    /// The blob's total size.
    pub size: u64,
    /// The bytes the stream carries.
    pub range: Range<u64>,
    pub stream: ByteStream,
}

/// Bound on clients of registries without a `[[registries]]` entry (any `?ns=` a client
/// names makes one); past it, the one made longest ago goes (its connections close once
/// its transfers end).
const MAX_UNCONFIGURED_CLIENTS: usize = 256;

/// Clients for every upstream registry.
pub struct Upstream {
    config: UpstreamConfig,
    clients: std::sync::Mutex<Clients>,
    tokens: auth::TokenCache,
}

/// The clients made so far: configured registries' for good, others up to a bound.
#[derive(Default)]
struct Clients {
    by_name: HashMap<String, Arc<RegistryClient>>,
    /// Unconfigured registries' names, oldest first.
    unconfigured: std::collections::VecDeque<String>,
}

struct RegistryClient {
    registry: Registry,
    base: String,
    http: reqwest::Client,
    /// For a private registry: checks of clients' credentials (no redirects).
    check: Option<reqwest::Client>,
    auth: Option<(String, String)>,
}

impl Upstream {
    /// Builds the clients; fails on unreadable TLS files or credentials.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let upstream = Self { config, clients: Default::default(), tokens: auth::TokenCache::default() };
        for r in &upstream.config.registries {
            let registry =
                Registry::parse(&r.name).map_err(|e| UpstreamError::Config(r.name.clone(), e.to_string()))?;
            upstream.client(&registry)?;
        }
        Ok(upstream)
    }

    fn client(&self, registry: &Registry) -> Result<Arc<RegistryClient>, UpstreamError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.by_name.get(registry.as_str()) {
            return Ok(c.clone());
        }
        let rc = self.config.registries.iter().find(|r| r.name.eq_ignore_ascii_case(registry.as_str()));
        let client = Arc::new(config::build_client(&self.config, registry, rc)?);
        let name = registry.as_str().to_string();
        if rc.is_none() {
            if clients.unconfigured.len() >= MAX_UNCONFIGURED_CLIENTS
                && let Some(oldest) = clients.unconfigured.pop_front()
            {
                clients.by_name.remove(&oldest);
            }
            clients.unconfigured.push_back(name.clone());
        }
        clients.by_name.insert(name, client.clone());
        Ok(client)
    }

    /// `HEAD` of a manifest, bounded by `timeout`.
    pub async fn head_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: Option<&str>,
        timeout: Duration,
    ) -> Result<ManifestHead, UpstreamError> {
        let client = self.client(registry)?;
        let url = format!("{}/v2/{}/manifests/{}", client.base, repository, reference);
        let accept = media::upstream_accept(accept).to_string();
        let headers = [(header::ACCEPT, accept)];
        let fut = self.send(&client, repository, Method::HEAD, &url, &headers);
        let resp = tokio::time::timeout(timeout, fut).await.map_err(|_| UpstreamError::Unreachable {
            registry: registry.to_string(),
            reason: "HEAD timed out".into(),
        })??;
        let headers = resp.headers();
        Ok(ManifestHead {
            digest: header_str(headers, "docker-content-digest").and_then(|d| d.parse().ok()),
            media_type: header_str(headers, "content-type").map(str::to_string),
            size: content_length(headers),
        })
    }

    /// `GET` of a manifest; its digest is verified when the reference is a digest.
    pub async fn get_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Manifest, UpstreamError> {
        let client = self.client(registry)?;
        let url = format!("{}/v2/{}/manifests/{}", client.base, repository, reference);
        let accept = media::upstream_accept(accept).to_string();
        let resp = self.send(&client, repository, Method::GET, &url, &[(header::ACCEPT, accept)]).await?;
        read_manifest(resp, reference, registry.as_str()).await
    }

    /// The size of a blob, by `HEAD`.
    pub async fn head_blob(
        &self,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<u64, UpstreamError> {
        let client = self.client(registry)?;
        let url = format!("{}/v2/{}/blobs/{}", client.base, repository, digest);
        let resp = self.send(&client, repository, Method::HEAD, &url, &[]).await?;
        content_length(resp.headers()).ok_or_else(|| UpstreamError::Protocol("blob HEAD without Content-Length".into()))
    }

    /// Streams a blob, or the part `range` of it (`end == u64::MAX`: to the end).
    pub async fn get_blob(
        &self,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<BlobBody, UpstreamError> {
        let client = self.client(registry)?;
        let url = format!("{}/v2/{}/blobs/{}", client.base, repository, digest);
        let headers: Vec<_> = range.as_ref().map(|r| (header::RANGE, range_header(r))).into_iter().collect();
        let resp = self.send(&client, repository, Method::GET, &url, &headers).await?;
        blob_body(resp, range, registry.to_string())
    }

    /// Sends a request, answering a token challenge and retrying transient failures, all
    /// bounded by `response_timeout`.
    async fn send(
        &self,
        client: &RegistryClient,
        repository: &Repository,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
    ) -> Result<reqwest::Response, UpstreamError> {
        let bound = self.config.response_timeout;
        let sent = async {
            let scope = format!("repository:{repository}:pull");
            let mut challenged = false;
            let mut attempt = 0u32;
            loop {
                let mut req = client.http.request(method.clone(), url);
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                if let Some(auth) = self.tokens.header(client.registry.as_str(), &scope) {
                    req = req.header(header::AUTHORIZATION, auth);
                }
                let result = req.send().await;
                let resp = match result {
                    Ok(resp) => resp,
                    Err(e)
                        if attempt < self.config.retries && (e.is_connect() || e.is_request()) && !e.is_timeout() =>
                    {
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    Err(e) => return Err(unreachable_err(&client.registry, &e)),
                };
                let status = resp.status();
                if status == StatusCode::UNAUTHORIZED && !challenged {
                    challenged = true;
                    let challenge = header_str(resp.headers(), "www-authenticate").unwrap_or("").to_string();
                    self.tokens
                        .answer(&client.http, client.registry.as_str(), &scope, &challenge, client.auth.as_ref())
                        .await?;
                    continue;
                }
                if status.is_server_error() && attempt < self.config.retries {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                return match status {
                    s if s.is_success() => Ok(resp),
                    StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        Err(UpstreamError::Unauthorized(status.to_string()))
                    }
                    s => Err(UpstreamError::Status { status: s.as_u16(), url: url.to_string() }),
                };
            }
        };
        tokio::time::timeout(bound, sent).await.map_err(|_| UpstreamError::Unreachable {
            registry: client.registry.to_string(),
            reason: format!("no answer within {} ms", bound.as_millis()),
        })?
    }
}

/// The `Range` header value for `range` (`end == u64::MAX`: to the end).
fn range_header(r: &Range<u64>) -> String {
    if r.end == u64::MAX {
        format!("bytes={}-", r.start)
    } else {
        format!("bytes={}-{}", r.start, r.end.saturating_sub(1))
    }
}

/// Reads a manifest answer, bounded in size; verifies it when `reference` is a digest.
/// A whole answer body of at most `max` bytes (more is [`UpstreamError::TooLarge`]).
async fn read_bounded(resp: reqwest::Response, max: u64, source: &str) -> Result<Vec<u8>, UpstreamError> {
    if resp.content_length().is_some_and(|l| l > max) {
        return Err(UpstreamError::TooLarge(max));
    }
    let mut body = resp.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| UpstreamError::Unreachable { registry: source.to_string(), reason: error_chain(&e) })?;
        if (bytes.len() + chunk.len()) as u64 > max {
            return Err(UpstreamError::TooLarge(max));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

async fn read_manifest(
    resp: reqwest::Response,
    reference: &Reference,
    source: &str,
) -> Result<Manifest, UpstreamError> {
    let media_type = header_str(resp.headers(), "content-type").unwrap_or(media::OCI_MANIFEST).to_string();
    let bytes = read_bounded(resp, media::MAX_MANIFEST_BYTES, source).await?;
    let digest = Digest::of(&bytes);
    if let Reference::Digest(expected) = reference
        && *expected != digest
    {
        return Err(UpstreamError::Protocol(format!("manifest {expected} hashes to {digest}")));
    }
    Ok(Manifest { bytes: Bytes::from(bytes), media_type, digest })
}

/// Turns a blob answer into the blob's size, the bytes it carries, and their stream.
fn blob_body(resp: reqwest::Response, range: Option<Range<u64>>, source: String) -> Result<BlobBody, UpstreamError> {
    let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
    let (size, got) = if partial {
        let cr = header_str(resp.headers(), "content-range")
            .ok_or_else(|| UpstreamError::Protocol("206 without Content-Range".into()))?;
        parse_content_range(cr).ok_or_else(|| UpstreamError::Protocol(format!("bad Content-Range {cr:?}")))?
    } else {
        let size = content_length(resp.headers())
            .ok_or_else(|| UpstreamError::Protocol("blob without Content-Length".into()))?;
        (size, 0..size)
    };
    let want = range.map_or(0..size, |r| r.start..r.end.min(size));
    if want.start < got.start || (size > 0 && want.start >= size) {
        return Err(UpstreamError::Protocol(format!("asked for {want:?}, got {got:?} of {size}")));
    }
    let stream = resp
        .bytes_stream()
        .map(move |r| r.map_err(|e| UpstreamError::Unreachable { registry: source.clone(), reason: error_chain(&e) }));
    // A server that ignores Range sends from an earlier offset: skip up to what we asked.
    let stream = skip_bytes(Box::pin(stream), want.start - got.start);
    Ok(BlobBody { size, range: want.start..got.end.min(size), stream })
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50 * 3u64.pow(attempt.saturating_sub(1).min(5)))
}

fn unreachable_err(registry: &Registry, e: &reqwest::Error) -> UpstreamError {
    UpstreamError::Unreachable { registry: registry.to_string(), reason: error_chain(e) }
}

/// An error with its sources, for messages that say what actually failed.
fn error_chain(e: &reqwest::Error) -> String {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

/// `Content-Length` as sent. (reqwest's `content_length()` is the body's size hint, which is 0
/// for every answer to `HEAD`.)
fn content_length(headers: &header::HeaderMap) -> Option<u64> {
    header_str(headers, "content-length")?.trim().parse().ok()
}

fn header_str<'a>(headers: &'a header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Parses `bytes FIRST-LAST/SIZE` into the size and the half-open range.
fn parse_content_range(value: &str) -> Option<(u64, Range<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, size) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last, size): (u64, u64, u64) = (first.parse().ok()?, last.parse().ok()?, size.parse().ok()?);
    (first <= last && last < size).then_some((size, first..last + 1))
}

fn skip_bytes(stream: ByteStream, skip: u64) -> ByteStream {
    if skip == 0 {
        return stream;
    }
    let mut remaining = skip;
    Box::pin(stream.filter_map(move |chunk| {
        let out = match chunk {
            Ok(mut bytes) if remaining > 0 => {
                let n = remaining.min(bytes.len() as u64);
                remaining -= n;
                let rest = bytes.split_off(n as usize);
                (!rest.is_empty()).then_some(Ok(rest))
            }
            other => Some(other),
        };
        std::future::ready(out)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_of_unconfigured_registries_are_bounded_and_configured_ones_kept() {
        let configured = RegistryConfig { name: "kept.example".into(), ..Default::default() };
        let upstream = Upstream::new(UpstreamConfig { registries: vec![configured], ..Default::default() }).unwrap();
        for i in 0..MAX_UNCONFIGURED_CLIENTS + 50 {
            upstream.client(&Registry::parse(&format!("r{i}.example")).unwrap()).unwrap();
        }
        let clients = upstream.clients.lock().unwrap();
        assert_eq!(clients.by_name.len(), MAX_UNCONFIGURED_CLIENTS + 1);
        assert!(clients.by_name.contains_key("kept.example"));
        assert!(!clients.by_name.contains_key("r0.example"));
        assert!(clients.by_name.contains_key(&format!("r{}.example", MAX_UNCONFIGURED_CLIENTS + 49)));
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((100, 0..10)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
    }

    proptest::proptest! {
        /// A peer's or registry's `Content-Range`: never a panic; a parsed one lies inside the
        /// size it claims.
        #[test]
        fn any_content_range_parses_without_panic_into_a_range_inside_its_size(value in ".{0,60}") {
            if let Some((size, r)) = parse_content_range(&value) {
                proptest::prop_assert!(r.start < r.end && r.end <= size);
            }
        }

        #[test]
        fn well_formed_content_ranges_round_trip(first in 0u64..1 << 40, len in 1u64..1 << 30, extra in 0u64..1 << 30) {
            let size = first + len + extra;
            let value = format!("bytes {first}-{}/{size}", first + len - 1);
            proptest::prop_assert_eq!(parse_content_range(&value), Some((size, first..first + len)));
        }
    }

    #[tokio::test]
    async fn skipping_ignored_range_prefix() {
        let chunks: Vec<Result<Bytes, UpstreamError>> =
            vec![Ok(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"defg"))];
        let s = skip_bytes(Box::pin(futures_util::stream::iter(chunks)), 4);
        let out: Vec<Bytes> = s.map(|r| r.unwrap()).collect().await;
        assert_eq!(out.concat(), b"efg");
    }
}
