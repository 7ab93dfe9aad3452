//! Decides where a mirror request's bytes come from: the local store, else peers that
//! hold it, else the upstream.
//!
//! Blobs go through [`transfer`]: one job per digest, whatever the number of readers, whose
//! byte ranges come from peers ([`peers`]) or the upstream. Manifests and tags go through
//! [`manifest`], which applies the tag freshness rules. The peer server's requests go
//! through [`Resolver::held_blob`] and [`Resolver::held_manifest`], which only read what
//! this node holds.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::single_range_in_vec_init))]

pub mod copies;
pub mod election;
pub mod load;
pub mod local;
mod manifest;
pub mod peers;
mod private;
pub mod schedule;
pub mod sim;
pub mod transfer;

use std::sync::Arc;
use std::time::Duration;

use clyde_metrics::Metrics;
use clyde_store::{Store, StoreError};
use clyde_types::{ContentKey, Digest, Registry, Repository};
use clyde_upstream::{Upstream, UpstreamError};
use serde::Deserialize;

pub use election::Member;
pub use load::{LoadError, LoadEvent, Platform};
pub use local::{BlobReader, LocalBlob, LocalContent, LocalTag};
pub use manifest::ServedManifest;
pub use peers::{BoxFuture, Discovery};
pub use transfer::{BlobSource, BlobStream, FillPolicy, LINGER, WINDOW, Want};

/// How the resolver behaves; every field has a documented default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverConfig {
    /// Never contact the upstream; serve cached tags as they are.
    pub air_gapped: bool,
    /// How long a tag is served from cache before it is re-checked upstream (default 5m).
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Re-check `latest` upstream on every request.
    pub always_pull_latest: bool,
    /// Bound on the upstream `HEAD` that re-checks a tag (default 800ms; past it the cached
    /// tag is served).
    #[serde(with = "humantime_serde")]
    pub tag_check_timeout: Duration,
    /// A reader this far ahead of a running transfer gets its own upstream request (default 1 MiB).
    pub steal_distance: u64,
    /// Whether a blob read only by ranges is fetched whole in the background: `off` (the
    /// default: only what is read moves), `idle` (while no reader waits) or `eager`.
    pub fill: FillPolicy,
    /// Attempts to resume a blob transfer that broke mid-body (default 4).
    pub transfer_attempts: u32,
    /// Blob transfers running at once (default 512; 0: no bound). A request that would start
    /// one more waits for a running one to end (queued, never refused); a request for a blob
    /// already in transfer joins it at once.
    pub max_transfers: usize,
    /// Peer lookups and transfers (`[peers]` in the config file).
    pub peers: PeerTimeouts,
    /// Mutual TLS to peers (`[peer_tls]` in the config file); none: plain HTTP.
    #[serde(skip)]
    pub peer_tls: Option<clyde_upstream::PeerTls>,
    /// The cluster's secrets (`--cluster-secret-file`): requests to peers are signed, and
    /// tags are taken from members only; none: tags never come from peers.
    #[serde(skip)]
    pub members: Option<clyde_types::Membership>,
}

impl ResolverConfig {
    /// The first provider lookup of a request: quick when the upstream comes next, patient
    /// when it is never asked.
    pub(crate) fn first_lookup(&self) -> peers::Lookup {
        if self.air_gapped { peers::Lookup::Patient } else { peers::Lookup::Quick }
    }
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            air_gapped: false,
            tag_ttl: Duration::from_secs(300),
            always_pull_latest: false,
            tag_check_timeout: Duration::from_millis(800),
            steal_distance: 1024 * 1024,
            fill: FillPolicy::Off,
            transfer_attempts: 4,
            max_transfers: 512,
            peers: PeerTimeouts::default(),
            peer_tls: None,
            members: None,
        }
    }
}

