//! Registries learned from `?ns=`, for pullers that send none.
//!
//! containerd resolves an image through the mirror first (a manifest request with `?ns=`); a
//! lazy puller such as the stargz snapshotter then reads the layers by a path without `?ns=`
//! (`/v2/team/app/blobs/sha256:…`). Such a path is taken for the registry that `?ns=` last
//! named for the same repository path, when there was one (else the path's own rules: a first
//! segment that looks like a host, else `docker.io`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use clyde_types::Registry;

/// Repository paths remembered at most (the oldest is forgotten first).
const CAPACITY: usize = 4096;

/// Repository path (as in the request, e.g. `team/app`) → the registry `?ns=` named for it.
#[derive(Default)]
pub struct Origins {
    seen: Mutex<HashMap<String, (Registry, Instant)>>,
}

impl Origins {
    /// Notes that `?ns=` named `registry` for the repository path `name`.
    pub fn learn(&self, name: &str, registry: &Registry) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= CAPACITY && !seen.contains_key(name) {
            let oldest = seen.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                seen.remove(&oldest);
            }
        }
        seen.insert(name.to_string(), (registry.clone(), Instant::now()));
    }

    /// The registry `?ns=` last named for the repository path `name`.
    pub fn registry_for(&self, name: &str) -> Option<Registry> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(name).map(|(r, _)| r.clone())
    }
}

/// The repository path of a `/v2/<name>/(manifests|blobs)/<ref>` request path.
pub fn repository_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, _) = rest.rsplit_once('/')?;
    let (name, _) = name.rsplit_once('/')?;
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_registry_per_repository_path() {
        let o = Origins::default();
        let reg = Registry::parse("reg.example:5000").unwrap();
        assert_eq!(o.registry_for("team/app"), None);
        o.learn("team/app", &reg);
        assert_eq!(o.registry_for("team/app"), Some(reg));
        assert_eq!(o.registry_for("team/other"), None);
    }

    #[test]
    fn forgets_the_oldest_past_capacity() {
        let o = Origins::default();
        let reg = Registry::parse("reg.example").unwrap();
        for i in 0..=CAPACITY {
            o.learn(&format!("r/{i}"), &reg);
        }
        assert_eq!(o.registry_for("r/0"), None);
        assert!(o.registry_for(&format!("r/{CAPACITY}")).is_some());
    }

    #[test]
    fn repository_paths() {
        assert_eq!(repository_path("/v2/team/app/blobs/sha256:ab"), Some("team/app"));
        assert_eq!(repository_path("/v2/app/manifests/v1"), Some("app"));
        assert_eq!(repository_path("/v2/manifests/v1"), None);
        assert_eq!(repository_path("/v2/"), None);
    }
}
