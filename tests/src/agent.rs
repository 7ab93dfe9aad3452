//! A `clyde serve` process.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use crate::{Place, http, spawn_logged, wait_for};

/// The `clyde` binary: `$CLYDE_BIN`, or the one built beside the test executable.
pub fn clyde_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CLYDE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // A bench binary sits beside clyde; a test executable one level down, in `deps/`.
    let beside = exe.parent().expect("exe dir");
    let bin = [beside.join("clyde"), beside.parent().map(|p| p.join("clyde")).unwrap_or_default()]
        .into_iter()
        .find(|b| b.is_file())
        .unwrap_or_else(|| beside.join("clyde"));
    assert!(bin.is_file(), "{} is missing: run `cargo build --bin clyde` first (scripts/test does it)", bin.display());
    bin
}

/// A free TCP port on `ip` (bound and released).
/// Ports are picked below Linux's ephemeral range (32768 and up), so no outgoing connection
/// of a concurrent test takes one between this check and the agent's bind.
pub fn free_port_on(ip: &str) -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..1000)
        .map(|_| rng.gen_range(20_000..32_000))
        .find(|port| std::net::TcpListener::bind((ip, *port)).is_ok())
        .expect("no free port")
}

/// A running agent on a loopback address with its own data dir and ports.
pub struct Agent {
    dir: TempDir,
    place: Place,
    ip: String,
    port: u16,
    peer_port: u16,
    p2p_port: u16,
    metrics_port: u16,
    args: Vec<String>,
    child: Option<Child>,
    runs: u32,
    /// The data dir is a tmpfs of this many MiB, unmounted on drop.
    tmpfs_mib: Option<u32>,
    /// A data dir the test made (else one in `dir`).
    data: Option<PathBuf>,
}

impl Agent {
    /// Starts `clyde serve` on 127.0.0.1 with `config` (TOML) and extra flags; waits until
    /// `/v2/` answers.
    pub fn start(config: &str, args: &[&str]) -> Self {
        Self::start_on("127.0.0.1", config, args)
    }

    /// Starts an agent whose every port is on `ip` (a node of a loopback cluster: 127.0.0.x).
    pub fn start_on(ip: &str, config: &str, args: &[&str]) -> Self {
        Self::start_in(&Place::loopback(ip), config, args)
    }

    /// Starts an agent in `place`. On a lab host it runs as on a real node: every address
    /// is the default (mirror on the host's own 127.0.0.1:30021, the rest on 0.0.0.0).
    pub fn start_in(place: &Place, config: &str, args: &[&str]) -> Self {
        Self::start_with(place, config, args, None, None)
    }

    /// Starts an agent on 127.0.0.1 on an existing data dir (one an offline command filled).
    pub fn start_with_data_dir(data: &std::path::Path, config: &str, args: &[&str]) -> Self {
        Self::start_with(&Place::local(), config, args, None, Some(data.to_path_buf()))
    }

    /// Starts an agent on 127.0.0.1 whose data dir is a tmpfs of `size_mib` (a small disk).
    pub fn start_on_tmpfs(config: &str, args: &[&str], size_mib: u32) -> Self {
        Self::start_with(&Place::local(), config, args, Some(size_mib), None)
    }

    fn start_with(place: &Place, config: &str, args: &[&str], tmpfs_mib: Option<u32>, data: Option<PathBuf>) -> Self {
        let dir = tempfile::Builder::new().prefix("clyde-agent").tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.toml"), config).expect("write config");
        let ip = &place.ip;
        let isolated = place.is_isolated();
        let port = |default: u16| if isolated { default } else { free_port_on(ip) };
        let mut a = Self {
            dir,
            place: place.clone(),
            ip: ip.to_string(),
            port: port(30021),
            peer_port: port(30022),
            p2p_port: port(30023),
            metrics_port: port(30024),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            runs: 0,
            tmpfs_mib,
            data,
        };
        if let Some(mib) = tmpfs_mib {
            std::fs::create_dir_all(a.data_dir()).expect("data dir");
            crate::run(
                Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(a.data_dir()),
            );
        }
        // Another test may bind one of the ports first: pick others and try again. (A lab
        // host has its network to itself.)
        for _ in 0..4 {
            if isolated {
                break;
            }
            if a.try_spawn().is_ok() {
                return a;
            }
            (a.port, a.peer_port, a.p2p_port, a.metrics_port) = (port(0), port(0), port(0), port(0));
        }
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        if let Err(status) = self.try_spawn() {
            panic!("clyde exited early with {status}:\n{}", self.log());
        }
    }

