//! Minimum copies of pinned images: four agents on 127.0.0.x with `min_copies = 2`, the
//! upstream stopped once one node holds a pinned image.

use std::time::{Duration, Instant};

use clyde_tests::{Agent, Cluster, ImageFormat, Registry, TestImage, pull_image, wait_for};

const MIB: usize = 1024 * 1024;

/// Whether `agent` holds every blob of `digests` complete.
fn holds(agent: &Agent, digests: &[String]) -> bool {
    digests.iter().all(|d| agent.data_dir().join("blobs/sha256").join(d.trim_start_matches("sha256:")).is_file())
}

fn holders(nodes: &[&Agent], digests: &[String]) -> usize {
    nodes.iter().filter(|n| holds(n, digests)).count()
}

#[test]
fn a_pinned_image_keeps_two_copies_when_its_holder_dies_without_the_upstream() {
    let mut reg = Registry::start();
    let img = TestImage::single(&[4 * MIB, 2 * MIB, MIB]);
    img.push(&reg, "team/pinned", "v1", ImageFormat::Oci);
    let config = "[peers]\nlookup_timeout = \"1s\"\n\
                  [retention]\npinned = [\"/team/pinned:\"]\nmin_copies = 2\ncopies_interval = \"1s\"\n";
    let mut cluster = Cluster::start(4, config, &[]);

    // One node loads the pinned image; then the upstream is gone for good.
    let pulled = pull_image(&cluster.nodes[0].url(), &reg.addr(), "team/pinned", "v1");
    let digests = pulled.digests.clone();
    let upstream_bytes: u64 = img.layers.iter().map(|l| reg.blob_bytes_served(&l.digest)).sum();
    assert_eq!(upstream_bytes, img.layer_bytes());
    reg.stop();

    // Within a bounded time a second node holds it, and only one: they do not all rush.
    let started = Instant::now();
    let nodes: Vec<&Agent> = cluster.nodes.iter().collect();
    wait_for("a second copy", Duration::from_secs(30), || (holders(&nodes, &digests) >= 2).then_some(()));
    eprintln!("second copy after {:.1} s", started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holders(&nodes, &digests), 2, "more nodes than needed fetched the image");
    let second = nodes.iter().skip(1).position(|n| holds(n, &digests)).expect("the second holder") + 1;
    assert!(cluster.nodes[second].metric("clyde_peer_fetch_bytes_total") >= img.layer_bytes() as f64);

    // The first holder dies: another node fetches the image from the survivor.
    cluster.nodes[0].kill9();
    let died = Instant::now();
    let survivors: Vec<&Agent> = cluster.nodes[1..].iter().collect();
    wait_for("two copies again", Duration::from_secs(40), || (holders(&survivors, &digests) >= 2).then_some(()));
    eprintln!("two copies again {:.1} s after the holder died", died.elapsed().as_secs_f64());
    let third = (1..4).find(|i| *i != second && holds(&cluster.nodes[*i], &digests)).expect("a new holder");
    assert!(cluster.nodes[third].metric("clyde_peer_fetch_bytes_total") >= img.layer_bytes() as f64);
    assert!(cluster.nodes[third].log().contains("fewer copies than wanted; fetching"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holders(&survivors, &digests), 2, "more nodes than needed fetched the image");
    // Nothing came from the upstream after the first load (it is stopped; its log says so).
    let after: u64 = img.layers.iter().map(|l| reg.blob_bytes_served(&l.digest)).sum();
    assert_eq!(after, upstream_bytes);
}
