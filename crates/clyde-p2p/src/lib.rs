//! Clyde's libp2p node: every agent advertises the digests and tags it holds in a private
//! Kademlia DHT, and finds the peer servers that hold what it needs.
//!
//! Message flow: [`P2p::start`] spawns the node's event loop ([`node`]), which owns the
//! swarm; the rest of the program holds a [`P2p`] handle that sends it commands, with a
//! `oneshot` reply where an answer is needed. An advertiser task ([`advertise`]) follows the
//! store's events and tells the node what to provide and withdraw. A DNS task re-resolves
//! `--bootstrap-dns` names and asks the node to dial what it finds. The resolver sees the
//! node only through [`clyde_resolver::Discovery`].

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod addr;
mod advertise;
mod keyfile;
mod node;
mod pnet;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use clyde_resolver::{BoxFuture, Discovery, Member};
use clyde_store::Store;
use clyde_types::ContentKey;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

pub use addr::{http_addr, parse_peer_port};
pub use advertise::KeyFeed;

/// The Kademlia protocol name: private, so Clyde's DHT never mixes with another network's.
pub const KAD_PROTOCOL: &str = "/clyde/kad/1.0.0";

/// How the node behaves; every field has a documented default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2pConfig {
    /// How long other nodes keep a provider record without it being republished (default 10m).
    #[serde(with = "humantime_serde")]
    pub provider_ttl: Duration,
    /// How often this node republishes what it holds (default 4m).
    #[serde(with = "humantime_serde")]
    pub republish_interval: Duration,
    /// How often `bootstrap_dns` names are resolved again (default 30s).
    #[serde(with = "humantime_serde")]
    pub dns_interval: Duration,
    /// Interval of the liveness ping on each peer connection (default 2s).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection whose pings have gone unanswered this long is closed and its peer
    /// forgotten (default 5s).
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            provider_ttl: Duration::from_secs(600),
            republish_interval: Duration::from_secs(240),
            dns_interval: Duration::from_secs(30),
            ping_interval: Duration::from_secs(2),
            ping_timeout: Duration::from_secs(5),
        }
    }
}

/// Where the node listens and whom it joins.
#[derive(Clone, Debug)]
pub struct Network {
    /// libp2p listen multiaddrs.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start; `/p2p/<id>` optional.
    pub bootstrap: Vec<Multiaddr>,
    /// `NAME:PORT` names whose every address is a peer to dial.
    pub bootstrap_dns: Vec<String>,
    /// Whether peers are also told by Kubernetes ([`P2p::dial`] and [`P2p::departed`]).
    pub kubernetes: bool,
    /// The port of this node's peer server, told to other nodes through identify.
    pub peer_port: u16,
    /// The private network's pre-shared keys (from the cluster secrets), the one in use
    /// first; empty: an open network, as without `--cluster-secret-file`.
    pub psks: Vec<[u8; 32]>,
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("the node key {path} is unusable ({reason}); remove it to make a new one")]
    Key { path: String, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("the p2p transport could not be built: {0}")]
    Transport(String),
    #[error("bad multiaddr {0:?}: {1}")]
    Multiaddr(String, String),
}

/// What the node knows about the swarm, for `/readyz` and logs.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Peers with at least one open connection.
    pub connected_peers: usize,
    /// Of those, peers whose peer server address is known.
    pub addressable_peers: usize,
    /// Keys this node provides.
    pub provided_keys: usize,
    /// Addresses the node listens on.
    pub listen_addrs: Vec<Multiaddr>,
}

/// Who on this node holds advertised content: a key is withdrawn once no holder has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Clyde's own store.
    Store,
    /// containerd's content store.
    Containerd,
    /// The resolver, for the intents of the fetcher election (not content).
    Election,
}

impl Holder {
    pub(crate) fn bit(self) -> u8 {
        match self {
            Self::Store => 1,
            Self::Containerd => 2,
            Self::Election => 4,
        }
    }
}

pub(crate) enum Command {
    Provide(ContentKey, Holder),
    Withdraw(ContentKey, Holder),
    /// Everything a holder holds: provided, and what it no longer holds withdrawn.
    HoldsOnly(Vec<ContentKey>, Holder),
    FindProviders {
        key: ContentKey,
        reply: oneshot::Sender<Vec<SocketAddr>>,
    },
    /// Every live provider of a key, added to `found` as the walk finds them; `done` fires
    /// when the walk is over.
    FindMembers {
        key: ContentKey,
        found: Arc<Mutex<Vec<Member>>>,
        done: oneshot::Sender<()>,
    },
    Dial(Multiaddr),
    Departed(std::net::IpAddr),
    Status(oneshot::Sender<Status>),
}

/// A handle on the running node; cheap to clone.
#[derive(Clone)]
pub struct P2p {
    commands: mpsc::UnboundedSender<Command>,
    peer_id: PeerId,
    alone_by_configuration: bool,
}

/// Parses `--p2p-addr` and `--bootstrap` values.
pub fn parse_multiaddrs(values: &[String]) -> Result<Vec<Multiaddr>, P2pError> {
    values.iter().map(|v| v.parse::<Multiaddr>().map_err(|e| P2pError::Multiaddr(v.clone(), e.to_string()))).collect()
}

