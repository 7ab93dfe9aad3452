//! The admin gRPC service on `<data-dir>/admin.sock`. The socket is created in a private
//! directory, made owner-only, then moved into place, so nobody else can ever connect to
//! it. A `Load` runs in a task that owns its progress stream; it stops at
//! shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use clyde_resolver::Resolver;
use clyde_store::{ImageEntry, PrunePlan, Store};
use futures_util::Stream;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::ops::{self, AdminError, ImageEvent, LoadUpdate};
use crate::pb;

/// Progress events buffered per load before the loader waits for the client.
const EVENT_BUFFER: usize = 256;

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Store(e) => Status::internal(e.to_string()),
            other => Status::invalid_argument(other.to_string()),
        }
    }
}

pub(crate) fn image_to_pb(e: ImageEntry) -> pb::Image {
    pb::Image {
        reference: e.reference,
        digest: e.digest.to_string(),
        kind: e.kind.as_str().to_string(),
        media_type: e.media_type,
        size: e.size,
        created: e.created,
        last_pulled: e.last_pulled,
        tagged: e.tagged,
        child: e.child,
        pinned: e.pinned,
    }
}

pub(crate) fn plan_to_pb(plan: PrunePlan, dry_run: bool) -> pb::PruneResponse {
    pb::PruneResponse {
        images: plan.images,
        tags: plan.tags,
        manifests: plan.manifests.iter().map(ToString::to_string).collect(),
        blobs: plan.blobs.iter().map(ToString::to_string).collect(),
        bytes: plan.bytes,
        dry_run,
        pinned: plan.pinned,
    }
}

pub(crate) fn event_to_pb(e: ImageEvent) -> pb::LoadEvent {
    use pb::load_event::Event;
    let event = match e.update {
        LoadUpdate::Resolved { digest, blobs } => Event::Resolved(pb::Resolved {
            digest: digest.to_string(),
            blobs: blobs.into_iter().map(|(d, size)| pb::Blob { digest: d.to_string(), size }).collect(),
        }),
        LoadUpdate::Progress { digest, done, size } => {
            Event::Progress(pb::Progress { digest: digest.to_string(), done, size })
        }
        LoadUpdate::Done(Ok(digest)) => Event::Done(pb::Done { error: String::new(), digest: digest.to_string() }),
        LoadUpdate::Done(Err(error)) => Event::Done(pb::Done { error, digest: String::new() }),
    };
    pb::LoadEvent { image: e.image, event: Some(event) }
}

struct AdminService {
    store: Store,
    resolver: Resolver,
    shutdown: watch::Receiver<bool>,
    tasks: TaskTracker,
}

type LoadStream = Pin<Box<dyn Stream<Item = Result<pb::LoadEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let images = ops::list(&self.store, &request.into_inner().patterns)?;
        Ok(Response::new(pb::ListResponse { images: images.into_iter().map(image_to_pb).collect() }))
    }

    async fn prune(&self, request: Request<pb::PruneRequest>) -> Result<Response<pb::PruneResponse>, Status> {
        let r = request.into_inner();
        let request = ops::PruneRequest {
            patterns: r.patterns,
            created_before: r.created_before,
            accessed_before: r.accessed_before,
            max_size: r.max_size,
            dry_run: r.dry_run,
            force: r.force,
            max_images: None,
        };
        let plan = ops::prune(&self.store, &request).await?;
        Ok(Response::new(plan_to_pb(plan, request.dry_run)))
    }

    type LoadStream = LoadStream;

    async fn load(&self, request: Request<pb::LoadRequest>) -> Result<Response<LoadStream>, Status> {
        let r = request.into_inner();
        let request = ops::LoadRequest {
            images: r.images,
            platforms: r.platforms,
            concurrency: r.concurrency as usize,
            pin: r.pin,
        };
        // Bad platforms are the caller's mistake: answer with an error, not a stream.
        for p in &request.platforms {
            clyde_resolver::Platform::parse(p).map_err(AdminError::from)?;
        }
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let resolver = self.resolver.clone();
        let mut shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                result = ops::load(&resolver, &request, tx) => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "load failed");
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let event = rx.recv().await?;
            Some((Ok(event_to_pb(event)), rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Binds the admin socket in `data_dir`, owner-only. The socket is made in a private
/// (`0700`) directory, made `0600`, then moved into place, so at no moment can another user
/// connect to it. A socket file left by an agent that died is replaced (the store's lock
/// already proved no other agent uses this data dir).
pub fn bind(data_dir: &Path) -> std::io::Result<(UnixListener, PathBuf)> {
    use std::os::unix::fs::DirBuilderExt;
    let path = crate::socket_path(data_dir);
    let private = data_dir.join(format!(".admin.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    // `mode` is filtered by the umask: make sure of it.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
    let staging = private.join(crate::SOCKET_NAME);
    let bound = UnixListener::bind(&staging).and_then(|listener| {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staging, &path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    Ok((bound?, path))
}

/// Serves the admin API on `listener` until `shutdown`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    store: Store,
    resolver: Resolver,
    shutdown: watch::Receiver<bool>,
) {
    let tasks = TaskTracker::new();
    let service = AdminService { store, resolver, shutdown: shutdown.clone(), tasks: tasks.clone() };
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(stream, _)| stream);
        Some((conn, listener))
    });
    let mut stop = shutdown.clone();
    let result = tonic::transport::Server::builder()
        .add_service(pb::admin_server::AdminServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "admin API stopped");
    }
    tasks.close();
    tasks.wait().await;
    let _ = std::fs::remove_file(&path);
}
