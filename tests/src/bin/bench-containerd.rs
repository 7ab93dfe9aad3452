//! Serving a blob to a peer from containerd's content store, against serving it from
//! Clyde's own store, in the same run.
//!
//! `cargo run --release -p clyde-tests --bin bench-containerd -- [SIZE_MIB=256] [ROUNDS=3]`
//! containerd pulls an image of one layer straight from the registry. Three agents serve the
//! layer on their peer port: one reading containerd's content directory, one reading it over
//! containerd's gRPC `Read`, and one from its own store (the reference, filled through its
//! mirror). Each round fetches the whole layer from each, in turn, and prints the times and
//! the ratios to the reference.

use std::time::Duration;

use clyde_tests::{Agent, Containerd, ImageFormat, Registry, TestImage, sha256, timed_get, wait_for};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let size_mib = args.first().copied().unwrap_or(256);
    let rounds = args.get(1).copied().unwrap_or(3).max(1);
    let reg = Registry::start();
    let img = TestImage::single(&[size_mib * 1024 * 1024]);
    img.push(&reg, "bench/ctrd", "v1", ImageFormat::Oci);
    let layer = img.layers[0].clone();
    let ctrd = Containerd::start();
    let (ok, out) = ctrd.pull(&ctrd.hosts_dir(), &format!("{}/bench/ctrd:v1", reg.addr()), &["--plain-http"]);
    assert!(ok, "pull: {out}");
    let sharing = |from_dir: bool| {
        let args = ctrd.sharing_args(from_dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start("", &args);
        wait_for("the agent to list containerd", Duration::from_secs(30), || {
            (agent.metric("clyde_advertised_keys") >= 3.0).then_some(())
        });
        agent
    };
    let file = sharing(true);
    let grpc = sharing(false);
    let own = Agent::start("", &[]);
    let (_, _, body) = timed_get(&format!("{}/v2/bench/ctrd/blobs/{}?ns={}", own.url(), layer.digest, reg.addr()), &[]);
    assert_eq!(sha256(&body), layer.digest);
    let path = own.data_dir().join("blobs").join(layer.digest.replace(':', "/"));
    wait_for("the reference store to commit", Duration::from_secs(30), || path.exists().then_some(()));
    let fetch = |agent: &Agent| {
        let url = format!("http://{}/v2/bench/ctrd/blobs/{}?ns={}", agent.peer_addr(), layer.digest, reg.addr());
        let (_, total, body) = timed_get(&url, &[]);
        assert_eq!(sha256(&body), layer.digest);
        total.as_secs_f64()
    };
    let (mut r, mut f, mut g) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (rt, ft, gt) = (fetch(&own), fetch(&file), fetch(&grpc));
        println!(
            "round {round}: own store {rt:.3} s, containerd directory {ft:.3} s ({:.2}x), containerd gRPC {gt:.3} s ({:.2}x)",
            ft / rt,
            gt / rt
        );
        r.push(rt);
        f.push(ft);
        g.push(gt);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (rm, fm, gm) = (median(&mut r), median(&mut f), median(&mut g));
    println!(
        "{size_mib} MiB, median of {rounds}: own store {rm:.3} s ({:.0} MiB/s); containerd directory {:.2}x, containerd gRPC {:.2}x of the own store's time",
        size_mib as f64 / rm,
        fm / rm,
        gm / rm
    );
}
