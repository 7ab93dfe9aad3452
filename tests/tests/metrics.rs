//! `/metrics`: the values move as bytes are served, and match what clients received.

use clyde_tests::{Cluster, ImageFormat, Registry, TestImage, http, sha256, wait_for, wait_store_holds};

const MIB: usize = 1024 * 1024;

#[test]
fn served_bytes_match_what_clients_received_by_source() {
    let reg = Registry::start();
    let img = TestImage::single(&[3 * MIB]);
    img.push(&reg, "metered", "v1", ImageFormat::Oci);
    let cluster = Cluster::start(2, "[peers]\nlookup_timeout = \"1s\"\n", &[]);
    let [first, second] = &cluster.nodes[..] else { unreachable!() };
    let layer = &img.layers[0];
    let url = |node: &clyde_tests::Agent| format!("{}/v2/metered/blobs/{}?ns={}", node.url(), layer.digest, reg.addr());
    let get = |u: String| {
        let body = http().get(u).send().unwrap().bytes().unwrap();
        assert_eq!(sha256(&body), layer.digest);
        body.len() as f64
    };
    let size = layer.size as f64;
    let registry = format!("registry=\"{}\"", reg.addr());

    // Cold on node 1: from the upstream.
    assert_eq!(get(url(first)), size);
    wait_store_holds(&first.data_dir(), 1);
    assert_eq!(first.metric("clyde_served_bytes_total{api=\"mirror\",source=\"upstream\"}"), size);
    assert_eq!(first.metric(&format!("clyde_upstream_bytes_total{{{registry}}}")), size);
    // The gauge follows the commit, which follows the response's last byte.
    wait_for("the store gauge", std::time::Duration::from_secs(10), || {
        (first.metric("clyde_store_bytes") == size).then_some(())
    });
    // Warm on node 1: from the store.
    assert_eq!(get(url(first)), size);
    assert_eq!(first.metric("clyde_served_bytes_total{api=\"mirror\",source=\"local\"}"), size);
    assert_eq!(first.metric("clyde_requests_total{api=\"mirror\",kind=\"blob\",status=\"200\"}"), 2.0);
    assert!(first.metric("clyde_request_duration_seconds_count{api=\"mirror\",kind=\"blob\"}") >= 2.0);

    // Node 2: from node 1, whose peer server counts what it sent.
    assert_eq!(get(url(second)), size);
    assert_eq!(second.metric("clyde_served_bytes_total{api=\"mirror\",source=\"peer\"}"), size);
    assert_eq!(second.metric("clyde_peer_fetch_bytes_total"), size);
    assert_eq!(second.metric(&format!("clyde_upstream_bytes_total{{{registry}}}")), 0.0);
    assert_eq!(first.metric("clyde_served_bytes_total{api=\"peer\",source=\"local\"}"), size);
    assert_eq!(first.metric("clyde_requests_total{api=\"peer\",kind=\"blob\",status=\"200\"}"), 1.0);

    // A miss is counted with its status.
    let missing = format!("{}/v2/metered/blobs/sha256:{}?ns={}", first.url(), "0".repeat(64), reg.addr());
    assert_eq!(http().get(missing).send().unwrap().status(), 404);
    assert_eq!(first.metric("clyde_requests_total{api=\"mirror\",kind=\"blob\",status=\"404\"}"), 1.0);

    // The swarm: one peer each, keys advertised, and libp2p's own metrics.
    assert_eq!(first.metric("clyde_peers"), 1.0);
    assert!(second.metric("clyde_advertised_keys") >= 1.0);
    assert!(first.metrics().contains("libp2p_"), "libp2p's metrics are missing");
}
