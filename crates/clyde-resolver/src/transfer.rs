//! Single-flight blob transfers with cut-through readers.
//!
//! Message flow: the first request for a blob that is not in the store creates a [`Job`]
//! (one per digest, shared by every later request) and opens one stream for the bytes it
//! wants. The stream is a *claim* on that byte interval; a task pumps it into the store's
//! [`PartialBlob`], and readers stream whatever is written. A reader that needs a byte far
//! ahead of every running claim *steals* the tail of the claim (the old task stops where the
//! new one starts), so a lazy puller's `Range` is answered about as fast as the upstream
//! answers that range.
//!
//! Transfers are driven by demand. A job is *whole* once a reader of the whole blob joined
//! (containerd's `GET`, `clyde load`, a peer's whole-blob fetch) or the fill policy is
//! `eager`: its first stream runs from a peer that holds the blob when one answers in time,
//! else from the fetcher the cluster elects, else the upstream; and when a claim's task ends,
//! the job claims every byte nobody holds or fetches yet ("fill"), so the blob completes.
//! Until then, every claim is for a reader's range only, from the upstream: a bounded range
//! costs exactly its bytes, and an open-ended one (`bytes=N-`, containerd 2.1's parallel
//! fetch) may run at most [`WINDOW`] ahead of what its readers read, and stops
//! [`LINGER`] after they stopped asking. Bytes from a peer are served to a ranged reader only
//! once the whole blob verified, so a job that takes any makes itself whole. With the fill
//! policy `idle`, the rest of a range-read blob is fetched in the background, paused while
//! any reader waits. Transfers that broke mid-body resume with `Range`.
//! Claims never overlap: a pump *reserves* the bytes it is about to write under the claims
//! lock, and a steal never cuts below a reservation, so no byte is written twice.
//! A watcher per job removes it from the map once its blob is committed or discarded, and
//! penalizes the peers that contributed to a blob whose bytes did not verify.
//! The decisions are pure functions ([`plan_fill`], [`plan_demand`]) tested without sockets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clyde_metrics::Metrics;
use clyde_store::{BlobFile, Outcome, PartialBlob, Store, StoreError};
use clyde_types::{ByteRange, ContentKey, Digest, IntervalSet};
use clyde_upstream::{BlobBody, ByteStream, Upstream, UpstreamError};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{Notify, OnceCell, watch};
use tokio_util::task::TaskTracker;

use crate::election;
use crate::peers::{Lookup, Peers};
use crate::schedule;
use crate::{Origin, ResolveError, ResolverConfig};

/// Bytes handed to a client per read: large enough that a cached blob costs few blocking
/// hops, small enough that 8 concurrent readers stay far below the memory budget.
const READ_CHUNK: u64 = 1024 * 1024;
/// Largest batch of upstream bytes written to the store at once.
const WRITE_BATCH: usize = 1024 * 1024;
/// How far the transfer of an open-ended range may run ahead of what its readers read.
pub const WINDOW: u64 = 8 * 1024 * 1024;
/// How long a transfer that reached its window waits for a reader to ask for more before it
/// stops (the reader dropped its connection): the upstream bytes nobody waits for are cancelled.
pub const LINGER: Duration = Duration::from_secs(2);
/// A job nobody reads or fetches for this long is closed; its written bytes stay on disk
/// (durable, recorded) for the next reader, and the evictor may take them.
const JOB_IDLE: Duration = Duration::from_secs(10);

/// What a request wants of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// The first byte.
    pub start: u64,
    /// One past the last byte (`u64::MAX`: to the end of the blob).
    pub end: u64,
    /// The whole blob: the transfer runs to completion at full speed.
    pub whole: bool,
}

impl Want {
    /// The whole blob.
    pub fn whole() -> Self {
        Self { start: 0, end: u64::MAX, whole: true }
    }

    /// The bytes `start..end` (`u64::MAX`: to the end) of the blob.
    pub fn range(start: u64, end: u64) -> Self {
        Self { start, end, whole: false }
    }
}

/// Whether a blob read by ranges is fetched whole in the background.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FillPolicy {
    /// Only what readers ask for is fetched (lazy pulling: what is never read never moves).
    #[default]
    Off,
    /// The rest is fetched while no reader waits; any reader that waits pauses it at once.
    Idle,
    /// The rest is fetched at full speed, as for a reader of the whole blob.
    Eager,
}

impl std::str::FromStr for FillPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "idle" => Ok(Self::Idle),
            "eager" => Ok(Self::Eager),
            other => Err(format!("unknown fill policy {other:?}; expected off, idle or eager")),
        }
    }
}

/// What a reader waiting for `offset` should do.
#[derive(Debug, PartialEq, Eq)]
pub enum Demand {
    /// The byte is written, or a claim will reach it soon.
    Wait,
    /// Claim number `index` is far behind: take `at..its end` from it.
    Steal { index: usize, at: u64 },
    /// Nobody fetches this byte: claim this range.
    Claim(Range<u64>),
}

/// A claimed interval, as the planner sees it: `cursor..end` is still to be fetched, and
/// `cursor..reserved` is being written right now. A `background` claim (the `idle` fill)
/// pauses while any reader waits, so a reader never waits for one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimView {
    pub cursor: u64,
    pub reserved: u64,
    pub end: u64,
    pub background: bool,
}

fn covered(written: &IntervalSet, claims: &[ClaimView]) -> IntervalSet {
    let mut all = written.clone();
    for c in claims {
        all.insert(c.cursor..c.end);
    }
    all
}

/// The ranges of a blob of `size` bytes that are neither written nor claimed.
pub fn plan_fill(size: u64, written: &IntervalSet, claims: &[ClaimView]) -> Vec<Range<u64>> {
    let all = covered(written, claims);
    let mut gaps = Vec::new();
    let mut pos = 0;
    while let Some(gap) = all.first_gap(pos..size) {
        pos = gap.end;
        gaps.push(gap);
    }
    gaps
}

/// What to do for a reader that needs byte `offset`.
pub fn plan_demand(offset: u64, size: u64, written: &IntervalSet, claims: &[ClaimView], steal_distance: u64) -> Demand {
    if offset >= size || written.contains(offset) {
        return Demand::Wait;
    }
    if let Some((index, c)) = claims.iter().enumerate().find(|(_, c)| c.cursor <= offset && offset < c.end) {
        let at = offset.max(c.reserved);
        return if (!c.background && offset - c.cursor <= steal_distance) || at >= c.end {
            Demand::Wait
        } else {
            Demand::Steal { index, at }
        };
    }
    let all = covered(written, claims);
    match all.first_gap(offset..size) {
        Some(gap) if gap.start == offset => Demand::Claim(gap),
        _ => Demand::Wait,
    }
}

struct Claim {
    cursor: AtomicU64,
    reserved: AtomicU64,
    end: AtomicU64,
    /// The pump reads no more of its stream once its cursor reached this (the window of an
    /// open-ended range); `u64::MAX` for a whole job.
    limit: AtomicU64,
    background: AtomicBool,
}

impl Claim {
    fn new(range: &Range<u64>, limit: u64, background: bool) -> Arc<Self> {
        Arc::new(Self {
            cursor: AtomicU64::new(range.start),
            reserved: AtomicU64::new(range.start),
            end: AtomicU64::new(range.end),
            limit: AtomicU64::new(limit),
            background: AtomicBool::new(background),
        })
    }

