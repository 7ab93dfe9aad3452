//! Clyde's HTTP adapter: the OCI distribution pull API, served to containerd (the mirror)
//! and to other agents (the peer server, which only serves what this node holds).
//!
//! Message flow: an accept loop hands each connection to hyper's HTTP/1 server; each
//! request is parsed into a typed [`ApiPath`] (bad input is answered `400`/`416` here and
//! goes no further), then the [`Resolver`] says where the bytes come from and this module
//! only shapes the answer: headers, status, `Range`, and a streamed body.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::single_range_in_vec_init))]

mod access;
mod errors;
mod health;
mod origins;
mod query;
mod tls;
mod uploads;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clyde_resolver::{Origin, ResolveError, Resolver, Want};
use clyde_types::{
    ApiPath, BlobState, ByteRange, Digest, Membership, PathError, RangeError, RangeRequest, Reference, Resource,
    membership,
};
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

pub use errors::ErrorCode;
pub use health::serve_health;
pub use tls::ServerTls;
pub use uploads::{UploadLimits, Uploads};

/// The response body type.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Longest request path (with query) accepted.
const MAX_URI_LEN: usize = 4096;
/// Bound on the request head (request line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Which API a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// For containerd: local store, then peers, then the upstream.
    Mirror,
    /// For other agents: only what this node holds, complete or arriving.
    Peer,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Self::Mirror => "mirror",
            Self::Peer => "peer",
        }
    }
}

/// How a listener serves, beyond its API.
#[derive(Clone, Default)]
pub struct ListenerOptions {
    /// TLS, when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Limits on blob bodies in flight (the peer server's).
    pub uploads: Option<Arc<Uploads>>,
    /// Only requests a cluster member signed (the peer server of a private cluster).
    pub members: Option<Membership>,
    /// Connections served at once; more wait in the kernel's accept queue (0: no bound).
    pub max_connections: usize,
}

/// Serves `api` on `listener` as `options` say, until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    resolver: Resolver,
    options: ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let ListenerOptions { tls, uploads, members, max_connections } = options;
    let connections = TaskTracker::new();
    let origins = Arc::new(origins::Origins::default());
    let access = Arc::new(access::Access::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(if max_connections == 0 {
        tokio::sync::Semaphore::MAX_PERMITS
    } else {
        max_connections
    }));
    let mut warned = false;
    loop {
        // At the bound, the next connection waits in the accept queue until one ends.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        if slots.available_permits() == 0 && !warned {
            warned = true;
            tracing::warn!(api = api.name(), max_connections, "at the connection bound; new connections wait");
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let server = Server {
            resolver: resolver.clone(),
            api,
            uploads: uploads.clone(),
            origins: origins.clone(),
            members: members.clone(),
            access: access.clone(),
        };
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _slot = slot;
            let Some(tls) = tls else {
                return serve_connection(TokioIo::new(stream), server, peer, shutdown).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), server, peer, shutdown).await,
                Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), connections.wait()).await;
    Ok(())
}

/// Longest a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener's connections share.
#[derive(Clone)]
struct Server {
    resolver: Resolver,
    api: Api,
    uploads: Option<Arc<Uploads>>,
    /// Registries `?ns=` named per repository path (mirror only).
    origins: Arc<origins::Origins>,
    /// Who may read: members of the cluster only, when it has a secret.
    members: Option<Membership>,
    /// Who may read private registries' content.
    access: Arc<access::Access>,
}

