//! Minimum copies (`[retention] min_copies = K`): the cluster keeps at least K nodes holding
//! every blob of every pinned image, without a central service.
//!
//! Only in a cluster with a secret: which images are pinned, and where, is a member's word.
//! Each node with `min_copies` set provides [`ContentKey::Keeper`]; a node that holds pinned
//! images whole also provides [`ContentKey::Pins`] and lists them on its peer server
//! ([`clyde_upstream::PINS_PATH`]): one entry per image manifest it holds with its config and
//! every layer (a pinned index is listed as the platforms it holds). Every `copies_interval`
//! each keeper, in [`Resolver::keep_copies`]:
//! 1. reads every holder's list: an image's copies are the nodes that list it;
//! 2. for each image with fewer than K copies that it lacks, ranks the keepers that lack it
//!    by rendezvous hashing of the manifest digest ([`crate::election::rank`]); the first
//!    `K - copies` fetch it by digest, from peers (a digest verifies), pin it, and list it at
//!    once. Every node computes the same ranking, so they do not all rush.
//!
//! A holder that dies drops out of lookups when its connection closes or its pings stop
//! (`ping_timeout`, 5 s); the next round, within `copies_interval`, sees the image short and
//! the first-ranked node fetches it. Images seen in earlier rounds are remembered, so the
//! round right after a death still counts them. Eviction never removes a pinned image's
//! blobs, so a holder's own eviction can never take a copy away. A copy takes its tag only
//! under the rule for tags from peers: the member resolved it from the upstream within the
//! tag TTL, and says when.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use clyde_store::ManifestKind;
use clyde_types::{ContentKey, Digest, ImageRef, Reference};
use clyde_upstream::PinnedImage;
use tokio::sync::{mpsc, watch};

use crate::Resolver;
use crate::election::{Member, rank};

/// How long a round waits for the whole walk of a well-known key.
const WALK: Duration = Duration::from_secs(2);
/// Entries read from one holder's list; the rest are ignored.
const MAX_LISTED: usize = 4096;

/// What one round saw and did, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CopiesRound {
    /// Pinned images known in the cluster.
    pub pinned: usize,
    /// Images with fewer than K copies.
    pub short: usize,
    /// Images this node fetched.
    pub fetched: Vec<Digest>,
}

/// What a keeper carries from round to round.
#[derive(Default)]
pub struct Keeping {
    /// Pinned images seen in earlier rounds (a holder that just died lists nothing).
    known: BTreeMap<Digest, String>,
    /// Whether this node provides [`ContentKey::Pins`] now.
    listed: bool,
}

/// A pinned image as the holders' lists show it this round.
#[derive(Default)]
struct Listed {
    reference: String,
    /// The nodes that list it.
    holders: HashSet<Vec<u8>>,
    /// The latest time a holder resolved its tag from the upstream.
    tag_checked_at: Option<u64>,
}

/// The keepers that lack an image and fetch it this round: the first `needed` by rank.
pub fn fetchers<'a>(digest: &Digest, lacking: &'a [Member], needed: usize) -> Vec<&'a Member> {
    let mut ranked: Vec<(Digest, &Member)> = lacking.iter().map(|m| (rank(digest, &m.id), m)).collect();
    ranked.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
    ranked.into_iter().take(needed).map(|(_, m)| m).collect()
}

impl Resolver {
    /// The pinned image manifests this node holds whole (the manifest, its config and every
    /// layer complete in the store); a pinned index counts as the platforms it holds so.
    /// Reads the catalog: call it off the async workers.
    pub fn pinned_images(&self) -> Vec<PinnedImage> {
        let store = &self.inner.store;
        let Ok(images) = store.images() else { return Vec::new() };
        let mut out = Vec::new();
        for entry in images.into_iter().filter(|e| e.pinned && !e.child) {
            let manifests = match entry.kind {
                ManifestKind::Image => vec![entry.digest],
                ManifestKind::Index => match store.manifest(&entry.digest) {
                    Ok(Some(index)) if store.blob_size(&entry.digest).is_some() => index.references,
                    _ => Vec::new(),
                },
            };
            for digest in manifests {
                if self.holds_image(&digest) && !out.iter().any(|p: &PinnedImage| p.digest == digest) {
                    // Only a tag this node resolved from the upstream, with when (as the peer
                    // server answers tags).
                    let tag_checked_at = match store.tag(&entry.reference) {
                        Ok(Some(t)) if entry.tagged && t.digest == digest && t.checked_at > 0 => Some(t.checked_at),
                        _ => None,
                    };
                    out.push(PinnedImage { reference: entry.reference.clone(), digest, tag_checked_at });
                }
            }
        }
        out
    }

