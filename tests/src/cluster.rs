//! Several agents as a swarm on loopback addresses (127.0.0.2, 127.0.0.3, ...), and a
//! client that pulls an image through one of them the way containerd does, verifying
//! every byte.

use std::time::Duration;

use crate::{Agent, http, sha256, wait_for};

/// Agents that joined one swarm.
pub struct Cluster {
    pub nodes: Vec<Agent>,
}

impl Cluster {
    /// Starts `n` agents with `config` and extra `args`; the first is the others' bootstrap
    /// peer. Returns once every agent is ready (joined the swarm).
    pub fn start(n: usize, config: &str, args: &[&str]) -> Self {
        let first = Agent::start_on("127.0.0.2", config, args);
        let boot = first.p2p_addr();
        let mut nodes = vec![first];
        for i in 1..n {
            let mut node_args: Vec<&str> = args.to_vec();
            node_args.extend(["--bootstrap", boot.as_str()]);
            nodes.push(Agent::start_on(&format!("127.0.0.{}", 2 + i), config, &node_args));
        }
        for node in &nodes {
            node.wait_ready();
        }
        Self { nodes }
    }
}

/// What a pull fetched.
#[derive(Debug, Default)]
pub struct Pulled {
    /// Digests of every manifest and blob, in order.
    pub digests: Vec<String>,
    /// Bytes of blobs (configs and layers).
    pub blob_bytes: u64,
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

fn get_verified(url: &str, digest: Option<&str>) -> Vec<u8> {
    // Retried briefly: a client whose connection was aborted (a peer sent bad bytes) tries
    // again, as containerd does.
    let mut last = String::new();
    for _ in 0..3 {
        match http().get(url).header("accept", ACCEPT).send() {
            Ok(r) if r.status().is_success() => match r.bytes() {
                Ok(b) if digest.is_none_or(|d| sha256(&b) == d) => return b.to_vec(),
                Ok(b) => last = format!("body hashes to {}", sha256(&b)),
                Err(e) => last = e.to_string(),
            },
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("GET {url}: {last}");
}

/// Pulls `repo:tag` of the upstream `registry` through the mirror at `mirror_url`: the
/// manifest (every platform of an index), then every config and layer, checking each digest.
pub fn pull_image(mirror_url: &str, registry: &str, repo: &str, tag: &str) -> Pulled {
    let mut pulled = Pulled::default();
    let top = get_verified(&format!("{mirror_url}/v2/{repo}/manifests/{tag}?ns={registry}"), None);
    pulled.digests.push(sha256(&top));
    let doc: serde_json::Value = serde_json::from_slice(&top).expect("manifest json");
    let mut manifests = Vec::new();
    match doc.get("manifests").and_then(|m| m.as_array()) {
        Some(children) => {
            for child in children {
                let d = child["digest"].as_str().expect("digest");
                let url = format!("{mirror_url}/v2/{repo}/manifests/{d}?ns={registry}");
                manifests.push(serde_json::from_slice(&get_verified(&url, Some(d))).expect("json"));
                pulled.digests.push(d.to_string());
            }
        }
        None => manifests.push(doc),
    }
    for m in manifests {
        let blobs = std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten());
        for blob in blobs {
            let d = blob["digest"].as_str().expect("digest");
            let bytes = get_verified(&format!("{mirror_url}/v2/{repo}/blobs/{d}?ns={registry}"), Some(d));
            pulled.blob_bytes += bytes.len() as u64;
            pulled.digests.push(d.to_string());
        }
    }
    pulled
}

/// Waits until `agent`'s log shows `needle`.
pub fn wait_log(agent: &Agent, needle: &str) {
    wait_for(&format!("{needle:?} in the agent's log"), Duration::from_secs(30), || {
        agent.log().contains(needle).then_some(())
    });
}

/// A file holding a cluster secret (made once per secret and kept for the life of the test
/// process), for `--cluster-secret-file`.
pub fn secret_file(secret: &str) -> String {
    let dir = std::env::temp_dir().join(format!("clyde-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("secret dir");
    let path = dir.join(sha256(secret.as_bytes()));
    std::fs::write(&path, format!("{secret}\n")).expect("write secret");
    path.display().to_string()
}

/// The `Authorization` a member holding `secret` sends with `GET path_and_query` to a peer port.
pub fn member_auth(secret: &str, path_and_query: &str) -> String {
    let members =
        clyde_types::Membership::new(vec![clyde_types::ClusterSecret::parse(secret.as_bytes()).expect("secret")])
            .expect("one secret");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    members.authorization("GET", path_and_query, now)
}
