//! Cluster membership: the shared secret, the keys derived from it, and the signature that
//! proves a request to a peer server comes from a member.
//!
//! One secret yields two independent keys: the pre-shared key of the libp2p private network
//! (a non-member cannot finish a handshake) and the key that signs peer-server requests
//! (a non-member gets `401` and not one content byte). During a rotation an agent holds
//! several secrets: it uses the first and accepts any.

use sha2::{Digest as _, Sha256};

/// Shortest secret accepted, in characters.
pub const MIN_SECRET_CHARS: usize = 32;
/// The scheme of the `Authorization` header a member sends to a peer server.
pub const AUTH_SCHEME: &str = "Clyde-Member";
/// How far a signed request's time may be from the server's clock, either way (seconds).
pub const MAX_SKEW_SECS: u64 = 300;
/// How the placeholder in `deploy/kustomize/cluster-secret` begins: refused, so that nobody
/// runs a cluster on a secret published with the manifests.
const PLACEHOLDER: &str = "REPLACE-ME";
/// Longest `Authorization` value examined; anything longer is refused unread.
const MAX_AUTH_LEN: usize = 256;

/// Why a secret was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the cluster secret is not UTF-8 text")]
    NotText,
    #[error(
        "the cluster secret has {0} characters; it needs at least {MIN_SECRET_CHARS} (make one with `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort(usize),
    #[error(
        "the cluster secret is the placeholder shipped with the manifests; make one with `head -c 32 /dev/urandom | base64`"
    )]
    Placeholder,
}

/// Why a peer-server request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no member credentials")]
    Missing,
    #[error("malformed member credentials")]
    Malformed,
    #[error("the request's time is more than {MAX_SKEW_SECS} s from this node's clock")]
    Stale,
    #[error("the request is not signed with this cluster's secret")]
    BadSignature,
}

/// One cluster secret and the keys derived from it.
#[derive(Clone)]
pub struct ClusterSecret {
    psk: [u8; 32],
    request_key: [u8; 32],
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({})", self.fingerprint())
    }
}

impl ClusterSecret {
    /// The secret in a file's text: one trailing newline is not part of it.
    pub fn parse(text: &[u8]) -> Result<Self, SecretError> {
        let text = std::str::from_utf8(text).map_err(|_| SecretError::NotText)?;
        let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
        if text.starts_with(PLACEHOLDER) {
            return Err(SecretError::Placeholder);
        }
        let chars = text.chars().count();
        if chars < MIN_SECRET_CHARS {
            return Err(SecretError::TooShort(chars));
        }
        Ok(Self {
            psk: hmac_sha256(text.as_bytes(), &[b"clyde/pnet/v1"]),
            request_key: hmac_sha256(text.as_bytes(), &[b"clyde/peer-request/v1"]),
        })
    }

    /// The libp2p private network's pre-shared key.
    pub fn psk(&self) -> [u8; 32] {
        self.psk
    }

    /// A short name of the secret for logs, which reveals nothing of it.
    pub fn fingerprint(&self) -> String {
        hex::encode(&hmac_sha256(&self.psk, &[b"clyde/fingerprint"])[..6])
    }

    fn sign(&self, method: &str, path_and_query: &str, time: u64) -> [u8; 32] {
        let time = time.to_string();
        hmac_sha256(&self.request_key, &[method.as_bytes(), b"\n", path_and_query.as_bytes(), b"\n", time.as_bytes()])
    }
}

/// The secrets an agent holds: the first is used, every one is accepted.
#[derive(Clone, Debug)]
pub struct Membership {
    secrets: Vec<ClusterSecret>,
}

impl Membership {
    /// Membership by `secrets`, the one in use first; `None` when there is none.
    pub fn new(secrets: Vec<ClusterSecret>) -> Option<Self> {
        (!secrets.is_empty()).then_some(Self { secrets })
    }

    /// Every secret accepted, the one in use first.
    pub fn secrets(&self) -> &[ClusterSecret] {
        &self.secrets
    }

    /// The `Authorization` value for a request to a peer server at `time` (Unix seconds).
    pub fn authorization(&self, method: &str, path_and_query: &str, time: u64) -> String {
        let sig = self.secrets[0].sign(method, path_and_query, time);
        format!("{AUTH_SCHEME} t={time},sig={}", hex::encode(sig))
    }

    /// Whether `header` (the request's `Authorization`) proves a member signed this request
    /// within [`MAX_SKEW_SECS`] of `now`.
    pub fn verify(&self, header: Option<&[u8]>, method: &str, path_and_query: &str, now: u64) -> Result<(), AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (time, sig) = parse_authorization(header)?;
        if time.abs_diff(now) > MAX_SKEW_SECS {
            return Err(AuthError::Stale);
        }
        let ok = self.secrets.iter().any(|s| constant_time_eq(&s.sign(method, path_and_query, time), &sig));
        if ok { Ok(()) } else { Err(AuthError::BadSignature) }
    }
}

