//! Peer-to-peer figures, each against a reference measured in the same run.
//!
//! ```text
//! bench-swarm scale-out [SIZE_MIB=256] [NODES=5] [LAYERS=4] [ROUNDS=3]
//!     netns lab: node 1 pulls cold from the upstream, nodes 2..N pull one after another
//!     (from peers); then every node pulls again from its own warm store (the reference).
//!     Every round is a fresh lab. Prints upstream blob bytes over the image (target 1.0)
//!     and the median peer pull over the median local warm pull (target <= 1.2). Each timed
//!     pull starts after a `sync`, so one pull's write-back does not land on the next.
//! bench-swarm lookup [NODES=20] [BLOBS=40]
//!     agents on 127.0.0.x: node 1 holds BLOBS blobs; every other node asks its mirror for
//!     the size of each (a provider lookup, then a peer HEAD). Prints the lookup latency
//!     percentiles from the agents' logs (target p50 <= 5 ms) beside the whole HEAD's.
//! bench-swarm staggered [SIZE_MIB=256] [DELAY_MS=1000] [RATE=200mbit]
//!     netns lab, upstream egress limited with tc tbf: two nodes start the same cold pull
//!     DELAY_MS apart. Prints upstream blob bytes over the image (target <= 1.1).
//! bench-swarm herd [NODES=6] [SIZE_MIB=128] [LAYERS=4] [RATE=200mbit]
//!     netns lab, upstream egress limited with tc tbf: node 1 pulls a cold image alone (the
//!     reference), then every node starts a cold pull of another image of the same size at
//!     one instant (a barrier). Prints upstream blob bytes over the image (target <= 1.05),
//!     upstream manifest GETs, and the last node's time over the reference (target <= 1.3).
//! bench-swarm holders [K=4] [SIZE_MIB=256] [RATE=200mbit] [ROUNDS=3]
//!     netns lab: K nodes hold a blob complete, their uplinks limited with tc tbf; one more
//!     node fetches it through its mirror (curl in its namespace, digest checked). The
//!     reference, in the same lab: a blob of the same size only one holder has. Prints
//!     the median ratio (target >= 3 for K = 4).
//! bench-swarm pull [SIZE_MIB=512] [LAYERS=4] [ROUNDS=3] [RATE=1gbit|none]
//!     netns lab, one node and the upstream on another host whose egress `tc tbf` limits:
//!     a cold `ctr` pull through the node's mirror (a fresh agent, empty store, every round)
//!     against a pull straight from the upstream, alternating. Prints the median ratio
//!     (target <= 1.05) and the upstream blob bytes per mirror pull (target 1.0).
//! bench-swarm lazy [SIZE_MIB=256] [RANGES=13] [RATE=200mbit]
//!     netns lab, one node, the upstream on its own host behind `tc tbf`: RANGES 1 MiB ranges
//!     at scattered offsets of a cold layer, each read through the node's mirror and straight
//!     from the upstream (alternating which goes first), with curl in the node's namespace.
//!     Prints the median mirror / direct ratio (target <= 1.5) and the upstream bytes over
//!     the bytes read (13 MiB = 5% of 256 MiB; target <= 1.5), counted on the upstream's link.
//! bench-swarm chunked [SIZE_MIB=64] [RATE=200mbit] [ROUNDS=3]
//!     same lab: a cold layer fetched through the mirror as containerd 2.1 does (4 workers,
//!     `Range: bytes=N-`, 8 MiB chunks, each connection dropped after its chunk) against one
//!     plain GET through the mirror of another cold layer of that size. Prints the median
//!     time ratio (target <= 1.15) and the upstream bytes over the layer (target <= 1.1).
//! bench-swarm secret [SIZE_MIB=256] [ROUNDS=5]
//!     two agents on 127.0.0.x: node 1 fetches a blob cold, node 2 fetches it from node 1,
//!     once in a cluster with a secret (private network, signed peer requests) and once
//!     without, alternating which goes first. Prints the median peer throughput with the
//!     secret over without (target >= 0.95).
//! bench-swarm copies [SIZE_MIB=64] [ROUNDS=3] [HOW=kill|stop]
//!     four agents on 127.0.0.x with `min_copies = 2`: node 1 pulls a pinned image, a second
//!     copy appears, the upstream stops; then node 1 dies (`kill -9`, or `SIGSTOP`: a hung
//!     node, found by its pings) and the time until two survivors hold the image is measured.
//!     The reference, in the same run: the same image fetched from a peer by a client.
//!     Prints both medians (target: death to K copies <= 30 s plus the transfer time).
//! bench-swarm blob [SIZE_MIB=256] [ROUNDS=3]
//!     agents on 127.0.0.x, no containerd: one blob fetched by a client from node 1 cold
//!     (upstream), from node 2 (a peer), and from node 1 warm; times and each agent's CPU.
//! ```
//! Run as root, like the tests; `CLYDE_BIN` selects the binary (use a release build).

