//! Hosts in network namespaces: every host has its own network stack (so its own
//! `127.0.0.1:30021`), an `eth0` on one bridge, and an address on the lab's /24. The test
//! process reaches every host through a veth of its own on the same bridge.
//!
//! A lab is made of: a namespace holding the bridge, one namespace per host (veth: `eth0`
//! inside, the other end on the bridge), and a link `clabN` in the root namespace with
//! `10.213.N.254`. `N` is the first number whose link name is free, so concurrent labs
//! never share a subnet. Dropping the lab deletes all of it; declare the lab before the
//! parts that run in it, so they stop first.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{require, run};

/// Where a part runs: a network namespace (or the test's own), and the address it listens
/// on that the test process can reach.
#[derive(Clone, Debug)]
pub struct Place {
    /// The namespace, or `None` for the test's own network.
    pub netns: Option<String>,
    /// The address other parts and the test reach it at.
    pub ip: String,
}

impl Place {
    /// The test's own network, on 127.0.0.1.
    pub fn local() -> Self {
        Self::loopback("127.0.0.1")
    }

    /// The test's own network, on a loopback address such as 127.0.0.3.
    pub fn loopback(ip: &str) -> Self {
        Self { netns: None, ip: ip.to_string() }
    }

    /// A command for `program` that runs in this place.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new(ip_bin());
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }

    /// Whether this place has a network of its own (so default ports are free).
    pub fn is_isolated(&self) -> bool {
        self.netns.is_some()
    }

    /// Bytes this lab host has sent on its `eth0` (the kernel's counter, Ethernet headers
    /// included): what really left it, transfers cut short too.
    pub fn tx_bytes(&self) -> u64 {
        let out = crate::run(self.command("cat").arg("/sys/class/net/eth0/statistics/tx_bytes"));
        out.trim().parse().expect("a byte count")
    }
}

fn ip_bin() -> std::path::PathBuf {
    require("ip", "iproute2")
}

fn ip(args: &[&str]) -> String {
    run(Command::new(ip_bin()).args(args))
}