    /// Starts the process and waits until it answers; the exit status if it quit, having
    /// logged that it could not listen on one of its ports (anything else panics).
    fn try_spawn(&mut self) -> Result<(), String> {
        self.runs += 1;
        let log = self.dir.path().join(format!("agent.{}.log", self.runs));
        let mut cmd = self.place.command(clyde_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--log-level", "debug"]);
        // No containerd unless the test gives one.
        if !self.args.iter().any(|a| a == "--containerd-socket") {
            cmd.args(["--containerd-socket", ""]);
        }
        // The disk watermark (on by default, 0.9) would make agents evict whenever the test
        // machine's disk is that full: off unless the test sets it.
        if !self.args.iter().any(|a| a == "--disk-high-watermark") {
            cmd.args(["--disk-high-watermark", "0"]);
        }
        if !self.place.is_isolated() {
            cmd.arg("--mirror-addr")
                .arg(self.addr())
                .arg("--peer-addr")
                .arg(self.peer_addr())
                .arg("--p2p-addr")
                .arg(self.p2p_addr())
                .arg("--metrics-addr")
                .arg(format!("{}:{}", self.ip, self.metrics_port));
        }
        cmd.args(&self.args);
        self.child = Some(spawn_logged(&mut cmd, &log));
        // The health port answers once every listener is bound (the mirror may be on a lab
        // host's own loopback, or speak TLS).
        let url = format!("{}/healthz", self.metrics_url());
        let client = http();
        let child = self.child.as_mut().expect("child");
        let exited = wait_for("clyde to answer", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Some(status));
            }
            client.get(&url).send().ok().filter(|r| r.status().is_success()).map(|_| None)
        });
        match exited {
            None => Ok(()),
            Some(status) => {
                self.child = None;
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("cannot listen on") {
                    Err(status.to_string())
                } else {
                    panic!("clyde exited early with {status}:\n{text}");
                }
            }
        }
    }

    /// The mirror's URL, `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The mirror's address, `IP:PORT` (on a lab host, its own `127.0.0.1:30021`).
    pub fn addr(&self) -> String {
        if self.place.is_isolated() {
            return format!("127.0.0.1:{}", self.port);
        }
        format!("{}:{}", self.ip, self.port)
    }

    /// Where it runs.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// Freezes the process (`SIGSTOP`): its sockets still accept, nothing answers.
    pub fn pause(&self) {
        crate::run(Command::new("kill").arg("-STOP").arg(self.pid().expect("running").to_string()));
    }

    /// Thaws a paused process.
    pub fn resume(&self) {
        crate::run(Command::new("kill").arg("-CONT").arg(self.pid().expect("running").to_string()));
    }

    /// The peer server's address, `IP:PORT`.
    pub fn peer_addr(&self) -> String {
        format!("{}:{}", self.ip, self.peer_port)
    }

    /// The libp2p listen multiaddr, which other agents bootstrap from.
    pub fn p2p_addr(&self) -> String {
        format!("/ip4/{}/tcp/{}", self.ip, self.p2p_port)
    }

    /// `http://IP:PORT` of `/healthz`, `/readyz` and `/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.metrics_port)
    }

    /// The status of `/readyz`.
    pub fn readyz(&self) -> u16 {
        http().get(format!("{}/readyz", self.metrics_url())).send().map_or(0, |r| r.status().as_u16())
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        http().get(format!("{}/metrics", self.metrics_url())).send().and_then(|r| r.text()).expect("GET /metrics")
    }

    /// The value of one sample in `/metrics`, by its name and labels as written there
    /// (`clyde_peers`, `clyde_served_bytes_total{api="mirror",source="local"}`); 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `/readyz` says the agent joined the swarm.
    pub fn wait_ready(&self) {
        wait_for("the agent to be ready", Duration::from_secs(30), || (self.readyz() == 200).then_some(()));
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU seconds (user + system) the process used so far, from `/proc`.
    pub fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.pid() else { return 0.0 };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
        let ticks = 100.0; // USER_HZ on Linux
        (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / ticks
    }

    /// The agent's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.data.clone().unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// Kills the process with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        crate::run(Command::new("kill").arg("-TERM").arg(c.id().to_string()));
        c.wait().expect("wait")
    }

    /// Starts it again on the same port and data dir, with new extra flags.
    pub fn restart(&mut self, args: &[&str]) {
        self.kill9();
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        (1..=self.runs)
            .map(|r| std::fs::read_to_string(self.dir.path().join(format!("agent.{r}.log"))).unwrap_or_default())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if self.tmpfs_mib.is_some() {
            let _ = Command::new("umount").arg("-l").arg(self.data_dir()).status();
        }
    }
}
