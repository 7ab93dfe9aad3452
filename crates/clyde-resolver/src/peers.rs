//! Other agents as a source of content, between the local store and the upstream.
//!
//! Message flow: the resolver asks a [`Discovery`] (the p2p node, or a test double) for
//! the peer servers that hold a key, within a tight timeout. Each candidate that is not
//! serving a penalty is asked in turn; one that has not answered within the first-byte
//! timeout is *hedged*: the next one is asked as well and the first answer wins. A peer
//! that refuses connections, breaks mid-body or sends bytes that do not hash to their
//! digest sits out a penalty, so it is skipped within seconds even while its provider
//! records live on in the DHT.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clyde_types::{ContentKey, Digest, Reference};
use clyde_upstream::{BlobBody, Manifest, PeerClient, UpstreamError};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;

use crate::election::Member;
use crate::{Origin, ResolverConfig};
use clyde_store::unix_now;

/// A boxed future, as [`Discovery`] returns it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Finds the peer servers that hold a key, and carries this node's intents (see
/// [`crate::election`]).
pub trait Discovery: Send + Sync + 'static {
    /// HTTP addresses of peer servers that advertise `key`, found within `timeout`.
    fn providers(&self, key: ContentKey, timeout: Duration) -> BoxFuture<Vec<SocketAddr>>;

    /// Every live node that advertises `key`, with its identity, found within `timeout`
    /// (the whole walk, not the first answer); this node left out.
    fn members(&self, _key: ContentKey, _timeout: Duration) -> BoxFuture<Vec<Member>> {
        Box::pin(async { Vec::new() })
    }

    /// This node's identity, as [`Discovery::members`] gives other nodes'.
    fn local_id(&self) -> Vec<u8> {
        Vec::new()
    }

    /// How many other nodes this node is connected to now.
    fn connected_peers(&self) -> BoxFuture<usize> {
        Box::pin(async { 0 })
    }

    /// Advertises `key` (an intent) until [`Discovery::retract`].
    fn announce(&self, _key: ContentKey) {}

    /// Stops advertising a key [`Discovery::announce`] advertised.
    fn retract(&self, _key: ContentKey) {}
}

/// How long a provider lookup may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Before asking the upstream: `lookup_timeout`.
    Quick,
    /// When the upstream cannot help, or is never asked: `offline_lookup_timeout`.
    Patient,
}

/// Peers and what the resolver learned about them.
pub(crate) struct Peers {
    discovery: Arc<dyn Discovery>,
    client: PeerClient,
    penalties: Mutex<HashMap<SocketAddr, Instant>>,
    /// Peers that answered `404` for a piece of content, and until when they are not asked
    /// for it again: a provider record outlives a withdrawal (other nodes keep it until it
    /// expires), and this keeps a node from asking a peer that said no, again and again.
    misses: Mutex<HashMap<(SocketAddr, String), Instant>>,
    /// Blobs this node announced an intent for: the epochs announced, and the guards alive.
    intents: Mutex<HashMap<Digest, Intent>>,
    config: ResolverConfig,
}

/// This node's intent to fetch a blob (its ballot), withdrawn when the last guard for it
/// drops: whatever ends the election (decided, the request dropped mid-election), the
/// intent does not outlive it.
pub(crate) struct IntentGuard {
    peers: Arc<Peers>,
    digest: Digest,
}

impl Drop for IntentGuard {
    fn drop(&mut self) {
        self.peers.release_intent(&self.digest);
    }
}

/// The intent announced for one blob.
#[derive(Default)]
struct Intent {
    epochs: Vec<u64>,
    /// Guards alive, one per election in flight for the blob; the last one to drop
    /// withdraws the intent.
    guards: usize,
}

/// Misses remembered at most; beyond this the oldest are forgotten.
const MAX_MISSES: usize = 1 << 16;

impl Peers {
    pub(crate) fn new(discovery: Arc<dyn Discovery>, config: ResolverConfig) -> Result<Self, UpstreamError> {
        let client = PeerClient::new(
            config.peers.connect_timeout,
            config.peers.read_timeout,
            config.peer_tls.as_ref(),
            config.members.clone(),
        )?;
        Ok(Self {
            discovery,
            client,
            penalties: Mutex::new(HashMap::new()),
            misses: Mutex::new(HashMap::new()),
            intents: Mutex::new(HashMap::new()),
            config,
        })
    }

