//! containerd's content store as a source: what containerd on this node holds (in one
//! namespace) is advertised to peers and served to them, with `Range`, like Clyde's own
//! store. So an image containerd pulled without the mirror, or whose blobs Clyde evicted, is
//! still shared.
//!
//! Message flow: [`Containerd::spawn`] starts a task that owns the connection. It lists
//! containerd's content and images, subscribes to its events, and lists again after image
//! and content events (and every `relist_interval`, for content no event names). Each list
//! is compared with the last: what appeared becomes [`StoreEvent::Holding`], what went
//! [`StoreEvent::Dropped`] (the advertiser follows these). When the connection fails
//! (containerd restarts), the task reconnects and lists again; meanwhile what it last saw
//! stays known. Readers go to the content directory when it is mounted, else to gRPC `Read`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use clyde_resolver::{BlobReader, BoxFuture, LocalBlob, LocalContent, LocalTag};
use clyde_store::{BlobFile, StoreEvent};
use clyde_types::key::tag_name;
use clyde_types::{ContentKey, Digest, ImageRef, Reference};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{ListContentRequest, ListImagesRequest, ReadContentRequest, SubscribeRequest};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

/// How Clyde reaches containerd.
#[derive(Clone, Debug)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The namespace whose content is shared (`k8s.io` for Kubernetes).
    pub namespace: String,
    /// containerd's content directory (`.../io.containerd.content.v1.content`) when this
    /// process can read it; else blobs are read over gRPC.
    pub content_dir: Option<PathBuf>,
    /// Lists again this often even without events (content committed by a pull that has
    /// not created its image yet).
    pub relist_interval: Duration,
    /// Waits this long between connection attempts.
    pub reconnect_interval: Duration,
}

/// Why containerd could not be asked.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Call(#[from] tonic::Status),
}

/// The label prefix containerd marks pulled content with, followed by the registry's name.
const SOURCE_LABEL: &str = "containerd.io/distribution.source.";

/// What containerd holds, as last listed.
#[derive(Default)]
struct Held {
    /// Blobs by digest, with their size.
    blobs: HashMap<Digest, u64>,
    /// Tags (`registry/repository:tag`) of images, with the target's digest and media type.
    tags: HashMap<String, LocalTag>,
    /// The registries a blob was pulled from, as containerd labels it
    /// (`containerd.io/distribution.source.<registry>`).
    sources: HashMap<Digest, Vec<String>>,
}

struct Inner {
    config: ContainerdConfig,
    held: RwLock<Held>,
    channel: RwLock<Option<Channel>>,
    events: broadcast::Sender<StoreEvent>,
}

/// A handle on containerd's content; cheap to clone.
#[derive(Clone)]
pub struct Containerd {
    inner: Arc<Inner>,
}

/// Pause after an event before listing, so a burst of events costs one list.
const SETTLE: Duration = Duration::from_millis(100);
/// Largest gRPC read asked for at once.
const READ_CHUNK: u64 = 1 << 20;

fn request<T>(namespace: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Ok(value) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", value);
    }
    req
}

impl Containerd {
    /// Starts following containerd; the task stops at `shutdown` and is tracked by `tasks`.
    pub fn spawn(config: ContainerdConfig, tasks: &TaskTracker, shutdown: watch::Receiver<bool>) -> Self {
        let handle = Self {
            inner: Arc::new(Inner {
                config,
                held: RwLock::new(Held::default()),
                channel: RwLock::new(None),
                events: broadcast::channel(4096).0,
            }),
        };
        tasks.spawn(handle.clone().follow(shutdown));
        handle
    }

