//! A hostile member: a peer port that claims ten times, or half, the size of the blobs it
//! holds (a test double in front of a real agent's peer port, advertised in its place).
//! Victims get right bytes, keep their disk use bounded, and penalize the liar.

use std::path::Path;
use std::time::Duration;

use clyde_tests::cluster::secret_file;
use clyde_tests::{Agent, ImageFormat, LyingPeer, Registry, TestImage, http, pull_image, sha256, wait_for};

const MIB: usize = 1024 * 1024;
const SECRET: &str = "lying-peer-secret-0123456789abcdefghijkl";
const CONFIG: &str = "[peers]\nlookup_timeout = \"1s\"\n";

/// Bytes a directory's files take on disk (blocks, so sparse files count what was written).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() { disk_bytes(&entry.path()) } else { meta.blocks() * 512 };
    }
    total
}

#[test]
fn a_peer_claiming_ten_times_or_half_the_size_is_penalized_and_clients_get_right_bytes() {
    let reg = Registry::start();
    let img = TestImage::single(&[4 * MIB, MIB]);
    img.push(&reg, "team/app", "v1", ImageFormat::Oci);
    let layer = &img.layers[0];
    let secret = secret_file(SECRET);

    // The liar: a real member whose advertised peer port is the test double's.
    let liar = LyingPeer::start("127.0.0.5", 10, 1);
    let config = format!("peer_advertise_port = {}\n{CONFIG}", liar.port());
    let holder = Agent::start_on("127.0.0.5", &config, &["--cluster-secret-file", &secret]);
    liar.relay_to(&holder.peer_addr());
    pull_image(&holder.url(), &reg.addr(), "team/app", "v1");
    wait_for("the holder to advertise the image", Duration::from_secs(20), || {
        (holder.metric("clyde_advertised_keys") >= 4.0).then_some(())
    });
    let boot = holder.p2p_addr();
    let penalized = format!("peer penalized peer={}", liar.addr());

    for (i, (num, den)) in [(10, 1), (1, 2)].into_iter().enumerate() {
        liar.set_factor(num, den);
        let args = ["--cluster-secret-file", secret.as_str(), "--bootstrap", boot.as_str()];
        // A pull like containerd's (the manifest gives every blob's size), and before it a
        // client asking for a layer by digest alone (the upstream gives its size), each on a
        // node of its own.
        let puller = Agent::start_on(&format!("127.0.0.{}", 6 + 2 * i), CONFIG, &args);
        let by_digest = Agent::start_on(&format!("127.0.0.{}", 7 + 2 * i), CONFIG, &args);
        puller.wait_ready();
        by_digest.wait_ready();
        let lies = liar.lies();

        let url = format!("{}/v2/team/app/blobs/{}?ns={}", by_digest.url(), layer.digest, reg.addr());
        let head = http().head(&url).send().expect("HEAD");
        assert_eq!(head.status().as_u16(), 200);
        assert_eq!(head.headers()["content-length"].to_str().expect("length"), layer.size.to_string());
        let body = http().get(&url).send().expect("GET").bytes().expect("body");
        assert_eq!(sha256(&body), layer.digest, "wrong bytes for a client asking by digest ({num}/{den})");
        assert!(
            by_digest.log().contains(&penalized),
            "the liar was not penalized by a node without the manifest ({num}/{den}):\n{}",
            by_digest.log()
        );

        // Every digest verified by the client as it pulls.
        let pulled = pull_image(&puller.url(), &reg.addr(), "team/app", "v1");
        assert!(pulled.blob_bytes > img.layer_bytes());
        assert!(liar.lies() > lies, "the liar was never asked ({num}/{den})");
        assert!(puller.log().contains(&penalized), "the liar was not penalized ({num}/{den}):\n{}", puller.log());

        // Nothing of the lie reached the disk: what each holds is about what it was sent.
        for (node, held) in [(&puller, img.layer_bytes() as f64), (&by_digest, layer.size as f64)] {
            let disk = disk_bytes(&node.data_dir()) as f64;
            assert!(disk < held + 6.0 * MIB as f64, "{disk} bytes on disk for {held} bytes of blobs ({num}/{den})");
        }
    }
}