    /// Whether the store holds the image manifest `digest` and everything it references.
    fn holds_image(&self, digest: &Digest) -> bool {
        let store = &self.inner.store;
        match store.manifest(digest) {
            Ok(Some(m)) => {
                ManifestKind::of(&m.media_type) == ManifestKind::Image
                    && store.blob_size(digest).is_some()
                    && m.references.iter().all(|d| store.blob_size(d).is_some())
            }
            _ => false,
        }
    }

    /// Keeps at least `k` copies of every pinned image in the cluster, a round every
    /// `interval`, until `shutdown`.
    pub async fn keep_copies(&self, k: usize, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let Some(peers) = self.inner.peers.clone() else { return };
        peers.announce(ContentKey::Keeper);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut keeping = Keeping::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            let started = tokio::time::Instant::now();
            let round = tokio::select! {
                round = self.copies_round(k, &mut keeping) => round,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if !round.fetched.is_empty() || round.short > 0 {
                tracing::info!(pinned = round.pinned, short = round.short, fetched = ?round.fetched, min_copies = k, ms, "minimum copies round");
            } else {
                tracing::debug!(pinned = round.pinned, ms, "minimum copies round");
            }
        }
        peers.retract(ContentKey::Keeper);
        peers.retract(ContentKey::Pins);
    }

