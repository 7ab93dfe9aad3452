//! Peer discovery from Kubernetes: watches the EndpointSlices of Clyde's headless Service,
//! so a node that joins is dialed, and one that leaves is forgotten, the moment the API
//! server says so (DNS re-resolution, the other way, sees it on its next interval).
//!
//! Message flow: [`follow`] runs a kube-runtime watcher (list, then watch, relisting and
//! backing off on errors) over the slices labelled `kubernetes.io/service-name=<service>`.
//! It keeps the addresses of every slice, and after each change tells a [`PeerSink`] which
//! addresses joined and which departed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch as signal;

/// The Service whose endpoints are peers: `namespace/name:port` (the port is the libp2p one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

/// Why a service reference or the cluster connection is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid --bootstrap-kubernetes {0:?}: expected NAMESPACE/SERVICE:PORT, e.g. clyde/clyde-peers:30023")]
    BadService(String),
    #[error("cannot reach the Kubernetes API (in-cluster config or kubeconfig): {0}")]
    Client(String),
}

impl ServiceRef {
    /// Parses `namespace/name:port`.
    pub fn parse(s: &str) -> Result<Self, KubeError> {
        let bad = || KubeError::BadService(s.chars().take(80).collect());
        let (namespace, rest) = s.split_once('/').ok_or_else(bad)?;
        let (name, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let dns_label = |v: &str| {
            !v.is_empty()
                && v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-')
        };
        if !dns_label(namespace) || !dns_label(name) {
            return Err(bad());
        }
        let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?;
        Ok(Self { namespace: namespace.to_string(), name: name.to_string(), port })
    }
}

/// Where joins and departures go (the p2p node).
pub trait PeerSink: Send + Sync {
    /// A peer's address appeared among the Service's endpoints.
    fn joined(&self, addr: SocketAddr);
    /// A peer's address is no longer among them.
    fn departed(&self, ip: IpAddr);
}

/// The addresses of a slice worth dialing: every endpoint that is not terminating (not-ready
/// ones too: an agent is ready only once it joined, so the Service publishes them).
fn addresses(slice: &EndpointSlice) -> BTreeSet<IpAddr> {
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.terminating) != Some(true))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect()
}

fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// The Service's endpoints as last seen, by slice.
#[derive(Default)]
pub struct Endpoints {
    slices: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Slices of a relist in progress.
    relisting: Option<BTreeMap<String, BTreeSet<IpAddr>>>,
}

impl Endpoints {
    fn all(&self) -> BTreeSet<IpAddr> {
        self.slices.values().flatten().copied().collect()
    }

    /// Applies a watcher event; returns the addresses that joined and those that departed.
    pub fn apply(&mut self, event: Event<EndpointSlice>) -> (Vec<IpAddr>, Vec<IpAddr>) {
        let before = self.all();
        match event {
            Event::Apply(s) => {
                self.slices.insert(slice_name(&s), addresses(&s));
            }
            Event::Delete(s) => {
                self.slices.remove(&slice_name(&s));
            }
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(s) => {
                self.relisting.get_or_insert_with(BTreeMap::new).insert(slice_name(&s), addresses(&s));
            }
            Event::InitDone => {
                if let Some(slices) = self.relisting.take() {
                    self.slices = slices;
                }
            }
        }
        let after = self.all();
        (after.difference(&before).copied().collect(), before.difference(&after).copied().collect())
    }
}

/// A client from the in-cluster service account (or a kubeconfig outside a cluster).
pub async fn client() -> Result<Client, KubeError> {
    Client::try_default().await.map_err(|e| KubeError::Client(e.to_string()))
}

/// Watches the Service's EndpointSlices until `shutdown`, telling `sink` who joined and
/// who left.
pub async fn follow(client: Client, service: ServiceRef, sink: impl PeerSink, mut shutdown: signal::Receiver<bool>) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &service.namespace);
    let config = watcher::Config::default().labels(&format!("kubernetes.io/service-name={}", service.name));
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut endpoints = Endpoints::default();
    tracing::info!(namespace = %service.namespace, service = %service.name, "watching the Service's EndpointSlices for peers");
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match event {
            Some(Ok(event)) => {
                let (joined, departed) = endpoints.apply(event);
                for ip in joined {
                    tracing::info!(%ip, "peer joined the Service");
                    sink.joined(SocketAddr::new(ip, service.port));
                }
                for ip in departed {
                    tracing::info!(%ip, "peer left the Service");
                    sink.departed(ip);
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "EndpointSlice watch failed; retrying"),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests;
