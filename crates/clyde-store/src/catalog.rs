//! What the store holds, as operators think of it: images by reference, and pruning them
//! with reference counts so a blob shared with a kept image stays.

use std::collections::{HashMap, HashSet};

use clyde_types::{ContentKey, Digest, media};

use crate::{ManifestRecord, Store, StoreError, StoreEvent};

/// Whether a manifest is an index (several platforms) or one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManifestKind {
    Index,
    Image,
}

impl ManifestKind {
    /// The kind of a manifest with this media type.
    pub fn of(media_type: &str) -> Self {
        if media_type == media::OCI_INDEX || media_type == media::DOCKER_MANIFEST_LIST {
            Self::Index
        } else {
            Self::Image
        }
    }

    /// `index` or `image`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Index => "index",
            Self::Image => "image",
        }
    }
}

/// One cached manifest under one name: a tag (`registry/repo:tag`) or, when no tag points
/// at it, its digest (`registry/repo@sha256:...`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageEntry {
    pub reference: String,
    pub digest: Digest,
    pub kind: ManifestKind,
    pub media_type: String,
    /// Bytes this store holds for the manifest and everything it references.
    pub size: u64,
    /// Unix seconds when it was first cached.
    pub created: u64,
    /// Unix seconds when a client last fetched it.
    pub last_pulled: u64,
    /// Whether the name is a tag (else a digest).
    pub tagged: bool,
    /// Whether it is a platform manifest of a cached index (it goes with the index).
    pub child: bool,
    /// Whether its name matches a pinned pattern: eviction never removes what it references,
    /// and a prune only with `force`.
    #[serde(default)]
    pub pinned: bool,
}

/// What a prune removes (or would remove, in a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrunePlan {
    /// The names that matched, tags and digests alike.
    pub images: Vec<String>,
    /// Tags removed (`registry/repo:tag`).
    pub tags: Vec<String>,
    /// Manifests no kept name reaches any more.
    pub manifests: Vec<Digest>,
    /// Blobs (layers, configs) only removed manifests referenced.
    pub blobs: Vec<Digest>,
    /// Bytes freed: removed manifests and blobs.
    pub bytes: u64,
    /// Pinned names the selection matched and kept (not forced).
    #[serde(default)]
    pub pinned: Vec<String>,
}

/// Which images to prune: those `select` accepts, then least-recently-pulled ones until
/// the store fits in `max_bytes`.
pub struct PruneSelection<'a> {
    pub select: Option<&'a (dyn Fn(&ImageEntry) -> bool + Sync)>,
    pub max_bytes: Option<u64>,
    /// Pinned images may go too.
    pub force: bool,
    /// At most this many of the selected images, least recently pulled first.
    pub max_images: Option<usize>,
}

/// Everything the catalog needs, read once.
struct Snapshot {
    manifests: HashMap<Digest, ManifestRecord>,
    tags: Vec<(String, Digest)>,
    blob_sizes: HashMap<Digest, u64>,
    pins: Option<std::sync::Arc<regex::RegexSet>>,
}

impl Snapshot {
    fn read(store: &Store) -> Result<Self, StoreError> {
        let manifests = store
            .manifests()?
            .into_iter()
            .filter_map(|(k, r)| Some((k.parse::<Digest>().ok()?, r)))
            .collect::<HashMap<_, _>>();
        let tags =
            store.tags()?.into_iter().map(|(k, r)| (k, r.digest)).filter(|(_, d)| manifests.contains_key(d)).collect();
        let blob_sizes = store
            .inner
            .meta
            .blobs()?
            .into_iter()
            .filter_map(|(k, r)| Some((k.parse::<Digest>().ok()?, r.size)))
            .collect();
        Ok(Self { manifests, tags, blob_sizes, pins: store.pins() })
    }

