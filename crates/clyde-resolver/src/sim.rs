//! A herd past this machine: thousands of simulated nodes pulling the same cold image at
//! once, driven by the decisions the agent itself makes.
//!
//! What is the agent's own code: who fetches from the upstream and whom each follower
//! streams from ([`election::rank`], [`election::parent`] through
//! [`election::parent_position`], the fan-out [`election::FANOUT`] unless a scenario sets
//! another), how long a follower waits for a parent that has not started and when it passes
//! it over or gives up ([`election::Follow`], with [`PeerTimeouts`]' defaults), the poll
//! interval, the confirming second read of a would-be fetcher, and which bytes a follower
//! may stream from a node still receiving them (whole verified pieces of
//! [`DEFAULT_PIECE_SIZE`]).
//!
//! What is modelled: links as fluids (each node's uplink and downlink, and the upstream,
//! shared equally by the streams using them, advanced in fixed steps), one round-trip time
//! per request, each node seeing each other node's intent on a read with a given
//! probability (a busy DHT publishes late), a fetcher that dies partway. Not modelled: CPU,
//! TCP dynamics, DHT lookups' own times, manifests, unpacking.
//!
//! Deterministic: the same scenario and seed give the same report.

use std::collections::HashSet;
use std::time::Duration;

use clyde_types::{DEFAULT_PIECE_SIZE, Digest};
use tokio::time::Instant;

use crate::PeerTimeouts;
use crate::election::{self, Follow, Step};

/// How often a follower asks a parent that has not started serving (as the agent does).
const POLL: f64 = 0.1;

/// One simulated herd.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Nodes that start the pull.
    pub nodes: usize,
    /// The image's layers, in bytes; each is elected and streamed on its own, all at once.
    pub layers: Vec<u64>,
    /// Each node's uplink and downlink, bytes per second.
    pub node_up: f64,
    pub node_down: f64,
    /// The upstream registry's egress, bytes per second, all requests together.
    pub upstream: f64,
    /// One request's round trip.
    pub rtt: Duration,
    /// Chance that a node sees another node's intent when it reads the intents (1: every
    /// node sees every other; the 50-node lab on 2 cores saw about 0.4).
    pub visibility: f64,
    /// Followers per node in the tree.
    pub fanout: usize,
    /// Nodes start spread evenly over this (zero: one instant).
    pub spread: Duration,
    /// The first layer's fetcher dies once it has received this share of the layer.
    pub kill_fetcher_at: Option<f64>,
    pub seed: u64,
    /// The simulation's time step.
    pub step: Duration,
    /// Gives up (and reports the nodes not done) past this.
    pub limit: Duration,
}

impl Scenario {
    /// `nodes` nodes with 1 GB/s links, a 200 MB/s upstream, 1 ms round trips, one instant.
    pub fn herd(nodes: usize, layers: Vec<u64>) -> Self {
        Self {
            nodes,
            layers,
            node_up: 1e9,
            node_down: 1e9,
            upstream: 2e8,
            rtt: Duration::from_millis(1),
            visibility: 1.0,
            fanout: PeerTimeouts::default().fanout,
            spread: Duration::ZERO,
            kill_fetcher_at: None,
            seed: 1,
            step: Duration::from_millis(10),
            limit: Duration::from_secs(3600),
        }
    }

    /// Kraken's published scenario: a 3 GB image in 2 layers, 2,600 hosts at once, agents
    /// capped at 300 MB/s (the origin's rate is not published: 300 MB/s here too).
    pub fn kraken() -> Self {
        Self { node_up: 3e8, node_down: 3e8, upstream: 3e8, ..Self::herd(2600, vec![1_500_000_000; 2]) }
    }

    /// One node's cold pull alone: every layer at once from the upstream.
    pub fn alone_secs(&self) -> f64 {
        let bytes: u64 = self.layers.iter().sum();
        self.rtt.as_secs_f64() + bytes as f64 / self.upstream.min(self.node_down)
    }
}

/// What a simulated herd did.
#[derive(Clone, Debug)]
pub struct Report {
    /// Bytes the upstream sent, every layer together.
    pub upstream_bytes: u64,
    pub image_bytes: u64,
    /// Seconds from the start until each live node held every layer, sorted.
    pub done: Vec<f64>,
    /// Live nodes (the killed fetcher is not one).
    pub live: usize,
    /// Streams opened to the upstream.
    pub fetchers: usize,
    /// Most streams one node served at once.
    pub most_children: usize,
    /// Parents passed over for not starting in time; elections given up.
    pub pass_overs: usize,
    pub gave_up: usize,
    /// Hops from the deepest follower to its fetcher.
    pub depth: usize,
    pub alone: f64,
}