    fn view(&self) -> ClaimView {
        ClaimView {
            cursor: self.cursor.load(Ordering::Acquire),
            reserved: self.reserved.load(Ordering::Acquire),
            end: self.end.load(Ordering::Acquire),
            background: self.background.load(Ordering::Acquire),
        }
    }
}

/// Why a claim's pump stopped before its end.
enum PumpError {
    Upstream(UpstreamError),
    Store(StoreError),
    /// The peer streaming sent a piece that does not match its hash (already penalized).
    BadPiece,
}

struct Shared {
    upstream: Arc<Upstream>,
    peers: Option<Arc<Peers>>,
    config: ResolverConfig,
    metrics: Metrics,
    tasks: TaskTracker,
    shutdown: watch::Sender<bool>,
    /// One permit per running transfer (`max_transfers`).
    slots: Arc<tokio::sync::Semaphore>,
}

/// Where a stream of blob bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Upstream,
    Peer(SocketAddr),
}

impl Shared {
    /// Resolves once shutdown was requested, also when that happened before the call.
    async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Whether bytes from peers are checked piece by piece as they arrive: members vouch
    /// for pieces only in a cluster with a secret. Else only the whole blob's digest
    /// vouches for them.
    fn checks_pieces(&self) -> bool {
        self.config.members.is_some() && self.peers.is_some()
    }

    /// `range` of a blob from the first peer that holds it and answers in time.
    async fn open_from_peers(
        &self,
        origin: &Origin,
        digest: &Digest,
        range: Option<Range<u64>>,
        lookup: Lookup,
        expected: Option<u64>,
    ) -> Option<(BlobBody, SocketAddr)> {
        let peers = self.peers.as_ref()?;
        let candidates = peers.find(ContentKey::Digest(*digest), lookup).await;
        if candidates.is_empty() {
            return None;
        }
        let expected = self.trusted_size(origin, digest, expected).await;
        peers.open_blob(&candidates, origin, digest, range, expected).await.map(|(peer, body)| (body, peer))
    }

    /// The size a peer must claim: `known` (a verified manifest's descriptor, or the
    /// complete blob), else the upstream's answer (a blob asked for by digest alone). Only
    /// when neither can be had does a peer's claim stand; its bytes still verify.
    async fn trusted_size(&self, origin: &Origin, digest: &Digest, known: Option<u64>) -> Option<u64> {
        match known {
            None if !self.config.air_gapped => {
                let head = self.upstream.head_blob(&origin.registry, &origin.repository, digest);
                tokio::time::timeout(self.config.tag_check_timeout, head).await.ok().and_then(Result::ok)
            }
            known => known,
        }
    }

    /// Opens `range` of a blob (`None`: all of it): from a peer that serves it in time,
    /// else from the fetcher the cluster elects for it (see [`crate::election`]), else the
    /// upstream, else (the upstream failing) peers found by a patient lookup. A reader's
    /// range of a blob nobody reads whole ([`Attempt::Demand`]) goes to the upstream first
    /// unless members vouch for pieces: without them, a peer's bytes could reach that
    /// reader only once the whole blob verified.
    async fn open(
        &self,
        origin: &Origin,
        digest: &Digest,
        range: Option<Range<u64>>,
        attempt: Attempt,
        expected: Option<u64>,
    ) -> Result<(BlobBody, Source), ResolveError> {
        let never_upstream = self.config.air_gapped;
        let offered = match attempt {
            Attempt::Demand if !never_upstream && !self.checks_pieces() => None,
            Attempt::DemandUpstream if !never_upstream => None,
            Attempt::Resume if !never_upstream => {
                self.open_from_complete_holders(origin, digest, range.clone(), expected).await
            }
            _ => self.open_from_peers(origin, digest, range.clone(), self.config.first_lookup(), expected).await,
        };
        if let Some((body, peer)) = offered {
            return Ok((body, Source::Peer(peer)));
        }
        if never_upstream {
            return Err(if self.peers.is_some() { ResolveError::NoPeer } else { ResolveError::AirGapped });
        }
        if let Some(peers) = &self.peers
            && !matches!(attempt, Attempt::Demand | Attempt::DemandUpstream)
            && peers.has_company().await
        {
            let expected = self.trusted_size(origin, digest, expected).await;
            let timeouts = &self.config.peers;
            if let Some((body, peer)) =
                election::follow_elected(peers, timeouts, origin, digest, range.clone(), expected).await
            {
                return Ok((body, Source::Peer(peer)));
            }
        }
        let error = match self.upstream.get_blob(&origin.registry, &origin.repository, digest, range.clone()).await {
            Ok(body) => return Ok((body, Source::Upstream)),
            Err(e) => e,
        };
        // A definite answer about the blob, not an upstream in trouble: peers cannot help.
        if matches!(error, UpstreamError::NotFound | UpstreamError::Status { status: 416, .. }) {
            return Err(error.into());
        }
        if let Some((body, peer)) = self.open_from_peers(origin, digest, range, Lookup::Patient, expected).await {
            tracing::info!(%digest, %peer, upstream_error = %error, "upstream unavailable; fetching from a peer");
            return Ok((body, Source::Peer(peer)));
        }
        Err(error.into())
    }

    /// Holders of a blob that hold it complete (not still receiving it), when the lookup
    /// finds at least `min` holders of any kind (fewer: none, without asking them).
    async fn complete_holders(&self, origin: &Origin, digest: &Digest, min: usize) -> Vec<SocketAddr> {
        let Some(peers) = &self.peers else { return Vec::new() };
        let candidates = peers.find(ContentKey::Digest(*digest), self.config.first_lookup()).await;
        if candidates.len() < min.max(1) {
            return Vec::new();
        }
        peers.complete_holders(&candidates, origin, digest).await
    }

    /// `range` of a blob from a holder that holds it complete: after a source broke, nodes
    /// still fetching may be waiting on that same source.
    async fn open_from_complete_holders(
        &self,
        origin: &Origin,
        digest: &Digest,
        range: Option<Range<u64>>,
        expected: Option<u64>,
    ) -> Option<(BlobBody, SocketAddr)> {
        let complete = self.complete_holders(origin, digest, 1).await;
        let peers = self.peers.as_ref()?;
        peers.open_blob(&complete, origin, digest, range, expected).await.map(|(peer, body)| (body, peer))
    }
}

/// Rounds a stripe asks its holders when none answers (they may all be at their upload
/// limit), and the wait between rounds (the `Retry-After` peers send).
const BUSY_ROUNDS: u32 = 3;
const BUSY_WAIT: Duration = Duration::from_secs(1);

/// Why a blob's bytes are being opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    /// The first request for these bytes: any holder will do, complete or arriving.
    First,
    /// The source of these bytes broke: complete holders first, then the election, since
    /// holders still arriving may be waiting on the same broken source.
    Resume,
    /// A reader's range of a blob nobody reads whole: the upstream, peers only when it
    /// cannot serve (peers first when members vouch for pieces).
    Demand,
    /// As `Demand`, the upstream first whatever the pieces: peers did not vouch for a piece
    /// of this blob, so their bytes would wait for the whole blob's digest.
    DemandUpstream,
}