/// Serves HTTP/1.1 requests on one connection until it ends or the server shuts down.
async fn serve_connection<IO>(io: TokioIo<IO>, server: Server, peer: SocketAddr, mut shutdown: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Peers are agents on the cluster network, quick to send a request: a connection that
    // sends nothing for long only holds a slot.
    let header_timeout = match server.api {
        Api::Mirror => Duration::from_secs(30),
        Api::Peer => Duration::from_secs(10),
    };
    let service = hyper::service::service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(handle(&server, req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, %peer, "connection ended with an error") },
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

/// Handles one request; never fails (errors become OCI error answers).
async fn handle(server: &Server, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let (resolver, api) = (&server.resolver, server.api);
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (mut response, source) = route(server, &req).await;
    response.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    if method == Method::HEAD {
        *response.body_mut() = empty();
    }
    // The endpoint is the path's second-to-last segment, as the parser reads it (a repository
    // may itself have a component named `blobs` or `manifests`).
    let kind = match path.rsplit('/').nth(1) {
        Some("manifests") => "manifest",
        Some("blobs") => "blob",
        _ => "other",
    };
    let metrics = resolver.metrics();
    metrics.request(api.name(), kind, response.status().as_u16(), started.elapsed().as_secs_f64());
    if response.status().is_success() && kind != "other" {
        // Counted as hyper takes each frame for the client, so the total is what was sent.
        let served = metrics.served(api.name(), source);
        let body = std::mem::replace(response.body_mut(), empty());
        *response.body_mut() = body
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    served.inc_by(data.len() as u64);
                }
                frame
            })
            .boxed_unsync();
    }
    let bytes = response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("0").to_string();
    tracing::debug!(api = api.name(), %method, %path, status = response.status().as_u16(), bytes, source, latency_ms = started.elapsed().as_secs_f64() * 1e3, %peer, "request");
    response
}

async fn route(server: &Server, req: &Request<Incoming>) -> (Response<Body>, &'static str) {
    let (resolver, api) = (&server.resolver, server.api);
    if let Some(members) = &server.members
        && let Err(e) = member_request(members, req)
    {
        let mut answer = errors::answer(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &e.to_string());
        answer.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(membership::AUTH_SCHEME));
        // A non-member's connection does not keep a slot of the connection bound.
        answer.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        tracing::debug!(error = %e, path = %req.uri().path(), "peer request refused");
        return (answer, "-");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (
            errors::answer(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                "this mirror is pull-only: GET and HEAD",
            ),
            "-",
        );
    }
    if req.uri().to_string().len() > MAX_URI_LEN {
        return (errors::answer(StatusCode::URI_TOO_LONG, ErrorCode::NameInvalid, "request path too long"), "-");
    }
    if api == Api::Peer && req.uri().path() == clyde_upstream::PINS_PATH {
        return (pins(resolver).await, "local");
    }
    if api == Api::Peer
        && let Some(digest) = req.uri().path().strip_prefix(clyde_upstream::PIECES_PATH)
    {
        return (pieces(resolver, server.members.is_some(), digest).await, "local");
    }
    let ns = match query::param(req.uri().query(), "ns") {
        Ok(ns) => ns,
        Err(msg) => {
            return (errors::answer(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, msg), "-");
        }
    };
    let path = req.uri().path();
    let mut parsed = match ApiPath::parse(path, ns.as_deref()) {
        Ok(p) => p,
        Err(e) => return (path_error(&e), "-"),
    };
    // A digest-addressed path without `?ns=` (a lazy puller's blob URL): the registry that
    // `?ns=` named for the same repository in a manifest answer containerd got through this
    // mirror. Only content addressed by digest, which verifies: no request can change where
    // a tag resolves for others.
    let name = origins::repository_path(path);
    if let (None, Some(name), ApiPath::Content { resource, .. }) = (&ns, name, &parsed)
        && server.api == Api::Mirror
        && resource.is_by_digest()
        && let Some(registry) = server.origins.registry_for(name)
        && let Ok(p) = ApiPath::parse(path, Some(registry.as_str()))
    {
        parsed = p;
    }
    let (origin, resource) = match parsed {
        ApiPath::Root => {
            let mut r = Response::new(full("{}"));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(2u64));
            return (r, "local");
        }
        ApiPath::Content { registry, repository, resource } => (Origin { registry, repository }, resource),
    };
    if let Some(refused) = server.access.gate(resolver, api, server.members.is_some(), req, &origin, &resource).await {
        return (refused, "-");
    }
    match resource {
        Resource::Manifest(reference) => {
            let answer = manifest(resolver, api, req, &origin, &reference).await;
            // Learned from manifests served with `?ns=` only (containerd resolving an image).
            if let (Some(_), Some(name), true) = (&ns, name, answer.0.status().is_success())
                && api == Api::Mirror
            {
                server.origins.learn(name, &origin.registry);
            }
            answer
        }
        Resource::Blob(digest) => blob(server, req, &origin, &digest).await,
    }
}