    /// One round: see the module's documentation.
    pub async fn copies_round(&self, k: usize, keeping: &mut Keeping) -> CopiesRound {
        let mut round = CopiesRound::default();
        let Some(peers) = self.inner.peers.clone() else { return round };
        if self.inner.config.members.is_none() {
            return round;
        }
        let resolver = self.clone();
        let mine = tokio::task::spawn_blocking(move || resolver.pinned_images()).await.unwrap_or_default();
        let held: HashSet<Digest> = mine.iter().map(|i| i.digest).collect();
        self.list_pins(&peers, keeping, !held.is_empty());
        let (listers, keepers) =
            tokio::join!(peers.members(ContentKey::Pins, WALK), peers.members(ContentKey::Keeper, WALK));
        let lists = futures_util::future::join_all(
            listers.iter().map(|h| async { (h.id.clone(), peers.pins_of(h.addr).await) }),
        )
        .await;
        // Every pinned image in the cluster, by manifest digest, with the nodes that list it
        // and the latest time one of them checked its tag.
        let mut images: BTreeMap<Digest, Listed> = std::mem::take(&mut keeping.known)
            .into_iter()
            .map(|(d, reference)| (d, Listed { reference, ..Listed::default() }))
            .collect();
        for (id, list) in lists {
            for image in list.into_iter().take(MAX_LISTED) {
                let entry = images
                    .entry(image.digest)
                    .or_insert_with(|| Listed { reference: image.reference, ..Listed::default() });
                entry.holders.insert(id.clone());
                entry.tag_checked_at = entry.tag_checked_at.max(image.tag_checked_at);
            }
        }
        for image in &mine {
            keeping.known.insert(image.digest, image.reference.clone());
        }
        round.pinned = images.len() + held.iter().filter(|d| !images.contains_key(d)).count();
        let me = peers.local_id();
        for (digest, Listed { reference, holders, tag_checked_at }) in images {
            if held.contains(&digest) {
                continue;
            }
            let copies = holders.len();
            if copies == 0 {
                // Nobody holds it any more: nothing to copy from, nothing to remember.
                continue;
            }
            keeping.known.insert(digest, reference.clone());
            if copies >= k {
                continue;
            }
            round.short += 1;
            let mut lacking: Vec<Member> = keepers.iter().filter(|m| !holders.contains(&m.id)).cloned().collect();
            lacking.push(Member { id: me.clone(), addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)) });
            if !fetchers(&digest, &lacking, k - copies).iter().any(|m| m.id == me) {
                continue;
            }
            tracing::info!(image = %reference, %digest, copies, min_copies = k, "fewer copies than wanted; fetching");
            match self.fetch_pinned(&reference, digest, tag_checked_at).await {
                Ok(()) => {
                    // Listed at once: the others count this copy in their next round.
                    self.list_pins(&peers, keeping, true);
                    round.fetched.push(digest);
                }
                Err(e) => {
                    tracing::warn!(image = %reference, error = %e, "could not fetch a pinned image for its copies")
                }
            }
        }
        round
    }

    /// Provides [`ContentKey::Pins`] while this node holds pinned images, telling the DHT
    /// only when that changes.
    fn list_pins(&self, peers: &crate::peers::Peers, keeping: &mut Keeping, holds: bool) {
        if holds != keeping.listed {
            keeping.listed = holds;
            if holds { peers.announce(ContentKey::Pins) } else { peers.retract(ContentKey::Pins) }
        }
    }

    /// Fetches the image manifest `digest` whole (peers first: every digest verifies) and pins
    /// it. Its tag comes along when a member resolved it from the upstream within the tag TTL
    /// (the rule for tags from peers), kept with the member's time, so a pod on this node
    /// still starts by tag while the upstream is gone.
    async fn fetch_pinned(
        &self,
        reference: &str,
        digest: Digest,
        tag_checked_at: Option<u64>,
    ) -> Result<(), crate::LoadError> {
        let image = ImageRef::parse(reference).map_err(|e| crate::LoadError::BadReference(e.to_string()))?;
        let by_digest = ImageRef { reference: Reference::Digest(digest), ..image.clone() };
        // Nobody follows the progress: a closed channel makes every report a no-op.
        let (events, _) = mpsc::channel(1);
        self.load_image(&by_digest, &[], &events).await?;
        let store = &self.inner.store;
        store.pin(digest).await.map_err(crate::ResolveError::from)?;
        let now = clyde_store::unix_now();
        let ttl = self.inner.config.tag_ttl.as_secs();
        if let (Reference::Tag(tag), Some(checked)) = (&image.reference, tag_checked_at)
            && checked.saturating_add(ttl) > now
            && checked <= now + clyde_types::membership::MAX_SKEW_SECS
        {
            let key = clyde_types::key::tag_name(image.registry.as_str(), image.repository.as_str(), tag);
            let k = key.clone();
            let untagged =
                store.blocking(move |s| Ok(s.tag(&k)?.is_none())).await.map_err(crate::ResolveError::from)?;
            if untagged {
                let media_type = store
                    .blocking(move |s| Ok(s.manifest(&digest)?.map(|m| m.media_type)))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let record = clyde_store::TagRecord { digest, media_type, checked_at: checked };
                store.put_tag(key, record).await.map_err(crate::ResolveError::from)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: u8) -> Member {
        Member { id: vec![i], addr: std::net::SocketAddr::from(([10, 0, 0, i], 1)) }
    }

    #[test]
    fn every_node_picks_the_same_fetchers_whatever_order_it_sees_them_in() {
        let digest = Digest::of(b"pinned image");
        let nodes: Vec<Member> = (1..=6).map(member).collect();
        let mut reversed = nodes.clone();
        reversed.reverse();
        let a: Vec<Vec<u8>> = fetchers(&digest, &nodes, 2).iter().map(|m| m.id.clone()).collect();
        let b: Vec<Vec<u8>> = fetchers(&digest, &reversed, 2).iter().map(|m| m.id.clone()).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert!(fetchers(&digest, &nodes, 0).is_empty());
        assert_eq!(fetchers(&digest, &nodes, 10).len(), 6);
    }

    #[test]
    fn a_node_leaving_moves_only_the_images_it_was_picked_for() {
        let nodes: Vec<Member> = (1..=8).map(member).collect();
        let mut moved = 0;
        for i in 0..200u32 {
            let digest = Digest::of(&i.to_le_bytes());
            let first = fetchers(&digest, &nodes, 1)[0].clone();
            let without: Vec<Member> = nodes.iter().filter(|m| m.id != vec![8]).cloned().collect();
            let after = fetchers(&digest, &without, 1)[0].clone();
            if after != first {
                assert_eq!(first.id, vec![8], "an image moved although its fetcher stayed");
                moved += 1;
            }
        }
        assert!(moved > 0 && moved < 60, "{moved} of 200 moved");
    }
}
