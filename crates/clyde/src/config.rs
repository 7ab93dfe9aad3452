//! The agent's configuration: one serde type shared by the TOML file and the flags.
//! Flags override the file; the file overrides the defaults written here.

use std::path::PathBuf;
use std::time::Duration;

use clyde_upstream::RegistryConfig;
use serde::Deserialize;

/// Default config file, read when it exists.
pub const DEFAULT_CONFIG: &str = "/etc/clyde/config.toml";

/// Everything `clyde serve` can be told, with its default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where blobs and metadata live (`/var/lib/clyde`).
    pub data_dir: PathBuf,
    /// `error`, `warn`, `info` (default), `debug`, `trace`, or a tracing filter.
    pub log_level: String,
    /// `text` (default) or `json`.
    pub log_format: String,
    /// The OCI API for containerd (`127.0.0.1:30021`).
    pub mirror_addr: String,
    /// The HTTP port peers fetch from (`0.0.0.0:30022`).
    pub peer_addr: String,
    /// The port other nodes reach the peer server at, when it is not `peer_addr`'s (a
    /// `hostPort` or NAT mapping); none: `peer_addr`'s.
    pub peer_advertise_port: Option<u16>,
    /// libp2p listen multiaddrs (`/ip4/0.0.0.0/tcp/30023`).
    pub p2p_addr: Vec<String>,
    /// `/metrics`, `/healthz`, `/readyz` (`0.0.0.0:30024`).
    pub metrics_addr: String,
    /// Peer multiaddrs to join.
    pub bootstrap: Vec<String>,
    /// `NAME:PORT` of a headless Service whose records are peers.
    pub bootstrap_dns: Vec<String>,
    /// `NAMESPACE/SERVICE:PORT` of a Service whose EndpointSlices are peers (watched).
    pub bootstrap_kubernetes: Vec<String>,
    /// `pull-through` (default) or `p2p-only`.
    pub mode: String,
    /// Never contact the upstream.
    pub air_gapped: bool,
    /// Evict least-recently-used blobs above this many bytes.
    pub cache_max_bytes: Option<u64>,
    /// Peer responses with a body in flight at once; more are answered `429` (64).
    pub max_uploads: usize,
    /// Connections each of the mirror and peer ports serves at once; more wait in the
    /// kernel's accept queue (8192; 0: no bound).
    pub max_connections: usize,
    /// Blob transfers running at once; more wait for one to end (512; 0: no bound).
    pub max_transfers: usize,
    /// Bytes per second the peer server sends, all peers together; 0: no limit (500 MiB/s).
    pub upload_rate: u64,
    /// Evict when the data dir's disk is fuller than this fraction (0.9); 0 or 1 disables.
    pub disk_high_watermark: f64,
    /// A partial blob nothing was written to for this long is removed (`24h`); 0 disables.
    #[serde(with = "humantime_serde")]
    pub partial_ttl: Duration,
    /// containerd's socket (`/run/containerd/containerd.sock`); empty disables.
    pub containerd_socket: String,
    /// The containerd namespace whose content is shared (`k8s.io`).
    pub containerd_namespace: String,
    /// containerd's content directory, read directly when present; empty: read over gRPC
    /// (`/var/lib/containerd/io.containerd.content.v1.content`).
    pub containerd_content_dir: String,
    /// Piece size in bytes (4 MiB).
    pub piece_size: u64,
    /// How long a tag is served before it is re-checked upstream (`5m`).
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Re-check `latest` on every request.
    pub always_pull_latest: bool,
    /// Bound on the `HEAD` that re-checks a tag (`800ms`; past it the cached tag is served).
    #[serde(with = "humantime_serde")]
    pub tag_check_timeout: Duration,
    /// Upstream connect timeout (`3s`).
    #[serde(with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// Longest upstream silence mid-answer (`10s`).
    #[serde(with = "humantime_serde")]
    pub upstream_read_timeout: Duration,
    /// Longest wait for an upstream answer's head, token exchange and retries included (`3s`).
    #[serde(with = "humantime_serde")]
    pub upstream_response_timeout: Duration,
    /// Whether a blob read only by ranges is fetched whole in the background: `off`
    /// (default), `idle` or `eager`.
    pub fill: clyde_resolver::FillPolicy,
    /// A file of image references (one per line) loaded at start while serving.
    pub preload_images: Option<PathBuf>,
    /// Upstream registries with their endpoint, auth and TLS.
    pub registries: Vec<RegistryConfig>,
    /// Provider lookups and peer transfers (`[peers]`).
    pub peers: clyde_resolver::PeerTimeouts,
    /// The DHT: provider TTL, republishing, DNS re-resolution, liveness pings (`[p2p]`).
    pub p2p: clyde_p2p::P2pConfig,
    /// TLS on the mirror port, optionally mutual (`[mirror_tls]`); none: plain HTTP.
    pub mirror_tls: Option<clyde_api::ServerTls>,
    /// Mutual TLS between agents' peer ports (`[peer_tls]`); none: plain HTTP.
    pub peer_tls: Option<clyde_upstream::PeerTls>,
    /// What the store keeps whatever eviction wants (`[retention]`).
    pub retention: Retention,
    /// Files holding the cluster's shared secret, the one in use first (`--cluster-secret-file`,
    /// repeatable for a rotation); none: an open cluster.
    pub cluster_secret_file: Vec<PathBuf>,
}

