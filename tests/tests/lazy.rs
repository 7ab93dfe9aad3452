//! Lazy pullers through the mirror: transfers driven by demand (only what is read moves),
//! multi-range answers, containerd 2.1's parallel chunked fetch, and bounded waits on a
//! stalled upstream. The upstream is a real registry behind a relay that counts every byte
//! it delivered (and can stall).

use std::io::Read;
use std::time::{Duration, Instant};

use clyde_tests::{Agent, ImageFormat, Registry, SlowProxy, TestImage, http, poll, sha256, wait_store_holds};

const MIB: usize = 1024 * 1024;
/// The agent's window for an open-ended range, and how long a transfer that reached it waits
/// for its reader (docs/architecture.md, "Transfers driven by demand").
const WINDOW: u64 = 8 * MIB as u64;
const LINGER: Duration = Duration::from_secs(2);

struct Lab {
    _reg: Registry,
    want: Vec<u8>,
    digest: String,
    proxy: SlowProxy,
    agent: Agent,
    url: String,
}

/// A registry holding one layer of `size` random bytes, an agent whose upstream for it is
/// a relay at `rate` bytes per second.
fn lab(repo: &str, size: usize, rate: u64, extra: &str) -> Lab {
    let reg = Registry::start();
    let img = TestImage::single(&[size]);
    img.push(&reg, repo, "v1", ImageFormat::Oci);
    let digest = img.layers[0].digest.clone();
    let want = http()
        .get(format!("http://{}/v2/{repo}/blobs/{digest}", reg.addr()))
        .send()
        .and_then(|r| r.bytes())
        .expect("blob straight from the registry")
        .to_vec();
    let proxy = SlowProxy::start(&reg.addr(), rate);
    let config = format!("{extra}\n[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n", reg.addr(), proxy.addr());
    let agent = Agent::start(&config, &[]);
    let url = format!("{}/v2/{repo}/blobs/{digest}?ns={}", agent.url(), reg.addr());
    Lab { _reg: reg, want, digest, proxy, agent, url }
}

fn get(url: &str, range: Option<&str>) -> reqwest::blocking::Response {
    let mut req = http().get(url);
    if let Some(range) = range {
        req = req.header("range", range);
    }
    req.send().expect("GET")
}

/// Bytes compared without printing them.
fn same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "length");
    assert!(got == want, "the bytes differ");
}

fn header(r: &reqwest::blocking::Response, name: &str) -> String {
    r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// The parts of a `multipart/byteranges` body: (`Content-Range`, bytes).
fn parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let boundary = content_type.split("boundary=").nth(1).expect("a boundary").trim();
    let delimiter = format!("--{boundary}");
    let find = |from: usize, what: &[u8]| body[from..].windows(what.len()).position(|w| w == what).map(|p| p + from);
    let mut out = Vec::new();
    let mut at = find(0, delimiter.as_bytes()).expect("first delimiter") + delimiter.len();
    loop {
        if body[at..].starts_with(b"--") {
            assert_eq!(&body[at + 2..], b"\r\n", "the closing delimiter ends the body");
            return out;
        }
        let head_end = find(at, b"\r\n\r\n").expect("part headers") + 4;
        let head = String::from_utf8_lossy(&body[at..head_end]).to_string();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: "))
            .expect("each part has a Content-Range")
            .to_string();
        let next = find(head_end, format!("\r\n{delimiter}").as_bytes()).expect("next delimiter");
        out.push((range, body[head_end..next].to_vec()));
        at = next + 2 + delimiter.len();
    }
}