/// How long the resolver waits on peers; every field has a documented default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerTimeouts {
    /// Bound on a provider lookup before going upstream (default 50ms).
    #[serde(with = "humantime_serde")]
    pub lookup_timeout: Duration,
    /// Bound on a provider lookup when the upstream cannot serve (default 2s).
    #[serde(with = "humantime_serde")]
    pub offline_lookup_timeout: Duration,
    /// A peer that has not answered within this is left for the next one (default 500ms).
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Connect timeout to a peer server (default 300ms).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence of a peer mid-body before it is replaced (default 5s).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// How long a peer that failed or sent bad bytes is not asked (default 60s).
    #[serde(with = "humantime_serde")]
    pub penalty: Duration,
    /// How long a node that wants a blob nobody offers waits for the intents of nodes that
    /// want it at the same time before the fetcher election (default 250ms); reading them
    /// is bounded by `offline_lookup_timeout`.
    #[serde(with = "humantime_serde")]
    pub election_wait: Duration,
    /// How long a node follows an elected fetcher that has not started serving before it
    /// passes it over for the next in rank (default 5s; three times this bounds the whole
    /// election).
    #[serde(with = "humantime_serde")]
    pub follow_timeout: Duration,
    /// Followers each node of a herd's tree serves one blob to (default 4, at least 2):
    /// smaller makes each follower's stream faster (an uplink is shared by fewer) and the
    /// tree deeper (see `docs/p2p.md` and the simulator's figures in `docs/benchmarks.md`).
    pub fanout: usize,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        Self {
            lookup_timeout: Duration::from_millis(50),
            offline_lookup_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(300),
            read_timeout: Duration::from_secs(5),
            penalty: Duration::from_secs(60),
            election_wait: Duration::from_millis(250),
            follow_timeout: Duration::from_secs(5),
            fanout: election::FANOUT,
        }
    }
}

/// Where requested content lives upstream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub registry: Registry,
    pub repository: Repository,
}

/// Why a request could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("not cached and the upstream cannot serve it: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("not cached, and this agent is air-gapped")]
    AirGapped,
    #[error("the cached manifest's media type {0} is not in the client's Accept, and the upstream cannot be asked")]
    NotAcceptable(String),
    #[error("{0}")]
    Store(Arc<StoreError>),
    #[error("the transfer failed: {0}")]
    Transfer(String),
    #[error("the range starts past the end of the {size} byte blob")]
    RangeNotSatisfiable { size: u64 },
    #[error("not held by this node (peers are only served what a node holds)")]
    NotHeld,
    #[error("no peer holds it, and this agent never contacts the upstream")]
    NoPeer,
}

impl From<StoreError> for ResolveError {
    fn from(e: StoreError) -> Self {
        Self::Store(Arc::new(e))
    }
}

impl ResolveError {
    /// Whether this is a miss nobody can serve (`404`, so the client falls back) rather
    /// than a fault of this agent.
    pub fn is_miss(&self) -> bool {
        !matches!(self, Self::Store(_))
    }
}

/// The resolver: cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    upstream: Arc<Upstream>,
    peers: Option<Arc<peers::Peers>>,
    /// containerd's content store, when it is shared.
    local: Option<Arc<dyn LocalContent>>,
    config: ResolverConfig,
    transfers: transfer::Transfers,
    metrics: Metrics,
    private: private::PrivateContent,
}

impl Resolver {
    /// A resolver over `store`, other `local` content (containerd's), `upstream`, and the
    /// peers `discovery` finds (none: no peers).
    pub fn new(
        store: Store,
        local: Option<Arc<dyn LocalContent>>,
        upstream: Arc<Upstream>,
        discovery: Option<Arc<dyn Discovery>>,
        config: ResolverConfig,
        metrics: Metrics,
    ) -> Result<Self, UpstreamError> {
        let peers = match discovery {
            Some(d) => Some(Arc::new(peers::Peers::new(d, config.clone())?)),
            None => None,
        };
        let transfers =
            transfer::Transfers::new(store.clone(), upstream.clone(), peers.clone(), config.clone(), metrics.clone());
        let private = private::PrivateContent::new(upstream.private_registries(), &store);
        Ok(Self { inner: Arc::new(Inner { store, upstream, peers, local, config, transfers, metrics, private }) })
    }

