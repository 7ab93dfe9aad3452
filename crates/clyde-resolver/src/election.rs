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
//! The decisions ([`rank`], [`elect`]) are pure; the async steps live in
//! [`crate::transfer`] and [`crate::peers`].

use std::net::SocketAddr;

use clyde_types::Digest;

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
    let mine = rank(digest, me);
    let best = members
        .iter()
        .filter(|m| m.id != me && !passed_over(m))
        .map(|m| (rank(digest, &m.id), m))
        .max_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    match best {
        Some((score, member)) if score.as_bytes() > mine.as_bytes() => Elected::Peer(member),
        _ => Elected::Me,
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
    fn alone_a_node_fetches_itself_and_its_own_intent_is_not_a_rival() {
        let digest = Digest::of(b"layer");
        assert_eq!(elect(&digest, &[7; 8], &[], |_| false), Elected::Me);
        assert_eq!(elect(&digest, &[7; 8], &[member(7)], |_| false), Elected::Me);
    }
}
