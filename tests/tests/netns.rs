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
fn a_holder_whose_copy_rotted_is_the_only_one_penalized_and_every_reader_gets_right_bytes_first_time() {
    // 12 MiB: three 4 MiB pieces, each with a rotten byte on node 1's disk.
    let mut c = cluster(4, &[12 * MIB], None);
    let layer = c.image.layers[0].clone();
    let digest = pull(&c, 0);
    wait_store_holds(&c.nodes[0].agent.data_dir(), 3);
    assert_eq!(pull(&c, 1), digest);
    wait_store_holds(&c.nodes[1].agent.data_dir(), 3);
    let path = c.nodes[0].agent.data_dir().join("blobs").join(layer.digest.replace(':', "/"));
    let right = std::fs::read(&path).expect("node 1's layer");
    let mut rotten = right.clone();
    for piece in 0..3 {
        rotten[piece * 4 * MIB + 1000] ^= 0x55;
    }
    std::fs::write(&path, &rotten).expect("rot");
    let sent_before = c.upstream.blob_bytes_served(&layer.digest);
    let (bad, good) = (c.nodes[0].agent.peer_addr(), c.nodes[1].agent.peer_addr());
    let penalized = |log: &str| -> Vec<String> {
        log.lines().filter(|l| l.contains("peer penalized")).map(str::to_string).collect()
    };

    // containerd on node 3 pulls from both holders at once: its first attempt succeeds, the
    // rotten pieces are fetched again from the other holder, and only node 1 is penalized.
    let (ok, out) = c.try_pull(2);
    let log = c.nodes[2].agent.log();
    assert!(ok, "the pull failed on its first attempt:\n{out}\n{log}");
    assert_eq!(c.nodes[2].ctrd.image_digest(&c.reference).as_deref(), Some(digest.as_str()));
    assert!(log.contains("does not match its hash"), "no piece was checked against its hash:\n{log}");
    let lines = penalized(&log);
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains(&bad)), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains(&good)), "the honest holder was penalized: {lines:#?}");
    assert_eq!(c.upstream.blob_bytes_served(&layer.digest), sent_before, "a rotten piece came from the upstream");
    wait_store_holds(&c.nodes[2].agent.data_dir(), 3);

    // A lazy puller's Range over rotten bytes, on node 4, with node 1 the only holder left.
    c.nodes[1].agent.kill9();
    c.nodes[2].agent.kill9();
    let node = &c.nodes[3].agent;
    let range = (4 * MIB + 900)..(5 * MIB + 900);
    let url = format!("http://{}/v2/team/app/blobs/{}?ns={}", node.addr(), layer.digest, c.upstream.addr());
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut curl = node.place().command(clyde_tests::require("curl", "curl"));
    curl.args(["-s", "-o"]).arg(out.path());
    curl.args(["-w", "%{http_code}", "-H", &format!("Range: bytes={}-{}", range.start, range.end - 1), &url]);
    let status = curl.output().expect("curl");
    assert_eq!(String::from_utf8_lossy(&status.stdout), "206", "{}", node.log());
    let body = std::fs::read(out.path()).expect("range body");
    assert!(body == right[range.clone()], "the range came back with wrong bytes:\n{}", node.log());
    let log = node.log();
    assert!(log.contains("does not match its hash"), "node 1 was never asked:\n{log}");
    assert!(penalized(&log).iter().any(|l| l.contains(&bad)), "{log}");
}

/// Blob bytes the upstream sent for every `GET` of a blob (layers and config), its manifest
/// requests (`GET` and `HEAD`), and the most requests any one manifest got, from its log.
fn upstream_totals(c: &LabCluster) -> (u64, usize, usize) {
    let requests = c.upstream.requests();
    let blobs = requests.iter().filter(|(m, uri, _, _)| m == "GET" && uri.contains("/blobs/")).map(|r| r.2).sum();
    let mut per_manifest: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    // Pulls only (the push that made the image is skopeo's).
    for (_, uri, _, _) in
        requests.iter().filter(|(_, uri, _, ua)| uri.contains("/manifests/") && !ua.starts_with("skopeo"))
    {
        *per_manifest.entry(uri.as_str()).or_default() += 1;
    }
    (blobs, per_manifest.values().sum(), per_manifest.values().copied().max().unwrap_or(0))
}

