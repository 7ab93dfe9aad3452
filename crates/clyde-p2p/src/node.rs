//! The event loop that owns the swarm.
//!
//! Message flow: commands from [`crate::P2p`] handles and swarm events are handled one at a
//! time in [`EventLoop::run`]. A provider lookup starts a Kademlia query and answers as soon
//! as a found provider has a known peer-server address (a connected, identified peer). A
//! provider that is not connected is dialed; the lookup answers when identify tells us
//! its address. A peer whose last connection closes is forgotten at once, and so is one
//! whose pings have gone unanswered for `ping_timeout` (a hung process keeps its sockets
//! open): dead peers drop out of lookups within seconds although their provider records
//! live on in the DHT until they expire.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::StreamExt;
use libp2p::Transport as _;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::metrics::{Metrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::addr::{agent_version, http_addr, ip_of, parse_peer_port};
use crate::{Command, KAD_PROTOCOL, Network, P2p, P2pConfig, P2pError, Status};

/// Identify's protocol version: nodes of another network do not join ours.
const IDENTIFY_PROTOCOL: &str = "/clyde/id/1.0.0";
/// How long a member walk leaves a departed peer alone.
const DEPARTED_QUIET: Duration = Duration::from_secs(60);
/// Longest a connection may take from TCP to a multiplexed, authenticated session.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys this node may provide; the library's default (1024) is far below a node's content.
const MAX_PROVIDED_KEYS: usize = 1 << 20;
/// Provider records this node keeps for others.
const MAX_RECORDS: usize = 1 << 20;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

struct Connection {
    ip: IpAddr,
    /// When the peer last proved alive on this connection (established, or answered a ping).
    alive_at: Instant,
}

#[derive(Default)]
struct PeerState {
    connections: HashMap<ConnectionId, Connection>,
    listen: Vec<Multiaddr>,
    peer_port: Option<u16>,
}

impl PeerState {
    fn http(&self) -> Option<SocketAddr> {
        let ips: Vec<IpAddr> = self.connections.values().map(|c| c.ip).collect();
        http_addr(&ips, &self.listen, self.peer_port?)
    }
}

struct Lookup {
    reply: Option<oneshot::Sender<Vec<SocketAddr>>>,
    /// Providers being dialed: the lookup answers when one of them is identified.
    waiting: HashSet<PeerId>,
    finished: bool,
}

impl Lookup {
    /// Answers "nobody" once the walk is over and no provider is still being dialed.
    fn settle_if_exhausted(&mut self) {
        if self.finished
            && self.waiting.is_empty()
            && let Some(reply) = self.reply.take()
        {
            let _ = reply.send(Vec::new());
        }
    }
}

/// A walk for every provider of a key (the intents of an election).
struct MemberLookup {
    found: std::sync::Arc<std::sync::Mutex<Vec<clyde_resolver::Member>>>,
    done: Option<oneshot::Sender<()>>,
    /// Providers being dialed: added once identified.
    waiting: HashSet<PeerId>,
    finished: bool,
}

impl MemberLookup {
    fn add(&self, peer: PeerId, http: SocketAddr) {
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        let id = peer.to_bytes();
        if !found.iter().any(|m| m.id == id) {
            found.push(clyde_resolver::Member { id, addr: http });
        }
    }

    fn settle_if_exhausted(&mut self) {
        if self.finished
            && self.waiting.is_empty()
            && let Some(done) = self.done.take()
        {
            let _ = done.send(());
        }
    }
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// A connection whose pings have gone unanswered this long is dead.
    ping_timeout: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
    peers: HashMap<PeerId, PeerState>,
    lookups: HashMap<QueryId, Lookup>,
    member_lookups: HashMap<QueryId, MemberLookup>,
    /// Peers whose last connection ended, and when: a member walk does not dial them for
    /// [`DEPARTED_QUIET`] (a dead node's provider records outlive it, and a dial to a hung
    /// one would hold the walk to its timeout). One that comes back dials us itself.
    departed: HashMap<PeerId, Instant>,
    /// Provided keys, with the holders (bits of [`crate::Holder`]) that hold each.
    provided: HashMap<RecordKey, u8>,
    bootstrapped: bool,
    metrics: Option<Metrics>,
}

fn build_swarm(keypair: Keypair, network: &Network, config: &P2pConfig) -> Result<Swarm<Behaviour>, P2pError> {
    let transport_err = |e: &dyn std::fmt::Display| P2pError::Transport(e.to_string());
    let keys = crate::pnet::Keys::new(network.psks.clone());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            // The private network comes first: without the secret, nothing else is said.
            let sealed = tcp.and_then(move |socket, endpoint| {
                let keys = keys.clone();
                async move {
                    match (&keys, endpoint.is_dialer()) {
                        (None, _) => Ok(crate::pnet::Sealed::plain(socket)),
                        (Some(keys), true) => crate::pnet::dial(socket, keys).await,
                        (Some(keys), false) => crate::pnet::accept(socket, keys).await.inspect_err(|e| {
                            tracing::debug!(error = %e, remote = ?endpoint.get_remote_address(), "p2p connection refused");
                        }),
                    }
                }
            });
            Ok(sealed
                .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .timeout(HANDSHAKE_TIMEOUT))
        })
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_config
                .set_provider_record_ttl(Some(config.provider_ttl))
                .set_provider_publication_interval(Some(config.republish_interval))
                .set_query_timeout(Duration::from_secs(10))
                .set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
            let store_config = MemoryStoreConfig {
                max_records: MAX_RECORDS,
                max_provided_keys: MAX_PROVIDED_KEYS,
                ..MemoryStoreConfig::default()
            };
            let store = MemoryStore::with_config(peer_id, store_config);
            let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
            // Pods have no confirmed external address: serve the DHT regardless.
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(agent_version(network.peer_port))
                    .with_push_listen_addr_updates(true),
            );
            let ping = ping::Behaviour::new(
                ping::Config::new().with_interval(config.ping_interval).with_timeout(config.ping_timeout),
            );
            Behaviour { kad, identify, ping }
        })
        .map_err(|e| transport_err(&e))?
        // Peers stay connected while idle: a live connection is how we know a peer is alive.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(24 * 3600)))
        .build();
    Ok(swarm)
}

