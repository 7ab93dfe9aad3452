//! The mirror API against a real upstream registry, without containerd.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clyde_tests::{
    Agent, ImageFormat, Registry, SlowProxy, TestImage, assert_store_verified, http, sha256, wait_store_holds,
};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

const MIB: usize = 1024 * 1024;

fn get(url: &str, headers: &[(&str, &str)]) -> reqwest::blocking::Response {
    let mut req = http().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn header(r: &reqwest::blocking::Response, name: &str) -> String {
    r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

fn blob_direct(reg: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    get(&format!("http://{}/v2/{repo}/blobs/{digest}", reg.addr()), &[]).bytes().expect("blob").to_vec()
}

/// Sends a raw request line (paths a client library would normalise) and returns the status.
fn raw_status(agent: &Agent, request: &str) -> u16 {
    let mut s = TcpStream::connect(agent.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn manifests_are_served_byte_for_byte_for_every_media_type() {
    let reg = Registry::start();
    TestImage::multi_arch(&[1000, 2000]).push(&reg, "team/oci", "v1", ImageFormat::Oci);
    TestImage::multi_arch(&[1000]).push(&reg, "team/docker", "v1", ImageFormat::Docker);
    TestImage::single(&[3000]).push(&reg, "deep/er/name", "v1", ImageFormat::Docker);
    let agent = Agent::start("", &[]);

    let root = get(&format!("{}/v2/", agent.url()), &[]);
    assert_eq!(root.status(), 200);
    assert_eq!(header(&root, "docker-distribution-api-version"), "registry/2.0");

    for repo in ["team/oci", "team/docker", "deep/er/name"] {
        let direct = get(&format!("http://{}/v2/{repo}/manifests/v1", reg.addr()), &[("accept", ACCEPT)]);
        let (d_type, d_digest) = (header(&direct, "content-type"), header(&direct, "docker-content-digest"));
        let d_bytes = direct.bytes().expect("body");
        assert_eq!(sha256(&d_bytes), d_digest);
        for url in [
            format!("{}/v2/{repo}/manifests/v1?ns={}", agent.url(), reg.addr()),
            format!("{}/v2/{repo}/manifests/{d_digest}?ns={}", agent.url(), reg.addr()),
        ] {
            for _ in 0..2 {
                let via = get(&url, &[("accept", ACCEPT)]);
                assert_eq!(via.status(), 200, "{url}");
                assert_eq!(header(&via, "content-type"), d_type, "{url}");
                assert_eq!(header(&via, "docker-content-digest"), d_digest, "{url}");
                assert_eq!(via.bytes().expect("body"), d_bytes, "{url}");
            }
        }
        let head = http()
            .head(format!("{}/v2/{repo}/manifests/v1?ns={}", agent.url(), reg.addr()))
            .header("accept", ACCEPT)
            .send()
            .expect("head");
        assert_eq!(head.status(), 200);
        assert_eq!(header(&head, "content-length"), d_bytes.len().to_string());
        assert_eq!(header(&head, "docker-content-digest"), d_digest);
    }
    // A client that accepts anything (`*/*`, as curl sends) gets a child manifest that is not
    // cached yet: the upstream must be asked for every manifest type, not for `*/*`.
    let index: serde_json::Value =
        get(&format!("http://{}/v2/team/oci/manifests/v1", reg.addr()), &[("accept", ACCEPT)]).json().expect("index");
    let child = index["manifests"][0]["digest"].as_str().expect("child digest").to_string();
    let via = get(&format!("{}/v2/team/oci/manifests/{child}?ns={}", agent.url(), reg.addr()), &[("accept", "*/*")]);
    assert_eq!(via.status(), 200);
    assert_eq!(header(&via, "content-type"), "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(sha256(&via.bytes().expect("body")), child);
    wait_store_holds(&agent.data_dir(), 4);
}

#[test]
fn ranges_on_uncached_and_cached_blobs_return_exactly_those_bytes() {
    let reg = Registry::start();
    let img = TestImage::single(&[3 * MIB]);
    img.push(&reg, "app", "v1", ImageFormat::Oci);
    let layer = &img.layers[0];
    let want = blob_direct(&reg, "app", &layer.digest);
    let size = want.len();
    let agent = Agent::start("", &["--piece-size", "1048576"]);
    let url = format!("{}/v2/app/blobs/{}?ns={}", agent.url(), layer.digest, reg.addr());

    // Uncached: a small range in the middle comes back first, exact.
    let r = get(&url, &[("range", "bytes=1500000-1500099")]);
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), format!("bytes 1500000-1500099/{size}"));
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(r.bytes().expect("body"), want[1500000..1500100]);

    // The full blob, reusing what is already held.
    let r = get(&url, &[]);
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), layer.digest);
    assert_eq!(r.bytes().expect("body").to_vec(), want);

    for (range, expect) in [
        ("bytes=0-0", &want[0..1]),
        ("bytes=-10", &want[size - 10..]),
        ("bytes=1048570-", &want[1048570..]),
        (&*format!("bytes=10-{}", size * 2), &want[10..]),
    ] {
        let r = get(&url, &[("range", range)]);
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(r.bytes().expect("body"), expect, "{range}");
    }
    for bad in [format!("bytes={size}-"), "bytes=a-b".to_string(), format!("bytes={size}-,-0"), "bytes=-0".to_string()]
    {
        let r = get(&url, &[("range", &bad)]);
        assert_eq!(r.status(), 416, "{bad}");
    }
    let r = get(&url, &[("range", &format!("bytes={size}-"))]);
    assert_eq!(header(&r, "content-range"), format!("bytes */{size}"));
    assert_store_verified(&agent.data_dir());
    assert!(agent.data_dir().join("blobs/sha256").join(layer.digest.trim_start_matches("sha256:")).exists());

    // Past the end of a blob nobody fetched yet: 416 with its size, and nothing downloaded.
    let other = TestImage::single(&[MIB]);
    other.push(&reg, "app", "v2", ImageFormat::Oci);
    let blob = &other.layers[0];
    let r = get(
        &format!("{}/v2/app/blobs/{}?ns={}", agent.url(), blob.digest, reg.addr()),
        &[("range", &format!("bytes={}-", blob.size))],
    );
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "content-range"), format!("bytes */{}", blob.size));
    std::thread::sleep(Duration::from_millis(200));
    let hex = blob.digest.trim_start_matches("sha256:");
    assert!(!agent.data_dir().join("partial/sha256").join(hex).exists(), "a download started");
    assert!(!agent.data_dir().join("blobs/sha256").join(hex).exists(), "a download started");
}