/// A blob transfer shared by all its readers.
pub struct Job {
    origin: Origin,
    partial: Arc<PartialBlob>,
    claims: Mutex<Vec<Arc<Claim>>>,
    shared: Arc<Shared>,
    /// Peers whose bytes went into the blob: penalized together if it does not verify.
    peers_used: Mutex<HashSet<SocketAddr>>,
    /// Where the first stream came from, for logs and metrics (`None`: a resumed blob).
    first_source: Option<Source>,
    /// A reader of the whole blob joined (or the fill policy is `eager`): the blob is
    /// fetched to completion, at full speed. Until then only readers' ranges are fetched.
    whole: AtomicBool,
    /// Readers waiting for bytes right now (the `idle` fill pauses while there are any).
    waiting: AtomicUsize,
    /// Wakes pumps waiting for their window to grow or for readers to stop waiting.
    nudge: Notify,
    /// When a reader last asked for bytes or a pump last wrote some.
    last_active: Mutex<Instant>,
    /// Complete holders the blob is fetched from in stripes (see [`crate::schedule`]);
    /// empty: one stream per claim, from wherever [`Shared::open`] finds the bytes.
    holders: Vec<SocketAddr>,
    /// This blob's requests in flight per peer.
    peer_load: Mutex<HashMap<SocketAddr, usize>>,
    /// The peers whose pending bytes are in each piece not checked yet: a piece that does
    /// not match its hash is pinned on them, and nobody else.
    piece_peers: Mutex<HashMap<u64, HashSet<SocketAddr>>>,
    /// No member vouched for a piece of this blob: readers' ranges go to the upstream first.
    ranges_from_upstream: AtomicBool,
}

type JobCell = Arc<OnceCell<Result<Arc<Job>, ResolveError>>>;
type JobMap = Arc<Mutex<HashMap<Digest, JobCell>>>;

pub(crate) struct Transfers {
    store: Store,
    shared: Arc<Shared>,
    jobs: JobMap,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves only plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn forget(jobs: &JobMap, digest: &Digest, cell: &JobCell) {
    let mut jobs = lock(jobs);
    if jobs.get(digest).is_some_and(|c| Arc::ptr_eq(c, cell)) {
        jobs.remove(digest);
    }
}

impl Transfers {
    pub(crate) fn new(
        store: Store,
        upstream: Arc<Upstream>,
        peers: Option<Arc<Peers>>,
        config: ResolverConfig,
        metrics: Metrics,
    ) -> Self {
        let (shutdown, _) = watch::channel(false);
        let slots = Arc::new(tokio::sync::Semaphore::new(match config.max_transfers {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n,
        }));
        let shared = Arc::new(Shared { upstream, peers, config, metrics, tasks: TaskTracker::new(), shutdown, slots });
        Self { store, shared, jobs: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The running job for `digest`, if any (without starting one).
    pub(crate) fn running(&self, digest: &Digest) -> Option<Arc<Job>> {
        // Under the map's lock, so the watcher never closes a job between this check and
        // the clone (see `watch`).
        let jobs = lock(&self.jobs);
        match jobs.get(digest)?.get() {
            Some(Ok(job)) if job.partial.outcome() == Outcome::Pending => Some(job.clone()),
            _ => None,
        }
    }

    /// Joins the transfer of `digest`, starting it (fetching what `want` asks for first) if
    /// needed.
    pub(crate) async fn join(&self, origin: &Origin, digest: &Digest, want: Want) -> Result<BlobSource, ResolveError> {
        let first_byte = want.start;
        for _ in 0..3 {
            let cell = lock(&self.jobs).entry(*digest).or_default().clone();
            let init = async {
                let slot = self.slot(digest).await?;
                let job = self.start(origin, digest, want).await?;
                self.watch(*digest, cell.clone(), job.clone(), slot);
                Ok(job)
            };
            let result = cell.get_or_init(|| init).await.clone();
            // Checked under the map's lock: the watcher closes an idle job only under it, and
            // only while nobody but the map holds the job (this clone counts).
            let pending = |job: &Job| {
                let _jobs = lock(&self.jobs);
                job.partial.outcome() == Outcome::Pending
            };
            match result {
                Ok(job) if pending(&job) => {
                    return Ok(BlobSource::Transfer(job));
                }
                Ok(_) => {
                    forget(&self.jobs, digest, &cell);
                    let d = *digest;
                    if let Some(file) = self.store.blocking(move |s| s.open_blob(&d)).await? {
                        return Ok(BlobSource::Local(file));
                    }
                }
                // Another request's range was past the end; this one may still be fine.
                Err(ResolveError::RangeNotSatisfiable { size }) if first_byte < size => {
                    forget(&self.jobs, digest, &cell);
                }
                Err(e) => {
                    forget(&self.jobs, digest, &cell);
                    return Err(e);
                }
            }
        }
        Err(ResolveError::Transfer(format!("the transfer of {digest} keeps failing")))
    }

    /// A running-transfer slot: at once when one is free, else once a running transfer ends.
    async fn slot(&self, digest: &Digest) -> Result<tokio::sync::OwnedSemaphorePermit, ResolveError> {
        let slots = &self.shared.slots;
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        tracing::info!(%digest, max_transfers = self.shared.config.max_transfers, "at the bound on running transfers; this one waits its turn");
        slots.clone().acquire_owned().await.map_err(|_| ResolveError::Transfer("shutting down".into()))
    }

    /// Removes the job from the map once its blob is committed or discarded, so finished
    /// jobs do not keep their files open; closes a job nobody reads or fetches for
    /// [`JOB_IDLE`] (its written bytes stay on disk for the next reader). The job's
    /// running-transfer `slot` is given back then.
    fn watch(&self, digest: Digest, cell: JobCell, job: Arc<Job>, slot: tokio::sync::OwnedSemaphorePermit) {
        let jobs = self.jobs.clone();
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            let mut rx = job.partial.subscribe();
            let finished = async {
                while job.partial.outcome() == Outcome::Pending {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            };
            let idle = async {
                loop {
                    tokio::time::sleep(JOB_IDLE / 4).await;
                    // Held by the map's cell and this task only (no reader, no claim), and not
                    // written whole (a whole blob is being hashed): closed under the map's lock,
                    // which `join` and `running` hold while they check and take a job.
                    let _jobs = lock(&jobs);
                    if Arc::strong_count(&job) <= 2
                        && job.claims().is_empty()
                        && lock(&job.last_active).elapsed() >= JOB_IDLE
                        && !job.partial.written().covers(0..job.size())
                        && job.partial.begin_close()
                    {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = finished => {}
                _ = shared.stopped() => {}
                _ = idle => {
                    let written = job.partial.written().len();
                    tracing::info!(%digest, written, size = job.size(), "closing a transfer nobody reads; its bytes stay for later readers");
                    job.partial.finish_close().await;
                }
            }
            if job.partial.is_corrupt()
                && let Some(peers) = &shared.peers
            {
                for peer in lock(&job.peers_used).iter() {
                    peers.penalize(*peer, &format!("its bytes of {digest} did not verify"));
                }
            }
            forget(&jobs, &digest, &cell);
            drop(slot);
        });
    }

    async fn start(&self, origin: &Origin, digest: &Digest, want: Want) -> Result<Arc<Job>, ResolveError> {
        if self.shared.config.air_gapped && self.shared.peers.is_none() {
            return Err(ResolveError::AirGapped);
        }
        let whole = want.whole || self.shared.config.fill == FillPolicy::Eager;
        if let Some(partial) = self.store.existing_partial(digest).await? {
            // The partial knows which of its bytes came from peers (see `BlobSource::stream`).
            let job = Job::new(origin.clone(), partial, self.shared.clone(), None, Vec::new(), whole);
            job.fill();
            return Ok(job);
        }
        let first_byte = want.start;
        if whole && let Some(job) = self.start_striped(origin, digest, first_byte).await? {
            return Ok(job);
        }
        let (registry, repository) = (&origin.registry, &origin.repository);
        let (wanted, attempt) = if whole {
            ((first_byte > 0).then_some(first_byte..u64::MAX), Attempt::First)
        } else {
            (Some(want.start..want.end), Attempt::Demand)
        };
        // A peer's claim of the size is checked against a verified manifest's descriptor (or,
        // without one, the upstream's answer: see `Shared::open_from_peers`).
        let d = *digest;
        let expected = self.store.blocking(move |s| Ok(s.known_size(&d))).await?;
        let (body, source) = match self.shared.open(origin, digest, wanted, attempt, expected).await {
            // Past the end: answer 416 without downloading anything.
            Err(ResolveError::Upstream(UpstreamError::Status { status: 416, .. })) if first_byte > 0 => {
                let size = self.shared.upstream.head_blob(registry, repository, digest).await?;
                return Err(ResolveError::RangeNotSatisfiable { size });
            }
            other => other?,
        };
        let limit = if whole { u64::MAX } else { want.end.min(first_byte.saturating_add(WINDOW)) };
        self.launch(origin, digest, body, source, Vec::new(), whole, limit).await
    }

    /// Makes the job of a blob whose first stream is open: its partial blob, a claim for the
    /// stream's bytes (read up to `limit`), and, for a whole job, the fill of the rest (in
    /// stripes over `holders` when there are any). A peer's bytes make the job whole: they
    /// reach clients only once the whole blob verified.
    #[allow(clippy::too_many_arguments)]
    async fn launch(
        &self,
        origin: &Origin,
        digest: &Digest,
        body: BlobBody,
        source: Source,
        holders: Vec<SocketAddr>,
        whole: bool,
        limit: u64,
    ) -> Result<Arc<Job>, ResolveError> {
        let whole = whole || matches!(source, Source::Peer(_));
        let limit = if whole { u64::MAX } else { limit };
        let partial = self.store.partial(digest, body.size).await?;
        let job = Job::new(origin.clone(), partial, self.shared.clone(), Some(source), holders, whole);
        if !body.range.is_empty() {
            let claim = job.add_claim(&mut job.claims(), &body.range, limit, false);
            job.spawn(claim, Some((body.stream, source)));
        }
        job.fill();
        Ok(job)
    }

    /// Starts a transfer from several complete holders at once, when there are several:
    /// the first stripe from the first that answers, the rest spread over all of them.
    async fn start_striped(
        &self,
        origin: &Origin,
        digest: &Digest,
        first_byte: u64,
    ) -> Result<Option<Arc<Job>>, ResolveError> {
        let Some(peers) = &self.shared.peers else { return Ok(None) };
        let holders = self.shared.complete_holders(origin, digest, 2).await;
        if holders.len() < 2 {
            return Ok(None);
        }
        let first = first_byte..first_byte.saturating_add(schedule::STRIPE);
        let d = *digest;
        let known = self.store.blocking(move |s| Ok(s.known_size(&d))).await?;
        let expected = self.shared.trusted_size(origin, digest, known).await;
        let Some((peer, body)) = peers.open_blob(&holders, origin, digest, Some(first), expected).await else {
            return Ok(None);
        };
        tracing::info!(%digest, holders = holders.len(), "fetching from several complete holders at once");
        self.launch(origin, digest, body, Source::Peer(peer), holders, true, u64::MAX).await.map(Some)
    }

    pub(crate) async fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        lock(&self.jobs).clear();
    }
}

impl Job {
    fn new(
        origin: Origin,
        partial: Arc<PartialBlob>,
        shared: Arc<Shared>,
        first_source: Option<Source>,
        holders: Vec<SocketAddr>,
        whole: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            origin,
            partial,
            claims: Mutex::new(Vec::new()),
            shared,
            peers_used: Mutex::new(HashSet::new()),
            first_source,
            whole: AtomicBool::new(whole),
            waiting: AtomicUsize::new(0),
            nudge: Notify::new(),
            last_active: Mutex::new(Instant::now()),
            holders,
            peer_load: Mutex::new(HashMap::new()),
            piece_peers: Mutex::new(HashMap::new()),
            ranges_from_upstream: AtomicBool::new(false),
        })
    }