/// The pinned images this node holds whole, for other nodes keeping minimum copies.
async fn pins(resolver: &Resolver) -> Response<Body> {
    let resolver = resolver.clone();
    let images = tokio::task::spawn_blocking(move || resolver.pinned_images()).await.unwrap_or_default();
    let bytes = serde_json::to_vec(&images).unwrap_or_default();
    let mut r = Response::new(full(bytes.clone()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    r
}

/// The piece hashes this node vouches for a blob, for a member checking pieces on arrival.
/// Only in a cluster with a secret: without one, nobody would trust the list.
async fn pieces(resolver: &Resolver, members: bool, digest: &str) -> Response<Body> {
    if !members {
        return errors::answer(StatusCode::NOT_FOUND, ErrorCode::Unsupported, "piece lists are served to members only");
    }
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return errors::answer(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, &e.to_string()),
    };
    match resolver.piece_hashes(&digest).await {
        Ok(Some(list)) => {
            let bytes = list.encode();
            let len = bytes.len();
            let mut r = Response::new(full(bytes));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            r
        }
        Ok(None) => errors::answer(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, "blob not held here"),
        Err(e) => {
            tracing::warn!(%digest, error = %e, "could not list piece hashes");
            errors::answer(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown, "could not list piece hashes")
        }
    }
}

/// Whether a cluster member signed this request.
fn member_request(members: &Membership, req: &Request<Incoming>) -> Result<(), membership::AuthError> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let header = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    members.verify(header, req.method().as_str(), path, now)
}

