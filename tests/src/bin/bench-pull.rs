//! Cold `ctr` pull through the mirror vs directly from the upstream, alternating, same run.
//!
//! `cargo run --release -p clyde-tests --bin bench-pull -- [SIZE_MIB=512] [LAYERS=4] [ROUNDS=3] [UPSTREAM_MIB_PER_S]`
//! (as root; uses `CLYDE_BIN` or the clyde built beside it). With a rate, both the direct and
//! the mirror pull reach the upstream through the same rate-limited relay (a slow registry). Each mirror round starts a fresh
//! agent with an empty store, so every mirror pull is cold. Prints the medians, the time ratio
//! mirror/direct (target <= 1.05) and the upstream's blob bytes per mirror pull over the image's
//! (target 1.0).

use std::time::Instant;

use clyde_tests::{Agent, Containerd, ImageFormat, Registry, SlowProxy, TestImage};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let size_mib = args.first().copied().unwrap_or(512);
    let layers = args.get(1).copied().unwrap_or(4).max(1);
    let rounds = args.get(2).copied().unwrap_or(3).max(1);
    let rate = args.get(3).copied();
    let mib = 1024 * 1024;

    let reg = Registry::start();
    eprintln!("building and pushing a {size_mib} MiB image in {layers} layers...");
    let img = TestImage::single(&vec![size_mib * mib / layers; layers]);
    img.push(&reg, "bench/pull", "v1", ImageFormat::Oci);
    let image_bytes = img.layer_bytes();
    let ctrd = Containerd::start();
    let reference = format!("{}/bench/pull:v1", reg.addr());
    let proxy = rate.map(|r| SlowProxy::start(&reg.addr(), (r * mib) as u64));
    let upstream = proxy.as_ref().map_or_else(|| reg.addr(), SlowProxy::addr);
    let agent_config = format!("[[registries]]\nname = \"{}\"\nendpoint = \"{upstream}\"\n", reg.addr());

    let direct_hosts = tempfile::tempdir().expect("tempdir");
    let dir = direct_hosts.path().join(reg.addr());
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{upstream}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr()
        ),
    )
    .expect("hosts.toml");

    let (mut direct, mut mirror, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let started = Instant::now();
        let (ok, out) = ctrd.pull(direct_hosts.path(), &reference, &[]);
        assert!(ok, "direct pull failed: {out}");
        let d = started.elapsed().as_secs_f64();
        ctrd.remove(&reference);

        let agent = Agent::start(&agent_config, &[]);
        let hosts = ctrd.mirror_hosts_dir(&reg, &agent);
        let before: u64 = img.layers.iter().map(|l| reg.blob_bytes_served(&l.digest)).sum();
        let started = Instant::now();
        let (ok, out) = ctrd.pull(&hosts, &reference, &[]);
        assert!(ok, "mirror pull failed: {out}");
        let m = started.elapsed().as_secs_f64();
        let cpu = agent.cpu_seconds();
        ctrd.remove(&reference);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let after: u64 = img.layers.iter().map(|l| reg.blob_bytes_served(&l.digest)).sum();
        let ratio = (after - before) as f64 / image_bytes as f64;
        drop(agent);
        std::fs::remove_dir_all(&hosts).expect("clean hosts dir");
        println!(
            "round {round}: direct {d:.2} s, mirror {m:.2} s (clyde used {cpu:.2} CPU s), upstream layer bytes {ratio:.3}x the image"
        );
        direct.push(d);
        mirror.push(m);
        ratios.push(ratio);
    }
    let (d, m) = (median(direct), median(mirror));
    println!(
        "median: direct {d:.2} s, mirror {m:.2} s, ratio mirror/direct {:.3}; upstream bytes per mirror pull {:.3}x the image ({size_mib} MiB, {layers} layers, {rounds} rounds, upstream {})",
        m / d,
        median(ratios),
        rate.map_or_else(|| "unlimited".to_string(), |r| format!("{r} MiB/s"))
    );
}
