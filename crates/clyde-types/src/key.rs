//! What agents advertise to each other: the digests they hold, and the tags they have cached.

use std::fmt;

use crate::Digest;

/// Multihash code of sha2-256, and its digest length.
const SHA2_256: [u8; 2] = [0x12, 0x20];

/// How a cached tag is named, in the store and in the DHT alike: `registry/repository:tag`.
pub fn tag_name(registry: &str, repository: &str, tag: &str) -> String {
    format!("{registry}/{repository}:{tag}")
}

/// A key in the content-routing table: a digest (a blob or manifest) or a cached tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ContentKey {
    Digest(Digest),
    /// `registry/repository:tag`.
    Tag(String),
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
}
