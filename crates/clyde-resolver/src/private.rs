//! Which content belongs to private registries (`private = true`), so that a request naming
//! another registry never reads it from this node unchecked. Known from the manifests of
//! private registries the store holds (read at start, then as they arrive), the blobs
//! fetched from them, and the sources containerd labels its content with.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use clyde_store::Store;
use clyde_types::Digest;

use crate::Resolver;

/// Digests of private registries' content, with the registries they came from.
#[derive(Default)]
pub(crate) struct PrivateContent {
    /// The private registries' names, lower case.
    registries: HashSet<String>,
    digests: RwLock<HashMap<Digest, Vec<String>>>,
}

impl PrivateContent {
    /// An index for `registries`, filled from the manifests `store` holds.
    pub(crate) fn new(registries: Vec<String>, store: &Store) -> Self {
        let index = Self { registries: registries.into_iter().collect(), digests: RwLock::default() };
        if index.registries.is_empty() {
            return index;
        }
        match store.manifests() {
            Ok(manifests) => {
                for (digest, record) in manifests {
                    let Ok(digest) = digest.parse::<Digest>() else { continue };
                    let digests = std::iter::once(digest).chain(record.references.iter().copied());
                    index.note(&record.registry, digests);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the store's manifests to find private content"),
        }
        index
    }

    /// Records `digests` as content of `registry`, if that registry is private.
    pub(crate) fn note(&self, registry: &str, digests: impl IntoIterator<Item = Digest>) {
        let registry = registry.to_ascii_lowercase();
        if !self.registries.contains(&registry) {
            return;
        }
        let mut map = self.digests.write().unwrap_or_else(|p| p.into_inner());
        for digest in digests {
            let entry = map.entry(digest).or_default();
            if !entry.contains(&registry) {
                entry.push(registry.clone());
            }
        }
    }

    /// The private registries `digest` is known to come from, among `sources` too (the
    /// registries another holder on this node says it came from).
    fn registries_of(&self, digest: &Digest, sources: Vec<String>) -> Vec<String> {
        if self.registries.is_empty() {
            return Vec::new();
        }
        let mut out = self.digests.read().unwrap_or_else(|p| p.into_inner()).get(digest).cloned().unwrap_or_default();
        for source in sources {
            let source = source.to_ascii_lowercase();
            if self.registries.contains(&source) && !out.contains(&source) {
                out.push(source);
            }
        }
        out
    }
}

impl Resolver {
    /// The private registries whose content `digest` is, as far as this node knows (empty:
    /// none, or no registry is private).
    pub fn private_registries_of(&self, digest: &Digest) -> Vec<String> {
        // Asked for every request by digest: nothing to look up when no registry is private.
        if self.inner.private.registries.is_empty() {
            return Vec::new();
        }
        let sources = self.inner.local.as_ref().map(|l| l.sources(digest)).unwrap_or_default();
        self.inner.private.registries_of(digest, sources)
    }

    /// Whether the upstream `registry` is marked private.
    pub fn is_private(&self, registry: &clyde_types::Registry) -> bool {
        self.inner.upstream.is_private(registry)
    }

    /// The upstream clients.
    pub fn upstream(&self) -> &clyde_upstream::Upstream {
        &self.inner.upstream
    }

    /// Whether this node ever asks the upstream (not air-gapped, not peers-only).
    pub fn asks_upstream(&self) -> bool {
        !self.inner.config.air_gapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_registries_content_is_noted_and_sources_count_too() {
        let index =
            PrivateContent { registries: HashSet::from(["secret.example".to_string()]), digests: RwLock::default() };
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        index.note("Secret.Example", [a]);
        index.note("public.example", [b]);
        assert_eq!(index.registries_of(&a, Vec::new()), vec!["secret.example".to_string()]);
        assert!(index.registries_of(&b, Vec::new()).is_empty());
        assert!(index.registries_of(&c, vec!["public.example".into()]).is_empty());
        assert_eq!(index.registries_of(&c, vec!["secret.example".into()]), vec!["secret.example".to_string()]);
        assert_eq!(index.registries_of(&a, vec!["secret.example".into()]).len(), 1);
    }
}
