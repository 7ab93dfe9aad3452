//! Manifests and tags: digests are cached for good, tags are re-checked upstream.

use bytes::Bytes;
use clyde_store::{ManifestRecord, TagRecord, unix_now};
use clyde_types::{ContentKey, Digest, Reference, media};
use clyde_upstream::{Manifest, UpstreamError};

use crate::peers::Lookup;
use crate::{Origin, ResolveError, Resolver, election};

/// A manifest ready to serve, byte-for-byte as the upstream sent it.
#[derive(Clone, Debug)]
pub struct ServedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
    /// Where it came from: `local`, `peer` or `upstream`.
    pub source: &'static str,
    /// For a tag's answer to a peer: when the tag was last resolved from the upstream
    /// (Unix seconds).
    pub checked_at: Option<u64>,
}

/// The store's name of a tag, which is also what the DHT advertises it as.
fn tag_key(origin: &Origin, tag: &str) -> String {
    clyde_types::key::tag_name(origin.registry.as_str(), origin.repository.as_str(), tag)
}

/// The sizes a manifest's descriptors give (config, layers, children, artifact blobs).
fn descriptor_sizes(bytes: &[u8]) -> Vec<(Digest, u64)> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let descriptors = doc.get("config").into_iter().chain(
        ["layers", "manifests", "blobs"]
            .iter()
            .flat_map(|l| doc.get(*l).and_then(|v| v.as_array()).into_iter().flatten()),
    );
    descriptors
        .filter_map(|d| {
            let digest = d.get("digest")?.as_str()?.parse().ok()?;
            Some((digest, d.get("size")?.as_u64()?))
        })
        .collect()
}

/// Digests of the blobs and manifests a manifest refers to (config, layers, children).
fn references(bytes: &[u8]) -> Vec<Digest> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |v: &serde_json::Value| {
        if let Some(d) = v.get("digest").and_then(|d| d.as_str()).and_then(|d| d.parse().ok()) {
            out.push(d);
        }
    };
    if let Some(config) = doc.get("config") {
        push(config);
    }
    // `blobs`: artifact manifests.
    for list in ["layers", "manifests", "blobs"] {
        for item in doc.get(list).and_then(|l| l.as_array()).into_iter().flatten() {
            push(item);
        }
    }
    // Docker schema 1.
    for layer in doc.get("fsLayers").and_then(|l| l.as_array()).into_iter().flatten() {
        if let Some(d) = layer.get("blobSum").and_then(|d| d.as_str()).and_then(|d| d.parse().ok()) {
            out.push(d);
        }
    }
    out
}

