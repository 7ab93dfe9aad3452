//! Test certificates made with `openssl`: a CA, a server certificate for 127.0.0.1, and a
//! client certificate for mutual TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::{require, run};

/// A CA with one server and one client certificate, as PEM files in a temp dir.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Makes the CA and both certificates.
    pub fn generate() -> Self {
        let openssl = require("openssl", "openssl");
        let dir = tempfile::Builder::new().prefix("clyde-pki").tempdir().expect("tempdir");
        let p = dir.path();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(Command::new(&openssl)
            .args(["req", "-x509"])
            .args(ec)
            .args(["-days", "2", "-subj", "/CN=clyde-test-ca"])
            .args(["-keyout", &s(p, "ca-key.pem"), "-out", &s(p, "ca.pem")]));
        for (name, ext) in [
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            ("client", "extendedKeyUsage=clientAuth\n"),
            // One certificate for every agent, client and server of each other.
            ("peer", "subjectAltName=DNS:clyde-peer\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ] {
            std::fs::write(p.join(format!("{name}.ext")), ext).expect("ext");
            run(Command::new(&openssl).arg("req").args(ec).args(["-subj", &format!("/CN=clyde-test-{name}")]).args([
                "-keyout",
                &s(p, &format!("{name}-key.pem")),
                "-out",
                &s(p, &format!("{name}.csr")),
            ]));
            run(Command::new(&openssl).args(["x509", "-req", "-days", "2", "-CAcreateserial"]).args([
                "-in",
                &s(p, &format!("{name}.csr")),
                "-CA",
                &s(p, "ca.pem"),
                "-CAkey",
                &s(p, "ca-key.pem"),
                "-extfile",
                &s(p, &format!("{name}.ext")),
                "-out",
                &s(p, &format!("{name}.pem")),
            ]));
        }
        // The layout skopeo's --cert-dir expects.
        let certs = p.join("skopeo");
        std::fs::create_dir_all(&certs).expect("mkdir");
        for (from, to) in [("ca.pem", "ca.crt"), ("client.pem", "client.cert"), ("client-key.pem", "client.key")] {
            std::fs::copy(p.join(from), certs.join(to)).expect("copy");
        }
        Self { dir }
    }

    /// A file of the PKI: `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
    /// `client-key.pem`, `peer.pem`, `peer-key.pem` (for the name `clyde-peer`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A directory in the layout of skopeo's `--cert-dir` (CA and client certificate).
    pub fn skopeo_cert_dir(&self) -> PathBuf {
        self.dir.path().join("skopeo")
    }
}

fn s(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}
