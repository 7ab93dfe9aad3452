//! What agents advertise to each other: the digests they hold, and the tags they have cached.

use std::fmt;

use crate::Digest;

/// Multihash code of sha2-256, and its digest length.
const SHA2_256: [u8; 2] = [0x12, 0x20];

/// How a cached tag is named, in the store and in the DHT alike: `registry/repository:tag`.
pub fn tag_name(registry: &str, repository: &str, tag: &str) -> String {
    format!("{registry}/{repository}:{tag}")
}

/// A key in the content-routing table: a digest (a blob or manifest), a cached tag, a
/// node's wish to fetch a blob nobody holds (an intent, the ballot of the fetcher election),
/// or one of the well-known keys of minimum copies.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ContentKey {
    Digest(Digest),
    /// `registry/repository:tag`.
    Tag(String),
    /// "I want this blob and nobody offered it", in one epoch of [`INTENT_EPOCH_SECS`]:
    /// provider records outlive a withdrawal, so an intent's key changes with time and a
    /// reader looks at the current and the previous epoch only.
    Intent {
        digest: Digest,
        epoch: u64,
    },
    /// "I keep minimum copies of pinned images": every such node provides it, so each can
    /// rank all of them.
    Keeper,
    /// "I hold pinned images": the nodes to ask which ones.
    Pins,
}

/// Length of an intent epoch: how long a stale intent record can mislead an election.
pub const INTENT_EPOCH_SECS: u64 = 60;

/// The epoch a node announces its intents in at `unix_secs`.
pub fn intent_epoch(unix_secs: u64) -> u64 {
    unix_secs / INTENT_EPOCH_SECS
}

/// The intent keys a node reads at `unix_secs`: this epoch's, the previous one's, and the
/// next one's (a node whose clock runs a little ahead announces there).
pub fn intent_keys(digest: Digest, unix_secs: u64) -> [ContentKey; 3] {
    let epoch = intent_epoch(unix_secs);
    [epoch, epoch.saturating_sub(1), epoch + 1].map(|epoch| ContentKey::Intent { digest, epoch })
}

/// What a peer server holds of a blob, as it tells other agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// Whole and verified.
    Complete,
    /// Still being received.
    Arriving,
}

impl BlobState {
    /// The header value (`complete`, `arriving`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Arriving => "arriving",
        }
    }

    /// Parses a header value; anything else is `None`.
    pub fn parse(value: &[u8]) -> Option<Self> {
        match value {
            b"complete" => Some(Self::Complete),
            b"arriving" => Some(Self::Arriving),
            _ => None,
        }
    }
}

impl ContentKey {
    /// The tag key of `registry/repository:tag`.
    pub fn tag(registry: &str, repository: &str, tag: &str) -> Self {
        Self::Tag(tag_name(registry, repository, tag))
    }

    /// The routing key: the digest as a sha2-256 multihash, or the multihash of a tag's
    /// name with a prefix (so a tag never collides with a blob that happens to hold its name).
    pub fn routing_key(&self) -> Vec<u8> {
        let hash = match self {
            Self::Digest(d) => *d,
            Self::Tag(t) => Digest::of(format!("clyde-tag:{t}").as_bytes()),
            Self::Intent { digest, epoch } => Digest::of(format!("clyde-intent:{epoch}:{digest}").as_bytes()),
            Self::Keeper => Digest::of(b"clyde-keeper"),
            Self::Pins => Digest::of(b"clyde-pins"),
        };
        let mut key = SHA2_256.to_vec();
        key.extend_from_slice(hash.as_bytes());
        key
    }
}

impl fmt::Display for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Digest(d) => write!(f, "{d}"),
            Self::Tag(t) => write!(f, "tag {t}"),
            Self::Intent { digest, epoch } => write!(f, "intent {digest} (epoch {epoch})"),
            Self::Keeper => write!(f, "copy keepers"),
            Self::Pins => write!(f, "holders of pinned images"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_key_is_its_multihash() {
        let d = Digest::of(b"x");
        let key = ContentKey::Digest(d).routing_key();
        assert_eq!(&key[..2], &[0x12, 0x20]);
        assert_eq!(&key[2..], d.as_bytes());
    }

    #[test]
    fn tag_keys_differ_from_the_digest_of_their_name() {
        let name = "r.example/app:v1";
        let tag = ContentKey::Tag(name.into()).routing_key();
        assert_ne!(tag, ContentKey::Digest(Digest::of(name.as_bytes())).routing_key());
        assert_eq!(tag, ContentKey::tag("r.example", "app", "v1").routing_key());
    }

    #[test]
    fn intent_keys_differ_from_the_digest_and_by_epoch() {
        let d = Digest::of(b"layer");
        let [now, before, next] = intent_keys(d, 10 * INTENT_EPOCH_SECS + 5);
        assert_eq!(now, ContentKey::Intent { digest: d, epoch: 10 });
        assert_eq!(before, ContentKey::Intent { digest: d, epoch: 9 });
        assert_eq!(next, ContentKey::Intent { digest: d, epoch: 11 });
        assert_ne!(now.routing_key(), before.routing_key());
        assert_ne!(now.routing_key(), ContentKey::Digest(d).routing_key());
        // A node that announced late in an epoch is still read early in the next one.
        assert!(intent_keys(d, 11 * INTENT_EPOCH_SECS).contains(&now));
    }

    #[test]
    fn well_known_keys_are_distinct_from_each_other_and_from_tags() {
        let keys = [ContentKey::Keeper, ContentKey::Pins, ContentKey::Tag("clyde-pins".into())];
        let routing: std::collections::HashSet<Vec<u8>> = keys.iter().map(ContentKey::routing_key).collect();
        assert_eq!(routing.len(), keys.len());
    }

    #[test]
    fn blob_states_round_trip_and_nothing_else_parses() {
        for state in [BlobState::Complete, BlobState::Arriving] {
            assert_eq!(BlobState::parse(state.as_str().as_bytes()), Some(state));
        }
        assert_eq!(BlobState::parse(b"Complete"), None);
        assert_eq!(BlobState::parse(b""), None);
    }
}
