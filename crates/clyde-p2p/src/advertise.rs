//! Follows a holder of content (the store, containerd) and keeps the DHT told: every key it
//! holds is provided (a blob from the moment it starts arriving), every key it drops is
//! withdrawn for that holder. A follower that falls behind the events lists everything
//! again rather than guess.

use clyde_resolver::BoxFuture;
use clyde_store::{Store, StoreEvent};
use clyde_types::ContentKey;
use tokio::sync::{broadcast, watch};

use crate::{Holder, P2p};

/// Something that holds content and says when that changes.
pub trait KeyFeed: Send + Sync + 'static {
    /// Follows changes from now on.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;
    /// Everything held now.
    fn held_keys(&self) -> BoxFuture<Result<Vec<ContentKey>, String>>;
}

impl KeyFeed for Store {
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        Store::subscribe(self)
    }

    fn held_keys(&self) -> BoxFuture<Result<Vec<ContentKey>, String>> {
        let store = self.clone();
        Box::pin(async move { Store::held_keys(&store).await.map_err(|e| e.to_string()) })
    }
}

/// A holder listed once, and followed from then on by [`follow`].
pub(crate) struct Listed<F> {
    feed: F,
    holder: Holder,
    node: P2p,
    events: broadcast::Receiver<StoreEvent>,
}

/// Subscribes to `feed`'s changes, then tells the node everything it holds now (subscribed
/// first, so nothing that happens in between is missed).
pub(crate) async fn list<F: KeyFeed>(feed: F, holder: Holder, node: P2p) -> Listed<F> {
    let events = feed.subscribe();
    provide_all(&feed, holder, &node).await;
    Listed { feed, holder, node, events }
}

pub(crate) async fn run(feed: impl KeyFeed, holder: Holder, node: P2p, shutdown: watch::Receiver<bool>) {
    follow(list(feed, holder, node).await, shutdown).await;
}

/// Keeps the node told of a listed holder's changes until `shutdown`.
pub(crate) async fn follow<F: KeyFeed>(listed: Listed<F>, mut shutdown: watch::Receiver<bool>) {
    let Listed { feed, holder, node, mut events } = listed;
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match event {
            Ok(StoreEvent::Holding(key)) => node.provide(key, holder),
            Ok(StoreEvent::Dropped(key)) => node.withdraw(key, holder),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::info!(missed, ?holder, "advertiser fell behind; listing everything again");
                provide_all(&feed, holder, &node).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Provides everything `feed` holds; the node withdraws, for this holder, what it no longer
/// holds (a missed `Dropped` must not leave a key advertised for good).
async fn provide_all(feed: &impl KeyFeed, holder: Holder, node: &P2p) {
    match feed.held_keys().await {
        Ok(keys) => {
            tracing::info!(keys = keys.len(), ?holder, "advertising what is held");
            node.holds_only(keys, holder);
        }
        Err(e) => tracing::warn!(error = %e, ?holder, "cannot list what is held to advertise it"),
    }
}
