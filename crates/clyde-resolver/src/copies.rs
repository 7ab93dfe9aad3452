//! Minimum copies (`[retention] min_copies = K`): the cluster keeps at least K nodes holding
//! every blob of every pinned image, without a central service.
//!
//! Each node with `min_copies` set provides [`ContentKey::Keeper`]; a node that holds pinned
//! images whole also provides [`ContentKey::Pins`] and lists them on its peer server
//! ([`clyde_upstream::PINS_PATH`]). Every `copies_interval` each keeper, in [`Resolver::keep_copies`]:
//! 1. learns the pinned images: its own, and those the holders list (a holder's list counts
//!    when its names match this node's own `pinned` patterns, or, in a cluster with a
//!    secret, from any member);
//! 2. for each image it does not hold, counts the copies: for every digest of the image
//!    (manifests, configs, layers; manifests read from peers by digest, verified, not
//!    stored), the live nodes that provide it; the image's count is the smallest;
//! 3. when fewer than K hold it, ranks the keepers that lack it by rendezvous hashing of the
//!    manifest digest ([`crate::election::rank`]); the first `K - count` of them fetch it,
//!    from peers (a digest verifies), and pin it. Every node computes the same ranking, so
//!    they do not all rush; a node that ranks lower waits for the next round.
//!
//! A holder that dies drops out of lookups when its connection closes or its pings stop
//! (`ping_timeout`, 5 s); the next round, within `copies_interval`, sees the image short and
//! the first-ranked node fetches it. Eviction never removes a pinned image's blobs, so a
//! holder's own eviction can never take a copy away.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use clyde_types::{ContentKey, Digest, ImageRef, Reference};
use clyde_upstream::PinnedImage;
use tokio::sync::{mpsc, watch};

use crate::election::{Member, rank};
use crate::peers::Lookup;
use crate::{Origin, Resolver};

/// How long a round waits for the whole walk of a well-known key.
const WALK: Duration = Duration::from_secs(2);
/// Manifests deeper than this (an index of indexes of ...) are not followed.
const MAX_DEPTH: usize = 4;

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

/// The keepers that lack an image and fetch it this round: the first `needed` by rank.
pub fn fetchers<'a>(digest: &Digest, lacking: &'a [Member], needed: usize) -> Vec<&'a Member> {
    let mut ranked: Vec<(Digest, &Member)> = lacking.iter().map(|m| (rank(digest, &m.id), m)).collect();
    ranked.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
    ranked.into_iter().take(needed).map(|(_, m)| m).collect()
}

impl Resolver {
    /// The pinned images this node holds whole (every digest they reach is a complete blob
    /// of the store), by name; platform manifests of an index go with it.
    pub fn pinned_images(&self) -> Vec<PinnedImage> {
        let Ok(images) = self.inner.store.images() else { return Vec::new() };
        images
            .into_iter()
            .filter(|e| e.pinned && !e.child && self.holds_whole(&e.digest, 0))
            .map(|e| PinnedImage { reference: e.reference, digest: e.digest })
            .collect()
    }

