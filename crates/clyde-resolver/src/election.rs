//! Who fetches a cold blob from the upstream for the whole cluster.
//!
//! When every node of a scale-out asks for the same cold blob in the same second, none finds
//! a provider (nobody has started) and each would go upstream. Instead, a node that finds no
//! provider announces an *intent* for the blob (a provider record under
//! [`ContentKey::Intent`]), waits `election_wait` so that intents announced at about the same
//! instant are visible, and reads every live node's intent. Each node ranks the intents the
//! same way (rendezvous hashing: the highest `sha256(digest ‖ node id)` wins), so they agree
//! on one fetcher without talking to each other: the winner goes upstream, the others stream
//! from it as its bytes arrive. A node that comes later finds the fetcher as a provider and
//! never votes.
//!
//! Failure cases: a fetcher that dies or hangs is dropped by the p2p node (its connection
//! closes, or its pings stop) or penalized when its stream breaks; the followers then elect
//! again among the intents that remain (theirs) and one of them resumes from the upstream
//! with `Range`, the others from it. A winner that does not start serving within
//! `follow_timeout` (a stale intent, an upstream slow to answer) is passed over and the next
//! in rank is followed. Nodes that see different sets of intents can elect two fetchers: the
//! cost is one more upstream transfer, never a wrong byte.
//!
//! The followers of a blob do not all stream from the fetcher: they form a tree
//! ([`parent`]) in rank order, each node serving at most [`FANOUT`] followers from the bytes
//! it has so far, so no uplink carries N−1 copies and a herd of N nodes is
//! `log_FANOUT(N)` hops deep. A node's parent always ranks above it, so nodes that see
//! different sets of intents never wait on each other in a cycle. Manifests and tags, which
//! are small, keep one fetcher that everyone follows.
//!
//! The decisions ([`rank`], [`elect`], [`parent`], [`Follow::next`]) are pure and tested
//! without sockets or clocks (and driven by the simulator, [`crate::sim`]);
//! [`follow_elected`] runs them against the DHT and the peer servers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use clyde_types::Digest;
use clyde_upstream::{BlobBody, UpstreamError};
use tokio::time::Instant;

use crate::peers::Peers;
use crate::{Origin, PeerTimeouts};

/// How often a follower asks an elected fetcher that has not started serving yet.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// A node that announced an intent, as the p2p layer found it: its identity (its libp2p
/// peer id) and its peer server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: Vec<u8>,
    pub addr: SocketAddr,
}

/// A node's score for `digest`: rendezvous hashing, so every node computes the same order
/// and a node joining or leaving moves only the blobs it wins.
pub fn rank(digest: &Digest, id: &[u8]) -> Digest {
    let mut input = Vec::with_capacity(32 + id.len());
    input.extend_from_slice(digest.as_bytes());
    input.extend_from_slice(id);
    Digest::of(&input)
}

/// The outcome of an election.
#[derive(Debug, PartialEq, Eq)]
pub enum Elected<'a> {
    /// This node fetches from the upstream.
    Me,
    /// This node follows that member.
    Peer(&'a Member),
}

/// Elects the fetcher of `digest` among this node (`me`) and the `members` that announced an
/// intent, leaving out those `passed_over` (dead, failing, or too slow to start).
pub fn elect<'a>(
    digest: &Digest,
    me: &[u8],
    members: &'a [Member],
    passed_over: impl Fn(&Member) -> bool,
) -> Elected<'a> {
    // The top of the rank order: the root of a tree no fan-out bounds.
    parent(digest, me, members, passed_over, usize::MAX)
}

/// Followers a node serves one blob to in a herd's tree (the elected fetcher included), by
/// default (`[peers] fanout`).
pub const FANOUT: usize = 4;

