//! `clyde`: the agent and its command line.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::single_range_in_vec_init))]

mod admin;
mod config;
mod containerd_config;
mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "clyde",
    about = "Peer-to-peer, node-local container image distribution agent",
    disable_version_flag = true
)]
struct Cli {
    /// TOML config file (default /etc/clyde/config.toml when it exists)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where blobs and metadata live (default /var/lib/clyde)
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// error, warn, info, debug, trace, or a tracing filter
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log line format
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: the registry mirror for containerd
    Serve(Box<ServeArgs>),
    /// List cached images: reference, kind, digest, size, created, last pulled
    List(admin::ListArgs),
    /// Remove cached images and the blobs only they reference
    Prune(admin::PruneArgs),
    /// Pull images into the store (through the running agent, or offline)
    Load(admin::LoadArgs),
    /// Write containerd hosts.toml files that point registries at the mirror
    ContainerdConfig(containerd_config::ContainerdConfigArgs),
    /// Print version, git commit and build date
    Version,
}

/// Flags of `clyde serve`; each overrides the config key of the same name.
#[derive(Args, Default)]
pub struct ServeArgs {
    /// OCI API for containerd [default: 127.0.0.1:30021]
    #[arg(long)]
    mirror_addr: Option<String>,
    /// HTTP port peers fetch from [default: 0.0.0.0:30022]
    #[arg(long)]
    peer_addr: Option<String>,
    /// libp2p listen multiaddr, repeatable [default: /ip4/0.0.0.0/tcp/30023]
    #[arg(long)]
    p2p_addr: Vec<String>,
    /// /metrics, /healthz, /readyz [default: 0.0.0.0:30024]
    #[arg(long)]
    metrics_addr: Option<String>,
    /// A peer multiaddr to join, repeatable
    #[arg(long)]
    bootstrap: Vec<String>,
    /// NAME:PORT of a headless Service whose records are peers, repeatable
    #[arg(long)]
    bootstrap_dns: Vec<String>,
    /// NAMESPACE/SERVICE:PORT of a Service whose EndpointSlices are watched for peers
    /// (needs get/list/watch on endpointslices), repeatable
    #[arg(long)]
    bootstrap_kubernetes: Vec<String>,
    /// pull-through, or p2p-only (never contact the upstream)
    #[arg(long, value_parser = ["pull-through", "p2p-only"])]
    mode: Option<String>,
    /// Never contact the upstream; serve cached tags as they are
    #[arg(long)]
    air_gapped: bool,
    /// Evict least-recently-used blobs above this many bytes
    #[arg(long)]
    cache_max_bytes: Option<u64>,
    /// Peer responses with a body in flight at once; more are answered 429 [default: 64]
    #[arg(long)]
    max_uploads: Option<usize>,
    /// Bytes per second sent to peers, all together, e.g. 100MiB; 0: no limit [default: 500MiB]
    #[arg(long, value_parser = parse_byte_size)]
    upload_rate: Option<u64>,
    /// Evict when the data dir's disk is fuller than this fraction; 0 disables [default: 0.9]
    #[arg(long)]
    disk_high_watermark: Option<f64>,
    /// containerd's gRPC socket; "" disables
    #[arg(long)]
    containerd_socket: Option<String>,
    /// The containerd namespace whose content is shared [default: k8s.io]
    #[arg(long)]
    containerd_namespace: Option<String>,
    /// containerd's content directory, read directly when mounted; "" reads over gRPC
    /// [default: /var/lib/containerd/io.containerd.content.v1.content]
    #[arg(long)]
    containerd_content_dir: Option<String>,
    /// Piece size in bytes [default: 4194304]
    #[arg(long)]
    piece_size: Option<u64>,
    /// How long a tag is served before it is re-checked upstream, e.g. 30s [default: 5m]
    #[arg(long)]
    tag_ttl: Option<humantime::Duration>,
    /// A file of image references (one per line) to load at start while serving
    #[arg(long)]
    preload_images: Option<PathBuf>,
    /// Re-check the `latest` tag upstream on every request
    #[arg(long)]
    always_pull_latest: bool,
    /// Fetch the rest of a blob read only by ranges: off (only what is read), idle (while no
    /// reader waits) or eager [default: off]
    #[arg(long, value_parser = ["off", "idle", "eager"])]
    fill: Option<String>,
    /// A file holding the cluster's shared secret (32 characters or more): only agents
    /// holding it join the p2p network, read from peer ports or share tags. Repeat it
    /// during a rotation: the first is used, every one is accepted
    #[arg(long)]
    cluster_secret_file: Vec<PathBuf>,
}

