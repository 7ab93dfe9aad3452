//! The command line's side of the admin API: connects to the agent's socket, if an agent
//! is there, and turns answers back into the types [`crate::ops`] returns offline.

use std::path::{Path, PathBuf};

use clyde_store::{ImageEntry, ManifestKind, PrunePlan};
use clyde_types::Digest;
use futures_util::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::ops::{ImageEvent, LoadRequest, LoadUpdate, PruneRequest};
use crate::pb;

/// Why the agent could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the agent refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("cannot talk to the agent's admin socket: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot open the agent's admin socket: {0}; run the command as the agent's user")]
    Socket(std::io::Error),
    #[error("the agent answered with a malformed {0}")]
    Malformed(&'static str),
}

/// A connection to a running agent's admin API.
pub struct AdminClient {
    inner: pb::admin_client::AdminClient<Channel>,
}

impl AdminClient {
    /// Connects to the socket in `data_dir`; `None` when no agent listens there (no socket,
    /// or one left by an agent that is gone).
    pub async fn connect(data_dir: &Path) -> Result<Option<Self>, ClientError> {
        let path: PathBuf = crate::socket_path(data_dir);
        match tokio::net::UnixStream::connect(&path).await {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                return Ok(None);
            }
            Err(e) => return Err(ClientError::Socket(e)),
        }
        // The URI is a placeholder: the connector always dials the socket.
        let channel = Endpoint::from_static("http://clyde-admin.invalid")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await?;
        Ok(Some(Self { inner: pb::admin_client::AdminClient::new(channel) }))
    }

    /// The agent's cached images matching any of `patterns`.
    pub async fn list(&mut self, patterns: &[String]) -> Result<Vec<ImageEntry>, ClientError> {
        let response = self.inner.list(pb::ListRequest { patterns: patterns.to_vec() }).await?.into_inner();
        response.images.into_iter().map(image_from_pb).collect()
    }

    /// Prunes (or plans a prune) in the agent.
    pub async fn prune(&mut self, request: &PruneRequest) -> Result<PrunePlan, ClientError> {
        let r = self
            .inner
            .prune(pb::PruneRequest {
                patterns: request.patterns.clone(),
                created_before: request.created_before,
                accessed_before: request.accessed_before,
                max_size: request.max_size,
                dry_run: request.dry_run,
                force: request.force,
            })
            .await?
            .into_inner();
        let digests = |v: Vec<String>| -> Result<Vec<Digest>, ClientError> {
            v.iter().map(|d| d.parse().map_err(|_| ClientError::Malformed("digest"))).collect()
        };
        Ok(PrunePlan {
            images: r.images,
            tags: r.tags,
            manifests: digests(r.manifests)?,
            blobs: digests(r.blobs)?,
            bytes: r.bytes,
            pinned: r.pinned,
        })
    }

    /// Loads images in the agent; the stream reports progress until every image is done.
    pub async fn load(
        &mut self,
        request: &LoadRequest,
    ) -> Result<impl Stream<Item = Result<ImageEvent, ClientError>> + use<>, ClientError> {
        let stream = self
            .inner
            .load(pb::LoadRequest {
                images: request.images.clone(),
                platforms: request.platforms.clone(),
                concurrency: request.concurrency as u32,
                pin: request.pin,
            })
            .await?
            .into_inner();
        Ok(stream.map(|event| event_from_pb(event?)))
    }
}

fn digest(s: &str) -> Result<Digest, ClientError> {
    s.parse().map_err(|_| ClientError::Malformed("digest"))
}

fn image_from_pb(i: pb::Image) -> Result<ImageEntry, ClientError> {
    let kind = match i.kind.as_str() {
        "index" => ManifestKind::Index,
        "image" => ManifestKind::Image,
        _ => return Err(ClientError::Malformed("image kind")),
    };
    Ok(ImageEntry {
        digest: digest(&i.digest)?,
        reference: i.reference,
        kind,
        media_type: i.media_type,
        size: i.size,
        created: i.created,
        last_pulled: i.last_pulled,
        tagged: i.tagged,
        child: i.child,
        pinned: i.pinned,
    })
}

fn event_from_pb(e: pb::LoadEvent) -> Result<ImageEvent, ClientError> {
    use pb::load_event::Event;
    let update = match e.event.ok_or(ClientError::Malformed("load event"))? {
        Event::Resolved(r) => LoadUpdate::Resolved {
            digest: digest(&r.digest)?,
            blobs: r.blobs.iter().map(|b| Ok((digest(&b.digest)?, b.size))).collect::<Result<_, ClientError>>()?,
        },
        Event::Progress(p) => LoadUpdate::Progress { digest: digest(&p.digest)?, done: p.done, size: p.size },
        Event::Done(d) if d.error.is_empty() => LoadUpdate::Done(Ok(digest(&d.digest)?)),
        Event::Done(d) => LoadUpdate::Done(Err(d.error)),
    };
    Ok(ImageEvent { image: e.image, update })
}
