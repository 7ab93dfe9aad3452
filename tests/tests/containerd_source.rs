//! containerd's content store as a source: what a node's containerd holds (pulled without
//! the mirror) is advertised and served to other nodes, withdrawn when containerd deletes
//! it, and followed across containerd restarts. Real containerd, real registry, two agents
//! on 127.0.0.2 and 127.0.0.3.

use std::time::{Duration, Instant};

use clyde_tests::cluster::{member_auth, secret_file};
use clyde_tests::{Agent, Containerd, ImageFormat, Registry, TestImage, http, poll, wait_for};

const MIB: usize = 1024 * 1024;
const PATIENT_LOOKUPS: &str = "[peers]\nlookup_timeout = \"1s\"\n";

/// An agent sharing `ctrd`'s content: over gRPC, or from its content directory.
fn agent_sharing(ctrd: &Containerd, grpc_only: bool) -> Agent {
    let secret = secret_file(SECRET);
    let mut args = ctrd.sharing_args(!grpc_only);
    args.extend(["--cluster-secret-file".to_string(), secret]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_on("127.0.0.2", "", &args)
}

/// Tags come from peers only in a cluster with a secret: A and B share one.
const SECRET: &str = "containerd-source-test-0123456789abcdef";

/// A GET to a peer port, signed as a member.
fn member_get(peer_addr: &str, path: &str) -> reqwest::blocking::RequestBuilder {
    http().get(format!("http://{peer_addr}{path}")).header("Authorization", member_auth(SECRET, path))
}

fn pull_direct(ctrd: &Containerd, reference: &str) {
    let (ok, out) = ctrd.pull(&ctrd.hosts_dir(), reference, &["--plain-http"]);
    assert!(ok, "direct pull failed: {out}");
}

fn store_blobs(agent: &Agent) -> usize {
    std::fs::read_dir(agent.data_dir().join("blobs/sha256")).map_or(0, |d| d.count())
}

fn share_and_pull(grpc_only: bool) {
    let mut reg = Registry::start();
    let img = TestImage::single(&[MIB, 2 * MIB]);
    img.push(&reg, "shared", "v1", ImageFormat::Oci);
    let later = TestImage::single(&[MIB]);
    later.push(&reg, "later", "v1", ImageFormat::Oci);
    let reference = format!("{}/shared:v1", reg.addr());

    // Node A's containerd pulls straight from the registry; Clyde on A never sees the pull.
    let mut ctrd_a = Containerd::start();
    pull_direct(&ctrd_a, &reference);
    let a = agent_sharing(&ctrd_a, grpc_only);
    let secret = secret_file(SECRET);
    let b = Agent::start_on(
        "127.0.0.3",
        PATIENT_LOOKUPS,
        &["--bootstrap", &a.p2p_addr(), "--cluster-secret-file", &secret],
    );
    b.wait_ready();
    // Manifest, config, two layers, and the tag.
    let advertised = poll(Duration::from_secs(20), || (a.metric("clyde_advertised_keys") >= 5.0).then_some(()));
    assert!(advertised.is_some(), "A did not advertise containerd's content:\n{}", a.log());
    assert_eq!(store_blobs(&a), 0, "A's own store stays empty");
    // A's peer port serves containerd's copy, whole and by range.
    let layer = &img.layers[1];
    let peer_path = format!("/v2/shared/blobs/{}?ns={}", layer.digest, reg.addr());
    let whole = member_get(&a.peer_addr(), &peer_path).send().expect("get").bytes().expect("body");
    assert_eq!(clyde_tests::sha256(&whole), layer.digest);
    let part = member_get(&a.peer_addr(), &peer_path).header("Range", "bytes=1000-1999").send().expect("range");
    assert_eq!(part.status(), 206);
    let total = layer.size;
    assert_eq!(part.headers()["content-range"].to_str().unwrap_or(""), format!("bytes 1000-1999/{total}"));
    assert_eq!(part.bytes().expect("body"), whole.slice(1000..2000));

    // The upstream is gone: B's containerd pulls through B's mirror, from A's containerd.
    reg.stop();
    let ctrd_b = Containerd::start();
    let (ok, out) = ctrd_b.pull(&ctrd_b.mirror_hosts_dir(&reg, &b), &reference, &[]);
    assert!(ok, "pull through B failed: {out}\nB:\n{}\nA:\n{}", b.log(), a.log());
    assert_eq!(ctrd_b.image_digest(&reference), ctrd_a.image_digest(&reference));
    let layers = img.layer_bytes() as f64;
    assert!(b.metric("clyde_peer_fetch_bytes_total") >= layers, "B fetched from peers:\n{}", b.log());
    assert!(a.metric("clyde_served_bytes_total{api=\"peer\",source=\"local\"}") >= layers);
    assert_eq!(store_blobs(&a), 0, "A served containerd's bytes, not its own");

    // containerd on A restarts (Clyde reconnects and lists again); an image it pulls
    // afterwards, with the registry back for that pull only, is shared too.
    let before = a.metric("clyde_advertised_keys");
    ctrd_a.restart();
    reg.restart();
    pull_direct(&ctrd_a, &format!("{}/later:v1", reg.addr()));
    reg.stop();
    wait_for("A to advertise the image pulled after the restart", Duration::from_secs(20), || {
        (a.metric("clyde_advertised_keys") >= before + 4.0).then_some(())
    });
    assert!(a.log().contains("lost containerd; reconnecting"), "{}", a.log());
    let url = format!("{}/v2/later/blobs/{}?ns={}", b.url(), later.layers[0].digest, reg.addr());
    let body = http().get(url).send().expect("get").bytes().expect("body");
    assert_eq!(clyde_tests::sha256(&body), later.layers[0].digest, "{}", b.log());

    // containerd deletes the first image on A: A withdraws its keys within seconds and its
    // peer port no longer serves them.
    let advertised = a.metric("clyde_advertised_keys");
    ctrd_a.remove(&reference);
    let started = Instant::now();
    wait_for("A to withdraw the deleted image", Duration::from_secs(10), || {
        (a.metric("clyde_advertised_keys") <= advertised - 5.0).then_some(())
    });
    eprintln!("withdrawn {:?} after containerd deleted the image", started.elapsed());
    let peer_path = format!("/v2/shared/blobs/{}?ns={}", img.layers[0].digest, reg.addr());
    assert_eq!(member_get(&a.peer_addr(), &peer_path).send().expect("get").status(), 404);
    // B drops its own copy (through its admin socket): nobody has the layer now, and B
    // answers 404 at once instead of trying A.
    let out = std::process::Command::new(clyde_tests::agent::clyde_bin())
        .args(["prune", "--pattern", "/shared:"])
        .arg("--data-dir")
        .arg(b.data_dir())
        .output()
        .expect("clyde prune");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started = Instant::now();
    let url = format!("{}/v2/shared/blobs/{}?ns={}", b.url(), img.layers[0].digest, reg.addr());
    assert_eq!(http().get(url).send().expect("get").status(), 404, "{}", b.log());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn a_peer_pulls_from_another_nodes_containerd_over_grpc() {
    share_and_pull(true);
}

#[test]
fn a_peer_pulls_from_another_nodes_containerd_content_directory() {
    share_and_pull(false);
}

/// What `discard_unpacked_layers = true` does (containerd drops layer blobs once unpacked),
/// done here with `ctr content rm` (the CRI plugin that has the option is not run in the
/// tests): the layers A's containerd pulled through A's mirror stay in Clyde's store, stay
/// advertised, and B gets them from there.
#[test]
fn layers_containerd_discarded_after_unpack_are_still_shared_from_clydes_store() {
    let mut reg = Registry::start();
    let img = TestImage::single(&[MIB, 2 * MIB]);
    img.push(&reg, "discard", "v1", ImageFormat::Oci);
    let reference = format!("{}/discard:v1", reg.addr());
    let ctrd_a = Containerd::start();
    let a = agent_sharing(&ctrd_a, true);
    let (ok, out) = ctrd_a.pull(&ctrd_a.mirror_hosts_dir(&reg, &a), &reference, &[]);
    assert!(ok, "pull through A failed: {out}");
    for layer in &img.layers {
        let path = a.data_dir().join("blobs").join(layer.digest.replace(':', "/"));
        let held = poll(Duration::from_secs(10), || path.exists().then_some(()));
        assert!(held.is_some(), "A's store does not hold {}:\n{}", layer.digest, a.log());
    }
    let advertised = a.metric("clyde_advertised_keys");
    let layers: Vec<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
    let mut rm = vec!["content", "rm"];
    rm.extend(&layers);
    clyde_tests::run(&mut ctrd_a.ctr(&rm));
    let content = ctrd_a.content();
    assert!(layers.iter().all(|l| !content.iter().any(|c| c.contains(l))), "containerd still has the layers");
    // Still advertised: Clyde's store holds them even though containerd let them go.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(a.metric("clyde_advertised_keys"), advertised);

    let secret = secret_file(SECRET);
    let b = Agent::start_on(
        "127.0.0.3",
        PATIENT_LOOKUPS,
        &["--bootstrap", &a.p2p_addr(), "--cluster-secret-file", &secret],
    );
    b.wait_ready();
    reg.stop();
    let ctrd_b = Containerd::start();
    let (ok, out) = ctrd_b.pull(&ctrd_b.mirror_hosts_dir(&reg, &b), &reference, &[]);
    assert!(ok, "pull through B failed: {out}\nB:\n{}", b.log());
    assert!(b.metric("clyde_peer_fetch_bytes_total") >= img.layer_bytes() as f64, "{}", b.log());
}
