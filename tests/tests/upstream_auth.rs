//! Pull-through from upstreams that want credentials, tokens, TLS and client certificates.

use std::time::Duration;

use clyde_tests::{Agent, ImageFormat, Pki, Registry, RegistryOptions, TestImage, TokenGate, http, sha256};

fn get_status_and_body(url: &str) -> (u16, Vec<u8>) {
    let r = http().get(url).send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.bytes().expect("body").to_vec())
}

#[test]
fn basic_auth_credentials_are_used_and_refused_ones_are_a_404() {
    let reg = Registry::start_with(&RegistryOptions { basic_auth: Some(("robot", "s3cret")), ..Default::default() });
    let img = TestImage::single(&[100_000]);
    img.push(&reg, "private/app", "v1", ImageFormat::Oci);
    let layer = &img.layers[0];

    let anonymous = Agent::start("", &[]);
    let url = |a: &Agent, path: &str| format!("{}/v2/private/app/{path}?ns={}", a.url(), reg.addr());
    assert_eq!(get_status_and_body(&url(&anonymous, "manifests/v1")).0, 404);

    let secrets = tempfile::tempdir().expect("tempdir");
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, "s3cret\n").expect("password file");
    let config = format!(
        "[[registries]]\nname = \"{}\"\n[registries.auth]\nusername = \"robot\"\npassword_file = \"{}\"\n",
        reg.addr(),
        password_file.display()
    );
    let agent = Agent::start(&config, &[]);
    assert_eq!(get_status_and_body(&url(&agent, "manifests/v1")).0, 200);
    let (status, body) = get_status_and_body(&url(&agent, &format!("blobs/{}", layer.digest)));
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), layer.digest);

    let wrong = format!(
        "[[registries]]\nname = \"{}\"\n[registries.auth]\nusername = \"robot\"\npassword = \"nope\"\n",
        reg.addr()
    );
    let refused = Agent::start(&wrong, &[]);
    assert_eq!(get_status_and_body(&url(&refused, &format!("blobs/{}", layer.digest))).0, 404);
}

#[test]
fn bearer_tokens_are_fetched_once_per_scope_and_renewed_when_they_expire() {
    let reg = Registry::start();
    let img = TestImage::single(&[50_000, 60_000]);
    img.push(&reg, "tok/app", "v1", ImageFormat::Oci);
    let gate = TokenGate::start(&reg.addr(), "robot", "s3cret", Duration::from_secs(6));
    let config = format!(
        "[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n[registries.auth]\nusername = \"robot\"\npassword = \"s3cret\"\n",
        reg.addr(),
        gate.addr()
    );
    let agent = Agent::start(&config, &[]);
    let url = |path: &str| format!("{}/v2/tok/app/{path}?ns={}", agent.url(), reg.addr());
    assert_eq!(get_status_and_body(&url("manifests/v1")).0, 200);
    for layer in &img.layers {
        let (status, body) = get_status_and_body(&url(&format!("blobs/{}", layer.digest)));
        assert_eq!(status, 200);
        assert_eq!(sha256(&body), layer.digest);
    }
    assert_eq!(gate.tokens_issued(), 1, "the token was not reused for the same scope");
    assert_eq!(gate.refused(), 1, "only the first request should meet a challenge");

    // After the token expires (6 s, renewed 5 s early), the next request gets a new one.
    std::thread::sleep(Duration::from_millis(1500));
    let child = TestImage::single(&[1000]);
    child.push(&reg, "tok/app", "v2", ImageFormat::Oci);
    assert_eq!(get_status_and_body(&url("manifests/v2")).0, 200);
    assert_eq!(gate.tokens_issued(), 2, "an expired token was used");

    // Wrong credentials: the token service refuses, and the mirror answers 404.
    let wrong = format!(
        "[[registries]]\nname = \"{}\"\nendpoint = \"{}\"\n[registries.auth]\nusername = \"robot\"\npassword = \"nope\"\n",
        reg.addr(),
        gate.addr()
    );
    let refused = Agent::start(&wrong, &[]);
    let (status, body) = get_status_and_body(&format!("{}/v2/tok/app/manifests/v1?ns={}", refused.url(), reg.addr()));
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
}

#[test]
fn tls_upstreams_with_a_private_ca_and_client_certificates() {
    let pki = Pki::generate();
    let reg = Registry::start_with(&RegistryOptions { tls: Some(&pki), mutual_tls: true, ..Default::default() });
    let img = TestImage::single(&[80_000]);
    img.push(&reg, "secure/app", "v1", ImageFormat::Oci);
    let layer = &img.layers[0];
    let registry =
        |tls: &str| format!("[[registries]]\nname = \"{}\"\nscheme = \"https\"\n[registries.tls]\n{tls}", reg.addr());
    let ca = format!("ca = \"{}\"\n", pki.path("ca.pem").display());
    let client = format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        pki.path("client.pem").display(),
        pki.path("client-key.pem").display()
    );

    let full = Agent::start(&registry(&format!("{ca}{client}")), &[]);
    let blob_url = |a: &Agent| format!("{}/v2/secure/app/blobs/{}?ns={}", a.url(), layer.digest, reg.addr());
    let (status, body) = get_status_and_body(&blob_url(&full));
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), layer.digest);
    assert_eq!(get_status_and_body(&format!("{}/v2/secure/app/manifests/v1?ns={}", full.url(), reg.addr())).0, 200);

    // Without the client certificate the handshake is refused; without the CA the server is
    // not trusted. Either way: a 404 so the client falls back, and nothing stored.
    for tls in [ca.clone(), client.clone()] {
        let agent = Agent::start(&registry(&tls), &[]);
        assert_eq!(get_status_and_body(&blob_url(&agent)).0, 404, "with only: {tls}");
        assert_eq!(clyde_tests::assert_store_verified(&agent.data_dir()), 0);
    }
    let insecure = Agent::start(&registry(&format!("{client}insecure_skip_verify = true\n")), &[]);
    assert_eq!(get_status_and_body(&blob_url(&insecure)).0, 200);
}