    /// Whether the blob is fetched to completion (a reader of the whole blob joined).
    pub fn is_whole(&self) -> bool {
        self.whole.load(Ordering::Acquire)
    }

    /// A reader of the whole blob joined: every claim may run to its end, and the rest of
    /// the blob is fetched.
    pub(crate) fn go_whole(self: &Arc<Self>) {
        if self.whole.swap(true, Ordering::AcqRel) {
            return;
        }
        for claim in self.claims().iter() {
            claim.limit.store(u64::MAX, Ordering::Release);
            claim.background.store(false, Ordering::Release);
        }
        self.nudge.notify_waiters();
        self.fill();
    }

    /// Whether this node holds `range` or will (a whole job), for a peer's ranged read: a
    /// peer asking for bytes a range-read blob lacks is told so at once.
    pub fn serves(&self, range: Range<u64>) -> bool {
        self.is_whole() || self.partial.held().covers(range)
    }

    /// Whether bytes from peers are checked piece by piece as they arrive.
    fn checks_pieces(&self) -> bool {
        self.shared.checks_pieces()
    }

    /// Counts a reader waiting for bytes until the guard drops.
    fn waiting(&self) -> WaitingGuard<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        WaitingGuard(self)
    }

    fn claims(&self) -> MutexGuard<'_, Vec<Arc<Claim>>> {
        lock(&self.claims)
    }

    /// The blob being written.
    pub(crate) fn partial(&self) -> &Arc<PartialBlob> {
        &self.partial
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.partial.size()
    }

    /// Registers a claim; the caller holds the claims lock, so planning and registering are
    /// one step and no other planner can claim the same bytes in between.
    fn add_claim(&self, claims: &mut Vec<Arc<Claim>>, range: &Range<u64>, limit: u64, background: bool) -> Arc<Claim> {
        let claim = Claim::new(range, limit, background);
        claims.push(claim.clone());
        claim
    }

    /// Where the bytes come from, for logs and metrics: `peer` or `upstream`.
    pub fn source_label(&self) -> &'static str {
        match self.first_source {
            Some(Source::Peer(_)) => "peer",
            _ => "upstream",
        }
    }

    /// Runs a registered claim's task.
    fn spawn(self: &Arc<Self>, claim: Arc<Claim>, stream: Option<(ByteStream, Source)>) {
        let job = self.clone();
        self.shared.tasks.spawn(async move {
            tokio::select! {
                _ = job.run_claim(&claim, stream) => {}
                _ = job.shared.stopped() => {}
            }
            job.claims().retain(|c| !Arc::ptr_eq(c, &claim));
            // A claim that ended inside a piece (its reader's window, its readers gone, a
            // source given up) may leave pending bytes that only the rest of the piece lets
            // anyone read: that rest is claimed.
            if job.checks_pieces() && !*job.shared.shutdown.borrow() {
                let _ = job.settle_pieces(None).await;
            }
            job.fill();
        });
    }

    fn views(claims: &[Arc<Claim>]) -> Vec<ClaimView> {
        claims.iter().map(|c| c.view()).collect()
    }

    /// Claims and starts fetching every byte nobody holds or fetches yet: for a whole job,
    /// or in the background with the `idle` fill policy.
    fn fill(self: &Arc<Self>) {
        if self.partial.outcome() != Outcome::Pending || *self.shared.shutdown.borrow() {
            return;
        }
        let added: Vec<Arc<Claim>> = {
            let mut claims = self.claims();
            // Read under the claims lock: `go_whole` flips the flag, then updates every claim
            // under this lock, so no claim made here misses the change.
            let whole = self.is_whole();
            let background = !whole && self.shared.config.fill == FillPolicy::Idle;
            if !whole && !background {
                return;
            }
            let (written, views) = (self.partial.held(), Self::views(&claims));
            let gaps = if self.holders.is_empty() {
                plan_fill(self.size(), &written, &views)
            } else {
                let slots = schedule::in_flight(self.holders.len()).saturating_sub(claims.len());
                let mut gaps = schedule::plan_stripes(self.size(), &written, &views, schedule::STRIPE, slots);
                if gaps.is_empty() && slots > 0 {
                    // The end game: everything is claimed; a holder is free to take half of
                    // the slowest request's rest. The split never cuts below a reservation.
                    let align = if self.checks_pieces() { self.partial.layout().piece_size() } else { 1 };
                    if let Some((index, at)) = schedule::plan_split(&views, schedule::MIN_SPLIT, align) {
                        let old_end = claims[index].end.swap(at, Ordering::AcqRel);
                        gaps.push(at..old_end);
                    }
                }
                gaps
            };
            gaps.iter().map(|gap| self.add_claim(&mut claims, gap, u64::MAX, background)).collect()
        };
        for claim in added {
            self.spawn(claim, None);
        }
    }

    /// Called by a reader of `offset..reader_end`: the claim that will write `offset` may
    /// run [`WINDOW`] past it; a reader far ahead of every claim gets its own.
    fn demand(self: &Arc<Self>, offset: u64, reader_end: u64) {
        if *self.shared.shutdown.borrow() {
            return;
        }
        *lock(&self.last_active) = Instant::now();
        let reader_end = reader_end.min(self.size());
        let (added, whole) = {
            let mut claims = self.claims();
            // Under the claims lock, as in `fill`.
            let whole = self.is_whole();
            let window_end = if whole { u64::MAX } else { reader_end.min(offset.saturating_add(WINDOW)) };
            if !whole {
                for c in claims.iter() {
                    let v = c.view();
                    if v.cursor < window_end && offset < v.end {
                        c.limit.fetch_max(window_end, Ordering::AcqRel);
                    }
                }
            }
            let views = Self::views(&claims);
            let steal_distance = self.shared.config.steal_distance;
            // A job not read whole fetches a reader's bytes and no more.
            let cap = |end: u64| if whole { end } else { end.min(reader_end) };
            let range = match plan_demand(offset, self.size(), &self.partial.held(), &views, steal_distance) {
                Demand::Wait => None,
                Demand::Steal { index, at } => {
                    let old_end = claims[index].end.load(Ordering::Acquire);
                    (cap(old_end) > at).then(|| {
                        claims[index].end.store(at, Ordering::Release);
                        at..cap(old_end)
                    })
                }
                Demand::Claim(range) => Some(range.start..cap(range.end)),
            };
            let added = range.map(|r| {
                let limit = if whole { u64::MAX } else { window_end.max(r.start.saturating_add(READ_CHUNK)) };
                (self.add_claim(&mut claims, &r, limit, false), r)
            });
            (added, whole)
        };
        self.nudge.notify_waiters();
        if let Some((claim, range)) = added {
            tracing::debug!(digest = %self.partial.digest(), ?range, whole, "reader ahead of transfers: new range");
            self.spawn(claim, None);
        }
        // A reader at bytes waiting for their piece's check: the rest of that piece is
        // fetched too (the check needs it whole), even past what the reader asked for, and
        // claims already on it run now (a background fill pauses while readers wait, and a
        // window may end inside the piece).
        if self.partial.is_pending(offset) {
            let piece = self.partial.layout().bounds(self.partial.layout().piece_of(offset));
            for c in self.claims().iter() {
                let v = c.view();
                if v.cursor < piece.end && piece.start < v.end {
                    c.background.store(false, Ordering::Release);
                    c.limit.fetch_max(piece.end, Ordering::AcqRel);
                }
            }
            self.nudge.notify_waiters();
            self.claim_gaps(piece);
        }
    }

    /// Claims and starts fetching whatever of `within` nobody holds or fetches: the rest of
    /// a piece a reader waits on, or a piece dropped because it did not match its hash.
    fn claim_gaps(self: &Arc<Self>, within: Range<u64>) {
        if self.partial.outcome() != Outcome::Pending || *self.shared.shutdown.borrow() {
            return;
        }
        let added: Vec<Arc<Claim>> = {
            let mut claims = self.claims();
            let views = Self::views(&claims);
            let gaps = plan_fill(self.size(), &self.partial.held(), &views);
            gaps.iter()
                .filter_map(|g| {
                    let r = g.start.max(within.start)..g.end.min(within.end);
                    (r.start < r.end).then_some(r)
                })
                .map(|r| self.add_claim(&mut claims, &r, u64::MAX, false))
                .collect()
        };
        for claim in added {
            self.spawn(claim, None);
        }
    }

    /// Checks the pieces whose pending bytes are all on disk. A piece that does not match
    /// is dropped and fetched again, and the peers that sent it are penalized (an error when
    /// `source`, the stream that just wrote, is one of them). Hashes nobody gave yet are
    /// asked of the peers that sent the piece; pieces no member vouches for are left to the
    /// whole blob's digest.
    async fn settle_pieces(self: &Arc<Self>, source: Option<SocketAddr>) -> Result<(), PumpError> {
        let digest = self.partial.digest();
        let mut asked = false;
        loop {
            let settled = self.partial.settle().await.map_err(PumpError::Store)?;
            self.shared.metrics.peer_pieces("verified", settled.verified.len());
            self.shared.metrics.peer_pieces("corrupt", settled.corrupt.len());
            let mut guilty = false;
            {
                let mut piece_peers = lock(&self.piece_peers);
                for p in &settled.verified {
                    piece_peers.remove(p);
                }
                for p in &settled.corrupt {
                    let senders = piece_peers.remove(p).unwrap_or_default();
                    tracing::warn!(%digest, piece = p, ?senders, "a piece from a peer does not match its hash; fetching it again elsewhere");
                    // Pinned on its sender. A piece two peers sent parts of (a stream split
                    // inside it) pins nobody yet: it is fetched again whole from one source,
                    // which settles who sent the bad bytes.
                    if let [peer] = senders.iter().copied().collect::<Vec<_>>()[..] {
                        guilty |= Some(peer) == source;
                        if let Some(peers) = &self.shared.peers {
                            peers.penalize(peer, &format!("sent piece {p} of {digest}, which does not match its hash"));
                        }
                    }
                }
            }
            // Dropped pieces are fetched again; a piece a stream began or ended inside (a
            // reader's range, a resume) gets the rest of its bytes claimed, or it could never
            // be checked and its reader would wait forever.
            for p in settled.corrupt.iter().chain(&settled.incomplete) {
                self.claim_gaps(self.partial.layout().bounds(*p));
            }
            if guilty {
                return Err(PumpError::BadPiece);
            }
            if settled.unknown.is_empty() {
                return Ok(());
            }
            let senders: Vec<SocketAddr> = {
                let piece_peers = lock(&self.piece_peers);
                let mut senders: Vec<SocketAddr> = source.into_iter().collect();
                for peer in settled.unknown.iter().filter_map(|p| piece_peers.get(p)).flatten() {
                    if !senders.contains(peer) {
                        senders.push(*peer);
                    }
                }
                senders
            };
            let list = match (&self.shared.peers, asked) {
                (Some(peers), false) => peers.piece_hashes(&senders, &digest, self.partial.layout()).await,
                _ => None,
            };
            asked = true;
            match list {
                Some(list) => self.partial.expect(&list),
                None => {
                    let mut piece_peers = lock(&self.piece_peers);
                    for p in &settled.unknown {
                        piece_peers.remove(p);
                    }
                    drop(piece_peers);
                    self.shared.metrics.peer_pieces("unvouched", settled.unknown.len());
                    if !self.is_whole() {
                        // A reader of ranges (a lazy puller) must not wait for the whole
                        // blob: these bytes are fetched again, and its ranges come from the
                        // upstream first from now on.
                        tracing::info!(%digest, pieces = ?settled.unknown, "no member vouches for these pieces; fetching them again, ranges from the upstream first");
                        self.ranges_from_upstream.store(true, Ordering::Release);
                        self.partial.drop_pending(&settled.unknown);
                        for p in &settled.unknown {
                            self.claim_gaps(self.partial.layout().bounds(*p));
                        }
                        return Ok(());
                    }
                    // Nobody vouches for these pieces: only the whole blob's digest will.
                    tracing::info!(%digest, pieces = ?settled.unknown, "no member vouches for these pieces; they wait for the whole blob's digest");
                    self.partial.trust_later(&settled.unknown);
                    return Ok(());
                }
            }
        }
    }

    async fn run_claim(self: &Arc<Self>, claim: &Claim, mut stream: Option<(ByteStream, Source)>) {
        let digest = self.partial.digest();
        let mut failures = 0u32;
        let mut broke = false;
        loop {
            let view = claim.view();
            if view.cursor >= view.end || self.partial.outcome() != Outcome::Pending {
                return;
            }
            let attempt = match (self.is_whole(), broke) {
                (false, _) if self.ranges_from_upstream.load(Ordering::Acquire) => Attempt::DemandUpstream,
                (false, _) => Attempt::Demand,
                (true, false) => Attempt::First,
                (true, true) => Attempt::Resume,
            };
            let opened = match stream.take() {
                Some(s) => Ok(s),
                None => match self.open_stripe(view.cursor..view.end, attempt).await {
                    Some(opened) => Ok(opened),
                    None => {
                        let range = Some(view.cursor..view.end);
                        let opened = self.shared.open(&self.origin, &digest, range, attempt, Some(self.size())).await;
                        opened.map(|(b, source)| (b.stream, source))
                    }
                },
            };
            let (body, source) = match opened {
                Ok(opened) => opened,
                Err(ResolveError::Upstream(e)) => (failed_stream(e), Source::Upstream),
                Err(e) => {
                    self.partial.abandon(&format!("no source left: {e}")).await;
                    return;
                }
            };
            if let Source::Peer(peer) = source {
                lock(&self.peers_used).insert(peer);
                *lock(&self.peer_load).entry(peer).or_default() += 1;
                // A peer's bytes reach clients only verified: piece by piece when members
                // vouch for pieces, else once the whole blob verified.
                if !self.checks_pieces() {
                    self.go_whole();
                }
            }
            let pumped = self.pump(claim, body, source).await;
            if let Source::Peer(peer) = source
                && let Some(n) = lock(&self.peer_load).get_mut(&peer)
            {
                *n = n.saturating_sub(1);
            }
            broke = true;
            let error = match pumped {
                Ok(()) => continue,
                Err(PumpError::Store(e)) => {
                    self.partial.fail(&format!("could not write to the store: {e}")).await;
                    return;
                }
                Err(PumpError::Upstream(e)) => e,
                // Penalized already; the next attempt resumes at the cursor elsewhere, and
                // the dropped piece has a claim of its own.
                Err(PumpError::BadPiece) => continue,
            };
            // A peer that broke mid-body sits out a penalty; the next attempt resumes at the
            // cursor from another peer or the upstream, so it costs no attempt.
            if let (Source::Peer(peer), Some(peers)) = (source, &self.shared.peers) {
                peers.penalize(peer, &format!("broke mid-body: {error}"));
                tracing::info!(%digest, %peer, "peer transfer broke; resuming elsewhere with Range");
                continue;
            }
            // Progress since the last attempt earns a fresh set of attempts.
            if claim.cursor.load(Ordering::Acquire) > view.cursor {
                failures = 0;
            }
            failures += 1;
            let permanent = !error.is_transient() && !matches!(error, UpstreamError::Protocol(_));
            if permanent || failures >= self.shared.config.transfer_attempts {
                self.partial.abandon(&format!("upstream transfer failed: {error}")).await;
                return;
            }
            tracing::info!(%digest, %error, attempt = failures, "blob transfer broke; resuming with Range");
            tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
        }
    }

    /// `range` from the least loaded of a striped job's holders (`None`: not striped, or
    /// none of them answered; the caller then opens as for any claim).
    async fn open_stripe(&self, range: Range<u64>, attempt: Attempt) -> Option<(ByteStream, Source)> {
        let peers = self.shared.peers.as_ref()?;
        if self.holders.is_empty() || attempt != Attempt::First {
            return None;
        }
        // The chosen holder's load counts from now, so claims opening at the same time
        // spread over the holders instead of all picking the same idle one.
        let ordered = {
            let mut load = lock(&self.peer_load);
            let ordered = schedule::by_load(&self.holders, &load);
            *load.entry(*ordered.first()?).or_default() += 1;
            ordered
        };
        let digest = self.partial.digest();
        let mut opened = None;
        for round in 0..BUSY_ROUNDS {
            opened = peers.open_blob(&ordered, &self.origin, &digest, Some(range.clone()), Some(self.size())).await;
            // Holders at their upload limit (429) are not penalized: while some are usable,
            // wait for a slot rather than send the stripe to the upstream.
            if opened.is_some() || round + 1 == BUSY_ROUNDS || !peers.any_usable(&ordered) {
                break;
            }
            tokio::time::sleep(BUSY_WAIT).await;
        }
        // The caller counts the holder that answered while it streams.
        if let Some(n) = lock(&self.peer_load).get_mut(&ordered[0]) {
            *n = n.saturating_sub(1);
        }
        let (peer, body) = opened?;
        Some((body.stream, Source::Peer(peer)))
    }

    /// Waits until the claim may read more of its stream: its window grew past its cursor,
    /// or (a background claim) no reader waits. False when its readers are gone: the claim
    /// then ends at its cursor, and the bytes after it are left to whoever asks for them.
    async fn may_read_on(&self, claim: &Claim) -> bool {
        if claim.limit.load(Ordering::Acquire) == u64::MAX && !claim.background.load(Ordering::Acquire) {
            return true;
        }
        let lingering = tokio::time::Instant::now() + LINGER;
        loop {
            let notified = self.nudge.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let paused = claim.background.load(Ordering::Acquire) && self.waiting.load(Ordering::Acquire) > 0;
            let view = claim.view();
            let at_limit = view.cursor >= claim.limit.load(Ordering::Acquire);
            if view.cursor >= view.end {
                return false;
            }
            if !paused && !at_limit {
                return true;
            }
            if paused {
                // Wait for the readers; the window rule applies again once they are served.
                let _ = tokio::time::timeout(LINGER, notified).await;
                continue;
            }
            if tokio::time::timeout_at(lingering, notified).await.is_err() {
                let _claims = self.claims();
                let cursor = claim.cursor.load(Ordering::Acquire);
                if cursor >= claim.limit.load(Ordering::Acquire) {
                    claim.end.fetch_min(cursor, Ordering::AcqRel);
                    return false;
                }
            }
        }
    }

    /// Writes a stream into the claim until the claim's end; `Ok` when the end was reached
    /// (or its readers left: see [`Job::may_read_on`]).
    async fn pump(self: &Arc<Self>, claim: &Claim, mut body: ByteStream, source: Source) -> Result<(), PumpError> {
        loop {
            if !self.may_read_on(claim).await {
                return Ok(());
            }
            let Some(first) = body.next().await else {
                let view = claim.view();
                return if view.cursor >= view.end {
                    Ok(())
                } else {
                    Err(PumpError::Upstream(UpstreamError::Protocol(format!(
                        "body ended at {} before {}",
                        view.cursor, view.end
                    ))))
                };
            };
            // Take whatever else is ready, so a fast upstream gets few large writes and a slow
            // one still delivers each chunk to readers at once.
            let mut chunks = vec![first.map_err(PumpError::Upstream)?];
            let mut batched = chunks[0].len();
            while batched < WRITE_BATCH {
                match body.next().now_or_never() {
                    Some(Some(chunk)) => {
                        let chunk = chunk.map_err(PumpError::Upstream)?;
                        batched += chunk.len();
                        chunks.push(chunk);
                    }
                    _ => break,
                }
            }
            // Reserve the bytes under the claims lock: a steal now cuts at or after them.
            let (cursor, take) = {
                let _claims = self.claims();
                let cursor = claim.cursor.load(Ordering::Acquire);
                let take = (batched as u64).min(claim.end.load(Ordering::Acquire).saturating_sub(cursor));
                claim.reserved.store(cursor + take, Ordering::Release);
                (cursor, take)
            };
            let chunks = clip(chunks, take);
            let checked = self.checks_pieces();
            // Recorded before the write, so no reader sees these bytes without knowing.
            if matches!(source, Source::Peer(_)) && take > 0 && !checked {
                self.partial.mark_untrusted(cursor..cursor + take);
            }
            if take > 0 {
                match source {
                    Source::Peer(_) => self.shared.metrics.peer_bytes(take),
                    Source::Upstream => self.shared.metrics.upstream_bytes(self.origin.registry.as_str(), take),
                }
                match source {
                    Source::Peer(peer) if checked => {
                        let layout = self.partial.layout();
                        {
                            let mut piece_peers = lock(&self.piece_peers);
                            for p in layout.piece_of(cursor)..=layout.piece_of(cursor + take - 1) {
                                piece_peers.entry(p).or_default().insert(peer);
                            }
                        }
                        self.partial.write_pending_at(cursor, chunks).await.map_err(PumpError::Store)?;
                    }
                    _ => self.partial.write_chunks_at(cursor, chunks).await.map_err(PumpError::Store)?,
                }
                claim.cursor.store(cursor + take, Ordering::Release);
                *lock(&self.last_active) = Instant::now();
                // Pieces this write made whole are checked now (also after an upstream
                // write that completed a piece a peer's bytes began).
                if checked {
                    let from = match source {
                        Source::Peer(peer) => Some(peer),
                        Source::Upstream => None,
                    };
                    self.settle_pieces(from).await?;
                }
            }
            if cursor + take >= claim.end.load(Ordering::Acquire) {
                return Ok(());
            }
        }
    }
}

