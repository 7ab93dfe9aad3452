//! Operating the cache with `clyde load`, `clyde list` and `clyde prune`, through a running
//! agent's admin socket and offline on a data dir, against a real upstream registry.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clyde_tests::agent::clyde_bin;
use clyde_tests::{Agent, ImageFormat, Registry, TestImage, http, sha256, wait_for};

const MIB: usize = 1024 * 1024;

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the `clyde` command line on `data_dir`.
fn clyde(data_dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(clyde_bin())
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap_or_else(|e| panic!("clyde {args:?}: {e}"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn held(data_dir: &Path, digest: &str) -> bool {
    data_dir.join("blobs").join(digest.replace(':', "/")).exists()
}

fn blob_count(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("blobs/sha256")).map_or(0, |d| d.count())
}

fn list_json(data_dir: &Path) -> Vec<serde_json::Value> {
    let out = clyde(data_dir, &["list", "--output", "json"]);
    assert!(out.ok, "list failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("list output is not JSON ({e}): {}", out.stdout))
}

#[test]
fn load_list_and_prune_through_the_running_agent() {
    let reg = Registry::start();
    let app = TestImage::multi_arch(&[MIB, 2 * MIB]);
    app.push(&reg, "app", "v1", ImageFormat::Oci);
    let tool = TestImage::single(&[3 * MIB]);
    tool.push(&reg, "tool", "v1", ImageFormat::Docker);
    let agent = Agent::start("", &[]);
    let dir = agent.data_dir();
    let r = reg.addr();
    let socket = std::fs::metadata(dir.join("admin.sock")).expect("the agent's admin socket");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&socket.permissions()) & 0o777, 0o600, "owner-only");

    // One image that does not exist: reported, the rest loaded, and the exit code says so.
    let (app_ref, tool_ref, missing) = (format!("{r}/app:v1"), format!("{r}/tool:v1"), format!("{r}/missing:v1"));
    let out = clyde(&dir, &["load", &app_ref, &missing, &tool_ref, "--platform", "linux/arm64", "--concurrency", "2"]);
    assert!(!out.ok, "a failed image must fail the command");
    assert!(out.stderr.contains("through the running agent"), "{}", out.stderr);
    assert!(out.stderr.contains("1 of 3 images failed to load"), "{}", out.stderr);
    assert!(out.stdout.contains(&format!("failed {missing}")), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("loaded {app_ref}")) && out.stdout.contains(&format!("loaded {tool_ref}")));
    // arm64 only: its layers, not amd64's.
    let (amd64, arm64) = app.layers.split_at(2);
    for l in arm64.iter().chain(&tool.layers) {
        wait_for("loaded layers in the store", Duration::from_secs(10), || held(&dir, &l.digest).then_some(()));
    }
    assert!(amd64.iter().all(|l| !held(&dir, &l.digest)), "a platform that was not asked for was loaded");
    assert!(agent.metric(&format!("clyde_upstream_bytes_total{{registry=\"{r}\"}}")) >= (4 * MIB) as f64);

    let images = list_json(&dir);
    let names: Vec<&str> = images.iter().map(|i| i["reference"].as_str().unwrap_or("")).collect();
    assert_eq!(names[..2], [app_ref.as_str(), tool_ref.as_str()], "{images:#?}");
    assert_eq!(images.len(), 3, "the index, the image, and the arm64 manifest of the index: {images:#?}");
    assert_eq!((images[0]["kind"].as_str(), images[1]["kind"].as_str()), (Some("index"), Some("image")));
    assert_eq!(images[2]["platform_manifest"], true);
    let tool_size = images[1]["size"].as_u64().unwrap_or(0);
    assert!(tool_size > 3 * MIB as u64 && tool_size < 3 * MIB as u64 + 4096, "size {tool_size}");
    let table = clyde(&dir, &["list", "--pattern", "tool"]);
    eprintln!("{}\n{}", clyde(&dir, &["list"]).stdout, out.stdout);
    assert!(table.ok && table.stdout.starts_with("REFERENCE"), "{}", table.stdout);
    assert!(table.stdout.contains(&tool_ref) && !table.stdout.contains("app"), "{}", table.stdout);

    // A dry run prints and changes nothing.
    let before = blob_count(&dir);
    let dry = clyde(&dir, &["prune", "--pattern", "/tool:", "--dry-run"]);
    assert!(dry.ok, "{}", dry.stderr);
    assert!(dry.stdout.contains(&format!("would remove {tool_ref}")), "{}", dry.stdout);
    eprintln!("{}", dry.stdout);
    assert_eq!(blob_count(&dir), before);
    assert_eq!(list_json(&dir).len(), 3);

    // The real prune removes exactly the tool's blobs (manifest, config, layer).
    let out = clyde(&dir, &["prune", "--pattern", "/tool:", "--output", "json"]);
    assert!(out.ok, "{}", out.stderr);
    let plan: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    assert_eq!(plan["blobs"].as_array().map(Vec::len), Some(2), "{plan}");
    assert_eq!(plan["manifests"].as_array().map(Vec::len), Some(1), "{plan}");
    assert_eq!(blob_count(&dir), before - 3);
    assert!(!held(&dir, &tool.layers[0].digest));
    assert!(arm64.iter().all(|l| held(&dir, &l.digest)), "the kept image lost a blob");
    assert_eq!(list_json(&dir).len(), 2);
    assert_eq!(agent.metric("clyde_store_bytes"), blob_bytes(&dir) as f64);

    // The pruned image is fetched again when asked for.
    let url = format!("{}/v2/tool/blobs/{}?ns={r}", agent.url(), tool.layers[0].digest);
    assert_eq!(sha256(&http().get(url).send().expect("get").bytes().expect("body")), tool.layers[0].digest);
}

