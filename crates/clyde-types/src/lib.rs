//! Clyde's domain types: pure values and parsers, no I/O.
//!
//! Everything that reaches Clyde from the network (paths, references, digests, `Range`
//! headers) is parsed here into a type that can only hold a valid value, so the adapters
//! never pass raw strings to the store or the upstream client.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::single_range_in_vec_init))]

pub mod digest;
pub mod image;
pub mod intervals;
pub mod key;
pub mod media;
pub mod membership;
pub mod piece;
pub mod range;
pub mod reference;
pub mod size;

pub use digest::{Digest, DigestError, DigestVerifier};
pub use image::{ImageRef, ImageRefError};
pub use intervals::IntervalSet;
pub use key::{BlobState, ContentKey, INTENT_EPOCH_SECS, intent_epoch, intent_keys};
pub use membership::{AuthError, ClusterSecret, Membership, SecretError};
pub use piece::{DEFAULT_PIECE_SIZE, PieceHash, PieceHasher, PieceHashes, PieceLayout, PieceListError, hash_piece};
pub use range::{ByteRange, MAX_RANGES, RangeError, RangeRequest};
pub use reference::{ApiPath, PathError, Reference, Registry, Repository, Resource};
pub use size::{SizeError, parse_size};
