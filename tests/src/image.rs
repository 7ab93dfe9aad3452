//! Test images: random, incompressible layers in an OCI layout, pushed with `skopeo`.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use rand::RngCore;
use serde_json::json;
use tempfile::TempDir;

use crate::{Registry, require, run, sha256};

/// Media types to push with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// OCI manifests (and an OCI index when multi-arch).
    Oci,
    /// Docker schema 2 manifests (and a manifest list when multi-arch).
    Docker,
}

/// A blob of the image.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// An image written as an OCI layout in a temp dir.
pub struct TestImage {
    dir: TempDir,
    /// Layers of every platform, in order.
    pub layers: Vec<Blob>,
    /// Whether it is an index of several platforms.
    pub multi_arch: bool,
}

const TAG: &str = "built";

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Blob {
    let digest = sha256(bytes);
    let path = dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    std::fs::write(path, bytes).expect("write blob");
    Blob { digest, size: bytes.len() as u64 }
}

/// A tar.gz layer holding one file of `size` random bytes; returns (blob bytes, diff id).
fn layer(size: usize, name: &str) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, name, random(size).as_slice()).expect("tar");
    let tar = tar.into_inner().expect("tar");
    let diff_id = sha256(&tar);
    // Stored (level 0) gzip: random data does not compress, and this is fast.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(&tar).expect("gzip");
    (gz.finish().expect("gzip"), diff_id)
}

impl TestImage {
    /// A single-platform (linux/amd64) image with layers of these sizes.
    pub fn single(layer_sizes: &[usize]) -> Self {
        Self::build(layer_sizes, &["amd64"])
    }

    /// A linux/amd64 + linux/arm64 index; each platform has layers of these sizes.
    pub fn multi_arch(layer_sizes: &[usize]) -> Self {
        Self::build(layer_sizes, &["amd64", "arm64"])
    }

    fn build(layer_sizes: &[usize], arches: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("clyde-image").tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).expect("mkdir");
        std::fs::write(dir.path().join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
        let mut layers = Vec::new();
        let mut manifests = Vec::new();
        for arch in arches {
            let mut descriptors = Vec::new();
            let mut diff_ids = Vec::new();
            for (i, size) in layer_sizes.iter().enumerate() {
                let (bytes, diff_id) = layer(*size, &format!("payload-{arch}-{i}"));
                let blob = write_blob(dir.path(), &bytes);
                descriptors.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob.digest, "size": blob.size}));
                diff_ids.push(diff_id);
                layers.push(blob);
            }
            let config = json!({"architecture": arch, "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
            let config = write_blob(dir.path(), &serde_json::to_vec(&config).expect("json"));
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.size},
                "layers": descriptors,
            });
            let manifest = write_blob(dir.path(), &serde_json::to_vec(&manifest).expect("json"));
            manifests.push(json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest.digest, "size": manifest.size,
                "platform": {"architecture": arch, "os": "linux"},
            }));
        }
        let top = if arches.len() == 1 {
            let mut m = manifests.remove(0);
            m.as_object_mut().expect("object").remove("platform");
            m
        } else {
            let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
            let index = write_blob(dir.path(), &serde_json::to_vec(&index).expect("json"));
            json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index.digest, "size": index.size})
        };
        let mut top = top;
        top["annotations"] = json!({"org.opencontainers.image.ref.name": TAG});
        let index = json!({"schemaVersion": 2, "manifests": [top]});
        std::fs::write(dir.path().join("index.json"), serde_json::to_vec(&index).expect("json")).expect("index.json");
        Self { dir, layers, multi_arch: arches.len() > 1 }
    }

    /// Pushes it as `registry/repo:tag` with `skopeo copy --all`.
    pub fn push(&self, registry: &Registry, repo: &str, tag: &str, format: ImageFormat) {
        let skopeo = require("skopeo", "skopeo");
        let mut cmd = Command::new(skopeo);
        cmd.args(["copy", "--all", "--quiet"]).args(registry.push_flags());
        if format == ImageFormat::Docker {
            cmd.args(["--format", "v2s2"]);
        }
        cmd.arg(format!("oci:{}:{TAG}", self.dir.path().display()));
        cmd.arg(format!("docker://{}/{repo}:{tag}", registry.addr()));
        run(&mut cmd);
    }

    /// The bytes of layer `i`, from the layout on disk.
    pub fn layer_data(&self, i: usize) -> Vec<u8> {
        let hex = self.layers[i].digest.trim_start_matches("sha256:");
        std::fs::read(self.dir.path().join("blobs/sha256").join(hex)).expect("layer file")
    }

    /// Total bytes of all layers.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}