#[test]
fn misses_are_404_and_bad_input_is_400_and_writes_nothing() {
    let reg = Registry::start();
    let agent = Agent::start("", &[]);
    let ns = reg.addr();
    let unknown = sha256(b"nothing");

    let r = get(&format!("{}/v2/app/blobs/{unknown}?ns={ns}", agent.url()), &[]);
    assert_eq!(r.status(), 404);
    assert!(r.text().expect("body").contains("BLOB_UNKNOWN"));
    let r = get(&format!("{}/v2/app/manifests/nope?ns={ns}", agent.url()), &[]);
    assert_eq!(r.status(), 404);
    assert!(r.text().expect("body").contains("MANIFEST_UNKNOWN"));

    // An upstream nobody listens on: a fast 404, so containerd falls back.
    let dead = format!("127.0.0.1:{}", clyde_tests::free_port());
    let started = Instant::now();
    let r = get(&format!("{}/v2/app/manifests/v1?ns={dead}", agent.url()), &[]);
    assert_eq!(r.status(), 404);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    for (path, code) in [
        ("/v2/app/blobs/sha256:zz", "DIGEST_INVALID"),
        ("/v2/app/blobs/sha512:00", "DIGEST_INVALID"),
        ("/v2/Upper/manifests/v1", "NAME_INVALID"),
        ("/v2/app/manifests/-bad", "TAG_INVALID"),
    ] {
        let r = get(&format!("{}{path}?ns={ns}", agent.url()), &[]);
        assert_eq!(r.status(), 400, "{path}");
        assert!(r.text().expect("body").contains(code), "{path}");
    }
    let r = get(&format!("{}/v2/app/manifests/v1?ns=..%2Fetc", agent.url()), &[]);
    assert_eq!(r.status(), 400);
    assert_eq!(raw_status(&agent, "GET /v2/../../etc/manifests/v1 HTTP/1.1\r\nhost: x\r\n\r\n"), 400);
    assert_eq!(raw_status(&agent, "GET /v2/a/..%2F..%2Fb/manifests/v1 HTTP/1.1\r\nhost: x\r\n\r\n"), 400);
    assert_eq!(raw_status(&agent, "DELETE /v2/app/manifests/v1 HTTP/1.1\r\nhost: x\r\n\r\n"), 405);
    let huge = format!("GET /v2/ HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(200 * 1024));
    let status = raw_status(&agent, &huge);
    assert!(status == 431 || status == 400 || status == 0, "oversize header answered {status}");
    let long = format!("GET /v2/{}/manifests/v1 HTTP/1.1\r\nhost: x\r\n\r\n", "a/".repeat(3000));
    assert_eq!(raw_status(&agent, &long), 414);

    // Still healthy, and nothing was stored.
    assert_eq!(get(&format!("{}/v2/", agent.url()), &[]).status(), 200);
    assert_eq!(assert_store_verified(&agent.data_dir()), 0);
    assert_eq!(std::fs::read_dir(agent.data_dir().join("partial/sha256")).expect("dir").count(), 0);
}

#[test]
fn sixteen_concurrent_gets_of_an_uncached_blob_fetch_it_upstream_once() {
    let reg = Registry::start();
    let img = TestImage::single(&[64 * MIB]);
    img.push(&reg, "big", "v1", ImageFormat::Oci);
    let layer = img.layers[0].clone();
    let agent = Agent::start("", &[]);
    let url = format!("{}/v2/big/blobs/{}?ns={}", agent.url(), layer.digest, reg.addr());
    let barrier = Arc::new(Barrier::new(16));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = get(&url, &[]);
                assert_eq!(r.status(), 200);
                sha256(&r.bytes().expect("body"))
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().expect("reader"), layer.digest);
    }
    let served = reg.wait_blob_bytes(&layer.digest, layer.size);
    assert_eq!(
        served,
        layer.size,
        "the upstream served the blob's bytes {:.2} times",
        served as f64 / layer.size as f64
    );
}