impl Resolver {
    /// The manifest a reference names, from the cache or the upstream.
    pub async fn manifest(
        &self,
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<ServedManifest, ResolveError> {
        let served = match reference {
            Reference::Digest(digest) => self.manifest_by_digest(origin, digest, accept).await,
            Reference::Tag(tag) => self.manifest_by_tag(origin, tag, accept).await,
        };
        if let Ok(m) = &served {
            self.inner.store.touch(&m.digest);
        }
        served
    }

    async fn cached_manifest(&self, digest: &Digest) -> Result<Option<ServedManifest>, ResolveError> {
        let store = &self.inner.store;
        let d = *digest;
        let Some(record) = store.blocking(move |s| s.manifest(&d)).await? else {
            return Ok(None);
        };
        let Some(bytes) = store.read_blob(digest).await? else {
            return Ok(None);
        };
        Ok(Some(ServedManifest {
            bytes,
            media_type: record.media_type,
            digest: *digest,
            source: "local",
            checked_at: None,
        }))
    }

    async fn manifest_by_digest(
        &self,
        origin: &Origin,
        digest: &Digest,
        accept: Option<&str>,
    ) -> Result<ServedManifest, ResolveError> {
        if let Some(m) = self.cached_manifest(digest).await? {
            return Ok(m);
        }
        let reference = Reference::Digest(*digest);
        // A manifest by digest verifies, so peers come before the upstream.
        let lookup = self.inner.config.first_lookup();
        if let Some(m) = self.manifest_from_peers(origin, &reference, accept, lookup, 0).await? {
            return Ok(m);
        }
        if self.inner.config.air_gapped {
            return Err(self.never_upstream());
        }
        // Nobody holds it yet: one node of those asking at once fetches it for the cluster.
        if let Some(m) = self.manifest_from_elected(origin, &reference, accept, digest, 0).await? {
            return Ok(m);
        }
        self.fetch_manifest(origin, &reference, accept).await
    }

    /// Takes part in the election of the node that asks the upstream for a manifest (by
    /// digest, or a tag: elected under the digest of its name), as for a cold blob
    /// ([`crate::election`]): the manifest from the elected node once it has it, or `None`
    /// when this node is elected (or nobody served in time). A tag is taken from the
    /// elected member once it resolved it after `newer_than`.
    async fn manifest_from_elected(
        &self,
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
        key: &Digest,
        newer_than: u64,
    ) -> Result<Option<ServedManifest>, ResolveError> {
        let Some(peers) = &self.inner.peers else { return Ok(None) };
        let timeouts = &self.inner.config.peers;
        let answer = match reference {
            Reference::Digest(_) => election::follow_elected_for(peers, timeouts, key, |winner| async move {
                Ok((peers.manifest_from(winner, origin, reference, accept).await?, 0))
            })
            .await
            .map(|(answer, _)| answer),
            Reference::Tag(tag) => {
                if self.inner.config.members.is_none() {
                    return Ok(None);
                }
                election::follow_elected_for(peers, timeouts, key, |winner| {
                    peers.tag_from(winner, origin, tag, accept, newer_than)
                })
                .await
                .map(|(answer, _)| answer)
            }
        };
        let Some((m, checked_at)) = answer else { return Ok(None) };
        if !media::accepts(accept, &m.media_type) {
            return Ok(None);
        }
        Ok(Some(self.keep_manifest(origin, reference, accept, m, "peer", checked_at).await?))
    }

    fn never_upstream(&self) -> ResolveError {
        if self.inner.peers.is_some() { ResolveError::NoPeer } else { ResolveError::AirGapped }
    }

    /// The manifest from the first peer that holds it, stored like one from the upstream. A
    /// tag is taken from members only, resolved from the upstream within the tag TTL (and
    /// after `newer_than`), and kept with the time the member checked it (so it is due for a
    /// check when the member's would have been).
    async fn manifest_from_peers(
        &self,
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
        lookup: Lookup,
        newer_than: u64,
    ) -> Result<Option<ServedManifest>, ResolveError> {
        let Some(peers) = &self.inner.peers else {
            return Ok(None);
        };
        let (m, checked_at) = match reference {
            Reference::Digest(d) => {
                let candidates = peers.find(ContentKey::Digest(*d), lookup).await;
                match peers.get_manifest(&candidates, origin, reference, accept).await {
                    Some(m) => (m, 0),
                    None => return Ok(None),
                }
            }
            Reference::Tag(t) => {
                if self.inner.config.members.is_none() {
                    return Ok(None);
                }
                let candidates = peers.find(ContentKey::Tag(tag_key(origin, t)), lookup).await;
                match peers.get_tag(&candidates, origin, t, accept, newer_than).await {
                    Some(answer) => answer,
                    None => return Ok(None),
                }
            }
        };
        if !media::accepts(accept, &m.media_type) {
            return Ok(None);
        }
        Ok(Some(self.keep_manifest(origin, reference, accept, m, "peer", checked_at).await?))
    }

    async fn manifest_by_tag(
        &self,
        origin: &Origin,
        tag: &str,
        accept: Option<&str>,
    ) -> Result<ServedManifest, ResolveError> {
        let config = &self.inner.config;
        let key = tag_key(origin, tag);
        // The tag's answer when this client accepts its type; else, for a client with a
        // narrower `Accept`, what the upstream answered clients of that kind (never the other
        // way round: a narrow client's answer is kept apart, so nobody else sees it).
        let store = &self.inner.store;
        let k = key.clone();
        let mut record = store.blocking(move |s| s.tag(&k)).await?;
        let mut cached = match &record {
            Some(r) => self.cached_manifest(&r.digest).await?.filter(|m| media::accepts(accept, &m.media_type)),
            None => None,
        };
        if cached.is_none()
            && let Some(kind) = media::accept_kind(accept)
        {
            let k = key.clone();
            record = store.blocking(move |s| s.tag_variant(&k, &kind)).await?;
            cached = match &record {
                Some(r) => self.cached_manifest(&r.digest).await?.filter(|m| media::accepts(accept, &m.media_type)),
                None => None,
            };
        }
        let reference = Reference::Tag(tag.to_string());
        if config.air_gapped {
            return match (cached, record) {
                (Some(m), _) => Ok(m),
                (None, record) => match self.manifest_from_peers(origin, &reference, accept, Lookup::Patient, 0).await?
                {
                    Some(m) => Ok(m),
                    None => match record {
                        Some(r) => Err(ResolveError::NotAcceptable(r.media_type)),
                        None => Err(self.never_upstream()),
                    },
                },
            };
        }
        let recheck_always = config.always_pull_latest && tag == "latest";
        let Some(cached) = cached else {
            // Resolved by a member within the TTL: no upstream request. Else, when others ask
            // at the same instant, one elected member asks the upstream for all.
            if !recheck_always {
                let lookup = config.first_lookup();
                if let Some(m) = self.manifest_from_peers(origin, &reference, accept, lookup, 0).await? {
                    return Ok(m);
                }
                let election_key = Digest::of(key.as_bytes());
                if let Some(m) = self.manifest_from_elected(origin, &reference, accept, &election_key, 0).await? {
                    return Ok(m);
                }
            }
            return match self.fetch_manifest(origin, &reference, accept).await {
                Err(ResolveError::Upstream(e)) if !matches!(e, UpstreamError::NotFound) => {
                    // Disconnected: a peer may have the tag cached.
                    match self.manifest_from_peers(origin, &reference, accept, Lookup::Patient, 0).await? {
                        Some(m) => {
                            tracing::info!(tag = %key, error = %e, "upstream unavailable; tag resolved through a peer");
                            Ok(m)
                        }
                        None => Err(e.into()),
                    }
                }
                other => other,
            };
        };
        let fresh = record.as_ref().is_some_and(|r| r.checked_at + config.tag_ttl.as_secs() > unix_now());
        if fresh && !recheck_always {
            return Ok(cached);
        }
        // Due for a check: a member that checked it since (within the TTL) answers for the
        // upstream.
        if !recheck_always
            && let Some(ours) = record.as_ref().map(|r| r.checked_at)
            && let Some(m) = self.manifest_from_peers(origin, &reference, accept, config.first_lookup(), ours).await?
        {
            return Ok(m);
        }
        let head = self
            .inner
            .upstream
            .head_manifest(&origin.registry, &origin.repository, &reference, accept, config.tag_check_timeout)
            .await;
        match head {
            Ok(h) if h.digest == Some(cached.digest) => {
                let record =
                    TagRecord { digest: cached.digest, media_type: cached.media_type.clone(), checked_at: unix_now() };
                self.record_tag(&key, accept, record).await?;
                Ok(cached)
            }
            Ok(h) => {
                // A digest the upstream's `HEAD` names is only its word: content of a private
                // registry is not taken from the cache on another registry's word (fetched
                // instead, its bytes then come from this registry).
                let usable = |d: &Digest| self.is_private(&origin.registry) || self.private_registries_of(d).is_empty();
                if let Some(m) = match h.digest {
                    Some(d) if usable(&d) => {
                        self.cached_manifest(&d).await?.filter(|m| media::accepts(accept, &m.media_type))
                    }
                    _ => None,
                } {
                    let record =
                        TagRecord { digest: m.digest, media_type: m.media_type.clone(), checked_at: unix_now() };
                    self.record_tag(&key, accept, record).await?;
                    return Ok(m);
                }
                self.fetch_manifest(origin, &reference, accept).await
            }
            Err(UpstreamError::NotFound) => Err(UpstreamError::NotFound.into()),
            Err(e) => {
                tracing::info!(tag = %key, error = %e, "upstream unavailable; serving the cached tag");
                Ok(cached)
            }
        }
    }

    /// Fetches a manifest upstream, stores it (verified), records the tag, serves it.
    async fn fetch_manifest(
        &self,
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<ServedManifest, ResolveError> {
        let m = self.inner.upstream.get_manifest(&origin.registry, &origin.repository, reference, accept).await?;
        self.keep_manifest(origin, reference, accept, m, "upstream", unix_now()).await
    }

    /// Records where a tag points, for the kind of `Accept` that asked: the tag itself for a
    /// client that accepts every manifest type, a variant of it for a narrower one.
    async fn record_tag(&self, key: &str, accept: Option<&str>, record: TagRecord) -> Result<(), ResolveError> {
        match media::accept_kind(accept) {
            None => self.inner.store.put_tag(key.to_string(), record).await?,
            Some(kind) => self.inner.store.put_tag_variant(key, &kind, record).await?,
        }
        Ok(())
    }

    /// Stores a fetched manifest (verified) with its record, and the tag (checked at
    /// `checked_at`) when it was fetched by tag, for the kind of `accept` that asked.
    async fn keep_manifest(
        &self,
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
        m: Manifest,
        source: &'static str,
        checked_at: u64,
    ) -> Result<ServedManifest, ResolveError> {
        let store = &self.inner.store;
        match source {
            "peer" => self.inner.metrics.peer_bytes(m.bytes.len() as u64),
            _ => self.inner.metrics.upstream_bytes(origin.registry.as_str(), m.bytes.len() as u64),
        }
        let references = references(&m.bytes);
        self.inner.private.note(origin.registry.as_str(), std::iter::once(m.digest).chain(references.iter().copied()));
        store.put_blob(m.digest, m.bytes.clone()).await?;
        let now = unix_now();
        let d = m.digest;
        let existing = store.blocking(move |s| s.manifest(&d)).await?;
        let record = ManifestRecord {
            media_type: m.media_type.clone(),
            size: m.bytes.len() as u64,
            registry: origin.registry.to_string(),
            repository: origin.repository.to_string(),
            created: existing.as_ref().map_or(now, |e| e.created),
            last_pulled: now,
            references,
            // A pin stays through later pulls of the same manifest.
            pinned: existing.as_ref().is_some_and(|e| e.pinned),
        };
        store.put_manifest(m.digest, record).await?;
        // Sizes only from a manifest whose bytes are vouched for: the upstream's, or one
        // named by its digest (a tag from a peer is that peer's word).
        if source == "upstream" || matches!(reference, Reference::Digest(_)) {
            store.put_sizes(descriptor_sizes(&m.bytes)).await?;
        }
        if let Reference::Tag(tag) = reference {
            let record = TagRecord { digest: m.digest, media_type: m.media_type.clone(), checked_at };
            self.record_tag(&tag_key(origin, tag), accept, record).await?;
        }
        Ok(ServedManifest { bytes: m.bytes, media_type: m.media_type, digest: m.digest, source, checked_at: None })
    }

    /// A manifest this node holds, for the peer server: a tag is answered as cached, with
    /// when it was last resolved from the upstream, and only if it ever was (a tag this
    /// node has only from a peer of an older version, which did not say, is not passed on).
    pub async fn held_manifest(
        &self,
        origin: &Origin,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<ServedManifest, ResolveError> {
        let local = self.inner.local.as_ref();
        let (digest, local_type, checked_at) = match reference {
            Reference::Digest(d) => (*d, None, None),
            Reference::Tag(tag) => match self
                .inner
                .store
                .blocking({
                    let k = tag_key(origin, tag);
                    move |s| s.tag(&k)
                })
                .await?
            {
                Some(record) if record.checked_at > 0 => (record.digest, None, Some(record.checked_at)),
                _ => match local.and_then(|l| l.tag(&tag_key(origin, tag))) {
                    Some(t) => (t.digest, Some(t.media_type), Some(t.updated_at)),
                    None => return Err(ResolveError::NotHeld),
                },
            },
        };
        let held = match self.cached_manifest(&digest).await? {
            Some(m) => Some(m),
            None => self.containerd_manifest(&digest, local_type).await,
        };
        match held {
            Some(m) if media::accepts(accept, &m.media_type) => Ok(ServedManifest { checked_at, ..m }),
            Some(m) => Err(ResolveError::NotAcceptable(m.media_type)),
            None => Err(ResolveError::NotHeld),
        }
    }

    /// A manifest in containerd's content store, verified; its media type from the image
    /// record when known, else from the document itself.
    async fn containerd_manifest(&self, digest: &Digest, media_type: Option<String>) -> Option<ServedManifest> {
        let source = self.local_blob(digest).await?;
        let size = source.size();
        if size > media::MAX_MANIFEST_BYTES {
            return None;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        let mut stream = source.stream(clyde_types::ByteRange::full(size), false);
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            bytes.extend_from_slice(&chunk.ok()?);
        }
        if Digest::of(&bytes) != *digest {
            tracing::warn!(%digest, "containerd's copy of a manifest does not match its digest");
            return None;
        }
        let media_type = media_type.or_else(|| manifest_media_type(&bytes))?;
        Some(ServedManifest {
            bytes: Bytes::from(bytes),
            media_type,
            digest: *digest,
            source: "local",
            checked_at: None,
        })
    }
}

/// A manifest's media type from its own `mediaType`, or from its shape when it has none.
fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(t) = doc.get("mediaType").and_then(|t| t.as_str()) {
        return Some(t.to_string());
    }
    if doc.get("manifests").is_some() {
        Some(media::OCI_INDEX.to_string())
    } else if doc.get("layers").is_some() {
        Some(media::OCI_MANIFEST.to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_sizes_are_read_from_every_list() {
        let (d1, d2) = (Digest::of(b"1"), Digest::of(b"2"));
        let doc = format!(
            r#"{{"config":{{"digest":"{d1}","size":7}},"layers":[{{"digest":"{d2}","size":1234}},{{"digest":"{d2}"}},{{"digest":"bad","size":1}}]}}"#
        );
        assert_eq!(descriptor_sizes(doc.as_bytes()), vec![(d1, 7), (d2, 1234)]);
        assert!(descriptor_sizes(b"not json").is_empty());
    }

    #[test]
    fn finds_config_layers_and_children() {
        let d1 = Digest::of(b"1");
        let d2 = Digest::of(b"2");
        let doc = format!(r#"{{"config":{{"digest":"{d1}"}},"layers":[{{"digest":"{d2}"}},{{"digest":"bad"}}]}}"#);
        assert_eq!(references(doc.as_bytes()), vec![d1, d2]);
        let idx = format!(r#"{{"manifests":[{{"digest":"{d1}"}}]}}"#);
        assert_eq!(references(idx.as_bytes()), vec![d1]);
        let artifact = format!(r#"{{"blobs":[{{"digest":"{d2}"}}]}}"#);
        assert_eq!(references(artifact.as_bytes()), vec![d2]);
        let schema1 = format!(r#"{{"fsLayers":[{{"blobSum":"{d1}"}},{{"blobSum":"{d2}"}}]}}"#);
        assert_eq!(references(schema1.as_bytes()), vec![d1, d2]);
    }
}
