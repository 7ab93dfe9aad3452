//! `clyde serve`: wires the store, the upstream client, the resolver and the mirror API.

use std::sync::Arc;

use anyhow::Context;
use clyde_resolver::{Resolver, ResolverConfig};
use clyde_store::Store;
use clyde_upstream::{Upstream, UpstreamConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;

pub async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir, config.piece_size)
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let upstream = Upstream::new(UpstreamConfig {
        registries: config.registries.clone(),
        connect_timeout: config.upstream_connect_timeout,
        read_timeout: config.upstream_read_timeout,
        ..UpstreamConfig::default()
    })?;
    store.spawn_access_flusher(std::time::Duration::from_secs(30));
    let never_upstream = config.air_gapped || config.mode == "p2p-only";
    let resolver = Resolver::new(
        store,
        Arc::new(upstream),
        ResolverConfig {
            air_gapped: never_upstream,
            tag_ttl: config.tag_ttl,
            always_pull_latest: config.always_pull_latest,
            tag_check_timeout: config.tag_check_timeout,
            ..ResolverConfig::default()
        },
    );
    for (what, set) in [
        ("bootstrap", !config.bootstrap.is_empty()),
        ("bootstrap_dns", !config.bootstrap_dns.is_empty()),
        ("cache_max_bytes", config.cache_max_bytes.is_some()),
    ] {
        if set {
            tracing::warn!(setting = what, "not implemented in this version yet; ignored");
        }
    }
    let listener = TcpListener::bind(&config.mirror_addr)
        .await
        .with_context(|| format!("cannot listen on mirror_addr {}", config.mirror_addr))?;
    tracing::info!(mirror_addr = %listener.local_addr()?, data_dir = %config.data_dir.display(), air_gapped = never_upstream, "clyde serving");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(clyde_api::serve(listener, resolver.clone(), shutdown_rx));
    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    resolver.shutdown().await;
    Ok(())
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