/// Upstream bytes once the relay has been quiet for a moment (transfers cut short included).
fn settled(proxy: &SlowProxy) -> u64 {
    let mut last = proxy.relayed();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = proxy.relayed();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn a_blob_read_by_ranges_moves_only_the_ranges_read() {
    let Lab { _reg, want, digest, proxy, agent, url } = lab("lazy/ranges", 64 * MIB, 400 * MIB as u64, "");
    let size = want.len();

    // Five 1 MiB ranges at scattered offsets, and a footer read: exact bytes, and the
    // upstream delivers those bytes (plus response heads) and nothing more.
    let offsets = [3 * MIB + 17, 20 * MIB, 33 * MIB + 5, 47 * MIB, 60 * MIB + 999];
    for &at in &offsets {
        let r = get(&url, Some(&format!("bytes={at}-{}", at + MIB - 1)));
        assert_eq!(r.status(), 206);
        assert_eq!(header(&r, "content-range"), format!("bytes {at}-{}/{size}", at + MIB - 1));
        same(&r.bytes().expect("body"), &want[at..at + MIB]);
    }
    let r = get(&url, Some("bytes=-4096"));
    assert_eq!(r.status(), 206);
    same(&r.bytes().expect("body"), &want[size - 4096..]);
    let read = (offsets.len() * MIB + 4096) as u64;
    let moved = settled(&proxy);
    assert!(moved >= read && moved < read + 64 * 1024, "the upstream delivered {moved} bytes for {read} bytes read");
    // Reading the same ranges again costs the upstream nothing.
    for &at in &offsets[..2] {
        let r = get(&url, Some(&format!("bytes={at}-{}", at + MIB - 1)));
        same(&r.bytes().expect("body"), &want[at..at + MIB]);
    }
    assert_eq!(settled(&proxy), moved, "ranges already held went upstream again");
    let hex = digest.trim_start_matches("sha256:");
    assert!(!agent.data_dir().join("blobs/sha256").join(hex).exists(), "a range read fetched the whole blob");

    // An open-ended range whose reader leaves after 1 MiB (containerd 2.1 reads a chunk and
    // drops the connection): the transfer runs at most its window past the reader, then stops.
    let before = settled(&proxy);
    let mut r = get(&url, Some(&format!("bytes={}-", 5 * MIB)));
    assert_eq!(r.status(), 206);
    let mut chunk = vec![0u8; MIB];
    r.read_exact(&mut chunk).expect("first MiB");
    same(&chunk, &want[5 * MIB..6 * MIB]);
    drop(r);
    std::thread::sleep(LINGER);
    let open_ended = settled(&proxy) - before;
    let bound = (MIB as u64) + WINDOW + 8 * MIB as u64;
    assert!(open_ended < bound, "an abandoned bytes=N- moved {open_ended} upstream bytes (bound {bound})");

    // A reader of the whole blob makes it complete, from what is held plus the rest.
    let r = get(&url, None);
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().expect("body")), digest);
    wait_store_holds(&agent.data_dir(), 1);
    let total = settled(&proxy);
    assert!(total < (size + size / 4) as u64, "the upstream delivered {total} bytes for a {size} byte blob");
}

#[test]
fn multi_range_answers_are_multipart_with_exact_parts_cached_or_not() {
    let Lab { _reg, want, digest, proxy, agent, url } = lab("lazy/multi", 24 * MIB, 400 * MIB as u64, "");
    let size = want.len();
    let asked = "bytes=100-199,300000-300099,-50";
    let expect = [
        (format!("bytes 100-199/{size}"), &want[100..200]),
        (format!("bytes 300000-300099/{size}"), &want[300000..300100]),
        (format!("bytes {}-{}/{size}", size - 50, size - 1), &want[size - 50..]),
    ];
    let check = |what: &str| {
        let r = get(&url, Some(asked));
        assert_eq!(r.status(), 206, "{what}");
        let content_type = header(&r, "content-type");
        assert!(content_type.starts_with("multipart/byteranges; boundary="), "{what}: {content_type}");
        let length: usize = header(&r, "content-length").parse().expect("content-length");
        let body = r.bytes().expect("body");
        assert_eq!(body.len(), length, "{what}: Content-Length is exact");
        let got = parts(&content_type, &body);
        assert_eq!(got.len(), expect.len(), "{what}");
        for ((range, bytes), (want_range, want_bytes)) in got.iter().zip(&expect) {
            assert_eq!(range, want_range, "{what}");
            assert!(bytes == want_bytes, "{what}: the bytes of {range} differ");
        }
    };
    check("uncached");
    let moved = settled(&proxy);
    assert!(moved < 64 * 1024, "three small parts moved {moved} upstream bytes");
    // One satisfiable part of several: a plain 206.
    let r = get(&url, Some(&format!("bytes={size}-,10-19")));
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), format!("bytes 10-19/{size}"));
    same(&r.bytes().expect("body"), &want[10..20]);
    // Too many parts: 400, which makes a lazy puller ask one range at a time.
    let many = format!("bytes={}", (0..300).map(|i| format!("{i}-{i}")).collect::<Vec<_>>().join(","));
    assert_eq!(get(&url, Some(&many)).status(), 400);

    let r = get(&url, None);
    assert_eq!(sha256(&r.bytes().expect("body")), digest);
    wait_store_holds(&agent.data_dir(), 1);
    check("cached");
}

