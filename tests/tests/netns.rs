//! The realistic suite: every node in a network namespace of its own, with its own
//! containerd pulling through its own `127.0.0.1:30021`, and the upstream on another host of
//! the lab whose bandwidth `tc` limits where a test needs a slow upstream.

use std::time::{Duration, Instant};

use clyde_tests::{LabCluster, TestImage, wait_for, wait_log, wait_store_holds};

const MIB: usize = 1024 * 1024;

/// Egress is counted exactly: lookups get time enough on a busy CI machine.
const PATIENT_LOOKUPS: &str = "[peers]\nlookup_timeout = \"1s\"\n";

fn cluster(n: usize, layers: &[usize], upstream_rate: Option<&str>) -> LabCluster {
    LabCluster::start(n, TestImage::single(layers), "team/app", upstream_rate, PATIENT_LOOKUPS)
}

/// `ctr images pull` on node `i` through its own mirror; returns the image digest.
fn pull(c: &LabCluster, i: usize) -> String {
    let (ok, out) = c.try_pull(i);
    assert!(ok, "pull on node {i} failed:\n{out}\nagent log:\n{}", c.nodes[i].agent.log());
    c.nodes[i].ctrd.image_digest(&c.reference).expect("pulled image")
}

fn partial_exists(c: &LabCluster, i: usize, digest: &str) -> bool {
    c.nodes[i].agent.data_dir().join("partial").join(digest.replace(':', "/")).exists()
}

#[test]
fn sequential_scale_out_takes_each_blob_from_the_upstream_once() {
    let c = cluster(3, &[8 * MIB, 4 * MIB, 2 * MIB], None);
    let digest = pull(&c, 0);
    for i in 1..c.nodes.len() {
        assert_eq!(pull(&c, i), digest);
    }
    assert_eq!(c.upstream_layer_bytes(), c.image.layer_bytes(), "upstream egress is not 1.0x the image");
    for node in &c.nodes {
        wait_store_holds(&node.agent.data_dir(), c.image.layers.len());
        assert_eq!(node.ctrd.content().len(), c.nodes[0].ctrd.content().len());
    }
    let _ = &c.lab;
}

#[test]
fn a_node_streams_a_blob_another_node_is_still_downloading() {
    // 48 MiB at 100 Mbit/s: about 4 s from the upstream.
    let c = cluster(2, &[48 * MIB], Some("100mbit"));
    let layer = c.image.layers[0].digest.clone();
    std::thread::scope(|s| {
        let first = s.spawn(|| pull(&c, 0));
        wait_for("node 1's download to start", Duration::from_secs(30), || partial_exists(&c, 0, &layer).then_some(()));
        let second = pull(&c, 1);
        assert_eq!(first.join().expect("node 1"), second);
    });
    let egress = c.upstream.wait_blob_bytes(&layer, c.image.layers[0].size);
    assert_eq!(egress, c.image.layers[0].size, "the upstream sent the blob more than once");
    assert!(c.nodes[1].agent.log().contains("source=\"peer\""), "{}", c.nodes[1].agent.log());
}

#[test]
fn a_pull_completes_when_the_peer_it_streams_from_is_killed() {
    let mut c = cluster(2, &[48 * MIB], Some("100mbit"));
    let layer = c.image.layers[0].digest.clone();
    let first_agent_pid = std::thread::scope(|s| {
        let c = &c;
        let first = s.spawn(move || c.try_pull(0).0);
        wait_for("node 1's download to start", Duration::from_secs(30), || partial_exists(c, 0, &layer).then_some(()));
        let second = s.spawn(move || pull(c, 1));
        // Kill node 1 once node 2 is streaming from it.
        wait_for("node 2 to stream from node 1", Duration::from_secs(30), || {
            partial_exists(c, 1, &layer).then_some(())
        });
        let pid = c.nodes[0].agent.pid().expect("node 1 runs");
        clyde_tests::run(std::process::Command::new("kill").args(["-9", &pid.to_string()]));
        let digest = second.join().expect("node 2 pull");
        assert!(!digest.is_empty());
        let _ = first.join();
        pid
    });
    assert!(first_agent_pid > 0);
    c.nodes[0].agent.kill9();
    let node = &c.nodes[1];
    wait_store_holds(&node.agent.data_dir(), 1);
    assert!(node.agent.log().contains("peer penalized"), "{}", node.agent.log());
}

#[test]
fn a_hung_peer_is_forgotten_within_seconds_and_pulls_go_on() {
    let c = cluster(2, &[2 * MIB], None);
    let digest = pull(&c, 0);
    c.nodes[0].agent.pause();
    let hung = Instant::now();
    wait_log(&c.nodes[1].agent, "peer disconnected");
    let forgotten = hung.elapsed();
    assert!(
        forgotten <= Duration::from_secs(10),
        "a hung peer was offered for {forgotten:?}:\n{}",
        c.nodes[1].agent.log()
    );
    let started = Instant::now();
    assert_eq!(pull(&c, 1), digest);
    let took = started.elapsed();
    c.nodes[0].agent.resume();
    assert!(took < Duration::from_secs(10), "the pull waited on the hung peer: {took:?}");
    eprintln!("hung peer forgotten after {forgotten:?}; the next pull took {took:?}");
}

#[test]
fn a_peer_serving_corrupt_bytes_never_poisons_another_store() {
    let c = cluster(2, &[8 * MIB], None);
    let digest = pull(&c, 0);
    let layer = &c.image.layers[0];
    wait_store_holds(&c.nodes[0].agent.data_dir(), 3);
    // Bit rot on node 1's disk: it keeps serving the layer, one byte wrong.
    let path = c.nodes[0].agent.data_dir().join("blobs").join(layer.digest.replace(':', "/"));
    let mut bytes = std::fs::read(&path).expect("node 1's layer");
    bytes[4 * MIB] ^= 0x55;
    std::fs::write(&path, &bytes).expect("rot");
    // containerd on node 2 sees the layer's response aborted; pulled again (as the kubelet
    // retries), the layer comes from the upstream, node 1 being penalized.
    let node = &c.nodes[1];
    let hosts = node.ctrd.mirror_hosts_dir(&c.upstream, &node.agent);
    let (ok, out) = node.ctrd.pull(&hosts, &c.reference, &["--plain-http"]);
    if !ok {
        eprintln!("first pull on node 2 failed, as it should when its bytes do not verify:\n{out}");
        assert_eq!(pull(&c, 1), digest);
    }
    assert_eq!(node.ctrd.image_digest(&c.reference).as_deref(), Some(digest.as_str()));
    wait_store_holds(&node.agent.data_dir(), 3);
    assert!(node.agent.log().contains("did not verify"), "{}", node.agent.log());
    assert_eq!(c.upstream.blob_bytes_served(&layer.digest), 2 * layer.size, "the retry should come from the upstream");
}