/// Parts of a multi-range request closer than this are fetched as one upstream request.
const PREFETCH_GAP: u64 = 64 * 1024;
/// Upstream requests one multi-range request starts at once.
const PREFETCH_MAX: usize = 8;

/// `ranges` sorted, with those less than `gap` apart (or overlapping) joined.
fn coalesce(ranges: &[ByteRange], gap: u64) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.iter().map(ByteRange::as_range).collect();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Bytes of a complete file per chunk sent.
const FILE_CHUNK: usize = READ_CHUNK as usize;
/// Buffers one file response keeps for reuse.
const POOLED_BUFFERS: usize = 4;

/// Buffers a file response reuses once hyper sent them: they stay warm in the CPU caches,
/// and no fresh pages are faulted in per chunk.
#[derive(Clone, Default)]
struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    /// A buffer of `FILE_CHUNK` initialized bytes (zeroed once, when first made).
    fn take(&self) -> Vec<u8> {
        lock(&self.0).pop().unwrap_or_else(|| vec![0; FILE_CHUNK])
    }
}

/// A chunk of a file response: the first `filled` bytes of a pooled buffer, which goes back
/// to the pool when the response is done with it.
struct Pooled {
    buf: Vec<u8>,
    filled: usize,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.filled]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = lock(&self.pool.0);
        if pool.len() < POOLED_BUFFERS {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Reads `len` bytes at `pos` into a pooled buffer: what the page cache holds on this thread
/// (no hop, and the bytes are then sent from this core's cache, as nginx does), the rest, if
/// the disk must be read, on the blocking pool.
async fn read_chunk(file: &BlobFile, pool: &BufferPool, pos: u64, len: usize) -> Result<Bytes, StoreError> {
    let mut buf = pool.take();
    let cached = file.read_cached_at(pos, &mut buf[..len]);
    if cached < len {
        let file = file.clone();
        buf = tokio::task::spawn_blocking(move || {
            file.read_exact_at(pos + cached as u64, &mut buf[cached..len]).map(|()| buf)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e.to_string()))))?;
    }
    Ok(Bytes::from_owner(Pooled { buf, filled: len, pool: pool.clone() }))
}

