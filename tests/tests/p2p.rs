//! Several agents as real processes on 127.0.0.x, one swarm, a real upstream registry.

use std::time::{Duration, Instant};

use clyde_tests::{
    Cluster, Containerd, ImageFormat, Registry, SlowProxy, TestImage, assert_store_verified, http, pull_image, sha256,
    wait_for, wait_log, wait_store_holds,
};

const MIB: usize = 1024 * 1024;

/// These tests count upstream bytes exactly: a lookup must not lose a race against a busy
/// CI machine's scheduler and send a request upstream that a peer would have served.
const PATIENT_LOOKUPS: &str = "[peers]\nlookup_timeout = \"1s\"\n";

fn blob_url(mirror: &str, repo: &str, digest: &str, registry: &str) -> String {
    format!("{mirror}/v2/{repo}/blobs/{digest}?ns={registry}")
}

fn upstream_layer_bytes(reg: &Registry, img: &TestImage) -> u64 {
    img.layers.iter().map(|l| reg.blob_bytes_served(&l.digest)).sum()
}

#[test]
fn peers_serve_every_node_after_the_first_also_with_the_upstream_gone() {
    let mut reg = Registry::start();
    let img = TestImage::single(&[3 * MIB, 5 * MIB, MIB]);
    img.push(&reg, "team/app", "v1", ImageFormat::Oci);
    // Tags come from peers only among members of a cluster with a secret.
    let secret = clyde_tests::cluster::secret_file("peers-serve-every-node-0123456789abcdef");
    let cluster = Cluster::start(4, PATIENT_LOOKUPS, &["--cluster-secret-file", &secret]);
    let reference = format!("{}/team/app:v1", reg.addr());

    // Node 1: containerd pulls through its mirror; the blobs come from the upstream.
    let ctrd = Containerd::start();
    let (ok, out) = ctrd.pull(&ctrd.mirror_hosts_dir(&reg, &cluster.nodes[0]), &reference, &["--plain-http"]);
    assert!(ok, "pull through node 1 failed:\n{out}");
    let image_digest = ctrd.image_digest(&reference).expect("image digest");
    let first_content = ctrd.content();
    let egress = reg.wait_blob_bytes(&img.layers[0].digest, img.layers[0].size);
    assert_eq!(egress, img.layers[0].size);
    assert_eq!(upstream_layer_bytes(&reg, &img), img.layer_bytes());

    // Node 2, upstream up: every blob comes from node 1, the upstream sends no blob again.
    ctrd.remove(&reference);
    let (ok, out) = ctrd.pull(&ctrd.mirror_hosts_dir(&reg, &cluster.nodes[1]), &reference, &["--plain-http"]);
    assert!(ok, "pull through node 2 failed:\n{out}");
    assert_eq!(ctrd.image_digest(&reference).as_deref(), Some(image_digest.as_str()));
    assert_eq!(ctrd.content(), first_content);
    assert_eq!(upstream_layer_bytes(&reg, &img), img.layer_bytes(), "upstream sent a blob twice");

    // Nodes 3 and 4, upstream gone: the tag and every blob resolve through peers.
    reg.stop();
    for node in &cluster.nodes[2..] {
        let pulled = pull_image(&node.url(), &reg.addr(), "team/app", "v1");
        assert_eq!(pulled.digests[0], image_digest);
        for layer in &img.layers {
            assert!(pulled.digests.contains(&layer.digest));
        }
        let log = node.log();
        let tag_from_peer =
            |l: &str| l.contains("path=/v2/team/app/manifests/v1 status=200") && l.contains("source=\"peer\"");
        assert!(log.lines().any(tag_from_peer), "{log}");
        assert!(log.contains("source=\"peer\""), "{log}");
    }
    for node in &cluster.nodes {
        wait_store_holds(&node.data_dir(), img.layers.len() + 2);
    }
}

/// Two agents whose upstream is reached through a slow relay, and a blob of `size` there.
struct SlowUpstream {
    _reg: Registry,
    proxy: SlowProxy,
    cluster: Cluster,
    digest: String,
    size: u64,
    registry: String,
}

fn slow_upstream(size: usize, bytes_per_sec: u64) -> SlowUpstream {
    let reg = Registry::start();
    let img = TestImage::single(&[size]);
    img.push(&reg, "big", "v1", ImageFormat::Oci);
    let proxy = SlowProxy::start(&reg.addr(), bytes_per_sec);
    let config =
        format!("{PATIENT_LOOKUPS}[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n", reg.addr(), proxy.addr());
    let cluster = Cluster::start(2, &config, &[]);
    let layer = &img.layers[0];
    SlowUpstream { registry: reg.addr(), _reg: reg, proxy, cluster, digest: layer.digest.clone(), size: layer.size }
}

