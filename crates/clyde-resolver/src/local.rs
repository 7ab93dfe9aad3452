//! Content another holder on this node has: containerd's content store. The resolver asks
//! it after its own store, for peers (the peer server) and for local clients alike.

use std::sync::Arc;

use bytes::Bytes;
use clyde_store::BlobFile;
use clyde_types::Digest;

use crate::BoxFuture;

/// Reads parts of a blob held elsewhere on this node.
pub trait BlobReader: Send + Sync {
    /// `len` bytes at `offset` (fewer only at the end of the blob).
    fn read_at(&self, offset: u64, len: u64) -> BoxFuture<Result<Bytes, String>>;
}

/// A blob another local holder has, opened for one reader.
pub enum LocalBlob {
    /// A file that can be read directly (containerd's content directory is mounted).
    File(BlobFile),
    /// Bytes read through the holder's API.
    Reader { size: u64, reader: Arc<dyn BlobReader> },
}

/// Another holder of content on this node.
pub trait LocalContent: Send + Sync {
    /// The size of a blob it holds.
    fn blob_size(&self, digest: &Digest) -> Option<u64>;
    /// Opens a blob it holds.
    fn open_blob(&self, digest: Digest) -> BoxFuture<Option<LocalBlob>>;
    /// Where a tag (`registry/repository:tag`) points.
    fn tag(&self, tag: &str) -> Option<LocalTag>;
    /// The registries the holder says a blob came from (none known: empty).
    fn sources(&self, _digest: &Digest) -> Vec<String> {
        Vec::new()
    }
}

/// A tag another holder on this node knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalTag {
    /// The manifest it points at.
    pub digest: Digest,
    pub media_type: String,
    /// When the holder last set it (a pull resolved it; Unix seconds).
    pub updated_at: u64,
}