fn blob_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .map_or(0, |d| d.flatten().map(|e| e.metadata().map_or(0, |m| m.len())).sum())
}

#[test]
fn a_blob_a_kept_tag_references_survives_a_prune() {
    let reg = Registry::start();
    let img = TestImage::single(&[MIB]);
    img.push(&reg, "same", "v1", ImageFormat::Oci);
    img.push(&reg, "same", "v2", ImageFormat::Oci);
    let agent = Agent::start("", &[]);
    let dir = agent.data_dir();
    let r = reg.addr();
    let out = clyde(&dir, &["load", &format!("{r}/same:v1"), &format!("{r}/same:v2")]);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let before = blob_count(&dir);
    // Sizes and ages as operators write them; both tags were pulled just now.
    let out = clyde(&dir, &["prune", "--accessed-before", "1h", "--output", "json"]);
    assert!(out.ok && out.stdout.contains("\"images\": []"), "{}{}", out.stdout, out.stderr);
    let out = clyde(&dir, &["prune", "--max-size", "1KiB", "--dry-run"]);
    assert!(
        out.ok && out.stdout.contains("would remove 2 images, 1 manifests, 2 blobs"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let out = clyde(&dir, &["prune", "--max-size", "lots"]);
    assert!(!out.ok && out.stderr.contains("invalid size"), "{}", out.stderr);
    let out = clyde(&dir, &["prune"]);
    assert!(!out.ok && out.stderr.contains("say what to prune"), "{}", out.stderr);
    assert_eq!(blob_count(&dir), before);
    let out = clyde(&dir, &["prune", "--pattern", ":v1$"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("removed 1 images, 0 manifests, 0 blobs"), "{}", out.stdout);
    assert_eq!(blob_count(&dir), before);
    let names: Vec<String> =
        list_json(&dir).iter().map(|i| i["reference"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(names, [format!("{r}/same:v2")]);
}

#[test]
fn an_offline_load_prepares_a_data_dir_for_an_air_gapped_agent() {
    let mut reg = Registry::start();
    let img = TestImage::single(&[2 * MIB]);
    img.push(&reg, "edge", "v1", ImageFormat::Oci);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let reference = format!("{}/edge:v1", reg.addr());
    let file = dir.path().join("images.txt");
    std::fs::write(&file, format!("# what the edge site runs\n{reference}\n")).expect("write");
    let out = clyde(&data, &["load", "--image-file", file.to_str().unwrap_or_default()]);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("running agent"));
    assert!(held(&data, &img.layers[0].digest));
    assert!(!data.join("admin.sock").exists());

    // The upstream goes away; an air-gapped agent on that data dir serves the tag.
    reg.stop();
    let mut agent = Agent::start_with_data_dir(&data, "", &["--air-gapped"]);
    let url = format!("{}/v2/edge/manifests/v1?ns={}", agent.url(), reg.addr());
    let manifest = http().get(url).send().expect("get");
    assert_eq!(manifest.status(), 200);
    let url = format!("{}/v2/edge/blobs/{}?ns={}", agent.url(), img.layers[0].digest, reg.addr());
    assert_eq!(sha256(&http().get(url).send().expect("get").bytes().expect("body")), img.layers[0].digest);

    // While the agent runs, nobody else writes its data dir: without the socket the command
    // tries the data dir itself and is refused with a clear error.
    let socket = data.join("admin.sock");
    assert!(socket.exists());
    std::fs::rename(&socket, data.join("aside.sock")).expect("move socket");
    let out = clyde(&data, &["prune", "--pattern", "edge"]);
    assert!(!out.ok && out.stderr.contains("in use by another clyde process"), "{}", out.stderr);
    std::fs::rename(data.join("aside.sock"), &socket).expect("move socket back");
    agent.stop();
    assert!(!socket.exists(), "the agent leaves no socket behind");
    // With the agent gone, the same command works offline.
    let out = clyde(&data, &["prune", "--pattern", "edge"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(!held(&data, &img.layers[0].digest));
}

#[test]
fn serve_preloads_images_from_a_file_and_keeps_serving() {
    let reg = Registry::start();
    let img = TestImage::single(&[MIB, MIB]);
    img.push(&reg, "pre", "v1", ImageFormat::Oci);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("preload.txt");
    std::fs::write(&file, format!("{0}/pre:v1\n{0}/absent:v1\n", reg.addr())).expect("write");
    let agent = Agent::start("", &["--preload-images", file.to_str().unwrap_or_default()]);
    wait_for("the preload to finish", Duration::from_secs(30), || {
        agent.log().contains("some images could not be preloaded").then_some(())
    });
    assert!(img.layers.iter().all(|l| held(&agent.data_dir(), &l.digest)), "{}", agent.log());
    assert!(agent.log().contains("image not loaded"), "the failed image is logged");
    assert_eq!(http().get(format!("{}/v2/", agent.url())).send().expect("get").status(), 200);
}

#[test]
fn an_image_loaded_with_pin_is_marked_and_pruned_only_with_force() {
    let reg = Registry::start();
    let img = TestImage::single(&[MIB]);
    img.push(&reg, "pinned", "v1", ImageFormat::Oci);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let reference = format!("{}/pinned:v1", reg.addr());
    let out = clyde(&dir, &["load", "--pin", &reference]);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let rows = list_json(&dir);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["pinned"], serde_json::Value::Bool(true), "{rows:?}");
    // A prune that selects it keeps it and says so; --force removes it.
    let out = clyde(&dir, &["prune", "--pattern", "pinned"]);
    assert!(out.ok && out.stdout.contains("pinned (--force removes it)"), "{}{}", out.stdout, out.stderr);
    assert!(held(&dir, &img.layers[0].digest));
    let out = clyde(&dir, &["prune", "--pattern", "pinned", "--force"]);
    assert!(out.ok && out.stdout.contains("removed 1 images"), "{}{}", out.stdout, out.stderr);
    assert!(!held(&dir, &img.layers[0].digest));
}