impl Report {
    /// Upstream bytes over the image's.
    pub fn upstream_ratio(&self) -> f64 {
        self.upstream_bytes as f64 / self.image_bytes.max(1) as f64
    }

    /// Whether every live node got every layer.
    pub fn all_done(&self) -> bool {
        self.done.len() == self.live
    }

    /// The `q` quantile (0..=1) of completion times.
    pub fn percentile(&self, q: f64) -> f64 {
        if self.done.is_empty() {
            return f64::NAN;
        }
        let i = ((self.done.len() - 1) as f64 * q).round() as usize;
        self.done[i.min(self.done.len() - 1)]
    }
}

/// splitmix64: small, seeded, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        p >= 1.0 || (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Src {
    Upstream,
    Node(usize),
}

/// One node's transfer of one layer.
struct Leg {
    got: u64,
    src: Option<Src>,
    /// Bytes flow from then on (the request's round trip).
    open_at: f64,
    /// When the node next decides whom to stream from (election end, next poll).
    decide_at: f64,
    /// The would-be fetcher reads the intents a second time first (as the agent does).
    confirmed: bool,
    follow: Option<Follow>,
    passed: HashSet<usize>,
    /// Others may stream from it: its own stream has opened.
    serving_from: Option<f64>,
}

/// Runs a scenario to the end (every live node done, or the time limit).
pub fn run(s: &Scenario) -> Report {
    let timeouts = PeerTimeouts::default();
    let wait = timeouts.election_wait.as_secs_f64();
    let dt = s.step.as_secs_f64();
    let piece = DEFAULT_PIECE_SIZE;
    let mut rng = Rng(s.seed);
    let ids: Vec<Vec<u8>> = (0..s.nodes).map(|_| rng.next().to_be_bytes().to_vec()).collect();
    let digests: Vec<Digest> =
        (0..s.layers.len()).map(|l| Digest::of(&[s.seed.to_be_bytes(), (l as u64).to_be_bytes()].concat())).collect();
    // Every layer's nodes in rank order, by the agent's own score.
    let orders: Vec<Vec<usize>> = digests
        .iter()
        .map(|d| {
            let mut order: Vec<(Digest, usize)> =
                ids.iter().enumerate().map(|(i, id)| (election::rank(d, id), i)).collect();
            order.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
            order.into_iter().map(|(_, i)| i).collect()
        })
        .collect();
    let position: Vec<Vec<usize>> = orders
        .iter()
        .map(|order| {
            let mut pos = vec![0; s.nodes];
            for (p, &i) in order.iter().enumerate() {
                pos[i] = p;
            }
            pos
        })
        .collect();
    let start: Vec<f64> = (0..s.nodes).map(|i| s.spread.as_secs_f64() * i as f64 / s.nodes.max(1) as f64).collect();
    let base = Instant::now();
    let at = |t: f64| base + Duration::from_secs_f64(t.max(0.0));
    let mut legs: Vec<Vec<Leg>> = (0..s.nodes)
        .map(|i| {
            (0..s.layers.len())
                .map(|_| Leg {
                    got: 0,
                    src: None,
                    open_at: f64::INFINITY,
                    decide_at: start[i] + wait,
                    confirmed: false,
                    follow: None,
                    passed: HashSet::new(),
                    serving_from: None,
                })
                .collect()
        })
        .collect();
    let mut alive = vec![true; s.nodes];
    let mut done_at: Vec<Option<f64>> = vec![None; s.nodes];
    let (mut upstream_bytes, mut fetchers, mut pass_overs, mut gave_up, mut most_children) = (0u64, 0, 0, 0, 0);
    let mut killed = s.kill_fetcher_at.is_none();
    let mut first_fetcher: Option<usize> = None;
    let mut t = 0.0;
    while t <= s.limit.as_secs_f64() {
        // Decisions: whom to stream each layer from.
        for l in 0..s.layers.len() {
            for i in 0..s.nodes {
                if !alive[i] || legs[i][l].src.is_some() || t < legs[i][l].decide_at {
                    continue;
                }
                // This read of the intents: the live nodes above this one that it sees and
                // has not passed over. Its position in that view decides its parent.
                let mine = position[l][i];
                let view: Vec<usize> = orders[l][..mine]
                    .iter()
                    .copied()
                    .filter(|&j| alive[j] && !legs[i][l].passed.contains(&j) && rng.chance(s.visibility))
                    .collect();
                let parent = election::parent_position(view.len(), s.fanout).map(|p| view[p]);
                let started = parent.is_some_and(|p| legs[p][l].serving_from.is_some_and(|from| from <= t));
                let leg = &mut legs[i][l];
                let fetch = match parent {
                    None if !leg.confirmed && leg.passed.is_empty() => {
                        leg.confirmed = true;
                        leg.decide_at = t + wait;
                        continue;
                    }
                    None => true,
                    Some(p) => {
                        let follow = leg.follow.get_or_insert_with(|| Follow::new(at(t), timeouts.follow_timeout));
                        if started {
                            leg.src = Some(Src::Node(p));
                            leg.open_at = t + s.rtt.as_secs_f64();
                            leg.serving_from = Some(leg.open_at);
                            continue;
                        }
                        match follow.next(at(t)) {
                            Step::Wait => {
                                leg.decide_at = t + POLL;
                                continue;
                            }
                            Step::PassOver => {
                                pass_overs += 1;
                                leg.passed.insert(p);
                                follow.restart(at(t));
                                continue;
                            }
                            Step::Fetch => {
                                gave_up += 1;
                                true
                            }
                        }
                    }
                };
                if fetch {
                    let leg = &mut legs[i][l];
                    leg.src = Some(Src::Upstream);
                    leg.open_at = t + s.rtt.as_secs_f64();
                    leg.serving_from = Some(leg.open_at);
                    fetchers += 1;
                    if l == 0 && first_fetcher.is_none() {
                        first_fetcher = Some(i);
                    }
                }
            }
        }
        // Streams flowing now, and how many share each link.
        let mut out = vec![0usize; s.nodes];
        let mut incoming = vec![0usize; s.nodes];
        let mut upstream_streams = 0usize;
        let mut flowing: Vec<(usize, usize, Src)> = Vec::new();
        for (i, node) in legs.iter().enumerate() {
            for (l, leg) in node.iter().enumerate() {
                if !alive[i] || leg.got >= s.layers[l] || t < leg.open_at {
                    continue;
                }
                let Some(src) = leg.src else { continue };
                flowing.push((i, l, src));
                incoming[i] += 1;
                match src {
                    Src::Upstream => upstream_streams += 1,
                    Src::Node(p) => out[p] += 1,
                }
            }
        }
        most_children = most_children.max(out.iter().copied().max().unwrap_or(0));
        // Advance every stream from the same snapshot.
        let readable = |legs: &Vec<Vec<Leg>>, p: usize, l: usize| {
            let got = legs[p][l].got;
            if got >= s.layers[l] { got } else { got / piece * piece }
        };
        let mut moves: Vec<(usize, usize, u64)> = Vec::with_capacity(flowing.len());
        for &(i, l, src) in &flowing {
            let down = s.node_down / incoming[i] as f64;
            let (rate, avail) = match src {
                Src::Upstream => ((s.upstream / upstream_streams as f64).min(down), s.layers[l]),
                Src::Node(p) => ((s.node_up / out[p] as f64).min(down), readable(&legs, p, l)),
            };
            let got = legs[i][l].got;
            let n = ((rate * dt) as u64).min(avail.saturating_sub(got)).min(s.layers[l] - got);
            if n > 0 {
                moves.push((i, l, n));
            }
            if src == Src::Upstream {
                upstream_bytes += n;
            }
        }
        for (i, l, n) in moves {
            legs[i][l].got += n;
        }
        t += dt;
        // The first layer's fetcher dies partway: its followers' streams break at once (its
        // sockets reset), they pass it over and elect again, resuming at their cursors.
        if !killed
            && let (Some(share), Some(f)) = (s.kill_fetcher_at, first_fetcher)
            && legs[f][0].got as f64 >= share * s.layers[0] as f64
        {
            killed = true;
            alive[f] = false;
            for leg in legs.iter_mut().flatten().filter(|leg| leg.src == Some(Src::Node(f))) {
                leg.src = None;
                leg.open_at = f64::INFINITY;
                leg.passed.insert(f);
                leg.follow = None;
                leg.decide_at = t + s.rtt.as_secs_f64();
            }
        }
        let mut all = true;
        for i in 0..s.nodes {
            if !alive[i] || done_at[i].is_some() {
                continue;
            }
            if (0..s.layers.len()).all(|l| legs[i][l].got >= s.layers[l]) {
                done_at[i] = Some(t);
            } else {
                all = false;
            }
        }
        if all {
            break;
        }
    }
    let mut done: Vec<f64> = done_at.iter().flatten().copied().collect();
    done.sort_by(f64::total_cmp);
    // Hops from each node to a fetcher, through its last source.
    let mut depth = 0;
    for l in 0..s.layers.len() {
        for i in 0..legs.len() {
            let (mut hops, mut at_node) = (0, i);
            while let Some(Src::Node(p)) = legs[at_node][l].src {
                hops += 1;
                at_node = p;
                if hops > s.nodes {
                    break;
                }
            }
            depth = depth.max(hops);
        }
    }
    Report {
        upstream_bytes,
        image_bytes: s.layers.iter().sum(),
        done,
        live: alive.iter().filter(|a| **a).count(),
        fetchers,
        most_children,
        pass_overs,
        gave_up,
        depth,
        alone: s.alone_secs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn a_herd_of_two_hundred_fetches_once_and_everyone_finishes() {
        let r = run(&Scenario::herd(200, vec![400 * MB, 240 * MB]));
        let summary = format!("{:?}", Report { done: vec![r.percentile(0.5), r.percentile(1.0)], ..r.clone() });
        assert!(r.all_done(), "{summary}");
        assert!(r.upstream_ratio() <= 1.05, "{summary}");
        assert_eq!(r.fetchers, 2, "one fetcher per layer: {summary}");
        // At most FANOUT followers per layer (a node can be inside both layers' trees).
        assert!(r.most_children <= election::FANOUT * 2, "{summary}");
        // The tree: 200 nodes are 4 levels deep with a fan-out of 4.
        assert!(r.depth <= 4, "{summary}");
        // The election's two waits, then about the upstream's pace.
        let bound = r.alone * 1.1 + 2.0 * PeerTimeouts::default().election_wait.as_secs_f64();
        assert!(r.percentile(1.0) < bound, "{summary}");
    }

    #[test]
    fn the_same_seed_gives_the_same_report_and_views_that_differ_cost_bytes_not_completion() {
        let mut s = Scenario::herd(100, vec![32 * MB]);
        s.visibility = 0.4;
        s.seed = 7;
        let (a, b) = (run(&s), run(&s));
        assert_eq!((a.upstream_bytes, &a.done), (b.upstream_bytes, &b.done));
        assert!(a.all_done(), "{a:?}");
        assert!(a.fetchers >= 1 && a.upstream_ratio() < 5.0, "{a:?}");
    }

    #[test]
    fn a_herd_completes_when_its_fetcher_dies_at_thirty_percent() {
        let mut s = Scenario::herd(50, vec![64 * MB]);
        s.kill_fetcher_at = Some(0.3);
        let r = run(&s);
        assert_eq!(r.live, 49);
        assert!(r.all_done(), "{r:?}");
        assert!(r.upstream_ratio() <= 1.3, "{r:?}");
        assert_eq!(r.fetchers, 2, "a new fetcher resumed: {r:?}");
    }

    #[test]
    fn the_simulated_parent_is_the_agents_parent() {
        let s = Scenario::herd(40, vec![MB]);
        let digest = Digest::of(&[s.seed.to_be_bytes(), 0u64.to_be_bytes()].concat());
        let mut rng = Rng(s.seed);
        let members: Vec<election::Member> = (0..40)
            .map(|i| election::Member {
                id: rng.next().to_be_bytes().to_vec(),
                addr: std::net::SocketAddr::from(([10, 0, 0, 1], 30000 + i)),
            })
            .collect();
        let mut order: Vec<usize> = (0..40).collect();
        order.sort_by(|a, b| {
            let (ra, rb) = (election::rank(&digest, &members[*a].id), election::rank(&digest, &members[*b].id));
            rb.as_bytes().cmp(ra.as_bytes())
        });
        for (p, &i) in order.iter().enumerate() {
            let expected = election::parent_position(p, s.fanout).map(|q| members[order[q]].id.clone());
            let got = match election::parent(&digest, &members[i].id, &members, |_| false, s.fanout) {
                election::Elected::Me => None,
                election::Elected::Peer(m) => Some(m.id.clone()),
            };
            assert_eq!(got, expected, "position {p}");
        }
    }
}