    fn held(&self) -> std::sync::RwLockReadGuard<'_, Held> {
        self.inner.held.read().unwrap_or_else(|p| p.into_inner())
    }

    fn channel(&self) -> Option<Channel> {
        self.inner.channel.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Follows changes in what containerd holds.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    /// Everything containerd holds, as keys to advertise.
    pub fn keys(&self) -> Vec<ContentKey> {
        let held = self.held();
        let blobs = held.blobs.keys().map(|d| ContentKey::Digest(*d));
        blobs.chain(held.tags.keys().map(|t| ContentKey::Tag(t.clone()))).collect()
    }

    async fn follow(self, mut shutdown: watch::Receiver<bool>) {
        let config = &self.inner.config;
        // Failed attempts since containerd was last followed: the first is a warning, the
        // next ones are quiet and further apart.
        let mut failures = 0u32;
        loop {
            let mut following = false;
            let result = tokio::select! {
                r = self.session(&mut following) => r,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            *self.inner.channel.write().unwrap_or_else(|p| p.into_inner()) = None;
            if following {
                failures = 0;
            }
            match result {
                Err(Error::Connect(e)) if failures == 0 => {
                    tracing::warn!(socket = %config.socket.display(), error = %e, "containerd is not reachable; running without its content, and retrying");
                }
                Err(e) if failures == 0 => tracing::warn!(error = %e, "lost containerd; reconnecting"),
                Err(e) => tracing::debug!(error = %e, failures, "containerd still failing"),
                Ok(()) => {}
            }
            failures = failures.saturating_add(1);
            // 2 s, 4 s, ... up to 32 times the interval while containerd keeps failing.
            let wait = config.reconnect_interval * 2u32.saturating_pow(failures.min(6) - 1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One connection: subscribe, list, then list again after events until it fails.
    async fn session(&self, following: &mut bool) -> Result<(), Error> {
        let config = &self.inner.config;
        let channel = containerd_client::connect(&config.socket).await?;
        // containerd answers a subscription only with its first event, so the subscription
        // runs in its own task (started before the first list, so nothing in between is
        // missed) and hands events over; the task ends with this session.
        let (events_tx, mut events) = mpsc::channel::<Result<String, tonic::Status>>(1024);
        let _subscription = AbortOnDrop(tokio::spawn(subscribe(channel.clone(), config.namespace.clone(), events_tx)));
        *self.inner.channel.write().unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
        self.relist(&channel).await?;
        *following = true;
        let held = (self.held().blobs.len(), self.held().tags.len());
        tracing::info!(namespace = %config.namespace, blobs = held.0, tags = held.1, "following containerd's content");
        let mut tick = tokio::time::interval(config.relist_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(topic) => tracing::debug!(topic = %topic?, "containerd event"),
                    None => return Err(Error::Call(tonic::Status::unavailable("containerd closed the event stream"))),
                },
                _ = tick.tick() => {}
            }
            // A burst of events (a pull commits many blobs) costs one list.
            tokio::time::sleep(SETTLE).await;
            while let Ok(event) = events.try_recv() {
                event?;
            }
            self.relist(&channel).await?;
            tick.reset();
        }
    }

    /// Lists containerd's content and images, and announces the difference.
    async fn relist(&self, channel: &Channel) -> Result<(), Error> {
        let ns = &self.inner.config.namespace;
        let mut blobs = HashMap::new();
        let mut sources = HashMap::new();
        let mut stream = ContentClient::new(channel.clone())
            .list(request(ns, ListContentRequest { filters: Vec::new() }))
            .await?
            .into_inner();
        while let Some(page) = stream.message().await? {
            for info in page.info {
                if let (Ok(d), Ok(size)) = (info.digest.parse::<Digest>(), u64::try_from(info.size)) {
                    blobs.insert(d, size);
                    let registries: Vec<String> =
                        info.labels.keys().filter_map(|k| k.strip_prefix(SOURCE_LABEL)).map(str::to_string).collect();
                    if !registries.is_empty() {
                        sources.insert(d, registries);
                    }
                }
            }
        }
        let images = ImagesClient::new(channel.clone())
            .list(request(ns, ListImagesRequest { filters: Vec::new() }))
            .await?
            .into_inner()
            .images;
        let mut tags = HashMap::new();
        for image in images {
            let Some(target) = image.target else { continue };
            let Ok(digest) = target.digest.parse::<Digest>() else { continue };
            // Only images whose manifest containerd holds can be served.
            if !blobs.contains_key(&digest) {
                continue;
            }
            // CRI also names images by their ID (`sha256:...`): not a tag anyone pulls.
            if image.name.starts_with("sha256:") {
                continue;
            }
            if let Ok(r) = ImageRef::parse(&image.name)
                && let Reference::Tag(tag) = &r.reference
            {
                let updated_at = image.updated_at.as_ref().map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0));
                let local = LocalTag { digest, media_type: target.media_type, updated_at };
                tags.insert(tag_name(r.registry.as_str(), r.repository.as_str(), tag), local);
            }
        }
        let mut held = self.inner.held.write().unwrap_or_else(|p| p.into_inner());
        let changes = diff(&held, &blobs, &tags);
        *held = Held { blobs, tags, sources };
        drop(held);
        for event in changes {
            let _ = self.inner.events.send(event);
        }
        Ok(())
    }
}

