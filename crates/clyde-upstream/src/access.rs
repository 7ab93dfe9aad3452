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
    /// Whether the credentials may read the object (a redirect to storage counts as yes).
    pub fn granted(&self) -> bool {
        (200..400).contains(&self.status)
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

    /// Whether the registry holds `object` in `repository`, asked with the mirror's own
    /// credentials (a refusal counts as no).
    pub async fn has_object(
        &self,
        registry: &Registry,
        repository: &Repository,
        object: Object<'_>,
        timeout: Duration,
    ) -> Result<bool, UpstreamError> {
        let answer = match object {
            Object::Manifest(r) => self.head_manifest(registry, repository, r, None, timeout).await.map(|_| ()),
            Object::Blob(d) => {
                let head = self.head_blob(registry, repository, d);
                match tokio::time::timeout(timeout, head).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => {
                        return Err(UpstreamError::Unreachable {
                            registry: registry.to_string(),
                            reason: "HEAD timed out".into(),
                        });
                    }
                }
            }
        };
        match answer {
            Ok(()) => Ok(true),
            Err(UpstreamError::NotFound | UpstreamError::Unauthorized(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
