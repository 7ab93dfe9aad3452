//! Minimum copies of pinned images: four agents on 127.0.0.x sharing a cluster secret with
//! `min_copies = 2`, the upstream stopped once one node holds a pinned image.

use std::time::{Duration, Instant};

use clyde_tests::{Agent, Cluster, Containerd, ImageFormat, Registry, TestImage, http, pull_image, sha256, wait_for};

const MIB: usize = 1024 * 1024;

/// Whether `agent` holds every blob of `digests` complete.
fn holds(agent: &Agent, digests: &[String]) -> bool {
    digests.iter().all(|d| agent.data_dir().join("blobs/sha256").join(d.trim_start_matches("sha256:")).is_file())
}

/// Pulls the first platform of a multi-arch image through `agent`'s mirror, as a node of
/// that platform does; returns the platform manifest's digest and its blobs' (all verified).
fn pull_one_platform(agent: &Agent, registry: &str, repo: &str, tag: &str) -> Vec<String> {
    let get = |what: &str, accept: &str| {
        let url = format!("{}/v2/{repo}/{what}?ns={registry}", agent.url());
        let body = http().get(url).header("Accept", accept).send().expect("get").bytes().expect("body");
        body.to_vec()
    };
    // containerd's `Accept`: the tag is recorded as the tag itself, not a narrow variant.
    let accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json, \
                  application/vnd.docker.distribution.manifest.v2+json";
    let index: serde_json::Value = serde_json::from_slice(&get(&format!("manifests/{tag}"), accept)).expect("index");
    let child = index["manifests"][0]["digest"].as_str().expect("a platform").to_string();
    let bytes = get(&format!("manifests/{child}"), accept);
    assert_eq!(sha256(&bytes), child);
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest");
    let mut digests = vec![child];
    let blobs = std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().into_iter().flatten());
    for blob in blobs {
        let d = blob["digest"].as_str().expect("digest").to_string();
        assert_eq!(sha256(&get(&format!("blobs/{d}"), "*/*")), d);
        digests.push(d);
    }
    digests
}

fn holders(nodes: &[&Agent], digests: &[String]) -> usize {
    nodes.iter().filter(|n| holds(n, digests)).count()
}

#[test]
fn a_pinned_image_keeps_two_copies_when_its_holder_dies_without_the_upstream() {
    let mut reg = Registry::start();
    let img = TestImage::single(&[4 * MIB, 2 * MIB, MIB]);
    img.push(&reg, "team/pinned", "v1", ImageFormat::Oci);
    let multi = TestImage::multi_arch(&[MIB, MIB]);
    multi.push(&reg, "team/pinned-multi", "v1", ImageFormat::Oci);
    let config = "[peers]\nlookup_timeout = \"1s\"\n\
                  [retention]\npinned = [\"/team/pinned(-multi)?:\"]\nmin_copies = 2\ncopies_interval = \"1s\"\n";
    // Which images are pinned, and where, is taken from members only.
    let secret = clyde_tests::cluster::secret_file("copies-test-secret-0123456789abcdefghij");
    let mut cluster = Cluster::start(4, config, &["--cluster-secret-file", &secret]);

    // One node loads the pinned image; then the upstream is gone for good.
    let pulled = pull_image(&cluster.nodes[0].url(), &reg.addr(), "team/pinned", "v1");
    let digests = pulled.digests.clone();
    // A multi-arch image of which the node pulled one platform: that platform is kept.
    let platform = pull_one_platform(&cluster.nodes[0], &reg.addr(), "team/pinned-multi", "v1");
    let upstream_bytes: u64 = img.layers.iter().map(|l| reg.blob_bytes_served(&l.digest)).sum();
    assert_eq!(upstream_bytes, img.layer_bytes());
    reg.stop();

    // Within a bounded time a second node holds it, and only one: they do not all rush.
    let started = Instant::now();
    let nodes: Vec<&Agent> = cluster.nodes.iter().collect();
    let copied = clyde_tests::poll(Duration::from_secs(30), || {
        (holders(&nodes, &digests) >= 2 && holders(&nodes, &platform) >= 2).then_some(())
    });
    if copied.is_none() {
        for n in &nodes {
            let log = n.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("copies") || l.contains("pins")).collect();
            eprintln!("---\n{}", lines.join("\n"));
        }
        panic!("no second copy within 30 s");
    }
    eprintln!("second copy after {:.1} s", started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holders(&nodes, &digests), 2, "more nodes than needed fetched the image");
    assert_eq!(holders(&nodes, &platform), 2, "more nodes than needed fetched the platform");
    let second = nodes.iter().skip(1).position(|n| holds(n, &digests)).expect("the second holder") + 1;
    assert!(cluster.nodes[second].metric("clyde_peer_fetch_bytes_total") >= img.layer_bytes() as f64);

    // The first holder dies: another node fetches the image from the survivor.
    cluster.nodes[0].kill9();
    let died = Instant::now();
    let survivors: Vec<&Agent> = cluster.nodes[1..].iter().collect();
    wait_for("two copies again", Duration::from_secs(40), || {
        (holders(&survivors, &digests) >= 2 && holders(&survivors, &platform) >= 2).then_some(())
    });
    eprintln!("two copies again {:.1} s after the holder died", died.elapsed().as_secs_f64());
    let third = (1..4).find(|i| *i != second && holds(&cluster.nodes[*i], &digests)).expect("a new holder");
    assert!(cluster.nodes[third].metric("clyde_peer_fetch_bytes_total") >= img.layer_bytes() as f64);
    assert!(cluster.nodes[third].log().contains("fewer copies than wanted; fetching"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holders(&survivors, &digests), 2, "more nodes than needed fetched the image");
    assert_eq!(holders(&survivors, &platform), 2, "more nodes than needed fetched the platform");
    // A real containerd on the new holder's node pulls the image by tag, the upstream gone:
    // the copy came with its tag (the first holder had resolved it within the tag TTL).
    let ctrd = Containerd::start();
    let reference = format!("{}/team/pinned:v1", reg.addr());
    let hosts = ctrd.mirror_hosts_dir(&reg, &cluster.nodes[third]);
    let (ok, out) = ctrd.pull(&hosts, &reference, &["--plain-http"]);
    assert!(ok, "containerd pull through the new holder failed:\n{out}\n{}", cluster.nodes[third].log());
    assert_eq!(ctrd.image_digest(&reference).as_deref(), Some(digests[0].as_str()));
    // Nothing came from the upstream after the first load (it is stopped; its log says so).
    let after: u64 = img.layers.iter().map(|l| reg.blob_bytes_served(&l.digest)).sum();
    assert_eq!(after, upstream_bytes);
}