/// `[retention]`: pinned images, minimum copies of them across the cluster, scheduled prunes.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Regular expressions over image names (`registry/repo:tag`), as `clyde prune --pattern`.
    pub pinned: Vec<String>,
    /// Nodes that hold every blob of every pinned image, kept by the cluster (none: no
    /// minimum).
    pub min_copies: Option<usize>,
    /// How often a node counts the copies (`10s`).
    #[serde(with = "humantime_serde")]
    pub copies_interval: Duration,
    /// `[[retention.prune]]`: prunes the agent runs on a schedule.
    pub prune: Vec<PruneRule>,
}

impl Default for Retention {
    fn default() -> Self {
        Self { pinned: Vec::new(), min_copies: None, copies_interval: Duration::from_secs(10), prune: Vec::new() }
    }
}

/// One scheduled prune: the selectors of `clyde prune` (all that are given must hold), run
/// every `every`; pinned images are never removed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRule {
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// Images last pulled longer ago than this.
    #[serde(default, with = "humantime_serde")]
    pub accessed_before: Option<Duration>,
    /// Images first cached longer ago than this.
    #[serde(default, with = "humantime_serde")]
    pub created_before: Option<Duration>,
    /// Regular expressions over image names; any match selects.
    #[serde(default)]
    pub pattern: Vec<String>,
    /// At most this many images per run, least recently pulled first.
    pub max_images: Option<usize>,
    /// Only log and count what would go.
    #[serde(default)]
    pub dry_run: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/clyde"),
            log_level: "info".into(),
            log_format: "text".into(),
            mirror_addr: "127.0.0.1:30021".into(),
            peer_addr: "0.0.0.0:30022".into(),
            peer_advertise_port: None,
            p2p_addr: vec!["/ip4/0.0.0.0/tcp/30023".into()],
            metrics_addr: "0.0.0.0:30024".into(),
            bootstrap: Vec::new(),
            bootstrap_dns: Vec::new(),
            bootstrap_kubernetes: Vec::new(),
            mode: "pull-through".into(),
            air_gapped: false,
            cache_max_bytes: None,
            max_uploads: clyde_api::UploadLimits::default().max_uploads,
            upload_rate: clyde_api::UploadLimits::default().upload_rate,
            disk_high_watermark: 0.9,
            partial_ttl: Duration::from_secs(24 * 3600),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            containerd_namespace: "k8s.io".into(),
            containerd_content_dir: "/var/lib/containerd/io.containerd.content.v1.content".into(),
            piece_size: clyde_types::piece::DEFAULT_PIECE_SIZE,
            tag_ttl: Duration::from_secs(300),
            always_pull_latest: false,
            tag_check_timeout: Duration::from_millis(800),
            upstream_connect_timeout: Duration::from_secs(3),
            upstream_read_timeout: Duration::from_secs(10),
            upstream_response_timeout: Duration::from_secs(3),
            fill: clyde_resolver::FillPolicy::Off,
            preload_images: None,
            registries: Vec::new(),
            peers: Default::default(),
            p2p: Default::default(),
            mirror_tls: None,
            peer_tls: None,
            retention: Retention::default(),
            max_connections: 8192,
            max_transfers: 512,
            cluster_secret_file: Vec::new(),
        }
    }
}

impl Config {
    /// Whether the upstream is never contacted (`air_gapped`, or `mode = "p2p-only"`).
    pub fn never_upstream(&self) -> bool {
        self.air_gapped || self.mode == "p2p-only"
    }

    /// The upstream client's settings.
    pub fn upstream(&self) -> clyde_upstream::UpstreamConfig {
        clyde_upstream::UpstreamConfig {
            registries: self.registries.clone(),
            connect_timeout: self.upstream_connect_timeout,
            read_timeout: self.upstream_read_timeout,
            response_timeout: self.upstream_response_timeout,
            ..Default::default()
        }
    }

    /// The cluster's secrets, read from their files; `None` without any.
    pub fn membership(&self) -> anyhow::Result<Option<clyde_types::Membership>> {
        let mut secrets = Vec::new();
        for path in &self.cluster_secret_file {
            let text = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read the cluster secret {}: {e}", path.display()))?;
            let secret = clyde_types::ClusterSecret::parse(&text)
                .map_err(|e| anyhow::anyhow!("cluster secret {}: {e}", path.display()))?;
            secrets.push(secret);
        }
        Ok(clyde_types::Membership::new(secrets))
    }