fn path_error(e: &PathError) -> Response<Body> {
    let (status, code) = match e {
        PathError::NotV2 | PathError::UnknownEndpoint => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
        PathError::BadName(_) | PathError::BadRegistry(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
        PathError::BadTag(_) => (StatusCode::BAD_REQUEST, ErrorCode::TagInvalid),
        PathError::BadDigest(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
    };
    errors::answer(status, code, &e.to_string())
}

fn resolve_error(e: &ResolveError, miss: ErrorCode) -> Response<Body> {
    if e.is_miss() {
        errors::answer(StatusCode::NOT_FOUND, miss, &e.to_string())
    } else {
        tracing::error!(error = %e, "internal error");
        errors::answer(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown, &e.to_string())
    }
}

async fn manifest(
    resolver: &Resolver,
    api: Api,
    req: &Request<Incoming>,
    origin: &Origin,
    reference: &Reference,
) -> (Response<Body>, &'static str) {
    // Go clients send one `Accept` line per media type: join them all.
    let accept: Vec<&str> = req.headers().get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    let accept = (!accept.is_empty()).then(|| accept.join(", "));
    let m = match api {
        Api::Mirror => resolver.manifest(origin, reference, accept.as_deref()).await,
        Api::Peer => resolver.held_manifest(origin, reference, accept.as_deref()).await,
    };
    let m = match m {
        Ok(m) => m,
        Err(e) => return (resolve_error(&e, ErrorCode::ManifestUnknown), "-"),
    };
    let mut r = Response::new(full(m.bytes.clone()));
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len() as u64));
    if let Ok(v) = HeaderValue::from_str(&m.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    insert_digest(h, &m.digest.to_string());
    if let Some(checked) = m.checked_at {
        h.insert(clyde_upstream::TAG_CHECKED_HEADER, HeaderValue::from(checked));
    }
    (r, m.source)
}

fn insert_digest(h: &mut http::HeaderMap, digest: &str) {
    if let Ok(v) = HeaderValue::from_str(digest) {
        h.insert("docker-content-digest", v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
}

/// The ranges a request asks for (`None`: the whole blob).
fn requested_ranges(req: &Request<Incoming>) -> Result<Option<Vec<RangeRequest>>, RangeError> {
    let Some(value) = req.headers().get(header::RANGE) else { return Ok(None) };
    value.to_str().map_err(|_| RangeError::Malformed).and_then(RangeRequest::parse_set).map(Some)
}

async fn blob(
    server: &Server,
    req: &Request<Incoming>,
    origin: &Origin,
    digest: &clyde_types::Digest,
) -> (Response<Body>, &'static str) {
    let (resolver, api) = (&server.resolver, server.api);
    let ranges = match requested_ranges(req) {
        Ok(r) => r,
        // Too many parts: `400` tells a lazy puller to ask for one range at a time.
        Err(e @ RangeError::Multiple) => {
            return (errors::answer(StatusCode::BAD_REQUEST, ErrorCode::RangeInvalid, &e.to_string()), "-");
        }
        Err(e) => {
            return (errors::answer(StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::RangeInvalid, &e.to_string()), "-");
        }
    };
    let single = match ranges.as_deref() {
        Some([one]) => Some(*one),
        _ => None,
    };
    if req.method() == Method::HEAD {
        let answer = match api {
            Api::Mirror => resolver.blob_size(origin, digest).await.map(|size| (size, None)),
            Api::Peer => resolver.held_blob(digest).await.map(|source| (source.size(), Some(blob_state(&source)))),
        };
        return match answer {
            Ok((size, state)) => {
                let mut r = blob_head(size, digest, single);
                if let Some(state) = state {
                    mark_blob_state(&mut r, state);
                }
                (r, "local")
            }
            Err(e) => (resolve_error(&e, ErrorCode::BlobUnknown), "-"),
        };
    }
    // What the transfer fetches first, if there is none yet. A suffix, or several ranges,
    // need the size first (cheap when the blob is held: no upstream request).
    let want = match (&ranges, single.and_then(RangeRequest::first_byte)) {
        (None, _) => Ok(Want::whole()),
        (Some(_), Some(first)) => Ok(match single {
            Some(RangeRequest::Bounded { last, .. }) => Want::range(first, last.saturating_add(1)),
            _ => Want::range(first, u64::MAX),
        }),
        (Some(set), None) if api == Api::Mirror => match resolver.blob_size(origin, digest).await {
            Ok(size) => match RangeRequest::resolve_set(set, size) {
                Ok(parts) => Ok(Want::range(parts[0].start, parts[0].end)),
                Err(e) => return (unsatisfiable(size, &e), "-"),
            },
            Err(e) => Err(e),
        },
        (Some(_), None) => Ok(Want::whole()),
    };
    let source = match want {
        Ok(want) => match api {
            Api::Mirror => resolver.blob(origin, digest, want).await,
            Api::Peer => resolver.held_blob(digest).await,
        },
        Err(e) => Err(e),
    };
    let source = match source {
        Ok(s) => s,
        Err(ResolveError::RangeNotSatisfiable { size }) => {
            return (unsatisfiable(size, &RangeError::Unsatisfiable { size }), "upstream");
        }
        Err(e) => return (resolve_error(&e, ErrorCode::BlobUnknown), "-"),
    };
    let size = source.size();
    let label = source.label();
    let state = blob_state(&source);
    let parts = match &ranges {
        None => vec![ByteRange::full(size)],
        Some(set) => match RangeRequest::resolve_set(set, size) {
            Ok(parts) => parts,
            Err(e) => return (unsatisfiable(size, &e), label),
        },
    };
    // A peer asking for bytes a blob read only by ranges lacks is told at once, and asks
    // the next holder or the upstream.
    if api == Api::Peer && !parts.iter().all(|p| source.serves(*p)) {
        let e = ResolveError::NotHeld;
        return (errors::answer(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, &e.to_string()), label);
    }
    let ranged = ranges.is_some();
    let (mut stream, mut r) = if let [part] = parts[..] {
        let mut r = Response::new(empty());
        blob_headers(&mut r, digest, part, ranged);
        (source.stream(part, ranged), r)
    } else {
        source.prefetch(&parts[1..]);
        multipart(source, &parts, digest)
    };
    if let Some(uploads) = &server.uploads {
        let Some(slot) = uploads.try_start() else {
            return (busy(), label);
        };
        stream = Box::pin(slot.pace(stream));
    }
    *r.body_mut() = BodyExt::boxed_unsync(StreamBody::new(stream.map_ok(Frame::data)));
    if api == Api::Peer {
        mark_blob_state(&mut r, state);
    }
    (r, label)
}

/// A `206 multipart/byteranges` answer (RFC 9110 §14.6): the parts in the order asked,
/// each with its `Content-Range`; `Content-Length` is exact.
fn multipart(
    source: clyde_resolver::BlobSource,
    parts: &[ByteRange],
    digest: &clyde_types::Digest,
) -> (clyde_resolver::BlobStream, Response<Body>) {
    let boundary = format!("clyde-{}", &digest.hex()[..24]);
    let mut pieces: Vec<(Bytes, Option<ByteRange>)> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let lead = if i == 0 { "" } else { "\r\n" };
        let head = format!(
            "{lead}--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: {}\r\n\r\n",
            part.content_range()
        );
        pieces.push((Bytes::from(head), Some(*part)));
    }
    pieces.push((Bytes::from(format!("\r\n--{boundary}--\r\n")), None));
    let length: u64 = pieces.iter().map(|(head, part)| head.len() as u64 + part.map_or(0, |p| p.len())).sum();
    let stream = futures_util::stream::iter(pieces).flat_map(move |(head, part)| {
        let head = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) });
        match part {
            Some(part) => head.chain(source.clone().stream(part, true)).boxed(),
            None => head.boxed(),
        }
    });
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Ok(v) = HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}")) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_digest(h, &digest.to_string());
    (Box::pin(stream), r)
}