#[test]
fn containerd_2_1_parallel_chunks_cost_about_one_get() {
    // Four workers, each asking `bytes=N-` for its next 8 MiB chunk and dropping the
    // connection after it, as containerd 2.1's parallel layer fetch does.
    let Lab { _reg, want, digest, proxy, agent, url } = lab("lazy/chunks", 64 * MIB, 64 * MIB as u64, "");
    let size = want.len();
    let chunk = 8 * MIB;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut assembled = vec![0u8; size];
    let pieces = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i * chunk >= size {
                        return;
                    }
                    let mut r = get(&url, Some(&format!("bytes={}-", i * chunk)));
                    assert_eq!(r.status(), 206);
                    let mut buf = vec![0u8; chunk.min(size - i * chunk)];
                    r.read_exact(&mut buf).expect("chunk");
                    pieces.lock().expect("lock").push((i, buf));
                }
            });
        }
    });
    for (i, buf) in pieces.into_inner().expect("pieces") {
        assembled[i * chunk..i * chunk + buf.len()].copy_from_slice(&buf);
    }
    assert_eq!(sha256(&assembled), digest);
    same(&assembled, &want);
    std::thread::sleep(LINGER);
    let moved = settled(&proxy);
    assert!(moved < (size + size / 10) as u64, "the upstream delivered {moved} bytes for a {size} byte blob");
    // Every byte was read, but by ranges: the blob completes only when someone reads it whole.
    let r = get(&url, None);
    assert_eq!(sha256(&r.bytes().expect("body")), digest);
    wait_store_holds(&agent.data_dir(), 1);
}

#[test]
fn a_peer_asking_for_a_range_this_node_lacks_is_told_at_once() {
    let Lab { _reg, want, agent, url, digest, proxy: _proxy } = lab("lazy/peer", 16 * MIB, 400 * MIB as u64, "");
    let r = get(&url, Some("bytes=0-1048575"));
    same(&r.bytes().expect("body"), &want[..MIB]);
    let peer_url = format!("http://{}/v2/lazy/peer/blobs/{digest}", agent.peer_addr());
    // Held: served. Not held (nobody fetches it whole): 404 at once.
    let r = get(&peer_url, Some("bytes=1000-1999"));
    assert_eq!(r.status(), 206);
    same(&r.bytes().expect("body"), &want[1000..2000]);
    let started = Instant::now();
    let r = get(&peer_url, Some(&format!("bytes={}-{}", 8 * MIB, 9 * MIB)));
    assert_eq!(r.status(), 404);
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
}

#[test]
fn a_stalled_upstream_gives_quick_misses_and_cached_content_at_once() {
    let reg = Registry::start();
    let cached = TestImage::single(&[MIB]);
    cached.push(&reg, "stall/app", "v1", ImageFormat::Oci);
    let uncached = TestImage::single(&[MIB]);
    uncached.push(&reg, "stall/app", "v2", ImageFormat::Oci);
    let proxy = SlowProxy::start(&reg.addr(), u64::MAX);
    let config = format!("[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n", reg.addr(), proxy.addr());
    let agent = Agent::start(&config, &[]);
    let base = format!("{}/v2/stall/app", agent.url());
    let ns = reg.addr();
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
    let manifest = |tag: &str| http().get(format!("{base}/manifests/{tag}?ns={ns}")).header("accept", accept).send();
    let blob = |digest: &str| http().get(format!("{base}/blobs/{digest}?ns={ns}")).send();
    assert_eq!(manifest("v1").expect("tag").status(), 200);
    let layer = &cached.layers[0];
    assert_eq!(sha256(&blob(&layer.digest).expect("blob").bytes().expect("body")), layer.digest);
    wait_store_holds(&agent.data_dir(), 2);

    proxy.stall(true);
    fn timed(
        what: &str,
        request: impl Fn() -> reqwest::Result<reqwest::blocking::Response>,
        want: u16,
        bound: Duration,
    ) {
        let started = Instant::now();
        let status = request().expect(what).status();
        let took = started.elapsed();
        assert_eq!(status, want, "{what}");
        assert!(took < bound, "{what} took {took:?}");
    }
    timed("cached tag", || manifest("v1"), 200, Duration::from_secs(1));
    timed("cached blob", || blob(&layer.digest), 200, Duration::from_secs(1));
    timed("uncached tag", || manifest("v2"), 404, Duration::from_secs(5));
    timed("uncached blob", || blob(&uncached.layers[0].digest), 404, Duration::from_secs(5));
    proxy.stall(false);
    // The upstream back: the same requests succeed.
    let back = poll(Duration::from_secs(10), || (manifest("v2").ok()?.status() == 200).then_some(()));
    assert!(back.is_some(), "the uncached tag never came back");
}
