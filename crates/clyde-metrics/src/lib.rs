//! Clyde's metrics, as named in the interface contract (SPEC.md), in one Prometheus
//! registry. Components get a cheap [`Metrics`] handle and count where things happen; the
//! metrics endpoint refreshes the gauges it samples and encodes the registry as text.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use prometheus_client;

/// `api`, `kind`, `status` of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `mirror` or `peer`.
    pub api: String,
    /// `manifest`, `blob` or `other`.
    pub kind: String,
    pub status: String,
}

/// `api` and `kind` of a request, for its duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub api: String,
    pub kind: String,
}

/// `api` and `source` of bytes sent to a client.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabels {
    pub api: String,
    /// `local`, `peer` or `upstream`.
    pub source: String,
}

/// The upstream registry bytes came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
}

/// A check of a client's access to private content: `check` is `client` (credentials asked
/// of a private registry) or `public` (content of a private registry asked for under another
/// name, asked of that registry); `result` is `granted`, `denied` or `unavailable`; `cached`
/// whether a remembered verdict answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccessLabels {
    pub check: String,
    pub result: String,
    pub cached: String,
}

/// Every metric Clyde exports; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Families>,
}

struct Families {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<DurationLabels, Histogram>,
    served_bytes: Family<ServedLabels, Counter>,
    upstream_bytes: Family<RegistryLabels, Counter>,
    peer_fetch_bytes: Counter,
    peers: Gauge,
    store_bytes: Gauge,
    advertised_keys: Gauge,
    prune_runs: Family<PruneLabels, Counter>,
    pruned_images: Family<PruneLabels, Counter>,
    pruned_bytes: Family<PruneLabels, Counter>,
    access_checks: Family<AccessLabels, Counter>,
    peer_pieces: Family<PieceLabels, Counter>,
}

/// What a piece from a peer turned out to be: `verified`, `corrupt`, or `unvouched` (no
/// member's list had its hash; it waits for the whole blob's digest).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PieceLabels {
    pub result: String,
}

/// A scheduled prune rule (its index in `[[retention.prune]]`) and whether it only reports.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PruneLabels {
    pub rule: String,
    pub dry_run: String,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms to about 65 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Metrics {
    /// The metrics, registered in `registry` with the `clyde_` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let families = Families {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            served_bytes: Family::default(),
            upstream_bytes: Family::default(),
            peer_fetch_bytes: Counter::default(),
            peers: Gauge::default(),
            store_bytes: Gauge::default(),
            advertised_keys: Gauge::default(),
            prune_runs: Family::default(),
            pruned_images: Family::default(),
            pruned_bytes: Family::default(),
            access_checks: Family::default(),
            peer_pieces: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("clyde");
        r.register("requests", "Requests answered, by API, kind and status", families.requests.clone());
        r.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer's headers",
            families.request_duration.clone(),
        );
        r.register(
            "served_bytes",
            "Body bytes sent to clients, by API and where they came from",
            families.served_bytes.clone(),
        );
        r.register(
            "upstream_bytes",
            "Blob and manifest bytes received from upstream registries",
            families.upstream_bytes.clone(),
        );
        r.register(
            "peer_fetch_bytes",
            "Blob and manifest bytes received from peers",
            families.peer_fetch_bytes.clone(),
        );
        r.register("peers", "Peers with an open connection", families.peers.clone());
        r.register("store_bytes", "Bytes of complete blobs in the store", families.store_bytes.clone());
        r.register("advertised_keys", "Digests and tags this node advertises", families.advertised_keys.clone());
        r.register("prune_runs", "Runs of scheduled prune rules", families.prune_runs.clone());
        r.register(
            "pruned_images",
            "Images scheduled prunes removed (or, dry runs, would have)",
            families.pruned_images.clone(),
        );
        r.register(
            "pruned_bytes",
            "Bytes scheduled prunes freed (or, dry runs, would have)",
            families.pruned_bytes.clone(),
        );
        r.register(
            "access_checks",
            "Checks of clients' access to private registries' content, by check, result and whether a remembered verdict answered",
            families.access_checks.clone(),
        );
        r.register(
            "peer_pieces",
            "Pieces from peers checked against a member's piece hash, by result",
            families.peer_pieces.clone(),
        );
        Self { inner: Arc::new(families) }
    }

    /// A handle registered nowhere, for components built without an endpoint (tests).
    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }

    /// Counts one run of scheduled prune rule `rule` and what it removed.
    pub fn prune_run(&self, rule: usize, dry_run: bool, images: u64, bytes: u64) {
        let labels = PruneLabels { rule: rule.to_string(), dry_run: dry_run.to_string() };
        self.inner.prune_runs.get_or_create(&labels).inc();
        self.inner.pruned_images.get_or_create(&labels).inc_by(images);
        self.inner.pruned_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// Counts one answered request and its duration.
    pub fn request(&self, api: &str, kind: &str, status: u16, seconds: f64) {
        let labels = RequestLabels { api: api.into(), kind: kind.into(), status: status.to_string() };
        self.inner.requests.get_or_create(&labels).inc();
        let labels = DurationLabels { api: api.into(), kind: kind.into() };
        self.inner.request_duration.get_or_create(&labels).observe(seconds);
    }

    /// The counter of body bytes sent by `api` from `source`.
    pub fn served(&self, api: &str, source: &str) -> Counter {
        self.inner.served_bytes.get_or_create(&ServedLabels { api: api.into(), source: source.into() }).clone()
    }

    /// Counts bytes received from an upstream registry.
    pub fn upstream_bytes(&self, registry: &str, bytes: u64) {
        self.inner.upstream_bytes.get_or_create(&RegistryLabels { registry: registry.into() }).inc_by(bytes);
    }

    /// Counts `n` pieces from peers with the check's `result`.
    pub fn peer_pieces(&self, result: &str, n: usize) {
        if n > 0 {
            self.inner.peer_pieces.get_or_create(&PieceLabels { result: result.into() }).inc_by(n as u64);
        }
    }

    /// Counts one check of a client's access to private content.
    pub fn access_check(&self, check: &str, result: &str, cached: bool) {
        let labels = AccessLabels { check: check.into(), result: result.into(), cached: cached.to_string() };
        self.inner.access_checks.get_or_create(&labels).inc();
    }

    /// Counts bytes received from peers.
    pub fn peer_bytes(&self, bytes: u64) {
        self.inner.peer_fetch_bytes.inc_by(bytes);
    }

    /// Sets the sampled gauges: connected peers, store size, advertised keys.
    pub fn sample(&self, peers: u64, store_bytes: u64, advertised_keys: u64) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.inner.peers.set(clamp(peers));
        self.inner.store_bytes.set(clamp(store_bytes));
        self.inner.advertised_keys.set(clamp(advertised_keys));
    }
}

/// The registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_those_of_the_contract() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.request("mirror", "blob", 200, 0.01);
        m.served("mirror", "upstream").inc_by(10);
        m.upstream_bytes("r.example", 10);
        m.peer_bytes(5);
        m.sample(2, 100, 7);
        let text = encode(&registry);
        for line in [
            "clyde_requests_total{api=\"mirror\",kind=\"blob\",status=\"200\"} 1",
            "clyde_served_bytes_total{api=\"mirror\",source=\"upstream\"} 10",
            "clyde_upstream_bytes_total{registry=\"r.example\"} 10",
            "clyde_peer_fetch_bytes_total 5",
            "clyde_peers 2",
            "clyde_store_bytes 100",
            "clyde_advertised_keys 7",
            "clyde_request_duration_seconds_count{api=\"mirror\",kind=\"blob\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