#[test]
fn bytes_reach_the_client_while_the_blob_still_arrives() {
    let BehindRelay { reg: _reg, layer, proxy: _proxy, agent: _agent, url } =
        behind_relay("slow", 24 * MIB, |addr| SlowProxy::start(addr, 8 * MIB as u64));
    let (first_byte, total, body) = clyde_tests::timed_get(&url, &[]);
    assert_eq!(sha256(&body), layer.digest);
    // 24 MiB at 8 MiB/s takes about 3 s; the first byte must not wait for the whole blob.
    assert!(first_byte * 4 < total, "first byte after {first_byte:?}, whole blob after {total:?}");
}

/// A registry holding one single-layer image of `size` bytes at `repo:v1`, reached only
/// through `relay`, and an agent configured to use that relay for it.
struct BehindRelay {
    reg: Registry,
    layer: clyde_tests::image::Blob,
    proxy: SlowProxy,
    agent: Agent,
    url: String,
}

fn behind_relay(repo: &str, size: usize, relay: impl FnOnce(&str) -> SlowProxy) -> BehindRelay {
    let reg = Registry::start();
    let img = TestImage::single(&[size]);
    img.push(&reg, repo, "v1", ImageFormat::Oci);
    let layer = img.layers[0].clone();
    let proxy = relay(&reg.addr());
    let config = format!("[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n", reg.addr(), proxy.addr());
    let agent = Agent::start(&config, &[]);
    let url = format!("{}/v2/{repo}/blobs/{}?ns={}", agent.url(), layer.digest, reg.addr());
    BehindRelay { reg, layer, proxy, agent, url }
}

