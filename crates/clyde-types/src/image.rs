//! Image references as operators type them (`alpine`, `registry.example:5000/team/app:v1`,
//! `team/app@sha256:...`), normalised the way containerd and docker name them.

use std::fmt;

use crate::digest::Digest;
use crate::reference::{DEFAULT_REGISTRY, PathError, Reference, Registry, Repository};

/// Longest image reference accepted (registry + name + tag + digest with room to spare).
pub const MAX_IMAGE_REF_LEN: usize = 1024;

/// A fully qualified image reference: registry, repository, and a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub registry: Registry,
    pub repository: Repository,
    /// The digest when one was given (it wins over a tag), else the tag (`latest` by default).
    pub reference: Reference,
    /// The tag written next to a digest (`app:v1@sha256:...`), kept for display only.
    pub tag_hint: Option<String>,
}

/// Why an image reference is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("empty image reference")]
    Empty,
    #[error("image reference longer than {MAX_IMAGE_REF_LEN} characters")]
    TooLong,
    #[error("invalid image reference {reference:?}: {source}")]
    Invalid { reference: String, source: PathError },
}

impl ImageRef {
    /// Parses `[registry/]name[:tag][@digest]`; a first segment with a `.` or `:`, or
    /// `localhost`, is a registry, otherwise the registry is `docker.io` (with `library/`
    /// before single-segment names).
    pub fn parse(s: &str) -> Result<Self, ImageRefError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ImageRefError::Empty);
        }
        if s.len() > MAX_IMAGE_REF_LEN {
            return Err(ImageRefError::TooLong);
        }
        let invalid = |source| ImageRefError::Invalid { reference: s.chars().take(80).collect(), source };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(|e| invalid(e.into()))?)),
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if Registry::looks_like_host(first) => (first.to_string(), path.to_string()),
            Some(_) => (DEFAULT_REGISTRY.to_string(), name.to_string()),
            None => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let registry = Registry::parse(&registry).map_err(invalid)?;
        let repository = Repository::parse(&repository).map_err(invalid)?;
        let tag = match tag {
            Some(t) => match Reference::parse(t).map_err(invalid)? {
                Reference::Tag(t) => Some(t),
                Reference::Digest(_) => return Err(invalid(PathError::BadTag(t.to_string()))),
            },
            None => None,
        };
        let (reference, tag_hint) = match digest {
            Some(d) => (Reference::Digest(d), tag),
            None => (Reference::Tag(tag.unwrap_or_else(|| "latest".to_string())), None),
        };
        Ok(Self { registry, repository, reference, tag_hint })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag_hint {
            write!(f, ":{tag}")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, ":{t}"),
            Reference::Digest(d) => write!(f, "@{d}"),
        }
    }
}

impl std::str::FromStr for ImageRef {
    type Err = ImageRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn parts(s: &str) -> (String, String, String) {
        let r = ImageRef::parse(s).unwrap();
        (r.registry.to_string(), r.repository.to_string(), r.reference.to_string())
    }

    #[test]
    fn short_names_are_docker_library_images() {
        assert_eq!(parts("alpine"), ("docker.io".into(), "library/alpine".into(), "latest".into()));
        assert_eq!(parts("alpine:3.20"), ("docker.io".into(), "library/alpine".into(), "3.20".into()));
        assert_eq!(parts("team/app"), ("docker.io".into(), "team/app".into(), "latest".into()));
    }

    #[test]
    fn registries_with_ports_and_digests() {
        assert_eq!(
            parts("registry.example:5000/team/app:v1"),
            ("registry.example:5000".into(), "team/app".into(), "v1".into())
        );
        assert_eq!(parts("localhost/app"), ("localhost".into(), "app".into(), "latest".into()));
        assert_eq!(parts(&format!("127.0.0.1:5000/app@{D}")), ("127.0.0.1:5000".into(), "app".into(), D.into()));
        let r = ImageRef::parse(&format!("127.0.0.1:5000/app:v2@{D}")).unwrap();
        assert_eq!(r.reference, Reference::Digest(D.parse().unwrap()));
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/app:v2@{D}"));
        assert_eq!(ImageRef::parse("alpine").unwrap().to_string(), "docker.io/library/alpine:latest");
    }

    #[test]
    fn malformed_references_are_rejected() {
        for bad in ["", "UPPER/case", "app:", "app:-bad", "app@sha256:zz", "../etc:v1", "a//b", "app:v1:v2", "r.io/"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(ImageRef::parse(&"a".repeat(2000)), Err(ImageRefError::TooLong));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_display_round_trips(s in "[a-z0-9./:@_-]{0,80}") {
            if let Ok(r) = ImageRef::parse(&s) {
                proptest::prop_assert_eq!(ImageRef::parse(&r.to_string()), Ok(r));
            }
        }
    }
}