    /// The resolver's settings.
    pub fn resolver(&self) -> clyde_resolver::ResolverConfig {
        clyde_resolver::ResolverConfig {
            air_gapped: self.never_upstream(),
            tag_ttl: self.tag_ttl,
            always_pull_latest: self.always_pull_latest,
            tag_check_timeout: self.tag_check_timeout,
            fill: self.fill,
            peers: self.peers.clone(),
            peer_tls: self.peer_tls.clone(),
            max_transfers: self.max_transfers,
            ..Default::default()
        }
    }

    /// Reads the file named by `--config`, or the default file when it exists, or defaults.
    pub fn load(path: Option<&PathBuf>) -> anyhow::Result<Self> {
        let path = match path {
            Some(p) => p.clone(),
            None if std::path::Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let config: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {} is invalid: {e}", path.display()))?;
        config.check().map_err(|e| anyhow::anyhow!("config {} is invalid: {e}", path.display()))?;
        Ok(config)
    }

    /// What parsing cannot tell: settings this version does not carry out, bad patterns.
    fn check(&self) -> anyhow::Result<()> {
        let r = &self.retention;
        if self.peer_advertise_port == Some(0) {
            anyhow::bail!("peer_advertise_port must be a port (1-65535), or absent: peer_addr's");
        }
        if self.peers.fanout < 2 {
            // A chain: every node waits on the one above it to start, one poll each, and a
            // long herd runs into the follow timeout (the simulator shows it collapse).
            anyhow::bail!("[peers] fanout must be 2 or more");
        }
        if r.min_copies == Some(0) {
            anyhow::bail!("[retention] min_copies must be 1 or more (or absent: no minimum)");
        }
        if r.copies_interval.is_zero() {
            anyhow::bail!("[retention] copies_interval must be more than 0");
        }
        regex::RegexSet::new(&r.pinned).map_err(|e| anyhow::anyhow!("[retention] pinned: {e}"))?;
        for (i, rule) in r.prune.iter().enumerate() {
            let n = i + 1;
            if rule.every.is_zero() {
                anyhow::bail!("[[retention.prune]] rule {n}: every must be more than 0");
            }
            if rule.accessed_before.is_none() && rule.created_before.is_none() && rule.pattern.is_empty() {
                anyhow::bail!(
                    "[[retention.prune]] rule {n}: say what to prune: pattern, accessed_before or created_before"
                );
            }
            regex::RegexSet::new(&rule.pattern).map_err(|e| anyhow::anyhow!("[[retention.prune]] rule {n}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec_keys_and_registries() {
        let c: Config = toml::from_str(
            r#"
            mirror_addr = "127.0.0.1:1"
            air_gapped = true
            tag_ttl = "10s"
            [[registries]]
            name = "reg.example:5000"
            scheme = "http"
            [registries.auth]
            username = "u"
            password = "p"
            [registries.tls]
            insecure_skip_verify = true
            "#,
        )
        .unwrap();
        assert_eq!(c.mirror_addr, "127.0.0.1:1");
        assert!(c.air_gapped);
        assert_eq!(c.tag_ttl, Duration::from_secs(10));
        assert_eq!(c.registries[0].name, "reg.example:5000");
        assert_eq!(c.mode, "pull-through");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("mirrorr_addr = \"x\"").is_err());
    }

    #[test]
    fn retention_pins_and_copies_parse_and_bad_values_are_refused() {
        let c: Config = toml::from_str("[retention]\npinned = [\"reg\\\\.example/team/.*\"]\n").unwrap();
        assert_eq!(c.retention.pinned, ["reg\\.example/team/.*"]);
        assert!(c.check().is_ok());
        let c: Config = toml::from_str(
            "[[retention.prune]]\nevery = \"1d\"\naccessed_before = \"30d\"\nmax_images = 100\ndry_run = true\n",
        )
        .unwrap();
        assert!(c.check().is_ok());
        assert_eq!(c.retention.prune[0].accessed_before, Some(Duration::from_secs(30 * 86400)));
        let c: Config = toml::from_str("[peers]\nfanout = 2\n").unwrap();
        assert!(c.check().is_ok());
        assert_eq!(c.peers.fanout, 2);
        let c: Config = toml::from_str("[retention]\nmin_copies = 2\ncopies_interval = \"5s\"\n").unwrap();
        assert!(c.check().is_ok());
        assert_eq!((c.retention.min_copies, c.retention.copies_interval), (Some(2), Duration::from_secs(5)));
        for refused in [
            "[retention]\nmin_copies = 0\n",
            "[retention]\nmin_copies = 2\ncopies_interval = \"0s\"\n",
            "[[retention.prune]]\nevery = \"1d\"\n",
            "[[retention.prune]]\nevery = \"0s\"\npattern = [\"x\"]\n",
            "[[retention.prune]]\nevery = \"1d\"\npattern = [\"(\"]\n",
            "[retention]\npinned = [\"(unclosed\"]\n",
            "[peers]\nfanout = 0\n",
            "[peers]\nfanout = 1\n",
        ] {
            let c: Config = toml::from_str(refused).unwrap();
            assert!(c.check().is_err(), "{refused}");
        }
    }
}
