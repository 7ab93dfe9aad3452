//! Loading an image into the store ahead of need (`clyde load`, `serve --preload-images`):
//! its manifests through the usual resolution (cache, peers, upstream), then every blob of
//! the chosen platforms drained through the shared transfers, so a load and a containerd
//! pull of the same image share one download.

use std::collections::HashSet;
use std::fmt;

use clyde_types::{Digest, ImageRef, Reference, media};
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use crate::{BlobSource, Origin, ResolveError, Resolver, Want};

/// Blobs of one image fetched at once.
const BLOBS_AT_ONCE: usize = 3;
/// Progress is reported at most once per this many bytes of a blob (and at its end).
const PROGRESS_STEP: u64 = 1 << 20;

/// A platform as `os/arch[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// Why a platform is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/arch or os/arch/variant, e.g. linux/amd64 or linux/arm64/v8")]
pub struct PlatformError(String);

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self, PlatformError> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.len() <= 32 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => {
                Ok(Self { os: os.to_string(), architecture: arch.to_string(), variant: None })
            }
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => {
                Ok(Self { os: os.to_string(), architecture: arch.to_string(), variant: Some(variant.to_string()) })
            }
            _ => Err(PlatformError(s.chars().take(40).collect())),
        }
    }

    /// Whether an index entry's `platform` object is this platform (a platform without a
    /// variant matches every variant).
    fn matches(&self, platform: &serde_json::Value) -> bool {
        let field = |k: &str| platform.get(k).and_then(|v| v.as_str());
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.architecture.as_str())
            && self.variant.as_deref().is_none_or(|v| field("variant") == Some(v))
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// What a load reports as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadEvent {
    /// The image's manifests are cached; these blobs (digest, size) are to be fetched.
    Resolved { digest: Digest, blobs: Vec<(Digest, u64)> },
    /// `done` of `size` bytes of a blob are in the store or arriving.
    Progress { digest: Digest, done: u64, size: u64 },
}

/// Why an image did not load.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    #[error("the manifest {0} is not valid JSON or names no content")]
    BadManifest(Digest),
    #[error("the index has no manifest for {wanted}; it has {available}")]
    NoPlatform { wanted: String, available: String },
    #[error("blob {digest}: {error}")]
    Blob { digest: Digest, error: String },
    #[error("bad image reference: {0}")]
    BadReference(String),
}

/// The descriptors (`digest`, `size`) under `field` of a manifest.
fn descriptors<'a>(
    doc: &'a serde_json::Value,
    field: &str,
) -> impl Iterator<Item = (&'a serde_json::Value, Digest, u64)> {
    doc.get(field).and_then(|l| l.as_array()).into_iter().flatten().filter_map(|item| {
        let digest = item.get("digest")?.as_str()?.parse().ok()?;
        Some((item, digest, item.get("size")?.as_u64()?))
    })
}