#[test]
fn a_herd_of_nodes_starting_at_one_instant_fetches_each_blob_from_the_upstream_once() {
    // 6 nodes, one barrier: nobody is a provider when the others look, so without an
    // election every node would go upstream (6.0x).
    let c = cluster(6, &[12 * MIB, 8 * MIB, 4 * MIB], Some("200mbit"));
    let barrier = std::sync::Barrier::new(c.nodes.len());
    let digests: Vec<String> = std::thread::scope(|s| {
        let pulls: Vec<_> = (0..c.nodes.len())
            .map(|i| {
                let (c, barrier) = (&c, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    pull(c, i)
                })
            })
            .collect();
        pulls.into_iter().map(|p| p.join().expect("pull")).collect()
    });
    assert!(digests.iter().all(|d| *d == digests[0]), "nodes pulled different images: {digests:?}");
    for node in &c.nodes {
        wait_store_holds(&node.agent.data_dir(), c.image.layers.len() + 1);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (blob_bytes, manifests, most) = upstream_totals(&c);
    let ratio = c.upstream_layer_bytes() as f64 / c.image.layer_bytes() as f64;
    let elected: usize =
        c.nodes.iter().map(|n| n.agent.log().matches("elected to fetch from the upstream").count()).sum();
    eprintln!(
        "6 nodes at one instant: upstream layer bytes {ratio:.3}x the image ({blob_bytes} blob bytes in all), \
         {manifests} manifest GETs, {elected} elections won"
    );
    assert!(
        ratio <= 1.05,
        "upstream sent {ratio:.3}x the image's layers ({elected} elections won):\n{}",
        c.nodes.iter().map(|n| n.agent.log()).collect::<Vec<_>>().join("\n----\n")
    );
    assert!(elected > c.image.layers.len(), "the fetchers were not elected");
    // The tag and the manifest it names were asked of the upstream once for the cluster.
    let logs: Vec<String> = c.nodes.iter().map(|n| n.agent.log()).collect();
    assert_eq!(
        most,
        1,
        "a manifest was asked of the upstream more than once ({manifests} requests):\n{}",
        logs.join("\n----\n")
    );
}

#[test]
fn a_blob_that_four_peers_hold_comes_from_all_of_them_at_once() {
    // 128 MiB: long enough at 4 x 200 Mbit/s (1.3 s) that the fixed costs (lookups, the
    // final verification) do not decide the ratio.
    let c = cluster(5, &[128 * MIB], None);
    let layer = c.image.layers[0].digest.clone();
    // A blob only node 1 holds: what one holder's link gives, measured in the same run.
    let single = TestImage::single(&[128 * MIB]);
    single.push(&c.upstream, "team/single", "v1", clyde_tests::ImageFormat::Oci);
    let single_layer = single.layers[0].digest.clone();
    c.fetch_blob(0, "team/single", &single_layer);
    for i in 0..4 {
        c.fetch_blob(i, "team/app", &layer);
        wait_store_holds(&c.nodes[i].agent.data_dir(), if i == 0 { 2 } else { 1 });
    }
    for node in &c.nodes[..4] {
        c.lab.limit_egress(node.agent.place(), "200mbit");
    }
    let one_link = c.fetch_blob(4, "team/single", &single_layer);
    let four_links = c.fetch_blob(4, "team/app", &layer);
    let speedup = one_link / four_links;
    eprintln!("128 MiB from one holder {one_link:.2} s, from four holders {four_links:.2} s: {speedup:.2}x one link");
    let log = c.nodes[4].agent.log();
    assert!(log.contains("fetching from several complete holders at once") && log.contains("holders=4"), "{log}");
    assert!(speedup >= 3.0, "four holders gave {speedup:.2}x one link:\n{log}");
    assert_eq!(
        c.upstream.blob_bytes_served(&layer),
        c.image.layers[0].size,
        "the layer left the upstream more than once"
    );
}

/// Bytes written so far into node `i`'s partial file of `digest`: the disk blocks it uses (the
/// file is made at its full length, sparse, when the transfer starts).
fn partial_written(c: &LabCluster, i: usize, digest: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let path = c.nodes[i].agent.data_dir().join("partial").join(digest.replace(':', "/"));
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

#[test]
fn a_herd_completes_when_its_elected_fetcher_is_killed_midway() {
    // 64 MiB at 100 Mbit/s: about 5.5 s from the upstream, so 30% is a wide mark to hit.
    let mut c = cluster(6, &[64 * MIB], Some("100mbit"));
    let layer = c.image.layers[0].clone();
    let up = c.upstream.place().clone();
    let sent_before = up.tx_bytes();
    let barrier = std::sync::Barrier::new(c.nodes.len() + 1);
    let killed = std::thread::scope(|s| {
        let pulls: Vec<_> = (0..c.nodes.len())
            .map(|i| {
                let (c, barrier) = (&c, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    c.try_pull(i)
                })
            })
            .collect();
        barrier.wait();
        let needle = format!("elected to fetch from the upstream digest={}", layer.digest);
        let fetcher = wait_for("a node to be elected for the layer", Duration::from_secs(30), || {
            (0..c.nodes.len()).find(|&i| c.nodes[i].agent.log().contains(&needle))
        });
        wait_for("the fetcher to hold 30% of the layer", Duration::from_secs(60), || {
            (partial_written(&c, fetcher, &layer.digest) >= layer.size * 3 / 10).then_some(())
        });
        let at = partial_written(&c, fetcher, &layer.digest);
        assert!(at < layer.size * 9 / 10, "the fetcher got {at} bytes before the kill: too late to prove a takeover");
        let pid = c.nodes[fetcher].agent.pid().expect("the fetcher runs");
        clyde_tests::run(std::process::Command::new("kill").args(["-9", &pid.to_string()]));
        for (i, pull) in pulls.into_iter().enumerate() {
            let (ok, out) = pull.join().expect("pull thread");
            assert!(ok || i == fetcher, "pull on node {i} failed:\n{out}\nagent log:\n{}", c.nodes[i].agent.log());
        }
        fetcher
    });
    c.nodes[killed].agent.kill9();
    for (i, node) in c.nodes.iter().enumerate().filter(|(i, _)| *i != killed) {
        assert!(node.ctrd.image_digest(&c.reference).is_some(), "node {i} has no image");
        wait_store_holds(&node.agent.data_dir(), 2);
    }
    let needle = format!("elected to fetch from the upstream digest={}", layer.digest);
    let successor = (0..c.nodes.len()).find(|&i| i != killed && c.nodes[i].agent.log().contains(&needle));
    assert!(successor.is_some(), "no survivor took over the fetch");
    let sent = up.tx_bytes() - sent_before;
    let ratio = sent as f64 / layer.size as f64;
    eprintln!(
        "fetcher (node {killed}) killed at 30%, node {} took over: the upstream host sent {ratio:.3}x the layer",
        successor.unwrap_or_default()
    );
    assert!(ratio <= 1.3, "the upstream host sent {ratio:.3}x the layer");
}

