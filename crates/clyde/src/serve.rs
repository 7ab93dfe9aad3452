//! `clyde serve`: wires the store, the upstream client, the p2p node, the resolver, the
//! mirror and peer APIs, and the health endpoints; stops them all on SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clyde_api::{Api, ListenerOptions, ServerTls};
use clyde_containerd::{Containerd, ContainerdConfig};
use clyde_metrics::Metrics;
use clyde_metrics::prometheus_client::registry::Registry;
use clyde_p2p::{Holder, Network, P2p, parse_multiaddrs};
use clyde_resolver::{Discovery, LocalContent, Resolver};
use clyde_store::{EvictionPolicy, Store};
use clyde_upstream::Upstream;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::Config;

async fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {what} {addr}"))
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let members = config.membership()?;
    if config.retention.min_copies.is_some() && members.is_none() {
        anyhow::bail!(
            "[retention] min_copies needs --cluster-secret-file: which images are pinned, and where, is taken from members only"
        );
    }
    if let Some(r) = config.registries.iter().find(|r| r.private)
        && members.is_none()
    {
        anyhow::bail!(
            "registry {}: private = true needs --cluster-secret-file: without it, anyone who reaches the peer port reads what this node holds",
            r.name
        );
    }
    raise_descriptor_limit(config.max_connections);
    let kube_services =
        config.bootstrap_kubernetes.iter().map(|s| clyde_kube::ServiceRef::parse(s)).collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir, config.piece_size)
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let upstream = Upstream::new(config.upstream())?;
    store.spawn_access_flusher(std::time::Duration::from_secs(30));
    let watermark = config.disk_high_watermark;
    store.set_pins(&config.retention.pinned).context("[retention] pinned")?;
    store.spawn_evictor(EvictionPolicy {
        max_bytes: config.cache_max_bytes,
        disk_high_watermark: (watermark > 0.0 && watermark < 1.0).then_some(watermark),
        partial_ttl: (!config.partial_ttl.is_zero()).then_some(config.partial_ttl),
    });
    let mirror_tls = config.mirror_tls.as_ref().map(ServerTls::acceptor).transpose().context("[mirror_tls]")?;
    // Peers present their certificate as clients too: the peer port requires one the CA signed.
    let peer_tls = config
        .peer_tls
        .as_ref()
        .map(|t| ServerTls { cert: t.cert.clone(), key: t.key.clone(), client_ca: Some(t.ca.clone()) }.acceptor())
        .transpose()
        .context("[peer_tls]")?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tasks = TaskTracker::new();
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);

    let mirror = bind("mirror_addr", &config.mirror_addr).await?;
    let peer = bind("peer_addr", &config.peer_addr).await?;
    let health = bind("metrics_addr", &config.metrics_addr).await?;
    let network = Network {
        listen: parse_multiaddrs(&config.p2p_addr)?,
        bootstrap: parse_multiaddrs(&config.bootstrap)?,
        bootstrap_dns: config.bootstrap_dns.clone(),
        kubernetes: !config.bootstrap_kubernetes.is_empty(),
        peer_port: match config.peer_advertise_port {
            Some(port) => port,
            None => peer.local_addr()?.port(),
        },
        psks: members.iter().flat_map(|m| m.secrets().iter().map(|s| s.psk())).collect(),
    };
    let p2p = P2p::start(
        &config.data_dir,
        network,
        config.p2p.clone(),
        store.clone(),
        Some(registry.sub_registry_with_prefix("libp2p")),
        &tasks,
        shutdown_rx.clone(),
    )
    .await?;
    let registry = Arc::new(registry);
    if !kube_services.is_empty() {
        let client = clyde_kube::client().await?;
        for service in kube_services {
            tasks.spawn(clyde_kube::follow(client.clone(), service, KubePeers(p2p.clone()), shutdown_rx.clone()));
        }
    }

    let containerd = (!config.containerd_socket.is_empty()).then(|| {
        let dir = PathBuf::from(&config.containerd_content_dir);
        let content_dir = (!config.containerd_content_dir.is_empty() && dir.is_dir()).then_some(dir);
        tracing::info!(socket = %config.containerd_socket, namespace = %config.containerd_namespace, content_dir = ?content_dir, "sharing containerd's content");
        Containerd::spawn(
            ContainerdConfig {
                socket: PathBuf::from(&config.containerd_socket),
                namespace: config.containerd_namespace.clone(),
                content_dir,
                relist_interval: std::time::Duration::from_secs(30),
                reconnect_interval: std::time::Duration::from_secs(2),
            },
            &tasks,
            shutdown_rx.clone(),
        )
    });
    if let Some(c) = &containerd {
        p2p.advertise(c.clone(), Holder::Containerd, &tasks, shutdown_rx.clone());
    }
    let local = containerd.map(|c| Arc::new(c) as Arc<dyn LocalContent>);
    let never_upstream = config.never_upstream();
    let discovery: Arc<dyn Discovery> = Arc::new(p2p.clone());
    let resolver_config = clyde_resolver::ResolverConfig { members: members.clone(), ..config.resolver() };
    let resolver =
        Resolver::new(store.clone(), local, Arc::new(upstream), Some(discovery), resolver_config, metrics.clone())?;
    tracing::info!(
        mirror_addr = %mirror.local_addr()?,
        peer_addr = %peer.local_addr()?,
        metrics_addr = %health.local_addr()?,
        peer_id = %p2p.peer_id(),
        data_dir = %config.data_dir.display(),
        never_upstream,
        mirror_tls = mirror_tls.is_some(),
        peer_tls = peer_tls.is_some(),
        cluster_secrets = ?members.as_ref().map(|m| m.secrets().iter().map(|s| s.fingerprint()).collect::<Vec<_>>()),
        "clyde serving"
    );
    let uploads = clyde_api::UploadLimits { max_uploads: config.max_uploads, upload_rate: config.upload_rate };
    let uploads = Some(std::sync::Arc::new(clyde_api::Uploads::new(&uploads)));
    let max_connections = config.max_connections;
    let mirror_options = ListenerOptions { tls: mirror_tls, max_connections, ..Default::default() };
    let peer_options = ListenerOptions { tls: peer_tls, uploads, members, max_connections };
    tasks.spawn(clyde_api::serve(mirror, Api::Mirror, resolver.clone(), mirror_options, shutdown_rx.clone()));
    tasks.spawn(clyde_api::serve(peer, Api::Peer, resolver.clone(), peer_options, shutdown_rx.clone()));
    let (admin, admin_path) = clyde_admin::server::bind(&config.data_dir)
        .with_context(|| format!("cannot create the admin socket in {}", config.data_dir.display()))?;
    tasks.spawn(clyde_admin::server::serve(admin, admin_path, store.clone(), resolver.clone(), shutdown_rx.clone()));
    if let Some(file) = &config.preload_images {
        let images = crate::admin::load_images(&[], Some(file))?;
        tasks.spawn(preload(resolver.clone(), images, shutdown_rx.clone()));
    }
    if let Some(k) = config.retention.min_copies {
        let (resolver, shutdown) = (resolver.clone(), shutdown_rx.clone());
        let interval = config.retention.copies_interval;
        tasks.spawn(async move { resolver.keep_copies(k, interval, shutdown).await });
    }
    for (i, rule) in config.retention.prune.iter().enumerate() {
        tasks.spawn(scheduled_prune(i + 1, rule.clone(), store.clone(), metrics.clone(), shutdown_rx.clone()));
    }
    let ready = {
        let p2p = p2p.clone();
        move || {
            let p2p = p2p.clone();
            async move { if p2p.joined().await { Ok(()) } else { Err("not connected to any peer yet".to_string()) } }
        }
    };
    let render = move || {
        let (p2p, store, metrics, registry) = (p2p.clone(), store.clone(), metrics.clone(), registry.clone());
        async move {
            let status = p2p.status().await;
            metrics.sample(status.connected_peers as u64, store.used_bytes(), status.provided_keys as u64);
            clyde_metrics::encode(&registry)
        }
    };
    tasks.spawn(clyde_api::serve_health(health, ready, render, shutdown_rx));
    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    tasks.close();
    tasks.wait().await;
    resolver.shutdown().await;
    Ok(())
}

