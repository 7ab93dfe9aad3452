//! A private registry (`private = true`): a real distribution registry with htpasswd users,
//! agents sharing a cluster secret, curl-like clients and a real containerd. Cached content
//! goes only to clients whose credentials the registry accepts for what they ask.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use clyde_tests::cluster::secret_file;
use clyde_tests::{
    Agent, Containerd, ImageFormat, Registry, RegistryOptions, TestImage, TokenGate, http, sha256, wait_for,
};

const MIB: usize = 1024 * 1024;
const SECRET: &str = "private-registry-secret-0123456789abcdef";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// `GET url` with an optional `Authorization`: status, `WWW-Authenticate`, body.
fn get(url: &str, authorization: Option<&str>) -> (u16, Option<String>, Vec<u8>) {
    let mut req = http().get(url).header("accept", ACCEPT);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let r = req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let challenge = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_string);
    (r.status().as_u16(), challenge, r.bytes().expect("body").to_vec())
}

/// The sum of `clyde_access_checks_total` samples whose labels contain every one of `labels`.
fn checks(agent: &Agent, labels: &[&str]) -> f64 {
    agent
        .metrics()
        .lines()
        .filter(|l| l.starts_with("clyde_access_checks_total{") && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

/// Body bytes an agent's mirror sent with a success status, every source together.
fn mirror_served(agent: &Agent) -> f64 {
    agent
        .metrics()
        .lines()
        .filter(|l| l.starts_with("clyde_served_bytes_total{api=\"mirror\""))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

fn config(registry: &Registry) -> String {
    format!(
        "[peers]\nlookup_timeout = \"1s\"\n\n[[registries]]\nname = \"{}\"\nprivate = true\n[registries.auth]\nusername = \"robot\"\npassword = \"robot-pw\"\n",
        registry.addr()
    )
}

#[test]
fn a_private_registry_is_refused_without_a_cluster_secret() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config(&reg)).expect("config");
    let out = Command::new(clyde_tests::agent::clyde_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--mirror-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0", "--p2p-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0", "--containerd-socket", ""])
        .output()
        .expect("run clyde serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an agent with a private registry and no secret started:\n{stderr}");
    assert!(stderr.contains("private = true needs --cluster-secret-file"), "{stderr}");
}

#[test]
fn cached_private_content_goes_only_to_clients_the_registry_accepts() {
    let reg = Registry::start_with(&RegistryOptions {
        basic_auth: Some(("robot", "robot-pw")),
        more_users: &[("alice", "alice-pw")],
        ..Default::default()
    });
    let img = TestImage::single(&[2 * MIB, 300_000]);
    img.push(&reg, "private/app", "v1", ImageFormat::Oci);
    let layer = img.layers[0].digest.clone();
    // A public registry beside it, with a repository of its own.
    let public = Registry::start();
    TestImage::single(&[50_000]).push(&public, "public/x", "v1", ImageFormat::Oci);

    let secret = secret_file(SECRET);
    let config = config(&reg);
    let a = Agent::start_on("127.0.0.2", &config, &["--cluster-secret-file", &secret]);
    let boot = a.p2p_addr();
    let b = Agent::start_on("127.0.0.3", &config, &["--cluster-secret-file", &secret, "--bootstrap", &boot]);
    b.wait_ready();
    let url = |agent: &Agent, path: &str| format!("{}/v2/private/app/{path}?ns={}", agent.url(), reg.addr());
    let alice = basic("alice", "alice-pw");
    let (status, _, upstream_manifest) =
        get(&format!("http://{}/v2/private/app/manifests/v1", reg.addr()), Some(&basic("robot", "robot-pw")));
    assert_eq!(status, 200);
    let manifest_digest = sha256(&upstream_manifest);
    let doc: serde_json::Value = serde_json::from_slice(&upstream_manifest).expect("manifest json");
    let blobs: Vec<String> = std::iter::once(&doc["config"])
        .chain(doc["layers"].as_array().expect("layers"))
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect();

    // Without credentials: the registry's own challenge, as if the client had asked it.
    let direct = http().head(format!("http://{}/v2/private/app/manifests/v1", reg.addr())).send().expect("HEAD");
    assert_eq!(direct.status().as_u16(), 401);
    let upstream_challenge = direct.headers()["www-authenticate"].to_str().expect("challenge").to_string();
    let (status, challenge, body) = get(&url(&a, "manifests/v1"), None);
    assert_eq!((status, challenge.as_deref()), (401, Some(upstream_challenge.as_str())));
    assert!(!body.windows(6).any(|w| w == b"layers"), "a refused client got a manifest");

    // With the right credentials: the image, every byte verified.
    let (status, _, manifest) = get(&url(&a, "manifests/v1"), Some(&alice));
    assert_eq!(status, 200);
    assert_eq!(sha256(&manifest), manifest_digest);
    for digest in &blobs {
        let (status, _, bytes) = get(&url(&a, &format!("blobs/{digest}")), Some(&alice));
        assert_eq!(status, 200, "blob {digest}");
        assert_eq!(&sha256(&bytes), digest);
    }

    // Wrong credentials, asked 6 times as containerd retries a refused login: 401 each
    // time, one question to the registry.
    let denied_before = checks(&a, &["check=\"client\"", "result=\"denied\"", "cached=\"false\""]);
    for _ in 0..6 {
        let (status, challenge, body) = get(&url(&a, &format!("blobs/{layer}")), Some(&basic("alice", "wrong")));
        assert_eq!((status, challenge.as_deref()), (401, Some(upstream_challenge.as_str())));
        assert!(body.len() < 1000, "a refused client got {} bytes", body.len());
    }
    assert_eq!(checks(&a, &["check=\"client\"", "result=\"denied\"", "cached=\"false\""]) - denied_before, 1.0);
    assert!(checks(&a, &["check=\"client\"", "result=\"denied\"", "cached=\"true\""]) >= 5.0);

    // Cached now, still refused to an anonymous client.
    let (status, _, body) = get(&url(&a, &format!("blobs/{layer}")), None);
    assert_eq!(status, 401);
    assert!(body.len() < 1000);

    // The layer's digest asked for under a public registry's name: that registry does not
    // hold it, so it is not served from the cache (and never from a peer).
    for agent in [&a, &b] {
        let cross = format!("{}/v2/public/x/blobs/{layer}?ns={}", agent.url(), public.addr());
        let (status, _, body) = get(&cross, None);
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
        assert!(body.len() < 1000);
    }
    assert!(
        public.log().contains(&format!("/v2/public/x/blobs/{layer}")),
        "the public registry was not asked whether it holds the layer"
    );

    // A registry that says yes to every `HEAD` (any local process can run one and name it
    // with `?ns=`) and then sends other bytes: neither the layer nor the manifest comes out.
    let liar = yes_to_every_head();
    for (what, path) in [("layer", format!("blobs/{layer}")), ("manifest", format!("manifests/{manifest_digest}"))] {
        let url = format!("{}/v2/x/y/{path}?ns={liar}", a.url());
        let (status, _, body) = get(&url, None);
        assert_eq!(status, 404, "the {what} was served on a lying registry's word");
        assert!(body.len() < 1000);
    }

    // A real containerd on the second node: without credentials the pull fails and the
    // mirror serves nothing; with them it pulls, the layers from the first node.
    let containerd = Containerd::start();
    let hosts = containerd.mirror_hosts_dir(&reg, &b);
    let reference = format!("{}/private/app:v1", reg.addr());
    let (ok, out) = containerd.pull(&hosts, &reference, &[]);
    assert!(!ok, "a pull without credentials succeeded:\n{out}");
    assert_eq!(mirror_served(&b), 0.0, "the mirror served bytes to a client without credentials");
    let (ok, out) = containerd.pull(&hosts, &reference, &["--user", "alice:alice-pw"]);
    assert!(ok, "ctr pull with alice's credentials failed:\n{out}\n{}", b.log());
    assert_eq!(containerd.image_digest(&reference).as_deref(), Some(manifest_digest.as_str()));
    let layer_bytes = img.layer_bytes() as f64;
    wait_for(&format!("the second node to count its peer bytes:\n{}", b.log()), Duration::from_secs(10), || {
        (b.metric("clyde_peer_fetch_bytes_total") >= layer_bytes).then_some(())
    });
    assert!(checks(&b, &["check=\"client\"", "result=\"granted\""]) >= 1.0);
    // The registry sent the layer once, to the first node.
    assert_eq!(reg.blob_bytes_served(&layer), img.layers[0].size);
}

#[test]
fn a_token_registrys_challenge_and_tokens_pass_through_the_check() {
    let reg = Registry::start();
    let img = TestImage::single(&[300_000]);
    img.push(&reg, "tok/app", "v1", ImageFormat::Oci);
    let layer = img.layers[0].digest.clone();
    let gate = TokenGate::start(&reg.addr(), "robot", "robot-pw", Duration::from_secs(60));
    let config = format!(
        "[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\nprivate = true\n[registries.auth]\nusername = \"robot\"\npassword = \"robot-pw\"\n",
        reg.addr(),
        gate.addr()
    );
    let agent = Agent::start(&config, &["--cluster-secret-file", &secret_file(SECRET)]);
    let url = format!("{}/v2/tok/app/blobs/{layer}?ns={}", agent.url(), reg.addr());

    // No token: the token service's challenge, realm, service and scope as it gave them.
    let (status, challenge, _) = get(&url, None);
    assert_eq!(status, 401);
    let challenge = challenge.expect("a challenge");
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"http://{}/token\",service=\"clyde-test\",scope=\"repository:tok/app:pull\"",
            gate.addr()
        )
    );
    // The client gets a token from the realm, as containerd does, and is served.
    let token_url = format!("http://{}/token?service=clyde-test&scope=repository:tok/app:pull", gate.addr());
    let token: serde_json::Value =
        http().get(token_url).basic_auth("robot", Some("robot-pw")).send().expect("token").json().expect("token json");
    let bearer = format!("Bearer {}", token["token"].as_str().expect("token"));
    let (status, _, bytes) = get(&url, Some(&bearer));
    assert_eq!(status, 200);
    assert_eq!(sha256(&bytes), layer);
    // A made-up token is refused, with the challenge again.
    let (status, challenge, body) = get(&url, Some("Bearer not-a-token"));
    assert_eq!(status, 401);
    assert!(challenge.is_some_and(|c| c.starts_with("Bearer realm=")));
    assert!(body.len() < 1000);
}

/// A stand-in registry on a free loopback port that answers every `HEAD` with `200` and
/// every `GET` with bytes of its own; its `IP:PORT`.
fn yes_to_every_head() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let body = "not the content you asked for";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes());
                if head.starts_with(b"GET") {
                    let _ = conn.write_all(body.as_bytes());
                }
            });
        }
    });
    addr
}
