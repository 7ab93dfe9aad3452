//! Nodes in one process on loopback: advertising, lookups, and forgetting dead peers.

use std::time::Duration;

use clyde_store::Store;
use clyde_types::{ContentKey, Digest};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::*;

struct TestNode {
    p2p: P2p,
    stop: watch::Sender<bool>,
    tasks: TaskTracker,
    _dir: tempfile::TempDir,
}

impl TestNode {
    async fn start(peer_port: u16, bootstrap: Vec<Multiaddr>) -> Self {
        Self::start_with_keys(peer_port, bootstrap, Vec::new()).await
    }

    async fn start_with_keys(peer_port: u16, bootstrap: Vec<Multiaddr>, psks: Vec<[u8; 32]>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 64 * 1024).unwrap();
        let (stop, rx) = watch::channel(false);
        let tasks = TaskTracker::new();
        let network = Network {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            bootstrap_dns: Vec::new(),
            kubernetes: false,
            peer_port,
            psks,
        };
        let p2p = P2p::start(dir.path(), network, P2pConfig::default(), store, None, &tasks, rx).await.unwrap();
        Self { p2p, stop, tasks, _dir: dir }
    }

    async fn address(&self) -> Multiaddr {
        loop {
            if let Some(a) = self.p2p.status().await.listen_addrs.first() {
                return a.clone().with(libp2p::multiaddr::Protocol::P2p(self.p2p.peer_id()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_is_found_with_its_peer_server_address_and_forgotten_when_it_dies() {
    let first = TestNode::start(40001, Vec::new()).await;
    let boot = first.address().await;
    let second = TestNode::start(40002, vec![boot.clone()]).await;
    let third = TestNode::start(40003, vec![boot]).await;
    assert!(first.p2p.joined().await, "a node with nobody to join is ready alone");
    eventually("the third node to join", || async { third.p2p.joined().await }).await;

    let blob = ContentKey::Digest(Digest::of(b"layer"));
    let tag = ContentKey::tag("r.example", "app", "v1");
    second.p2p.provide(blob.clone(), crate::Holder::Store);
    second.p2p.provide(tag.clone(), crate::Holder::Store);
    let want: SocketAddr = "127.0.0.1:40002".parse().unwrap();
    eventually("the blob's provider", || async {
        third.p2p.find_providers(blob.clone(), Duration::from_secs(2)).await == vec![want]
    })
    .await;
    eventually("the tag's provider", || async {
        first.p2p.find_providers(tag.clone(), Duration::from_secs(2)).await == vec![want]
    })
    .await;
    let unknown = ContentKey::Digest(Digest::of(b"nobody"));
    assert!(third.p2p.find_providers(unknown, Duration::from_secs(2)).await.is_empty());

    // Its record lives on in the DHT, but a dead provider is not offered.
    second.stop().await;
    let died = tokio::time::Instant::now();
    eventually("the dead provider to be forgotten", || async {
        third.p2p.find_providers(blob.clone(), Duration::from_millis(500)).await.is_empty()
    })
    .await;
    assert!(died.elapsed() < Duration::from_secs(10), "took {:?}", died.elapsed());
    first.stop().await;
    third.stop().await;
}

#[tokio::test]
async fn a_key_stays_advertised_while_any_holder_has_it() {
    let node = TestNode::start(1, Vec::new()).await;
    let key = ContentKey::Digest(Digest::of(b"held twice"));
    let provided = |n: usize| {
        let p2p = node.p2p.clone();
        move || {
            let p2p = p2p.clone();
            async move { p2p.status().await.provided_keys == n }
        }
    };
    node.p2p.provide(key.clone(), Holder::Store);
    node.p2p.provide(key.clone(), Holder::Containerd);
    eventually("the key to be provided", provided(1)).await;
    node.p2p.withdraw(key.clone(), Holder::Store);
    // containerd still holds it: still provided (a status answer follows the withdrawal).
    assert_eq!(node.p2p.status().await.provided_keys, 1);
    node.p2p.withdraw(key.clone(), Holder::Containerd);
    eventually("the key to be withdrawn", provided(0)).await;
    // A holder's full list withdraws, for it, what the list leaves out.
    let other = ContentKey::Digest(Digest::of(b"other"));
    node.p2p.holds_only(vec![key.clone(), other.clone()], Holder::Containerd);
    node.p2p.provide(other.clone(), Holder::Store);
    eventually("both keys to be provided", provided(2)).await;
    node.p2p.holds_only(vec![key.clone()], Holder::Containerd);
    // `other` stays: the store still holds it.
    assert_eq!(node.p2p.status().await.provided_keys, 2);
    node.p2p.holds_only(Vec::new(), Holder::Containerd);
    assert_eq!(node.p2p.status().await.provided_keys, 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_kubernetes_says_departed_is_dropped_at_once() {
    let first = TestNode::start(40011, Vec::new()).await;
    let second = TestNode::start(40012, vec![first.address().await]).await;
    eventually("the nodes to connect", || async { first.p2p.status().await.connected_peers == 1 }).await;
    // Both nodes are on 127.0.0.1 here; the command goes by address, as Kubernetes tells it.
    first.p2p.departed("127.0.0.1".parse().unwrap());
    // Commands are handled in order: by the time the status answers, the peer is gone.
    assert_eq!(first.p2p.status().await.connected_peers, 0);
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_holding_the_secret_join_and_a_rotating_node_joins_both_sides() {
    let (old, new) = ([1u8; 32], [2u8; 32]);
    let first = TestNode::start_with_keys(40021, Vec::new(), vec![old]).await;
    let boot = first.address().await;
    let member = TestNode::start_with_keys(40022, vec![boot.clone()], vec![old]).await;
    let outsider = TestNode::start_with_keys(40023, vec![boot.clone()], vec![new]).await;
    let open = TestNode::start(40024, vec![boot.clone()]).await;
    eventually("the member to join", || async { member.p2p.joined().await }).await;
    let blob = ContentKey::Digest(Digest::of(b"members only"));
    let outsiders_blob = ContentKey::Digest(Digest::of(b"advertised by an outsider"));
    member.p2p.provide(blob.clone(), Holder::Store);
    outsider.p2p.provide(outsiders_blob.clone(), Holder::Store);
    open.p2p.provide(outsiders_blob.clone(), Holder::Store);
    let want: SocketAddr = "127.0.0.1:40022".parse().unwrap();
    eventually("the member's provider record", || async {
        first.p2p.find_providers(blob.clone(), Duration::from_secs(2)).await == vec![want]
    })
    .await;
    // Neither the node with another secret nor one with none ever gets in.
    assert_eq!(first.p2p.status().await.connected_peers, 1);
    assert!(!outsider.p2p.joined().await);
    assert!(!open.p2p.joined().await);
    assert!(outsider.p2p.find_providers(blob.clone(), Duration::from_secs(1)).await.is_empty());
    assert!(first.p2p.find_providers(outsiders_blob.clone(), Duration::from_secs(1)).await.is_empty());

    // A rotation: first every node accepts the new secret while still using the old one;
    // then each uses the new one (every node accepts it by then); then the old one goes.
    let accepting = TestNode::start_with_keys(40025, vec![boot], vec![old, new]).await;
    eventually("the member's record through a node that accepts both", || async {
        accepting.p2p.find_providers(blob.clone(), Duration::from_secs(2)).await == vec![want]
    })
    .await;
    let using_new = TestNode::start_with_keys(40026, vec![accepting.address().await], vec![new, old]).await;
    let rotated_blob = ContentKey::Digest(Digest::of(b"held during the rotation"));
    accepting.p2p.provide(rotated_blob.clone(), Holder::Store);
    let accepting_addr: SocketAddr = "127.0.0.1:40025".parse().unwrap();
    eventually("a node using the new secret to reach one that accepts it", || async {
        using_new.p2p.find_providers(rotated_blob.clone(), Duration::from_secs(2)).await == vec![accepting_addr]
    })
    .await;
    for node in [first, member, outsider, open, accepting, using_new] {
        node.stop().await;
    }
}
