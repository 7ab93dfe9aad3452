//! Clyde's content store: verified blobs on disk, blobs still arriving, and metadata.
//!
//! Layout under the data dir:
//! - `blobs/sha256/<hex>`: complete blobs; a file appears here only after its sha256 matched,
//!   was fsynced and renamed into place, so every file here is correct.
//! - `partial/sha256/<hex>`: blobs still arriving, written piece by piece in any order.
//! - `tmp/`: small writes before their rename; emptied at start.
//! - `meta.redb`: tags, manifests, blobs, and the durable pieces of partial blobs.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::single_range_in_vec_init))]

mod catalog;
mod lock;
mod meta;
mod partial;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clyde_types::{ContentKey, Digest, IntervalSet, PieceHashes, PieceLayout};
use tokio::sync::{broadcast, watch};
use tokio_util::task::TaskTracker;

pub use catalog::{ImageEntry, ManifestKind, PrunePlan, PruneSelection};
pub use meta::{BlobRecord, ManifestRecord, PartialRecord, TagRecord};
pub use partial::{Outcome, PartialBlob, Settled};

/// Errors of the store. All are internal from a client's point of view.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}; check the data dir's disk and permissions")]
    Io(#[from] std::io::Error),
    #[error("metadata database failed: {0}")]
    Metadata(String),
    #[error("write outside the blob's size")]
    OutOfBounds,
    #[error("the blob is no longer being written")]
    Finished,
    #[error("the blob was discarded: {0}")]
    Discarded(String),
    #[error("content does not match its digest {0}")]
    DigestMismatch(Digest),
    #[error("blob {digest} is already arriving with size {existing}, not {requested}")]
    SizeConflict { digest: Digest, existing: u64, requested: u64 },
    #[error(
        "the data dir {0} is in use by another clyde process (an agent, or a command working on it offline); stop it, or run the command where it can reach the agent's admin socket"
    )]
    InUse(PathBuf),
    #[error(
        "blobs no image references take {unowned} bytes, more than {max}: no prune of images fits the store in that size (eviction, --cache-max-bytes, removes those blobs)"
    )]
    Unprunable { unowned: u64, max: u64 },
    #[error("background task failed: {0}")]
    Join(String),
}

impl StoreError {
    fn join(e: tokio::task::JoinError) -> Self {
        Self::Join(e.to_string())
    }
}

/// A complete blob opened for reading (positional reads: clones may read at the same time).
#[derive(Clone)]
pub struct BlobFile {
    file: Arc<File>,
    size: u64,
}

impl BlobFile {
    /// A blob file another holder keeps (containerd's content directory), for reading.
    pub fn open_path(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file: Arc::new(file), size })
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads into `buf`, from `offset`, what the page cache already holds, without ever
    /// waiting for the disk (`RWF_NOWAIT`): the number of bytes read, 0 when the first is not
    /// cached (or the filesystem cannot tell). Cheap enough for an async worker.
    pub fn read_cached_at(&self, offset: u64, buf: &mut [u8]) -> usize {
        use rustix::io::{ReadWriteFlags, preadv2};
        let mut done = 0;
        while done < buf.len() {
            let mut slices = [std::io::IoSliceMut::new(&mut buf[done..])];
            match preadv2(&*self.file, &mut slices, offset + done as u64, ReadWriteFlags::NOWAIT) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        done
    }

    /// Reads exactly `buf.len()` bytes at `offset` (positional; may wait for the disk).
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.size) {
            return Err(StoreError::OutOfBounds);
        }
        Ok(self.file.read_exact_at(buf, offset)?)
    }

    /// The open file (for zero-copy senders).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

/// The store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Held while the store is open: one process writes a data dir at a time.
    _lock: lock::DataDirLock,
    meta: meta::Meta,
    piece_size: u64,
    /// Partial blobs being written. Locked only on the blocking pool around file and
    /// metadata I/O (creating, adopting, discarding a partial), never on an async worker
    /// across I/O.
    partials: std::sync::Mutex<HashMap<Digest, Arc<PartialBlob>>>,
    tasks: TaskTracker,
    shutdown: watch::Sender<bool>,
    /// Reads not yet written to the metadata: digest -> unix seconds.
    accesses: std::sync::Mutex<HashMap<Digest, u64>>,
    /// One read-back of a blob stored without piece hashes at a time (a herd asking at once
    /// costs one read, the others find the list recorded).
    pieces_lock: std::sync::Mutex<()>,
    events: broadcast::Sender<StoreEvent>,
    /// Bytes of complete blobs.
    total_bytes: std::sync::atomic::AtomicU64,
    /// Woken whenever a complete blob is added.
    grown: tokio::sync::Notify,
    /// Held to write manifests and tags, and exclusively while a prune removes: a manifest
    /// recorded meanwhile keeps what it references.
    catalog: std::sync::RwLock<()>,
    /// `[retention] pinned`: names whose content eviction keeps.
    pins: std::sync::RwLock<Option<Arc<regex::RegexSet>>>,
}

