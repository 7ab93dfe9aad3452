//! Who may read a private registry's content (`private = true`).
//!
//! - A mirror request naming a private registry is served, from anywhere, only when the
//!   registry itself accepts the credentials the client sent for the object it asks for:
//!   the client's `Authorization` is replayed, unchanged, in a `HEAD` of that object
//!   upstream. Any other client gets the registry's own answer (its `401` and challenge, a
//!   `403`, a `404`), exactly as if it had pulled directly; containerd then sends its
//!   credentials, or falls back to the registry by itself.
//! - Content of a private registry asked for under another registry's name (a digest
//!   someone learned) is served only when that registry, asked with the mirror's own
//!   credentials, sends the same bytes (fetched and hashed once, remembered a day): then it
//!   is public there. A `HEAD` would not do: any server can answer yes.
//! - The peer port serves a private registry's content to cluster members only (the agent
//!   refuses `private = true` without a cluster secret); a member asks only for its clients
//!   that passed the check above. Asked for under another name, it answers `403` (not
//!   `404`), so the asking node still asks it under the right name.
//!
//! Verdicts are remembered for a short time by (registry, repository, object, SHA-256 of
//! the header); the header itself is never kept nor logged. When the registry cannot be
//! asked, nothing is served (fail closed) and nothing is remembered.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clyde_resolver::{Origin, Resolver};
use clyde_types::{Digest, Reference, Resource};
use clyde_upstream::{ClientCheck, Object};
use http::{HeaderValue, Request, Response, StatusCode, header};

use crate::errors::{self, ErrorCode};
use crate::{Api, Body};

/// How long a registry's "yes" to a client is remembered.
const GRANTED_FOR: Duration = Duration::from_secs(60);
/// How long a registry's "no" to a client is remembered (a client retrying a refused
/// login sends up to 6 requests; they cost one check).
const DENIED_FOR: Duration = Duration::from_secs(15);
/// How long "this registry sent that content too" is remembered (the proof costs a
/// download of it).
const PUBLIC_FOR: Duration = Duration::from_secs(24 * 3600);
/// Bound on remembered verdicts; past it, expired ones go, then all.
const MAX_VERDICTS: usize = 65_536;
/// Bound on fetching a registry's copy of content, to prove it holds it under its name.
const PUBLIC_CHECK_TIMEOUT: Duration = Duration::from_secs(300);

/// What a check concluded.
#[derive(Clone, Debug)]
enum Verdict {
    Granted,
    Denied(ClientCheck),
}

/// Remembered verdicts, shared by a listener's connections.
#[derive(Default)]
pub(crate) struct Access {
    verdicts: Mutex<HashMap<Digest, (Instant, Verdict)>>,
}

impl Access {
    fn remembered(&self, key: &Digest) -> Option<Verdict> {
        let verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        verdicts.get(key).filter(|(until, _)| *until > Instant::now()).map(|(_, v)| v.clone())
    }

    fn remember(&self, key: Digest, verdict: Verdict, ttl: Duration) {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if verdicts.len() >= MAX_VERDICTS {
            let now = Instant::now();
            verdicts.retain(|_, (until, _)| *until > now);
            if verdicts.len() >= MAX_VERDICTS {
                verdicts.clear();
            }
        }
        verdicts.insert(key, (Instant::now() + ttl, verdict));
    }

