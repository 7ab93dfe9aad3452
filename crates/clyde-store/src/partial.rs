//! A blob that is still arriving.
//!
//! Message flow: fetch tasks call [`PartialBlob::write_at`] with bytes from any offset;
//! every write bumps a `watch` counter. Readers ([`PartialBlob::read_at`]) wait on that
//! counter until the byte they need is written, so they stream bytes as they land. Writes
//! that extend the hashed prefix are hashed as they are written (no read-back in the common,
//! in-order case). One finisher task per blob follows the same counter: every
//! [`DURABLE_BATCH`] bytes or [`DURABLE_INTERVAL`] it fsyncs what was written and records
//! the written intervals (so a restart, or the next reader of a blob read only by ranges,
//! resumes from them), hashes by reading back whatever arrived out of order, and at the end
//! either commits the blob (verified, renamed into place) or discards it. The intervals whose
//! bytes came from peers are recorded too ([`PartialBlob::mark_untrusted`]): only the whole
//! blob's digest vouches for them, so no ranged reader gets them before it verified.
//!
//! Bytes from a member that vouches for pieces take another way: they are written as
//! *pending* ([`PartialBlob::write_pending_at`]), neither readable nor hashed, until their
//! piece is whole on disk and hashes to what a member's list says
//! ([`PartialBlob::settle`]); then they join the written bytes at once. A piece that does
//! not match is dropped, to be fetched again elsewhere. The hashed prefix also yields every
//! piece's hash, recorded with the blob when it commits ([`clyde_types::PieceHashes`]).

use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use clyde_types::{Digest, DigestVerifier, IntervalSet, PieceHasher, PieceHashes, PieceLayout, hash_piece};
use tokio::sync::watch;

use crate::meta::{BlobRecord, PartialRecord};
use crate::{Store, StoreError, sync_dir, unix_now};

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

/// When a reader may have the blob's last byte.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LastByte {
    AfterVerification,
    AsWritten,
}

struct State {
    written: IntervalSet,
    /// Written bytes that are fsynced and recorded.
    durable: IntervalSet,
    /// Bytes that came from peers (or from a run that did not record where they came from).
    untrusted: IntervalSet,
    /// Bytes from peers on disk, waiting for their piece's check: not readable, not hashed,
    /// not recorded (a restart forgets them).
    pending: IntervalSet,
    /// Pieces being checked now.
    checking: HashSet<u64>,
    /// What each piece must hash to, from a member's list (the digest itself for a blob of
    /// one piece).
    expected: PieceHashes,
    /// Hashes of pieces held and trusted that the hashed prefix has not reached.
    vouched: PieceHashes,
    /// The sha256 matched; readers may have the last byte while the commit is made durable.
    verified: bool,
    outcome: Outcome,
}

/// A blob being downloaded into the store; readers may stream it while it arrives.
pub struct PartialBlob {
    /// Unique in this process: tells this partial from a later one of the same digest.
    id: u64,
    digest: Digest,
    layout: PieceLayout,
    file: Arc<File>,
    path: PathBuf,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    verifier: Arc<Mutex<Prefix>>,
    store: Store,
    /// The bytes did not hash to the digest (as opposed to failing for another reason).
    corrupt: std::sync::atomic::AtomicBool,
}

/// The hashes of the written prefix: the whole blob's, and each piece's.
pub(crate) struct Prefix {
    whole: DigestVerifier,
    pieces: PieceHasher,
}

impl Prefix {
    pub(crate) fn new(digest: Digest, layout: PieceLayout) -> Self {
        Self { whole: DigestVerifier::new(digest), pieces: PieceHasher::new(layout) }
    }

    fn len(&self) -> u64 {
        self.whole.len()
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.whole.update(bytes);
        self.pieces.update(bytes);
    }