/// `Clyde-Member t=<unix seconds>,sig=<64 hex digits>`.
fn parse_authorization(header: &[u8]) -> Result<(u64, [u8; 32]), AuthError> {
    if header.len() > MAX_AUTH_LEN {
        return Err(AuthError::Malformed);
    }
    let text = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
    let rest = text.strip_prefix(AUTH_SCHEME).and_then(|r| r.strip_prefix(' ')).ok_or(AuthError::Missing)?;
    let (t, sig) = rest.split_once(',').ok_or(AuthError::Malformed)?;
    let t = t.strip_prefix("t=").ok_or(AuthError::Malformed)?;
    let sig = sig.strip_prefix("sig=").ok_or(AuthError::Malformed)?;
    if t.is_empty() || t.len() > 20 || (t.len() > 1 && t.starts_with('0')) || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthError::Malformed);
    }
    let time = t.parse().map_err(|_| AuthError::Malformed)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(sig, &mut out).map_err(|_| AuthError::Malformed)?;
    Ok((time, out))
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn members(secrets: &[&[u8]]) -> Membership {
        Membership::new(secrets.iter().map(|s| ClusterSecret::parse(s).unwrap()).collect()).unwrap()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let long_key = [0xaa; 131];
        let mac = hmac_sha256(&long_key, &[b"Test Using Larger Than Block-Size Key - Hash Key First"]);
        assert_eq!(hex::encode(mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn a_secret_needs_32_characters_and_one_trailing_newline_is_ignored() {
        assert_eq!(ClusterSecret::parse(b"short").unwrap_err(), SecretError::TooShort(5));
        assert_eq!(ClusterSecret::parse(&[0xff; 40]).unwrap_err(), SecretError::NotText);
        let plain = ClusterSecret::parse(SECRET).unwrap();
        let newline = ClusterSecret::parse(b"0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(plain.psk(), newline.psk());
        let two = ClusterSecret::parse(b"0123456789abcdef0123456789abcdef\n\n").unwrap();
        assert_ne!(plain.psk(), two.psk());
        assert!(ClusterSecret::parse(b"0123456789abcdef0123456789abcde\n").is_err());
        let shipped = include_bytes!("../../../deploy/kustomize/cluster-secret");
        assert_eq!(ClusterSecret::parse(shipped).unwrap_err(), SecretError::Placeholder);
    }

    #[test]
    fn the_two_keys_are_independent_and_the_fingerprint_hides_both() {
        let s = ClusterSecret::parse(SECRET).unwrap();
        assert_ne!(s.psk, s.request_key);
        assert_eq!(s.fingerprint().len(), 12);
        assert!(!hex::encode(s.psk).contains(&s.fingerprint()));
        assert!(!format!("{s:?}").contains(&hex::encode(s.psk)));
    }

    #[test]
    fn a_signed_request_verifies_only_for_its_method_path_time_and_secret() {
        let m = members(&[SECRET]);
        let auth = m.authorization("GET", "/v2/a/blobs/sha256:00?ns=r", 1000);
        let h = Some(auth.as_bytes());
        assert_eq!(m.verify(h, "GET", "/v2/a/blobs/sha256:00?ns=r", 1000), Ok(()));
        assert_eq!(m.verify(h, "GET", "/v2/a/blobs/sha256:00?ns=r", 1000 + MAX_SKEW_SECS), Ok(()));
        assert_eq!(m.verify(h, "GET", "/v2/a/blobs/sha256:00?ns=r", 1001 + MAX_SKEW_SECS), Err(AuthError::Stale));
        assert_eq!(m.verify(h, "HEAD", "/v2/a/blobs/sha256:00?ns=r", 1000), Err(AuthError::BadSignature));
        assert_eq!(m.verify(h, "GET", "/v2/b/blobs/sha256:00?ns=r", 1000), Err(AuthError::BadSignature));
        let other = members(&[b"another secret of at least 32 characters"]);
        assert_eq!(other.verify(h, "GET", "/v2/a/blobs/sha256:00?ns=r", 1000), Err(AuthError::BadSignature));
        assert_eq!(m.verify(None, "GET", "/", 1000), Err(AuthError::Missing));
        assert_eq!(m.verify(Some(b"Basic dXNlcjpwYXNz"), "GET", "/", 1000), Err(AuthError::Missing));
    }

    #[test]
    fn during_a_rotation_both_secrets_are_accepted_and_the_first_is_used() {
        let old: &[u8] = b"the old secret, at least 32 characters";
        let new: &[u8] = b"the new secret, at least 32 characters";
        let rolling = members(&[new, old]);
        let from_old = members(&[old]).authorization("GET", "/v2/", 5);
        let from_new = members(&[new]).authorization("GET", "/v2/", 5);
        assert_eq!(rolling.verify(Some(from_old.as_bytes()), "GET", "/v2/", 5), Ok(()));
        assert_eq!(rolling.verify(Some(from_new.as_bytes()), "GET", "/v2/", 5), Ok(()));
        assert_eq!(rolling.authorization("GET", "/v2/", 5), from_new);
    }

    proptest::proptest! {
        #[test]
        fn any_authorization_header_is_judged_without_panic(header in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let m = members(&[SECRET]);
            proptest::prop_assert!(m.verify(Some(&header), "GET", "/v2/", 1000).is_err());
        }

        #[test]
        fn a_tampered_signature_never_verifies(flip in 0usize..64, now in 0u64..u64::MAX / 2) {
            let m = members(&[SECRET]);
            let auth = m.authorization("GET", "/v2/x", now);
            let mut bytes = auth.into_bytes();
            let at = bytes.len() - 64 + flip;
            bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
            proptest::prop_assert_eq!(m.verify(Some(&bytes), "GET", "/v2/x", now), Err(AuthError::BadSignature));
        }
    }
}
