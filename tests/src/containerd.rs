//! A real containerd with its own root, state and socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{Place, require, run, spawn_logged, wait_for};

/// A running containerd (no CRI plugin) in a temp dir.
pub struct Containerd {
    dir: TempDir,
    place: Place,
    child: Option<Child>,
}

/// The namespace the test containerd's `ctr` commands use.
pub const NAMESPACE: &str = "clyde-test";

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers.
    pub fn start() -> Self {
        Self::start_in(&Place::local())
    }

    /// Starts containerd in `place`; its `ctr` commands (which pull) run there too.
    pub fn start_in(place: &Place) -> Self {
        require("containerd", "containerd");
        require("ctr", "containerd");
        let dir = tempfile::Builder::new().prefix("clyde-ctrd").tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::write(
            p.join("config.toml"),
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"{sock}.debug\"\n",
                root = p.join("root").display(),
                state = p.join("state").display(),
                sock = p.join("c.sock").display(),
            ),
        )
        .expect("containerd config");
        let mut c = Self { dir, place: place.clone(), child: None };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let bin = require("containerd", "containerd");
        let p = self.dir.path();
        self.child = Some(spawn_logged(
            self.place.command(bin).arg("--config").arg(p.join("config.toml")),
            &p.join("containerd.log"),
        ));
        wait_for("containerd to answer", Duration::from_secs(30), || {
            self.ctr(&["version"]).status().ok().filter(|s| s.success()).map(|_| ())
        });
    }

    /// Stops containerd (SIGKILL, as a crash or an OOM kill would) and starts it again on the
    /// same root and socket.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// containerd's content directory.
    pub fn content_dir(&self) -> PathBuf {
        self.dir.path().join("root/io.containerd.content.v1.content")
    }

    /// `clyde serve` flags that share this containerd's content: read from its content
    /// directory when `from_dir`, else over gRPC.
    pub fn sharing_args(&self, from_dir: bool) -> Vec<String> {
        let dir = if from_dir { self.content_dir().display().to_string() } else { String::new() };
        let socket = self.socket().display().to_string();
        let flags =
            ["--containerd-socket", &socket, "--containerd-namespace", NAMESPACE, "--containerd-content-dir", &dir];
        flags.iter().map(|f| f.to_string()).collect()
    }

    /// A `ctr` command against this containerd, in the test namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = self.place.command("ctr");
        cmd.arg("--address").arg(self.socket()).args(["--namespace", NAMESPACE]).args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// A fresh hosts dir for `--hosts-dir`.
    pub fn hosts_dir(&self) -> PathBuf {
        let d = self.dir.path().join("certs.d");
        std::fs::create_dir_all(&d).expect("hosts dir");
        d
    }

    /// A fresh hosts dir whose `registry` uses `agent` as its mirror, written by
    /// `clyde containerd-config` as a user would.
    pub fn mirror_hosts_dir(&self, registry: &crate::Registry, agent: &crate::Agent) -> PathBuf {
        let hosts = self.hosts_dir();
        run(Command::new(crate::agent::clyde_bin()).arg("containerd-config").arg("--hosts-dir").arg(&hosts).args([
            "--registry",
            &registry.addr(),
            "--mirror-url",
            &agent.url(),
        ]));
        hosts
    }

    /// `ctr images pull --hosts-dir DIR REF`; returns whether it succeeded and its output.
    pub fn pull(&self, hosts_dir: &Path, reference: &str, extra: &[&str]) -> (bool, String) {
        let mut args = vec!["images", "pull", "--hosts-dir", hosts_dir.to_str().expect("utf8")];
        args.extend(extra);
        args.push(reference);
        let out = self.ctr(&args).output().expect("ctr");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    /// Removes an image and its content (garbage collected synchronously).
    pub fn remove(&self, reference: &str) {
        run(&mut self.ctr(&["images", "rm", "--sync", reference]));
    }

    /// Digests in the content store.
    pub fn content(&self) -> Vec<String> {
        run(&mut self.ctr(&["content", "ls", "--quiet"])).lines().map(str::to_string).collect()
    }

    /// The target digest of an image, as `ctr images ls` shows it.
    pub fn image_digest(&self, reference: &str) -> Option<String> {
        let out = run(&mut self.ctr(&["images", "ls"]));
        out.lines()
            .find(|l| l.starts_with(&format!("{reference} ")))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")).map(str::to_string))
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unmount anything containerd left mounted under its root, so the temp dir can go.
        let root = self.dir.path().to_string_lossy().into_owned();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut points: Vec<&str> =
                mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&root)).collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for m in points {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}