/// Aborts a task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Forwards the topics of containerd's events in `namespace` (or the error that ended the
/// stream) to `events`.
async fn subscribe(channel: Channel, namespace: String, events: mpsc::Sender<Result<String, tonic::Status>>) {
    let filters = vec!["topic~=\"^/images/\"".to_string(), "topic~=\"^/content/\"".to_string()];
    let mut stream = match EventsClient::new(channel).subscribe(SubscribeRequest { filters }).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            let _ = events.send(Err(e)).await;
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(e)) if e.namespace == namespace => {
                if events.send(Ok(e.topic)).await.is_err() {
                    return;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                let _ = events.send(Err(e)).await;
                return;
            }
        }
    }
}

/// What changed between two lists.
fn diff(old: &Held, blobs: &HashMap<Digest, u64>, tags: &HashMap<String, LocalTag>) -> Vec<StoreEvent> {
    let mut out = Vec::new();
    let old_blobs: HashSet<&Digest> = old.blobs.keys().collect();
    let new_blobs: HashSet<&Digest> = blobs.keys().collect();
    out.extend(new_blobs.difference(&old_blobs).map(|d| StoreEvent::Holding(ContentKey::Digest(**d))));
    out.extend(old_blobs.difference(&new_blobs).map(|d| StoreEvent::Dropped(ContentKey::Digest(**d))));
    for (tag, target) in tags {
        if old.tags.get(tag) != Some(target) {
            out.push(StoreEvent::Holding(ContentKey::Tag(tag.clone())));
        }
    }
    for tag in old.tags.keys().filter(|t| !tags.contains_key(*t)) {
        out.push(StoreEvent::Dropped(ContentKey::Tag(tag.clone())));
    }
    out
}

impl clyde_p2p::KeyFeed for Containerd {
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        Containerd::subscribe(self)
    }

    fn held_keys(&self) -> BoxFuture<Result<Vec<ContentKey>, String>> {
        let keys = self.keys();
        Box::pin(async move { Ok(keys) })
    }
}

/// Reads a blob over gRPC `Read`. A reader reads in order, so one `Read` call streams from
/// its offset to the end and consecutive reads take from it; a read elsewhere starts another.
struct GrpcReader(Arc<GrpcRead>);

struct GrpcRead {
    channel: Channel,
    namespace: String,
    digest: Digest,
    open: tokio::sync::Mutex<Option<OpenRead>>,
}

/// A `Read` call in progress: the next byte it yields is at `position`.
struct OpenRead {
    position: u64,
    stream: tonic::Streaming<containerd_client::services::v1::ReadContentResponse>,
    leftover: Bytes,
}

