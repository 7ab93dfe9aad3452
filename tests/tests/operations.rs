//! Operating the cache: eviction under `--cache-max-bytes`.

use std::time::Duration;

use clyde_tests::{Agent, Cluster, ImageFormat, Registry, SlowProxy, TestImage, http, pull_image, sha256, wait_for};

const MIB: usize = 1024 * 1024;

#[test]
fn eviction_keeps_recently_read_blobs_under_cache_max_bytes_and_withdraws_the_rest() {
    let reg = Registry::start();
    let img = TestImage::single(&[2 * MIB, 2 * MIB, 2 * MIB]);
    img.push(&reg, "lru", "v1", ImageFormat::Oci);
    let max = (5 * MIB).to_string();
    let cluster = Cluster::start(2, "[peers]\nlookup_timeout = \"1s\"\n", &["--cache-max-bytes", &max]);
    let [first, second] = &cluster.nodes[..] else { unreachable!() };
    let [a, b, c] = &img.layers[..] else { unreachable!() };
    let get = |node: &clyde_tests::Agent, digest: &str| {
        let url = format!("{}/v2/lru/blobs/{digest}?ns={}", node.url(), reg.addr());
        let body = http().get(url).send().unwrap().bytes().unwrap();
        assert_eq!(sha256(&body), digest);
    };
    let held = |digest: &str| first.data_dir().join("blobs").join(digest.replace(':', "/")).exists();
    // Access times are kept in seconds: a second between steps orders them.
    let tick = || std::thread::sleep(Duration::from_millis(1100));
    get(first, &a.digest);
    tick();
    get(first, &b.digest);
    tick();
    get(first, &a.digest);
    tick();
    wait_for("a and b in the store", Duration::from_secs(10), || (held(&a.digest) && held(&b.digest)).then_some(()));
    let advertised = first.metric("clyde_advertised_keys");
    get(first, &c.digest);
    // 6 MiB > 5 MiB: b, read least recently, goes; 4 MiB is under the 4.5 MiB low water.
    wait_for("b to be evicted", Duration::from_secs(10), || (!held(&b.digest)).then_some(()));
    assert!(held(&a.digest) && held(&c.digest), "the wrong blob was evicted");
    // The file goes first, then its record and the byte count.
    let kept = (a.size + c.size) as f64;
    wait_for("the store gauge to follow", Duration::from_secs(5), || {
        (first.metric("clyde_store_bytes") == kept).then_some(())
    });
    assert!(first.log().contains("evicted (least recently used)"));
    // Withdrawn: one key fewer (c came in, b went), and node 2 still gets b (node 1 answers
    // its peer request with 404, which is no fault, and the upstream serves it).
    wait_for("the evicted key to be withdrawn", Duration::from_secs(5), || {
        (first.metric("clyde_advertised_keys") == advertised).then_some(())
    });
    get(second, &b.digest);
    assert!(!second.log().contains("peer penalized"), "{}", second.log());
}

#[test]
fn a_disk_above_its_high_watermark_is_relieved_by_eviction() {
    let reg = Registry::start();
    let img = TestImage::single(&[6 * MIB, 6 * MIB, 6 * MIB]);
    img.push(&reg, "full", "v1", ImageFormat::Oci);
    // A 32 MiB disk, at most half full: three 6 MiB blobs (and the metadata) go above it.
    let agent = clyde_tests::Agent::start_on_tmpfs("", &["--disk-high-watermark", "0.5"], 32);
    let [a, b, c] = &img.layers[..] else { unreachable!() };
    let held = |digest: &str| agent.data_dir().join("blobs").join(digest.replace(':', "/")).exists();
    let tick = || std::thread::sleep(Duration::from_millis(1100));
    for (i, layer) in [a, b, c].into_iter().enumerate() {
        let url = format!("{}/v2/full/blobs/{}?ns={}", agent.url(), layer.digest, reg.addr());
        let body = http().get(url).send().unwrap().bytes().unwrap();
        assert_eq!(sha256(&body), layer.digest);
        wait_for("the blob to be committed", Duration::from_secs(10), || held(&layer.digest).then_some(()));
        if i < 2 {
            tick();
        }
    }
    wait_for("a to be evicted", Duration::from_secs(20), || (!held(&a.digest)).then_some(()));
    assert!(held(&b.digest) && held(&c.digest), "the wrong blob was evicted:\n{}", agent.log());
    let kept = (b.size + c.size) as f64;
    wait_for("the store gauge to follow", Duration::from_secs(5), || {
        (agent.metric("clyde_store_bytes") == kept).then_some(())
    });
}

#[test]
fn a_pinned_image_survives_eviction_and_the_others_go() {
    let reg = Registry::start();
    let pinned = TestImage::single(&[4 * MIB]);
    pinned.push(&reg, "keep/app", "v1", ImageFormat::Oci);
    let other = TestImage::single(&[4 * MIB]);
    other.push(&reg, "lru/other", "v1", ImageFormat::Oci);
    let config = format!("cache_max_bytes = {}\n[retention]\npinned = [\".*/keep/app:.*\"]\n", 6 * MIB);
    let agent = clyde_tests::Agent::start(&config, &[]);
    let held = |digest: &str| agent.data_dir().join("blobs").join(digest.replace(':', "/")).exists();
    clyde_tests::pull_image(&agent.url(), &reg.addr(), "keep/app", "v1");
    wait_for("the pinned layer in the store", Duration::from_secs(10), || held(&pinned.layers[0].digest).then_some(()));
    // Read later, so the least recently used is the pinned image's layer: it stays anyway.
    std::thread::sleep(Duration::from_millis(1100));
    clyde_tests::pull_image(&agent.url(), &reg.addr(), "lru/other", "v1");
    wait_for("the other layer to be evicted", Duration::from_secs(10), || {
        (!held(&other.layers[0].digest)).then_some(())
    });
    assert!(held(&pinned.layers[0].digest), "the pinned image's layer was evicted");
    // `clyde list` shows the pin.
    let mut list = std::process::Command::new(clyde_tests::agent::clyde_bin());
    let out = clyde_tests::run(list.args(["list", "--output", "json", "--data-dir"]).arg(agent.data_dir()));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list json");
    let keep = rows.iter().find(|r| r["reference"].as_str().is_some_and(|s| s.ends_with("/keep/app:v1")));
    assert_eq!(keep.map(|r| r["pinned"].clone()), Some(serde_json::Value::Bool(true)), "{out}");
}

