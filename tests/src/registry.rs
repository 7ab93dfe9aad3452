//! A real upstream: Debian's `docker-registry` (CNCF distribution 2.8).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use crate::agent::free_port_on;
use crate::{Pki, Place, require, run, spawn_logged, wait_for};

/// How a test registry protects itself.
#[derive(Default)]
pub struct RegistryOptions<'a> {
    /// Basic auth (htpasswd) with this user and password (the one that pushes).
    pub basic_auth: Option<(&'a str, &'a str)>,
    /// With `basic_auth`: more users and their passwords.
    pub more_users: &'a [(&'a str, &'a str)],
    /// Serve HTTPS with the PKI's server certificate.
    pub tls: Option<&'a Pki>,
    /// With `tls`: require client certificates signed by the PKI's CA.
    pub mutual_tls: bool,
}

/// A running distribution registry.
pub struct Registry {
    dir: TempDir,
    place: Place,
    port: u16,
    child: Option<Child>,
    generation: u32,
    /// skopeo flags to push to it.
    push_flags: Vec<String>,
}

impl Registry {
    /// Starts a plain-HTTP registry on a free port and waits until it listens.
    pub fn start() -> Self {
        Self::start_with(&RegistryOptions::default())
    }

    /// Starts a registry with auth and TLS options.
    pub fn start_with(options: &RegistryOptions<'_>) -> Self {
        Self::start_in(&Place::local(), options)
    }

    /// Starts a registry in `place` (a lab host, or the test's own network).
    pub fn start_in(place: &Place, options: &RegistryOptions<'_>) -> Self {
        let dir = tempfile::Builder::new().prefix("clyde-registry").tempdir().expect("tempdir");
        let port = if place.is_isolated() { 5000 } else { free_port_on(&place.ip) };
        let ip = &place.ip;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {ip}:{port}\n",
            dir.path().join("storage").display()
        );
        let mut push_flags = vec!["--dest-tls-verify=false".to_string()];
        if let Some(pki) = options.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.path("server.pem").display(),
                pki.path("server-key.pem").display()
            ));
            if options.mutual_tls {
                config.push_str(&format!("    clientcas:\n      - {}\n", pki.path("ca.pem").display()));
            }
            push_flags = vec![format!("--dest-cert-dir={}", pki.skopeo_cert_dir().display())];
        }
        if let Some((user, password)) = options.basic_auth {
            let htpasswd = dir.path().join("htpasswd");
            let mut lines = String::new();
            for (user, password) in std::iter::once((user, password)).chain(options.more_users.iter().copied()) {
                let line = run(Command::new(require("htpasswd", "apache2-utils")).args(["-nbB", user, password]));
                lines.push_str(line.trim());
                lines.push('\n');
            }
            std::fs::write(&htpasswd, lines).expect("htpasswd");
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: clyde-test\n    path: {}\n", htpasswd.display()));
            push_flags.push(format!("--dest-creds={user}:{password}"));
        }
        std::fs::write(dir.path().join("config.yml"), config).expect("write registry config");
        let mut r = Self { dir, place: place.clone(), port, child: None, generation: 0, push_flags };
        r.spawn();
        r
    }

    /// skopeo flags that push to this registry (TLS, credentials).
    pub fn push_flags(&self) -> &[String] {
        &self.push_flags
    }

    fn spawn(&mut self) {
        let bin = require("docker-registry", "docker-registry");
        let config = self.dir.path().join("config.yml");
        self.generation += 1;
        let mut cmd = self.place.command(bin);
        self.child = Some(spawn_logged(cmd.arg("serve").arg(&config), &self.log_path(self.generation)));
        let log = self.log_path(self.generation);
        wait_for("the registry to listen", Duration::from_secs(30), || {
            let up = std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"));
            (up && std::net::TcpStream::connect((self.place.ip.as_str(), self.port)).is_ok()).then_some(())
        });
    }

    fn log_path(&self, generation: u32) -> PathBuf {
        self.dir.path().join(format!("registry.{generation}.log"))
    }

    /// `IP:PORT`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.place.ip, self.port)
    }

    /// Stops the registry (its port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The completed requests logged so far: (method, uri, bytes written, user agent).
    pub fn requests(&self) -> Vec<(String, String, u64, String)> {
        let mut out = Vec::new();
        for g in 1..=self.generation {
            let text = std::fs::read_to_string(self.log_path(g)).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if v["msg"] != "response completed" {
                    continue;
                }
                let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                out.push((
                    s("http.request.method"),
                    s("http.request.uri"),
                    v["http.response.written"].as_u64().unwrap_or(0),
                    s("http.request.useragent"),
                ));
            }
        }
        out
    }

    /// Where it runs.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// Everything the registry logged.
    pub fn log(&self) -> String {
        (1..=self.generation).map(|g| std::fs::read_to_string(self.log_path(g)).unwrap_or_default()).collect()
    }

    /// Bytes of this blob the registry sent in answers to `GET`s, from its log.
    pub fn blob_bytes_served(&self, digest: &str) -> u64 {
        self.requests()
            .iter()
            .filter(|(m, uri, _, _)| m == "GET" && uri.contains(&format!("/blobs/{digest}")))
            .map(|(_, _, n, _)| n)
            .sum()
    }

    /// Waits until the log shows `GET`s of this blob adding up to at least `bytes`, then
    /// a little longer for stragglers, and returns the total.
    pub fn wait_blob_bytes(&self, digest: &str, bytes: u64) -> u64 {
        wait_for("the registry to log the blob's transfer", Duration::from_secs(30), || {
            (self.blob_bytes_served(digest) >= bytes).then_some(())
        });
        std::thread::sleep(Duration::from_millis(300));
        self.blob_bytes_served(digest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
