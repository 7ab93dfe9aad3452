//! `clyde list`, `clyde prune`, `clyde load`: through the running agent's admin socket when
//! an agent uses the data dir, otherwise directly on the data dir (whose lock then keeps an
//! agent from starting on it until the command is done).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use clyde_admin::client::AdminClient;
use clyde_admin::{ImageEvent, LoadRequest, LoadUpdate, PruneRequest, ops};
use clyde_resolver::Resolver;
use clyde_store::{ImageEntry, PrunePlan, Store};
use clyde_upstream::Upstream;
use futures_util::{Stream, StreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use crate::config::Config;

/// Flags of `clyde list`.
#[derive(Args)]
pub struct ListArgs {
    /// Only names matching one of these regular expressions (comma-separated or repeated)
    #[arg(long, value_delimiter = ',')]
    pattern: Vec<String>,
    /// table for people, json for scripts
    #[arg(long, value_parser = ["table", "json"], default_value = "table")]
    output: String,
}

/// Flags of `clyde prune`.
#[derive(Args)]
pub struct PruneArgs {
    /// Names matching one of these regular expressions (comma-separated or repeated)
    #[arg(long, value_delimiter = ',')]
    pattern: Vec<String>,
    /// Images first cached before this: a date (2026-11-01), a time (2026-11-01T12:00:00Z) or an age (7d)
    #[arg(long)]
    created_before: Option<String>,
    /// Images last pulled before this: a date, a time or an age (30d)
    #[arg(long)]
    accessed_before: Option<String>,
    /// Then remove least-recently-pulled images until the store holds at most this (e.g. 20GiB)
    #[arg(long)]
    max_size: Option<String>,
    /// Print what would be removed and change nothing
    #[arg(long)]
    dry_run: bool,
    /// Remove pinned images (`[retention] pinned`) the selection matches too
    #[arg(long)]
    force: bool,
    /// table for people, json for scripts
    #[arg(long, value_parser = ["table", "json"], default_value = "table")]
    output: String,
}

/// Flags of `clyde load`.
#[derive(Args)]
pub struct LoadArgs {
    /// Image references, e.g. alpine:3.20 or registry.example:5000/team/app:v1
    images: Vec<String>,
    /// A file with one image reference per line (# starts a comment)
    #[arg(long)]
    image_file: Option<PathBuf>,
    /// Only this platform of a multi-platform image, os/arch[/variant] (repeatable; default: all)
    #[arg(long)]
    platform: Vec<String>,
    /// Images loaded at once
    #[arg(long, default_value_t = ops::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Pin the loaded images: eviction never removes them, prune only with --force
    #[arg(long)]
    pin: bool,
}

/// Where a command's work happens.
enum Target {
    Agent(AdminClient),
    Offline(Store),
}

async fn target(config: &Config, create: bool) -> anyhow::Result<Target> {
    if let Some(client) = AdminClient::connect(&config.data_dir).await? {
        return Ok(Target::Agent(client));
    }
    let dir = &config.data_dir;
    if !create && !dir.join("meta.redb").exists() {
        bail!(
            "no agent is running on {} and it holds no store; pass --data-dir or --config of the agent",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let store =
        Store::open(dir, config.piece_size).with_context(|| format!("cannot open the store in {}", dir.display()))?;
    store.set_pins(&config.retention.pinned).context("[retention] pinned")?;
    Ok(Target::Offline(store))
}

pub async fn list(config: &Config, args: &ListArgs) -> anyhow::Result<()> {
    let images = match target(config, false).await? {
        Target::Agent(mut c) => c.list(&args.pattern).await?,
        Target::Offline(store) => {
            let images = ops::list(&store, &args.pattern);
            store.shutdown().await;
            images?
        }
    };
    if args.output == "json" {
        let rows: Vec<serde_json::Value> = images.iter().map(image_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut rows = vec![["REFERENCE", "KIND", "DIGEST", "SIZE", "CREATED", "LAST PULLED"].map(String::from).to_vec()];
    for e in &images {
        // An untagged name's digest is in the DIGEST column already.
        let reference = match e.reference.split_once('@') {
            Some((name, _)) => format!("{name}@{}", e.digest.to_string().chars().take(19).collect::<String>()),
            None => e.reference.clone(),
        };
        rows.push(vec![
            reference,
            match (e.child, e.pinned) {
                (true, _) => format!("{} (platform)", e.kind.as_str()),
                (false, true) => format!("{} (pinned)", e.kind.as_str()),
                (false, false) => e.kind.as_str().to_string(),
            },
            e.digest.to_string().chars().take(19).collect(),
            human_bytes(e.size),
            time(e.created),
            time(e.last_pulled),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn image_json(e: &ImageEntry) -> serde_json::Value {
    serde_json::json!({
        "reference": e.reference,
        "kind": e.kind.as_str(),
        "digest": e.digest.to_string(),
        "media_type": e.media_type,
        "size": e.size,
        "created": time(e.created),
        "last_pulled": time(e.last_pulled),
        "tagged": e.tagged,
        "platform_manifest": e.child,
        "pinned": e.pinned,
    })
}

pub async fn prune(config: &Config, args: &PruneArgs) -> anyhow::Result<()> {
    let now = clyde_store::unix_now();
    let request = PruneRequest {
        patterns: args.pattern.clone(),
        created_before: args.created_before.as_deref().map(|s| parse_instant(s, now)).transpose()?,
        accessed_before: args.accessed_before.as_deref().map(|s| parse_instant(s, now)).transpose()?,
        max_size: args.max_size.as_deref().map(clyde_types::parse_size).transpose()?,
        dry_run: args.dry_run,
        force: args.force,
        max_images: None,
    };
    let plan = match target(config, false).await? {
        Target::Agent(mut c) => c.prune(&request).await?,
        Target::Offline(store) => {
            let plan = ops::prune(&store, &request).await;
            store.shutdown().await;
            plan?
        }
    };
    print_plan(&plan, args.dry_run, &args.output)
}

fn print_plan(plan: &PrunePlan, dry_run: bool, output: &str) -> anyhow::Result<()> {
    if output == "json" {
        let value = serde_json::json!({
            "dry_run": dry_run,
            "images": plan.images,
            "tags": plan.tags,
            "manifests": plan.manifests.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "blobs": plan.blobs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "bytes": plan.bytes,
            "kept_pinned": plan.pinned,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for image in &plan.images {
        println!("{verb} {image}");
    }
    for image in &plan.pinned {
        println!("kept {image}: pinned (--force removes it)");
    }
    println!(
        "{verb} {} images, {} manifests, {} blobs, {}{}",
        plan.images.len(),
        plan.manifests.len(),
        plan.blobs.len(),
        human_bytes(plan.bytes),
        if dry_run { " (dry run: nothing changed)" } else { "" }
    );
    Ok(())
}

/// The images of a load: the arguments, then the file's lines.
pub fn load_images(images: &[String], file: Option<&PathBuf>) -> anyhow::Result<Vec<String>> {
    let mut out = images.to_vec();
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read image file {}", path.display()))?;
        out.extend(ops::image_file_lines(&text));
    }
    Ok(out)
}

/// A resolver over `store` with no peers, for commands that run without an agent.
pub fn offline_resolver(config: &Config, store: Store) -> anyhow::Result<Resolver> {
    let upstream = Upstream::new(config.upstream())?;
    let metrics = clyde_metrics::Metrics::unregistered();
    Ok(Resolver::new(store, None, Arc::new(upstream), None, config.resolver(), metrics)?)
}

pub async fn load(config: &Config, args: &LoadArgs) -> anyhow::Result<()> {
    let images = load_images(&args.images, args.image_file.as_ref())?;
    if images.is_empty() {
        bail!("name images to load, or --image-file FILE");
    }
    for p in &args.platform {
        clyde_resolver::Platform::parse(p)?;
    }
    let request = LoadRequest {
        images: images.clone(),
        platforms: args.platform.clone(),
        concurrency: args.concurrency,
        pin: args.pin,
    };
    let failed = match target(config, true).await? {
        Target::Agent(mut client) => {
            eprintln!("loading {} images through the running agent", images.len());
            let events = client.load(&request).await?;
            render_load(events.map(|e| e.map_err(anyhow::Error::from)), images.len()).await?
        }
        Target::Offline(store) => {
            let resolver = offline_resolver(config, store)?;
            let (tx, rx) = mpsc::channel(256);
            let work = {
                let resolver = resolver.clone();
                async move { ops::load(&resolver, &request, tx).await }
            };
            let events = futures_util::stream::unfold(rx, |mut rx| async move { Some((Ok(rx.recv().await?), rx)) });
            let (result, rendered) = tokio::join!(work, render_load(events, images.len()));
            resolver.shutdown().await;
            result?;
            rendered?
        }
    };
    if failed > 0 {
        bail!("{failed} of {} images failed to load", images.len());
    }
    Ok(())
}

/// Shows a load's progress: bars on a terminal (overall bytes, and one per blob in flight),
/// plain lines otherwise. Returns how many images failed.
async fn render_load(events: impl Stream<Item = anyhow::Result<ImageEvent>>, images: usize) -> anyhow::Result<usize> {
    let mut events = std::pin::pin!(events);
    let bars = std::io::stderr().is_terminal().then(MultiProgress::new);
    let overall = bars.as_ref().map(|m| {
        let bar = m.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template("{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let blob_style = ProgressStyle::with_template("  {msg:20} [{bar:30}] {bytes}/{total_bytes}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let say = |line: String| match &bars {
        Some(m) => {
            let _ = m.println(line);
        }
        None => println!("{line}"),
    };
    let mut in_flight: HashMap<(String, String), ProgressBar> = HashMap::new();
    let mut done_bytes: HashMap<(String, String), u64> = HashMap::new();
    let (mut finished, mut failed) = (0usize, 0usize);
    let update_overall = |finished: usize, failed: usize| {
        if let Some(o) = &overall {
            o.set_message(format!(
                "images {}/{images}{}",
                finished,
                if failed > 0 { format!(" ({failed} failed)") } else { String::new() }
            ));
        }
    };
    update_overall(0, 0);
    while let Some(event) = events.next().await {
        let ImageEvent { image, update } = event?;
        match update {
            LoadUpdate::Resolved { digest, blobs } => {
                let total: u64 = blobs.iter().map(|(_, s)| s).sum();
                if let Some(o) = &overall {
                    o.inc_length(total);
                } else {
                    say(format!("{image}: {digest}, {} blobs, {}", blobs.len(), human_bytes(total)));
                }
            }
            LoadUpdate::Progress { digest, done, size } => {
                let key = (image.clone(), digest.to_string());
                let before = done_bytes.insert(key.clone(), done).unwrap_or(0);
                if let (Some(o), Some(m)) = (&overall, &bars) {
                    o.inc(done.saturating_sub(before));
                    if done < size {
                        let bar = in_flight.entry(key).or_insert_with(|| {
                            let bar = m.add(ProgressBar::new(size));
                            bar.set_style(blob_style.clone());
                            bar.set_message(digest.to_string().chars().take(19).collect::<String>());
                            bar
                        });
                        bar.set_position(done);
                    } else if let Some(bar) = in_flight.remove(&key) {
                        bar.finish_and_clear();
                        m.remove(&bar);
                    }
                }
            }
            LoadUpdate::Done(result) => {
                finished += 1;
                match result {
                    Ok(digest) => say(format!("loaded {image} ({digest})")),
                    Err(e) => {
                        failed += 1;
                        say(format!("failed {image}: {e}"));
                    }
                }
                update_overall(finished, failed);
                if finished == images {
                    break;
                }
            }
        }
    }
    if let Some(o) = overall {
        o.finish_and_clear();
    }
    if finished < images {
        bail!("the load ended after {finished} of {images} images");
    }
    Ok(failed)
}

/// Unix seconds from a date, an RFC 3339 time, or an age before `now` (`7d`, `12h`).
pub fn parse_instant(s: &str, now: u64) -> anyhow::Result<u64> {
    if let Ok(age) = humantime::parse_duration(s) {
        return Ok(now.saturating_sub(age.as_secs()));
    }
    let full = if s.len() == 10 { format!("{s}T00:00:00Z") } else { s.to_string() };
    match humantime::parse_rfc3339_weak(&full) {
        Ok(t) => Ok(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
        Err(_) => bail!("invalid time {s:?}: a date (2026-11-01), a time (2026-11-01T12:00:00Z) or an age (7d, 12h)"),
    }
}

fn time(secs: u64) -> String {
    if secs == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

fn print_table(rows: &[Vec<String>]) {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_from_dates_times_and_ages() {
        let now = 1_800_000_000;
        assert_eq!(parse_instant("7d", now).unwrap(), now - 7 * 86400);
        assert_eq!(parse_instant("2026-11-01", now).unwrap(), 1_793_491_200);
        assert_eq!(parse_instant("2026-11-01T12:00:00Z", now).unwrap(), 1_793_491_200 + 43200);
        assert!(parse_instant("yesterday", now).is_err());
        assert!(parse_instant("2026-13-01", now).is_err());
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