/// Starts a GET of the blob through `node` in a thread; returns the body's digest.
fn get_in_background(url: String) -> std::thread::JoinHandle<Result<String, String>> {
    std::thread::spawn(move || {
        let r = http().get(&url).send().map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("status {}", r.status()));
        }
        r.bytes().map(|b| sha256(&b)).map_err(|e| e.to_string())
    })
}

#[test]
fn a_blob_still_arriving_on_one_node_streams_to_another_and_leaves_the_upstream_once() {
    let s = slow_upstream(24 * MIB, 8 * MIB as u64);
    let [first, second] = &s.cluster.nodes[..] else { unreachable!() };
    let from_first = get_in_background(blob_url(&first.url(), "big", &s.digest, &s.registry));
    // Node 2 asks once node 1 is well into the download from the upstream.
    wait_for("node 1's download to start", Duration::from_secs(30), || {
        (s.proxy.relayed() > 4 * MIB as u64).then_some(())
    });
    assert!(s.proxy.relayed() < s.size / 2, "node 1 was too fast for this test to mean anything");
    let (_, _, body) = clyde_tests::timed_get(&blob_url(&second.url(), "big", &s.digest, &s.registry), &[]);
    assert_eq!(sha256(&body), s.digest);
    assert_eq!(from_first.join().expect("thread"), Ok(s.digest.clone()));
    let relayed = s.proxy.relayed();
    assert!(relayed <= s.size + s.size / 20, "the upstream sent {relayed} bytes for a {} byte blob", s.size);
    wait_store_holds(&second.data_dir(), 1);
}

#[test]
fn a_peer_killed_mid_transfer_is_replaced_and_forgotten_within_seconds() {
    let mut s = slow_upstream(24 * MIB, 8 * MIB as u64);
    let from_first = get_in_background(blob_url(&s.cluster.nodes[0].url(), "big", &s.digest, &s.registry));
    wait_for("node 1's download to start", Duration::from_secs(30), || {
        (s.proxy.relayed() > 2 * MIB as u64).then_some(())
    });
    // Node 2 streams from node 1 (still downloading), then node 1 dies.
    let url = blob_url(&s.cluster.nodes[1].url(), "big", &s.digest, &s.registry);
    let from_second = get_in_background(url);
    let partial = s.cluster.nodes[1].data_dir().join("partial").join(s.digest.replace(':', "/"));
    wait_for("node 2 to stream from node 1", Duration::from_secs(30), || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0).then_some(())
    });
    s.cluster.nodes[0].kill9();
    let killed = Instant::now();
    let _ = from_first.join();
    assert_eq!(from_second.join().expect("thread"), Ok(s.digest.clone()), "node 2's client saw the break");
    let second = &s.cluster.nodes[1];
    wait_log(second, "peer disconnected");
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_store_verified(&second.data_dir());
    assert!(second.log().contains("peer penalized"), "node 2 never noticed node 1 broke:\n{}", second.log());
}

/// Two agents started with `args`; node 1 fetched a `size`-byte layer of `rot:v1` through
/// its mirror, then one byte of its stored copy rotted at `rot_at`: it still serves it.
/// Returns the registry, the image, the agents and the layer's right bytes.
fn a_rotten_holder(size: usize, rot_at: usize, args: &[&str]) -> (Registry, TestImage, Cluster, Vec<u8>) {
    let reg = Registry::start();
    let img = TestImage::single(&[size]);
    img.push(&reg, "rot", "v1", ImageFormat::Oci);
    let cluster = Cluster::start(2, PATIENT_LOOKUPS, args);
    let (layer, first) = (&img.layers[0], &cluster.nodes[0]);
    let body = http()
        .get(blob_url(&first.url(), "rot", &layer.digest, &reg.addr()))
        .send()
        .expect("GET")
        .bytes()
        .expect("body");
    assert_eq!(sha256(&body), layer.digest);
    wait_store_holds(&first.data_dir(), 1);
    let path = first.data_dir().join("blobs").join(layer.digest.replace(':', "/"));
    let mut bytes = std::fs::read(&path).expect("stored layer");
    bytes[rot_at] ^= 0xff;
    std::fs::write(&path, &bytes).expect("rot");
    (reg, img, cluster, body.to_vec())
}