impl P2p {
    /// Starts the node with the key in `data_dir` (made on first start), joins the network,
    /// and advertises what `store` holds from now on. libp2p's own metrics go to `registry`
    /// when given. Tasks stop when `shutdown` turns true and are tracked by `tasks`.
    pub async fn start(
        data_dir: &Path,
        network: Network,
        config: P2pConfig,
        store: Store,
        registry: Option<&mut prometheus_client::registry::Registry>,
        tasks: &TaskTracker,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, P2pError> {
        let keypair = keyfile::load_or_create(&data_dir.join("node.key"))?;
        let peer_id = keypair.public().to_peer_id();
        let alone_by_configuration =
            network.bootstrap.is_empty() && network.bootstrap_dns.is_empty() && !network.kubernetes;
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = registry.map(libp2p::metrics::Metrics::new);
        let event_loop = node::EventLoop::new(keypair, &network, &config, rx, metrics)?;
        tracing::info!(%peer_id, listen = ?network.listen, "p2p node started");
        tasks.spawn(event_loop.run(shutdown.clone()));
        let handle = Self { commands: tx, peer_id, alone_by_configuration };
        for addr in network.bootstrap {
            handle.dial(addr);
        }
        if !network.bootstrap_dns.is_empty() {
            tasks.spawn(node::resolve_dns_forever(
                network.bootstrap_dns,
                config.dns_interval,
                handle.clone(),
                shutdown.clone(),
            ));
        }
        // The store's keys are told before the node is handed out: a caller's own
        // `provide`s then come after that first list, never before it.
        let listed = advertise::list(store, Holder::Store, handle.clone()).await;
        tasks.spawn(advertise::follow(listed, shutdown));
        Ok(handle)
    }

    /// Advertises what `feed` holds from now on, as `holder`, until `shutdown`.
    pub fn advertise(&self, feed: impl KeyFeed, holder: Holder, tasks: &TaskTracker, shutdown: watch::Receiver<bool>) {
        tasks.spawn(advertise::run(feed, holder, self.clone(), shutdown));
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Advertises that `holder` on this node holds `key`.
    pub fn provide(&self, key: ContentKey, holder: Holder) {
        let _ = self.commands.send(Command::Provide(key, holder));
    }

    /// Tells everything `holder` holds: each key is provided, and keys advertised for it
    /// that are not in `keys` are withdrawn for it.
    pub fn holds_only(&self, keys: Vec<ContentKey>, holder: Holder) {
        let _ = self.commands.send(Command::HoldsOnly(keys, holder));
    }

    /// Notes that `holder` no longer holds `key`; withdrawn when no holder has it.
    pub fn withdraw(&self, key: ContentKey, holder: Holder) {
        let _ = self.commands.send(Command::Withdraw(key, holder));
    }

    /// Dials a peer address (`/p2p/<id>` optional).
    pub fn dial(&self, addr: Multiaddr) {
        let _ = self.commands.send(Command::Dial(addr));
    }

    /// Dials a peer's libp2p port by address (what DNS and Kubernetes tell).
    pub fn dial_addr(&self, addr: SocketAddr) {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(ip) => Protocol::Ip4(ip),
            std::net::IpAddr::V6(ip) => Protocol::Ip6(ip),
        };
        self.dial(Multiaddr::empty().with(ip).with(Protocol::Tcp(addr.port())));
    }

    /// Forgets the peers at `ip` at once (it left the cluster): its connections close and
    /// it leaves the routing table, so lookups stop offering it.
    pub fn departed(&self, ip: std::net::IpAddr) {
        let _ = self.commands.send(Command::Departed(ip));
    }

    /// What the node knows now.
    pub async fn status(&self) -> Status {
        let (reply, rx) = oneshot::channel();
        if self.commands.send(Command::Status(reply)).is_err() {
            return Status::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Whether the node is part of a swarm, or alone because nobody was configured to join.
    pub async fn joined(&self) -> bool {
        self.alone_by_configuration || self.status().await.connected_peers > 0
    }

    /// Every connected node that provides `key` (this node left out), as many as the DHT walk
    /// finds within `timeout`.
    pub async fn find_members(&self, key: ContentKey, timeout: Duration) -> Vec<Member> {
        let found = Arc::new(Mutex::new(Vec::new()));
        let (done, rx) = oneshot::channel();
        if self.commands.send(Command::FindMembers { key, found: found.clone(), done }).is_err() {
            return Vec::new();
        }
        let _ = tokio::time::timeout(timeout, rx).await;
        let found = found.lock().unwrap_or_else(|p| p.into_inner());
        found.clone()
    }

    /// The peer servers that hold `key`, as soon as some are known, within `timeout`.
    pub async fn find_providers(&self, key: ContentKey, timeout: Duration) -> Vec<SocketAddr> {
        let (reply, rx) = oneshot::channel();
        if self.commands.send(Command::FindProviders { key, reply }).is_err() {
            return Vec::new();
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(found)) => found,
            _ => Vec::new(),
        }
    }
}

impl Discovery for P2p {
    fn providers(&self, key: ContentKey, timeout: Duration) -> BoxFuture<Vec<SocketAddr>> {
        let handle = self.clone();
        Box::pin(async move { handle.find_providers(key, timeout).await })
    }

    fn members(&self, key: ContentKey, timeout: Duration) -> BoxFuture<Vec<Member>> {
        let handle = self.clone();
        Box::pin(async move { handle.find_members(key, timeout).await })
    }

    fn local_id(&self) -> Vec<u8> {
        self.peer_id.to_bytes()
    }

    fn connected_peers(&self) -> BoxFuture<usize> {
        let handle = self.clone();
        Box::pin(async move { handle.status().await.connected_peers })
    }

    fn announce(&self, key: ContentKey) {
        self.provide(key, Holder::Election);
    }

    fn retract(&self, key: ContentKey) {
        self.withdraw(key, Holder::Election);
    }
}

#[cfg(test)]
mod tests;
