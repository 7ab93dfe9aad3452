//! A blob that is still arriving.
//!
//! Message flow: fetch tasks call [`PartialBlob::write_at`] with bytes from any offset;
//! every write bumps a `watch` counter. Readers ([`PartialBlob::read_at`]) wait on that
//! counter until the byte they need is written, so they stream bytes as they land. One
//! finisher task per blob follows the same counter: it fsyncs pieces that became whole and
//! records them (so a restart resumes from them), hashes the contiguous prefix as it grows,
//! and at the end either commits the blob (verified, renamed into place) or discards it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use clyde_types::{Digest, DigestVerifier, IntervalSet, PieceLayout};
use tokio::sync::watch;

use crate::meta::{BlobRecord, PartialRecord};
use crate::{Store, StoreError, now_secs, sync_dir};

/// How a partial blob ended, if it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still arriving.
    Pending,
    /// Verified and committed to the store.
    Complete,
    /// Discarded; the reason is for logs and errors.
    Failed(Arc<str>),
}

struct State {
    written: IntervalSet,
    durable: Vec<bool>,
    outcome: Outcome,
}

/// A blob being downloaded into the store; readers may stream it while it arrives.
pub struct PartialBlob {
    digest: Digest,
    layout: PieceLayout,
    file: Arc<File>,
    path: PathBuf,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    store: Store,
}

const HASH_CHUNK: u64 = 1024 * 1024;

impl PartialBlob {
    pub(crate) fn new(
        store: Store,
        digest: Digest,
        layout: PieceLayout,
        file: File,
        path: PathBuf,
        durable: Vec<bool>,
    ) -> Self {
        let mut written = IntervalSet::new();
        for (i, _) in durable.iter().enumerate().filter(|(_, d)| **d) {
            let b = layout.bounds(i as u64);
            written.insert(b.start..b.end);
        }
        let (changed, _) = watch::channel(0);
        Self {
            digest,
            layout,
            file: Arc::new(file),
            path,
            state: Mutex::new(State { written, durable, outcome: Outcome::Pending }),
            changed,
            store,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    /// How the blob is cut into pieces.
    pub fn layout(&self) -> PieceLayout {
        self.layout
    }

    /// A snapshot of which bytes are on disk.
    pub fn written(&self) -> IntervalSet {
        self.state().written.clone()
    }

    /// The end of the written run starting at `offset` (`offset` when that byte is missing).
    pub fn written_from(&self, offset: u64) -> u64 {
        self.state().written.covered_from(offset)
    }

    /// The current outcome.
    pub fn outcome(&self) -> Outcome {
        self.state().outcome.clone()
    }

    /// A receiver that wakes on every write and on the outcome.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Writes `data` at `offset`; readers waiting for those bytes wake up.
    pub async fn write_at(&self, offset: u64, data: Bytes) -> Result<(), StoreError> {
        let end = offset.checked_add(data.len() as u64).ok_or(StoreError::OutOfBounds)?;
        if end > self.size() {
            return Err(StoreError::OutOfBounds);
        }
        if self.state().outcome != Outcome::Pending {
            return Err(StoreError::Finished);
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset)).await.map_err(StoreError::join)??;
        self.state().written.insert(offset..end);
        self.notify();
        Ok(())
    }

    /// Waits until byte `offset` is written, then returns up to `max` bytes from there.
    pub async fn read_at(&self, offset: u64, max: u64) -> Result<Bytes, StoreError> {
        if offset >= self.size() {
            return Err(StoreError::OutOfBounds);
        }
        let mut rx = self.subscribe();
        let len = loop {
            {
                let state = self.state();
                if let Outcome::Failed(reason) = &state.outcome {
                    return Err(StoreError::Discarded(reason.to_string()));
                }
                let available = (state.written.covered_from(offset) - offset).min(max);
                // The last byte is held back until the whole blob verified, so a reader of a
                // blob that turns out corrupt never sees a response end as if complete.
                let verified = state.outcome == Outcome::Complete;
                let held = if !verified && offset + available == self.size() { 1 } else { 0 };
                if available > held {
                    break available - held;
                }
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Finished);
            }
        };
        read_file_at(self.file.clone(), offset, len).await
    }