    /// `None` when the request may be served; else the answer it gets instead.
    pub(crate) async fn gate<B>(
        &self,
        resolver: &Resolver,
        api: Api,
        members: bool,
        req: &Request<B>,
        origin: &Origin,
        resource: &Resource,
    ) -> Option<Response<Body>> {
        let object = match resource {
            Resource::Manifest(r) => Object::Manifest(r),
            Resource::Blob(d) => Object::Blob(d),
        };
        if resolver.is_private(&origin.registry) {
            return match api {
                // Only members reach this port; they ask for their checked clients.
                Api::Peer if members => None,
                Api::Peer => {
                    Some(denied(StatusCode::FORBIDDEN, "a private registry's content is for cluster members only"))
                }
                Api::Mirror => {
                    let authorization = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
                    self.client(resolver, origin, object, authorization).await
                }
            };
        }
        let digest = match resource {
            Resource::Blob(d) | Resource::Manifest(Reference::Digest(d)) => d,
            Resource::Manifest(Reference::Tag(_)) => return None,
        };
        if resolver.private_registries_of(digest).is_empty() {
            return None;
        }
        match api {
            Api::Mirror => self.public(resolver, origin, object, digest).await,
            // A peer's request does not wait for a proof (a download): only one this node
            // already has counts. The asking node then gets the bytes from that registry
            // itself. `403`, not `404`: the digest may still be asked for under its own
            // registry's name.
            Api::Peer => {
                let key = verdict_key("public", origin, object, b"");
                match self.remembered(&key) {
                    Some(Verdict::Granted) => None,
                    _ => Some(denied(StatusCode::FORBIDDEN, "not served under this name")),
                }
            }
        }
    }

    /// Whether the private registry accepts the client's credentials for `object`.
    async fn client(
        &self,
        resolver: &Resolver,
        origin: &Origin,
        object: Object<'_>,
        authorization: Option<&[u8]>,
    ) -> Option<Response<Body>> {
        let metrics = resolver.metrics();
        let key = verdict_key("client", origin, object, authorization.unwrap_or_default());
        let (verdict, cached) = match self.remembered(&key) {
            Some(v) => (v, true),
            None => {
                let check =
                    resolver.upstream().check_client(&origin.registry, &origin.repository, object, authorization);
                match check.await {
                    Ok(check) if check.granted(object) => {
                        self.remember(key, Verdict::Granted, GRANTED_FOR);
                        (Verdict::Granted, false)
                    }
                    Ok(check) => {
                        self.remember(key, Verdict::Denied(check.clone()), DENIED_FOR);
                        (Verdict::Denied(check), false)
                    }
                    Err(e) => {
                        metrics.access_check("client", "unavailable", false);
                        tracing::warn!(registry = %origin.registry, error = %e, "cannot check a client's credentials for a private registry; refusing");
                        return Some(unknown(
                            object,
                            "the registry, which must accept this client's credentials, cannot be asked now",
                        ));
                    }
                }
            }
        };
        match verdict {
            Verdict::Granted => {
                metrics.access_check("client", "granted", cached);
                None
            }
            Verdict::Denied(check) => {
                metrics.access_check("client", "denied", cached);
                tracing::debug!(registry = %origin.registry, repository = %origin.repository, status = check.status, "the registry refused a client");
                Some(refusal(object, &check))
            }
        }
    }

    /// Whether the (not private) registry a request names holds this private content too,
    /// proven by its bytes: the registry's copy is fetched and must hash to `digest` (a
    /// `HEAD`, or any status, could come from a server that says yes to everything).
    async fn public(
        &self,
        resolver: &Resolver,
        origin: &Origin,
        object: Object<'_>,
        digest: &Digest,
    ) -> Option<Response<Body>> {
        let metrics = resolver.metrics();
        let key = verdict_key("public", origin, object, b"");
        if let Some(v) = self.remembered(&key) {
            let granted = matches!(v, Verdict::Granted);
            metrics.access_check("public", if granted { "granted" } else { "denied" }, true);
            return (!granted).then(|| unknown(object, "not found"));
        }
        if !resolver.asks_upstream() {
            metrics.access_check("public", "unavailable", false);
            return Some(unknown(object, "not found"));
        }
        let upstream = resolver.upstream();
        let has = upstream.sends_content(&origin.registry, &origin.repository, object, digest, PUBLIC_CHECK_TIMEOUT);
        match has.await {
            Ok(true) => {
                self.remember(key, Verdict::Granted, PUBLIC_FOR);
                metrics.access_check("public", "granted", false);
                None
            }
            Ok(false) => {
                let check = ClientCheck { status: 404, challenge: None };
                self.remember(key, Verdict::Denied(check), DENIED_FOR);
                metrics.access_check("public", "denied", false);
                Some(unknown(object, "not found"))
            }
            Err(_) => {
                metrics.access_check("public", "unavailable", false);
                Some(unknown(object, "not found"))
            }
        }
    }
}

