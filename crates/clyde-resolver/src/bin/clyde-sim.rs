//! Runs the herd simulator ([`clyde_resolver::sim`]) and prints one line per scenario.
//!
//! ```text
//! clyde-sim herd NODES LAYER_MB... [--fanout K] [--visibility V] [--kill SHARE]
//!           [--up MB/s] [--down MB/s] [--upstream MB/s] [--rtt-ms MS] [--seed N]
//! clyde-sim kraken [--fanout K] ...
//! ```

use std::time::{Duration, Instant};

use clyde_resolver::sim::{Scenario, run};

fn usage() -> ! {
    eprintln!(
        "usage: clyde-sim herd NODES LAYER_MB... [options] | clyde-sim kraken [options]\n\
         options: --fanout K --visibility V --kill SHARE --up MB/s --down MB/s --upstream MB/s --rtt-ms MS --seed N"
    );
    std::process::exit(2)
}

fn number(v: Option<String>) -> f64 {
    v.and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut s = match args.next().as_deref() {
        Some("kraken") => Scenario::kraken(),
        Some("herd") => {
            let nodes = number(args.next()) as usize;
            Scenario::herd(nodes, Vec::new())
        }
        _ => usage(),
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--fanout" => s.fanout = number(args.next()) as usize,
            "--visibility" => s.visibility = number(args.next()),
            "--kill" => s.kill_fetcher_at = Some(number(args.next())),
            "--up" => s.node_up = number(args.next()) * 1e6,
            "--down" => s.node_down = number(args.next()) * 1e6,
            "--upstream" => s.upstream = number(args.next()) * 1e6,
            "--rtt-ms" => s.rtt = Duration::from_secs_f64(number(args.next()) / 1e3),
            "--seed" => s.seed = number(args.next()) as u64,
            mb if !mb.starts_with('-') => s.layers.push((number(Some(mb.to_string())) * 1e6) as u64),
            _ => usage(),
        }
    }
    if s.layers.is_empty() || s.nodes == 0 {
        usage();
    }
    let started = Instant::now();
    let r = run(&s);
    println!(
        "{} nodes, {} layers of {} MB, links {:.0}/{:.0} MB/s, upstream {:.0} MB/s, fan-out {}, visibility {}{}: \
         upstream bytes {:.3}x, done p50 {:.2} s, p90 {:.2} s, p99 {:.2} s, last {:.2} s (one node alone {:.2} s: last/alone {:.2}), \
         {}/{} nodes done, {} upstream streams, tree depth {}, most streams served by one node {}, {} passed over, {} gave up \
         [simulated in {:.1} s]",
        s.nodes,
        s.layers.len(),
        s.layers.iter().map(|l| format!("{:.0}", *l as f64 / 1e6)).collect::<Vec<_>>().join("+"),
        s.node_up / 1e6,
        s.node_down / 1e6,
        s.upstream / 1e6,
        s.fanout,
        s.visibility,
        s.kill_fetcher_at.map(|k| format!(", fetcher killed at {:.0}%", k * 100.0)).unwrap_or_default(),
        r.upstream_ratio(),
        r.percentile(0.5),
        r.percentile(0.9),
        r.percentile(0.99),
        r.percentile(1.0),
        r.alone,
        r.percentile(1.0) / r.alone,
        r.done.len(),
        r.live,
        r.fetchers,
        r.depth,
        r.most_children,
        r.pass_overs,
        r.gave_up,
        started.elapsed().as_secs_f64()
    );
}
