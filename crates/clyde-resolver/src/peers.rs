//! Other agents as a source of content, between the local store and the upstream.
//!
//! Message flow: the resolver asks a [`Discovery`] (the p2p node, or a test double) for
//! the peer servers that hold a key, within a tight timeout. Each candidate that is not
//! serving a penalty is asked in turn; one that has not answered within the first-byte
//! timeout is abandoned for the next (a hedge). A peer that refuses connections, breaks
//! mid-body or sends bytes that do not hash to their digest sits out a penalty, so it is
//! skipped within seconds even while its provider records live on in the DHT.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clyde_types::{ContentKey, Digest, Reference};
use clyde_upstream::{BlobBody, Manifest, PeerClient, UpstreamError};
use tokio::time::Instant;

use crate::{Origin, ResolverConfig};

/// A boxed future, as [`Discovery`] returns it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Finds the peer servers that hold a key.
pub trait Discovery: Send + Sync + 'static {
    /// HTTP addresses of peer servers that advertise `key`, found within `timeout`.
    fn providers(&self, key: ContentKey, timeout: Duration) -> BoxFuture<Vec<SocketAddr>>;
}

/// Peers and what the resolver learned about them.
pub(crate) struct Peers {
    discovery: Arc<dyn Discovery>,
    client: PeerClient,
    penalties: Mutex<HashMap<SocketAddr, Instant>>,
    config: ResolverConfig,
}

impl Peers {
    pub(crate) fn new(discovery: Arc<dyn Discovery>, config: ResolverConfig) -> Result<Self, UpstreamError> {
        let client = PeerClient::new(config.peers.connect_timeout, config.peers.read_timeout)?;
        Ok(Self { discovery, client, penalties: Mutex::new(HashMap::new()), config })
    }

    fn penalties(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.penalties.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Peers holding `key`, without those serving a penalty. `patient` is for when the
    /// upstream cannot help: the lookup may then take longer.
    pub(crate) async fn find(&self, key: ContentKey, patient: bool) -> Vec<SocketAddr> {
        let timeout = if patient { self.config.peers.offline_lookup_timeout } else { self.config.peers.lookup_timeout };
        let started = Instant::now();
        let found = self.discovery.providers(key.clone(), timeout).await;
        let now = Instant::now();
        let mut penalties = self.penalties();
        penalties.retain(|_, until| *until > now);
        let usable: Vec<SocketAddr> = found.into_iter().filter(|p| !penalties.contains_key(p)).collect();
        tracing::debug!(%key, peers = ?usable, lookup_ms = started.elapsed().as_secs_f64() * 1e3, "provider lookup");
        usable
    }

    /// Keeps `peer` out of every candidate list for a while.
    pub(crate) fn penalize(&self, peer: SocketAddr, why: &str) {
        tracing::warn!(%peer, why, penalty = ?self.config.peers.penalty, "peer penalized");
        self.penalties().insert(peer, Instant::now() + self.config.peers.penalty);
    }

    fn penalized(&self, peer: &SocketAddr) -> bool {
        self.penalties().get(peer).is_some_and(|until| *until > Instant::now())
    }

    /// The first of `candidates` that starts sending `range` of the blob in time.
    pub(crate) async fn open_blob(
        &self,
        candidates: &[SocketAddr],
        origin: &Origin,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
    ) -> Option<(SocketAddr, BlobBody)> {
        for peer in candidates.iter().filter(|p| !self.penalized(p)) {
            let get = self.client.get_blob(*peer, &origin.registry, &origin.repository, digest, range.clone());
            match tokio::time::timeout(self.config.peers.first_byte_timeout, get).await {
                Ok(Ok(body)) => return Some((*peer, body)),
                // No longer held, or a range past the end: an answer, not a fault.
                Ok(Err(UpstreamError::NotFound | UpstreamError::Status { status: 416, .. })) => {
                    tracing::debug!(%peer, %digest, "peer cannot serve this part of the blob");
                }
                Ok(Err(e)) => self.penalize(*peer, &e.to_string()),
                Err(_) => tracing::info!(%peer, %digest, "peer too slow to answer; trying the next"),
            }
        }
        None
    }

    /// The size of a blob, from the first of `candidates` that knows it.
    pub(crate) async fn blob_size(&self, candidates: &[SocketAddr], origin: &Origin, digest: &Digest) -> Option<u64> {
        for peer in candidates.iter().filter(|p| !self.penalized(p)) {
            let head = self.client.head_blob(*peer, &origin.registry, &origin.repository, digest);
            match tokio::time::timeout(self.config.peers.first_byte_timeout, head).await {
                Ok(Ok(size)) => return Some(size),
                Ok(Err(UpstreamError::NotFound)) | Err(_) => {}
                Ok(Err(e)) => self.penalize(*peer, &e.to_string()),
            }
        }
        None
    }

    /// The first of `candidates` that sends the manifest `reference` names.
    pub(crate) async fn get_manifest(
        &self,
        candidates: &[SocketAddr],
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Option<Manifest> {
        for peer in candidates.iter().filter(|p| !self.penalized(p)) {
            let get = self.client.get_manifest(*peer, &origin.registry, &origin.repository, reference, accept);
            match tokio::time::timeout(self.config.peers.first_byte_timeout, get).await {
                Ok(Ok(m)) => return Some(m),
                Ok(Err(UpstreamError::NotFound)) => {}
                Ok(Err(e)) => self.penalize(*peer, &e.to_string()),
                Err(_) => tracing::info!(%peer, %reference, "peer too slow to answer; trying the next"),
            }
        }
        None
    }
}
