//! Content digests (`sha256:<64 hex>`), the only algorithm Clyde stores.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A sha256 content digest; the only way to build one is to parse or compute it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest Clyde accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm prefix; expected sha256:<64 lowercase hex>")]
    MissingAlgorithm(String),
    #[error("digest algorithm {0:?} is not supported; only sha256 is")]
    UnsupportedAlgorithm(String),
    #[error("digest hex must be 64 lowercase hex characters")]
    BadHex,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The raw 32 bytes (a sha256 multihash body).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex characters, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Builds a digest from 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm(truncate(s)));
        };
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(truncate(algorithm)));
        }
        if encoded.len() != 64 || !encoded.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::BadHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(encoded, &mut out).map_err(|_| DigestError::BadHex)?;
        Ok(Self(out))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 over a stream of bytes, checked against an expected digest.
pub struct DigestVerifier {
    expected: Digest,
    hasher: Sha256,
    len: u64,
}

impl DigestVerifier {
    /// Starts verifying bytes that should hash to `expected`.
    pub fn new(expected: Digest) -> Self {
        Self { expected, hasher: Sha256::new(), len: 0 }
    }

    /// Feeds the next bytes, in order.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// How many bytes were fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of what was fed, and whether it is the expected one.
    pub fn finish(self) -> (Digest, bool) {
        let got = Digest(self.hasher.finalize().into());
        (got, got == self.expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_round_trip() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn rejects_uppercase_short_and_other_algorithms() {
        assert_eq!(EMPTY.to_uppercase().replace("SHA256", "sha256").parse::<Digest>(), Err(DigestError::BadHex));
        assert_eq!("sha256:abc".parse::<Digest>(), Err(DigestError::BadHex));
        assert!(matches!("sha512:00".parse::<Digest>(), Err(DigestError::UnsupportedAlgorithm(_))));
        assert!(matches!("e3b0".parse::<Digest>(), Err(DigestError::MissingAlgorithm(_))));
        assert!("sha256:../../../../etc/passwd".parse::<Digest>().is_err());
    }

    #[test]
    fn verifier_detects_mismatch() {
        let mut v = DigestVerifier::new(Digest::of(b"hello"));
        v.update(b"hel");
        v.update(b"lo");
        assert!(v.finish().1);
        let mut v = DigestVerifier::new(Digest::of(b"hello"));
        v.update(b"hellO");
        assert!(!v.finish().1);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,100}") {
            let _ = s.parse::<Digest>();
        }
    }
}
