//! Cluster membership: agents holding the cluster secret on 127.0.0.x, outsiders beside
//! them on the same network, a real upstream registry, and a rogue one.

use clyde_tests::cluster::{member_auth, secret_file};
use std::time::Duration;

use clyde_tests::{Agent, ImageFormat, Registry, TestImage, http, pull_image, sha256, wait_for};

const MIB: usize = 1024 * 1024;
const SECRET: &str = "members-secret-0123456789abcdefghijklmnop";
const OTHER_SECRET: &str = "another-secret-0123456789abcdefghijklmnop";
/// Lookups patient enough for a busy CI machine: a miss here must mean "nobody", not "late".
const CONFIG: &str = "[peers]\nlookup_timeout = \"1s\"\n";

/// Bytes an agent's peer port served, every source together.
fn peer_served(agent: &Agent) -> f64 {
    agent
        .metrics()
        .lines()
        .filter(|l| l.starts_with("clyde_served_bytes_total{api=\"peer\""))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

/// Waits until `agent` advertises at least `n` keys (what it pulled is in the DHT).
fn wait_advertised(agent: &Agent, n: f64) {
    wait_for(&format!("the agent to advertise {n} keys:\n{}", agent.metrics()), Duration::from_secs(20), || {
        (agent.metric("clyde_advertised_keys") >= n).then_some(())
    });
}

fn start(ip: &str, secret: Option<&str>, boot: Option<&Agent>, config: &str) -> Agent {
    let file = secret.map(secret_file);
    let boot = boot.map(Agent::p2p_addr);
    let mut args: Vec<&str> = Vec::new();
    if let Some(f) = &file {
        args.extend(["--cluster-secret-file", f.as_str()]);
    }
    if let Some(b) = &boot {
        args.extend(["--bootstrap", b.as_str()]);
    }
    Agent::start_on(ip, config, &args)
}

fn manifest_digest(mirror: &str, registry: &str, repo: &str, tag: &str) -> (u16, Option<String>) {
    let url = format!("{mirror}/v2/{repo}/manifests/{tag}?ns={registry}");
    // No `Accept`: every manifest type, as the tag's main answer (not a narrow variant).
    let r = http().get(url).send().expect("get manifest");
    let status = r.status().as_u16();
    let body = r.bytes().expect("body");
    (status, (status == 200).then(|| sha256(&body)))
}

#[test]
fn only_members_read_advertise_or_share_tags() {
    let mut reg = Registry::start();
    let shared = TestImage::single(&[2 * MIB, MIB]);
    shared.push(&reg, "team/app", "v1", ImageFormat::Oci);
    let outsiders = TestImage::single(&[MIB]);
    outsiders.push(&reg, "solo/app", "v1", ImageFormat::Oci);
    let registry = reg.addr();

    let m1 = start("127.0.0.2", Some(SECRET), None, CONFIG);
    let m2 = start("127.0.0.3", Some(SECRET), Some(&m1), CONFIG);
    let m3 = start("127.0.0.4", Some(SECRET), Some(&m1), CONFIG);
    // On the same network, told where the members are, with another secret.
    let outsider = start("127.0.0.5", Some(OTHER_SECRET), Some(&m1), CONFIG);
    for m in [&m1, &m2, &m3] {
        m.wait_ready();
    }
    assert_eq!(outsider.readyz(), 503, "the outsider joined:\n{}", outsider.log());

    // A member pulls from the upstream; the outsider pulling the same image gets nothing
    // from the members: every byte comes from the upstream again.
    let first = pull_image(&m1.url(), &registry, "team/app", "v1");
    let again = pull_image(&outsider.url(), &registry, "team/app", "v1");
    assert_eq!(first.digests, again.digests);
    assert_eq!(outsider.metric("clyde_peer_fetch_bytes_total"), 0.0, "{}", outsider.log());
    for layer in &shared.layers {
        assert_eq!(reg.blob_bytes_served(&layer.digest), 2 * layer.size, "the outsider's pull left the upstream");
    }
    // The outsider holds an image no member has; its advertisements never reach a member.
    pull_image(&outsider.url(), &registry, "solo/app", "v1");

    // A plain client on the network gets 401 and not one content byte from a peer port.
    let layer = &shared.layers[0];
    let path = format!("/v2/team/app/blobs/{}?ns={registry}", layer.digest);
    let url = format!("http://{}{path}", m1.peer_addr());
    let r = http().get(&url).send().expect("get");
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Clyde-Member");
    let body = r.bytes().expect("body");
    assert!(body.len() < 1024 && String::from_utf8_lossy(&body).contains("UNAUTHORIZED"), "{body:?}");
    let outsider_auth = member_auth(OTHER_SECRET, &path);
    assert_eq!(http().get(&url).header("Authorization", outsider_auth).send().expect("get").status(), 401);
    // A member's signature for another path does not open this one.
    let other_path = member_auth(SECRET, &format!("/v2/team/app/blobs/{}?ns={registry}", shared.layers[1].digest));
    assert_eq!(http().get(&url).header("Authorization", other_path).send().expect("get").status(), 401);
    let member = http().get(&url).header("Authorization", member_auth(SECRET, &path)).send().expect("get");
    assert_eq!(member.status(), 200);
    assert_eq!(sha256(&member.bytes().expect("body")), layer.digest);
    let served_before = peer_served(&m1);

    // Manifest, config, two layers, and the tag.
    wait_advertised(&m1, 5.0);
    // The upstream goes away. A member resolves the tag through another member (which
    // resolved it from the upstream within the tag TTL) and fetches every blob from peers.
    reg.stop();
    let through_peers = pull_image(&m2.url(), &registry, "team/app", "v1");
    assert_eq!(through_peers.digests, first.digests);
    let tag_from_peer =
        |l: &&str| l.contains("path=/v2/team/app/manifests/v1 status=200") && l.contains("source=\"peer\"");
    assert!(m2.log().lines().any(|l| tag_from_peer(&l)), "{}", m2.log());
    assert!(m2.metric("clyde_peer_fetch_bytes_total") >= shared.layer_bytes() as f64);
    assert!(peer_served(&m1) > served_before);
    // What only the outsider holds is nowhere for a member.
    let (status, _) = manifest_digest(&m3.url(), &registry, "solo/app", "v1");
    assert_ne!(status, 200, "a member took the outsider's tag:\n{}", m3.log());
    let url = format!("{}/v2/solo/app/blobs/{}?ns={registry}", m3.url(), outsiders.layers[0].digest);
    assert_ne!(http().get(url).send().expect("get").status(), 200, "{}", m3.log());
    assert_eq!(peer_served(&outsider), 0.0, "the outsider served a member:\n{}", outsider.log());
}

/// An agent whose `[[registries]]` entry sends the real registry's name to another
/// registry caches a different image under the real tag and advertises it.
fn rogue_config(real: &Registry, rogue: &Registry) -> String {
    format!("{CONFIG}[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\nscheme = \"http\"\n", real.addr(), rogue.addr())
}

#[test]
fn a_rogue_agent_never_chooses_what_a_node_runs() {
    let mut real = Registry::start();
    let rogue_reg = Registry::start();
    TestImage::single(&[MIB]).push(&real, "team/app", "v1", ImageFormat::Oci);
    TestImage::single(&[MIB]).push(&rogue_reg, "team/app", "v1", ImageFormat::Oci);
    let registry = real.addr();
    let rogue_config = rogue_config(&real, &rogue_reg);

    // Default agents (no secret): the victim beside a rogue.
    let victim = start("127.0.0.6", None, None, CONFIG);
    let rogue = start("127.0.0.7", None, Some(&victim), &rogue_config);
    victim.wait_ready();
    rogue.wait_ready();
    // Members, and a rogue with another secret among them.
    let m1 = start("127.0.0.8", Some(SECRET), None, CONFIG);
    let m2 = start("127.0.0.9", Some(SECRET), Some(&m1), CONFIG);
    let rogue_outsider = start("127.0.0.10", Some(OTHER_SECRET), Some(&m1), &rogue_config);
    m1.wait_ready();
    m2.wait_ready();

    let (status, real_digest) = manifest_digest(&m1.url(), &registry, "team/app", "v1");
    assert_eq!(status, 200);
    let (_, rogue_digest) = manifest_digest(&rogue.url(), &registry, "team/app", "v1");
    let (_, also_rogue) = manifest_digest(&rogue_outsider.url(), &registry, "team/app", "v1");
    assert!(rogue_digest.is_some() && rogue_digest != real_digest);
    assert_eq!(also_rogue, rogue_digest);

    // Manifest, config, layer, and the tag.
    wait_advertised(&rogue, 2.0);
    wait_advertised(&m1, 2.0);
    // The real upstream refuses: nobody serves the rogue's manifest.
    real.stop();
    let (status, digest) = manifest_digest(&victim.url(), &registry, "team/app", "v1");
    assert_ne!(digest, rogue_digest, "the victim served the rogue's image:\n{}", victim.log());
    assert_ne!(status, 200, "{}", victim.log());
    // With a secret, the member that cached the real tag serves it.
    let (status, digest) = manifest_digest(&m2.url(), &registry, "team/app", "v1");
    assert_eq!((status, digest), (200, real_digest), "{}", m2.log());
}

/// Manifest requests (`GET` and `HEAD`) agents sent the registry, from its log.
fn manifest_requests(reg: &Registry) -> usize {
    reg.requests().iter().filter(|(_, uri, _, ua)| uri.contains("/manifests/") && ua.starts_with("clyde")).count()
}

#[test]
fn members_resolve_a_tag_another_member_checked_within_the_ttl_without_asking_the_upstream() {
    let reg = Registry::start();
    let img = TestImage::single(&[MIB]);
    img.push(&reg, "team/shared", "v1", ImageFormat::Oci);
    let config = format!("tag_ttl = \"3s\"\n{CONFIG}");
    let a = start("127.0.0.2", Some(SECRET), None, &config);
    let b = start("127.0.0.3", Some(SECRET), Some(&a), &config);
    b.wait_ready();

    // The first member asks the upstream; the second takes the tag from it.
    let (status, first) = manifest_digest(&a.url(), &reg.addr(), "team/shared", "v1");
    assert_eq!(status, 200);
    let asked = manifest_requests(&reg);
    assert_eq!(asked, 1);
    wait_advertised(&a, 2.0);
    let (status, second) = manifest_digest(&b.url(), &reg.addr(), "team/shared", "v1");
    assert_eq!((status, &second), (200, &first));
    assert_eq!(manifest_requests(&reg), asked, "the second member asked the upstream for a tag a member had checked");

    // Past the TTL, the first member checks it again (one request); the second, due too,
    // takes that newer check instead of asking the upstream.
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(manifest_digest(&a.url(), &reg.addr(), "team/shared", "v1"), (200, first.clone()));
    let asked = manifest_requests(&reg);
    assert_eq!(asked, 2, "the first member's check of a stale tag");
    assert_eq!(manifest_digest(&b.url(), &reg.addr(), "team/shared", "v1"), (200, first));
    assert_eq!(manifest_requests(&reg), asked, "the second member checked a tag a member had just checked");
}