/// A byte count as operators write it (`500MiB`, `1G`, `1048576`).
fn parse_byte_size(s: &str) -> Result<u64, String> {
    clyde_types::parse_size(s).map_err(|e| e.to_string())
}

impl ServeArgs {
    fn apply(self, c: &mut Config) {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut c.mirror_addr, self.mirror_addr);
        set(&mut c.peer_addr, self.peer_addr);
        set(&mut c.metrics_addr, self.metrics_addr);
        set(&mut c.mode, self.mode);
        set(&mut c.containerd_socket, self.containerd_socket);
        set(&mut c.containerd_namespace, self.containerd_namespace);
        set(&mut c.containerd_content_dir, self.containerd_content_dir);
        set(&mut c.piece_size, self.piece_size);
        set(&mut c.disk_high_watermark, self.disk_high_watermark);
        set(&mut c.max_uploads, self.max_uploads);
        set(&mut c.upload_rate, self.upload_rate);
        set(&mut c.tag_ttl, self.tag_ttl.map(Into::into));
        set(&mut c.fill, self.fill.and_then(|f| f.parse().ok()));
        if self.preload_images.is_some() {
            c.preload_images = self.preload_images;
        }
        if self.cache_max_bytes.is_some() {
            c.cache_max_bytes = self.cache_max_bytes;
        }
        if !self.p2p_addr.is_empty() {
            c.p2p_addr = self.p2p_addr;
        }
        if !self.cluster_secret_file.is_empty() {
            c.cluster_secret_file = self.cluster_secret_file;
        }
        c.bootstrap.extend(self.bootstrap);
        c.bootstrap_dns.extend(self.bootstrap_dns);
        c.bootstrap_kubernetes.extend(self.bootstrap_kubernetes);
        c.air_gapped |= self.air_gapped;
        c.always_pull_latest |= self.always_pull_latest;
    }
}

/// libp2p's own crates, whose debug output is protocol chatter rather than Clyde's story.
const LIBP2P_CRATES: &[&str] = &[
    "libp2p_swarm",
    "libp2p_kad",
    "libp2p_tcp",
    "libp2p_noise",
    "libp2p_identify",
    "libp2p_ping",
    "libp2p_core",
    "multistream_select",
    "yamux",
];

/// The tracing filter for `--log-level`: a plain `debug` is Clyde's debug with libp2p kept
/// at info; `trace` or a full filter (`info,libp2p_kad=debug`) is taken as written.
fn log_filter(level: &str) -> String {
    if level != "debug" {
        return level.to_string();
    }
    let quiet: Vec<String> = LIBP2P_CRATES.iter().map(|c| format!("{c}=info")).collect();
    format!("debug,{}", quiet.join(","))
}

fn init_logs(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs an admin command. It reports every outcome itself, so its logs stay at errors
/// unless asked for (`--log-level warn` shows retries and the like).
fn run_admin(config: &Config, work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let level = if config.log_level == "info" { "error" } else { config.log_level.as_str() };
    init_logs(level, &config.log_format);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(work)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_ref())?;
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = cli.log_level {
        config.log_level = l;
    }
    if let Some(f) = cli.log_format {
        config.log_format = f;
    }
    match cli.command {
        Command::Version => {
            println!("clyde {}", env!("CARGO_PKG_VERSION"));
            println!("commit {}", env!("CLYDE_GIT_COMMIT"));
            println!("built {}", env!("CLYDE_BUILD_DATE"));
            Ok(())
        }
        Command::ContainerdConfig(args) => containerd_config::run(&args),
        Command::Serve(args) => {
            args.apply(&mut config);
            init_logs(&config.log_level, &config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve::run(config))
        }
        Command::List(args) => run_admin(&config, admin::list(&config, &args)),
        Command::Prune(args) => run_admin(&config, admin::prune(&config, &args)),
        Command::Load(args) => run_admin(&config, admin::load(&config, &args)),
    }
}