    /// Every digest reachable from `roots` (the manifests and what they reference) that the
    /// store holds or has a record of.
    fn reach(&self, roots: impl IntoIterator<Item = Digest>) -> HashSet<Digest> {
        let mut seen = HashSet::new();
        let mut stack: Vec<Digest> = roots.into_iter().collect();
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            if let Some(m) = self.manifests.get(&d) {
                stack.extend(m.references.iter().copied());
            }
        }
        seen
    }

    fn held_bytes(&self, digests: &HashSet<Digest>) -> u64 {
        digests.iter().filter_map(|d| self.blob_sizes.get(d)).sum()
    }

    fn entries(&self) -> Vec<ImageEntry> {
        let children: HashSet<Digest> = self
            .manifests
            .values()
            .filter(|m| ManifestKind::of(&m.media_type) == ManifestKind::Index)
            .flat_map(|m| m.references.iter().copied())
            .collect();
        let tagged: HashSet<Digest> = self.tags.iter().map(|(_, d)| *d).collect();
        let entry = |reference: String, digest: Digest, tagged: bool| {
            let m = &self.manifests[&digest];
            ImageEntry {
                digest,
                kind: ManifestKind::of(&m.media_type),
                media_type: m.media_type.clone(),
                size: self.held_bytes(&self.reach([digest])),
                created: m.created,
                last_pulled: m.last_pulled,
                tagged,
                child: children.contains(&digest),
                pinned: m.pinned || self.pins.as_ref().is_some_and(|p| p.is_match(&reference)),
                reference,
            }
        };
        let mut out: Vec<ImageEntry> = self.tags.iter().map(|(name, d)| entry(name.clone(), *d, true)).collect();
        for (digest, m) in &self.manifests {
            if !tagged.contains(digest) {
                out.push(entry(format!("{}/{}@{digest}", m.registry, m.repository), *digest, false));
            }
        }
        out.sort_by(|a, b| (a.child, &a.reference).cmp(&(b.child, &b.reference)));
        out
    }
}

impl Store {
    /// Digests eviction must keep: everything a pinned image references.
    pub(crate) fn pinned_digests(&self) -> Result<HashSet<Digest>, StoreError> {
        let snapshot = Snapshot::read(self)?;
        let pinned: Vec<Digest> = snapshot.entries().into_iter().filter(|e| e.pinned).map(|e| e.digest).collect();
        Ok(snapshot.reach(pinned))
    }