use std::time::{Duration, Instant};

use clyde_tests::{
    Agent, Cluster, Containerd, ImageFormat, Lab, LabCluster, Registry, RegistryOptions, TestImage, http, pull_image,
};

const MIB: usize = 1024 * 1024;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).map(|a| a.parse().ok().expect("a number")).unwrap_or(default)
}

/// A lab cluster as the benchmarks use it.
struct NetCluster {
    c: LabCluster,
}

impl NetCluster {
    fn start(n: usize, image: TestImage, rate: Option<&str>) -> Self {
        eprintln!("pushing a {} MiB image in {} layers...", image.layer_bytes() / MIB as u64, image.layers.len());
        Self { c: LabCluster::start(n, image, "bench/swarm", rate, "") }
    }

    /// A timed `ctr images pull` on node `i`; the image and its content are removed after,
    /// so the next pull on that node starts from an empty containerd again.
    fn pull(&self, i: usize) -> f64 {
        clyde_tests::run(&mut std::process::Command::new("sync"));
        let started = Instant::now();
        let (ok, out) = self.c.try_pull(i);
        let took = started.elapsed().as_secs_f64();
        assert!(ok, "pull on node {} failed:\n{out}", i + 1);
        self.c.nodes[i].ctrd.remove(&self.c.reference);
        took
    }

    fn upstream_ratio(&self) -> f64 {
        std::thread::sleep(Duration::from_millis(500));
        self.c.upstream_layer_bytes() as f64 / self.c.image.layer_bytes() as f64
    }
}

fn scale_out(args: &[String]) {
    let (size, n, layers) = (arg(args, 0, 256usize), arg(args, 1, 5usize).max(2), arg(args, 2, 4usize).max(1));
    let rounds = arg(args, 3, 3usize).max(1);
    let (mut cold, mut peer, mut warm, mut upstream) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let c = NetCluster::start(n, TestImage::single(&vec![size * MIB / layers; layers]), None);
        let t = c.pull(0);
        println!("round {round}, node 1: cold pull from the upstream {t:.2} s");
        cold.push(t);
        for i in 1..n {
            let t = c.pull(i);
            println!("round {round}, node {}: pull from peers {t:.2} s", i + 1);
            peer.push(t);
        }
        upstream.push(c.upstream_ratio());
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            for (i, node) in c.c.nodes.iter().enumerate() {
                for line in node.agent.log().lines().filter(|l| l.contains("api=\"mirror\"") && l.contains("blobs")) {
                    let field = |k: &str| {
                        line.split(&format!("{k}=")).nth(1).and_then(|v| v.split_whitespace().next()).unwrap_or("")
                    };
                    println!(
                        "  node {} {} bytes={} source={} latency_ms={}",
                        i + 1,
                        &line[..27],
                        field("bytes"),
                        field("source"),
                        field("latency_ms")
                    );
                }
            }
        }
        for i in 0..n {
            let t = c.pull(i);
            println!("round {round}, node {}: warm pull from its own store {t:.2} s", i + 1);
            warm.push(t);
        }
    }
    let (p, w, c) = (percentile(&mut peer, 0.5), percentile(&mut warm, 0.5), percentile(&mut cold, 0.5));
    println!(
        "scale-out, {n} nodes, {size} MiB in {layers} layers, {rounds} rounds: upstream blob bytes {:.3}x the image (worst round); \
         median peer pull {p:.2} s / median local warm pull {w:.2} s = {:.3} (cold from the upstream {c:.2} s)",
        percentile(&mut upstream, 1.0),
        p / w
    );
}

