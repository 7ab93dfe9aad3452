//! Per-registry settings: endpoint, scheme, credentials, TLS.

use std::path::PathBuf;
use std::time::Duration;

use clyde_types::Registry;
use serde::Deserialize;

use crate::{RegistryClient, UpstreamError};

/// One `[[registries]]` entry of the config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `host[:port]` as containerd passes it in `?ns=`.
    pub name: String,
    /// `host[:port]` to send requests to instead of `name` (e.g. the API host of `docker.io`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `https` (default) or `http` (default for localhost and 127.0.0.0/8).
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Cached content is served only to clients whose credentials the upstream accepts for
    /// the object they ask for (checked upstream, remembered briefly).
    #[serde(default)]
    pub private: bool,
}

/// Basic credentials, also used to obtain bearer tokens.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub username: String,
    #[serde(default)]
    pub password: Option<String>,
    /// A file whose first line is the password (e.g. a mounted Secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// TLS towards the upstream.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA bundle trusted in addition to the system roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mTLS (with `key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Settings shared by every upstream client.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub registries: Vec<RegistryConfig>,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of an answer (a body is judged by its progress).
    pub read_timeout: Duration,
    /// Longest wait for an answer's head, token exchange and retries included: a stalled
    /// registry gets a quick miss, so the client falls back by itself.
    pub response_timeout: Duration,
    /// Retries on connection errors and 5xx before any byte was received.
    pub retries: u32,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            registries: Vec::new(),
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(3),
            retries: 2,
        }
    }
}

fn read(name: &str, what: &str, path: &PathBuf) -> Result<Vec<u8>, UpstreamError> {
    std::fs::read(path)
        .map_err(|e| UpstreamError::Config(name.to_string(), format!("cannot read {what} {}: {e}", path.display())))
}

/// Docker Hub's API host: `docker.io` names the registry, not the host that serves its API
/// (containerd maps it the same way), so it works with no `[[registries]]` entry.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// Where requests for registry `name` go when its entry names no `endpoint`.
pub fn default_endpoint(name: &str) -> &str {
    if name == clyde_types::reference::DEFAULT_REGISTRY { DOCKER_HUB_API_HOST } else { name }
}

pub(crate) fn build_client(
    config: &UpstreamConfig,
    registry: &Registry,
    rc: Option<&RegistryConfig>,
) -> Result<RegistryClient, UpstreamError> {
    let name = registry.as_str();
    let bad = |msg: String| UpstreamError::Config(name.to_string(), msg);
    let scheme = match rc.and_then(|r| r.scheme.as_deref()) {
        Some(s @ ("http" | "https")) => s,
        Some(other) => return Err(bad(format!("scheme {other:?} is neither http nor https"))),
        None if registry.is_loopback() => "http",
        None => "https",
    };
    let endpoint = rc.and_then(|r| r.endpoint.as_deref()).unwrap_or_else(|| default_endpoint(name));
    Registry::parse(endpoint).map_err(|e| bad(e.to_string()))?;
    let http = http_client(config, name, rc, true)?;
    // Checks of a client's credentials look at the registry's own answer, never a
    // redirect's (a blob `HEAD` may be sent on to storage that wants other credentials).
    let check = match rc.is_some_and(|r| r.private) {
        true => Some(http_client(config, name, rc, false)?),
        false => None,
    };
    let auth = match rc.and_then(|r| r.auth.as_ref()) {
        None => None,
        Some(a) => {
            let password = match (&a.password, &a.password_file) {
                (Some(p), None) => p.clone(),
                (None, Some(f)) => {
                    let raw = read(name, "password_file", f)?;
                    String::from_utf8_lossy(&raw).lines().next().unwrap_or("").to_string()
                }
                _ => {
                    return Err(bad("auth needs exactly one of password or password_file".into()));
                }
            };
            Some((a.username.clone(), password))
        }
    };
    Ok(RegistryClient { registry: registry.clone(), base: format!("{scheme}://{endpoint}"), http, check, auth })
}

/// An HTTP client with the registry's TLS settings, following redirects or not.
fn http_client(
    config: &UpstreamConfig,
    name: &str,
    rc: Option<&RegistryConfig>,
    redirects: bool,
) -> Result<reqwest::Client, UpstreamError> {
    let bad = |msg: String| UpstreamError::Config(name.to_string(), msg);
    let mut builder = reqwest::Client::builder()
        .redirect(if redirects { reqwest::redirect::Policy::default() } else { reqwest::redirect::Policy::none() })
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.read_timeout)
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .user_agent(concat!("clyde/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = rc.and_then(|r| r.tls.as_ref()) {
        if let Some(ca) = &tls.ca {
            for cert in
                reqwest::Certificate::from_pem_bundle(&read(name, "ca", ca)?).map_err(|e| bad(format!("ca: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(name, "cert", cert)?;
                pem.push(b'\n');
                pem.extend(read(name, "key", key)?);
                builder = builder
                    .identity(reqwest::Identity::from_pem(&pem).map_err(|e| bad(format!("client identity: {e}")))?);
            }
            (None, None) => {}
            _ => return Err(bad("tls.cert and tls.key must be given together".into())),
        }
        if tls.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
    }
    builder.build().map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_io_goes_to_docker_hubs_api_host_and_other_names_to_themselves() {
        assert_eq!(default_endpoint("docker.io"), "registry-1.docker.io");
        assert_eq!(default_endpoint("registry.example:5000"), "registry.example:5000");
        assert_eq!(default_endpoint("ghcr.io"), "ghcr.io");
    }
}
