//! The admin side of Clyde: list, prune and load, run either by the agent for a client on
//! its admin socket (`<data-dir>/admin.sock`, gRPC, owner-only) or by the command line
//! directly on the data dir when no agent runs (the store's lock keeps the two apart).
//!
//! Message flow: `clyde list|prune|load` → [`client::AdminClient`] → socket → [`server`]
//! → [`ops`] → store / resolver. Offline, the command calls [`ops`] itself.

pub mod client;
pub mod ops;
pub mod server;

/// The generated gRPC types and services of `proto/clyde/admin/v1/admin.proto`.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod pb {
    tonic::include_proto!("clyde.admin.v1");
}

pub use ops::{AdminError, ImageEvent, LoadRequest, LoadUpdate, PruneRequest};

/// The admin socket's name in the data dir.
pub const SOCKET_NAME: &str = "admin.sock";

/// Where the admin socket of the agent using `data_dir` is.
pub fn socket_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join(SOCKET_NAME)
}