fn lookup(args: &[String]) {
    let (n, blobs) = (arg(args, 0, 20usize).max(2), arg(args, 1, 40usize).max(1));
    let reg = Registry::start();
    let image = TestImage::single(&vec![4096; blobs]);
    image.push(&reg, "bench/lookup", "v1", ImageFormat::Oci);
    eprintln!("starting {n} agents...");
    let cluster = Cluster::start(n, "", &[]);
    pull_image(&cluster.nodes[0].url(), &reg.addr(), "bench/lookup", "v1");
    // Let node 1's provider records reach the swarm.
    std::thread::sleep(Duration::from_secs(2));
    let client = http();
    let mut heads = Vec::new();
    for node in &cluster.nodes[1..] {
        for layer in &image.layers {
            let url = format!("{}/v2/bench/lookup/blobs/{}?ns={}", node.url(), layer.digest, reg.addr());
            let started = Instant::now();
            let r = client.head(&url).send().expect("HEAD");
            assert!(r.status().is_success(), "HEAD {url}: {}", r.status());
            heads.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut lookups: Vec<f64> = cluster.nodes[1..]
        .iter()
        .flat_map(|node| {
            node.log()
                .lines()
                .filter(|l| l.contains("provider lookup"))
                .filter_map(|l| l.split("lookup_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
                .collect::<Vec<f64>>()
        })
        .collect();
    assert!(!lookups.is_empty(), "no lookup was logged");
    println!(
        "provider lookups in a {n}-node swarm ({} lookups): p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms; \
         whole mirror HEAD (lookup + peer HEAD): p50 {:.2} ms, p99 {:.2} ms",
        lookups.len(),
        percentile(&mut lookups, 0.5),
        percentile(&mut lookups, 0.9),
        percentile(&mut lookups, 0.99),
        percentile(&mut lookups, 1.0),
        percentile(&mut heads, 0.5),
        percentile(&mut heads, 0.99),
    );
}

fn pull(args: &[String]) {
    let (size, layers) = (arg(args, 0, 512usize), arg(args, 1, 4usize).max(1));
    let (rounds, rate) = (arg(args, 2, 3usize).max(1), arg(args, 3, "1gbit".to_string()));
    let mut lab = Lab::new();
    let up = lab.host("up");
    let upstream = Registry::start_in(&up, &RegistryOptions::default());
    let image = TestImage::single(&vec![size * MIB / layers; layers]);
    eprintln!("pushing a {size} MiB image in {layers} layers...");
    image.push(&upstream, "bench/pull", "v1", ImageFormat::Oci);
    if rate != "none" {
        lab.limit_egress(&up, &rate);
    }
    let node = lab.host("node");
    let ctrd = Containerd::start_in(&node);
    let reference = format!("{}/bench/pull:v1", upstream.addr());
    let config = format!("[[registries]]\nname = \"{}\"\nscheme = \"http\"\n", upstream.addr());
    let direct_hosts = tempfile::tempdir().expect("tempdir");
    let dir = direct_hosts.path().join(upstream.addr());
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("hosts.toml"), format!("server = \"http://{}\"\n", upstream.addr())).expect("hosts.toml");
    let served = || -> u64 { image.layers.iter().map(|l| upstream.blob_bytes_served(&l.digest)).sum() };
    let timed = |hosts: &std::path::Path| {
        clyde_tests::run(&mut std::process::Command::new("sync"));
        let started = Instant::now();
        let (ok, out) = ctrd.pull(hosts, &reference, &["--plain-http"]);
        let took = started.elapsed().as_secs_f64();
        assert!(ok, "pull failed:\n{out}");
        ctrd.remove(&reference);
        took
    };
    let (mut direct, mut mirror, mut ratios, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let d = timed(direct_hosts.path());
        let agent = Agent::start_in(&node, &config, &[]);
        let hosts = ctrd.mirror_hosts_dir(&upstream, &agent);
        std::thread::sleep(Duration::from_millis(500));
        let before = served();
        let m = timed(&hosts);
        drop(agent);
        std::fs::remove_dir_all(&hosts).expect("clean hosts dir");
        std::thread::sleep(Duration::from_millis(500));
        let b = (served() - before) as f64 / image.layer_bytes() as f64;
        println!(
            "round {round}: direct {d:.2} s, mirror {m:.2} s, ratio {:.3}, upstream bytes {b:.3}x the image",
            m / d
        );
        direct.push(d);
        mirror.push(m);
        ratios.push(m / d);
        bytes.push(b);
    }
    let (d, m) = (percentile(&mut direct, 0.5), percentile(&mut mirror, 0.5));
    println!(
        "cold ctr pull, {size} MiB in {layers} layers, upstream at {rate} on its own host, {rounds} rounds: \
         direct {d:.2} s, mirror {m:.2} s, median ratio {:.3}; upstream bytes per mirror pull {:.3}x (worst)",
        percentile(&mut ratios, 0.5),
        percentile(&mut bytes, 1.0),
    );
}

fn timed_fetch(url: &str) -> f64 {
    let started = Instant::now();
    let mut r = http().get(url).send().expect("GET");
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    let n = std::io::copy(&mut r, &mut std::io::sink()).expect("body");
    assert!(n > 0);
    started.elapsed().as_secs_f64()
}

fn blob(args: &[String]) {
    let (size, rounds) = (arg(args, 0, 256usize), arg(args, 1, 3usize).max(1));
    let reg = Registry::start();
    let (mut cold, mut peer, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let image = TestImage::single(&[size * MIB]);
        image.push(&reg, "bench/blob", &format!("r{round}"), ImageFormat::Oci);
        let cluster = Cluster::start(2, "", &[]);
        let [first, second] = &cluster.nodes[..] else { unreachable!() };
        let path = format!("/v2/bench/blob/blobs/{}?ns={}", image.layers[0].digest, reg.addr());
        let c = timed_fetch(&format!("{}{path}", first.url()));
        // The blob must be committed (and so served from the file) before the next fetches.
        clyde_tests::wait_store_holds(&first.data_dir(), 1);
        let cpu1 = first.cpu_seconds();
        let p = timed_fetch(&format!("{}{path}", second.url()));
        let (cpu1_peer, cpu2_peer) = (first.cpu_seconds() - cpu1, second.cpu_seconds());
        let w = timed_fetch(&format!("{}{path}", first.url()));
        println!(
            "round {round}: cold {c:.3} s, from a peer {p:.3} s (CPU: serving node {cpu1_peer:.2} s, fetching node {cpu2_peer:.2} s), warm {w:.3} s"
        );
        cold.push(c);
        peer.push(p);
        warm.push(w);
    }
    let (c, p, w) = (percentile(&mut cold, 0.5), percentile(&mut peer, 0.5), percentile(&mut warm, 0.5));
    println!(
        "one {size} MiB blob, medians: cold {c:.3} s, from a peer {p:.3} s, warm {w:.3} s; peer / warm = {:.3}",
        p / w
    );
}

fn secret(args: &[String]) {
    let (size, rounds) = (arg(args, 0, 256usize), arg(args, 1, 5usize).max(1));
    let reg = Registry::start();
    let secret = clyde_tests::cluster::secret_file("bench-secret-0123456789abcdefghijklmnop");
    let (mut open, mut private) = (Vec::new(), Vec::new());
    // One peer transfer's throughput (MiB/s) in a fresh two-node cluster started with `args`.
    let peer_rate = |tag: &str, args: &[&str]| {
        let image = TestImage::single(&[size * MIB]);
        image.push(&reg, "bench/secret", tag, ImageFormat::Oci);
        let cluster = Cluster::start(2, "", args);
        let [first, second] = &cluster.nodes[..] else { unreachable!() };
        let path = format!("/v2/bench/secret/blobs/{}?ns={}", image.layers[0].digest, reg.addr());
        timed_fetch(&format!("{}{path}", first.url()));
        clyde_tests::wait_store_holds(&first.data_dir(), 1);
        let seconds = timed_fetch(&format!("{}{path}", second.url()));
        assert!(second.metric("clyde_peer_fetch_bytes_total") >= (size * MIB) as f64, "not from the peer");
        size as f64 / seconds
    };
    for round in 1..=rounds {
        let with_secret = ["--cluster-secret-file", secret.as_str()];
        let (o, p) = if round % 2 == 1 {
            let o = peer_rate(&format!("o{round}"), &[]);
            (o, peer_rate(&format!("p{round}"), &with_secret))
        } else {
            let p = peer_rate(&format!("p{round}"), &with_secret);
            (peer_rate(&format!("o{round}"), &[]), p)
        };
        println!("round {round}: from a peer without a secret {o:.0} MiB/s, with {p:.0} MiB/s ({:.3}x)", p / o);
        open.push(o);
        private.push(p);
    }
    let (o, p) = (percentile(&mut open, 0.5), percentile(&mut private, 0.5));
    println!(
        "one {size} MiB blob from a peer, medians: without a secret {o:.0} MiB/s, with {p:.0} MiB/s; with / without = {:.3}",
        p / o
    );
}

fn copies(args: &[String]) {
    let (size, rounds) = (arg(args, 0, 64usize), arg(args, 1, 3usize).max(1));
    let how = arg(args, 2, "kill".to_string());
    let config = "[peers]\nlookup_timeout = \"1s\"\n[retention]\npinned = [\"/bench/pinned:\"]\nmin_copies = 2\ncopies_interval = \"10s\"\n";
    let (mut again, mut transfer) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let mut reg = Registry::start();
        let image = TestImage::single(&[size * MIB / 2, size * MIB / 2]);
        image.push(&reg, "bench/pinned", "v1", ImageFormat::Oci);
        let reference = TestImage::single(&[size * MIB / 2, size * MIB / 2]);
        reference.push(&reg, "bench/reference", "v1", ImageFormat::Oci);
        // A secret: the reference pull resolves its tag through a member once the upstream stops.
        let secret = clyde_tests::cluster::secret_file("bench-copies-0123456789abcdefghijklmnop");
        let mut cluster = Cluster::start(4, config, &["--cluster-secret-file", &secret]);
        let digests = clyde_tests::pull_image(&cluster.nodes[0].url(), &reg.addr(), "bench/pinned", "v1").digests;
        clyde_tests::pull_image(&cluster.nodes[0].url(), &reg.addr(), "bench/reference", "v1");
        let holds = |a: &clyde_tests::Agent| {
            digests.iter().all(|d| a.data_dir().join("blobs/sha256").join(d.trim_start_matches("sha256:")).is_file())
        };
        clyde_tests::wait_for("a second copy", Duration::from_secs(60), || {
            (cluster.nodes[1..].iter().filter(|n| holds(n)).count() >= 1).then_some(())
        });
        reg.stop();
        // The reference: the same bytes from a peer, fetched by a client through node 4.
        let fetcher = cluster.nodes.iter().skip(1).position(|n| !holds(n)).expect("a node without it") + 1;
        let started = Instant::now();
        clyde_tests::pull_image(&cluster.nodes[fetcher].url(), &reg.addr(), "bench/reference", "v1");
        let t = started.elapsed().as_secs_f64();
        let died = Instant::now();
        if how == "stop" {
            cluster.nodes[0].pause();
        } else {
            cluster.nodes[0].kill9();
        }
        clyde_tests::wait_for("two copies again", Duration::from_secs(120), || {
            (cluster.nodes[1..].iter().filter(|n| holds(n)).count() >= 2).then_some(())
        });
        let a = died.elapsed().as_secs_f64();
        if how == "stop" {
            cluster.nodes[0].resume();
        }
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            for (i, n) in cluster.nodes.iter().enumerate().skip(1) {
                let log = n.log();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        l.contains("copies")
                            || l.contains("walked")
                            || l.contains("pinned image")
                            || l.contains("disconnected")
                            || l.contains("dead")
                    })
                    .collect();
                eprintln!("node {i}:\n{}", lines.join("\n"));
            }
        }
        println!("round {round}: holder {how}: two copies again after {a:.2} s; a {size} MiB peer pull takes {t:.2} s");
        again.push(a);
        transfer.push(t);
    }
    let (a, t) = (percentile(&mut again, 0.5), percentile(&mut transfer, 0.5));
    println!(
        "{size} MiB pinned image, 4 agents, min_copies 2, copies_interval 10s, holder {how}: medians: K copies again after {a:.2} s, \
         a peer pull of the same size {t:.2} s; K copies again minus the transfer = {:.2} s (target <= 30)",
        a - t
    );
}