/// Streams `range` of a complete file in 1 MiB chunks from reused buffers.
fn stream_file(file: BlobFile, range: ByteRange) -> BlobStream {
    let state = (file, BufferPool::default(), range.start, range.end);
    Box::pin(futures_util::stream::unfold(state, move |(file, pool, pos, end)| async move {
        if pos >= end {
            return None;
        }
        let len = (end - pos).min(FILE_CHUNK as u64) as usize;
        match read_chunk(&file, &pool, pos, len).await {
            Ok(bytes) => Some((Ok(bytes), (file, pool, pos + len as u64, end))),
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), (file, pool, end, end))),
        }
    }))
}

/// A reader counted as waiting for bytes (see [`Job::waiting`]).
struct WaitingGuard<'a>(&'a Job);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.nudge.notify_waiters();
        }
    }
}

/// A stream that fails at once, so an open that failed is handled like a body that broke.
fn failed_stream(e: UpstreamError) -> ByteStream {
    Box::pin(futures_util::stream::once(async move { Err(e) }))
}

/// The first `limit` bytes of consecutive chunks (slicing, not copying).
fn clip(chunks: Vec<Bytes>, limit: u64) -> Vec<Bytes> {
    let mut left = limit;
    let mut out = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        if left == 0 {
            break;
        }
        let take = (chunk.len() as u64).min(left) as usize;
        left -= take as u64;
        out.push(if take == chunk.len() { chunk } else { chunk.slice(..take) });
    }
    out
}