fn blob_state(source: &clyde_resolver::BlobSource) -> BlobState {
    if source.is_complete() { BlobState::Complete } else { BlobState::Arriving }
}

/// Tells a peer whether this node holds the blob whole (it may then spread requests over
/// several such holders) or is still receiving it.
fn mark_blob_state(r: &mut Response<Body>, state: BlobState) {
    r.headers_mut().insert(clyde_upstream::BLOB_STATE_HEADER, HeaderValue::from_static(state.as_str()));
}

/// As many uploads run as allowed: the requester asks another holder, or again in a second.
fn busy() -> Response<Body> {
    let mut r = errors::answer(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyRequests,
        "this node is serving as many peers as it allows; ask another holder",
    );
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn unsatisfiable(size: u64, e: &RangeError) -> Response<Body> {
    let mut r = errors::answer(StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::RangeInvalid, &e.to_string());
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

fn blob_head(size: u64, digest: &clyde_types::Digest, range: Option<RangeRequest>) -> Response<Body> {
    let selected = match range.map(|r| r.resolve(size)) {
        None => ByteRange::full(size),
        Some(Ok(r)) => r,
        Some(Err(e)) => return unsatisfiable(size, &e),
    };
    let mut r = Response::new(empty());
    blob_headers(&mut r, digest, selected, range.is_some());
    r
}

fn blob_headers(r: &mut Response<Body>, digest: &clyde_types::Digest, selected: ByteRange, ranged: bool) {
    if ranged {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&selected.content_range()) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(selected.len()));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_digest(h, &digest.to_string());
}