fn staggered(args: &[String]) {
    let (size, delay, rate) = (arg(args, 0, 256usize), arg(args, 1, 1000u64), arg(args, 2, "200mbit".to_string()));
    let c = NetCluster::start(2, TestImage::single(&[size * MIB]), Some(&rate));
    let started = Instant::now();
    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(|| c.pull(0));
        std::thread::sleep(Duration::from_millis(delay));
        let second = s.spawn(|| c.pull(1));
        (first.join().expect("node 1"), second.join().expect("node 2"))
    });
    let all = started.elapsed().as_secs_f64();
    println!(
        "staggered cold pulls {delay} ms apart behind a {rate} upstream, {size} MiB: upstream blob bytes {:.3}x the image; \
         node 1 {first:.2} s, node 2 {second:.2} s, both done after {all:.2} s",
        c.upstream_ratio()
    );
}

fn herd(args: &[String]) {
    let (n, size) = (arg(args, 0, 6usize).max(2), arg(args, 1, 128usize));
    let (layers, rate) = (arg(args, 2, 4usize).max(1), arg(args, 3, "200mbit".to_string()));
    let config = std::env::var("BENCH_CONFIG").unwrap_or_default();
    let image = TestImage::single(&vec![size * MIB / layers; layers]);
    let c = LabCluster::start(n, image, "bench/swarm", Some(&rate), &config);
    let reference = TestImage::single(&vec![size * MIB / layers; layers]);
    reference.push(&c.upstream, "bench/reference", "v1", ImageFormat::Oci);
    let reference_name = format!("{}/bench/reference:v1", c.upstream.addr());
    let hosts = c.nodes[0].ctrd.mirror_hosts_dir(&c.upstream, &c.nodes[0].agent);
    clyde_tests::run(&mut std::process::Command::new("sync"));
    let started = Instant::now();
    let (ok, out) = c.nodes[0].ctrd.pull(&hosts, &reference_name, &["--plain-http"]);
    let alone = started.elapsed().as_secs_f64();
    assert!(ok, "reference pull failed:\n{out}");
    let before = c.upstream.requests().len();
    clyde_tests::run(&mut std::process::Command::new("sync"));
    let barrier = std::sync::Barrier::new(n);
    let times: Vec<f64> = std::thread::scope(|s| {
        let pulls: Vec<_> = (0..n)
            .map(|i| {
                let (c, barrier) = (&c, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    let (ok, out) = c.try_pull(i);
                    if !ok {
                        let log = c.nodes[i].agent.log();
                        let notable: Vec<&str> = log
                            .lines()
                            .filter(|l| {
                                l.contains(" WARN ")
                                    || l.contains(" ERROR ")
                                    || (l.contains("status=404") && l.contains("api=\"mirror\""))
                                    || l.contains("elected")
                                    || l.contains("passing")
                                    || l.contains("upstream unavailable")
                            })
                            .collect();
                        let last = out.lines().last().unwrap_or("");
                        panic!(
                            "pull on node {} failed: {last}\nits agent's warnings and misses:\n{}",
                            i + 1,
                            notable.join("\n")
                        );
                    }
                    started.elapsed().as_secs_f64()
                })
            })
            .collect();
        pulls.into_iter().map(|p| p.join().expect("pull")).collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    let requests = c.upstream.requests();
    let herd_requests = &requests[before.min(requests.len())..];
    let blob_bytes: u64 =
        herd_requests.iter().filter(|(m, uri, _, _)| m == "GET" && uri.contains("/blobs/")).map(|r| r.2).sum();
    let manifests = herd_requests.iter().filter(|(m, uri, _, _)| m == "GET" && uri.contains("/manifests/")).count();
    let layers_ratio = c.upstream_layer_bytes() as f64 / c.image.layer_bytes() as f64;
    let (mut won, mut followed, mut rivals) = (0, 0, Vec::new());
    let (mut passed, mut gave_up, mut unvouched) = (0, 0, 0);
    for node in &c.nodes {
        let log = node.agent.log();
        passed += log.matches("passing the elected fetcher over").count();
        gave_up += log.matches("no elected fetcher started serving").count();
        unvouched += log.matches("no member vouches for these pieces").count();
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            for l in log.lines().filter(|l| {
                l.contains("no piece list") || l.contains("piece list refused") || l.contains("no member vouches")
            }) {
                eprintln!("{l}");
            }
        }
        for line in log.lines().filter(|l| l.contains("bench/swarm") || l.contains("rivals=")) {
            if line.contains("elected to fetch from the upstream") {
                won += 1;
            } else if line.contains("following the elected fetcher") {
                followed += 1;
            } else {
                continue;
            }
            if let Some(r) = line.split("rivals=").nth(1).and_then(|v| v.split_whitespace().next()) {
                rivals.push(r.parse::<f64>().unwrap_or(-1.0));
            }
        }
    }
    if !rivals.is_empty() {
        println!(
            "elections: {won} won, {followed} followed, {passed} passed over, {gave_up} gave up, {unvouched} pieces unvouched; rivals seen: min {}, median {}, max {}",
            percentile(&mut rivals.clone(), 0.0),
            percentile(&mut rivals.clone(), 0.5),
            percentile(&mut rivals, 1.0)
        );
    }
    if std::env::var_os("BENCH_VERBOSE").is_some()
        && let Some(slowest) = (0..n).max_by(|a, b| times[*a].total_cmp(&times[*b]))
    {
        eprintln!("node {} took {:.2} s:", slowest + 1, times[slowest]);
        for l in c.nodes[slowest].agent.log().lines().filter(|l| {
            l.contains("following")
                || l.contains("elected to")
                || (l.contains("api=\"mirror\"") && l.contains("blobs"))
                || l.contains("committed")
                || l.contains("penalized")
        }) {
            eprintln!("{}", &l[..l.len().min(300)]);
        }
    }
    let mut sorted = times.clone();
    let last = percentile(&mut sorted, 1.0);
    let median = percentile(&mut sorted, 0.5);
    println!(
        "herd of {n} nodes at one instant, {size} MiB in {layers} layers, upstream at {rate}: upstream layer bytes \
         {layers_ratio:.3}x the image ({blob_bytes} blob bytes in all), {manifests} manifest GETs; last node done \
         {last:.2} s, median {median:.2} s; one node's cold pull alone {alone:.2} s; last / alone = {:.2}",
        last / alone
    );
}