/// The key a verdict is remembered by: never the header itself.
fn verdict_key(check: &str, origin: &Origin, object: Object<'_>, authorization: &[u8]) -> Digest {
    let mut material = Vec::with_capacity(256 + authorization.len());
    for part in [check.as_bytes(), origin.registry.as_str().as_bytes(), origin.repository.as_str().as_bytes()] {
        material.extend_from_slice(part);
        material.push(0);
    }
    material.extend_from_slice(object.path().as_bytes());
    material.push(0);
    material.extend_from_slice(authorization);
    Digest::of(&material)
}

/// The answer for content nobody may read here: as missing.
fn unknown(object: Object<'_>, message: &str) -> Response<Body> {
    let code = match object {
        Object::Manifest(_) => ErrorCode::ManifestUnknown,
        Object::Blob(_) => ErrorCode::BlobUnknown,
    };
    errors::answer(StatusCode::NOT_FOUND, code, message)
}

fn denied(status: StatusCode, message: &str) -> Response<Body> {
    errors::answer(status, ErrorCode::Denied, message)
}

/// The registry's own refusal, passed on: its status and challenge.
fn refusal(object: Object<'_>, check: &ClientCheck) -> Response<Body> {
    let mut answer = match check.status {
        404 => return unknown(object, "the registry has no such content, or not for these credentials"),
        403 => denied(StatusCode::FORBIDDEN, "the registry refuses these credentials this content"),
        _ => errors::answer(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "the registry wants credentials it accepts for this content",
        ),
    };
    if let Some(value) = check.challenge.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
        answer.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(repo: &str) -> Origin {
        Origin {
            registry: clyde_types::Registry::parse("secret.example").unwrap(),
            repository: clyde_types::Repository::parse(repo).unwrap(),
        }
    }

    #[test]
    fn verdicts_are_kept_apart_by_repository_object_and_credentials() {
        let d = Digest::of(b"layer");
        let tag = Reference::Tag("v1".into());
        let base = verdict_key("client", &origin("a/app"), Object::Blob(&d), b"Basic x");
        assert_ne!(base, verdict_key("client", &origin("b/app"), Object::Blob(&d), b"Basic x"));
        assert_ne!(base, verdict_key("client", &origin("a/app"), Object::Blob(&d), b"Basic y"));
        assert_ne!(base, verdict_key("client", &origin("a/app"), Object::Manifest(&tag), b"Basic x"));
        assert_ne!(base, verdict_key("public", &origin("a/app"), Object::Blob(&d), b"Basic x"));
        assert_eq!(base, verdict_key("client", &origin("a/app"), Object::Blob(&d), b"Basic x"));
    }

    #[test]
    fn remembered_verdicts_expire_and_stay_bounded() {
        let access = Access::default();
        let key = Digest::of(b"k");
        access.remember(key, Verdict::Granted, Duration::from_secs(60));
        assert!(matches!(access.remembered(&key), Some(Verdict::Granted)));
        access.remember(key, Verdict::Granted, Duration::ZERO);
        assert!(access.remembered(&key).is_none());
        for i in 0..MAX_VERDICTS + 10 {
            access.remember(Digest::of(&i.to_le_bytes()), Verdict::Granted, Duration::from_secs(60));
        }
        assert!(access.verdicts.lock().unwrap().len() <= MAX_VERDICTS);
    }

    #[test]
    fn a_refusal_passes_the_registrys_challenge_on() {
        let d = Digest::of(b"layer");
        let check = ClientCheck { status: 401, challenge: Some("Basic realm=\"r\"".into()) };
        let r = refusal(Object::Blob(&d), &check);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Basic realm=\"r\"");
        let r = refusal(Object::Blob(&d), &ClientCheck { status: 404, challenge: None });
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = refusal(Object::Blob(&d), &ClientCheck { status: 403, challenge: None });
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
}
