//! Lazy pullers through the mirror: transfers driven by demand (only what is read moves),
//! multi-range answers, containerd 2.1's parallel chunked fetch, and bounded waits on a
//! stalled upstream. The upstream is a real registry behind a relay that counts every byte
//! it delivered (and can stall).

use std::io::Read;
use std::time::{Duration, Instant};

use clyde_tests::{
    Agent, Containerd, ImageFormat, Registry, SlowProxy, TestImage, http, poll, sha256, wait_store_holds,
};

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
    // What the client read, the window past what the agent's reader sent (which runs ahead
    // of the client by what the sockets buffer), and the sockets between relay and agent:
    // far below the 59 MiB to the end of the blob.
    let bound = (MIB as u64) + WINDOW + 16 * MIB as u64;
    eprintln!("an abandoned bytes=N- moved {open_ended} upstream bytes");
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
    // Tags are re-checked after 1 s: the cached tag below is due for a check, which the
    // stalled upstream never answers (bounded by tag_check_timeout, 800 ms).
    let agent = Agent::start(&config, &["--tag-ttl", "1s"]);
    let base = format!("{}/v2/stall/app", agent.url());
    let ns = reg.addr();
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
    let manifest = |tag: &str| http().get(format!("{base}/manifests/{tag}?ns={ns}")).header("accept", accept).send();
    let blob = |digest: &str| http().get(format!("{base}/blobs/{digest}?ns={ns}")).send();
    assert_eq!(manifest("v1").expect("tag").status(), 200);
    let layer = &cached.layers[0];
    assert_eq!(sha256(&blob(&layer.digest).expect("blob").bytes().expect("body")), layer.digest);
    wait_store_holds(&agent.data_dir(), 2);
    std::thread::sleep(Duration::from_millis(1100));

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
        eprintln!("stalled upstream: {what} answered {status} in {took:?}");
        assert_eq!(status, want, "{what}");
        assert!(took < bound, "{what} took {took:?}");
    }
    // The bound leaves room for a busy CI machine over the 800 ms check.
    timed("cached tag due for a check", || manifest("v1"), 200, Duration::from_millis(1500));
    timed("cached blob", || blob(&layer.digest), 200, Duration::from_secs(1));
    timed("uncached tag", || manifest("v2"), 404, Duration::from_secs(5));
    timed("uncached blob", || blob(&uncached.layers[0].digest), 404, Duration::from_secs(5));
    proxy.stall(false);
    // The upstream back: the same requests succeed.
    let back = poll(Duration::from_secs(10), || (manifest("v2").ok()?.status() == 200).then_some(()));
    assert!(back.is_some(), "the uncached tag never came back");
}

#[test]
fn a_puller_without_ns_reads_blobs_from_the_registry_containerd_resolved_the_repository_at() {
    let Lab { _reg, want, digest, proxy, agent, url } = lab("team/app", 4 * MIB, 400 * MIB as u64, "");
    let ns = url.split("?ns=").nth(1).expect("ns").to_string();
    let bare = format!("{}/v2/team/app/blobs/{digest}", agent.url());
    // Before containerd resolved the repository here, the bare path means docker.io: a miss.
    assert_eq!(get(&bare, Some("bytes=0-99")).status(), 404);
    // containerd resolves the tag through the mirror, with ?ns=...
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
    let r = http().get(format!("{}/v2/team/app/manifests/v1?ns={ns}", agent.url())).header("accept", accept).send();
    assert_eq!(r.expect("manifest").status(), 200);
    // ...then a lazy puller reads the layer by the bare path: from that registry.
    let before = settled(&proxy);
    let r = get(&bare, Some("bytes=1000-1999"));
    assert_eq!(r.status(), 206, "{}", agent.log());
    same(&r.bytes().expect("body"), &want[1000..2000]);
    assert!(settled(&proxy) > before, "the bytes did not come from the registry ?ns= named");
}

/// `ctr-remote` (Debian's stargz-snapshotter) against a containerd of our own.
fn ctr_remote(ctrd: &Containerd, args: &[&str]) -> String {
    let bin = clyde_tests::require("ctr-remote", "stargz-snapshotter");
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--address").arg(ctrd.socket()).args(["--namespace", "clyde-test"]).args(args);
    clyde_tests::run(&mut cmd)
}

