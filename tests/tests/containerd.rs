//! Real clients through the mirror: containerd's `ctr` with `--hosts-dir`, and `skopeo`.

use std::process::Command;

use clyde_tests::{Agent, Containerd, ImageFormat, Registry, TestImage, http, require, wait_store_holds};

const MIB: usize = 1024 * 1024;

fn index_digest(reg: &Registry, repo: &str, tag: &str) -> String {
    let r = http()
        .head(format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr()))
        .header("accept", "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .expect("head");
    r.headers()["docker-content-digest"].to_str().expect("digest").to_string()
}

/// Blob GETs the upstream answered, by user agent: (from clyde, from anyone else).
fn blob_gets_by_client(reg: &Registry) -> (usize, usize) {
    let gets: Vec<_> =
        reg.requests().into_iter().filter(|(m, uri, _, _)| m == "GET" && uri.contains("/blobs/")).collect();
    let clyde = gets.iter().filter(|(_, _, _, ua)| ua.starts_with("clyde/")).count();
    (clyde, gets.len() - clyde)
}

#[test]
fn ctr_pulls_through_the_mirror_and_again_when_the_upstream_is_gone() {
    let mut reg = Registry::start();
    let img = TestImage::multi_arch(&[MIB, 2 * MIB]);
    img.push(&reg, "team/app", "v1", ImageFormat::Oci);
    let mut agent = Agent::start("", &["--tag-ttl", "0s"]);
    let ctrd = Containerd::start();
    let hosts = ctrd.mirror_hosts_dir(&reg, &agent);
    let reference = format!("{}/team/app:v1", reg.addr());
    let expected = index_digest(&reg, "team/app", "v1");

    let (ok, out) = ctrd.pull(&hosts, &reference, &[]);
    assert!(ok, "pull through the mirror failed:\n{out}\n{}", agent.log());
    assert_eq!(ctrd.image_digest(&reference).as_deref(), Some(expected.as_str()));
    let (via_clyde, direct) = blob_gets_by_client(&reg);
    assert!(via_clyde >= 3, "clyde fetched {via_clyde} blobs");
    assert_eq!(direct, 0, "containerd went around the mirror");
    // The amd64 layers (the first two) are in containerd and in Clyde's store, verified.
    let content = ctrd.content();
    for layer in &img.layers[..2] {
        assert!(content.contains(&layer.digest), "containerd lacks {}", layer.digest);
        assert!(agent.data_dir().join("blobs/sha256").join(layer.digest.trim_start_matches("sha256:")).exists());
    }
    wait_store_holds(&agent.data_dir(), 5);

    // Upstream gone: the cached tag and blobs still serve the pull.
    reg.stop();
    ctrd.remove(&reference);
    assert!(!ctrd.content().contains(&img.layers[0].digest));
    let (ok, out) = ctrd.pull(&hosts, &reference, &[]);
    assert!(ok, "pull with the upstream stopped failed:\n{out}\n{}", agent.log());
    assert_eq!(ctrd.image_digest(&reference).as_deref(), Some(expected.as_str()));

    // And in air-gapped mode after a restart.
    agent.restart(&["--air-gapped"]);
    ctrd.remove(&reference);
    let (ok, out) = ctrd.pull(&hosts, &reference, &[]);
    assert!(ok, "air-gapped pull failed:\n{out}\n{}", agent.log());
    assert!(ctrd.content().contains(&img.layers[1].digest));
}

#[test]
fn ctr_pulls_docker_media_types_through_the_mirror() {
    let reg = Registry::start();
    let img = TestImage::single(&[MIB, 512 * 1024]);
    img.push(&reg, "dock/app", "v2", ImageFormat::Docker);
    let agent = Agent::start("", &[]);
    let ctrd = Containerd::start();
    let hosts = ctrd.mirror_hosts_dir(&reg, &agent);
    let reference = format!("{}/dock/app:v2", reg.addr());
    let (ok, out) = ctrd.pull(&hosts, &reference, &[]);
    assert!(ok, "pull failed:\n{out}\n{}", agent.log());
    assert_eq!(ctrd.image_digest(&reference), Some(index_digest(&reg, "dock/app", "v2")));
    assert_eq!(blob_gets_by_client(&reg).1, 0, "containerd went around the mirror");
    for layer in &img.layers {
        assert!(ctrd.content().contains(&layer.digest));
    }
}

#[test]
fn skopeo_copies_through_the_mirror_with_an_in_path_registry() {
    let reg = Registry::start();
    let img = TestImage::multi_arch(&[300 * 1024]);
    img.push(&reg, "team/tool", "v3", ImageFormat::Oci);
    let config =
        format!("[[registries]]\nname = \"upstream.test\"\nendpoint = \"{}\"\nscheme = \"http\"\n", reg.addr());
    let agent = Agent::start(&config, &[]);
    let out = tempfile::tempdir().expect("tempdir");
    let copy = Command::new(require("skopeo", "skopeo"))
        .args(["copy", "--all", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{}/upstream.test/team/tool:v3", agent.addr()))
        .arg(format!("oci:{}:copied", out.path().display()))
        .output()
        .expect("skopeo");
    assert!(copy.status.success(), "skopeo copy failed: {}\n{}", String::from_utf8_lossy(&copy.stderr), agent.log());
    for layer in &img.layers {
        let path = out.path().join("blobs/sha256").join(layer.digest.trim_start_matches("sha256:"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(clyde_tests::sha256(&bytes), layer.digest);
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("index.json")).expect("index")).expect("json");
    assert_eq!(index["manifests"][0]["digest"].as_str(), Some(index_digest(&reg, "team/tool", "v3").as_str()));
}