    /// What the whole blob hashed to, whether that is its digest, and every piece's hash
    /// (`None` unless the whole blob was fed).
    pub(crate) fn finish(self, layout: PieceLayout) -> (Digest, bool, Option<PieceHashes>) {
        let pieces = PieceHashes::complete(layout, self.pieces.done().to_vec());
        let (got, ok) = self.whole.finish();
        (got, ok, pieces)
    }
}

/// What [`PartialBlob::settle`] found about pieces whose pending bytes are all on disk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Matched their hash: their bytes are readable now.
    pub verified: Vec<u64>,
    /// Did not match: their pending bytes were dropped, to be fetched again.
    pub corrupt: Vec<u64>,
    /// No hash known yet: see [`PartialBlob::expect`] and [`PartialBlob::trust_later`].
    pub unknown: Vec<u64>,
    /// Hold pending bytes but lack others: their check waits for the rest of the piece.
    pub incomplete: Vec<u64>,
}

const HASH_CHUNK: u64 = 1024 * 1024;
/// Whole pieces are fsynced and recorded once this many bytes of them are pending...
pub const DURABLE_BATCH: u64 = 64 * 1024 * 1024;
/// ...or once this long has passed with some pending: a crash loses at most about this much.
pub const DURABLE_INTERVAL: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves only plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PartialBlob {
    pub(crate) fn new(
        store: Store,
        digest: Digest,
        layout: PieceLayout,
        file: File,
        path: PathBuf,
        durable: IntervalSet,
        untrusted: IntervalSet,
    ) -> Self {
        let written = durable.clone();
        let (changed, _) = watch::channel(0);
        let mut expected = PieceHashes::new(layout);
        if layout.count() == 1 {
            expected.set(0, *digest.as_bytes());
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            digest,
            layout,
            file: Arc::new(file),
            path,
            state: Mutex::new(State {
                written,
                durable,
                untrusted,
                pending: IntervalSet::new(),
                checking: HashSet::new(),
                expected,
                vouched: PieceHashes::new(layout),
                verified: false,
                outcome: Outcome::Pending,
            }),
            changed,
            verifier: Arc::new(Mutex::new(Prefix::new(digest, layout))),
            store,
            corrupt: Default::default(),
        }
    }

    /// Unique in this process (a later partial of the same digest has another).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether the blob was discarded because its bytes did not hash to its digest.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(std::sync::atomic::Ordering::Acquire)
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

    /// Notes that `range` is about to be written with bytes from a peer: call it before the
    /// write, so no reader sees those bytes without knowing.
    pub fn mark_untrusted(&self, range: Range<u64>) {
        self.state().untrusted.insert(range);
    }

    /// Whether any of `range` came from a peer (only the blob's digest vouches for it).
    pub fn is_untrusted(&self, range: Range<u64>) -> bool {
        self.state().untrusted.intersects(range)
    }

    /// Bytes on disk or pending their piece's check: what no transfer needs to fetch again.
    pub fn held(&self) -> IntervalSet {
        let state = self.state();
        let mut held = state.written.clone();
        for span in state.pending.spans() {
            held.insert(span.clone());
        }
        held
    }

    /// Whether byte `offset` is on disk waiting for its piece's check.
    pub fn is_pending(&self, offset: u64) -> bool {
        self.state().pending.contains(offset)
    }

    /// Writes bytes from a peer at `offset` as pending: nobody reads them, and they are not
    /// hashed, until [`PartialBlob::settle`] found their piece whole and matching. Bytes
    /// already written are skipped: what a reader may have had is never overwritten.
    pub async fn write_pending_at(&self, offset: u64, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let end = offset.checked_add(len).ok_or(StoreError::OutOfBounds)?;
        if end > self.size() {
            return Err(StoreError::OutOfBounds);
        }
        let gaps = {
            let state = self.state();
            if state.outcome != Outcome::Pending || state.verified {
                return Err(StoreError::Finished);
            }
            state.written.gaps(offset..end)
        };
        let file = self.file.clone();
        let spans = gaps.clone();
        file_io(len, move || {
            for gap in spans {
                let mut at = offset;
                for chunk in &chunks {
                    let (from, to) = (at.max(gap.start), (at + chunk.len() as u64).min(gap.end));
                    if from < to {
                        file.write_all_at(&chunk[(from - at) as usize..(to - at) as usize], from)?;
                    }
                    at += chunk.len() as u64;
                }
            }
            Ok(())
        })
        .await?;
        let mut state = self.state();
        for gap in gaps {
            state.pending.insert(gap);
        }
        Ok(())
    }

    /// Records the hashes of a member's list that are not known yet (a known one is kept).
    pub fn expect(&self, list: &PieceHashes) {
        self.state().expected.fill_from(list);
    }

    /// Checks every piece whose pending bytes are now all on disk (with whatever else of the
    /// piece is written) against its expected hash: a match makes them readable, a mismatch
    /// drops them. Pieces without a known hash are left pending and reported.
    pub async fn settle(&self) -> Result<Settled, StoreError> {
        let mut settled = Settled::default();
        let candidates: Vec<(u64, [u8; 32])> = {
            let mut state = self.state();
            let mut pieces: Vec<u64> = Vec::new();
            for span in state.pending.spans() {
                let first = self.layout.piece_of(span.start);
                let last = self.layout.piece_of(span.end - 1);
                for p in first..=last {
                    if pieces.last() != Some(&p) {
                        pieces.push(p);
                    }
                }
            }
            let mut candidates = Vec::new();
            for p in pieces {
                let bounds = self.layout.bounds(p);
                let whole = state.written.gaps(bounds.clone()).iter().all(|g| state.pending.covers(g.clone()));
                if !whole {
                    settled.incomplete.push(p);
                }
                if !whole || state.checking.contains(&p) {
                    continue;
                }
                match state.expected.get(p) {
                    Some(hash) => {
                        state.checking.insert(p);
                        candidates.push((p, hash));
                    }
                    None => settled.unknown.push(p),
                }
            }
            candidates
        };
        for (p, expected) in candidates {
            let bounds = self.layout.bounds(p);
            let (bytes, got) = match self.read_piece(p).await {
                Ok(read) => read,
                Err(e) => {
                    self.state().checking.remove(&p);
                    return Err(e);
                }
            };
            let matched = {
                let mut state = self.state();
                state.checking.remove(&p);
                state.pending.remove(bounds.clone());
                if got == expected {
                    state.written.insert(bounds.clone());
                    state.vouched.set(p, got);
                } else if self.layout.count() > 1 {
                    // The expected hash may be the wrong one (a member vouched for bytes
                    // that turn out bad): the next check asks for it again. One piece's hash
                    // is the blob's digest, which is never wrong.
                    state.expected.clear(p);
                }
                got == expected
            };
            if !matched {
                settled.corrupt.push(p);
                continue;
            }
            // The prefix hasher takes the piece from this buffer when it is next (off the
            // async workers: two more hashes of up to a piece).
            let verifier = self.verifier.clone();
            let start = bounds.start;
            let feed = move || {
                let mut prefix = lock(&verifier);
                if prefix.len() == start {
                    prefix.update(&bytes);
                }
            };
            if bounds.end - bounds.start > INLINE_IO_MAX {
                tokio::task::spawn_blocking(feed).await.map_err(StoreError::join)?;
            } else {
                feed();
            }
            settled.verified.push(p);
        }
        if !settled.verified.is_empty() {
            self.notify();
        }
        Ok(settled)
    }

    /// Piece `p`'s bytes as they are on disk, and their hash, in one blocking hop.
    async fn read_piece(&self, p: u64) -> Result<(Bytes, [u8; 32]), StoreError> {
        let (file, bounds) = (self.file.clone(), self.layout.bounds(p));
        let len = bounds.end - bounds.start;
        file_io(len, move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, bounds.start)?;
            let hash = hash_piece(&buf);
            Ok((Bytes::from(buf), hash))
        })
        .await
    }

    /// Forgets the pending bytes of `pieces` (nobody vouches for them, and the reader waiting
    /// on them should not wait for the whole blob): they are fetched again.
    pub fn drop_pending(&self, pieces: &[u64]) {
        let mut state = self.state();
        for &p in pieces {
            state.pending.remove(self.layout.bounds(p));
        }
    }

    /// Makes the pending bytes of `pieces` readable only once the whole blob verified (no
    /// member vouched for them): they become written and untrusted.
    pub fn trust_later(&self, pieces: &[u64]) {
        {
            let mut state = self.state();
            for &p in pieces {
                let bounds = self.layout.bounds(p);
                for span in state.pending.within(bounds.clone()).spans().to_vec() {
                    state.untrusted.insert(span.clone());
                    state.written.insert(span);
                }
                state.pending.remove(bounds);
            }
        }
        self.notify();
    }

    /// The hashes this node vouches for: pieces held whole from the upstream or verified
    /// against a member's list (all of them once the whole blob verified). Pieces past the
    /// hashed prefix are hashed by reading them back, once.
    pub async fn vouched_hashes(&self) -> Result<PieceHashes, StoreError> {
        let prefix: Vec<[u8; 32]> = lock(&self.verifier).pieces.done().to_vec();
        let (mut list, missing) = {
            let state = self.state();
            let trusted_all = state.verified || state.outcome == Outcome::Complete;
            let mut list = state.vouched.clone();
            for (i, h) in prefix.iter().enumerate() {
                let bounds = self.layout.bounds(i as u64);
                if trusted_all || !state.untrusted.intersects(bounds) {
                    list.set(i as u64, *h);
                }
            }
            let missing: Vec<u64> = (0..self.layout.count())
                .filter(|&p| list.get(p).is_none())
                .filter(|&p| {
                    let b = self.layout.bounds(p);
                    state.written.covers(b.clone()) && (trusted_all || !state.untrusted.intersects(b))
                })
                .collect();
            (list, missing)
        };
        for p in missing {
            let (_, hash) = self.read_piece(p).await?;
            list.set(p, hash);
            self.state().vouched.set(p, hash);
        }
        Ok(list)
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
        self.write_chunks_at(offset, vec![data]).await
    }

    /// Writes consecutive `chunks` starting at `offset`, in one blocking hop and without
    /// joining them into one buffer first.
    pub async fn write_chunks_at(&self, offset: u64, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let end = offset.checked_add(len).ok_or(StoreError::OutOfBounds)?;
        if end > self.size() {
            return Err(StoreError::OutOfBounds);
        }
        {
            let state = self.state();
            if state.outcome != Outcome::Pending || state.verified {
                return Err(StoreError::Finished);
            }
        }
        let (file, verifier) = (self.file.clone(), self.verifier.clone());
        file_io(len, move || {
            let mut at = offset;
            for chunk in &chunks {
                file.write_all_at(chunk, at)?;
                at += chunk.len() as u64;
            }
            let mut v = lock(&verifier);
            if v.len() == offset {
                for chunk in &chunks {
                    v.update(chunk);
                }
            }
            Ok(())
        })
        .await?;
        self.state().written.insert(offset..end);
        self.notify();
        Ok(())
    }

    /// Waits until byte `offset` is written, then returns up to `max` bytes from there; the
    /// blob's last byte only once the whole blob verified (for responses of the whole blob).
    pub async fn read_at(&self, offset: u64, max: u64) -> Result<Bytes, StoreError> {
        self.read(offset, max, LastByte::AfterVerification).await
    }

    /// Waits until the whole blob verified; an error if it was discarded or abandoned.
    pub async fn wait_verified(&self) -> Result<(), StoreError> {
        let mut rx = self.subscribe();
        loop {
            {
                let state = self.state();
                if state.verified || state.outcome == Outcome::Complete {
                    return Ok(());
                }
                if let Outcome::Failed(reason) = &state.outcome {
                    return Err(StoreError::Discarded(reason.to_string()));
                }
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Finished);
            }
        }
    }

    /// Waits until the blob is committed to the store (verified, fsynced, renamed); an
    /// error if it was discarded or abandoned.
    pub async fn wait_committed(&self) -> Result<(), StoreError> {
        let mut rx = self.subscribe();
        loop {
            match self.outcome() {
                Outcome::Complete => return Ok(()),
                Outcome::Failed(reason) => return Err(StoreError::Discarded(reason.to_string())),
                Outcome::Pending => {}
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Finished);
            }
        }
    }

    /// Like [`PartialBlob::read_at`], but the last byte too as soon as it is written: for
    /// ranged responses, which no digest covers.
    pub async fn read_range_at(&self, offset: u64, max: u64) -> Result<Bytes, StoreError> {
        self.read(offset, max, LastByte::AsWritten).await
    }

    async fn read(&self, offset: u64, max: u64, last_byte: LastByte) -> Result<Bytes, StoreError> {
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
                let verified = state.verified || state.outcome == Outcome::Complete;
                let hold = last_byte == LastByte::AfterVerification && !verified;
                let held = if hold && offset + available == self.size() { 1 } else { 0 };
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

    /// Gives up on this transfer but keeps what is durable: readers get an error, and the
    /// next request for the blob resumes from the recorded pieces.
    pub async fn abandon(&self, reason: &str) {
        if self.stop(reason) {
            tracing::warn!(digest = %self.digest, reason, "transfer abandoned; durable bytes kept for a resume");
            self.release().await;
        }
    }

    /// Marks a partial blob nobody reads any more as closed (no error to anyone, as nobody
    /// reads it); false when it had already ended. [`PartialBlob::finish_close`] then stops
    /// advertising it and lets its file go; its recorded bytes stay for the next reader, who
    /// resumes from them (or for the evictor and `partial_ttl`).
    pub fn begin_close(&self) -> bool {
        self.stop("closed: nobody reads it")
    }

    /// The rest of [`PartialBlob::begin_close`].
    pub async fn finish_close(&self) {
        self.release().await;
    }

    /// Ends a pending blob as failed with `reason`; false when it had already ended.
    fn stop(&self, reason: &str) -> bool {
        let mut state = self.state();
        if state.outcome != Outcome::Pending || state.verified {
            return false;
        }
        state.outcome = Outcome::Failed(reason.into());
        true
    }

    async fn release(&self) {
        self.store.forget_partial(self).await;
        self.store.emit(crate::StoreEvent::Dropped(clyde_types::ContentKey::Digest(self.digest)));
        self.notify();
    }

    /// Discards the blob: readers get an error, the file and its record are removed.
    pub async fn fail(&self, reason: &str) {
        {
            // A verified blob is being committed: nothing can make it wrong any more.
            let state = self.state();
            if state.outcome != Outcome::Pending || state.verified {
                return;
            }
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
        let mut last_sync = tokio::time::Instant::now();
        loop {
            if self.outcome() != Outcome::Pending {
                return;
            }
            match self.hash_prefix().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    self.fail(&format!("could not read back blob: {e}")).await;
                    return;
                }
            }
            let pending = self.pending_durable_bytes();
            if pending >= DURABLE_BATCH || (pending > 0 && last_sync.elapsed() >= DURABLE_INTERVAL) {
                if let Err(e) = self.make_pieces_durable().await {
                    self.fail(&format!("could not persist pieces: {e}")).await;
                    return;
                }
                last_sync = tokio::time::Instant::now();
            }
            let tick = async {
                if pending > 0 {
                    tokio::time::sleep_until(last_sync + DURABLE_INTERVAL).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tick => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
        let prefix = std::mem::replace(&mut *lock(&self.verifier), Prefix::new(self.digest, self.layout));
        let (got, ok, pieces) = prefix.finish(self.layout);
        if !ok {
            self.corrupt.store(true, std::sync::atomic::Ordering::Release);
            self.fail(&format!("digest mismatch: bytes hash to {got}")).await;
            return;
        }
        // Readers get the last byte now; making the blob durable happens behind them.
        self.state().verified = true;
        self.notify();
        if let Err(e) = self.commit(pieces).await {
            // `fail` leaves a verified blob alone; a commit that failed (disk full, fsync)
            // must still end as failed, or those waiting for the commit wait forever.
            let reason = format!("could not commit blob: {e}");
            tracing::warn!(digest = %self.digest, reason, "discarding verified blob");
            if let Err(e) = self.store.discard_partial(&self).await {
                tracing::warn!(digest = %self.digest, error = %e, "could not remove the uncommitted blob");
            }
            self.state().outcome = Outcome::Failed(reason.into());
            self.notify();
        }
    }

    /// Written bytes not yet durable.
    fn pending_durable_bytes(&self) -> u64 {
        let state = self.state();
        state.written.len().saturating_sub(state.durable.len())
    }

    /// Fsyncs what is written and records the written intervals (and which came from peers).
    async fn make_pieces_durable(&self) -> Result<(), StoreError> {
        let (written, record) = {
            let state = self.state();
            if state.written.len() == state.durable.len() {
                return Ok(());
            }
            let spans = |set: &IntervalSet| set.spans().iter().map(|r| [r.start, r.end]).collect();
            let record = PartialRecord {
                size: self.size(),
                piece_size: self.layout.piece_size(),
                durable: Vec::new(),
                spans: spans(&state.written),
                untrusted: spans(&state.untrusted),
                touched: crate::unix_now(),
            };
            (state.written.clone(), record)
        };
        let (file, store, digest) = (self.file.clone(), self.store.clone(), self.digest);
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            store.inner.meta.update_partial(&digest, &record)
        })
        .await
        .map_err(StoreError::join)??;
        let bytes = written.len();
        self.state().durable = written;
        tracing::debug!(digest = %self.digest, bytes, of = self.size(), "written bytes made durable");
        Ok(())
    }

    /// Bytes written so far (for the store's accounting of partial blobs).
    pub fn written_bytes(&self) -> u64 {
        self.state().written.len()
    }

    /// Hashes, by reading them back, the written bytes that follow the hashed prefix (writes
    /// that arrived out of order); true when the whole blob is hashed.
    async fn hash_prefix(&self) -> Result<bool, StoreError> {
        loop {
            let pos = lock(&self.verifier).len();
            let end = self.written_from(pos);
            if pos == end {
                return Ok(pos == self.size());
            }
            let chunk = read_file_at(self.file.clone(), pos, (end - pos).min(HASH_CHUNK)).await?;
            let mut v = lock(&self.verifier);
            // A writer may have hashed these bytes meanwhile.
            if v.len() == pos {
                v.update(&chunk);
            }
        }
    }

    async fn commit(&self, pieces: Option<PieceHashes>) -> Result<(), StoreError> {
        let (file, store, digest, from) = (self.file.clone(), self.store.clone(), self.digest, self.path.clone());
        let size = self.size();
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            let to = store.blob_path(&digest);
            std::fs::rename(&from, &to)?;
            sync_dir(to.parent().unwrap_or(store.root()))?;
            store.add_bytes(size);
            let list = pieces.map(|p| p.encode());
            let record = BlobRecord { size, created: unix_now(), last_access: unix_now() };
            store.inner.meta.complete_blob(&digest, &record, list.as_deref())
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
    file_io(len, move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
}

/// Page-cache I/O up to this size runs on the async thread: a thread hop costs more than the
/// copy. Larger I/O goes to the blocking pool.
const INLINE_IO_MAX: u64 = 256 * 1024;

/// Runs file I/O of `len` bytes inline when small, on the blocking pool otherwise.
pub(crate) async fn file_io<T: Send + 'static>(
    len: u64,
    io: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    if len <= INLINE_IO_MAX {
        return Ok(io()?);
    }
    Ok(tokio::task::spawn_blocking(io).await.map_err(StoreError::join)??)
}