impl GrpcRead {
    async fn start(&self, offset: u64) -> Result<OpenRead, String> {
        // Size 0: to the end of the blob.
        let message = ReadContentRequest { digest: self.digest.to_string(), offset: offset as i64, size: 0 };
        let stream = ContentClient::new(self.channel.clone())
            .read(request(&self.namespace, message))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        Ok(OpenRead { position: offset, stream, leftover: Bytes::new() })
    }
}

impl BlobReader for GrpcReader {
    fn read_at(&self, offset: u64, len: u64) -> BoxFuture<Result<Bytes, String>> {
        let reader = self.0.clone();
        Box::pin(async move {
            let mut open = reader.open.lock().await;
            let read = match open.take() {
                Some(r) if r.position == offset => r,
                _ => reader.start(offset).await?,
            };
            let OpenRead { mut position, mut stream, mut leftover } = read;
            let want = len.min(READ_CHUNK) as usize;
            let mut out = bytes::BytesMut::with_capacity(want);
            while out.len() < want {
                if leftover.is_empty() {
                    match stream.message().await.map_err(|e| e.to_string())? {
                        Some(part) => leftover = Bytes::from(part.data),
                        None => break,
                    }
                    continue;
                }
                let take = leftover.len().min(want - out.len());
                out.extend_from_slice(&leftover.split_to(take));
            }
            position += out.len() as u64;
            *open = Some(OpenRead { position, stream, leftover });
            Ok(out.freeze())
        })
    }
}

impl LocalContent for Containerd {
    fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.held().blobs.get(digest).copied()
    }

    fn open_blob(&self, digest: Digest) -> BoxFuture<Option<LocalBlob>> {
        let size = self.blob_size(&digest);
        let content_dir = self.inner.config.content_dir.clone();
        let channel = self.channel();
        let namespace = self.inner.config.namespace.clone();
        Box::pin(async move {
            let size = size?;
            if let Some(dir) = content_dir {
                let path = dir.join("blobs/sha256").join(digest.hex());
                match tokio::task::spawn_blocking(move || BlobFile::open_path(&path)).await {
                    Ok(Ok(file)) if file.size() == size => return Some(LocalBlob::File(file)),
                    _ => {}
                }
            }
            let read = GrpcRead { channel: channel?, namespace, digest, open: tokio::sync::Mutex::new(None) };
            let reader = GrpcReader(Arc::new(read));
            Some(LocalBlob::Reader { size, reader: Arc::new(reader) })
        })
    }

    fn tag(&self, tag: &str) -> Option<LocalTag> {
        self.held().tags.get(tag).cloned()
    }

    fn sources(&self, digest: &Digest) -> Vec<String> {
        self.held().sources.get(digest).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_announced_as_its_difference_with_the_last() {
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        let old = Held {
            blobs: HashMap::from([(a, 1), (b, 1)]),
            tags: HashMap::from([
                ("r/x:1".to_string(), LocalTag { digest: a, media_type: "m".to_string(), updated_at: 1 }),
                ("r/x:2".to_string(), LocalTag { digest: b, media_type: "m".to_string(), updated_at: 1 }),
            ]),
            sources: HashMap::new(),
        };
        let blobs = HashMap::from([(b, 1), (c, 1)]);
        let tags =
            HashMap::from([("r/x:2".to_string(), LocalTag { digest: c, media_type: "m".to_string(), updated_at: 1 })]);
        let mut events: Vec<String> = diff(&old, &blobs, &tags).iter().map(|e| format!("{e:?}")).collect();
        events.sort();
        let mut expected: Vec<String> = [
            StoreEvent::Holding(ContentKey::Digest(c)),
            StoreEvent::Dropped(ContentKey::Digest(a)),
            StoreEvent::Holding(ContentKey::Tag("r/x:2".into())),
            StoreEvent::Dropped(ContentKey::Tag("r/x:1".into())),
        ]
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
        expected.sort();
        assert_eq!(events, expected);
    }
}