    fn penalties(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.penalties.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every live node that provides `key`, with its identity (this node left out).
    pub(crate) async fn members(&self, key: ContentKey, timeout: Duration) -> Vec<Member> {
        self.discovery.members(key, timeout).await
    }

    /// Provides `key` until [`Peers::retract`].
    pub(crate) fn announce(&self, key: ContentKey) {
        self.discovery.announce(key);
    }

    /// Stops providing a key [`Peers::announce`] provided.
    pub(crate) fn retract(&self, key: ContentKey) {
        self.discovery.retract(key);
    }

    /// The pinned images `peer` holds; nothing when it does not answer.
    pub(crate) async fn pins_of(&self, peer: SocketAddr) -> Vec<clyde_upstream::PinnedImage> {
        match self.client.get_pins(peer).await {
            Ok(pins) => pins,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no pins list from a peer");
                Vec::new()
            }
        }
    }

    /// Peers holding `key`, without those serving a penalty.
    pub(crate) async fn find(&self, key: ContentKey, lookup: Lookup) -> Vec<SocketAddr> {
        let timeout = match lookup {
            Lookup::Quick => self.config.peers.lookup_timeout,
            Lookup::Patient => self.config.peers.offline_lookup_timeout,
        };
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

    fn misses(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, String), Instant>> {
        self.misses.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `peer` does not hold `what`, for as long as a penalty lasts.
    fn missed(&self, peer: SocketAddr, what: &str) {
        let now = Instant::now();
        let mut misses = self.misses();
        if misses.len() >= MAX_MISSES {
            misses.retain(|_, until| *until > now);
            if misses.len() >= MAX_MISSES {
                misses.clear();
            }
        }
        misses.insert((peer, what.to_string()), now + self.config.peers.penalty);
    }

    fn said_no(&self, peer: &SocketAddr, what: &str) -> bool {
        self.misses().get(&(*peer, what.to_string())).is_some_and(|until| *until > Instant::now())
    }

    /// Asks `candidates` in turn with `ask`; a candidate that has not answered within the
    /// first-byte timeout is *hedged*: the next one is asked too, and the first good answer
    /// wins (the others are dropped). Gives up once every candidate failed, or the last one
    /// asked stayed silent for a whole timeout.
    async fn hedged<T, F, Fut>(&self, candidates: &[SocketAddr], what: &str, ask: F) -> Option<(SocketAddr, T)>
    where
        F: Fn(SocketAddr) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let timeout = self.config.peers.first_byte_timeout;
        let mut queue = candidates.iter().copied().filter(|p| !self.penalized(p) && !self.said_no(p, what));
        let mut asked = FuturesUnordered::new();
        let ask_next = |asked: &mut FuturesUnordered<_>, queue: &mut dyn Iterator<Item = SocketAddr>| {
            let Some(peer) = queue.next() else { return false };
            let answer = ask(peer);
            asked.push(async move { (peer, answer.await) });
            true
        };
        if !ask_next(&mut asked, &mut queue) {
            return None;
        }
        let mut deadline = Instant::now() + timeout;
        loop {
            let answered = tokio::select! {
                answered = asked.next() => answered,
                _ = tokio::time::sleep_until(deadline) => {
                    if !ask_next(&mut asked, &mut queue) {
                        tracing::info!(what, "no peer answered in time");
                        return None;
                    }
                    tracing::info!(what, "a peer is slow to answer; asking the next as well");
                    deadline = Instant::now() + timeout;
                    continue;
                }
            };
            let (peer, answer) = answered?;
            match answer {
                Ok(value) => return Some((peer, value)),
                // No longer held, or a range past the end: an answer, not a fault.
                Err(UpstreamError::NotFound) => {
                    tracing::debug!(%peer, what, "peer does not hold it; not asking it again for a while");
                    self.missed(peer, what);
                }
                Err(UpstreamError::Status { status: 416, .. }) => {
                    tracing::debug!(%peer, what, "peer cannot serve that range");
                }
                // Not under the name asked for (a private registry's content asked for under
                // another name): neither a fault nor a sign it does not hold the digest.
                Err(UpstreamError::Status { status: 403, .. }) => {
                    tracing::debug!(%peer, what, "peer does not serve it under this name");
                }
                // At its upload limit: another holder, or later; not a fault.
                Err(UpstreamError::Status { status: 429, .. }) => {
                    tracing::debug!(%peer, what, "peer is busy");
                }
                Err(e) => self.penalize(peer, &e.to_string()),
            }
            if asked.is_empty() {
                if !ask_next(&mut asked, &mut queue) {
                    return None;
                }
                deadline = Instant::now() + timeout;
            }
        }
    }

    /// This node's identity in elections.
    pub(crate) fn local_id(&self) -> Vec<u8> {
        self.discovery.local_id()
    }

    /// Whether any other node is connected: alone, a node has nobody to elect with.
    pub(crate) async fn has_company(&self) -> bool {
        self.discovery.connected_peers().await > 0
    }

    /// Announces this node's intent to fetch `digest` in the current epoch; true when that
    /// epoch's key was not announced before (the caller then gives other nodes' intents,
    /// announced at about the same instant, time to show). The intent lasts until the guard
    /// drops.
    pub(crate) fn announce_intent(self: &Arc<Self>, digest: Digest) -> (IntentGuard, bool) {
        let epoch = clyde_types::intent_epoch(clyde_store::unix_now());
        let mut intents = self.intents.lock().unwrap_or_else(|p| p.into_inner());
        let intent = intents.entry(digest).or_default();
        intent.guards += 1;
        let new = !intent.epochs.contains(&epoch);
        if new {
            intent.epochs.push(epoch);
            self.discovery.announce(ContentKey::Intent { digest, epoch });
        }
        (IntentGuard { peers: self.clone(), digest }, new)
    }

    /// Drops one guard of `digest`'s intent; the last withdraws every epoch announced.
    fn release_intent(&self, digest: &Digest) {
        let mut intents = self.intents.lock().unwrap_or_else(|p| p.into_inner());
        let Some(intent) = intents.get_mut(digest) else { return };
        intent.guards = intent.guards.saturating_sub(1);
        if intent.guards > 0 {
            return;
        }
        for epoch in intent.epochs.drain(..) {
            self.discovery.retract(ContentKey::Intent { digest: *digest, epoch });
        }
        intents.remove(digest);
    }

    /// The live nodes that announced an intent for `digest` (the previous, current or next
    /// epoch), without those serving a penalty.
    pub(crate) async fn intents(&self, digest: Digest) -> Vec<Member> {
        // The whole walk, patiently: a busy cluster answers slowly, and an intent missed here
        // is a second fetcher. A quiet one answers in about a millisecond.
        let timeout = self.config.peers.offline_lookup_timeout;
        let keys = clyde_types::intent_keys(digest, clyde_store::unix_now());
        let lookups = keys.map(|key| self.discovery.members(key, timeout));
        let mut found: Vec<Member> = Vec::new();
        for m in futures_util::future::join_all(lookups).await.into_iter().flatten() {
            if !found.iter().any(|f| f.id == m.id) {
                found.push(m);
            }
        }
        found.retain(|m| !self.penalized(&m.addr));
        found
    }

    /// `range` of a blob from one given peer (the elected fetcher), within the first-byte
    /// timeout; a refusal is not remembered (the fetcher may not have started yet).
    pub(crate) async fn open_blob_from(
        &self,
        peer: SocketAddr,
        origin: &Origin,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
        expected: Option<u64>,
    ) -> Result<BlobBody, UpstreamError> {
        let ask = self.client.get_blob(peer, &origin.registry, &origin.repository, digest, range);
        self.in_time(peer, ask).await.and_then(|body| sized(body, expected))
    }

    /// The piece hashes the first of `peers` that answers vouches for, for a blob of
    /// `layout` (the size from a trusted source; a list for another layout is refused).
    /// Only members serve lists, so only a cluster with a secret asks.
    pub(crate) async fn piece_hashes(
        &self,
        peers: &[SocketAddr],
        digest: &Digest,
        layout: clyde_types::PieceLayout,
    ) -> Option<clyde_types::PieceHashes> {
        // A holder that stored the blob before it recorded piece hashes reads it back and
        // hashes it whole first: as long as a silent body, not a first byte.
        for &peer in peers {
            let answer = self.within(self.config.peers.read_timeout, peer, self.client.get_pieces(peer, digest)).await;
            match answer.map(|bytes| clyde_types::PieceHashes::decode(&bytes, layout)) {
                Ok(Ok(list)) => return Some(list),
                Ok(Err(e)) => tracing::info!(%peer, %digest, error = %e, "piece list refused"),
                Err(e) => tracing::debug!(%peer, %digest, error = %e, "no piece list"),
            }
        }
        None
    }

    /// Whether any of `candidates` is not serving a penalty.
    pub(crate) fn any_usable(&self, candidates: &[SocketAddr]) -> bool {
        candidates.iter().any(|p| !self.penalized(p))
    }

    /// Those of `candidates` that say they hold the blob complete, asked at once (a peer
    /// that does not answer within the first-byte timeout is left out), in their order.
    pub(crate) async fn complete_holders(
        &self,
        candidates: &[SocketAddr],
        origin: &Origin,
        digest: &Digest,
    ) -> Vec<SocketAddr> {
        let timeout = self.config.peers.first_byte_timeout;
        let asks = candidates.iter().filter(|p| !self.penalized(p)).map(|peer| async move {
            let ask = self.client.holds_complete(*peer, &origin.registry, &origin.repository, digest);
            matches!(tokio::time::timeout(timeout, ask).await, Ok(Ok(true))).then_some(*peer)
        });
        futures_util::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// The first of `candidates` that starts sending `range` of the blob; with `expected`
    /// (the size a trusted source gives), only one that claims that size: a peer that claims
    /// another is penalized and never sizes a partial blob.
    pub(crate) async fn open_blob(
        &self,
        candidates: &[SocketAddr],
        origin: &Origin,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
        expected: Option<u64>,
    ) -> Option<(SocketAddr, BlobBody)> {
        let what = digest.to_string();
        self.hedged(candidates, &what, |peer| {
            let ask = self.client.get_blob(peer, &origin.registry, &origin.repository, digest, range.clone());
            async move { sized(ask.await?, expected) }
        })
        .await
    }

    /// The size of a blob, from the first of `candidates` that knows it (a peer's word: a
    /// trusted size, when there is one, comes first; see `Resolver::blob_size`).
    pub(crate) async fn blob_size(&self, candidates: &[SocketAddr], origin: &Origin, digest: &Digest) -> Option<u64> {
        let what = digest.to_string();
        let found = self
            .hedged(candidates, &what, |peer| self.client.head_blob(peer, &origin.registry, &origin.repository, digest))
            .await;
        found.map(|(_, size)| size)
    }

    /// The first of `candidates` that sends the manifest `reference` names.
    pub(crate) async fn get_manifest(
        &self,
        candidates: &[SocketAddr],
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Option<Manifest> {
        let what = format!("{}/{}:{reference}", origin.registry, origin.repository);
        let found = self
            .hedged(candidates, &what, |peer| {
                self.client.get_manifest(peer, &origin.registry, &origin.repository, reference, accept)
            })
            .await;
        found.map(|(_, m)| m)
    }

    /// Where a member's cache says a tag points, when the member resolved it from the
    /// upstream within the tag TTL (and after `newer_than`, Unix seconds), with that time.
    /// Only with a cluster secret: a tag does not verify, so it is taken from members only.
    pub(crate) async fn get_tag(
        &self,
        candidates: &[SocketAddr],
        origin: &Origin,
        tag: &str,
        accept: Option<&str>,
        newer_than: u64,
    ) -> Option<(Manifest, u64)> {
        self.config.members.as_ref()?;
        let what = format!("{}/{}:{tag}", origin.registry, origin.repository);
        let found = self.hedged(candidates, &what, |peer| self.tag_from(peer, origin, tag, accept, newer_than)).await;
        found.map(|(_, answer)| answer)
    }

    /// A member's answer for a tag, as [`Peers::get_tag`] takes it: one resolved from the
    /// upstream within the tag TTL and after `newer_than`; anything older is `NotFound`
    /// (for an elected node: not checked yet).
    pub(crate) async fn tag_from(
        &self,
        peer: SocketAddr,
        origin: &Origin,
        tag: &str,
        accept: Option<&str>,
        newer_than: u64,
    ) -> Result<(Manifest, u64), UpstreamError> {
        if self.config.members.is_none() {
            return Err(UpstreamError::NotFound);
        }
        let ask = self.client.get_tag(peer, &origin.registry, &origin.repository, tag, accept);
        let (m, checked) = self.in_time(peer, ask).await?;
        let now = unix_now();
        let ttl = self.config.tag_ttl.as_secs();
        if checked.saturating_add(ttl) <= now
            || checked > now + clyde_types::membership::MAX_SKEW_SECS
            || checked <= newer_than
        {
            tracing::debug!(%peer, %tag, checked, "a peer's tag is not fresh enough");
            return Err(UpstreamError::NotFound);
        }
        Ok((m, checked))
    }

    /// A manifest from one given peer (the elected fetcher), within the first-byte timeout.
    pub(crate) async fn manifest_from(
        &self,
        peer: SocketAddr,
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Manifest, UpstreamError> {
        self.in_time(peer, self.client.get_manifest(peer, &origin.registry, &origin.repository, reference, accept))
            .await
    }

    /// One peer's answer, within the first-byte timeout (past it: unreachable).
    async fn in_time<T>(
        &self,
        peer: SocketAddr,
        ask: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        self.within(self.config.peers.first_byte_timeout, peer, ask).await
    }

    /// One peer's answer, within `bound` (past it: unreachable).
    async fn within<T>(
        &self,
        bound: Duration,
        peer: SocketAddr,
        ask: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        match tokio::time::timeout(bound, ask).await {
            Ok(answer) => answer,
            Err(_) => Err(UpstreamError::Unreachable { registry: peer.to_string(), reason: NO_ANSWER_IN_TIME.into() }),
        }
    }
}

/// Why a peer that did not answer within the first-byte timeout failed.
pub(crate) const NO_ANSWER_IN_TIME: &str = "no answer in time";

/// `body` when its size is the `expected` one (or nothing is expected); else the peer lied.
fn sized(body: BlobBody, expected: Option<u64>) -> Result<BlobBody, UpstreamError> {
    match expected {
        Some(size) if body.size != size => Err(UpstreamError::Protocol(format!(
            "claims the blob has {} bytes; a verified manifest says {size}",
            body.size
        ))),
        _ => Ok(body),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Nobody;

    impl Discovery for Nobody {
        fn providers(&self, _: ContentKey, _: Duration) -> BoxFuture<Vec<SocketAddr>> {
            Box::pin(async { Vec::new() })
        }
    }

    fn peers() -> Peers {
        Peers::new(Arc::new(Nobody), ResolverConfig::default()).unwrap()
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    /// A peer that answers `Ok(n)` after `delay`, or fails with `error`.
    async fn answer(n: u16, delay: u64, error: Option<UpstreamError>) -> Result<u16, UpstreamError> {
        tokio::time::sleep(Duration::from_millis(delay)).await;
        error.map_or(Ok(n), Err)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_peer_is_hedged_and_the_first_answer_wins() {
        let p = peers();
        let started = Instant::now();
        let got = p
            .hedged(&[addr(1), addr(2)], "x", |peer| answer(peer.port(), [0, 10_000, 100][peer.port() as usize], None))
            .await;
        assert_eq!(got.map(|(_, v)| v), Some(2));
        // 500 ms before the hedge, then the second peer's 100 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_peer_is_penalized_and_the_next_asked_at_once() {
        let p = peers();
        let started = Instant::now();
        let refused = || Some(UpstreamError::Unreachable { registry: "peer".into(), reason: "refused".into() });
        let both = [addr(1), addr(2)];
        let got = p.hedged(&both, "x", |peer| answer(peer.port(), 10, if peer.port() == 1 { refused() } else { None }));
        assert_eq!(got.await.map(|(_, v)| v), Some(2));
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        assert!(p.penalized(&addr(1)));
        // A penalized peer is not asked again.
        let again = p.hedged(&[addr(1)], "x", |peer| answer(peer.port(), 0, None)).await;
        assert!(again.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn peers_that_no_longer_hold_it_are_not_penalized() {
        let p = peers();
        let both = [addr(1), addr(2)];
        let got = p.hedged(&both, "x", |peer| answer(peer.port(), 0, Some(UpstreamError::NotFound)));
        assert!(got.await.is_none());
        assert!(!p.penalized(&addr(1)) && !p.penalized(&addr(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_peer_is_not_penalized_and_the_next_is_asked_at_once() {
        let p = peers();
        let busy = || Some(UpstreamError::Status { status: 429, url: "peer".into() });
        let both = [addr(1), addr(2)];
        let got = p.hedged(&both, "x", |peer| answer(peer.port(), 0, if peer.port() == 1 { busy() } else { None }));
        assert_eq!(got.await.map(|(_, v)| v), Some(2));
        assert!(!p.penalized(&addr(1)), "a peer at its upload limit was penalized");
        // Nor is it remembered as not holding the content.
        assert_eq!(p.hedged(&[addr(1)], "x", |peer| answer(peer.port(), 0, None)).await.map(|(_, v)| v), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_serving_private_content_under_its_name_only_is_neither_penalized_nor_a_miss() {
        let p = peers();
        let other_name = || Some(UpstreamError::Status { status: 403, url: "peer".into() });
        assert!(p.hedged(&[addr(1)], "x", |peer| answer(peer.port(), 0, other_name())).await.is_none());
        assert!(!p.penalized(&addr(1)));
        // Asked again for the same digest (under its own name), it is asked.
        assert_eq!(p.hedged(&[addr(1)], "x", |peer| answer(peer.port(), 0, None)).await.map(|(_, v)| v), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_said_no_is_not_asked_again_for_the_same_content() {
        let p = peers();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let no = |peer: SocketAddr| {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            answer(peer.port(), 0, Some(UpstreamError::NotFound))
        };
        assert!(p.hedged(&[addr(1)], "x", no).await.is_none());
        assert!(p.hedged(&[addr(1)], "x", no).await.is_none());
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1, "asked again for x");
        // Other content: asked.
        assert_eq!(p.hedged(&[addr(1)], "y", |peer| answer(peer.port(), 0, None)).await.map(|(_, v)| v), Some(1));
        // After a penalty's time, asked again.
        tokio::time::advance(ResolverConfig::default().peers.penalty).await;
        assert!(p.hedged(&[addr(1)], "x", no).await.is_none());
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    /// A peer server that answers every request with a blob of `claimed` bytes.
    async fn lying_peer(claimed: usize) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let _ = conn.read(&mut head).await;
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {claimed}\r\n\r\n");
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.write_all(&vec![7u8; claimed]).await;
                });
            }
        });
        at
    }

    #[tokio::test]
    async fn a_peer_claiming_another_size_than_the_manifest_is_penalized_and_not_used() {
        let p = peers();
        let origin = Origin {
            registry: clyde_types::Registry::parse("registry.example").unwrap(),
            repository: clyde_types::Repository::parse("team/app").unwrap(),
        };
        let digest = Digest::of(b"the real blob, 100 bytes long in the manifest");
        // Ten times the size, then half of it: neither is used, both are penalized.
        for claimed in [1000, 50] {
            let liar = lying_peer(claimed).await;
            assert!(p.open_blob(&[liar], &origin, &digest, None, Some(100)).await.is_none(), "{claimed}");
            assert!(p.penalized(&liar), "a peer claiming {claimed} bytes was not penalized");
        }
        // The right size, or no trusted size to check against: used.
        let honest = lying_peer(100).await;
        assert!(p.open_blob(&[honest], &origin, &digest, None, Some(100)).await.is_some());
        let unchecked = lying_peer(1000).await;
        assert!(p.open_blob(&[unchecked], &origin, &digest, None, None).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn silence_from_every_peer_ends_after_one_timeout_each() {
        let p = peers();
        let started = Instant::now();
        let got = p.hedged(&[addr(1), addr(2)], "x", |peer| answer(peer.port(), 60_000, None)).await;
        assert!(got.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
    }
}