/// The largest `bytes=N` on log lines containing `what`, in whole 4 MiB pieces.
fn max_pieces(log: &str, what: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| l.split(" bytes=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        / (4 * MIB as u64)
}

#[test]
fn kill_9_mid_download_then_restart_resumes_and_stores_nothing_corrupt() {
    let BehindRelay { reg: _reg, layer, proxy, mut agent, url } =
        behind_relay("crash", 40 * MIB, |addr| SlowProxy::start(addr, 16 * MIB as u64));

    let mut r = get(&url, &[]);
    // Read until the agent says at least two pieces are durable (about 1 s in), then kill it.
    let mut got = Vec::new();
    let mut chunk = vec![0u8; MIB];
    while max_pieces(&agent.log(), "made durable") < 2 {
        assert!(got.len() < 32 * MIB, "no pieces became durable:\n{}", agent.log());
        r.read_exact(&mut chunk).expect("first part");
        got.extend_from_slice(&chunk);
    }
    agent.kill9();
    drop(r);
    assert_store_verified(&agent.data_dir());
    let before_restart = proxy.relayed();
    agent.restart(&[]);
    let body = get(&url, &[]).bytes().expect("body");
    assert_eq!(sha256(&body), layer.digest);
    assert_eq!(&body[..got.len()], &got[..]);
    let log = agent.log();
    let pieces = max_pieces(&log, "resuming partial blob");
    assert!(pieces >= 2, "resumed with {pieces} durable pieces:\n{log}");
    // After the restart the upstream delivered only what was missing, not the whole blob again
    // (counted at the relay, which carries every upstream byte).
    let resumed = proxy.relayed() - before_restart;
    assert!(
        resumed > 0 && resumed + 8 * MIB as u64 <= layer.size,
        "after the restart the upstream delivered {resumed} of {}",
        layer.size
    );
    wait_store_holds(&agent.data_dir(), 1);
}

fn manifest_digest_via(agent: &Agent, reg: &Registry, repo: &str, tag: &str) -> String {
    let r = get(&format!("{}/v2/{repo}/manifests/{tag}?ns={}", agent.url(), reg.addr()), &[("accept", ACCEPT)]);
    assert_eq!(r.status(), 200, "{repo}:{tag}");
    header(&r, "docker-content-digest")
}

fn manifest_digest_direct(reg: &Registry, repo: &str, tag: &str) -> String {
    header(
        &get(&format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr()), &[("accept", ACCEPT)]),
        "docker-content-digest",
    )
}

#[test]
fn moved_tags_are_seen_after_the_ttl_and_latest_can_always_be_rechecked() {
    let reg = Registry::start();
    TestImage::single(&[1000]).push(&reg, "app", "v1", ImageFormat::Oci);
    TestImage::single(&[1000]).push(&reg, "app", "latest", ImageFormat::Oci);
    let agent = Agent::start("", &["--tag-ttl", "3s", "--always-pull-latest"]);
    let (v1_a, latest_a) = (manifest_digest_direct(&reg, "app", "v1"), manifest_digest_direct(&reg, "app", "latest"));
    // Tag times are whole seconds: a 3 s TTL keeps the tag fresh for at least 2 s.
    let cached_at = Instant::now();
    assert_eq!(manifest_digest_via(&agent, &reg, "app", "v1"), v1_a);
    assert_eq!(manifest_digest_via(&agent, &reg, "app", "latest"), latest_a);

    // Both tags move upstream.
    TestImage::single(&[1000]).push(&reg, "app", "v1", ImageFormat::Oci);
    TestImage::single(&[1000]).push(&reg, "app", "latest", ImageFormat::Oci);
    let (v1_b, latest_b) = (manifest_digest_direct(&reg, "app", "v1"), manifest_digest_direct(&reg, "app", "latest"));
    assert_ne!(v1_a, v1_b);
    // `latest` is re-checked at once; `v1` is served from cache until its TTL runs out.
    assert_eq!(manifest_digest_via(&agent, &reg, "app", "latest"), latest_b);
    let asked_at = cached_at.elapsed();
    let seen = manifest_digest_via(&agent, &reg, "app", "v1");
    if asked_at < Duration::from_millis(1800) {
        assert_eq!(seen, v1_a, "a fresh tag was re-checked before its TTL");
    }
    clyde_tests::wait_for("the moved tag to be seen", Duration::from_secs(20), || {
        (manifest_digest_via(&agent, &reg, "app", "v1") == v1_b).then_some(())
    });
    assert!(cached_at.elapsed() >= Duration::from_secs(2), "the tag moved before its TTL ran out");
}