/// Whom this node (`me`) streams `digest` from in the herd's tree: the members that
/// announced an intent and this node, less those `passed_over`, in rank order; the first is
/// the fetcher ([`Elected::Me`] when that is this node), and the node at position `p > 0`
/// follows the one at `(p − 1) / fanout`. `fanout` `usize::MAX` is [`elect`]: everyone
/// follows the fetcher.
pub fn parent<'a>(
    digest: &Digest,
    me: &[u8],
    members: &'a [Member],
    passed_over: impl Fn(&Member) -> bool,
    fanout: usize,
) -> Elected<'a> {
    let mut order: Vec<(Digest, Option<&Member>)> =
        members.iter().filter(|m| m.id != me && !passed_over(m)).map(|m| (rank(digest, &m.id), Some(m))).collect();
    order.push((rank(digest, me), None));
    order.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
    let position = order.iter().position(|(_, m)| m.is_none()).unwrap_or(0);
    match parent_position(position, fanout).and_then(|p| order[p].1) {
        Some(m) => Elected::Peer(m),
        None => Elected::Me,
    }
}

/// In a herd's tree, the position (in rank order, 0 the fetcher) of the node that the node
/// at `position` follows; `None` for the fetcher itself.
pub fn parent_position(position: usize, fanout: usize) -> Option<usize> {
    (position > 0).then(|| (position - 1) / fanout.max(1))
}

/// What a follower does next, after asking the elected node.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask it again after a short wait: it has not started serving.
    Wait,
    /// Leave it out and elect again: it failed, or did not start within the follow timeout.
    PassOver,
    /// Stop following: fetch from the upstream.
    Fetch,
}

/// A follower's patience with elected nodes.
#[derive(Debug)]
pub struct Follow {
    /// When this node started following the current one.
    since: Instant,
    /// When the whole election gives up.
    give_up: Instant,
    follow_timeout: Duration,
}

impl Follow {
    /// Patience from `now`: `follow_timeout` for each elected node, three times that in all.
    pub fn new(now: Instant, follow_timeout: Duration) -> Self {
        Self { since: now, give_up: now + follow_timeout * 3, follow_timeout }
    }

    /// A new node is followed from `now`.
    pub fn restart(&mut self, now: Instant) {
        self.since = now;
    }

    /// The next step after the elected node answered "not yet" at `now`.
    pub fn next(&self, now: Instant) -> Step {
        if now >= self.give_up {
            Step::Fetch
        } else if now >= self.since + self.follow_timeout {
            Step::PassOver
        } else {
            Step::Wait
        }
    }
}

/// Takes part in the election of the node that fetches `digest` from the upstream for the
/// cluster: `None` when this node is elected (or no elected node started serving in time),
/// else the stream of `range` from the elected node. Alone, a node has nobody to elect with.
pub(crate) async fn follow_elected(
    peers: &Arc<Peers>,
    timeouts: &PeerTimeouts,
    origin: &Origin,
    digest: &Digest,
    range: Option<Range<u64>>,
    expected: Option<u64>,
) -> Option<(BlobBody, SocketAddr)> {
    follow_elected_in(peers, timeouts, digest, timeouts.fanout.max(1), |winner| {
        peers.open_blob_from(winner, origin, digest, range.clone(), expected)
    })
    .await
}

/// The election of [`follow_elected`] for anything fetched once for the cluster under the
/// election key `key` (a blob's or manifest's digest; for a tag, the digest of its name):
/// `ask` asks the elected node for it, and answers `404` (`NotFound`) while that node has
/// not got it yet.
pub(crate) async fn follow_elected_for<T, F, Fut>(
    peers: &Arc<Peers>,
    timeouts: &PeerTimeouts,
    key: &Digest,
    ask: F,
) -> Option<(T, SocketAddr)>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<T, UpstreamError>>,
{
    follow_elected_in(peers, timeouts, key, usize::MAX, ask).await
}