/// Where a blob's bytes come from for one request (a clone is for the same request's next
/// part: clones must not be read at the same time).
#[derive(Clone)]
pub enum BlobSource {
    /// A complete, verified blob in the store.
    Local(BlobFile),
    /// A transfer in progress; readers far ahead of it fetch their own ranges.
    Transfer(Arc<Job>),
    /// A transfer in progress, read as it arrives and nothing more (for peers: this node
    /// never fetches on a peer's behalf).
    Arriving(Arc<Job>),
    /// A blob another holder on this node has (containerd), read through its API.
    Held { size: u64, reader: Arc<dyn crate::BlobReader> },
}

/// A stream of a blob's bytes for one response.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

impl BlobSource {
    /// The blob's size.
    pub fn size(&self) -> u64 {
        match self {
            Self::Local(f) => f.size(),
            Self::Held { size, .. } => *size,
            Self::Transfer(j) | Self::Arriving(j) => j.size(),
        }
    }

    /// Whether the blob is held whole and verified (not still arriving).
    pub fn is_complete(&self) -> bool {
        matches!(self, Self::Local(_) | Self::Held { .. })
    }

    /// Where the bytes come from, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Local(_) | Self::Arriving(_) | Self::Held { .. } => "local",
            Self::Transfer(j) => j.source_label(),
        }
    }

    /// Whether `range` can be served now or will be without asking anyone else (for a
    /// peer's ranged read: a blob read only by ranges may lack it).
    pub fn serves(&self, range: ByteRange) -> bool {
        match self {
            Self::Arriving(job) => job.serves(range.as_range()),
            _ => true,
        }
    }

    /// Starts fetching the ranges of a multi-range request at once, so they arrive
    /// concurrently while the response streams them in order: parts less than
    /// [`PREFETCH_GAP`] apart as one request, at most [`PREFETCH_MAX`] requests (the rest
    /// are fetched as the response reaches them).
    pub fn prefetch(&self, ranges: &[ByteRange]) {
        let Self::Transfer(job) = self else { return };
        for r in coalesce(ranges, PREFETCH_GAP).into_iter().take(PREFETCH_MAX) {
            if job.partial.written_from(r.start) < r.end {
                job.demand(r.start, r.end);
            }
        }
    }

    /// Streams `range` of the blob; an error ends the response abnormally. `ranged`: the
    /// client sent `Range` (a request without one reads the whole blob, which makes a
    /// transfer fetch all of it).
    pub fn stream(self, range: ByteRange, ranged: bool) -> BlobStream {
        if !ranged && let Self::Transfer(job) | Self::Arriving(job) = &self {
            job.go_whole();
        }
        if let Self::Local(file) = self {
            return stream_file(file, range);
        }
        let state = (self, range.start, range.end);
        let whole_blob = range.is_full();
        Box::pin(futures_util::stream::unfold(state, move |(source, pos, end)| async move {
            if pos >= end {
                return None;
            }
            let len = (end - pos).min(READ_CHUNK);
            let read = match &source {
                // `stream` sends a complete file through `stream_file`; this arm is the same read.
                Self::Local(file) => read_chunk(file, &BufferPool::default(), pos, len as usize).await,
                Self::Held { reader, .. } => match reader.read_at(pos, len).await {
                    Ok(bytes) if !bytes.is_empty() => Ok(bytes),
                    Ok(_) => Err(StoreError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                    Err(e) => Err(StoreError::Io(std::io::Error::other(e))),
                },
                Self::Transfer(job) | Self::Arriving(job) => {
                    let transfer = matches!(source, Self::Transfer(_));
                    let missing = job.partial.written_from(pos) == pos;
                    // A ranged reader asks on every read, so its window grows as it reads.
                    if transfer && (missing || !job.is_whole()) {
                        job.demand(pos, end);
                    }
                    let waiting = (transfer && missing).then(|| job.waiting());
                    // A response of the whole blob gets its last byte only once the blob
                    // verified; a range (a lazy puller's footer read), which no digest covers,
                    // as it arrives.
                    let read = if whole_blob {
                        job.partial.read_at(pos, len).await
                    } else {
                        job.partial.read_range_at(pos, len).await
                    };
                    // Counted as waiting for bytes only until they are written: a reader
                    // waiting for verification must not pause the fill it waits for.
                    drop(waiting);
                    match read {
                        // Bytes from a peer reach a mirror client, which keeps them (containerd
                        // resumes an aborted download from what it holds; a lazy puller caches
                        // its chunks), only verified. Peers verify for themselves: no wait.
                        Ok(bytes) if transfer && job.partial.is_untrusted(pos..pos + bytes.len() as u64) => {
                            // Only the whole blob's digest vouches for them: have it all.
                            job.go_whole();
                            job.partial.wait_verified().await.map(|()| bytes)
                        }
                        other => other,
                    }
                }
            };
            match read {
                Ok(bytes) => {
                    let next = pos + bytes.len() as u64;
                    Some((Ok(bytes), (source, next, end)))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), (source, end, end))),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(spans: &[Range<u64>]) -> IntervalSet {
        spans.iter().cloned().collect()
    }

    #[test]
    fn fill_claims_only_unheld_bytes() {
        let claims = [ClaimView { cursor: 10, reserved: 10, end: 50, ..Default::default() }];
        assert_eq!(plan_fill(100, &set(&[0..10, 60..70]), &claims), vec![50..60, 70..100]);
        assert_eq!(plan_fill(100, &set(&[0..100]), &[]), Vec::<Range<u64>>::new());
    }

    #[test]
    fn readers_near_a_claim_wait() {
        let claims = [ClaimView { cursor: 0, reserved: 0, end: 100, ..Default::default() }];
        assert_eq!(plan_demand(10, 100, &IntervalSet::new(), &claims, 16), Demand::Wait);
    }

    #[test]
    fn readers_far_ahead_steal_the_tail() {
        let claims = [ClaimView { cursor: 0, reserved: 0, end: 100, ..Default::default() }];
        assert_eq!(plan_demand(50, 100, &IntervalSet::new(), &claims, 16), Demand::Steal { index: 0, at: 50 });
    }

    #[test]
    fn a_steal_never_cuts_into_bytes_being_written() {
        let claims = [ClaimView { cursor: 0, reserved: 60, end: 100, ..Default::default() }];
        assert_eq!(plan_demand(50, 100, &IntervalSet::new(), &claims, 16), Demand::Steal { index: 0, at: 60 });
        let claims = [ClaimView { cursor: 0, reserved: 100, end: 100, ..Default::default() }];
        assert_eq!(plan_demand(50, 100, &IntervalSet::new(), &claims, 16), Demand::Wait);
    }

    #[test]
    fn nearby_parts_of_a_multi_range_request_are_one_fetch() {
        let r = |start, end| ByteRange { start, end, size: 1 << 30 };
        let parts = [r(500_000, 600_000), r(0, 10), r(100, 200), r(600_010, 700_000), r(1_000_000, 1_000_001)];
        assert_eq!(coalesce(&parts, 64 * 1024), vec![0..200, 500_000..700_000, 1_000_000..1_000_001]);
        assert_eq!(coalesce(&parts, 0).len(), 5);
    }

    #[test]
    fn readers_never_wait_for_a_background_fill() {
        let claims = [ClaimView { cursor: 0, reserved: 0, end: 100, background: true }];
        assert_eq!(plan_demand(5, 100, &IntervalSet::new(), &claims, 16), Demand::Steal { index: 0, at: 5 });
        // Bytes being written right now arrive without waiting for anyone.
        let claims = [ClaimView { cursor: 0, reserved: 10, end: 100, background: true }];
        assert_eq!(plan_demand(5, 100, &IntervalSet::new(), &claims, 16), Demand::Steal { index: 0, at: 10 });
    }

    #[test]
    fn unclaimed_bytes_get_a_claim_to_the_next_held_byte() {
        let claims = [ClaimView { cursor: 80, reserved: 80, end: 100, ..Default::default() }];
        assert_eq!(plan_demand(30, 100, &set(&[0..20]), &claims, 16), Demand::Claim(30..80));
        assert_eq!(plan_demand(5, 100, &set(&[0..20]), &claims, 16), Demand::Wait);
    }
}