fn holders(args: &[String]) {
    let (k, size) = (arg(args, 0, 4usize).max(1), arg(args, 1, 256usize));
    let (rate, rounds) = (arg(args, 2, "200mbit".to_string()), arg(args, 3, 3usize).max(1));
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let c = NetCluster::start(k + 1, TestImage::single(&[size * MIB]), None).c;
        let layer = c.image.layers[0].digest.clone();
        let single = TestImage::single(&[size * MIB]);
        single.push(&c.upstream, "bench/single", "v1", ImageFormat::Oci);
        let single_layer = single.layers[0].digest.clone();
        c.fetch_blob(0, "bench/single", &single_layer);
        for i in 0..k {
            c.fetch_blob(i, "bench/swarm", &layer);
            clyde_tests::wait_store_holds(&c.nodes[i].agent.data_dir(), if i == 0 { 2 } else { 1 });
        }
        for node in &c.nodes[..k] {
            c.lab.limit_egress(node.agent.place(), &rate);
        }
        let one = c.fetch_blob(k, "bench/single", &single_layer);
        let all = c.fetch_blob(k, "bench/swarm", &layer);
        println!("round {round}: from one holder {one:.2} s, from {k} holders {all:.2} s, {:.2}x", one / all);
        ratios.push(one / all);
    }
    println!(
        "{size} MiB from {k} complete holders, uplinks at {rate}, {rounds} rounds: median {:.2}x one link (worst {:.2}x)",
        percentile(&mut ratios.clone(), 0.5),
        percentile(&mut ratios, 0.0)
    );
}