    fn holds_whole(&self, digest: &Digest, depth: usize) -> bool {
        let store = &self.inner.store;
        if store.blob_size(digest).is_none() {
            return false;
        }
        match store.manifest(digest) {
            Ok(Some(m)) => depth < MAX_DEPTH && m.references.iter().all(|d| self.holds_whole(d, depth + 1)),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Keeps at least `k` copies of every pinned image in the cluster, a round every
    /// `interval`, until `shutdown`.
    pub async fn keep_copies(&self, k: usize, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let Some(peers) = self.inner.peers.clone() else { return };
        peers.announce(ContentKey::Keeper);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut known = BTreeMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            let started = tokio::time::Instant::now();
            let round = self.copies_round(k, &mut known).await;
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

    /// One round: see the module's documentation. `known` carries the pinned images seen in
    /// earlier rounds: a holder that has just died, or one that has just fetched and not yet
    /// advertised, lists nothing this round, and its image must still be counted.
    pub async fn copies_round(&self, k: usize, known: &mut BTreeMap<Digest, String>) -> CopiesRound {
        let mut round = CopiesRound::default();
        let Some(peers) = self.inner.peers.clone() else { return round };
        let mine = self.pinned_images();
        if mine.is_empty() {
            peers.retract(ContentKey::Pins);
        } else {
            peers.announce(ContentKey::Pins);
        }
        // Every pinned image in the cluster, by manifest digest.
        let mut pinned = std::mem::take(known);
        let from_members = self.inner.config.members.is_some();
        let (listers, keepers) =
            tokio::join!(peers.members(ContentKey::Pins, WALK), peers.members(ContentKey::Keeper, WALK));
        for holder in listers {
            for image in peers.pins_of(holder.addr).await {
                if from_members || self.inner.store.is_pinned_name(&image.reference) {
                    pinned.entry(image.digest).or_insert(image.reference);
                }
            }
        }
        let held: HashSet<Digest> = mine.iter().map(|i| i.digest).collect();
        for image in &mine {
            known.insert(image.digest, image.reference.clone());
        }
        round.pinned = pinned.len() + held.iter().filter(|d| !pinned.contains_key(d)).count();
        let me = peers.local_id();
        for (digest, reference) in pinned {
            if held.contains(&digest) {
                continue;
            }
            let Ok(image) = ImageRef::parse(&reference) else { continue };
            let origin = Origin { registry: image.registry.clone(), repository: image.repository.clone() };
            let Some(digests) = self.image_digests(&origin, digest).await else {
                tracing::debug!(image = %reference, "cannot read a pinned image's manifests from peers");
                known.insert(digest, reference.clone());
                continue;
            };
            let (copies, holders) = self.copies(&digests).await;
            tracing::debug!(image = %reference, copies, digests = digests.len(), "copies counted");
            if copies == 0 {
                // Nobody holds it any more: nothing to copy from, and nothing to remember.
                continue;
            }
            known.insert(digest, reference.clone());
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
            match self.fetch_pinned(&origin, &image, digest).await {
                Ok(()) => {
                    // Listed at once: the others count this copy in their next round.
                    peers.announce(ContentKey::Pins);
                    round.fetched.push(digest);
                }
                Err(e) => {
                    tracing::warn!(image = %reference, error = %e, "could not fetch a pinned image for its copies")
                }
            }
        }
        round
    }

    /// Every digest of the image `digest`: its manifests (read from the store, or from
    /// peers by digest, verified and not stored) and the configs and layers they name.
    async fn image_digests(&self, origin: &Origin, digest: Digest) -> Option<Vec<Digest>> {
        let peers = self.inner.peers.as_ref()?;
        let mut out = Vec::new();
        let mut manifests = vec![(digest, 0usize)];
        while let Some((d, depth)) = manifests.pop() {
            if out.contains(&d) || depth > MAX_DEPTH {
                continue;
            }
            out.push(d);
            let bytes = match self.inner.store.read_blob(&d).await.ok().flatten() {
                Some(bytes) => bytes,
                None => {
                    let candidates = peers.find(ContentKey::Digest(d), Lookup::Patient).await;
                    peers.get_manifest(&candidates, origin, &Reference::Digest(d), None).await?.bytes
                }
            };
            let doc: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            let digest_of = |v: &serde_json::Value| v.get("digest")?.as_str()?.parse::<Digest>().ok();
            let children = doc.get("manifests").and_then(|m| m.as_array()).into_iter().flatten();
            manifests.extend(children.filter_map(digest_of).map(|c| (c, depth + 1)));
            let layers = doc.get("layers").and_then(|l| l.as_array()).into_iter().flatten();
            for blob in doc.get("config").into_iter().chain(layers).filter_map(digest_of) {
                if !out.contains(&blob) {
                    out.push(blob);
                }
            }
        }
        Some(out)
    }

    /// How many live nodes hold every one of `digests`, and who they are. The walks run at
    /// once: each may wait its whole bound on a provider that does not answer.
    async fn copies(&self, digests: &[Digest]) -> (usize, HashSet<Vec<u8>>) {
        let Some(peers) = self.inner.peers.as_ref() else { return (0, HashSet::new()) };
        let walks = digests.iter().map(|d| peers.members(ContentKey::Digest(*d), WALK));
        let mut holders: Option<HashSet<Vec<u8>>> = None;
        for found in futures_util::future::join_all(walks).await {
            let these: HashSet<Vec<u8>> = found.into_iter().map(|m| m.id).collect();
            holders = Some(match holders {
                None => these,
                Some(h) => h.intersection(&these).cloned().collect(),
            });
        }
        let holders = holders.unwrap_or_default();
        (holders.len(), holders)
    }

    /// Fetches a pinned image whole (peers first: every digest verifies), pins it, and
    /// names it as its holder did when that name was a tag this node does not have.
    async fn fetch_pinned(&self, origin: &Origin, image: &ImageRef, digest: Digest) -> Result<(), crate::LoadError> {
        let by_digest = ImageRef { reference: Reference::Digest(digest), ..image.clone() };
        // Nobody follows the progress: a closed channel makes every report a no-op.
        let (events, _) = mpsc::channel(1);
        self.load_image(&by_digest, &[], &events).await?;
        let store = &self.inner.store;
        store.pin(digest).await.map_err(crate::ResolveError::from)?;
        if let Reference::Tag(tag) = &image.reference {
            let key = clyde_types::key::tag_name(origin.registry.as_str(), origin.repository.as_str(), tag);
            let media_type = store.manifest(&digest).ok().flatten().map(|m| m.media_type).unwrap_or_default();
            if store.tag(&key).ok().flatten().is_none() {
                // Checked at 0: due for an upstream check, and never passed on as a tag.
                let record = clyde_store::TagRecord { digest, media_type, checked_at: 0 };
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