#[test]
fn a_node_serving_three_peers_stays_under_its_upload_cap() {
    const CAP: u64 = 20 * MIB as u64;
    let config = format!("upload_rate = {CAP}\n{PATIENT_LOOKUPS}");
    let c = LabCluster::start(1, TestImage::single(&[16 * MIB]), "team/app", None, &config);
    let layer = c.image.layers[0].clone();
    c.fetch_blob(0, "team/app", &layer.digest);
    wait_store_holds(&c.nodes[0].agent.data_dir(), 1);
    let node = &c.nodes[0].agent;
    let path = format!("/v2/team/app/blobs/{}?ns={}", layer.digest, c.upstream.addr());
    let url = format!("http://{}{path}", node.peer_addr());
    let auth = clyde_tests::cluster::member_auth(clyde_tests::lab::LAB_SECRET, &path);
    let sent_before = node.place().tx_bytes();
    let started = Instant::now();
    std::thread::scope(|s| {
        let peers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let get = clyde_tests::http().get(&url).header("authorization", &auth).send().expect("GET");
                    let body = get.bytes().expect("body");
                    assert_eq!(clyde_tests::sha256(&body), layer.digest, "a peer got wrong bytes");
                })
            })
            .collect();
        for p in peers {
            p.join().expect("peer");
        }
    });
    let took = started.elapsed().as_secs_f64();
    let sent = node.place().tx_bytes() - sent_before;
    let rate = sent as f64 / took;
    eprintln!(
        "3 peers served {:.1} MiB in {took:.2} s: {:.1} MiB/s on the interface, cap {} MiB/s",
        sent as f64 / MIB as f64,
        rate / MIB as f64,
        CAP / MIB as u64
    );
    assert!(sent >= 3 * layer.size, "the node sent {sent} bytes for 3 copies of {}", layer.size);
    assert!(rate <= CAP as f64 * 1.1, "the node sent {:.1} MiB/s, over its cap", rate / MIB as f64);
}

#[test]
fn a_lazy_reader_behind_a_slow_upstream_moves_only_its_ranges() {
    // One node, the upstream on its own host behind 100 Mbit/s: 1 MiB ranges of a cold
    // 48 MiB layer, read with curl in the node's namespace through its mirror.
    let c = cluster(1, &[48 * MIB], Some("100mbit"));
    let layer = &c.image.layers[0];
    let want = c.image.layer_data(0);
    let agent = &c.nodes[0].agent;
    let url = format!("http://{}/v2/team/app/blobs/{}?ns={}", agent.addr(), layer.digest, c.upstream.addr());
    let offsets = [7 * MIB + 3, 19 * MIB, 30 * MIB + 77, 44 * MIB];
    for at in offsets {
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let range = format!("{at}-{}", at + MIB - 1);
        let mut curl = agent.place().command("curl");
        let code =
            clyde_tests::run(curl.args(["-s", "-r", &range, "-o"]).arg(out.path()).args(["-w", "%{http_code}", &url]));
        assert_eq!(code.trim(), "206", "range {range}:\n{}", agent.log());
        let got = std::fs::read(out.path()).expect("range");
        assert!(got == want[at..at + MIB], "wrong bytes for {range}");
    }
    // The upstream's own log: one GET per range, each exactly that range's bytes.
    let gets: Vec<u64> = wait_for("the registry to log the ranges", Duration::from_secs(10), || {
        let gets: Vec<u64> = c
            .upstream
            .requests()
            .into_iter()
            .filter(|(m, uri, _, _)| m == "GET" && uri.contains(&layer.digest))
            .map(|(_, _, written, _)| written)
            .collect();
        (gets.len() >= offsets.len()).then_some(gets)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gets, vec![MIB as u64; offsets.len()], "the upstream sent more than the ranges read");
    assert!(partial_exists(&c, 0, &layer.digest), "the ranges are not kept");
    assert!(
        !agent.data_dir().join("blobs").join(layer.digest.replace(':', "/")).exists(),
        "the layer was fully downloaded"
    );
}
