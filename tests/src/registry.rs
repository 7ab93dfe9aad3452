//! A real upstream: Debian's `docker-registry` (CNCF distribution 2.8).

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port, http, require, wait_for};

/// A running distribution registry on 127.0.0.1.
pub struct Registry {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    generation: u32,
}

impl Registry {
    /// Starts a registry on a free port and waits until `/v2/` answers.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("clyde-registry").tempdir().expect("tempdir");
        let mut r = Self { dir, port: free_port(), child: None, generation: 0 };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let bin = require("docker-registry", "docker-registry");
        let config = self.dir.path().join("config.yml");
        let root = self.dir.path().join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
                root.display(),
                self.port
            ),
        )
        .expect("write registry config");
        self.generation += 1;
        let log = File::create(self.log_path(self.generation)).expect("registry log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let url = format!("http://{}/v2/", self.addr());
        let client = http();
        wait_for("the registry to answer /v2/", Duration::from_secs(30), || {
            client.get(&url).send().ok().filter(|r| r.status().is_success()).map(|_| ())
        });
    }

    fn log_path(&self, generation: u32) -> PathBuf {
        self.dir.path().join(format!("registry.{generation}.log"))
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
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