#[test]
fn cached_tags_are_served_when_the_upstream_is_unreachable_or_air_gapped() {
    let mut reg = Registry::start();
    TestImage::single(&[1000]).push(&reg, "app", "v1", ImageFormat::Oci);
    let mut agent = Agent::start("", &["--tag-ttl", "0s"]);
    let digest = manifest_digest_via(&agent, &reg, "app", "v1");
    reg.stop();
    let started = Instant::now();
    assert_eq!(manifest_digest_via(&agent, &reg, "app", "v1"), digest);
    assert!(started.elapsed() < Duration::from_secs(3), "the tag re-check was not bounded: {:?}", started.elapsed());
    let r = get(&format!("{}/v2/app/manifests/v2?ns={}", agent.url(), reg.addr()), &[]);
    assert_eq!(r.status(), 404);
    reg.restart();
    agent.restart(&["--air-gapped"]);
    assert_eq!(manifest_digest_via(&agent, &reg, "app", "v1"), digest);
    TestImage::single(&[1000]).push(&reg, "app", "v2", ImageFormat::Oci);
    let r = get(&format!("{}/v2/app/manifests/v2?ns={}", agent.url(), reg.addr()), &[]);
    assert_eq!(r.status(), 404, "an air-gapped agent asked the upstream");
    assert!(
        reg.requests()
            .iter()
            .all(|(_, uri, _, ua)| !(ua.starts_with("clyde/") && uri.contains("/v2/app/manifests/v2")))
    );
}

#[test]
fn lazy_pull_ranges_of_an_uncached_blob_come_back_before_the_blob_arrives() {
    // 24 MiB at 8 MiB/s: the whole blob needs about 3 s from this upstream.
    let BehindRelay { reg, layer, proxy, agent: _agent, url } =
        behind_relay("lazy", 24 * MIB, |addr| SlowProxy::start(addr, 8 * MIB as u64));
    let want = blob_direct(&reg, "lazy", &layer.digest);
    let size = want.len();

    let head = http().head(&url).send().expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), size.to_string());

    // A footer read (suffix range), as a lazy-pulling snapshotter starts with.
    let started = Instant::now();
    let r = get(&url, &[("range", "bytes=-4096")]);
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().expect("body"), want[size - 4096..]);
    let footer = started.elapsed();
    // A range in the middle while the first transfer is still far behind.
    let started = Instant::now();
    let r = get(&url, &[("range", "bytes=16000000-16065535")]);
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().expect("body"), want[16000000..16065536]);
    let middle = started.elapsed();
    assert!(footer < Duration::from_millis(1500), "footer range took {footer:?}");
    assert!(middle < Duration::from_millis(1500), "middle range took {middle:?}");

    // The rest fills in the background; the whole blob then verifies and is served locally.
    let body = get(&url, &[]).bytes().expect("body");
    assert_eq!(sha256(&body), layer.digest);
    // What the upstream delivered, counted at the relay (a transfer cut short by a steal may
    // never be logged by the registry). The cut transfer loses what was in flight; the ranges
    // themselves cost nothing extra.
    let relayed = proxy.relayed();
    assert!(relayed * 2 < layer.size * 3, "the upstream delivered {relayed} bytes for a {} byte blob", layer.size);
}