impl Resolver {
    /// Loads one image: its manifest (and, for an index, the manifests of `platforms`, or of
    /// every platform when empty), then every config and layer. Reports to `events`.
    pub async fn load_image(
        &self,
        image: &ImageRef,
        platforms: &[Platform],
        events: &mpsc::Sender<LoadEvent>,
    ) -> Result<Digest, LoadError> {
        let origin = Origin { registry: image.registry.clone(), repository: image.repository.clone() };
        let top = self.manifest(&origin, &image.reference, None).await?;
        let mut images = Vec::new();
        if media::OCI_INDEX == top.media_type || media::DOCKER_MANIFEST_LIST == top.media_type {
            let doc: serde_json::Value =
                serde_json::from_slice(&top.bytes).map_err(|_| LoadError::BadManifest(top.digest))?;
            let mut available = Vec::new();
            for (item, digest, _) in descriptors(&doc, "manifests") {
                let platform = item.get("platform").cloned().unwrap_or_default();
                available.push(format!(
                    "{}/{}",
                    platform.get("os").and_then(|v| v.as_str()).unwrap_or("?"),
                    platform.get("architecture").and_then(|v| v.as_str()).unwrap_or("?")
                ));
                if platforms.is_empty() || platforms.iter().any(|p| p.matches(&platform)) {
                    images.push(digest);
                }
            }
            if images.is_empty() {
                let wanted = platforms.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                return Err(LoadError::NoPlatform { wanted, available: available.join(", ") });
            }
        } else {
            images.push(top.digest);
        }
        let mut blobs = Vec::new();
        let mut seen = HashSet::new();
        for digest in images {
            let manifest = if digest == top.digest {
                top.clone()
            } else {
                self.manifest(&origin, &Reference::Digest(digest), None).await?
            };
            let doc: serde_json::Value =
                serde_json::from_slice(&manifest.bytes).map_err(|_| LoadError::BadManifest(digest))?;
            let config = doc
                .get("config")
                .into_iter()
                .filter_map(|c| Some((c.get("digest")?.as_str()?.parse::<Digest>().ok()?, c.get("size")?.as_u64()?)));
            let layers = descriptors(&doc, "layers").map(|(_, d, s)| (d, s));
            for (d, s) in config.chain(layers) {
                if seen.insert(d) {
                    blobs.push((d, s));
                }
            }
        }
        let _ = events.send(LoadEvent::Resolved { digest: top.digest, blobs: blobs.clone() }).await;
        futures_util::stream::iter(blobs)
            .map(|(digest, size)| self.load_blob(&origin, digest, size, events))
            .buffer_unordered(BLOBS_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(top.digest)
    }

    /// Brings one blob into the store: a no-op when held, else drained through a transfer
    /// (whose end means its bytes verified).
    async fn load_blob(
        &self,
        origin: &Origin,
        digest: Digest,
        size: u64,
        events: &mpsc::Sender<LoadEvent>,
    ) -> Result<(), LoadError> {
        let blob_error = |error: String| LoadError::Blob { digest, error };
        // Into Clyde's own store: a copy containerd holds does not count (it may discard it).
        let source = match self.inner.store.blocking(move |s| s.open_blob(&digest)).await.map_err(ResolveError::from)? {
            Some(file) => BlobSource::Local(file),
            None => self.inner.transfers.join(origin, &digest, Want::whole()).await?,
        };
        self.inner.store.touch(&digest);
        if source.size() != size {
            return Err(blob_error(format!("the manifest says {size} bytes, the source {}", source.size())));
        }
        let arriving = match &source {
            BlobSource::Transfer(job) | BlobSource::Arriving(job) => Some(job.partial().clone()),
            BlobSource::Local(_) | BlobSource::Held { .. } => None,
        };
        let mut stream = source.stream(clyde_types::ByteRange::full(size), false);
        let (mut done, mut reported) = (0u64, 0u64);
        while let Some(chunk) = stream.next().await {
            done += chunk.map_err(|e| blob_error(e.to_string()))?.len() as u64;
            if done - reported >= PROGRESS_STEP || done == size {
                reported = done;
                let _ = events.send(LoadEvent::Progress { digest, done, size }).await;
            }
        }
        if size == 0 {
            let _ = events.send(LoadEvent::Progress { digest, done, size }).await;
        }
        if done != size {
            return Err(blob_error(format!("ended after {done} of {size} bytes")));
        }
        // Loaded means in the store: a `list` or an air-gapped agent right after sees it.
        if let Some(partial) = arriving {
            partial.wait_committed().await.map_err(|e| blob_error(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match_index_entries() {
        let amd64 = Platform::parse("linux/amd64").unwrap();
        assert!(amd64.matches(&serde_json::json!({"os": "linux", "architecture": "amd64"})));
        assert!(!amd64.matches(&serde_json::json!({"os": "linux", "architecture": "arm64"})));
        let v8 = Platform::parse("linux/arm64/v8").unwrap();
        assert!(v8.matches(&serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"})));
        assert!(!v8.matches(&serde_json::json!({"os": "linux", "architecture": "arm64"})));
        assert_eq!(v8.to_string(), "linux/arm64/v8");
        for bad in ["", "linux", "linux/", "linux/amd64/v8/x", "../x/y", "linux/am d64"] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
    }
}
