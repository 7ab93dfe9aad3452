//! Clyde's integration test kit: real parts on free loopback ports.
//!
//! - [`Registry`]: Debian's `docker-registry` (CNCF distribution), with a JSON log that
//!   counts the bytes it served.
//! - [`TestImage`]: random, incompressible images written as an OCI layout and pushed
//!   with `skopeo` (single- or multi-arch, OCI or Docker media types).
//! - [`Agent`]: a `clyde serve` process; [`Cluster`]: several, joined as one swarm on
//!   127.0.0.x addresses, and [`pull_image`], a verifying client that pulls like containerd.
//! - [`Containerd`]: a real containerd with its own root, state and socket.
//! - [`Lab`]: hosts in network namespaces on one bridge, with `tc` bandwidth limits; every
//!   part above can run in a lab host ([`Place`]).
//! - [`Pki`]: a CA, a server and a client certificate made with `openssl`.
//! - [`SlowProxy`]: a rate-limited TCP relay, for faults a real part cannot make on demand.
//! - [`TokenGate`]: a bearer-token front for a registry (Debian ships no token server).
//! - [`LyingPeer`]: a member's peer port that claims other sizes than its blobs have.
//!
//! A missing binary fails the test with what to install; nothing is skipped.

pub mod agent;
pub mod cluster;
pub mod containerd;
pub mod image;
pub mod lab;
pub mod liar;
pub mod pki;
pub mod proxy;
pub mod registry;
pub mod token_gate;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use agent::Agent;
pub use cluster::{Cluster, Pulled, pull_image, wait_log};
pub use containerd::Containerd;
pub use image::{ImageFormat, TestImage};
pub use lab::{Lab, LabCluster, LabNode, Place};
pub use liar::LyingPeer;
pub use pki::Pki;
pub use proxy::SlowProxy;
pub use registry::{Registry, RegistryOptions};
pub use token_gate::TokenGate;

/// A free TCP port on 127.0.0.1 (bound and released).
/// Serves each connection `listener` accepts on a thread of its own with `handle`, until
/// `stop` says so (the owner then connects once more to wake the loop).
pub(crate) fn serve_threads<S: Send + Sync + 'static>(
    listener: std::net::TcpListener,
    shared: std::sync::Arc<S>,
    stop: fn(&S) -> bool,
    handle: impl Fn(&S, std::net::TcpStream) + Send + Sync + Copy + 'static,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop(&shared) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let shared = shared.clone();
            std::thread::spawn(move || handle(&shared, conn));
        }
    });
}

pub fn free_port() -> u16 {
    agent::free_port_on("127.0.0.1")
}

/// The absolute path of a program, or a panic that says which package provides it.
pub fn require(program: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("{program} is not installed: run `apt-get install {package}` (scripts/test does it)");
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(timeout, check).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `check` until it returns `Some`, or gives up after `timeout`.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Starts a long-running part with no stdin and stdout + stderr in `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> std::process::Child {
    let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    cmd.stdin(std::process::Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 of bytes as `sha256:<hex>`.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// A blocking HTTP client with no proxy and generous timeouts.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// GETs `url` (with extra headers), returning the time to the first body byte, the time to
/// the last, and the body.
pub fn timed_get(url: &str, headers: &[(&str, &str)]) -> (Duration, Duration, Vec<u8>) {
    use std::io::Read;
    let started = Instant::now();
    let mut req = http().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    let mut body = vec![0u8; 1];
    r.read_exact(&mut body).expect("first byte");
    let first = started.elapsed();
    r.read_to_end(&mut body).expect("body");
    (first, started.elapsed(), body)
}

/// Every file under `dir/blobs/sha256` hashes to its name.
pub fn assert_store_verified(data_dir: &Path) -> usize {
    let dir = data_dir.join("blobs/sha256");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("blobs dir") {
        let entry = entry.expect("entry");
        let bytes = std::fs::read(entry.path()).expect("read blob");
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(sha256(&bytes), format!("sha256:{name}"), "corrupt blob in the store: {}", entry.path().display());
        n += 1;
    }
    n
}

/// Waits until the store in `data_dir` holds at least `n` blobs, all verified (a response
/// ends as soon as the bytes verify; the commit to the store follows right after).
pub fn wait_store_holds(data_dir: &Path, n: usize) -> usize {
    wait_for(&format!("{n} verified blobs in {}", data_dir.display()), Duration::from_secs(20), || {
        let held = assert_store_verified(data_dir);
        (held >= n).then_some(held)
    })
}