/// One node and an upstream on its own host behind `rate`, `layers` cold layers of `size`.
struct LazyLab {
    _lab: Lab,
    up: clyde_tests::Place,
    upstream: Registry,
    image: TestImage,
    agent: Agent,
}

impl LazyLab {
    fn start(size: usize, layers: usize, rate: &str) -> Self {
        let mut lab = Lab::new();
        let up = lab.host("up");
        let upstream = Registry::start_in(&up, &RegistryOptions::default());
        let image = TestImage::single(&vec![size * MIB; layers]);
        eprintln!("pushing {layers} layers of {size} MiB...");
        image.push(&upstream, "bench/lazy", "v1", ImageFormat::Oci);
        lab.limit_egress(&up, rate);
        let node = lab.host("node");
        let config = format!("[[registries]]\nname = \"{}\"\nscheme = \"http\"\n", upstream.addr());
        let agent = Agent::start_in(&node, &config, &[]);
        agent.wait_ready();
        Self { _lab: lab, up, upstream, image, agent }
    }

    fn mirror_url(&self, layer: usize) -> String {
        let digest = &self.image.layers[layer].digest;
        format!("http://{}/v2/bench/lazy/blobs/{digest}?ns={}", self.agent.addr(), self.upstream.addr())
    }

    fn direct_url(&self, layer: usize) -> String {
        format!("http://{}/v2/bench/lazy/blobs/{}", self.upstream.addr(), self.image.layers[layer].digest)
    }