/// The p2p node, told by Kubernetes who joined and who left.
struct KubePeers(P2p);

impl clyde_kube::PeerSink for KubePeers {
    fn joined(&self, addr: std::net::SocketAddr) {
        self.0.dial_addr(addr);
    }

    fn departed(&self, ip: std::net::IpAddr) {
        self.0.departed(ip);
    }
}

/// Loads the images of `--preload-images` while the agent serves; each result is logged.
async fn preload(resolver: clyde_resolver::Resolver, images: Vec<String>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!(images = images.len(), "preloading images");
    let request = clyde_admin::LoadRequest { images, ..Default::default() };
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let drain = async move { while rx.recv().await.is_some() {} };
    tokio::select! {
        (result, ()) = async { tokio::join!(clyde_admin::ops::load(&resolver, &request, tx), drain) } => match result {
            Ok(0) => tracing::info!("preloaded every image"),
            Ok(failed) => tracing::warn!(failed, "some images could not be preloaded"),
            Err(e) => tracing::warn!(error = %e, "preload failed"),
        },
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

/// Runs `[[retention.prune]]` rule number `n` every `rule.every` (the first run one period
/// after start), as `clyde prune` would with the rule's selectors; pinned images stay. Every
/// run is logged and counted.
async fn scheduled_prune(
    n: usize,
    rule: crate::config::PruneRule,
    store: Store,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + rule.every, rule.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let now = clyde_store::unix_now();
        let before = |age: Option<std::time::Duration>| age.map(|a| now.saturating_sub(a.as_secs()));
        let request = clyde_admin::PruneRequest {
            patterns: rule.pattern.clone(),
            created_before: before(rule.created_before),
            accessed_before: before(rule.accessed_before),
            max_size: None,
            dry_run: rule.dry_run,
            force: false,
            max_images: rule.max_images,
        };
        match clyde_admin::ops::prune(&store, &request).await {
            Ok(plan) => {
                metrics.prune_run(n, rule.dry_run, plan.images.len() as u64, plan.bytes);
                tracing::info!(
                    rule = n,
                    dry_run = rule.dry_run,
                    images = ?plan.images,
                    kept_pinned = ?plan.pinned,
                    blobs = plan.blobs.len(),
                    bytes = plan.bytes,
                    "scheduled prune"
                );
            }
            Err(e) => tracing::warn!(rule = n, error = %e, "scheduled prune failed"),
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Raises the open-file limit to its hard limit: every connection and every blob read holds
/// a descriptor, and two listeners at their connection bound must leave room for the store.
fn raise_descriptor_limit(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    let current = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let wanted = 2 * max_connections as u64 + 1024;
    if current < wanted {
        tracing::warn!(
            open_files = current,
            max_connections,
            "the open-file limit is low for two listeners at their connection bound; raise it (LimitNOFILE) or lower max_connections"
        );
    }
}