    /// Discards the blob: readers get an error, the file and its record are removed.
    pub async fn fail(&self, reason: &str) {
        if self.outcome() != Outcome::Pending {
            return;
        }
        tracing::warn!(digest = %self.digest, reason, "discarding partial blob");
        if let Err(e) = self.store.discard_partial(self).await {
            tracing::warn!(digest = %self.digest, error = %e, "could not remove discarded partial blob");
        }
        {
            let mut state = self.state();
            if state.outcome == Outcome::Pending {
                state.outcome = Outcome::Failed(reason.into());
            }
        }
        self.notify();
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Runs until the blob is committed or discarded: makes pieces durable, hashes, commits.
    pub(crate) async fn finish(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut rx = self.subscribe();
        let mut verifier = DigestVerifier::new(self.digest);
        loop {
            if self.outcome() != Outcome::Pending {
                return;
            }
            if let Err(e) = self.make_pieces_durable().await {
                self.fail(&format!("could not persist pieces: {e}")).await;
                return;
            }
            match self.hash_prefix(&mut verifier).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    self.fail(&format!("could not read back blob: {e}")).await;
                    return;
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
        let (got, ok) = verifier.finish();
        if !ok {
            self.fail(&format!("digest mismatch: bytes hash to {got}")).await;
            return;
        }
        if let Err(e) = self.commit().await {
            self.fail(&format!("could not commit blob: {e}")).await;
        }
    }

    async fn make_pieces_durable(&self) -> Result<(), StoreError> {
        let newly: Vec<u64> = {
            let state = self.state();
            (0..self.layout.count())
                .filter(|&i| !state.durable[i as usize] && state.written.covers(self.layout.bounds(i)))
                .collect()
        };
        if newly.is_empty() {
            return Ok(());
        }
        let record = {
            let state = self.state();
            let mut durable: Vec<u64> = (0..self.layout.count()).filter(|&i| state.durable[i as usize]).collect();
            durable.extend(&newly);
            PartialRecord { size: self.size(), piece_size: self.layout.piece_size(), durable }
        };
        let (file, store, digest) = (self.file.clone(), self.store.clone(), self.digest);
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            store.inner.meta.put_partial(&digest, &record)
        })
        .await
        .map_err(StoreError::join)??;
        let mut state = self.state();
        for i in newly {
            state.durable[i as usize] = true;
        }
        Ok(())
    }

    /// Hashes whatever contiguous bytes follow what was hashed; true when all are hashed.
    async fn hash_prefix(&self, verifier: &mut DigestVerifier) -> Result<bool, StoreError> {
        let end = self.written_from(verifier.len());
        while verifier.len() < end {
            let len = (end - verifier.len()).min(HASH_CHUNK);
            let chunk = read_file_at(self.file.clone(), verifier.len(), len).await?;
            verifier.update(&chunk);
        }
        Ok(verifier.len() == self.size())
    }

    async fn commit(&self) -> Result<(), StoreError> {
        let (file, store, digest, from) = (self.file.clone(), self.store.clone(), self.digest, self.path.clone());
        let size = self.size();
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            let to = store.blob_path(&digest);
            std::fs::rename(&from, &to)?;
            sync_dir(to.parent().unwrap_or(store.root()))?;
            store.inner.meta.complete_blob(&digest, &BlobRecord { size, created: now_secs() })
        })
        .await
        .map_err(StoreError::join)??;
        self.state().outcome = Outcome::Complete;
        self.notify();
        tracing::debug!(digest = %self.digest, size, "blob verified and committed");
        self.store.forget_partial(self).await;
        Ok(())
    }
}

pub(crate) async fn read_file_at(file: Arc<File>, offset: u64, len: u64) -> Result<Bytes, StoreError> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(StoreError::join)?
}