#[test]
fn bytes_from_a_corrupt_peer_never_enter_the_store() {
    let (reg, img, cluster, _) = a_rotten_holder(6 * MIB, 3 * MIB, &[]);
    let layer = &img.layers[0];
    let second = &cluster.nodes[1];

    let url = blob_url(&second.url(), "rot", &layer.digest, &reg.addr());
    let first_try = http().get(&url).send().expect("GET").bytes();
    assert!(first_try.is_err(), "a blob that does not verify must end in an aborted response, not a complete one");
    assert_eq!(assert_store_verified(&second.data_dir()), 0, "node 2 stored a blob that does not verify");
    // The peer is penalized: the next request goes to the upstream and gets the right bytes.
    let again = http().get(&url).send().expect("GET").bytes().expect("body");
    assert_eq!(sha256(&again), layer.digest);
    // The response ends once the bytes verify; the commit to the store follows right after.
    assert_eq!(wait_store_holds(&second.data_dir(), 1), 1);
    assert!(second.log().contains("did not verify"), "{}", second.log());
}

#[test]
fn with_a_secret_a_rotten_piece_is_fetched_again_and_the_first_response_is_right() {
    let secret = clyde_tests::cluster::secret_file("pieces-secret-0123456789abcdefghijklmnop");
    // Three pieces (4, 4 and 2 MiB), the second rotten; the piece hashes were recorded when
    // the blob verified.
    let (reg, img, cluster, body) = a_rotten_holder(10 * MIB, 5 * MIB, &["--cluster-secret-file", secret.as_str()]);
    let layer = &img.layers[0];
    let second = &cluster.nodes[1];

    let url = blob_url(&second.url(), "rot", &layer.digest, &reg.addr());
    let got = http().get(&url).send().expect("GET").bytes().expect("the first response is whole");
    assert_eq!(sha256(&got), layer.digest);
    let log = second.log();
    assert_eq!(second.metric("clyde_peer_pieces_total{result=\"corrupt\"}"), 1.0, "{log}");
    assert!(second.metric("clyde_peer_pieces_total{result=\"verified\"}") >= 1.0, "{log}");
    assert!(log.contains("does not match its hash") && !log.contains("did not verify"), "{log}");
    // Only what the rotten piece (and what followed it) needed came from the upstream again.
    assert!(reg.blob_bytes_served(&layer.digest) < 2 * layer.size, "the layer was fetched again whole");
    assert_eq!(wait_store_holds(&second.data_dir(), 1), 1);
    assert_store_verified(&second.data_dir());
    // A range over the rotten bytes from node 2, which now holds the layer: right bytes.
    let r = http().get(&url).header("Range", format!("bytes={}-{}", 5 * MIB - 10, 5 * MIB + 10)).send().unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap(), &body[5 * MIB - 10..=5 * MIB + 10]);
}

#[test]
fn bootstrap_by_dns_name_joins_the_swarm() {
    let reg = Registry::start();
    let img = TestImage::single(&[MIB]);
    img.push(&reg, "dns", "v1", ImageFormat::Oci);
    let first = clyde_tests::Agent::start(PATIENT_LOOKUPS, &[]);
    let port = first.p2p_addr().rsplit('/').next().expect("port").to_string();
    // `localhost` resolves to 127.0.0.1 (and ::1, which nobody listens on): every record is dialed.
    let name = format!("localhost:{port}");
    let second = clyde_tests::Agent::start_on("127.0.0.3", PATIENT_LOOKUPS, &["--bootstrap-dns", &name]);
    second.wait_ready();
    let layer = &img.layers[0];
    let body = http().get(blob_url(&first.url(), "dns", &layer.digest, &reg.addr())).send().unwrap().bytes().unwrap();
    assert_eq!(sha256(&body), layer.digest);
    let body = http().get(blob_url(&second.url(), "dns", &layer.digest, &reg.addr())).send().unwrap().bytes().unwrap();
    assert_eq!(sha256(&body), layer.digest);
    assert_eq!(reg.wait_blob_bytes(&layer.digest, layer.size), layer.size, "node 2 did not get the blob from node 1");
}

#[test]
fn p2p_only_mode_answers_404_fast_on_a_peer_miss_and_never_calls_the_upstream() {
    let reg = Registry::start();
    let img = TestImage::single(&[MIB]);
    img.push(&reg, "only", "v1", ImageFormat::Oci);
    let cluster = Cluster::start(2, "", &["--mode", "p2p-only"]);
    let before = reg.requests().len();
    let layer = &img.layers[0];
    let started = Instant::now();
    let r = http().get(blob_url(&cluster.nodes[1].url(), "only", &layer.digest, &reg.addr())).send().unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("BLOB_UNKNOWN"));
    let manifest = format!("{}/v2/only/manifests/v1?ns={}", cluster.nodes[1].url(), reg.addr());
    assert_eq!(http().get(manifest).send().unwrap().status(), 404);
    // Both misses wait at most the patient lookup (2 s) each.
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(reg.requests().len(), before, "p2p-only mode contacted the upstream");
}
