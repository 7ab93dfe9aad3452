//! What the upstream says of a client: for a private registry, whether the credentials a
//! client sent the mirror may read one object, asked of the registry itself.

use std::time::Duration;

use clyde_types::{Digest, Reference, Registry, Repository, media};
use reqwest::{Method, StatusCode, header};

use crate::{Upstream, UpstreamError, header_str};

/// The object a request names.
#[derive(Clone, Copy, Debug)]
pub enum Object<'a> {
    Manifest(&'a Reference),
    Blob(&'a Digest),
}

impl Object<'_> {
    /// Its path under `/v2/<repository>/`.
    pub fn path(&self) -> String {
        match self {
            Self::Manifest(r) => format!("manifests/{r}"),
            Self::Blob(d) => format!("blobs/{d}"),
        }
    }
}

/// The registry's answer to a client's credentials for one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCheck {
    /// The status of the registry's answer to a `HEAD` of the object with those credentials.
    pub status: u16,
    /// Its `WWW-Authenticate` challenge, if it sent one.
    pub challenge: Option<String>,
}

impl ClientCheck {
    /// Whether the credentials may read the object: a `2xx`; for a blob also a `3xx` (the
    /// registry checked the credentials, then sends the bytes' reader on to its storage).
    pub fn granted(&self, object: Object<'_>) -> bool {
        match object {
            Object::Manifest(_) => (200..300).contains(&self.status),
            Object::Blob(_) => (200..400).contains(&self.status),
        }
    }
}

impl Upstream {
    /// Whether `registry` is marked `private = true`.
    pub fn is_private(&self, registry: &Registry) -> bool {
        self.config.registries.iter().any(|r| r.private && r.name.eq_ignore_ascii_case(registry.as_str()))
    }

    /// The registries marked private.
    pub fn private_registries(&self) -> Vec<String> {
        self.config.registries.iter().filter(|r| r.private).map(|r| r.name.to_ascii_lowercase()).collect()
    }

    /// Asks the registry whether `authorization` (a client's header, sent unchanged; `None`:
    /// anonymous) may read `object`: a `HEAD` that follows no redirect and answers no
    /// challenge. Bounded by the response timeout; any answer is a result, only no answer is
    /// an error.
    pub async fn check_client(
        &self,
        registry: &Registry,
        repository: &Repository,
        object: Object<'_>,
        authorization: Option<&[u8]>,
    ) -> Result<ClientCheck, UpstreamError> {
        let client = self.client(registry)?;
        let http = client.check.as_ref().unwrap_or(&client.http);
        let url = format!("{}/v2/{}/{}", client.base, repository, object.path());
        let mut req = http.request(Method::HEAD, &url);
        if let Object::Manifest(_) = object {
            req = req.header(header::ACCEPT, media::upstream_accept(None));
        }
        if let Some(value) = authorization {
            let value = header::HeaderValue::from_bytes(value)
                .map_err(|_| UpstreamError::Protocol("a client's Authorization header is not a header value".into()))?;
            req = req.header(header::AUTHORIZATION, value);
        }
        let bound = self.config.response_timeout;
        let unreachable = |reason: String| UpstreamError::Unreachable { registry: registry.to_string(), reason };
        let resp = tokio::time::timeout(bound, req.send())
            .await
            .map_err(|_| unreachable(format!("no answer within {} ms", bound.as_millis())))?
            .map_err(|e| unreachable(crate::error_chain(&e)))?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(UpstreamError::Status { status: status.as_u16(), url });
        }
        Ok(ClientCheck {
            status: status.as_u16(),
            challenge: header_str(resp.headers(), "www-authenticate").map(str::to_string),
        })
    }

    /// Whether the registry holds the content `digest` names in `repository`, proven by its
    /// bytes: the object is fetched with the mirror's own credentials (a manifest by its
    /// digest, a blob whole) and hashed as it streams, and only a match counts; a `HEAD`, or
    /// any status, could be answered by any server. `timeout` bounds the whole transfer.
    pub async fn sends_content(
        &self,
        registry: &Registry,
        repository: &Repository,
        object: Object<'_>,
        digest: &Digest,
        timeout: Duration,
    ) -> Result<bool, UpstreamError> {
        let fetch = async {
            let mut verifier = clyde_types::DigestVerifier::new(*digest);
            match object {
                Object::Manifest(reference) => {
                    let m = self.get_manifest(registry, repository, reference, None).await?;
                    verifier.update(&m.bytes);
                }
                Object::Blob(d) => {
                    let mut body = self.get_blob(registry, repository, d, None).await?;
                    while let Some(chunk) = futures_util::StreamExt::next(&mut body.stream).await {
                        verifier.update(&chunk?);
                    }
                }
            }
            Ok::<bool, UpstreamError>(verifier.finish().1)
        };
        match tokio::time::timeout(timeout, fetch).await {
            Ok(Ok(same)) => Ok(same),
            Ok(Err(UpstreamError::NotFound | UpstreamError::Unauthorized(_))) => Ok(false),
            Ok(Err(UpstreamError::Protocol(_))) => Ok(false),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(UpstreamError::Unreachable {
                registry: registry.to_string(),
                reason: "its copy did not arrive in time".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_grants_a_blob_only() {
        let (tag, digest) = (Reference::Tag("v1".into()), Digest::of(b"layer"));
        let redirect = ClientCheck { status: 307, challenge: None };
        assert!(redirect.granted(Object::Blob(&digest)));
        assert!(!redirect.granted(Object::Manifest(&tag)), "a login redirect must not pass a manifest");
        let ok = ClientCheck { status: 200, challenge: None };
        assert!(ok.granted(Object::Manifest(&tag)) && ok.granted(Object::Blob(&digest)));
        let refused = ClientCheck { status: 401, challenge: Some("Basic realm=\"r\"".into()) };
        assert!(!refused.granted(Object::Blob(&digest)));
    }
}