impl EventLoop {
    pub(crate) fn new(
        keypair: Keypair,
        network: &Network,
        config: &P2pConfig,
        commands: mpsc::UnboundedReceiver<Command>,
        metrics: Option<Metrics>,
    ) -> Result<Self, P2pError> {
        let mut swarm = build_swarm(keypair, network, config)?;
        for addr in &network.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| P2pError::Listen { addr: addr.to_string(), reason: e.to_string() })?;
        }
        Ok(Self {
            swarm,
            ping_timeout: config.ping_timeout,
            commands,
            peers: HashMap::new(),
            lookups: HashMap::new(),
            member_lookups: HashMap::new(),
            departed: HashMap::new(),
            provided: HashMap::new(),
            bootstrapped: false,
            metrics,
        })
    }

    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                _ = sweep.tick() => self.sweep(),
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Drops abandoned lookups, and declares dead the connections whose pings have gone
    /// unanswered too long (the library reports a failing ping only after a second one).
    fn sweep(&mut self) {
        self.lookups.retain(|_, l| l.reply.as_ref().is_some_and(|r| !r.is_closed()));
        self.member_lookups.retain(|_, l| l.done.as_ref().is_some_and(|d| !d.is_closed()));
        let now = Instant::now();
        self.departed.retain(|_, at| now.duration_since(*at) < DEPARTED_QUIET);
        let silent: Vec<(PeerId, ConnectionId)> = self
            .peers
            .iter()
            .flat_map(|(p, s)| s.connections.iter().map(move |(id, c)| (*p, *id, c.alive_at)))
            .filter(|(_, _, alive_at)| now.duration_since(*alive_at) > self.ping_timeout)
            .map(|(p, id, _)| (p, id))
            .collect();
        for (peer, connection) in silent {
            self.declare_dead(peer, connection, "stopped answering pings");
        }
    }

    /// Forgets a connection at once (so lookups stop offering the peer) and closes it.
    fn declare_dead(&mut self, peer_id: PeerId, connection: ConnectionId, why: &str) {
        self.forget_connection(peer_id, connection, why);
        self.swarm.close_connection(connection);
    }

    fn forget_connection(&mut self, peer_id: PeerId, connection: ConnectionId, why: &str) {
        let Some(state) = self.peers.get_mut(&peer_id) else {
            return;
        };
        if state.connections.remove(&connection).is_some() && state.connections.is_empty() {
            self.peers.remove(&peer_id);
            self.departed.insert(peer_id, Instant::now());
            tracing::info!(%peer_id, why, "peer disconnected");
        }
    }

    fn provide(&mut self, key: &clyde_types::ContentKey, holder: crate::Holder) {
        let record = RecordKey::new(&key.routing_key());
        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(record.clone()) {
            tracing::warn!(%key, error = %e, "cannot advertise");
            return;
        }
        *self.provided.entry(record).or_default() |= holder.bit();
    }

    fn withdraw(&mut self, record: RecordKey, holder: crate::Holder) {
        let Some(holders) = self.provided.get_mut(&record) else { return };
        *holders &= !holder.bit();
        if *holders == 0 {
            self.swarm.behaviour_mut().kad.stop_providing(&record);
            self.provided.remove(&record);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Provide(key, holder) => self.provide(&key, holder),
            Command::Withdraw(key, holder) => self.withdraw(RecordKey::new(&key.routing_key()), holder),
            Command::HoldsOnly(keys, holder) => {
                let held: HashSet<RecordKey> = keys.iter().map(|k| RecordKey::new(&k.routing_key())).collect();
                let gone: Vec<RecordKey> = self
                    .provided
                    .iter()
                    .filter(|(record, holders)| *holders & holder.bit() != 0 && !held.contains(*record))
                    .map(|(record, _)| record.clone())
                    .collect();
                for record in gone {
                    self.withdraw(record, holder);
                }
                for key in &keys {
                    self.provide(key, holder);
                }
            }
            Command::FindProviders { key, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(RecordKey::new(&key.routing_key()));
                self.lookups.insert(id, Lookup { reply: Some(reply), waiting: HashSet::new(), finished: false });
            }
            Command::FindMembers { key, found, done } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(RecordKey::new(&key.routing_key()));
                let lookup = MemberLookup { found, done: Some(done), waiting: HashSet::new(), finished: false };
                self.member_lookups.insert(id, lookup);
            }
            Command::Dial(addr) => self.dial(addr),
            Command::Departed(ip) => {
                let gone: Vec<(PeerId, Vec<ConnectionId>)> = self
                    .peers
                    .iter()
                    .filter(|(_, state)| state.connections.values().any(|c| c.ip == ip))
                    .map(|(id, state)| (*id, state.connections.keys().copied().collect()))
                    .collect();
                for (peer, connections) in gone {
                    for connection in connections {
                        self.declare_dead(peer, connection, "left the cluster");
                    }
                    self.swarm.behaviour_mut().kad.remove_peer(&peer);
                }
            }
            Command::Status(reply) => {
                let _ = reply.send(Status {
                    connected_peers: self.peers.values().filter(|p| !p.connections.is_empty()).count(),
                    addressable_peers: self.peers.values().filter(|p| p.http().is_some()).count(),
                    provided_keys: self.provided.len(),
                    listen_addrs: self.swarm.listeners().cloned().collect(),
                });
            }
        }
    }

    fn dial(&mut self, addr: Multiaddr) {
        let peer = addr.iter().find_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        });
        if peer == Some(*self.swarm.local_peer_id()) || self.is_own_address(&addr) {
            return;
        }
        if let Some(peer) = peer {
            if self.swarm.is_connected(&peer) {
                return;
            }
            let without_id: Multiaddr = addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
            self.swarm.behaviour_mut().kad.add_address(&peer, without_id);
        } else if self.is_connected_to(&addr) {
            return;
        }
        if let Err(e) = self.swarm.dial(addr.clone()) {
            tracing::debug!(%addr, error = %e, "dial failed");
        }
    }

    /// Whether `addr` is one this node listens on (a headless Service lists this node too).
    fn is_own_address(&self, addr: &Multiaddr) -> bool {
        let bare: Multiaddr = addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
        self.swarm.listeners().any(|l| *l == bare)
    }

    /// Whether some connection's remote IP is the IP of `addr`.
    fn is_connected_to(&self, addr: &Multiaddr) -> bool {
        let Some(ip) = ip_of(addr) else {
            return false;
        };
        self.peers.values().any(|p| p.connections.values().any(|c| c.ip == ip))
    }

    fn record(&self, event: &SwarmEvent<BehaviourEvent>) {
        let Some(m) = &self.metrics else {
            return;
        };
        m.record(event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => m.record(e),
            _ => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(%address, "p2p listening"),
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                if let Some(ip) = ip_of(remote) {
                    let connection = Connection { ip, alive_at: Instant::now() };
                    self.peers.entry(peer_id).or_default().connections.insert(connection_id, connection);
                    self.departed.remove(&peer_id);
                }
                tracing::debug!(%peer_id, %remote, "peer connected");
                if !self.bootstrapped {
                    self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, cause, .. } => {
                // Forgotten at once: lookups stop offering it until it is reached again.
                let why = cause.map_or_else(|| "closed".to_string(), |c| c.to_string());
                self.forget_connection(peer_id, connection_id, &why);
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                tracing::debug!(%peer_id, %error, "cannot reach peer");
                self.give_up_waiting(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                self.on_identified(peer_id, info);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, connection, result })) => match result {
                Ok(_) => {
                    if let Some(c) = self.peers.get_mut(&peer).and_then(|s| s.connections.get_mut(&connection)) {
                        c.alive_at = Instant::now();
                    }
                }
                Err(e) => self.declare_dead(peer, connection, &format!("ping failed: {e}")),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            _ => {}
        }
    }

    fn on_identified(&mut self, peer_id: PeerId, info: identify::Info) {
        let Some(peer_port) = parse_peer_port(&info.agent_version) else {
            tracing::debug!(%peer_id, agent = info.agent_version, "not a Clyde agent; ignored");
            return;
        };
        let speaks_kad = info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL);
        if speaks_kad {
            for addr in info.listen_addrs.iter().filter(|a| ip_of(a).is_some_and(|ip| !ip.is_unspecified())) {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
            }
        }
        let state = self.peers.entry(peer_id).or_default();
        state.listen = info.listen_addrs;
        state.peer_port = Some(peer_port);
        let Some(http) = state.http() else {
            return;
        };
        tracing::debug!(%peer_id, %http, "peer identified");
        for lookup in self.member_lookups.values_mut() {
            if lookup.waiting.remove(&peer_id) {
                lookup.add(peer_id, http);
                lookup.settle_if_exhausted();
            }
        }
        for lookup in self.lookups.values_mut() {
            if lookup.waiting.remove(&peer_id)
                && let Some(reply) = lookup.reply.take()
            {
                let _ = reply.send(vec![http]);
            }
        }
    }

    fn give_up_waiting(&mut self, peer_id: PeerId) {
        for lookup in self.member_lookups.values_mut() {
            lookup.waiting.remove(&peer_id);
            lookup.settle_if_exhausted();
        }
        self.member_lookups.retain(|_, l| l.done.is_some());
        for lookup in self.lookups.values_mut() {
            lookup.waiting.remove(&peer_id);
            lookup.settle_if_exhausted();
        }
        self.lookups.retain(|_, l| l.reply.is_some());
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed { id, result: QueryResult::GetProviders(result), step, .. } = event
        else {
            return;
        };
        if self.member_lookups.contains_key(&id) {
            self.on_member_lookup_progress(id, result, step.last);
            return;
        }
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = &result {
            let local = *self.swarm.local_peer_id();
            let mut ready = Vec::new();
            for provider in providers.iter().filter(|p| **p != local) {
                match self.peers.get(provider).and_then(PeerState::http) {
                    Some(http) => ready.push(http),
                    None if lookup.waiting.insert(*provider) => {
                        let _ = self.swarm.dial(DialOpts::peer_id(*provider).build());
                    }
                    None => {}
                }
            }
            if !ready.is_empty() {
                if let Some(reply) = lookup.reply.take() {
                    let _ = reply.send(ready);
                }
                // Answered: the rest of the walk would only cost messages.
                if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                    query.finish();
                }
            }
        }
        if step.last {
            lookup.finished = true;
            lookup.settle_if_exhausted();
        }
        if lookup.reply.is_none() {
            self.lookups.remove(&id);
        }
    }
}

