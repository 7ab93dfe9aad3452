//! Registry authentication: basic credentials and the bearer-token challenge flow.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tokio::time::Instant;

use crate::UpstreamError;

/// Bound on cached tokens (one per registry and repository): past it, expired ones go, then
/// all (they are fetched again when needed).
const MAX_TOKENS: usize = 16_384;

/// `Authorization` values per (registry, scope), each until it expires.
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Parses `Scheme k="v",k2=v2` into the scheme and its parameters.
pub(crate) fn parse_challenge(value: &str) -> Option<(String, HashMap<String, String>)> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (val, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], quoted[end + 1..].trim_start())
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), val.to_string());
        rest = next.trim_start_matches(',').trim_start();
    }
    Some((scheme.to_ascii_lowercase(), params))
}

impl TokenCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (String, Instant)>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached `Authorization` value, if it has not expired.
    pub(crate) fn header(&self, registry: &str, scope: &str) -> Option<String> {
        let mut tokens = self.lock();
        let key = (registry.to_string(), scope.to_string());
        match tokens.get(&key) {
            Some((value, until)) if *until > Instant::now() => Some(value.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    fn store(&self, registry: &str, scope: &str, value: String, ttl: Duration) {
        let mut tokens = self.lock();
        if tokens.len() >= MAX_TOKENS {
            let now = Instant::now();
            tokens.retain(|_, (_, until)| *until > now);
            if tokens.len() >= MAX_TOKENS {
                tokens.clear();
            }
        }
        tokens.insert((registry.to_string(), scope.to_string()), (value, Instant::now() + ttl));
    }

    /// Answers a `WWW-Authenticate` challenge, caching the resulting `Authorization`.
    pub(crate) async fn answer(
        &self,
        http: &reqwest::Client,
        registry: &str,
        scope: &str,
        challenge: &str,
        credentials: Option<&(String, String)>,
    ) -> Result<(), UpstreamError> {
        let refused = |why: &str| UpstreamError::Unauthorized(why.to_string());
        let (scheme, params) = parse_challenge(challenge).ok_or_else(|| refused("unparsable WWW-Authenticate"))?;
        let basic = credentials
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        match scheme.as_str() {
            "basic" => {
                let value = basic.ok_or_else(|| refused("registry wants basic auth and none is configured"))?;
                self.store(registry, scope, value, Duration::from_secs(3600));
                Ok(())
            }
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| refused("bearer challenge without realm"))?;
                let mut req =
                    http.get(realm.as_str()).query(&[("scope", params.get("scope").map_or(scope, String::as_str))]);
                if let Some(service) = params.get("service") {
                    req = req.query(&[("service", service)]);
                }
                if let Some(basic) = basic {
                    req = req.header(reqwest::header::AUTHORIZATION, basic);
                }
                let resp = req.send().await.map_err(|e| UpstreamError::Unreachable {
                    registry: registry.into(),
                    reason: format!("token service: {e}"),
                })?;
                if !resp.status().is_success() {
                    return Err(refused(&format!("token service answered {}", resp.status())));
                }
                let body: TokenResponse = resp.json_or_err().await?;
                let token = body.token.or(body.access_token).ok_or_else(|| refused("token service sent no token"))?;
                let ttl = Duration::from_secs(body.expires_in.unwrap_or(60).saturating_sub(5).max(1));
                self.store(registry, scope, format!("Bearer {token}"), ttl);
                Ok(())
            }
            other => Err(refused(&format!("unsupported auth scheme {other}"))),
        }
    }
}

trait JsonOrErr {
    async fn json_or_err<T: serde::de::DeserializeOwned>(self) -> Result<T, UpstreamError>;
}

impl JsonOrErr for reqwest::Response {
    async fn json_or_err<T: serde::de::DeserializeOwned>(self) -> Result<T, UpstreamError> {
        let bytes = self.bytes().await.map_err(|e| UpstreamError::Protocol(format!("token body: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Protocol(format!("token body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "reg.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge("Basic realm=x").unwrap();
        assert_eq!((s.as_str(), p["realm"].as_str()), ("basic", "x"));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire() {
        let cache = TokenCache::default();
        cache.store("r", "s", "Bearer t".into(), Duration::from_secs(10));
        assert_eq!(cache.header("r", "s").as_deref(), Some("Bearer t"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(cache.header("r", "s"), None);
    }
}