#[test]
fn a_stargz_reader_gets_usable_answers_and_the_layer_is_never_fully_downloaded() {
    // A layer converted by the reference tool, read the way the stargz snapshotter reads it:
    // HEAD, the footer at the end, the TOC, then chunks, some in one multi-range request.
    let reg = Registry::start();
    let img = TestImage::single(&[24 * MIB]);
    img.push(&reg, "esgz/app", "orig", ImageFormat::Oci);
    let ctrd = Containerd::start();
    let src = format!("{}/esgz/app:orig", reg.addr());
    let dst = format!("{}/esgz/app:esgz", reg.addr());
    ctr_remote(&ctrd, &["images", "pull", "--plain-http", &src]);
    ctr_remote(&ctrd, &["images", "convert", "--estargz", "--oci", &src, &dst]);
    ctr_remote(&ctrd, &["images", "push", "--plain-http", &dst]);
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let manifest: serde_json::Value = http()
        .get(format!("http://{}/v2/esgz/app/manifests/esgz", reg.addr()))
        .header("accept", accept)
        .send()
        .and_then(|r| r.json())
        .expect("converted manifest");
    let layer = &manifest["layers"][0];
    let digest = layer["digest"].as_str().expect("digest").to_string();
    assert!(
        layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"].is_string(),
        "not an eStargz layer: {layer}"
    );
    let want = http()
        .get(format!("http://{}/v2/esgz/app/blobs/{digest}", reg.addr()))
        .send()
        .and_then(|r| r.bytes())
        .expect("layer")
        .to_vec();
    let size = want.len();

    let proxy = SlowProxy::start(&reg.addr(), 200 * MIB as u64);
    let config = format!("[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n", reg.addr(), proxy.addr());
    let agent = Agent::start(&config, &[]);
    // containerd resolves through the mirror (with ?ns=); the snapshotter then sends none.
    let r = http()
        .get(format!("{}/v2/esgz/app/manifests/esgz?ns={}", agent.url(), reg.addr()))
        .header("accept", accept)
        .send()
        .expect("manifest");
    assert_eq!(r.status(), 200);
    let url = format!("{}/v2/esgz/app/blobs/{digest}", agent.url());
    let head = http().head(&url).send().expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), size.to_string());

    // The footer: 51 bytes whose gzip extra field holds the TOC offset in hex.
    let r = get(&url, Some(&format!("bytes={}-{}", size - 51, size - 1)));
    assert_eq!(r.status(), 206);
    let footer = r.bytes().expect("footer");
    same(&footer, &want[size - 51..]);
    assert_eq!(&footer[32..38], b"STARGZ", "an eStargz footer");
    let toc_offset =
        u64::from_str_radix(std::str::from_utf8(&footer[16..32]).expect("hex"), 16).expect("TOC offset") as usize;
    // The TOC: a gzip member holding a tar with stargz.index.json.
    let r = get(&url, Some(&format!("bytes={toc_offset}-{}", size - 52)));
    assert_eq!(r.status(), 206);
    let toc_member = r.bytes().expect("TOC");
    same(&toc_member, &want[toc_offset..size - 51]);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&toc_member[..]));
    let mut entry = archive.entries().expect("tar").next().expect("an entry").expect("entry");
    assert_eq!(entry.path().expect("path").to_str(), Some("stargz.index.json"));
    let toc: serde_json::Value = serde_json::from_reader(&mut entry).expect("TOC json");

    // Chunks: every entry with a digest of its payload, as (compressed range, payload size, digest).
    let entries = toc["entries"].as_array().expect("entries");
    let mut offsets: Vec<usize> = entries.iter().filter_map(|e| e["offset"].as_u64()).map(|o| o as usize).collect();
    offsets.push(toc_offset);
    offsets.sort_unstable();
    offsets.dedup();
    let chunks: Vec<(std::ops::Range<usize>, usize, String)> = entries
        .iter()
        .filter(|e| e["chunkDigest"].is_string() && e["offset"].as_u64().is_some())
        .map(|e| {
            let start = e["offset"].as_u64().unwrap_or(0) as usize;
            let end = offsets[offsets.partition_point(|o| *o <= start)];
            let len = match e["chunkSize"].as_u64() {
                Some(n) if n > 0 => n as usize,
                _ => e["size"].as_u64().unwrap_or(0) as usize,
            };
            (start..end, len, e["chunkDigest"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert!(chunks.len() >= 4, "expected the 24 MiB file in several chunks: {}", chunks.len());
    let usable = |compressed: &[u8], len: usize, digest: &str| {
        let mut payload = Vec::new();
        std::io::copy(&mut flate2::read::GzDecoder::new(compressed).take(len as u64), &mut payload).expect("gunzip");
        assert_eq!(payload.len(), len);
        assert_eq!(sha256(&payload), digest, "a chunk that does not decompress to its digest");
    };
    // One chunk alone, then two in one multi-range request.
    let (range, len, d) = &chunks[1];
    let r = get(&url, Some(&format!("bytes={}-{}", range.start, range.end - 1)));
    assert_eq!(r.status(), 206);
    let body = r.bytes().expect("chunk");
    same(&body, &want[range.clone()]);
    usable(&body, *len, d);
    let (a, b) = (&chunks[3], &chunks[chunks.len() - 1]);
    let r = get(&url, Some(&format!("bytes={}-{},{}-{}", a.0.start, a.0.end - 1, b.0.start, b.0.end - 1)));
    assert_eq!(r.status(), 206);
    let content_type = header(&r, "content-type");
    let got = parts(&content_type, &r.bytes().expect("multipart"));
    assert_eq!(got.len(), 2);
    for ((_, bytes), (range, len, d)) in got.iter().zip([a, b]) {
        same(bytes, &want[range.clone()]);
        usable(bytes, *len, d);
    }
    // What was read, and not the layer: the upstream moved about those bytes only.
    let read = 51 + (size - 51 - toc_offset) + [&chunks[1], a, b].iter().map(|c| c.0.len()).sum::<usize>();
    let moved = settled(&proxy) as usize;
    assert!(moved < read + 256 * 1024, "the upstream delivered {moved} bytes for {read} read (layer {size})");
    // Chunks 0, 2 and 4 (4 MiB each) were never read: they never moved.
    assert!(moved + 8 * MIB < size, "the upstream delivered {moved} bytes of a {size} byte layer");
    let hex = digest.trim_start_matches("sha256:");
    assert!(!agent.data_dir().join("blobs/sha256").join(hex).exists(), "the layer was fully downloaded");
}

#[test]
fn partial_blobs_count_against_the_cache_cap_and_are_evicted_like_blobs() {
    // A cap of 24 MiB: 8 MiB read by ranges of layer A, then layer B (20 MiB) read whole.
    let reg = Registry::start();
    let img = TestImage::single(&[20 * MIB, 20 * MIB]);
    img.push(&reg, "lazy/evict", "v1", ImageFormat::Oci);
    let agent = Agent::start(&format!("cache_max_bytes = {}\n", 24 * MIB), &[]);
    let url = |i: usize| format!("{}/v2/lazy/evict/blobs/{}?ns={}", agent.url(), img.layers[i].digest, reg.addr());
    let a = img.layer_data(0);
    for at in [0, 8 * MIB] {
        let r = get(&url(0), Some(&format!("bytes={at}-{}", at + 4 * MIB - 1)));
        same(&r.bytes().expect("range"), &a[at..at + 4 * MIB]);
    }
    let partial = agent.data_dir().join("partial").join(img.layers[0].digest.replace(':', "/"));
    assert!(partial.exists());
    // Its bytes count in the store gauge, and nobody reads it: the transfer closes.
    let counted =
        poll(Duration::from_secs(5), || (agent.metric("clyde_store_bytes") >= (8 * MIB) as f64).then_some(()));
    assert!(counted.is_some(), "the store gauge does not count the partial: {}", agent.metric("clyde_store_bytes"));
    clyde_tests::wait_log(&agent, "closing a transfer nobody reads");
    // Layer B whole: over the cap, the least recently used goes, and that is A's partial.
    let r = get(&url(1), None);
    assert_eq!(sha256(&r.bytes().expect("B")), img.layers[1].digest);
    let gone = poll(Duration::from_secs(15), || (!partial.exists()).then_some(()));
    assert!(gone.is_some(), "the idle partial blob was not evicted:\n{}", agent.log());
    assert!(agent.data_dir().join("blobs").join(img.layers[1].digest.replace(':', "/")).exists(), "B was evicted");
    // A is read again by ranges: fetched again, right bytes.
    let r = get(&url(0), Some("bytes=100-199"));
    same(&r.bytes().expect("range"), &a[100..200]);
}

#[test]
fn with_the_idle_fill_a_range_read_blob_completes_in_the_background() {
    let Lab { _reg, want, digest, proxy: _proxy, agent, url } =
        lab("lazy/idle", 16 * MIB, 64 * MIB as u64, "fill = \"idle\"");
    let r = get(&url, Some("bytes=5000000-5000999"));
    assert_eq!(r.status(), 206);
    same(&r.bytes().expect("range"), &want[5_000_000..5_001_000]);
    // Nobody reads the rest, yet it arrives, verifies and is committed.
    wait_store_holds(&agent.data_dir(), 1);
    let hex = digest.trim_start_matches("sha256:");
    let stored = std::fs::read(agent.data_dir().join("blobs/sha256").join(hex)).expect("stored blob");
    same(&stored, &want);
}