impl EventLoop {
    fn on_member_lookup_progress(&mut self, id: QueryId, result: kad::GetProvidersResult, last: bool) {
        let local = *self.swarm.local_peer_id();
        let Some(lookup) = self.member_lookups.get_mut(&id) else { return };
        if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = &result {
            for provider in providers.iter().filter(|p| **p != local) {
                match self.peers.get(provider).and_then(PeerState::http) {
                    Some(http) => lookup.add(*provider, http),
                    None if self.departed.contains_key(provider) => {}
                    None if lookup.waiting.insert(*provider) => {
                        let _ = self.swarm.dial(DialOpts::peer_id(*provider).build());
                    }
                    None => {}
                }
            }
        }
        if last {
            lookup.finished = true;
            lookup.settle_if_exhausted();
        }
        if lookup.done.is_none() {
            self.member_lookups.remove(&id);
        }
    }
}

/// Resolves `NAME:PORT` names now and every `interval`, and dials every address found
/// (a headless Service's records are the agents of the cluster).
pub(crate) async fn resolve_dns_forever(
    names: Vec<String>,
    interval: Duration,
    node: P2p,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        for name in &names {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => {
                    for addr in addrs {
                        node.dial_addr(addr);
                    }
                }
                Err(e) => tracing::warn!(name, error = %e, "cannot resolve bootstrap name"),
            }
        }
    }
}