#[test]
fn a_scheduled_prune_removes_what_its_rule_selects_and_keeps_pinned_and_other_images() {
    let reg = Registry::start();
    let images: Vec<(&str, TestImage)> =
        ["old/app", "keep/app", "new/tool"].into_iter().map(|repo| (repo, TestImage::single(&[MIB]))).collect();
    for (repo, img) in &images {
        img.push(&reg, repo, "v1", ImageFormat::Oci);
    }
    let config = "[retention]\npinned = [\".*/keep/app:.*\"]\n\
                  [[retention.prune]]\nevery = \"1s\"\npattern = [\".*/(old|keep)/app:.*\"]\n";
    let agent = clyde_tests::Agent::start(config, &[]);
    let held = |digest: &str| agent.data_dir().join("blobs").join(digest.replace(':', "/")).exists();
    for (repo, img) in &images {
        clyde_tests::pull_image(&agent.url(), &reg.addr(), repo, "v1");
        wait_for("the layer in the store", Duration::from_secs(10), || held(&img.layers[0].digest).then_some(()));
    }
    // Within a few runs: the selected image goes, the pinned one and the unselected one stay.
    wait_for("the scheduled prune to remove old/app", Duration::from_secs(15), || {
        (!held(&images[0].1.layers[0].digest)).then_some(())
    });
    assert!(held(&images[1].1.layers[0].digest), "the pinned image was pruned");
    assert!(held(&images[2].1.layers[0].digest), "an image no rule selects was pruned");
    let log = agent.log();
    assert!(log.contains("scheduled prune") && log.contains("kept_pinned"), "{log}");
    let metrics = agent.metrics();
    assert!(metrics.lines().any(|l| l.starts_with("clyde_pruned_images_total{") && !l.ends_with(" 0")), "{metrics}");
}

#[test]
fn five_thousand_idle_connections_leave_a_pull_in_normal_time() {
    const IDLE: usize = 5000;
    // This process holds the idle connections: it needs the descriptors (the agent raises
    // its own limit to the hard limit at start).
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raise the open-file limit");
    let open = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(open > IDLE as u64 + 1000, "the hard open-file limit ({open}) is too low for this test");

    let reg = Registry::start();
    for repo in ["before", "during"] {
        TestImage::single(&[4 * MIB, 2 * MIB, MIB]).push(&reg, repo, "v1", ImageFormat::Oci);
    }
    let agent = Agent::start("", &[]);
    let timed_pull = |repo: &str| {
        let started = std::time::Instant::now();
        let pulled = pull_image(&agent.url(), &reg.addr(), repo, "v1");
        assert_eq!(pulled.digests.len(), 5);
        started.elapsed()
    };
    let normal = timed_pull("before");
    let idle: Vec<std::net::TcpStream> =
        (0..IDLE).map(|_| std::net::TcpStream::connect(agent.addr()).expect("connect")).collect();
    let loaded = timed_pull("during");
    assert!(
        loaded < normal * 3 + Duration::from_secs(2),
        "a pull took {loaded:?} beside {IDLE} idle connections, {normal:?} before"
    );
    assert_eq!(agent.readyz(), 200, "{}", agent.log());
    drop(idle);
    eprintln!("pull before {normal:?}, beside {IDLE} idle connections {loaded:?}");
}

#[test]
fn transfers_past_max_transfers_wait_their_turn_and_all_complete() {
    let reg = Registry::start();
    let img = TestImage::single(&[4 * 1024 * 1024, 4 * 1024 * 1024, 4 * 1024 * 1024]);
    img.push(&reg, "team/queue", "v1", ImageFormat::Oci);
    // 8 MiB/s: each layer takes about half a second, so the three overlap.
    let proxy = SlowProxy::start(&reg.addr(), 8 * 1024 * 1024);
    let config =
        format!("max_transfers = 1\n\n[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n", reg.addr(), proxy.addr());
    let agent = Agent::start(&config, &[]);
    let fetches: Vec<_> = img
        .layers
        .iter()
        .map(|layer| {
            let url = format!("{}/v2/team/queue/blobs/{}?ns={}", agent.url(), layer.digest, reg.addr());
            let digest = layer.digest.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let body = http().get(&url).send().expect("GET").bytes().expect("body");
                assert_eq!(sha256(&body), digest, "wrong bytes");
                started.elapsed()
            })
        })
        .collect();
    let mut took: Vec<_> = fetches.into_iter().map(|f| f.join().expect("fetch")).collect();
    took.sort();
    // One at a time: the last waited for the two before it.
    assert!(agent.log().contains("at the bound on running transfers"), "{}", agent.log());
    assert!(took[2] >= took[0] * 2, "transfers ran side by side: {took:?}");
    // And every layer was fetched once (queued requests did not start another transfer).
    for layer in &img.layers {
        assert_eq!(reg.blob_bytes_served(&layer.digest), layer.size);
    }
}
