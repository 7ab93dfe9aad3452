//! The operations behind the admin commands, on a store and a resolver; the same code runs
//! in the agent and offline.

use clyde_resolver::{LoadEvent, Platform, Resolver};
use clyde_store::{ImageEntry, PrunePlan, PruneSelection, Store, StoreError};
use clyde_types::{Digest, ImageRef};
use futures_util::StreamExt;
use regex::RegexSet;
use tokio::sync::mpsc;

/// Images loaded at once when the caller does not say.
pub const DEFAULT_CONCURRENCY: usize = 3;

/// Why an admin request could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid --pattern: {0}")]
    BadPattern(#[from] regex::Error),
    #[error("{0}")]
    BadPlatform(#[from] clyde_resolver::load::PlatformError),
    #[error("say what to prune: --pattern, --created-before, --accessed-before or --max-size")]
    NothingSelected,
    #[error("{0}")]
    Store(#[from] StoreError),
}

fn patterns(patterns: &[String]) -> Result<Option<RegexSet>, AdminError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    Ok(Some(RegexSet::new(patterns)?))
}

/// Cached images whose name matches any of `patterns` (all when none).
pub fn list(store: &Store, pattern_list: &[String]) -> Result<Vec<ImageEntry>, AdminError> {
    let set = patterns(pattern_list)?;
    let mut images = store.images()?;
    if let Some(set) = set {
        images.retain(|e| set.is_match(&e.reference));
    }
    Ok(images)
}

/// What to prune.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneRequest {
    /// Regular expressions on the name; any match selects.
    pub patterns: Vec<String>,
    /// Unix seconds: images first cached before this.
    pub created_before: Option<u64>,
    /// Unix seconds: images last pulled before this.
    pub accessed_before: Option<u64>,
    /// Then least-recently-pulled images until the store holds at most this many bytes.
    pub max_size: Option<u64>,
    pub dry_run: bool,
    /// Pinned images the selection matches go too.
    pub force: bool,
    /// At most this many selected images, least recently pulled first (scheduled prunes).
    pub max_images: Option<usize>,
}

/// Selects images (all given filters must hold), plans the prune, and applies it unless
/// it is a dry run.
pub async fn prune(store: &Store, request: &PruneRequest) -> Result<PrunePlan, AdminError> {
    let set = patterns(&request.patterns)?;
    let filtered = set.is_some() || request.created_before.is_some() || request.accessed_before.is_some();
    if !filtered && request.max_size.is_none() {
        return Err(AdminError::NothingSelected);
    }
    let select = |e: &ImageEntry| {
        set.as_ref().is_none_or(|s| s.is_match(&e.reference))
            && request.created_before.is_none_or(|t| e.created < t)
            && request.accessed_before.is_none_or(|t| e.last_pulled.max(e.created) < t)
    };
    let selection = PruneSelection {
        select: filtered.then_some(&select as &(dyn Fn(&ImageEntry) -> bool + Sync)),
        max_bytes: request.max_size,
        force: request.force,
        max_images: request.max_images,
    };
    // Reads noted but not yet written count: an image pulled a second ago is not stale.
    store.flush_accesses().await?;
    let plan = store.plan_prune(&selection)?;
    if request.dry_run {
        return Ok(plan);
    }
    Ok(store.apply_prune(&plan).await?)
}

/// What to load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadRequest {
    pub images: Vec<String>,
    pub platforms: Vec<String>,
    /// Images at once; 0 means [`DEFAULT_CONCURRENCY`].
    pub concurrency: usize,
    /// Pin every image loaded.
    pub pin: bool,
}

/// One image's progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEvent {
    /// The image as requested.
    pub image: String,
    pub update: LoadUpdate,
}

/// A step of one image's load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadUpdate {
    Resolved {
        digest: Digest,
        blobs: Vec<(Digest, u64)>,
    },
    Progress {
        digest: Digest,
        done: u64,
        size: u64,
    },
    /// Loaded (`Ok` with the manifest digest) or failed (the reason).
    Done(Result<Digest, String>),
}

/// Loads every image, `concurrency` at a time; a failed image is reported and the rest go
/// on. Returns how many failed. Platforms are checked before anything is fetched.
pub async fn load(
    resolver: &Resolver,
    request: &LoadRequest,
    events: mpsc::Sender<ImageEvent>,
) -> Result<usize, AdminError> {
    let platforms = request.platforms.iter().map(|p| Platform::parse(p)).collect::<Result<Vec<_>, _>>()?;
    let concurrency = if request.concurrency == 0 { DEFAULT_CONCURRENCY } else { request.concurrency };
    let results = futures_util::stream::iter(request.images.iter().cloned())
        .map(|image| {
            let (events, platforms) = (events.clone(), &platforms);
            async move {
                let mut result = load_one(resolver, &image, platforms, &events).await;
                if let Ok(digest) = &result
                    && request.pin
                    && let Err(e) = resolver.store().pin(*digest).await
                {
                    result = Err(format!("loaded, but not pinned: {e}"));
                }
                if let Err(e) = &result {
                    tracing::warn!(%image, error = %e, "image not loaded");
                } else {
                    tracing::info!(%image, "image loaded");
                }
                let _ = events.send(ImageEvent { image, update: LoadUpdate::Done(result.clone()) }).await;
                result.is_ok()
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<bool>>()
        .await;
    Ok(results.iter().filter(|ok| !**ok).count())
}

async fn load_one(
    resolver: &Resolver,
    image: &str,
    platforms: &[Platform],
    events: &mpsc::Sender<ImageEvent>,
) -> Result<Digest, String> {
    let reference = ImageRef::parse(image).map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::channel(64);
    let forward = async {
        while let Some(event) = rx.recv().await {
            let update = match event {
                LoadEvent::Resolved { digest, blobs } => LoadUpdate::Resolved { digest, blobs },
                LoadEvent::Progress { digest, done, size } => LoadUpdate::Progress { digest, done, size },
            };
            let _ = events.send(ImageEvent { image: image.to_string(), update }).await;
        }
    };
    let work = async move { resolver.load_image(&reference, platforms, &tx).await.map_err(|e| e.to_string()) };
    let (result, ()) = tokio::join!(work, forward);
    result
}

/// The non-empty, non-comment lines of an image list file.
pub fn image_file_lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_skip_blanks_and_comments() {
        assert_eq!(image_file_lines("# images\nalpine:3\n\n  r.io/app:v1  \n#x\n"), ["alpine:3", "r.io/app:v1"]);
    }

    #[tokio::test]
    async fn prune_needs_a_selection_and_valid_patterns() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(prune(&store, &PruneRequest::default()).await, Err(AdminError::NothingSelected)));
        let bad = PruneRequest { patterns: vec!["(".into()], ..PruneRequest::default() };
        assert!(matches!(prune(&store, &bad).await, Err(AdminError::BadPattern(_))));
        assert!(matches!(list(&store, &["[".into()]), Err(AdminError::BadPattern(_))));
    }
}