    /// Pins the manifest `digest` (and so its image): `clyde load --pin`.
    pub async fn pin(&self, digest: Digest) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let _catalog = store.inner.catalog.read().unwrap_or_else(|p| p.into_inner());
            match store.inner.meta.manifest(&digest)? {
                Some(mut record) => {
                    record.pinned = true;
                    store.inner.meta.put_manifest(&digest, &record)
                }
                None => Err(StoreError::Metadata(format!("no manifest {digest} to pin"))),
            }
        })
        .await
        .map_err(StoreError::join)?
    }

    /// Every cached manifest by name, indexes and images; platform manifests of an index last.
    pub fn images(&self) -> Result<Vec<ImageEntry>, StoreError> {
        Ok(Snapshot::read(self)?.entries())
    }

    /// Works out what a prune removes, changing nothing.
    pub fn plan_prune(&self, selection: &PruneSelection<'_>) -> Result<PrunePlan, StoreError> {
        let snapshot = Snapshot::read(self)?;
        let entries = snapshot.entries();
        // Names a prune can remove: children go with their index, and an untagged image a
        // kept index still references is kept by reachability anyway.
        let roots: Vec<&ImageEntry> = entries.iter().filter(|e| e.tagged || !e.child).collect();
        let matched: Vec<bool> = roots.iter().map(|e| selection.select.is_some_and(|select| select(e))).collect();
        // Pinned images stay unless forced.
        let keeps = |e: &ImageEntry| e.pinned && !selection.force;
        let mut selected: Vec<bool> = roots.iter().zip(&matched).map(|(e, m)| *m && !keeps(e)).collect();
        if let Some(cap) = selection.max_images {
            let mut chosen: Vec<usize> = (0..roots.len()).filter(|i| selected[*i]).collect();
            chosen.sort_by_key(|i| (roots[*i].last_pulled, roots[*i].created));
            for i in chosen.into_iter().skip(cap) {
                selected[i] = false;
            }
        }
        let kept = |selected: &[bool]| -> HashSet<Digest> {
            snapshot.reach(roots.iter().zip(selected).filter(|(_, s)| !**s).map(|(e, _)| e.digest))
        };
        if let Some(max) = selection.max_bytes {
            // Least recently pulled first; the oldest names go until what stays fits.
            let mut order: Vec<usize> = (0..roots.len()).filter(|i| !selected[*i] && !keeps(roots[*i])).collect();
            order.sort_by_key(|i| (roots[*i].last_pulled, roots[*i].created));
            let unowned = self.unowned_bytes(&snapshot);
            if unowned > max {
                return Err(StoreError::Unprunable { unowned, max });
            }
            for i in order {
                if snapshot.held_bytes(&kept(&selected)) + unowned <= max {
                    break;
                }
                selected[i] = true;
            }
        }
        let kept = kept(&selected);
        let chosen: Vec<&ImageEntry> = roots.iter().zip(&selected).filter(|(_, s)| **s).map(|(e, _)| *e).collect();
        let gone: HashSet<Digest> =
            snapshot.reach(chosen.iter().map(|e| e.digest)).difference(&kept).copied().collect();
        let mut plan = PrunePlan {
            images: chosen.iter().map(|e| e.reference.clone()).collect(),
            tags: chosen.iter().filter(|e| e.tagged).map(|e| e.reference.clone()).collect(),
            pinned: roots
                .iter()
                .zip(&matched)
                .filter(|(e, m)| **m && keeps(e))
                .map(|(e, _)| e.reference.clone())
                .collect(),
            ..PrunePlan::default()
        };
        for d in &gone {
            if snapshot.manifests.contains_key(d) {
                plan.manifests.push(*d);
            } else if snapshot.blob_sizes.contains_key(d) {
                plan.blobs.push(*d);
            }
        }
        plan.manifests.sort();
        plan.blobs.sort();
        plan.bytes = snapshot.held_bytes(&gone);
        Ok(plan)
    }

    /// Bytes of blobs no manifest references (fetched by digest alone): a prune by size
    /// counts them, but only eviction removes them.
    fn unowned_bytes(&self, snapshot: &Snapshot) -> u64 {
        let owned = snapshot.reach(snapshot.manifests.keys().copied());
        snapshot.blob_sizes.iter().filter(|(d, _)| !owned.contains(d)).map(|(_, s)| s).sum()
    }

    /// Removes what `plan` names, withdrawing each key, and returns what it removed: a
    /// manifest recorded since the plan was made keeps what it references. Blobs a reader
    /// has open stay readable by it; new requests miss.
    pub async fn apply_prune(&self, plan: &PrunePlan) -> Result<PrunePlan, StoreError> {
        let store = self.clone();
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || {
            let _catalog = store.inner.catalog.write().unwrap_or_else(|p| p.into_inner());
            // What the store holds now, against the names the plan keeps.
            let snapshot = Snapshot::read(&store)?;
            let pruned: HashSet<&str> = plan.images.iter().map(String::as_str).collect();
            let kept = snapshot.reach(
                snapshot
                    .entries()
                    .into_iter()
                    .filter(|e| (e.tagged || !e.child) && !pruned.contains(e.reference.as_str()))
                    .map(|e| e.digest),
            );
            let mut plan = plan;
            plan.manifests.retain(|d| !kept.contains(d));
            plan.blobs.retain(|d| !kept.contains(d));
            plan.bytes = snapshot.held_bytes(&plan.manifests.iter().chain(&plan.blobs).copied().collect());
            for tag in &plan.tags {
                store.inner.meta.remove_tag(tag)?;
                store.emit(StoreEvent::Dropped(ContentKey::Tag(tag.clone())));
            }
            for digest in &plan.manifests {
                store.inner.meta.remove_manifest(digest)?;
                store.remove_blob_blocking(digest)?;
            }
            for digest in &plan.blobs {
                store.remove_blob_blocking(digest)?;
            }
            tracing::info!(
                images = plan.images.len(),
                manifests = plan.manifests.len(),
                blobs = plan.blobs.len(),
                bytes = plan.bytes,
                "pruned"
            );
            Ok(plan)
        })
        .await
        .map_err(StoreError::join)?
    }
}
