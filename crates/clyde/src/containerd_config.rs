//! `clyde containerd-config`: containerd `hosts.toml` files that use Clyde as a mirror.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use clyde_types::Registry;

/// Flags of `clyde containerd-config`.
#[derive(Args)]
pub struct ContainerdConfigArgs {
    /// containerd's certs.d directory
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    hosts_dir: PathBuf,
    /// Registry host[:port] to mirror, repeatable; `_default` covers every registry
    #[arg(long = "registry", default_value = "_default")]
    registries: Vec<String>,
    /// The mirror's URL
    #[arg(long, default_value = "http://127.0.0.1:30021")]
    mirror_url: String,
    /// Print the files instead of writing them
    #[arg(long)]
    dry_run: bool,
    /// Keep the existing file's [host] entries, after the mirror
    #[arg(long)]
    keep_existing: bool,
    /// How long containerd tries to connect to the mirror before it falls back to the
    /// registry (containerd 1.7 and later; earlier versions ignore it)
    #[arg(long, default_value = "200ms", value_parser = parse_timeout)]
    dial_timeout: String,
    /// CA certificate (PEM) containerd checks an https mirror against
    #[arg(long)]
    mirror_ca: Option<PathBuf>,
    /// Client certificate (PEM) containerd presents to a mirror that requires one (mTLS)
    #[arg(long, requires = "mirror_client_key")]
    mirror_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, requires = "mirror_client_cert")]
    mirror_client_key: Option<PathBuf>,
}

/// The mirror's `[host]` entry.
pub struct MirrorHost<'a> {
    pub url: &'a str,
    pub dial_timeout: &'a str,
    pub ca: Option<&'a Path>,
    pub client: Option<(&'a Path, &'a Path)>,
}

/// A TOML basic string of a path.
fn quoted(path: &Path) -> anyhow::Result<String> {
    let s = path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))?;
    if s.chars().any(char::is_control) {
        bail!("{s:?} has control characters");
    }
    Ok(format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
}

fn parse_timeout(s: &str) -> Result<String, String> {
    humantime::parse_duration(s).map(|_| s.to_string()).map_err(|e| format!("not a duration like 200ms: {e}"))
}

/// The hosts.toml text for one registry.
pub fn render(registry: &str, mirror: &MirrorHost<'_>, existing_hosts: Option<&str>) -> anyhow::Result<String> {
    let mut out = String::from(
        "# Written by `clyde containerd-config`: containerd asks the Clyde mirror first,\n# then the registry itself.\n",
    );
    if registry != "_default" {
        let parsed = Registry::parse(registry).map_err(|e| anyhow::anyhow!("{e}"))?;
        let scheme = if parsed.is_loopback() { "http" } else { "https" };
        out.push_str(&format!("server = \"{scheme}://{registry}\"\n"));
    }
    out.push_str(&format!(
        "\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"{}\"\n",
        mirror.url, mirror.dial_timeout
    ));
    if let Some(ca) = mirror.ca {
        out.push_str(&format!("  ca = {}\n", quoted(ca)?));
    }
    if let Some((cert, key)) = mirror.client {
        out.push_str(&format!("  client = [[{}, {}]]\n", quoted(cert)?, quoted(key)?));
    }
    if let Some(hosts) = existing_hosts {
        out.push('\n');
        out.push_str(hosts);
        if !hosts.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// The `[host...]` sections of an existing hosts.toml, except one for the mirror itself.
fn existing_hosts(text: &str, mirror_url: &str) -> Option<String> {
    let start = text.find("[host.")?;
    let ours = format!("[host.\"{mirror_url}\"]");
    let mut kept = String::new();
    let mut skipping = false;
    for line in text[start..].lines() {
        if line.trim_start().starts_with("[host.") {
            skipping = line.trim() == ours;
        }
        if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    (!kept.trim().is_empty()).then_some(kept)
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn run(args: &ContainerdConfigArgs) -> anyhow::Result<()> {
    if !args.mirror_url.starts_with("http://") && !args.mirror_url.starts_with("https://") {
        bail!("--mirror-url must start with http:// or https://");
    }
    for registry in &args.registries {
        let dir = args.hosts_dir.join(registry);
        let path = dir.join("hosts.toml");
        let old = std::fs::read_to_string(&path).ok();
        let kept = match (&old, args.keep_existing) {
            (Some(old), true) => existing_hosts(old, &args.mirror_url),
            _ => None,
        };
        let mirror = MirrorHost {
            url: &args.mirror_url,
            dial_timeout: &args.dial_timeout,
            ca: args.mirror_ca.as_deref(),
            client: args.mirror_client_cert.as_deref().zip(args.mirror_client_key.as_deref()),
        };
        let text = render(registry, &mirror, kept.as_deref())?;
        if args.dry_run {
            println!("# {}\n{text}", path.display());
            continue;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some(old) = old.filter(|o| *o != text) {
            let backup = dir.join("hosts.toml.bak");
            std::fs::write(&backup, old).with_context(|| format!("cannot back up to {}", backup.display()))?;
            eprintln!("backed up the previous {} to {}", path.display(), backup.display());
        }
        write_atomically(&path, &text)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: MirrorHost<'static> =
        MirrorHost { url: "http://127.0.0.1:30021", dial_timeout: "200ms", ca: None, client: None };

    #[test]
    fn renders_server_and_mirror() {
        let t = render("127.0.0.1:5000", &PLAIN, None).unwrap();
        assert!(t.contains("server = \"http://127.0.0.1:5000\""));
        assert!(t.contains("[host.\"http://127.0.0.1:30021\"]\n  capabilities = [\"pull\", \"resolve\"]"));
        assert!(t.contains("  dial_timeout = \"200ms\"\n"));
        let t = render("_default", &PLAIN, None).unwrap();
        assert!(!t.contains("server ="));
        assert!(render("../etc", &PLAIN, None).is_err());
    }

    #[test]
    fn renders_the_mirror_ca_and_client_certificate() {
        let mirror = MirrorHost {
            url: "https://127.0.0.1:30021",
            ca: Some(Path::new("/etc/clyde/ca.pem")),
            client: Some((Path::new("/etc/clyde/c.pem"), Path::new("/etc/clyde/c\"key.pem"))),
            ..PLAIN
        };
        let t = render("_default", &mirror, None).unwrap();
        assert!(t.contains("  ca = \"/etc/clyde/ca.pem\"\n"), "{t}");
        assert!(t.contains("  client = [[\"/etc/clyde/c.pem\", \"/etc/clyde/c\\\"key.pem\"]]\n"), "{t}");
        let parsed: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(parsed["host"]["https://127.0.0.1:30021"]["client"][0][1].as_str(), Some("/etc/clyde/c\"key.pem"));
    }

    #[test]
    fn keeps_other_hosts_but_not_the_old_mirror() {
        let old = "server = \"https://r\"\n[host.\"http://127.0.0.1:30021\"]\n  capabilities = [\"pull\"]\n[host.\"https://other\"]\n  capabilities = [\"pull\"]\n";
        let kept = existing_hosts(old, "http://127.0.0.1:30021").unwrap();
        assert_eq!(kept, "[host.\"https://other\"]\n  capabilities = [\"pull\"]\n");
    }
}