/// A bridge and the hosts on it.
pub struct Lab {
    n: u32,
    bridge_ns: String,
    namespaces: Vec<String>,
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Makes the bridge and the test process's link to it.
    pub fn new() -> Self {
        ip_bin();
        let tag = format!("{}{}", std::process::id() % 100_000, NEXT_LAB.fetch_add(1, Ordering::Relaxed));
        let bridge_ns = format!("clyde{tag}br");
        ip(&["netns", "add", &bridge_ns]);
        let mut lab = Self { n: 0, bridge_ns: bridge_ns.clone(), namespaces: vec![bridge_ns.clone()] };
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        // The first free link name picks the subnet.
        lab.n = (1..250)
            .find(|n| {
                let link = format!("clab{n}");
                Command::new(ip_bin())
                    .args(["link", "add", &link, "type", "veth", "peer", "name", "root", "netns", &bridge_ns])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("no free lab subnet");
        let link = format!("clab{}", lab.n);
        ip(&["addr", "add", &format!("10.213.{}.254/24", lab.n), "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        ip(&["-n", &bridge_ns, "link", "set", "root", "master", "br0", "up"]);
        lab
    }

    /// A new host named `name` with the next address on the lab's subnet.
    pub fn host(&mut self, name: &str) -> Place {
        let index = self.namespaces.len();
        let ns = format!("{}-{name}", self.bridge_ns.trim_end_matches("br"));
        let address = format!("10.213.{}.{index}", self.n);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let port = format!("h{index}");
        ip(&["-n", &self.bridge_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["-n", &self.bridge_ns, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Place { netns: Some(ns), ip: address }
    }

    /// Limits what `place` sends to `rate` (e.g. `200mbit`) with a token bucket on its `eth0`.
    pub fn limit_egress(&self, place: &Place, rate: &str) {
        let ns = place.netns.as_deref().expect("a lab host");
        run(Command::new(require("tc", "iproute2"))
            .args(["-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf"])
            .args(["rate", rate, "burst", "256kb", "latency", "200ms"]));
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(ip_bin()).args(["link", "del", &format!("clab{}", self.n)]).output();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new(ip_bin()).args(["netns", "del", ns]).output();
        }
    }
}

/// A node of a [`LabCluster`]: its own containerd and its own agent, in one lab host.
pub struct LabNode {
    pub ctrd: crate::Containerd,
    pub agent: crate::Agent,
}

/// An upstream registry holding `image` as `REPO:v1` on a lab host of its own, and `n` nodes
/// whose agents joined one swarm (the first is the others' bootstrap peer). Fields drop in
/// order, so the lab goes last.
pub struct LabCluster {
    pub nodes: Vec<LabNode>,
    pub upstream: crate::Registry,
    pub image: crate::TestImage,
    /// `UPSTREAM/REPO:v1`.
    pub reference: String,
    pub lab: Lab,
}

/// The secret a [`LabCluster`]'s agents share.
pub const LAB_SECRET: &str = "lab-cluster-secret-0123456789abcdefghijklmn";

impl LabCluster {
    /// Starts it; `rate` limits the upstream's egress (`tc tbf`), `config` is prepended to
    /// every agent's config file (which then names the upstream as a plain-HTTP registry).
    pub fn start(n: usize, image: crate::TestImage, repo: &str, rate: Option<&str>, config: &str) -> Self {
        let mut lab = Lab::new();
        let up = lab.host("up");
        let upstream = crate::Registry::start_in(&up, &crate::RegistryOptions::default());
        image.push(&upstream, repo, "v1", crate::ImageFormat::Oci);
        if let Some(rate) = rate {
            lab.limit_egress(&up, rate);
        }
        let config = format!("{config}[[registries]]\nname = \"{}\"\nscheme = \"http\"\n", upstream.addr());
        // The members of one cluster, as the deploy artifacts make them: one shared secret.
        let secret = crate::cluster::secret_file(LAB_SECRET);
        let mut nodes: Vec<LabNode> = Vec::new();
        for i in 0..n {
            let place = lab.host(&format!("n{i}"));
            let boot = nodes.first().map(|first| first.agent.p2p_addr());
            let mut args: Vec<&str> = vec!["--cluster-secret-file", secret.as_str()];
            if let Some(b) = boot.as_deref() {
                args.extend(["--bootstrap", b]);
            }
            let agent = crate::Agent::start_in(&place, &config, &args);
            nodes.push(LabNode { ctrd: crate::Containerd::start_in(&place), agent });
        }
        for node in &nodes {
            node.agent.wait_ready();
        }
        let reference = format!("{}/{repo}:v1", upstream.addr());
        Self { nodes, upstream, image, reference, lab }
    }

    /// `ctr images pull` on node `i` through its own mirror: whether it worked, and its output.
    pub fn try_pull(&self, i: usize) -> (bool, String) {
        let node = &self.nodes[i];
        let hosts = node.ctrd.mirror_hosts_dir(&self.upstream, &node.agent);
        node.ctrd.pull(&hosts, &self.reference, &["--plain-http"])
    }

    /// `GET`s a blob of `repo` through node `i`'s own mirror with curl in its namespace;
    /// checks its digest and returns the seconds it took.
    pub fn fetch_blob(&self, i: usize, repo: &str, digest: &str) -> f64 {
        let agent = &self.nodes[i].agent;
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let url = format!("http://{}/v2/{repo}/blobs/{digest}?ns={}", agent.addr(), self.upstream.addr());
        let started = std::time::Instant::now();
        let mut curl = agent.place().command(require("curl", "curl"));
        let status = run(curl.args(["-s", "-o"]).arg(out.path()).args(["-w", "%{http_code}", &url]));
        let took = started.elapsed().as_secs_f64();
        assert_eq!(status.trim(), "200", "GET {url} on node {i}:\n{}", agent.log());
        let bytes = std::fs::read(out.path()).expect("fetched blob");
        assert_eq!(crate::sha256(&bytes), digest, "node {i} served wrong bytes");
        took
    }

    /// Upstream blob bytes sent for the image's layers, from the registry's log.
    pub fn upstream_layer_bytes(&self) -> u64 {
        self.image.layers.iter().map(|l| self.upstream.blob_bytes_served(&l.digest)).sum()
    }
}
