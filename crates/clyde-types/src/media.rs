//! Media types Clyde recognises when it asks an upstream for manifests.

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Accept` header Clyde sends when the client did not say what it accepts.
pub const DEFAULT_MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest Clyde accepts from anyone (the same bound distribution uses).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// Whether an `Accept` header value admits `media_type` (absent header admits all).
pub fn accepts(accept: Option<&str>, media_type: &str) -> bool {
    let Some(accept) = accept else { return true };
    if accept.trim().is_empty() {
        return true;
    }
    accept.split(',').any(|item| {
        let item = item.split(';').next().unwrap_or("").trim();
        item == "*/*" || item.eq_ignore_ascii_case(media_type)
    })
}

/// The kind of a client's `Accept` for manifests: `None` when it admits every manifest type
/// Clyde knows (containerd, docker and skopeo send them all), else the names of those it
/// admits, in a fixed order. A narrow client may get another answer for the same tag from the
/// upstream (one platform's manifest for a multi-platform tag), so a tag's cached answer is
/// kept per kind: no client changes what the others get.
pub fn accept_kind(accept: Option<&str>) -> Option<String> {
    const KNOWN: [(&str, &str); 4] = [
        (OCI_INDEX, "oci-index"),
        (OCI_MANIFEST, "oci-manifest"),
        (DOCKER_MANIFEST_LIST, "docker-list"),
        (DOCKER_MANIFEST, "docker-manifest"),
    ];
    let admitted: Vec<&str> = KNOWN.iter().filter(|(t, _)| accepts(accept, t)).map(|(_, name)| *name).collect();
    match admitted.len() {
        n if n == KNOWN.len() => None,
        0 => Some("none".to_string()),
        _ => Some(admitted.join("+")),
    }
}

/// The `Accept` to send upstream for a client's: the client's own when it names a manifest
/// type, else every type Clyde knows (a client sending `*/*` or nothing accepts anything, but
/// registries only answer with media types they see named).
pub fn upstream_accept(client: Option<&str>) -> &str {
    match client {
        Some(a) if [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST].iter().any(|t| a.contains(t)) => a,
        _ => DEFAULT_MANIFEST_ACCEPT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        assert!(accepts(None, OCI_INDEX));
        assert!(accepts(Some("*/*"), OCI_INDEX));
        assert!(accepts(Some("application/json, application/vnd.oci.image.index.v1+json;q=0.9"), OCI_INDEX));
        assert!(!accepts(Some(DOCKER_MANIFEST), OCI_INDEX));
    }

    #[test]
    fn accept_kinds() {
        assert_eq!(accept_kind(None), None);
        assert_eq!(accept_kind(Some("*/*")), None);
        assert_eq!(accept_kind(Some(DEFAULT_MANIFEST_ACCEPT)), None);
        assert_eq!(accept_kind(Some(DOCKER_MANIFEST)).as_deref(), Some("docker-manifest"));
        let narrow = format!("{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5");
        assert_eq!(accept_kind(Some(&narrow)).as_deref(), Some("oci-manifest+docker-manifest"));
        assert_eq!(accept_kind(Some("application/json")).as_deref(), Some("none"));
    }

    #[test]
    fn wildcard_or_missing_accept_asks_upstream_for_every_manifest_type() {
        assert_eq!(upstream_accept(None), DEFAULT_MANIFEST_ACCEPT);
        assert_eq!(upstream_accept(Some("*/*")), DEFAULT_MANIFEST_ACCEPT);
        assert_eq!(upstream_accept(Some(DOCKER_MANIFEST)), DOCKER_MANIFEST);
    }
}
