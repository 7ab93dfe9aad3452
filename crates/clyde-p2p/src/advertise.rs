//! Follows the store and keeps the DHT told: every key the store holds is provided (a blob
//! from the moment it starts arriving), every key it drops is withdrawn. A subscriber that
//! falls behind the store's events lists everything again rather than guess.

use clyde_store::{Store, StoreEvent};
use tokio::sync::{broadcast, watch};

use crate::P2p;

pub(crate) async fn run(store: Store, node: P2p, mut shutdown: watch::Receiver<bool>) {
    // Subscribe before listing, so nothing that happens in between is missed.
    let mut events = store.subscribe();
    provide_all(&store, &node).await;
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match event {
            Ok(StoreEvent::Holding(key)) => node.provide(key),
            Ok(StoreEvent::Dropped(key)) => node.withdraw(key),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::info!(missed, "advertiser fell behind the store; advertising everything again");
                provide_all(&store, &node).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn provide_all(store: &Store, node: &P2p) {
    match store.held_keys().await {
        Ok(keys) => {
            tracing::info!(keys = keys.len(), "advertising what the store holds");
            for key in keys {
                node.provide(key);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list the store to advertise it"),
    }
}
