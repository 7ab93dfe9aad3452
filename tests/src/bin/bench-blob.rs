//! One cold blob through the mirror vs straight from the upstream, alternating, same run.
//!
//! `cargo run --release -p clyde-tests --bin bench-blob -- [SIZE_MIB=128] [ROUNDS=3] [UPSTREAM_MIB_PER_S]`
//! Each mirror round uses a fresh agent (empty store). Prints time to first byte and total
//! time for both, and the ratio mirror/direct of the totals.

use std::time::Duration;

use clyde_tests::{Agent, ImageFormat, Registry, SlowProxy, TestImage, sha256, timed_get};

fn fetch(url: &str) -> (Duration, Duration, String) {
    let (first, total, body) = timed_get(url, &[]);
    (first, total, sha256(&body))
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let size_mib = args.first().copied().unwrap_or(128);
    let rounds = args.get(1).copied().unwrap_or(3).max(1);
    let rate = args.get(2).copied();
    let reg = Registry::start();
    let img = TestImage::single(&[size_mib * 1024 * 1024]);
    img.push(&reg, "bench/blob", "v1", ImageFormat::Oci);
    let layer = img.layers[0].clone();
    let proxy = rate.map(|r| SlowProxy::start(&reg.addr(), (r * 1024 * 1024) as u64));
    let upstream = proxy.as_ref().map_or_else(|| reg.addr(), SlowProxy::addr);
    let config = format!("[[registries]]\nname = \"{}\"\nendpoint = \"{upstream}\"\n", reg.addr());
    let (mut d, mut m) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (dt, dtot, dsum) = fetch(&format!("http://{upstream}/v2/bench/blob/blobs/{}", layer.digest));
        assert_eq!(dsum, layer.digest);
        let agent = Agent::start(&config, &[]);
        let (mt, mtot, msum) =
            fetch(&format!("{}/v2/bench/blob/blobs/{}?ns={}", agent.url(), layer.digest, reg.addr()));
        assert_eq!(msum, layer.digest);
        println!(
            "round {round}: direct first byte {:.1} ms, total {:.2} s; mirror first byte {:.1} ms, total {:.2} s (clyde {:.2} CPU s)",
            dt.as_secs_f64() * 1e3,
            dtot.as_secs_f64(),
            mt.as_secs_f64() * 1e3,
            mtot.as_secs_f64(),
            agent.cpu_seconds()
        );
        d.push(dtot.as_secs_f64());
        m.push(mtot.as_secs_f64());
    }
    d.sort_by(f64::total_cmp);
    m.sort_by(f64::total_cmp);
    let (dm, mm) = (d[d.len() / 2], m[m.len() / 2]);
    println!("median: direct {dm:.2} s, mirror {mm:.2} s, ratio mirror/direct {:.3} ({size_mib} MiB)", mm / dm);
}