#[test]
fn an_upstream_that_breaks_mid_body_is_resumed_with_range_and_the_client_never_notices() {
    // Every upstream connection dies after 5 MiB of answer.
    let BehindRelay { reg: _reg, layer, proxy, agent, url } =
        behind_relay("flaky", 24 * MIB, |addr| SlowProxy::start_cutting(addr, 400 * MIB as u64, 5 * MIB as u64));
    let r = get(&url, &[]);
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().expect("body")), layer.digest);
    let resumes = agent.log().lines().filter(|l| l.contains("resuming with Range")).count();
    assert!(resumes >= 4, "expected the transfer to resume at least 4 times, saw {resumes}");
    let relayed = proxy.relayed();
    assert!(relayed < layer.size + layer.size / 5, "the upstream delivered {relayed} bytes for {}", layer.size);
    wait_store_holds(&agent.data_dir(), 1);
}

#[test]
fn a_transfer_given_up_mid_body_aborts_its_readers_and_resumes_on_the_next_request() {
    let BehindRelay { mut reg, layer, proxy: _proxy, agent, url } =
        behind_relay("gone", 40 * MIB, |addr| SlowProxy::start(addr, 16 * MIB as u64));

    let mut r = get(&url, &[]);
    let mut chunk = vec![0u8; MIB];
    let mut got = 0;
    while max_pieces(&agent.log(), "made durable") < 2 {
        assert!(got < 32 * MIB, "no pieces became durable");
        r.read_exact(&mut chunk).expect("first part");
        got += MIB;
    }
    reg.stop();
    // The client's response is cut, never ended as if complete.
    let mut rest = Vec::new();
    let outcome = r.read_to_end(&mut rest);
    assert!(outcome.is_err() || got + rest.len() < layer.size as usize, "a broken transfer looked complete");
    assert!(agent.log().contains("transfer abandoned"), "{}", agent.log());

    reg.restart();
    let body = get(&url, &[]).bytes().expect("body");
    assert_eq!(sha256(&body), layer.digest);
    assert!(max_pieces(&agent.log(), "resuming partial blob") >= 2, "{}", agent.log());
    wait_store_holds(&agent.data_dir(), 1);
}

#[test]
fn a_narrow_accept_never_changes_what_other_clients_get_for_a_tag() {
    let reg = Registry::start();
    let img = TestImage::multi_arch(&[64 * 1024]);
    img.push(&reg, "multi", "v1", ImageFormat::Docker);
    let agent = Agent::start("", &[]);
    let narrow = "application/vnd.docker.distribution.manifest.v2+json";
    let answer = |base: &str, ns: &str, accept: &str| {
        let r = get(&format!("{base}/v2/multi/manifests/v1{ns}"), &[("accept", accept)]);
        assert_eq!(r.status(), 200, "{accept}");
        (header(&r, "content-type"), header(&r, "docker-content-digest"))
    };
    let direct = format!("http://{}", reg.addr());
    let ns = format!("?ns={}", reg.addr());
    let (narrow_type, narrow_digest) = answer(&direct, "", narrow);
    let (list_type, list_digest) = answer(&direct, "", ACCEPT);
    assert_eq!(narrow_type, narrow, "the registry gives a narrow client one platform's manifest");
    assert_ne!(narrow_digest, list_digest);
    // The narrow client first (it used to rewrite the cached tag), then containerd's Accept,
    // then both again from the cache: each gets what the upstream gives it.
    for round in ["first", "cached"] {
        assert_eq!(answer(&agent.url(), &ns, narrow), (narrow_type.clone(), narrow_digest.clone()), "{round}: narrow");
        assert_eq!(answer(&agent.url(), &ns, ACCEPT), (list_type.clone(), list_digest.clone()), "{round}: containerd");
    }
    // The narrow answer is kept apart: the tag the agent advertises and lists is the list.
    let listed = run_list(&agent);
    assert!(listed.contains(&list_digest) && !listed.contains("#"), "{listed}");
}

fn run_list(agent: &Agent) -> String {
    let mut cmd = std::process::Command::new(clyde_tests::agent::clyde_bin());
    clyde_tests::run(cmd.args(["list", "--output", "json", "--data-dir"]).arg(agent.data_dir()))
}