    /// Seconds curl (in the node's namespace) took for `range` of `url`, the bytes checked.
    fn ranged(&self, url: &str, range: std::ops::Range<u64>, want: &[u8]) -> f64 {
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let mut curl = self.agent.place().command("curl");
        let r = format!("{}-{}", range.start, range.end - 1);
        let written = clyde_tests::run(curl.args(["-s", "-r", &r, "-o"]).arg(out.path()).args([
            "-w",
            "%{http_code} %{time_total}",
            url,
        ]));
        let (status, secs) = written.trim().split_once(' ').expect("curl output");
        assert_eq!(status, "206", "GET {url} range {r}");
        let got = std::fs::read(out.path()).expect("range");
        assert!(got == want[range.start as usize..range.end as usize], "wrong bytes for {r} of {url}");
        secs.parse().expect("seconds")
    }
}

fn lazy(args: &[String]) {
    let (size, ranges, rate) = (arg(args, 0, 256usize), arg(args, 1, 13usize), arg(args, 2, "200mbit".to_string()));
    let l = LazyLab::start(size, 1, &rate);
    let want = l.image.layer_data(0);
    let len = want.len() as u64;
    let mut rng = rand::thread_rng();
    let mut ratios = Vec::new();
    let (mut mirror, mut direct) = (Vec::new(), Vec::new());
    let sent_before = l.up.tx_bytes();
    let mut direct_bytes = 0u64;
    for i in 0..ranges {
        // One range per stretch of the layer, so no range reads bytes another one fetched.
        let stretch = len / ranges as u64;
        let at = i as u64 * stretch + rand::Rng::gen_range(&mut rng, 0..stretch - MIB as u64);
        let range = at..at + MIB as u64;
        let (m, d) = if i % 2 == 0 {
            let before = l.up.tx_bytes();
            let d = l.ranged(&l.direct_url(0), range.clone(), &want);
            direct_bytes += l.up.tx_bytes() - before;
            (l.ranged(&l.mirror_url(0), range, &want), d)
        } else {
            let m = l.ranged(&l.mirror_url(0), range.clone(), &want);
            let before = l.up.tx_bytes();
            let d = l.ranged(&l.direct_url(0), range, &want);
            direct_bytes += l.up.tx_bytes() - before;
            (m, d)
        };
        println!("range {i} at {at}: mirror {:.1} ms, direct {:.1} ms, {:.2}x", m * 1e3, d * 1e3, m / d);
        mirror.push(m);
        direct.push(d);
        ratios.push(m / d);
    }
    std::thread::sleep(Duration::from_secs(3));
    let through_mirror = l.up.tx_bytes() - sent_before - direct_bytes;
    let read = ranges as u64 * MIB as u64;
    println!(
        "{ranges} uncached 1 MiB ranges of a {size} MiB layer, upstream at {rate}: median mirror {:.1} ms, direct {:.1} ms, \
         median ratio {:.2}x (worst {:.2}x); upstream bytes for the mirror's ranges {:.3}x the {:.1}% read",
        percentile(&mut mirror, 0.5) * 1e3,
        percentile(&mut direct, 0.5) * 1e3,
        percentile(&mut ratios.clone(), 0.5),
        percentile(&mut ratios, 1.0),
        through_mirror as f64 / read as f64,
        read as f64 * 100.0 / len as f64,
    );
}