/// The election of [`follow_elected_for`], following this node's [`parent`] in a tree of
/// `fanout` rather than the fetcher itself.
async fn follow_elected_in<T, F, Fut>(
    peers: &Arc<Peers>,
    timeouts: &PeerTimeouts,
    key: &Digest,
    fanout: usize,
    ask: F,
) -> Option<(T, SocketAddr)>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<T, UpstreamError>>,
{
    let digest = key;
    if !peers.has_company().await {
        return None;
    }
    // The ballot: kept for the election, withdrawn when it ends.
    let (_intent, new) = peers.announce_intent(*digest);
    if new {
        // Nodes asking at the same instant announce within this; later ones find the
        // elected node as a provider and never get here.
        tokio::time::sleep(timeouts.election_wait).await;
    }
    let me = peers.local_id();
    let mut follow = Follow::new(Instant::now(), timeouts.follow_timeout);
    let mut passed_over: HashSet<Vec<u8>> = HashSet::new();
    let mut members = peers.intents(*digest).await;
    let mut following: Option<Vec<u8>> = None;
    let mut confirmed = false;
    loop {
        let winner = match parent(digest, &me, &members, |m| passed_over.contains(&m.id), fanout) {
            // Elected on a first read: read once more after another wait before going
            // upstream. On a busy cluster some intents arrive late; a rival that outranks
            // this node shows up here, and the cost is one wait for the elected node only.
            Elected::Me if !confirmed && passed_over.is_empty() => {
                confirmed = true;
                tokio::time::sleep(timeouts.election_wait).await;
                members = peers.intents(*digest).await;
                continue;
            }
            Elected::Me => {
                tracing::info!(%digest, rivals = members.len(), "elected to fetch from the upstream");
                return None;
            }
            Elected::Peer(m) => m.clone(),
        };
        if following.as_ref() != Some(&winner.id) {
            tracing::info!(%digest, fetcher = %winner.addr, rivals = members.len(), fanout, "following the elected fetcher");
            follow.restart(Instant::now());
            following = Some(winner.id.clone());
        }
        let step = match ask(winner.addr).await {
            Ok(answer) => return Some((answer, winner.addr)),
            // Not started yet (its upstream has not answered), or at its upload limit.
            Err(UpstreamError::NotFound | UpstreamError::Status { status: 429, .. }) => follow.next(Instant::now()),
            // Past the end: the upstream's answer says so.
            Err(UpstreamError::Status { status: 416, .. }) => return None,
            // It holds a private registry's content and serves it under that name only:
            // not a fault.
            Err(UpstreamError::Status { status: 403, .. }) => Step::PassOver,
            // Slow to answer (in a tree, the parent may be busy with its own election on a
            // loaded node): patience until the follow timeout, no penalty.
            Err(UpstreamError::Unreachable { ref reason, .. }) if reason == crate::peers::NO_ANSWER_IN_TIME => {
                follow.next(Instant::now())
            }
            Err(e) => {
                peers.penalize(winner.addr, &format!("elected fetcher failed: {e}"));
                Step::PassOver
            }
        };
        match step {
            Step::Wait => tokio::time::sleep(FOLLOW_POLL).await,
            Step::PassOver => {
                tracing::info!(%digest, fetcher = %winner.addr, "passing the elected fetcher over");
                passed_over.insert(winner.id);
                // Who else is still there: read again, as the election may have moved on.
                members = peers.intents(*digest).await;
            }
            Step::Fetch => {
                tracing::info!(%digest, "no elected fetcher started serving; fetching from the upstream");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: u8) -> Member {
        Member { id: vec![n; 8], addr: SocketAddr::from(([10, 0, 0, n], 30022)) }
    }

    #[test]
    fn every_node_elects_the_same_fetcher() {
        let nodes: Vec<Member> = (1..=6).map(member).collect();
        for n in 0..50u8 {
            let digest = Digest::of(&[n]);
            let winners: Vec<Vec<u8>> = nodes
                .iter()
                .map(|me| match elect(&digest, &me.id, &nodes, |_| false) {
                    Elected::Me => me.id.clone(),
                    Elected::Peer(m) => m.id.clone(),
                })
                .collect();
            assert!(winners.iter().all(|w| *w == winners[0]), "nodes disagree on {digest}: {winners:?}");
        }
    }

    #[test]
    fn fetchers_spread_over_the_nodes() {
        let nodes: Vec<Member> = (1..=4).map(member).collect();
        let mut wins = [0u32; 4];
        for n in 0..400u16 {
            let digest = Digest::of(&n.to_be_bytes());
            if let Elected::Peer(m) = elect(&digest, &[0], &nodes, |_| false) {
                wins[usize::from(m.id[0] - 1)] += 1;
            }
        }
        assert!(wins.iter().all(|&w| w > 60), "uneven: {wins:?}");
    }

    #[test]
    fn a_passed_over_winner_hands_over_to_the_next_in_rank() {
        let digest = Digest::of(b"layer");
        let mut nodes: Vec<Member> = (1..=5).map(member).collect();
        // This node is the last in rank, so a peer always wins while one is left.
        nodes.sort_by(|a, b| rank(&digest, &b.id).as_bytes().cmp(rank(&digest, &a.id).as_bytes()));
        let me = nodes.pop().expect("five nodes").id;
        assert_eq!(elect(&digest, &me, &nodes, |_| false), Elected::Peer(&nodes[0]));
        assert_eq!(elect(&digest, &me, &nodes, |m| *m == nodes[0]), Elected::Peer(&nodes[1]));
        // Every member passed over: this node fetches.
        assert_eq!(elect(&digest, &me, &nodes, |_| true), Elected::Me);
    }

    #[test]
    fn a_follower_waits_then_passes_over_then_gives_up() {
        let start = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut follow = Follow::new(start, timeout);
        assert_eq!(follow.next(start + Duration::from_millis(100)), Step::Wait);
        assert_eq!(follow.next(start + timeout), Step::PassOver);
        // The next node gets its own follow timeout...
        follow.restart(start + timeout);
        assert_eq!(follow.next(start + timeout + Duration::from_secs(1)), Step::Wait);
        // ...within the bound on the whole election.
        assert_eq!(follow.next(start + timeout * 3), Step::Fetch);
    }

    #[test]
    fn followers_form_a_tree_in_rank_order_that_no_view_makes_a_cycle() {
        let digest = Digest::of(b"layer");
        let mut nodes: Vec<Member> = (1..=30).map(member).collect();
        nodes.sort_by(|a, b| rank(&digest, &b.id).as_bytes().cmp(rank(&digest, &a.id).as_bytes()));
        let parent_of = |me: &Member, seen: &[Member]| match parent(&digest, &me.id, seen, |_| false, 4) {
            Elected::Me => None,
            Elected::Peer(m) => Some(m.id.clone()),
        };
        // Everyone seen: the fetcher, its 4 followers, each of them 4 more...
        assert_eq!(parent_of(&nodes[0], &nodes), None);
        for p in 1..nodes.len() {
            assert_eq!(parent_of(&nodes[p], &nodes), Some(nodes[(p - 1) / 4].id.clone()), "position {p}");
        }
        let mut children = std::collections::HashMap::<Vec<u8>, usize>::new();
        for n in &nodes[1..] {
            *children.entry(parent_of(n, &nodes).unwrap()).or_default() += 1;
        }
        assert!(children.values().all(|&c| c <= 4), "{children:?}");
        // Whatever each node sees, its parent ranks above it: following parents always ends.
        for drop in 0..30usize {
            let seen: Vec<Member> =
                nodes.iter().enumerate().filter(|(i, _)| (i * 7 + drop) % 3 != 0).map(|(_, m)| m.clone()).collect();
            for (p, n) in nodes.iter().enumerate() {
                if let Some(up) = parent_of(n, &seen) {
                    let q = nodes.iter().position(|m| m.id == up).unwrap();
                    assert!(q < p, "node {p} follows node {q}, which ranks below it");
                }
            }
        }
        // Fan-out without bound: the fetcher for everyone.
        for n in &nodes[1..] {
            assert_eq!(parent(&digest, &n.id, &nodes, |_| false, usize::MAX), Elected::Peer(&nodes[0]));
        }
    }

    #[test]
    fn alone_a_node_fetches_itself_and_its_own_intent_is_not_a_rival() {
        let digest = Digest::of(b"layer");
        assert_eq!(elect(&digest, &[7; 8], &[], |_| false), Elected::Me);
        assert_eq!(elect(&digest, &[7; 8], &[member(7)], |_| false), Elected::Me);
    }
}