    /// The metrics handle.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The size of a blob: cached, arriving, or by asking the upstream.
    pub async fn blob_size(&self, origin: &Origin, digest: &Digest) -> Result<u64, ResolveError> {
        // Held, or given by a verified manifest: before any peer's word.
        let d = *digest;
        if let Some(size) = self.inner.store.blocking(move |s| Ok(s.known_size(&d))).await? {
            return Ok(size);
        }
        if let Some(size) = self.inner.local.as_ref().and_then(|l| l.blob_size(digest)) {
            return Ok(size);
        }
        if let Some(job) = self.inner.transfers.running(digest) {
            return Ok(job.size());
        }
        // Then the upstream's word; a peer's only when the upstream cannot be asked.
        let upstream = match self.inner.config.air_gapped {
            false => match self.inner.upstream.head_blob(&origin.registry, &origin.repository, digest).await {
                Ok(size) => return Ok(size),
                Err(UpstreamError::NotFound) => return Err(UpstreamError::NotFound.into()),
                Err(e) => Some(e),
            },
            true => None,
        };
        if let Some(peers) = &self.inner.peers {
            let candidates = peers.find(ContentKey::Digest(*digest), peers::Lookup::Patient).await;
            if let Some(size) = peers.blob_size(&candidates, origin, digest).await {
                return Ok(size);
            }
        }
        Err(match upstream {
            Some(e) => e.into(),
            None => ResolveError::AirGapped,
        })
    }

    /// A blob this node holds, complete or arriving, for the peer server: never fetched
    /// on a peer's behalf.
    pub async fn held_blob(&self, digest: &Digest) -> Result<BlobSource, ResolveError> {
        if let Some(file) = self.open_stored(digest).await? {
            // A peer's read keeps the blob as recently used as a client's.
            self.inner.store.touch(digest);
            return Ok(BlobSource::Local(file));
        }
        if let Some(blob) = self.local_blob(digest).await {
            return Ok(blob);
        }
        match self.inner.transfers.running(digest) {
            Some(job) => Ok(BlobSource::Arriving(job)),
            None => Err(ResolveError::NotHeld),
        }
    }

    /// The piece hashes this node vouches for, for a member's peer server request: a
    /// complete blob's, as recorded when it verified, or those of a blob still arriving.
    /// `None`: the store holds no such blob (containerd's copies vouch for nothing).
    pub async fn piece_hashes(&self, digest: &Digest) -> Result<Option<clyde_types::PieceHashes>, ResolveError> {
        let d = *digest;
        if let Some(list) = self.inner.store.blocking(move |s| s.piece_hashes(&d)).await? {
            return Ok(Some(list));
        }
        match self.inner.transfers.running(digest) {
            Some(job) => Ok(Some(job.partial().vouched_hashes().await?)),
            None => Ok(None),
        }
    }

    /// A blob containerd holds, opened.
    async fn local_blob(&self, digest: &Digest) -> Option<BlobSource> {
        let local = self.inner.local.as_ref()?;
        Some(match local.open_blob(*digest).await? {
            LocalBlob::File(file) => BlobSource::Local(file),
            LocalBlob::Reader { size, reader } => BlobSource::Held { size, reader },
        })
    }

    /// Where the bytes of a blob come from: the store's file, or a transfer in progress
    /// (started, when there is none, for the bytes `want` asks for).
    pub async fn blob(&self, origin: &Origin, digest: &Digest, want: Want) -> Result<BlobSource, ResolveError> {
        let source = self.blob_source(origin, digest, want).await;
        if source.is_ok() {
            self.inner.store.touch(digest);
        }
        source
    }

    /// A complete blob of the store, opened off the async workers.
    async fn open_stored(&self, digest: &Digest) -> Result<Option<clyde_store::BlobFile>, ResolveError> {
        let d = *digest;
        Ok(self.inner.store.blocking(move |s| s.open_blob(&d)).await?)
    }

    async fn blob_source(&self, origin: &Origin, digest: &Digest, want: Want) -> Result<BlobSource, ResolveError> {
        if let Some(file) = self.open_stored(digest).await? {
            return Ok(BlobSource::Local(file));
        }
        if let Some(blob) = self.local_blob(digest).await {
            return Ok(blob);
        }
        // Fetched for a private registry's client: its content from now on.
        self.inner.private.note(origin.registry.as_str(), [*digest]);
        self.inner.transfers.join(origin, digest, want).await
    }

    /// Stops transfers and waits for them.
    pub async fn shutdown(&self) {
        self.inner.transfers.shutdown().await;
        self.inner.store.shutdown().await;
    }
}