fn chunked(args: &[String]) {
    let (size, rate, rounds) =
        (arg(args, 0, 64usize), arg(args, 1, "200mbit".to_string()), arg(args, 2, 3usize).max(1));
    let (mut ratios, mut bytes) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let l = LazyLab::start(size, 2, &rate);
        let len = l.image.layers[0].size;
        // The reference: one plain GET of the other layer through the mirror.
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let started = Instant::now();
        let mut curl = l.agent.place().command("curl");
        let code =
            clyde_tests::run(curl.args(["-s", "-o"]).arg(out.path()).args(["-w", "%{http_code}", &l.mirror_url(1)]));
        let plain = started.elapsed().as_secs_f64();
        assert_eq!(code.trim(), "200");
        assert_eq!(clyde_tests::sha256(&std::fs::read(out.path()).expect("blob")), l.image.layers[1].digest);
        std::thread::sleep(Duration::from_secs(1));
        // containerd 2.1: workers take the next 8 MiB chunk, ask `bytes=N-`, read the chunk,
        // drop the connection.
        let chunk = 8 * MIB as u64;
        let next = std::sync::atomic::AtomicU64::new(0);
        let dir = tempfile::tempdir().expect("tempdir");
        let url = l.mirror_url(0);
        let sent_before = l.up.tx_bytes();
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i * chunk >= len {
                            return;
                        }
                        let part = dir.path().join(format!("{i:04}"));
                        let script = format!(
                            "curl -s -H 'Range: bytes={}-' '{url}' | head -c {chunk} > '{}'",
                            i * chunk,
                            part.display()
                        );
                        clyde_tests::run(l.agent.place().command("sh").args(["-c", &script]));
                    }
                });
            }
        });
        let fetched = started.elapsed().as_secs_f64();
        let mut all = Vec::new();
        let mut parts: Vec<_> =
            std::fs::read_dir(dir.path()).expect("parts").map(|e| e.expect("part").path()).collect();
        parts.sort();
        for p in parts {
            all.extend(std::fs::read(p).expect("part"));
        }
        assert_eq!(clyde_tests::sha256(&all), l.image.layers[0].digest, "the chunks do not make the layer");
        std::thread::sleep(Duration::from_secs(3));
        let b = (l.up.tx_bytes() - sent_before) as f64 / len as f64;
        println!(
            "round {round}: chunked {fetched:.2} s, plain GET {plain:.2} s, {:.3}x; upstream bytes {b:.3}x the layer",
            fetched / plain
        );
        ratios.push(fetched / plain);
        bytes.push(b);
    }
    println!(
        "containerd 2.1-style fetch (4 workers, 8 MiB chunks, bytes=N-) of a cold {size} MiB layer, upstream at {rate}, \
         {rounds} rounds: median {:.3}x one plain GET; upstream bytes {:.3}x the layer (worst)",
        percentile(&mut ratios, 0.5),
        percentile(&mut bytes, 1.0),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("scale-out") => scale_out(&args[1..]),
        Some("lookup") => lookup(&args[1..]),
        Some("staggered") => staggered(&args[1..]),
        Some("blob") => blob(&args[1..]),
        Some("secret") => secret(&args[1..]),
        Some("copies") => copies(&args[1..]),
        Some("pull") => pull(&args[1..]),
        Some("herd") => herd(&args[1..]),
        Some("holders") => holders(&args[1..]),
        Some("lazy") => lazy(&args[1..]),
        Some("chunked") => chunked(&args[1..]),
        _ => {
            eprintln!(
                "usage: bench-swarm scale-out|lookup|staggered|herd|holders|pull|blob|secret|copies|lazy|chunked [ARGS] (see the source's header)"
            );
            std::process::exit(2);
        }
    }
}