/// A change in what the store can serve, for those who advertise it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// The store now holds this content (a blob may still be arriving).
    Holding(ContentKey),
    /// The store no longer holds it.
    Dropped(ContentKey),
}

/// When the store gives up blobs to stay small.
#[derive(Clone, Debug, Default)]
pub struct EvictionPolicy {
    /// Blobs, complete and partial, may take at most this many bytes.
    pub max_bytes: Option<u64>,
    /// The disk holding the data dir may be at most this full (a fraction, 0.9 = 90%).
    pub disk_high_watermark: Option<f64>,
    /// A partial blob no transfer writes is removed once nothing was written to it for this
    /// long (none: kept until evicted).
    pub partial_ttl: Option<std::time::Duration>,
}

/// Events buffered per subscriber; one that lags re-lists [`Store::held_keys`].
const EVENT_BUFFER: usize = 4096;

/// Seconds since the Unix epoch, as the store records times.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Runs `read` (the store's synchronous reads: file opens and metadata, redb lookups) on
    /// the blocking pool, so async workers never wait on the disk.
    pub async fn blocking<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || read(&store)).await.map_err(StoreError::join)?
    }

    /// Opens (creating if needed) the store in `root`.
    pub fn open(root: &Path, piece_size: u64) -> Result<Self, StoreError> {
        for dir in ["blobs/sha256", "partial/sha256", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        let lock = lock::DataDirLock::acquire(root)?;
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let meta = meta::Meta::open(&root.join("meta.redb"))?;
        // Partial files without a record (a crash between creating one and recording it, or a
        // discarded blob) are of no use: remove them.
        for entry in std::fs::read_dir(root.join("partial/sha256"))? {
            let path = entry?.path();
            let digest = path.file_name().and_then(|n| n.to_str()).and_then(|hex| format!("sha256:{hex}").parse().ok());
            let recorded = match digest {
                Some(d) => meta.partial(&d)?.is_some(),
                None => false,
            };
            if !recorded {
                let _ = std::fs::remove_file(&path);
            }
        }
        let mut total = 0;
        for entry in std::fs::read_dir(root.join("blobs/sha256"))? {
            total += entry?.metadata()?.len();
        }
        let (shutdown, _) = watch::channel(false);
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                _lock: lock,
                meta,
                piece_size: piece_size.max(64 * 1024),
                partials: std::sync::Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                shutdown,
                accesses: Default::default(),
                pieces_lock: Default::default(),
                events: broadcast::channel(EVENT_BUFFER).0,
                total_bytes: total.into(),
                grown: tokio::sync::Notify::new(),
                catalog: std::sync::RwLock::new(()),
                pins: std::sync::RwLock::new(None),
            }),
        })
    }

    /// Pins images whose name (`registry/repo:tag`, or `registry/repo@digest` untagged)
    /// matches any of `patterns`: eviction and the disk watermark never remove what they
    /// reference, and a prune removes them only when forced.
    pub fn set_pins(&self, patterns: &[String]) -> Result<(), regex::Error> {
        let pins = if patterns.is_empty() { None } else { Some(Arc::new(regex::RegexSet::new(patterns)?)) };
        *self.inner.pins.write().unwrap_or_else(|p| p.into_inner()) = pins;
        Ok(())
    }

    /// Whether `name` (`registry/repository:tag`) matches a `pinned` pattern.
    pub fn is_pinned_name(&self, name: &str) -> bool {
        self.pins().is_some_and(|p| p.is_match(name))
    }

    pub(crate) fn pins(&self) -> Option<Arc<regex::RegexSet>> {
        self.inner.pins.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The data dir.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the complete blob with this digest lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("blobs/sha256").join(digest.hex())
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("partial/sha256").join(digest.hex())
    }

    /// The size of the complete blob, if the store holds it.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(self.blob_path(digest)).ok().map(|m| m.len())
    }

    /// Opens a complete blob.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<BlobFile>, StoreError> {
        match File::open(self.blob_path(digest)) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some(BlobFile { file: Arc::new(file), size }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The piece hashes of a complete blob, as recorded when it was verified. A blob stored
    /// without them (small content, a store of an earlier version) is read back once and
    /// hashed whole: only if it still matches its digest are its piece hashes recorded and
    /// returned, so a copy that rotted on disk never vouches for itself. Blocking.
    pub fn piece_hashes(&self, digest: &Digest) -> Result<Option<PieceHashes>, StoreError> {
        let Some(file) = self.open_blob(digest)? else { return Ok(None) };
        let layout = PieceLayout::new(file.size(), self.inner.piece_size);
        let recorded = |store: &Store| -> Result<Option<PieceHashes>, StoreError> {
            Ok(store.inner.meta.pieces(digest)?.and_then(|bytes| PieceHashes::decode(&bytes, layout).ok()))
        };
        if let Some(list) = recorded(self)? {
            return Ok(Some(list));
        }
        let _one_at_a_time = self.inner.pieces_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = recorded(self)? {
            return Ok(Some(list));
        }
        let mut prefix = partial::Prefix::new(*digest, layout);
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < file.size() {
            let n = (file.size() - pos).min(buf.len() as u64) as usize;
            file.read_exact_at(pos, &mut buf[..n])?;
            prefix.update(&buf[..n]);
            pos += n as u64;
        }
        let (got, ok, list) = prefix.finish(layout);
        if !ok {
            tracing::warn!(%digest, %got, "a stored blob no longer matches its digest: its pieces are vouched for by nobody");
            return Ok(None);
        }
        if let Some(list) = &list {
            self.inner.meta.put_pieces(digest, &list.encode())?;
        }
        Ok(list)
    }

    /// Reads a whole complete blob (for manifests, which are small).
    pub async fn read_blob(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        let path = self.blob_path(digest);
        match tokio::fs::read(path).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores small content after checking it hashes to `digest` (temp file, fsync, rename).
    pub async fn put_blob(&self, digest: Digest, bytes: Bytes) -> Result<(), StoreError> {
        if Digest::of(&bytes) != digest {
            return Err(StoreError::DigestMismatch(digest));
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let to = store.blob_path(&digest);
            if to.exists() {
                return Ok(());
            }
            // Unique per write: two concurrent writers of one digest must not share a file.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = store.inner.root.join("tmp").join(format!("{}.{}.{n}", digest.hex(), std::process::id()));
            let mut file = File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &to)?;
            sync_dir(to.parent().unwrap_or(&store.inner.root))?;
            store.add_bytes(bytes.len() as u64);
            store.inner.meta.complete_blob(
                &digest,
                &BlobRecord { size: bytes.len() as u64, created: unix_now(), last_access: unix_now() },
                None,
            )?;
            store.emit(StoreEvent::Holding(ContentKey::Digest(digest)));
            Ok(())
        })
        .await
        .map_err(StoreError::join)?
    }

    /// Bytes of complete blobs in the store.
    pub fn total_bytes(&self) -> u64 {
        self.inner.total_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Disk bytes partial blobs take (their files are sparse: what was written).
    pub fn partial_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(dir) = std::fs::read_dir(self.inner.root.join("partial/sha256")) else { return 0 };
        dir.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.blocks() * 512).sum()
    }

    /// Bytes of blobs, complete and partial (the store gauge).
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes() + self.partial_bytes()
    }

    /// Bytes the evictor weighs against `max_bytes` and the watermark: complete blobs, and
    /// partial blobs no transfer writes (those being written count once they complete or
    /// their transfer closes; evicting other content for them would empty the cache while
    /// a large download runs).
    fn evictable_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let active: std::collections::HashSet<String> = match self.inner.partials.try_lock() {
            Ok(p) => p.keys().map(Digest::hex).collect(),
            // Busy: count every partial (an eviction may come a little early).
            Err(_) => return self.used_bytes(),
        };
        let Ok(dir) = std::fs::read_dir(self.inner.root.join("partial/sha256")) else { return self.total_bytes() };
        let idle: u64 = dir
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(|n| !active.contains(n)))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum();
        self.total_bytes() + idle
    }

    pub(crate) fn add_bytes(&self, n: u64) {
        self.inner.total_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.inner.grown.notify_one();
    }

    /// Follows changes in what the store holds.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    pub(crate) fn emit(&self, event: StoreEvent) {
        // No subscriber is fine: nobody advertises.
        let _ = self.inner.events.send(event);
    }

    fn partials(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<PartialBlob>>> {
        self.inner.partials.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything the store can serve now: complete blobs, blobs arriving, cached tags.
    pub async fn held_keys(&self) -> Result<Vec<ContentKey>, StoreError> {
        self.blocking(|s| s.held_keys_blocking()).await
    }

    fn held_keys_blocking(&self) -> Result<Vec<ContentKey>, StoreError> {
        let mut keys: Vec<ContentKey> = self.partials().keys().map(|d| ContentKey::Digest(*d)).collect();
        for entry in std::fs::read_dir(self.inner.root.join("blobs/sha256"))? {
            let name = entry?.file_name();
            if let Some(d) = name.to_str().and_then(|hex| format!("sha256:{hex}").parse().ok()) {
                keys.push(ContentKey::Digest(d));
            }
        }
        for (tag, _) in self.tags()? {
            keys.push(ContentKey::Tag(tag));
        }
        Ok(keys)
    }

    /// The blob still arriving with this digest, if any (also one a previous run left).
    pub async fn existing_partial(&self, digest: &Digest) -> Result<Option<Arc<PartialBlob>>, StoreError> {
        let d = *digest;
        self.blocking(move |s| s.existing_partial_blocking(&d)).await
    }

    fn existing_partial_blocking(&self, digest: &Digest) -> Result<Option<Arc<PartialBlob>>, StoreError> {
        let mut partials = self.partials();
        if let Some(p) = partials.get(digest) {
            return Ok(Some(p.clone()));
        }
        let Some(record) = self.inner.meta.partial(digest)? else {
            return Ok(None);
        };
        if self.blob_size(digest).is_some() || record.piece_size == 0 {
            self.inner.meta.remove_partial(digest)?;
            return Ok(None);
        }
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(self.partial_path(digest)) {
            Ok(f) if f.metadata()?.len() == record.size => f,
            _ => {
                self.inner.meta.remove_partial(digest)?;
                return Ok(None);
            }
        };
        let layout = PieceLayout::new(record.size, record.piece_size);
        let in_blob = |[start, end]: [u64; 2]| (start < end && end <= record.size).then_some(start..end);
        let mut durable: IntervalSet = record.spans.iter().copied().filter_map(in_blob).collect();
        for i in record.durable.iter().filter(|i| **i < layout.count()) {
            let b = layout.bounds(*i);
            durable.insert(b.start..b.end);
        }
        // Earlier versions did not record where bytes came from: treat them as a peer's.
        let untrusted = if record.spans.is_empty() {
            durable.clone()
        } else {
            record.untrusted.iter().copied().filter_map(in_blob).collect()
        };
        tracing::info!(%digest, bytes = durable.len(), of = record.size, "resuming partial blob");
        Ok(Some(self.adopt(&mut partials, digest, layout, file, durable, untrusted)))
    }

    /// The partial blob for `digest`: the one already arriving, one to resume, or a new one.
    pub async fn partial(&self, digest: &Digest, size: u64) -> Result<Arc<PartialBlob>, StoreError> {
        let d = *digest;
        self.blocking(move |s| s.partial_blocking(&d, size)).await
    }

    fn partial_blocking(&self, digest: &Digest, size: u64) -> Result<Arc<PartialBlob>, StoreError> {
        if let Some(p) = self.existing_partial_blocking(digest)? {
            if p.size() != size {
                return Err(StoreError::SizeConflict { digest: *digest, existing: p.size(), requested: size });
            }
            return Ok(p);
        }
        let mut partials = self.partials();
        if let Some(p) = partials.get(digest) {
            return Ok(p.clone());
        }
        let layout = PieceLayout::new(size, self.inner.piece_size);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.partial_path(digest))?;
        file.set_len(size)?;
        let record = PartialRecord { size, piece_size: layout.piece_size(), touched: unix_now(), ..Default::default() };
        self.inner.meta.put_partial(digest, &record)?;
        Ok(self.adopt(&mut partials, digest, layout, file, IntervalSet::new(), IntervalSet::new()))
    }

    fn adopt(
        &self,
        partials: &mut HashMap<Digest, Arc<PartialBlob>>,
        digest: &Digest,
        layout: PieceLayout,
        file: File,
        durable: IntervalSet,
        untrusted: IntervalSet,
    ) -> Arc<PartialBlob> {
        let path = self.partial_path(digest);
        let blob = Arc::new(PartialBlob::new(self.clone(), *digest, layout, file, path, durable, untrusted));
        partials.insert(*digest, blob.clone());
        self.inner.tasks.spawn(blob.clone().finish(self.inner.shutdown.subscribe()));
        self.emit(StoreEvent::Holding(ContentKey::Digest(*digest)));
        blob
    }

    async fn forget_partial(&self, blob: &PartialBlob) {
        // On the blocking pool: the map's lock may be held there across file I/O.
        let (digest, id) = (blob.digest(), blob.id());
        let _ = self
            .blocking(move |s| {
                let mut partials = s.partials();
                if partials.get(&digest).is_some_and(|p| p.id() == id) {
                    partials.remove(&digest);
                }
                Ok(())
            })
            .await;
    }

    /// Forgets a failed partial blob and deletes its file and record. The file is renamed
    /// aside while the map is locked, so a new download of the same digest never has its
    /// fresh file deleted by this cleanup.
    async fn discard_partial(&self, blob: &PartialBlob) -> Result<(), StoreError> {
        let digest = blob.digest();
        let path = blob.path().to_path_buf();
        let id = blob.id();
        let aside = self.inner.root.join("tmp").join(format!("{}.discarded", digest.hex()));
        let moved = aside.clone();
        let discarded = self
            .blocking(move |s| {
                let mut partials = s.partials();
                // Only this blob: a new download of the same digest keeps its fresh file.
                if partials.get(&digest).is_none_or(|p| p.id() != id) {
                    return Ok(false);
                }
                partials.remove(&digest);
                match std::fs::rename(&path, &moved) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                s.inner.meta.remove_partial(&digest)?;
                Ok(true)
            })
            .await?;
        if discarded {
            self.emit(StoreEvent::Dropped(ContentKey::Digest(digest)));
            let _ = tokio::fs::remove_file(aside).await;
        }
        Ok(())
    }

    /// Notes that a client read this manifest or blob now; written in batches by
    /// [`Store::spawn_access_flusher`] (a metadata commit per request would cost an fsync).
    pub fn touch(&self, digest: &Digest) {
        self.inner.accesses.lock().unwrap_or_else(|p| p.into_inner()).insert(*digest, unix_now());
    }

    /// Writes the noted reads to the metadata.
    pub async fn flush_accesses(&self) -> Result<(), StoreError> {
        let accesses: Vec<(Digest, u64)> =
            std::mem::take(&mut *self.inner.accesses.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
        if accesses.is_empty() {
            return Ok(());
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.inner.meta.record_access(&accesses))
            .await
            .map_err(StoreError::join)?
    }

    /// Flushes noted reads every `every`, and once more at shutdown.
    pub fn spawn_access_flusher(&self, every: std::time::Duration) {
        let store = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        self.inner.tasks.spawn(async move {
            loop {
                let stop = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = shutdown.changed() => true,
                };
                if let Err(e) = store.flush_accesses().await {
                    tracing::warn!(error = %e, "could not record access times");
                }
                if stop {
                    return;
                }
            }
        });
    }

    /// A complete blob's record.
    pub fn blob_record(&self, digest: &Digest) -> Result<Option<BlobRecord>, StoreError> {
        self.inner.meta.blob(digest)
    }

    /// Where a tag pointed when last checked.
    pub fn tag(&self, key: &str) -> Result<Option<TagRecord>, StoreError> {
        self.inner.meta.tag(key)
    }

    /// Where a tag points for clients whose `Accept` is of `kind` (a variant: not advertised,
    /// not listed, removed with its tag).
    pub fn tag_variant(&self, key: &str, kind: &str) -> Result<Option<TagRecord>, StoreError> {
        self.inner.meta.tag(&meta::variant_key(key, kind))
    }

    /// Records where a tag points for clients whose `Accept` is of `kind`.
    pub async fn put_tag_variant(&self, key: &str, kind: &str, record: TagRecord) -> Result<(), StoreError> {
        let (store, key) = (self.clone(), meta::variant_key(key, kind));
        tokio::task::spawn_blocking(move || {
            let _catalog = store.inner.catalog.read().unwrap_or_else(|p| p.into_inner());
            store.inner.meta.put_tag(&key, &record)
        })
        .await
        .map_err(StoreError::join)?
    }

    /// Records where a tag points.
    pub async fn put_tag(&self, key: String, record: TagRecord) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let _catalog = store.inner.catalog.read().unwrap_or_else(|p| p.into_inner());
            store.inner.meta.put_tag(&key, &record)?;
            store.emit(StoreEvent::Holding(ContentKey::Tag(key)));
            Ok(())
        })
        .await
        .map_err(StoreError::join)?
    }

    /// All tags.
    pub fn tags(&self) -> Result<Vec<(String, TagRecord)>, StoreError> {
        self.inner.meta.tags()
    }

    /// Records the sizes a verified manifest's descriptors give its blobs: the size a peer
    /// must claim for them.
    pub async fn put_sizes(&self, sizes: Vec<(Digest, u64)>) -> Result<(), StoreError> {
        if sizes.is_empty() {
            return Ok(());
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.inner.meta.put_sizes(&sizes)).await.map_err(StoreError::join)?
    }

    /// A blob's size from a trusted source: the complete blob, or the descriptor of a verified
    /// manifest that referenced it.
    pub fn known_size(&self, digest: &Digest) -> Option<u64> {
        self.blob_size(digest).or_else(|| self.inner.meta.described_size(digest).ok().flatten())
    }

    /// A cached manifest's record.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<ManifestRecord>, StoreError> {
        self.inner.meta.manifest(digest)
    }

    /// Records a cached manifest.
    pub async fn put_manifest(&self, digest: Digest, record: ManifestRecord) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let _catalog = store.inner.catalog.read().unwrap_or_else(|p| p.into_inner());
            store.inner.meta.put_manifest(&digest, &record)
        })
        .await
        .map_err(StoreError::join)?
    }

    /// All cached manifests, by digest.
    pub fn manifests(&self) -> Result<Vec<(String, ManifestRecord)>, StoreError> {
        self.inner.meta.manifests()
    }

    /// Removes least-recently-read blobs (not manifests, which are small and name the
    /// rest) until complete blobs take at most `target` bytes. Each removal is withdrawn
    /// ([`StoreEvent::Dropped`]). Returns the digests removed.
    pub async fn evict_to(&self, target: u64) -> Result<Vec<Digest>, StoreError> {
        if self.evictable_bytes() <= target {
            return Ok(Vec::new());
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.evict_blocking(target)).await.map_err(StoreError::join)?
    }

    fn evict_blocking(&self, target: u64) -> Result<Vec<Digest>, StoreError> {
        let pending = self.inner.accesses.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let manifests: std::collections::HashSet<String> =
            self.inner.meta.manifests()?.into_iter().map(|(k, _)| k).collect();
        let pinned = self.pinned_digests()?;
        // (last use, digest, partial?): complete blobs by their last read, partial blobs no
        // transfer writes by their last write; nothing a pinned image references.
        let mut candidates: Vec<(u64, Digest, bool)> = self
            .inner
            .meta
            .blobs()?
            .into_iter()
            .filter(|(key, _)| !manifests.contains(key))
            .filter_map(|(key, record)| {
                let digest: Digest = key.parse().ok()?;
                let last = pending.get(&digest).copied().unwrap_or(0).max(record.last_access).max(record.created);
                Some((last, digest, false))
            })
            .collect();
        for (key, record) in self.inner.meta.partials()? {
            if let Ok(digest) = key.parse::<Digest>() {
                candidates.push((pending.get(&digest).copied().unwrap_or(0).max(record.touched), digest, true));
            }
        }
        candidates.retain(|(_, d, _)| !pinned.contains(d));
        candidates.sort();
        let mut removed = Vec::new();
        let mut used = self.evictable_bytes();
        for (_, digest, partial) in candidates {
            if used <= target {
                break;
            }
            let size = if partial {
                match self.remove_idle_partial_blocking(&digest)? {
                    Some(size) => size,
                    None => continue,
                }
            } else {
                self.remove_blob_blocking(&digest)?
            };
            used = used.saturating_sub(size);
            tracing::info!(%digest, size, partial, "evicted (least recently used)");
            removed.push(digest);
        }
        Ok(removed)
    }

    /// Removes a partial blob that no transfer writes (its file and record); its disk bytes,
    /// or `None` when a transfer has it.
    fn remove_idle_partial_blocking(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        use std::os::unix::fs::MetadataExt;
        // Held while removing: a transfer adopting this partial waits, then finds no record.
        let partials = self.partials();
        if partials.contains_key(digest) {
            return Ok(None);
        }
        let path = self.partial_path(digest);
        let size = std::fs::metadata(&path).map_or(0, |m| m.blocks() * 512);
        self.inner.meta.remove_partial(digest)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        drop(partials);
        Ok(Some(size))
    }

    /// Removes partial blobs no transfer wrote to for `ttl`; their digests.
    pub async fn expire_partials(&self, ttl: std::time::Duration) -> Result<Vec<Digest>, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let horizon = unix_now().saturating_sub(ttl.as_secs());
            let mut expired = Vec::new();
            for (key, record) in store.inner.meta.partials()? {
                let Ok(digest) = key.parse::<Digest>() else { continue };
                if record.touched < horizon && store.remove_idle_partial_blocking(&digest)?.is_some() {
                    tracing::info!(%digest, "partial blob expired (nothing written to it for the partial TTL)");
                    expired.push(digest);
                }
            }
            Ok(expired)
        })
        .await
        .map_err(StoreError::join)?
    }

    /// Removes a complete blob's file and record, and withdraws it; returns its size.
    fn remove_blob_blocking(&self, digest: &Digest) -> Result<u64, StoreError> {
        let path = self.blob_path(digest);
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        // Readers that have the file open keep reading it; new requests miss.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.inner.meta.remove_blob(digest)?;
        self.inner.total_bytes.fetch_sub(size.min(self.total_bytes()), std::sync::atomic::Ordering::Relaxed);
        self.emit(StoreEvent::Dropped(ContentKey::Digest(*digest)));
        Ok(size)
    }

    /// How many bytes blobs (complete and partial) may take now under `policy`, if that is
    /// less than they take: above `max_bytes`, 90% of it (a margin, so one eviction frees
    /// room for several blobs); above the disk's high watermark, whatever brings the disk 5
    /// points under it.
    pub fn eviction_target(&self, policy: &EvictionPolicy) -> Option<u64> {
        let total = self.evictable_bytes();
        let mut target: Option<u64> = None;
        if let Some(max) = policy.max_bytes
            && total > max
        {
            target = Some(max / 10 * 9);
        }
        if let Some(high) = policy.disk_high_watermark
            && let Ok(fs) = rustix::fs::statvfs(&self.inner.root)
        {
            let size = fs.f_blocks.saturating_mul(fs.f_frsize);
            let used = size.saturating_sub(fs.f_bavail.saturating_mul(fs.f_frsize));
            if size > 0 && used as f64 > high * size as f64 {
                let low = ((high - 0.05).max(0.0) * size as f64) as u64;
                let by_disk = total.saturating_sub(used - low.min(used));
                target = Some(target.map_or(by_disk, |t| t.min(by_disk)));
            }
        }
        target.filter(|t| *t < total)
    }

    /// Keeps the store within `policy`: checked whenever a blob is added, and every 10 s
    /// (other data on the disk grows too).
    pub fn spawn_evictor(&self, policy: EvictionPolicy) {
        let store = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = store.inner.grown.notified() => {}
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                if let Some(ttl) = policy.partial_ttl
                    && let Err(e) = store.expire_partials(ttl).await
                {
                    tracing::warn!(error = %e, "expiring partial blobs failed");
                }
                // A directory listing and a statvfs: off the async workers.
                let (s, p) = (store.clone(), policy.clone());
                let target = tokio::task::spawn_blocking(move || s.eviction_target(&p)).await.ok().flatten();
                if let Some(target) = target
                    && let Err(e) = store.evict_to(target).await
                {
                    tracing::warn!(error = %e, "eviction failed");
                }
            }
        });
    }

    /// Stops background work and waits for it.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        // Partial blobs hold the store; dropping them lets the database close.
        self.partials().clear();
    }
}

#[cfg(test)]
mod tests;
