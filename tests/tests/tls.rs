//! Server TLS: the mirror port over TLS and mutual TLS (a real containerd pulling through
//! it with the hosts.toml `clyde containerd-config` writes), and mutual TLS between agents'
//! peer ports. Certificates are made by the test kit with `openssl`.

use std::process::Command;
use std::time::Duration;

use clyde_tests::agent::clyde_bin;
use clyde_tests::pki::Pki;
use clyde_tests::{Agent, Cluster, Containerd, ImageFormat, Registry, TestImage, run, sha256, wait_for};

const MIB: usize = 1024 * 1024;

fn client(pki: &Pki, with_cert: bool) -> reqwest::blocking::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem")).expect("ca")).expect("ca pem");
    let mut builder = reqwest::blocking::Client::builder().add_root_certificate(ca).timeout(Duration::from_secs(30));
    if with_cert {
        let mut pem = std::fs::read(pki.path("client.pem")).expect("cert");
        pem.extend(std::fs::read(pki.path("client-key.pem")).expect("key"));
        builder = builder.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
    }
    builder.build().expect("client")
}

fn mirror_tls(pki: &Pki, mutual: bool) -> String {
    let mut config = format!(
        "[mirror_tls]\ncert = {:?}\nkey = {:?}\n",
        pki.path("server.pem").display().to_string(),
        pki.path("server-key.pem").display().to_string()
    );
    if mutual {
        config.push_str(&format!("client_ca = {:?}\n", pki.path("ca.pem").display().to_string()));
    }
    config
}

#[test]
fn the_mirror_serves_over_tls() {
    let pki = Pki::generate();
    let reg = Registry::start();
    let img = TestImage::single(&[MIB]);
    img.push(&reg, "secure", "v1", ImageFormat::Oci);
    let agent = Agent::start(&mirror_tls(&pki, false), &[]);
    let https = format!("https://{}", agent.addr());
    let url = format!("{https}/v2/secure/blobs/{}?ns={}", img.layers[0].digest, reg.addr());
    let body = client(&pki, false).get(&url).send().expect("https get").bytes().expect("body");
    assert_eq!(sha256(&body), img.layers[0].digest);
    // Plain HTTP on a TLS port gets no answer.
    assert!(clyde_tests::http().get(format!("{}/v2/", agent.url())).send().is_err());
    // A client that does not trust the CA refuses the server.
    assert!(reqwest::blocking::Client::new().get(format!("{https}/v2/")).send().is_err());
}

#[test]
fn containerd_pulls_through_a_mirror_that_requires_its_client_certificate() {
    let pki = Pki::generate();
    let reg = Registry::start();
    let img = TestImage::single(&[MIB, 2 * MIB]);
    img.push(&reg, "mtls", "v1", ImageFormat::Oci);
    let agent = Agent::start(&mirror_tls(&pki, true), &[]);
    let https = format!("https://{}", agent.addr());
    assert_eq!(client(&pki, true).get(format!("{https}/v2/")).send().expect("with cert").status(), 200);
    assert!(client(&pki, false).get(format!("{https}/v2/")).send().is_err(), "a client without a certificate got in");

    let ctrd = Containerd::start();
    let hosts = ctrd.hosts_dir();
    run(Command::new(clyde_bin())
        .args(["containerd-config", "--registry", &reg.addr(), "--mirror-url", &https])
        .arg("--hosts-dir")
        .arg(&hosts)
        .arg("--mirror-ca")
        .arg(pki.path("ca.pem"))
        .arg("--mirror-client-cert")
        .arg(pki.path("client.pem"))
        .arg("--mirror-client-key")
        .arg(pki.path("client-key.pem")));
    let (ok, out) = ctrd.pull(&hosts, &format!("{}/mtls:v1", reg.addr()), &[]);
    assert!(ok, "ctr pull failed: {out}\n{}", agent.log());
    // containerd got the layers through the mirror: had the handshake failed, it would
    // have fallen back to the registry, and the mirror would have served nothing.
    let served = agent.metric("clyde_served_bytes_total{api=\"mirror\",source=\"upstream\"}")
        + agent.metric("clyde_served_bytes_total{api=\"mirror\",source=\"local\"}");
    assert!(served >= img.layer_bytes() as f64, "the mirror served {served} bytes:\n{}", agent.log());
    let content = ctrd.content();
    for layer in &img.layers {
        assert!(content.iter().any(|c| c.contains(&layer.digest)), "{} not in containerd", layer.digest);
    }
}

#[test]
fn peers_fetch_from_each_other_over_mutual_tls() {
    let pki = Pki::generate();
    let mut reg = Registry::start();
    let img = TestImage::single(&[2 * MIB]);
    img.push(&reg, "peered", "v1", ImageFormat::Oci);
    let config = format!(
        "[peers]\nlookup_timeout = \"2s\"\n[peer_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nserver_name = \"clyde-peer\"\n",
        pki.path("peer.pem").display().to_string(),
        pki.path("peer-key.pem").display().to_string(),
        pki.path("ca.pem").display().to_string()
    );
    let cluster = Cluster::start(2, &config, &[]);
    let [first, second] = &cluster.nodes[..] else { unreachable!() };
    let layer = &img.layers[0];
    let registry = reg.addr();
    let get = |node: &Agent| {
        let url = format!("{}/v2/peered/blobs/{}?ns={registry}", node.url(), layer.digest);
        clyde_tests::http().get(url).send().expect("get").bytes().expect("body")
    };
    assert_eq!(sha256(&get(first)), layer.digest);
    let held = |node: &Agent| node.data_dir().join("blobs").join(layer.digest.replace(':', "/")).exists();
    wait_for("the first node to hold the blob", Duration::from_secs(10), || held(first).then_some(()));
    // The upstream is gone: the second node can only get it from the first, over TLS.
    reg.stop();
    assert_eq!(sha256(&get(second)), layer.digest, "{}", second.log());
    assert_eq!(second.metric("clyde_peer_fetch_bytes_total"), layer.size as f64);
    // The peer port accepts neither plain HTTP nor a client without a certificate; a client
    // with the peers' certificate gets the blob.
    let addr: std::net::SocketAddr = first.peer_addr().parse().expect("peer addr");
    let path = format!("v2/peered/blobs/{}?ns={registry}", layer.digest);
    assert!(clyde_tests::http().get(format!("http://{addr}/{path}")).send().is_err());
    let as_peer = |identity: Option<(&str, &str)>| {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem")).expect("ca")).expect("pem");
        let mut b = reqwest::blocking::Client::builder().add_root_certificate(ca).resolve("clyde-peer", addr);
        if let Some((cert, key)) = identity {
            let mut pem = std::fs::read(pki.path(cert)).expect("cert");
            pem.extend(std::fs::read(pki.path(key)).expect("key"));
            b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
        }
        b.build().expect("client").get(format!("https://clyde-peer:{}/{path}", addr.port())).send()
    };
    assert!(as_peer(None).is_err(), "a client without a certificate got in");
    let body = as_peer(Some(("peer.pem", "peer-key.pem"))).expect("with the peer certificate").bytes().expect("body");
    assert_eq!(sha256(&body), layer.digest);
}
