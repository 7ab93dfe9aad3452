//! Registries, repository names, tags and the mirror's request paths.

use std::fmt;

use crate::digest::{Digest, DigestError};

/// Longest repository name distribution accepts.
pub const MAX_NAME_LEN: usize = 255;
/// Longest registry host[:port].
pub const MAX_REGISTRY_LEN: usize = 253 + 6;
/// Registry used when neither `ns` nor the path names one.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// An upstream registry as containerd names it: `host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry(String);

/// A repository name inside a registry, e.g. `team/app`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// What a mirror path asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Manifest(Reference),
    Blob(Digest),
}

impl Resource {
    /// Whether it is named by digest (a blob, or a manifest by digest): its bytes verify,
    /// whoever serves them.
    pub fn is_by_digest(&self) -> bool {
        matches!(self, Self::Blob(_) | Self::Manifest(Reference::Digest(_)))
    }
}

/// A parsed mirror request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiPath {
    /// `/v2/`: the API version check.
    Root,
    /// A manifest or blob of a repository in a registry.
    Content { registry: Registry, repository: Repository, resource: Resource },
}

/// Why a request path or reference is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not under /v2/")]
    NotV2,
    #[error("no such endpoint; this mirror serves /v2/<name>/manifests/<reference> and /v2/<name>/blobs/<digest>")]
    UnknownEndpoint,
    #[error("invalid repository name {0:?}: lowercase alphanumerics separated by '/', '.', '_', '__' or '-'")]
    BadName(String),
    #[error("invalid registry {0:?}: expected host[:port]")]
    BadRegistry(String),
    #[error("invalid tag {0:?}: up to 128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'")]
    BadTag(String),
    #[error("invalid digest: {0}")]
    BadDigest(#[from] DigestError),
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

impl Registry {
    /// Parses `host[:port]`, also `[v6]:port`.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        let ok_chars = s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
        if s.is_empty() || s.len() > MAX_REGISTRY_LEN || !ok_chars || s.starts_with(['.', '-', ':']) || s.contains("..")
        {
            return Err(PathError::BadRegistry(clip(s)));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// `host[:port]`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part without the port.
    pub fn host(&self) -> &str {
        if let Some(rest) = self.0.strip_prefix('[') {
            return rest.split(']').next().unwrap_or(rest);
        }
        self.0.split(':').next().unwrap_or(&self.0)
    }

    /// Whether this registry is on the local machine, where plain HTTP is the default.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        host == "localhost" || host.starts_with("127.") || host == "::1"
    }

    /// Whether a path segment looks like a registry host rather than a repository component.
    pub fn looks_like_host(segment: &str) -> bool {
        segment.contains('.') || segment.contains(':') || segment == "localhost"
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let sep_start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let dashes = sep.bytes().all(|x| x == b'-');
        if !(sep == "." || sep == "_" || sep == "__" || dashes) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

impl Repository {
    /// Parses a repository name of any depth.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(PathError::BadName(clip(s)));
        }
        Ok(Self(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Reference {
    /// Parses a tag or a `sha256:` digest.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.contains(':') {
            return Ok(Self::Digest(s.parse()?));
        }
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(PathError::BadTag(clip(s)));
        }
        Ok(Self::Tag(s.to_string()))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => f.write_str(t),
            Self::Digest(d) => write!(f, "{d}"),
        }
    }
}

impl ApiPath {
    /// Parses a mirror request path (without query) and the `ns` query parameter.
    pub fn parse(path: &str, ns: Option<&str>) -> Result<Self, PathError> {
        let rest = match path {
            "/v2" | "/v2/" => return Ok(Self::Root),
            p => p.strip_prefix("/v2/").ok_or(PathError::NotV2)?,
        };
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.len() < 3 {
            return Err(PathError::UnknownEndpoint);
        }
        let (name, tail) = segments.split_at(segments.len() - 2);
        let resource = match tail[0] {
            "manifests" => Resource::Manifest(Reference::parse(tail[1])?),
            "blobs" => Resource::Blob(tail[1].parse()?),
            _ => return Err(PathError::UnknownEndpoint),
        };
        let (registry, name) = match ns {
            Some(ns) => (Registry::parse(ns)?, name.join("/")),
            None if name.len() > 1 && Registry::looks_like_host(name[0]) => {
                (Registry::parse(name[0])?, name[1..].join("/"))
            }
            None => (Registry(DEFAULT_REGISTRY.to_string()), name.join("/")),
        };
        let name =
            if registry.as_str() == DEFAULT_REGISTRY && !name.contains('/') { format!("library/{name}") } else { name };
        Ok(Self::Content { registry, repository: Repository::parse(&name)?, resource })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn content(path: &str, ns: Option<&str>) -> (String, String, Resource) {
        match ApiPath::parse(path, ns).unwrap() {
            ApiPath::Content { registry, repository, resource } => {
                (registry.to_string(), repository.to_string(), resource)
            }
            ApiPath::Root => panic!("root"),
        }
    }

    #[test]
    fn registry_from_ns_path_or_default() {
        let (r, n, res) = content("/v2/team/app/manifests/v1", Some("reg.example:5000"));
        assert_eq!((r.as_str(), n.as_str()), ("reg.example:5000", "team/app"));
        assert_eq!(res, Resource::Manifest(Reference::Tag("v1".into())));
        let (r, n, _) = content("/v2/reg.example/team/app/manifests/v1", None);
        assert_eq!((r.as_str(), n.as_str()), ("reg.example", "team/app"));
        let (r, n, _) = content("/v2/localhost/app/manifests/v1", None);
        assert_eq!((r.as_str(), n.as_str()), ("localhost", "app"));
        let (r, n, _) = content("/v2/alpine/manifests/latest", None);
        assert_eq!((r.as_str(), n.as_str()), ("docker.io", "library/alpine"));
        let (r, n, res) = content(&format!("/v2/a/b/c/d/e/blobs/{D}"), None);
        assert_eq!((r.as_str(), n.as_str()), ("docker.io", "a/b/c/d/e"));
        assert_eq!(res, Resource::Blob(D.parse().unwrap()));
    }

    #[test]
    fn root_and_unknown_endpoints() {
        assert_eq!(ApiPath::parse("/v2/", None), Ok(ApiPath::Root));
        assert_eq!(ApiPath::parse("/v2/app/tags/list", None), Err(PathError::UnknownEndpoint));
        assert_eq!(ApiPath::parse("/v2/app/manifests", None), Err(PathError::UnknownEndpoint));
        assert_eq!(ApiPath::parse("/v1/x", None), Err(PathError::NotV2));
    }

    #[test]
    fn malformed_names_tags_and_traversal_are_rejected() {
        for path in [
            "/v2/../etc/manifests/v1",
            "/v2/app/../../manifests/v1",
            "/v2/App/manifests/v1",
            "/v2/app//x/manifests/v1",
            "/v2/app/manifests/.hidden",
            "/v2/app/manifests/-x",
            "/v2/app/blobs/sha256:zz",
            "/v2/app%2F..%2F/manifests/v1",
            "/v2/a--_b/manifests/v1",
        ] {
            assert!(ApiPath::parse(path, None).is_err(), "{path}");
        }
        assert!(ApiPath::parse("/v2/app/manifests/v1", Some("../x")).is_err());
        assert!(ApiPath::parse("/v2/app/manifests/v1", Some("a/b")).is_err());
        let long = "a".repeat(129);
        assert!(ApiPath::parse(&format!("/v2/app/manifests/{long}"), None).is_err());
    }

    #[test]
    fn component_grammar() {
        for ok in ["a", "a.b", "a_b", "a__b", "a---b", "0x"] {
            assert!(valid_component(ok), "{ok}");
        }
        for bad in ["", "_a", "a_", "a..b", "a___b", "a.-b", "A"] {
            assert!(!valid_component(bad), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(path in "/v2/[a-z0-9./:_%-]{0,60}", ns in proptest::option::of("[a-z0-9.:/\\[\\]-]{0,20}")) {
            if let Ok(ApiPath::Content { repository, .. }) = ApiPath::parse(&path, ns.as_deref()) {
                proptest::prop_assert!(!repository.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
            }
        }
    }
}
